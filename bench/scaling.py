"""Benchmark: N agents in the Doom world feeding one set of trainers on this machine (issue 27).

For each N of `--agents` it starts `ami-ros launch world:=doom agents:=N
record:=false web_api_port:=0` as a process group, waits until every agent
acts, lets it warm up for `--warmup` seconds, measures `--seconds`, and stops
it with SIGINT (the launcher's clean shutdown). Counters come from
/diagnostics (once a second per node), read at the window's ends by linear
interpolation between the two reports around each end:

- per agent: steps in the window, missed steps (the world's steps less the
  agent's, as bench/soak.py counts them), rate, the agent's own latency p99
  and max over its last `latency_window` steps (set to the window at 10 Hz),
  dropped frames (replaced unseen: a cross-check);
- experience steps per second, summed over the agents; the samples per
  second the trainers consume (each round completed in the window counts
  the `samples` it trained on: VAE frames, dynamics sequences, PPO steps; an
  item kept in a buffer counts in every round); scaling efficiency = steps/s
  at N / (N x steps/s at 1); CPU per node kind (psutil, over the window).

Then the largest N that kept every agent at 10 Hz (rate >= 9.5) with no
missed step, and an estimate for a 16-core machine with its reasoning.

    .venv/bin/python bench/scaling.py [--agents 1 2 4] [--seconds 60] [--warmup 15] [--preset cpu]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml
from graph_probe import GraphProbe, bench_run_directory, node_processes

from ami_ros.graph import TRAINERS, default_params_file

ROOT = Path(__file__).resolve().parent.parent
HOLD_RATE_HZ = 9.5  # "keeps 10 Hz"
TARGET_CORES = 16
ACTING_KINDS = ('doom_world', 'agent', 'osc_bridge')  # one of each per agent
CONTROL_KINDS = ('manager', 'launcher', 'recorder')  # one of each for all agents
SHARED_KINDS = (*CONTROL_KINDS, *TRAINERS)
HEADROOM = 0.8  # the share of the cores assumed usable at 10 Hz where no N run here failed
KEPT_UP = 0.9  # the trainers keep up while their samples per step stay within 10% of the first N's
Report = tuple[float, dict[str, str]]


@dataclass
class AgentFigures:
    steps: float
    world_steps: float
    dropped: float
    p99_ms: float
    max_ms: float

    @property
    def missed(self) -> int:
        return max(0, round(self.world_steps - self.steps))


@dataclass
class Run:
    n: int
    seconds: float = 0.0
    agents: list[AgentFigures] = field(default_factory=list)
    trainer_rounds: dict[str, int] = field(default_factory=dict)
    trainer_samples: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)  # node kind -> CPU % of each process
    rss: dict[str, list[float]] = field(default_factory=dict)  # node kind -> MiB of each process
    restarts: int = 0  # nodes the launcher restarted during the run (a restarted one's CPU is left out)
    error: str = ''

    @property
    def steps_per_s(self) -> float:
        return sum(a.steps for a in self.agents) / self.seconds

    @property
    def samples_per_s(self) -> float:
        return sum(self.trainer_samples.values()) / self.seconds

    @property
    def samples_per_step(self) -> float:
        return self.samples_per_s / self.steps_per_s if self.steps_per_s else 0.0

    def holds(self) -> bool:
        return not self.error and all(a.steps / self.seconds >= HOLD_RATE_HZ and a.missed == 0
                                      for a in self.agents)

    def cores(self, kinds: tuple[str, ...]) -> float:
        return sum(sum(self.cpu.get(k, [])) for k in kinds) / 100


def machine() -> str:
    model = next((line.split(':', 1)[1].strip() for line in Path('/proc/cpuinfo').read_text().splitlines()
                  if line.startswith('model name')), platform.processor() or platform.machine())
    return (f'{model}, {psutil.cpu_count(logical=False)} cores / {psutil.cpu_count()} threads, '
            f'{psutil.virtual_memory().total / 2**30:.1f} GiB RAM, {platform.system()} {platform.release()}, '
            f'Python {platform.python_version()}')


def namespaces(n: int) -> list[str]:
    """Each agent's namespace: '' for one agent (today's names), /agent_0 ... /agent_{n-1} for more."""
    return [''] if n == 1 else [f'/agent_{i}' for i in range(n)]


def free_port_block(n: int) -> int:
    """A UDP port p with p .. p+n-1 free: the worlds' OSC ports (vrchat_port + i)."""
    for _ in range(100):
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
        try:
            socks[0].bind(('127.0.0.1', 0))
            base = socks[0].getsockname()[1]
            for i, sock in enumerate(socks[1:], 1):
                sock.bind(('127.0.0.1', base + i))
            return base
        except OSError:  # taken, or past 65535
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f'no {n} consecutive free UDP ports')


