"""Benchmark: does the curious agent explore more of my_way_home than chance?

For each seed it runs the main job twice for the same wall time, as real
processes (`ami-ros launch world:=doom`): once learning (train:=true) and
once with the untrained policy (train:=false: its five heads start near
uniform, logits within about 0.01 of each other, so it is a uniformly random
policy that never changes). The world runs `time_scale` times faster than
real time. This script counts the distinct map cells (cell_size x cell_size
map units) visited on world/pose, per step, and prints the ratio; it writes
the curves to an image. It also records the agent's prediction error
(curiosity) and prints its mean over the first and the last fifth of each
run: where the forward model learns, it falls. Because my_way_home respawns
the player in a random room every episode, the cells of a whole run grow
mostly with respawns; the cells per episode (episodes as doom_world announces
them on world/episode) measure how far the agent itself gets. The shares of
forward, back, turning and standing-still actions, early and late, show what
the policy learned. `--start X,Y` starts every episode at one map point
(doom_world's `start`), `--preset` the models (default cpu, the
graph's: the policy on the encoder's latent; ami: on the frame),
`--reward` the learning run's reward (core/rewards/),
`--runs learning` makes the learning runs alone (to compare with random
runs made before: the random policy does not depend on the reward). The
random run is always the uniformly random policy: it acts with persistence 0
whatever `--set agent.persistence=` says; `--runs held` adds the untrained
policy with the learning run's persistence (inputs held like keys, nothing
learnt), which tells what holding alone gives from what learning adds. Next
to the curves it writes every run's cells per episode and action shares as
JSON (`--out` with .json), for comparisons across benches. `--trace` adds
every step's place and prediction error to it, and prints where the error
(the curiosity reward's measure) was high: in cells new to the episode or
seen before, near the start or away from it. `--set node.param=value` sets
any launch parameter for every run (e.g. policy_trainer.entropy_coef=0.01).

    .venv/bin/python bench/exploration.py [--seeds 0 1] [--minutes 3] [--time-scale 3]
        [--start 240,-176] [--preset ami] [--reward curiosity]
        [--trace] [--set policy_trainer.entropy_coef=0.01]
        [--runs learning held random] [--set agent.persistence=0.8]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
os.environ.setdefault('ROS_DOMAIN_ID', str(1 + (os.getpid() + 71) % 100))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import rclpy  # noqa: E402
import yaml  # noqa: E402
from geometry_msgs.msg import PoseStamped  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile  # noqa: E402
from sensor_msgs.msg import Joy  # noqa: E402
from std_msgs.msg import Float32, UInt32  # noqa: E402

from ami_ros.core.presets import DEFAULT_PRESET, PRESETS  # noqa: E402
from ami_ros.core.rewards import reward_names  # noqa: E402
from ami_ros.graph import default_params_file  # noqa: E402
from ami_ros.record.pictures import ExplorationMap  # noqa: E402
from ami_ros.worlds.doom import MY_WAY_HOME_FAR_ROOM  # noqa: E402

FAR_ROOM = '{:g},{:g}'.format(*MY_WAY_HOME_FAR_ROOM)
# Run kinds: label -> (train, uniform: persistence forced to 0).
RUNS = {'learning': (True, False), 'held': (False, False), 'random': (False, True)}


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@dataclass
class Run:
    curve: list[int] = field(default_factory=list)  # cells visited after each world step
    errors: list[float] = field(default_factory=list)  # the agent's prediction errors
    episode_cells: list[int] = field(default_factory=list)  # distinct cells per finished episode
    actions: list[tuple[float, ...]] = field(default_factory=list)  # Joy axes + buttons per step
    # Per world step: episode, map x, y, and whether the step entered a cell
    # new to its episode (with --trace, to see where the curiosity reward is high).
    trace: list[tuple[int, int, int, bool]] = field(default_factory=list)

    def action_shares(self, part: slice) -> dict[str, float]:
        """How often the actions in `part` moved forward, turned, or held still."""
        axes = np.asarray([a[:3] for a in self.actions[part]]) if self.actions else np.zeros((1, 3))
        return {'forward': float(np.mean(axes[:, 0] > 0)), 'back': float(np.mean(axes[:, 0] < 0)),
                'turn': float(np.mean(axes[:, 2] != 0)),
                'still': float(np.mean(np.all(axes[:, :2] == 0, axis=1)))}


def parse_overrides(items: list[str], params: dict) -> dict[str, dict[str, object]]:
    """'node.param=value' items -> {node: {param: value}}; exits with one line on a bad item."""
    out: dict[str, dict[str, object]] = {}
    for item in items:
        target, sep, value = item.partition('=')
        node_name, dot, name = target.partition('.')
        if not sep or not dot or not name:
            raise SystemExit(f'--set {item!r}: write NODE.PARAM=VALUE, '
                             'e.g. vae_trainer.min_round_interval=30')
        known = params.get(f'/**/{node_name}', {}).get('ros__parameters')
        if known is None:
            raise SystemExit(f'--set {item!r}: no node {node_name!r} in the launch parameters; '
                             f'choose one of {", ".join(k.removeprefix("/**/") for k in params)}')
        if name not in known:
            raise SystemExit(f'--set {item!r}: {node_name} has no parameter {name!r} in the launch '
                             f'parameters; choose one of {", ".join(known)}')
        out.setdefault(node_name, {})[name] = yaml.safe_load(value)
    return out


def run_once(train: bool, seed: int, seconds: float, time_scale: float, cell: int,
             tmp: Path, start: str = '', reward: str = 'curiosity', preset: str = DEFAULT_PRESET,
             overrides: dict[str, dict[str, object]] | None = None, uniform: bool = False) -> Run:
    """One run of the main job, watched from outside; `overrides`: node -> parameters;
    `uniform`: the agent holds nothing (persistence 0), whatever they say."""
    params = yaml.safe_load(default_params_file().read_text())
    params['/**/doom_world']['ros__parameters'].update(time_scale=time_scale, seed=seed, start=start)
    params['/**/agent']['ros__parameters'].update(seed=seed, reward=reward)
    for node_name, values in (overrides or {}).items():
        params[f'/**/{node_name}']['ros__parameters'].update(values)
    if uniform:
        params['/**/agent']['ros__parameters']['persistence'] = 0.0
    params_file = tmp / f'params-{seed}-{train}-{uniform}.yaml'
    params_file.write_text(yaml.safe_dump(params))
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node('exploration_probe', context=context)
    explored = ExplorationMap(cell)
    run = Run()
    episode = ExplorationMap(cell)

    heard_first = False

    def on_episode(msg: UInt32) -> None:
        nonlocal episode, heard_first
        # The probe is up before the world starts, so the first number it hears
        # is episode 1, and any pose that beat it here (another topic, another
        # reader to match) belongs to it: it opens no new episode.
        if not heard_first:
            heard_first = True
            return
        if episode.cells_visited:
            run.episode_cells.append(episode.cells_visited)
        episode = ExplorationMap(cell)

    def on_pose(msg: PoseStamped) -> None:
        x, y = msg.pose.position.x, msg.pose.position.y
        new = episode.visit(x, y)
        run.trace.append((len(run.episode_cells), round(x), round(y), new))
        explored.visit(x, y)
        run.curve.append(explored.cells_visited)

    # The episode number is sent before that episode's first pose; on separate
    # topics the two may swap, which moves one pose across the boundary.
    node.create_subscription(UInt32, 'world/episode', on_episode, QoSProfile(
        depth=10, durability=DurabilityPolicy.TRANSIENT_LOCAL))
    node.create_subscription(PoseStamped, 'world/pose', on_pose, 100)
    node.create_subscription(Float32, 'prediction_error', lambda m: run.errors.append(m.data), 100)
    node.create_subscription(Joy, 'action',
                             lambda m: run.actions.append((*m.axes, *m.buttons)), 100)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        subprocess.run(
            [sys.executable, '-m', 'ami_ros.cli', 'launch', 'world:=doom', f'preset:={preset}',
             f'train:={"true" if train else "false"}', 'record:=false',
             f'vrchat_port:={free_udp_port()}', f'params_file:={params_file}',
             f'duration:={seconds}'],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=seconds + 120)
    finally:
        executor.shutdown(timeout_sec=2)
        node.destroy_node()
        rclpy.try_shutdown(context=context)
    return run


def print_trace(run: Run, start: str) -> list[tuple[int, int, int, bool, float]]:
    """Where was the prediction error (the curiosity reward's measure) high?

    Poses and errors come one per world step on two topics; they are paired
    from the end (a subscription may miss the first few of either), which
    may shift them by a step: enough to tell rooms apart. Prints the mean
    error on steps that entered a cell new to their episode against steps in
    cells seen before, and near the start (within 160 map units) against
    away from it, by half of the run. Returns the paired steps.
    """
    n = min(len(run.trace), len(run.errors))
    # The world publishes poses before the agent has started; a gap beyond
    # that start-up would say the pairing slipped.
    print(f'    {len(run.trace)} poses, {len(run.errors)} prediction errors paired from the end',
          flush=True)
    steps = [(*t, float(e)) for t, e in zip(run.trace[-n:], run.errors[-n:], strict=True)]
    sx, sy = (float(v) for v in start.split(',')) if start else (math.nan, math.nan)
    for name, part in (('first half', steps[:n // 2]), ('second half', steps[n // 2:])):
        error = np.asarray([s[4] for s in part])
        new = np.asarray([s[3] for s in part], bool)
        near = np.asarray([math.hypot(s[1] - sx, s[2] - sy) < 160 for s in part], bool)
        means = [f'{label} {error[mask].mean():.4f} ({mask.mean():.0%} of steps)'
                 for label, mask in (('new cell', new), ('seen cell', ~new),
                                     ('near the start', near), ('away', ~near)) if mask.any()]
        print(f'    prediction error, {name}: ' + ', '.join(means), flush=True)
    return [(e, x, y, bool(new), round(err, 5)) for e, x, y, new, err in steps]


def plot(curves: dict[str, list[list[int]]], path: Path) -> None:
    """Cells visited against steps, one line per run (cv2: no plotting dependency)."""
    width, height, margin = 800, 500, 50
    img = np.full((height, width, 3), 255, np.uint8)
    longest = max(len(c) for runs in curves.values() for c in runs)
    top = max(max(c) for runs in curves.values() for c in runs if c)
    colours = {'learning': (200, 80, 20), 'held': (30, 150, 30), 'random': (40, 40, 200)}
    colours = {k: v for k, v in colours.items() if curves.get(k)}
    cv2.rectangle(img, (margin, margin), (width - margin, height - margin), (0, 0, 0), 1)
    for label, runs in curves.items():
        for curve in runs:
            xs = margin + np.arange(len(curve)) * (width - 2 * margin) / max(1, longest - 1)
            ys = height - margin - np.asarray(curve) * (height - 2 * margin) / max(1, top)
            pts = np.stack([xs, ys], 1).astype(np.int32).reshape(-1, 1, 2)
            cv2.polylines(img, [pts], False, colours[label], 2)
    for i, (label, colour) in enumerate(colours.items()):
        cv2.putText(img, label, (margin + 10, margin + 25 + 22 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                    colour, 2)
    cv2.putText(img, f'cells visited (max {top}) vs world steps (max {longest})',
                (margin, margin - 15), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1)
    cv2.imwrite(str(path), img[:, :, ::-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1])
    parser.add_argument('--minutes', type=float, default=3.0, help='wall time per run')
    parser.add_argument('--time-scale', type=float, default=3.0)
    parser.add_argument('--cell', type=int, default=64)
    # The room farthest from my_way_home's goal (the green armor at
    # 1040,-352), one of the scenario's own spawn spots: a fixed start makes
    # the cells of a run measure how far the agent gets, not where it respawned.
    parser.add_argument('--start', default=FAR_ROOM, metavar='X,Y',
                        help="doom_world's start: every episode begins at this map point "
                             f"(default {FAR_ROOM}; '' = the scenario's random rooms)")
    parser.add_argument('--reward', default='curiosity', choices=reward_names(),
                        help="the agent's reward (learning runs)")
    parser.add_argument('--preset', default=DEFAULT_PRESET, choices=list(PRESETS),
                        help="the graph's preset (cpu, the default: the policy acts on "
                             "the encoder's latent; ami and large: on the frame); "
                             "the untrained policy of each is uniform")
    parser.add_argument('--set', action='append', default=[], metavar='NODE.PARAM=VALUE',
                        help="a node parameter for every run, e.g. vae_trainer.min_round_interval=30 "
                             "(VALUE read as YAML; repeatable)")
    parser.add_argument('--runs', nargs='+', default=['learning', 'random'],
                        choices=list(RUNS),
                        help='which runs to make per seed (random alone gives a baseline to '
                             'reuse: the uniformly random policy does not depend on the reward '
                             'options nor on persistence; held: the untrained policy with the '
                             "agent's persistence)")
    parser.add_argument('--trace', action='store_true',
                        help='also write every step (episode, x, y, new cell, prediction error) '
                             'to the JSON, and print the prediction error by where the agent was')
    parser.add_argument('--out', default='bench/results/exploration.png',
                        help='the curves picture (.png); the runs go next to it as .json')
    args = parser.parse_args()
    out = Path(args.out)
    if out.suffix != '.png':  # found out only after the runs, it would lose them
        parser.error(f'--out {args.out} must name a .png file (the runs go next to it as .json)')
    overrides = parse_overrides(args.set, yaml.safe_load(default_params_file().read_text()))
    print(f'machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores; '
          f'{args.minutes:g} min per run at time_scale {args.time_scale:g}, cells {args.cell}, '
          f'start {args.start or "random rooms"}, preset {args.preset}, reward {args.reward}'
          + ''.join(f', {n}.{k}={v}' for n, values in overrides.items() for k, v in values.items()))
    curves: dict[str, list[list[int]]] = {label: [] for label in RUNS}
    per_episode: dict[str, list[int]] = {label: [] for label in RUNS}
    records: list[dict] = []  # every run's episodes and shares, for analysis after the bench
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for label, (train, uniform) in RUNS.items():
                if label not in args.runs:
                    continue
                t0 = time.monotonic()
                run = run_once(train, seed, args.minutes * 60, args.time_scale, args.cell,
                               Path(tmp), args.start, args.reward, args.preset, overrides, uniform)
                curves[label].append(run.curve)
                per_episode[label] += run.episode_cells
                fifth = max(1, len(run.errors) // 5)
                half = len(run.episode_cells) // 2
                first, final = (run.action_shares(slice(None, len(run.actions) // 5)),
                                run.action_shares(slice(-(len(run.actions) // 5) or None, None)))
                print(f'seed {seed} {label:8s}: {run.curve[-1] if run.curve else 0:4d} cells in '
                      f'{len(run.curve)} steps ({time.monotonic() - t0:.0f} s); '
                      f'{len(run.episode_cells)} whole episodes, '
                      f'{np.mean(run.episode_cells or [0]):.1f} cells each (first half '
                      f'{np.mean(run.episode_cells[:half] or [0]):.1f}, second half '
                      f'{np.mean(run.episode_cells[half:] or [0]):.1f}); prediction error '
                      f'{np.mean(run.errors[:fifth]):.4f} in the first fifth -> '
                      f'{np.mean(run.errors[-fifth:]):.4f} in the last', flush=True)
                print('    actions, first fifth -> last fifth: ' + ', '.join(
                    f'{k} {first[k]:.2f} -> {final[k]:.2f}' for k in first), flush=True)
                # Long runs: does the learning agent keep getting further?
                fifths = np.array_split(np.asarray(run.episode_cells, float), 5)
                print('    cells per episode by fifth of the run: ' + ', '.join(
                    f'{f.mean():.1f}' if f.size else '-' for f in fifths), flush=True)
                records.append({'seed': seed, 'run': label, 'steps': len(run.curve),
                                'cells': run.curve[-1] if run.curve else 0,
                                'episode_cells': run.episode_cells,
                                'actions_first_fifth': first, 'actions_last_fifth': final})
                if args.trace:
                    records[-1]['trace'] = print_trace(run, args.start)
    ran = [label for label in RUNS if curves[label]]
    # Episodes differ a lot (their start, and chance): the standard error says
    # how far apart two means must be to mean anything.
    episode_mean = {k: float(np.mean(per_episode[k] or [0])) for k in ran}
    sem = {k: float(np.std(per_episode[k]) / math.sqrt(len(per_episode[k])))
           if len(per_episode[k]) > 1 else float('nan') for k in ran}
    print('per whole episode: ' + ', '.join(
        f'{k} {episode_mean[k]:.1f} ± {sem[k]:.1f} cells ({len(per_episode[k])} episodes)'
        for k in ran))
    if 'learning' in ran and len(ran) > 1:
        steps = min(len(c) for label in ran for c in curves[label])
        mean = {k: float(np.mean([c[steps - 1] for c in curves[k]])) for k in ran}
        for other in ran[1:]:
            print(f'after {steps} steps: learning {mean["learning"]:.1f} cells, {other} '
                  f'{mean[other]:.1f} cells, ratio {mean["learning"] / max(mean[other], 1e-9):.2f}; '
                  f'per episode ratio {episode_mean["learning"] / max(episode_mean[other], 1e-9):.2f}')
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix('.json').write_text(json.dumps(
        {'args': vars(args), 'machine': platform.node(), 'runs': records}, indent=1))
    plot(curves, out)
    print(f'curves: {out}, runs: {out.with_suffix(".json")}')


if __name__ == '__main__':
    main()
