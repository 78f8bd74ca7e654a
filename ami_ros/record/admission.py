"""What the recorder takes from the graph, without ROS.

Anyone on the ROS domain can publish /diagnostics and world/pose, so what
they carry is checked before the recorder uses it; each check returns the
reason for a refusal (None: taken), which the recorder logs in one line:

- `metric_name_problem`: MLflow refuses a metric whose name breaks its rule
  (characters outside `[\\w./\\- ]` are replaced by metric_key; a path that
  normalises to another name, or over 250 characters, is refused). One
  refused name fails its whole batch, which would be retried for good and
  record nothing more, so a name is checked before it is queued.
- `step_problem`: the agent's `steps`, the metrics' step axis, must be a
  count MLflow stores (a 64-bit integer; held to 2**53, exact as a float).
- `pose_problem`: a position outside the map (Doom keeps every map within
  +-32768 units) would make the exploration map's picture the size of the
  position.
- `NodeAdmission`: whose statuses are recorded. The graph's nodes when the
  recorder is told them (`ami-ros launch` and the launch file do), else the
  first MAX_NODES valid ROS node names heard: each name costs two parameter
  clients and a series of metrics. A nested name ('/agent_1/agent': a node of
  one of several agents) is taken only when it is a known node, as
  'agent_1/agent'. Statuses of other namespaces are not this run's and are
  passed over silently.
"""

from __future__ import annotations

import math
import posixpath
import re
from collections.abc import Iterable

from ami_ros.record.mlflow_run import metric_key

MAX_METRIC_NAME = 250  # MLflow's limit on an entity key
MAX_STEP = 2**53
MAP_EXTENT = 32768.0  # Doom's map coordinates are 16.16 fixed point
MAX_NODES = 32
_NODE_NAME = re.compile(r'[A-Za-z_][A-Za-z0-9_]{0,254}')


def metric_name_problem(name: str) -> str | None:
    """Why MLflow would refuse metric `name` (after metric_key), or None."""
    key = metric_key(name)
    if len(key) > MAX_METRIC_NAME:
        return f'metric name of {len(key)} characters: MLflow takes at most {MAX_METRIC_NAME}'
    norm = posixpath.normpath(key)
    if norm != key or norm == '.' or norm.startswith(('..', '/')):
        return f'metric name {key[:80]!r} is a path that resolves to {norm[:80]!r}: MLflow refuses it'
    return None


def step_problem(steps: float) -> str | None:
    """Why `steps` cannot be the metrics' step, or None."""
    if not (0 <= steps <= MAX_STEP and steps == int(steps)):
        return f'steps {steps!r} is not a count between 0 and 2**53'
    return None


def pose_problem(x: float, y: float, extent: float = MAP_EXTENT) -> str | None:
    """Why position (x, y) is not on a map of +-`extent` units, or None."""
    if not (math.isfinite(x) and math.isfinite(y)) or abs(x) > extent or abs(y) > extent:
        return f'pose ({x!r}, {y!r}) is outside the map (+-{extent:g} units)'
    return None


def recordable(node: str, values: dict[str, float], step_node: str) -> list[tuple[str, str]]:
    """Take out of `values` (node's status) what MLflow or the step axis would refuse:
    (kind, reason) of each."""
    refusals = []
    for key in [k for k in values if metric_name_problem(f'{node}/{k}')]:
        refusals.append(('metric', metric_name_problem(f'{node}/{key}')))
        del values[key]
    if node == step_node and 'steps' in values and step_problem(values['steps']):
        refusals.append(('steps', step_problem(values.pop('steps'))))
    return refusals


class NodeAdmission:
    """Which statuses are recorded: those of this namespace's nodes (not the recorder's
    own), and of those the `known` ones, or the first `cap` valid names when none are.
    Known names may be nested ('agent_1/agent'); unknown nested names are another
    namespace's."""

    def __init__(self, namespace: str, own_name: str, known: Iterable[str] = (),
                 cap: int = MAX_NODES) -> None:
        self.prefix = '' if namespace == '/' else namespace
        self.own_name = own_name
        self.known = frozenset(known)
        self.cap = cap
        self.heard: set[str] = set()

    def node_of(self, status_name: str) -> str | None:
        """'agent' for '<namespace>/agent', 'agent_1/agent' for a known '<namespace>/agent_1/agent';
        None for other namespaces, other nested names and itself."""
        head = self.prefix + '/'
        if not status_name.startswith(head) or status_name == self.own_name:
            return None
        rest = status_name[len(head):]
        if not rest or ('/' in rest and rest not in self.known):
            return None
        return rest

    def problem(self, node: str) -> str | None:
        """Why `node`'s status is not recorded, or None (then it is heard from now on)."""
        if node in self.heard:
            return None
        if self.known:
            if node not in self.known:
                return f'status of {node[:64]!r}, not a node of this graph ({", ".join(sorted(self.known))})'
        elif not _NODE_NAME.fullmatch(node):
            return f'status of {node[:64]!r}, not a ROS node name'
        elif len(self.heard) >= self.cap:
            return f'status of {node[:64]!r}: {self.cap} nodes are recorded already'
        self.heard.add(node)
        return None
