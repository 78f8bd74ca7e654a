"""What the live view shows, from message data: entity paths, map pixels, the step clock, diagnostics.

ROS-free: the node hands it plain numbers and arrays. One entity tree per
agent namespace, so a viewer of several agents keeps them apart.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

ROOT_TREE = 'ami'  # the tree of an agent in the root namespace
TRAINER_SUFFIX = '_trainer'
LATENCY_KEYS = {'latency_p50_ms': 'p50', 'latency_p99_ms': 'p99'}  # agent: frame stamp -> action out
VERSION_PREFIX = 'version_'  # agent: the version of each model it acts with


def tree_name(namespace: str) -> str:
    """The entity tree of the agent in `namespace` ('/a/b' -> 'a/b'; the root -> 'ami')."""
    return namespace.strip('/') or ROOT_TREE


@dataclass(frozen=True)
class AgentEntities:
    """The entity paths of one agent's tree."""

    namespace: str  # '/' or '/name'; see `normal_namespace`

    @property
    def root(self) -> str:
        return tree_name(self.namespace)

    def path(self, *parts: str) -> str:
        return '/'.join((self.root, *parts))

    @property
    def camera(self) -> str:
        return self.path('camera')

    @property
    def prediction(self) -> str:
        return self.path('prediction')

    @property
    def reward(self) -> str:
        return self.path('reward')

    @property
    def prediction_error(self) -> str:
        return self.path('prediction_error')

    @property
    def map(self) -> str:
        return self.path('world', 'map')

    @property
    def trail(self) -> str:
        return self.path('world', 'map', 'trail')

    @property
    def pose(self) -> str:
        return self.path('world', 'map', 'pose')

    @property
    def position(self) -> str:
        return self.path('world', 'position')

    @property
    def losses(self) -> str:
        return self.path('loss')

    @property
    def latency(self) -> str:
        return self.path('latency')

    @property
    def events(self) -> str:
        return self.path('events')

    def diagnostic(self, node: str, key: str) -> str:
        return self.path('diagnostics', node, key)

    def topic(self, name: str, own: bool) -> str:
        """This agent's topic `name`: relative for the viewer's own namespace, else absolute."""
        return name if own else f'{self.namespace.rstrip("/")}/{name}'


def normal_namespace(namespace: str) -> str:
    """'/' for the root, else '/a/b': one spelling per namespace."""
    return '/' + namespace.strip('/')


def split_status_name(name: str) -> tuple[str, str]:
    """('/ns', 'node') of a diagnostics status name '/ns/node' ('/', 'node' at the root)."""
    namespace, _, node = ('/' + name.strip('/')).rpartition('/')
    return namespace or '/', node


# -- the map ------------------------------------------------------------------
WALL_RGB = (40, 40, 48)
FLOOR_RGB = (214, 210, 196)
OUTSIDE_RGB = (120, 120, 130)


def occupancy_to_rgb(cells: np.ndarray, width: int, height: int) -> np.ndarray:
    """An OccupancyGrid's cells as an RGB picture, north up (row 0 of the grid is its south edge).

    100 = wall, 0 = floor, -1 = outside; values between shade from floor to wall.
    """
    grid = np.asarray(cells, dtype=np.int16).reshape(height, width)[::-1]
    rgb = np.empty((height, width, 3), np.uint8)
    known = np.clip(grid, 0, 100)[..., None] / 100.0
    rgb[:] = (np.array(FLOOR_RGB) * (1 - known) + np.array(WALL_RGB) * known).astype(np.uint8)
    rgb[grid < 0] = OUTSIDE_RGB
    return rgb


@dataclass(frozen=True)
class MapFrame:
    """Map units -> pixels of the picture `occupancy_to_rgb` makes (x right, north up)."""

    origin_x: float
    origin_y: float
    resolution: float
    height: int

    def pixels(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Nx2 pixel coordinates of map points (a cell's centre lands on its pixel's centre)."""
        col = (np.asarray(xs, float) - self.origin_x) / self.resolution
        row = self.height - (np.asarray(ys, float) - self.origin_y) / self.resolution
        return np.stack([col, row], axis=-1)


def yaw(qz: float, qw: float) -> float:
    """The heading (radians, counter-clockwise from +x) of a rotation about z."""
    return 2.0 * math.atan2(qz, qw)


def heading_vector(angle: float, length: float) -> tuple[float, float]:
    """A pixel-space arrow for a heading: the picture's rows grow southwards."""
    return length * math.cos(angle), -length * math.sin(angle)


# -- time -------------------------------------------------------------------
class StepClock:
    """The agent's step now: its diagnostics' `steps` plus one per step heard since, never going back.

    The diagnostics come once a second; between two, each step the agent is
    heard taking (`on_step`: a reward, one per step) counts one. Before the
    agent is heard there is no step (None): only wall time.
    """

    def __init__(self) -> None:
        self._reported: int | None = None
        self._steps_since = 0
        self._last = -1

    def on_step(self) -> None:
        self._steps_since += 1

    def on_steps(self, steps: int) -> None:
        self._reported = steps
        self._steps_since = 0

    def now(self) -> int | None:
        if self._reported is None:
            return None
        self._last = max(self._last, self._reported + self._steps_since)
        return self._last


class RateGate:
    """Lets one event through per 1/`rate` seconds (0 = none): images decimated to a rate."""

    def __init__(self, rate: float, clock=time.monotonic) -> None:
        self.period = math.inf if rate <= 0 else 1.0 / rate
        self.clock = clock
        self._next = -math.inf
        self.passed = 0
        self.held = 0

    def open(self) -> bool:
        now = self.clock()
        if now < self._next:
            self.held += 1
            return False
        # From the schedule, not from now: a steady source keeps its rate exactly.
        self._next = max(self._next + self.period, now) if math.isfinite(self._next) else now + self.period
        self.passed += 1
        return True


# -- diagnostics --------------------------------------------------------------
@dataclass
class DiagnosticsView:
    """Sorts one agent's nodes' numeric diagnostics into plots and weight-version events.

    `scalars(node, values)` gives (entity path, value) pairs: each trainer's
    loss in the losses plot, the agent's frame->action latency in the latency
    plot, everything else under diagnostics/<node>/<key>. `events(node, values)`
    gives a line per weight version that changed (the agent's version_<model>,
    a trainer's version).
    """

    entities: AgentEntities
    _versions: dict[str, float] = field(default_factory=dict)

    def scalars(self, node: str, values: Mapping[str, float]) -> list[tuple[str, float]]:
        out = []
        for key, value in values.items():
            if key == 'loss' and node.endswith(TRAINER_SUFFIX):
                out.append((f'{self.entities.losses}/{node[:-len(TRAINER_SUFFIX)]}', value))
            elif key in LATENCY_KEYS and node == 'agent':
                out.append((f'{self.entities.latency}/{LATENCY_KEYS[key]}', value))
            else:
                out.append((self.entities.diagnostic(node, key), value))
        return out

    def events(self, node: str, values: Mapping[str, float]) -> list[str]:
        lines = []
        for key, value in values.items():
            if not (key.startswith(VERSION_PREFIX) or key == 'version'):
                continue
            name = f'{node}/{key}'
            before = self._versions.get(name)
            self._versions[name] = value
            if before != value:
                what = key[len(VERSION_PREFIX):] + ' weights' if key != 'version' else 'its weights'
                lines.append(f'{node}: {what} version {value:g}' + ('' if before is None
                                                                   else f' (was {before:g})'))
        return lines
