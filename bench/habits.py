"""Benchmark: how many map cells do simple fixed habits reach in my_way_home?

The exploration bench compares the learning agent with the uniformly random
policy. This one asks what a policy that learnt nothing but a habit would
get, so its figures say how much room there is above random and what kind
of behaviour fills it. It steps the embedded world's ViZDoom wrapper
(worlds/doom.py) directly, as fast as it goes (no ROS, no real time), with the
five-part action turned into VRChat input exactly as doom_world does, every
episode from the exploration bench's far room, and prints the distinct
64x64 cells each policy visits per episode (mean ± standard error).

Policies: `uniform` (every part uniform at every step: the bench's random
run); `held-R` (uniform, but each part keeps its previous choice with
probability R: the untrained agent with `persistence:=R`); `forward` (always
forward, turn uniform); `forward-held-R` (mostly forward, turning a quarter
of the time each way, held with R); `circle` (forward and turn right, always:
the habit learning runs fell into); `wall-follow` (forward; when the pose
says it stopped, turn one way for a few steps: privileged, the world's pose
is nothing the agent sees, a rough ceiling for habits without a map).

    .venv/bin/python bench/habits.py [--episodes 20] [--seed 1] [--policies uniform held-0.8]
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from collections.abc import Callable

import numpy as np

from ami_ros.core.action import AXIS_NAMES, BUTTON_NAMES, action_to_controls
from ami_ros.core.presets import ACTION_CHOICES
from ami_ros.record.pictures import ExplorationMap
from ami_ros.worlds.doom import MY_WAY_HOME_FAR_ROOM, DoomWorld, VRChatInputState, frame_skip_for

CELL = 64

# A policy: (rng, its memory across steps, the current pose) -> action parts.
Policy = Callable[[np.random.Generator, dict, tuple[float, float]], list[int]]


def held(persistence: float, probs: list[list[float]] | None = None) -> Policy:
    """Each part keeps its previous choice with `persistence`, else draws from `probs` (uniform)."""
    def act(rng: np.random.Generator, memory: dict, pose: tuple[float, float]) -> list[int]:
        previous = memory.get('action')
        action = [int(previous[i]) if previous is not None and rng.random() < persistence
                  else int(rng.choice(n, p=None if probs is None else probs[i]))
                  for i, n in enumerate(ACTION_CHOICES)]
        memory['action'] = action
        return action
    return act


def wall_follow(rng: np.random.Generator, memory: dict, pose: tuple[float, float]) -> list[int]:
    last = memory.get('pose', (math.inf, math.inf))
    memory['pose'] = pose
    if memory.get('turning', 0) > 0:
        memory['turning'] -= 1
        return [1, 0, memory['turn'], 0, 1]
    if math.dist(pose, last) < 5:  # stopped against a wall
        memory['turn'], memory['turning'] = int(rng.integers(1, 3)), int(rng.integers(3, 10))
        return [0, 0, memory['turn'], 0, 1]
    return [1, 0, 0 if rng.random() < 0.8 else int(rng.integers(1, 3)), 0, 1]


# forward 0.8, none / back 0.1; no strafe 0.8; turn none 0.5, each way 0.25; no jump; run 0.8
MOSTLY_FORWARD = [[0.1, 0.8, 0.1], [0.8, 0.1, 0.1], [0.5, 0.25, 0.25], [1.0, 0.0], [0.2, 0.8]]


def policy_named(name: str) -> Policy:
    if name == 'uniform':
        return held(0.0)
    if name.startswith('held-'):
        return held(float(name.removeprefix('held-')))
    if name == 'forward':
        return lambda rng, memory, pose: [1, 0, int(rng.integers(3)), 0, 0]
    if name.startswith('forward-held-'):
        return held(float(name.removeprefix('forward-held-')), MOSTLY_FORWARD)
    if name == 'circle':
        return lambda rng, memory, pose: [1, 0, 1, 0, 0]
    if name == 'wall-follow':
        return wall_follow
    raise SystemExit(f'unknown policy {name!r}; choose uniform, held-R, forward, forward-held-R, '
                     'circle or wall-follow')


def cells_per_episode(policy: Policy, episodes: int, seed: int, fps: float = 10.0) -> list[int]:
    rng = np.random.default_rng(seed)
    world = DoomWorld('my_way_home', frame_skip=frame_skip_for(fps), start=MY_WAY_HOME_FAR_ROOM,
                      seed=seed)
    inputs = VRChatInputState()
    counts: list[int] = []
    try:
        state = world.observe()
        episode, cells, memory = state.episode, ExplorationMap(CELL), {}
        while len(counts) < episodes:
            axes, buttons = action_to_controls(policy(rng, memory, (state.x, state.y)))
            for name, value in zip(AXIS_NAMES, axes, strict=True):
                inputs.handle(f'/input/{name}', float(value))
            for name, value in zip(BUTTON_NAMES, buttons, strict=True):
                inputs.handle(f'/input/{name}', int(value))
            state = world.step(inputs.to_buttons())
            if state.episode != episode:
                counts.append(cells.cells_visited)
                episode, cells, memory = state.episode, ExplorationMap(CELL), {}
            cells.visit(state.x, state.y)
    finally:
        world.close()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--episodes', type=int, default=20)
    parser.add_argument('--seed', type=int, default=1)
    parser.add_argument('--policies', nargs='+',
                        default=['uniform', 'held-0.5', 'held-0.8', 'held-0.9', 'forward',
                                 'forward-held-0.0', 'forward-held-0.8', 'circle', 'wall-follow'])
    args = parser.parse_args()
    print(f'machine: {platform.node()} {platform.machine()}; my_way_home from {MY_WAY_HOME_FAR_ROOM}, '
          f'{CELL}x{CELL} cells, {args.episodes} episodes per policy, seed {args.seed}', flush=True)
    for name in args.policies:
        policy = policy_named(name)
        t0 = time.monotonic()
        counts = np.asarray(cells_per_episode(policy, args.episodes, args.seed), float)
        print(f'{name:18s} {counts.mean():5.1f} ± {counts.std() / math.sqrt(len(counts)):.1f} '
              f'cells per episode ({time.monotonic() - t0:.0f} s)', flush=True)


if __name__ == '__main__':
    main()
