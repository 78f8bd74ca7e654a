"""Supervision of the graph's processes in `ami-ros launch` (no ROS here).

A node that dies while the graph runs (SIGKILL, a crash, an exit of its own) is
started again with the same command after a back-off of `first_delay`, then
twice as long at each death that follows within `window` seconds (1, 2, 4 ... s),
up to `cap`. A node that dies `give_up_after` times within `window` is left
dead, with the reason in one line: restarting it would only hide the fault and
take the cores the rest of the graph needs. A node that holds state (the
trainers) restarts from the newest checkpoint in its checkpoint_dir.

When the bridge dies nothing inside it can release VRChat's inputs, so the
supervisor sends the release itself (`release_inputs`, the table the bridge
sends), at once and again when the bridge is started again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ami_ros.core.action import RELEASED_INPUTS
from ami_ros.core.checkpoint import CheckpointError, load_manifest
from ami_ros.core.checkpoint_store import resolve_checkpoint
from ami_ros.graph import NodeSpec
from ami_ros.ros.node_process import NodeProcess

BRIDGE = 'osc_bridge'


@dataclass(frozen=True)
class RestartPolicy:
    """When a dead node is started again, and when it is given up."""

    first_delay: float = 1.0  # s before the first restart
    cap: float = 30.0  # s, the longest back-off
    give_up_after: int = 5  # deaths within `window` ...
    window: float = 300.0  # ... seconds that end the restarts

    def delay(self, attempt: int) -> float:
        """Seconds before restart number `attempt` (1, 2, ...) of a run of deaths."""
        return min(self.cap, self.first_delay * 2 ** (attempt - 1))


@dataclass(frozen=True)
class Decision:
    """What to do about one death: restart after `delay` s (attempt n), or give up (`reason`)."""

    attempt: int
    delay: float = 0.0
    reason: str = ''

    @property
    def gives_up(self) -> bool:
        return bool(self.reason)


class DeathRecord:
    """The deaths of one node: the back-off and give-up rule of a RestartPolicy."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.deaths: deque[float] = deque()
        self.restarts = 0

    def died(self, code: int | None, now: float) -> Decision:
        self.deaths.append(now)
        while self.deaths and now - self.deaths[0] > self.policy.window:
            self.deaths.popleft()
        attempt = len(self.deaths)
        if attempt >= self.policy.give_up_after:
            return Decision(attempt, reason=(
                f'died {attempt} times within {self.policy.window:g} s (last exit code {code}); '
                'not restarting it: see its output above'))
        return Decision(attempt, delay=self.policy.delay(attempt))


def release_inputs(host: str, port: int) -> None:
    """Send VRChat the release of every input (all axes 0.0, both buttons 0) over OSC."""
    from pythonosc.udp_client import SimpleUDPClient

    client = SimpleUDPClient(host, port)
    try:
        for address, value in RELEASED_INPUTS.items():
            client.send_message(address, value)
    finally:
        client.close()


def restart_parameters(spec: NodeSpec) -> dict[str, Any]:
    """`spec`'s parameters for a restart: a node with state takes the newest checkpoint
    of its checkpoint_dir when there is one at least as new as the one it started from."""
    params = dict(spec.parameters)
    if not spec.restores:
        return params
    try:
        newest = resolve_checkpoint('latest', params['checkpoint_dir'])
        # Its manifest and file sizes, not the files' hashes: the launcher's loop, which sees
        # the bridge die, must not stall on gigabytes. A damaged part makes the node die, loudly.
        load_manifest(newest, expected_preset=params.get('preset') or None)
    except CheckpointError:  # none saved yet, or the newest is unusable: as it started
        return params
    newest = newest.absolute()
    current = Path(params['checkpoint']) if params.get('checkpoint') else None
    if current is None or not current.exists() or newest.stat().st_mtime >= current.stat().st_mtime:
        params['checkpoint'] = str(newest)
    return params


@dataclass
class Supervised:
    """One node of the launch: its description, its process now, its deaths."""

    spec: NodeSpec
    process: NodeProcess
    record: DeathRecord
    restart_at: float | None = None  # monotonic time of a pending restart
    ended: bool = False  # exited, and not to be restarted