def params_file(work: Path, seconds: float) -> Path:
    params = yaml.safe_load(default_params_file().read_text())
    # The agent's latency percentiles over about the window's steps (at 10 Hz).
    params.setdefault('/**/agent', {}).setdefault('ros__parameters', {})['latency_window'] = max(
        100, round(seconds * 10))
    path = work / 'params.yaml'
    path.write_text(yaml.safe_dump(params))
    return path


def value_at(reports: list[Report], key: str, t: float) -> float:
    """`key` at monotonic time t, interpolated between the reports received just before and after."""
    points = [(when, float(values[key])) for when, values in reports if key in values]
    before = [p for p in points if p[0] <= t]
    after = [p for p in points if p[0] > t]
    if not before or not after:
        raise RuntimeError(f'no {key} report on both sides of the window\'s end')
    (t0, v0), (t1, v1) = before[-1], after[0]
    return v0 + (v1 - v0) * (t - t0) / (t1 - t0)


def rounds_in(reports: list[Report], t0: float, t1: float) -> tuple[int, float]:
    """(rounds completed in (t0, t1], the samples they trained on) from a trainer's reports.

    A report carries the last round's `samples`; where a report shows more than one new round, each
    counts with that figure."""
    rounds, samples, last = 0, 0.0, None
    for when, values in reports:
        if 'rounds' not in values:
            continue
        count = int(values['rounds'])
        if last is not None and t0 < when <= t1 and count > last:
            rounds += count - last
            samples += (count - last) * float(values.get('samples', 0))
        if when <= t1:
            last = count
    return rounds, samples


def node_kind(name: str) -> str:
    return name.rsplit('/', 1)[-1]


def cpu_seconds(launcher: subprocess.Popen) -> dict[int, tuple[str, float]]:
    """pid -> (node kind, user + system seconds) of the launcher, each node with its own children
    (ViZDoom's engine runs in a child of doom_world) and this bench's probe."""
    procs = [(node_kind(name), p) for name, p in node_processes(launcher.pid).items()]
    for kind, proc in list(procs):
        try:
            procs += [(kind, child) for child in proc.children(recursive=True)]
        except psutil.Error:
            continue
    procs += [('launcher', psutil.Process(launcher.pid)), ('bench probe', psutil.Process())]
    found = {}
    for kind, proc in procs:
        try:
            times = proc.cpu_times()
            found[proc.pid] = (kind, times.user + times.system)
        except psutil.Error:
            continue
    return found


def wait_acting(probe: GraphProbe, launcher: subprocess.Popen, agents: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if launcher.poll() is not None:
            raise RuntimeError(f'the launcher exited with {launcher.returncode}')
        waiting = [a for a in agents if (probe.number(a, 'steps') or 0) <= 0]
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f'not acting after {timeout:g} s: {", ".join(waiting)}')
        time.sleep(0.5)


def wait_reports_after(probe: GraphProbe, names: list[str], t: float, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(probe.diagnostics.get(n, (0.0, {}))[0] > t for n in names):
            return
        time.sleep(0.2)
    raise RuntimeError(f'no /diagnostics after the window from {names}')


def stop(launcher: subprocess.Popen) -> int:
    """SIGINT to the launcher's process group (a Ctrl-C); SIGKILL to everything left after 3 minutes."""
    nodes = list(node_processes(launcher.pid).values())
    if launcher.poll() is None:
        os.killpg(launcher.pid, signal.SIGINT)
    try:
        return launcher.wait(200)
    except subprocess.TimeoutExpired:
        for proc in [*nodes, psutil.Process(launcher.pid)]:
            try:
                proc.kill()
            except psutil.Error:
                pass
        return launcher.wait()


def measure(n: int, args: argparse.Namespace, out: Path) -> Run:
    run = Run(n)
    work = out / f'agents_{n}'
    work.mkdir(parents=True)
    agents = [f'{ns}/agent' for ns in namespaces(n)]
    worlds = [f'{ns}/doom_world' for ns in namespaces(n)]
    trainers = [f'/{t}' for t in TRAINERS]
    limit = args.start_timeout + args.warmup + args.seconds + 60  # it stops by itself if this bench dies
    cmd = [str(ROOT / '.venv' / 'bin' / 'ami-ros'), 'launch', 'world:=doom', f'preset:={args.preset}',
           'record:=false', 'web_api_port:=0', f'checkpoint_dir:={work / "checkpoints"}',
           f'vrchat_port:={free_port_block(n)}', f'params_file:={params_file(work, args.seconds)}',
           f'duration:={limit:g}', *([f'agents:={n}'] if n > 1 else [])]
    log = open(work / 'launch.log', 'wb')
    launcher = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work, start_new_session=True)
    probe = GraphProbe('scaling_probe', history=True)
    started = time.monotonic()
    try:
        wait_acting(probe, launcher, agents, args.start_timeout)
        print(f'  N={n}: every agent acts after {time.monotonic() - started:.0f} s; '
              f'warm-up {args.warmup:g} s', flush=True)
        time.sleep(args.warmup)
        t0, cpu0 = time.monotonic(), cpu_seconds(launcher)
        time.sleep(args.seconds)
        t1, cpu1 = time.monotonic(), cpu_seconds(launcher)
        run.seconds = t1 - t0
        for pid, (kind, used) in cpu1.items():
            if pid in cpu0:  # the same process all through the window (not respawned)
                run.cpu.setdefault(kind, []).append(100 * (used - cpu0[pid][1]) / run.seconds)
        for name, proc in node_processes(launcher.pid).items():
            try:
                run.rss.setdefault(node_kind(name), []).append(proc.memory_info().rss / 2**20)
            except psutil.Error:
                continue
        wait_reports_after(probe, agents + worlds + trainers, t1)
        history = probe.history or {}
        for agent, world in zip(agents, worlds, strict=True):
            last = next(v for when, v in history[agent] if when > t1)
            run.agents.append(AgentFigures(
                steps=value_at(history[agent], 'steps', t1) - value_at(history[agent], 'steps', t0),
                world_steps=value_at(history[world], 'steps', t1) - value_at(history[world], 'steps', t0),
                dropped=value_at(history[agent], 'dropped_frames', t1)
                - value_at(history[agent], 'dropped_frames', t0),
                p99_ms=float(last['latency_p99_ms']), max_ms=float(last['latency_max_ms'])))
        for trainer in trainers:
            rounds, samples = rounds_in(history.get(trainer, []), t0, t1)
            run.trainer_rounds[node_kind(trainer)] = rounds
            run.trainer_samples[node_kind(trainer)] = samples
    except (RuntimeError, KeyError, StopIteration) as exc:
        run.error = f'{type(exc).__name__}: {exc}'
    finally:
        code = stop(launcher)
        probe.close()
        log.close()
    text = (work / 'launch.log').read_text(errors='replace')
    run.restarts = text.count('[launch] restarting')
    if run.error:
        tail = text.strip().splitlines()[-8:]
        run.error += (f' (launcher exit {code}; last lines of {work / "launch.log"}:\n    '
                      + '\n    '.join(tail) + ')')
    elif code != 0:
        print(f'  N={n}: the launcher exited with {code} at the stop (log {work / "launch.log"})')
    return run


def joined(values: Iterable[str]) -> str:
    return ' / '.join(values)