class Supervisor:
    """Starts the graph's nodes, restarts those that die, releases inputs when the bridge dies.

    `start(spec, parameters)` makes a node's process (the launcher's NodeProcess);
    `say(line)` prints a launcher line; `release(bridge)` sends the release of every input to
    where that bridge sends.
    """

    def __init__(self, specs: Iterable[NodeSpec], start: Callable[[NodeSpec, dict[str, Any]], NodeProcess],
                 say: Callable[[str], None], release: Callable[[NodeSpec], None],
                 policy: RestartPolicy | None = None) -> None:
        self.policy = policy or RestartPolicy()
        self.specs = list(specs)
        self.start, self.say, self.release = start, say, release
        self.nodes: list[Supervised] = []
        self.failed: list[str] = []  # nodes that died and stay dead, or were given up
        self.given_up: list[str] = []

    def start_all(self) -> None:
        """Start every node, in order (those started stay known if one cannot be)."""
        for spec in self.specs:
            self.nodes.append(Supervised(spec, self.start(spec, spec.parameters), DeathRecord(self.policy)))

    def processes(self) -> list[NodeProcess]:
        """The current process of every node, in start order."""
        return [n.process for n in self.nodes]

    def report(self) -> tuple[dict[str, int], str]:
        """The launcher's status: restarts in all and per node ('restarts/<node>', every node
        that can be restarted), and a warning naming the nodes given up ('' none)."""
        per_node = {n.spec.path: n.record.restarts for n in self.nodes if n.spec.respawn}
        values = {'restarts': sum(per_node.values()), **{f'restarts/{k}': v for k, v in per_node.items()}}
        return values, (f'not restarted any more: {", ".join(self.given_up)}' if self.given_up else '')

    def settled(self, names: Iterable[str]) -> bool:
        """Whether every one of `names` has exited and none will be restarted."""
        wanted = set(names)
        return all(not n.process.alive() and n.restart_at is None for n in self.nodes
                   if n.spec.path in wanted)

    def poll(self, stopping: bool, now: float | None = None) -> None:
        """Look at every process: report exits, schedule and make restarts.

        `stopping` (the graph is shutting down): exits are expected and nothing is restarted.
        """
        now = time.monotonic() if now is None else now
        for node in self.nodes:
            if node.restart_at is not None:
                if stopping:
                    node.restart_at, node.ended = None, True
                elif now >= node.restart_at:
                    self._restart(node)
                continue
            code = node.process.returncode
            if code is None or node.ended:
                continue
            name = node.spec.path
            if node.spec.name == BRIDGE:  # first: the avatar must stop before anything is printed
                self._release(node.spec, f'{name} is gone')
            if stopping or not node.spec.respawn:
                node.ended = True
                if code != 0:
                    self.failed.append(name)
                    self.say(f'[launch] {name} died with exit code {code}; see its output above')
                else:
                    self.say(f'[launch] {name} exited')
                continue
            decision = node.record.died(code, now)
            if decision.gives_up:
                node.ended = True
                self.failed.append(name)
                self.given_up.append(name)
                self.say(f'[launch] {name} {decision.reason}')
            else:
                node.restart_at = now + decision.delay
                self.say(f'[launch] restarting {name} (exit {code}), attempt {decision.attempt}, '
                         f'in {decision.delay:g} s')

    def _restart(self, node: Supervised) -> None:
        node.restart_at = None
        node.process.stop()  # already dead: collects its exit and output thread
        params = restart_parameters(node.spec)
        node.process = self.start(node.spec, params)
        node.record.restarts += 1
        restored = f' from checkpoint {params["checkpoint"]}' if params.get('checkpoint') else ''
        self.say(f'[launch] restarted {node.spec.path}{restored}')
        if node.spec.name == BRIDGE:
            self._release(node.spec, f'{node.spec.path} is back')

    def _release(self, bridge: NodeSpec, why: str) -> None:
        try:
            self.release(bridge)
        except OSError as exc:  # no route, a bad host: say it, the graph goes on
            self.say(f'[launch] could not release every input ({why}): {exc}')
            return
        self.say(f'[launch] released every input ({why})')