def report(runs: list[Run], cores_here: int) -> None:
    ok = [r for r in runs if not r.error]
    one = next((r for r in ok if r.n == 1), None)
    print('\n| N | steps per agent | missed per agent | rate Hz per agent | p99 ms per agent (max) | '
          'dropped frames | steps/s total | trainer samples/s (rounds) | efficiency |')
    print('|---|---|---|---|---|---|---|---|---|')
    for r in runs:
        if r.error:
            print(f'| {r.n} | failed: {r.error.splitlines()[0]} | | | | | | | |')
            continue
        rounds = ', '.join(f'{k.split("_")[0]} {v}' for k, v in r.trainer_rounds.items())
        efficiency = f'{r.steps_per_s / (r.n * one.steps_per_s):.2f}' if one else 'n/a (N=1 not run)'
        print(f'| {r.n} | {joined(f"{a.steps:.0f}" for a in r.agents)} '
              f'| {joined(str(a.missed) for a in r.agents)} '
              f'| {joined(f"{a.steps / r.seconds:.2f}" for a in r.agents)} '
              f'| {joined(f"{a.p99_ms:.1f} ({a.max_ms:.0f})" for a in r.agents)} '
              f'| {joined(f"{a.dropped:.0f}" for a in r.agents)} '
              f'| {r.steps_per_s:.2f} | {r.samples_per_s:.1f} = {r.samples_per_step:.1f}/step '
              f'({rounds}) '
              f'| {efficiency} |')
    print('missed = world steps - agent steps in the window; p99 (max): the agent\'s own frame stamp -> '
          'action over its last latency_window steps (the window at 10 Hz); dropped: frames the agent '
          'replaced unseen; samples/s: the `samples` of each trainer round completed in the window (VAE '
          'frames, dynamics sequences, PPO steps trained on), summed over trainers, / window')
    for r in runs:
        if r.error:
            print(f'\nN={r.n} failed: {r.error}')
        elif r.restarts:
            print(f'N={r.n}: the launcher restarted {r.restarts} node(s) during the run (see its log)')
    if not ok:
        return
    kinds = sorted({k for r in ok for k in r.cpu}, key=lambda k: (k not in ACTING_KINDS, k))
    print('\nCPU % of one core over the window, per node kind: total (processes); resident MiB per process')
    print('| node kind | ' + ' | '.join(f'N={r.n}' for r in ok) + ' |')
    print('|---|' + '---|' * len(ok))
    for kind in kinds:
        cells = []
        for r in ok:
            cpu, rss = r.cpu.get(kind, []), r.rss.get(kind, [])
            cells.append(f'{sum(cpu):.0f} ({len(cpu)})' + (f', {sum(rss) / len(rss):.0f} MiB' if rss else ''))
        print(f'| {kind} | ' + ' | '.join(cells) + ' |')
    held = [r for r in ok if r.holds()]
    best = max(held, key=lambda r: r.n) if held else None
    print(f'\nlargest N with every agent >= {HOLD_RATE_HZ} Hz and 0 missed steps: '
          f'{best.n if best else "none"} (of {", ".join(str(r.n) for r in ok)} run)')
    estimate(ok, best, cores_here)


def line_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through the points."""
    mean_x, mean_y = (sum(v) / len(points) for v in zip(*points, strict=True))
    var = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var
    return mean_y - slope * mean_x, slope


def estimate(ok: list[Run], best: Run | None, cores_here: int) -> None:
    """A 16-core machine's agent count from the CPU the acting side, the control nodes and the trainers
    used here. The trainers are apart: niced, SCHED_IDLE and paced, they take what the rest leaves."""
    base = best or min(ok, key=lambda r: r.n)
    upto = [r for r in ok if r.n <= base.n]
    if len(upto) > 1:
        fixed, per_agent = line_fit([(r.n, r.cores(ACTING_KINDS + CONTROL_KINDS)) for r in upto])
        fixed = max(0.0, fixed)
    else:
        fixed, per_agent = base.cores(CONTROL_KINDS), base.cores(ACTING_KINDS) / base.n
    failed = sorted((r for r in ok if r.n > base.n and not r.holds()), key=lambda r: r.n)
    # Where a larger N failed, the whole load at the largest N that held is what this machine carried.
    limit = base.cores(ACTING_KINDS + SHARED_KINDS) / cores_here if failed else HEADROOM
    acting_only = math.floor((limit * TARGET_CORES - fixed) / per_agent)
    first = min(ok, key=lambda r: r.n)
    kept = max((r for r in ok if r.samples_per_step >= KEPT_UP * first.samples_per_step), key=lambda r: r.n)
    learning = kept.cores(TRAINERS) / kept.n
    with_learning = math.floor((limit * TARGET_CORES - fixed) / (per_agent + learning))
    by_trainer_threads = math.floor(len(TRAINERS) / learning) if learning > 0 else with_learning
    print(f'\n{TARGET_CORES}-core estimate' + ('' if best else f' (N={base.n} did NOT hold 10 Hz)') + ':')
    print('  acting (' + ', '.join(ACTING_KINDS) + ') and control (' + ', '.join(CONTROL_KINDS[:2])
          + f'): {fixed:.3f} + {per_agent:.3f} x N cores (fit over N = {", ".join(str(r.n) for r in upto)})')
    print(f'  usable for that: {limit:.0%} of the cores (' + (
        f'the whole load that held at N={base.n}; N={failed[0].n} did not)' if failed else
        'assumed: every N run held, the limit was not reached here)'))
    print(f'  acting alone: ({limit:.2f} x {TARGET_CORES} - {fixed:.2f}) / {per_agent:.3f} = {acting_only} '
          f'agents at 10 Hz (the trainers get only what is left)')
    print(f'  learning: the trainers kept N={first.n}\'s {first.samples_per_step:.1f} samples per experience '
          f'step up to N={kept.n} ({kept.samples_per_step:.1f}), using {kept.cores(TRAINERS):.2f} cores '
          f'= {learning:.3f} per agent')
    behind = [r for r in ok if r.n > kept.n]
    if behind:
        idle = 1 - behind[0].cores(ACTING_KINDS + SHARED_KINDS) / cores_here
        print(f'  at N={behind[0].n} they fell to {behind[0].samples_per_step:.1f} per step with '
              f'{idle:.0%} of the cores idle: not the CPU alone (they are paced between the agents\' steps)')
    print(f'  acting and learning at that ratio: ({limit:.2f} x {TARGET_CORES} - {fixed:.2f}) / '
          f'({per_agent:.3f} + {learning:.3f}) = {with_learning} agents; but the trainers, one process and '
          f'one torch thread each, use {len(TRAINERS)} cores at most: {by_trainer_threads} agents, unless '
          f'given torch_threads > 1 (or a GPU)')
    now = min(with_learning, by_trainer_threads)
    print(f'  => about {acting_only} agents act at 10 Hz on {TARGET_CORES} cores; {with_learning} keep the '
          f'learning per step of one agent if the trainers can use the cores, {now} as the trainers are '
          f'configured now (linear beyond N={max(r.n for r in ok)} assumed)')
    agent_mib = sum(sum(base.rss.get(k, [])) for k in ACTING_KINDS) / base.n
    shared_mib = sum(sum(base.rss.get(k, [])) for k in SHARED_KINDS)
    print(f'  memory: {agent_mib:.0f} MiB resident per agent, {shared_mib:.0f} MiB shared: {acting_only} '
          f'agents need about {(acting_only * agent_mib + shared_mib) / 1024:.0f} GiB')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--agents', type=int, nargs='+', default=[1, 2, 4])
    parser.add_argument('--seconds', type=float, default=60.0, help='the measured window')
    parser.add_argument('--warmup', type=float, default=15.0, help='seconds after every agent acts')
    parser.add_argument('--start-timeout', type=float, default=240.0, help='seconds until every agent acts')
    parser.add_argument('--preset', default='cpu')
    parser.add_argument('--out', type=Path, help='keep the logs here (default: a temporary directory)')
    args = parser.parse_args()
    out = bench_run_directory(args.out, 'ami_scaling_')
    cores_here = os.cpu_count() or 1
    print(f'# scaling: machine {machine()}')
    print(f'# preset {args.preset}, N = {" ".join(map(str, args.agents))}, warm-up {args.warmup:g} s, '
          f'window {args.seconds:g} s; logs in {out}', flush=True)
    runs = [measure(n, args, out) for n in args.agents]
    report(runs, cores_here)
    return 0 if all(not r.error for r in runs) else 1


if __name__ == '__main__':
    sys.exit(main())
