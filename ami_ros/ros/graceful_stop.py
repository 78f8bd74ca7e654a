"""Ctrl-C on `ros2 launch`: the graph stops through the manager, with its final checkpoint.

launch_ros sends no signal of its own on Ctrl-C: the terminal has already sent
SIGINT to every process of the launch's process group, all at the same moment.
So the manager takes that SIGINT as ami/shutdown (pause, final checkpoint,
lifecycle shutdown of every node), and a node it manages stays up for that
instead of leaving at once, which would take its part of the checkpoint with it.

The rule for a managed node's first SIGINT (`NodeStop`): it waits for the manager
when it shares its process group with others (a SIGINT to a group also reached
the manager) and the manager manages it (a client of its `change_state`
service exists: the manager holds one for each of its nodes). A node that leads
its own process group (`ami-ros launch` and the tests start each node in its own
session, a shell makes each command a group) got a signal meant for it alone,
and a node no manager manages has nothing to wait for: both exit at once, as
before. The wait ends with its lifecycle shutdown, when no manager is left, or
after `shutdown_grace` seconds. A second signal, or SIGTERM (launch_ros's
escalation after `sigterm_timeout`), ends it at once.

The same process-group test tells the manager (`ManagerStop`) whether a SIGINT
is the launch's Ctrl-C; a first SIGTERM (`kill`, a service manager) is a request
to stop the graph too. Why not the manager's presence alone: a node stopped on
its own while the manager runs (a test, a supervisor) would wait the whole grace.

Signal handlers only record the signal: rclpy must not be called from one, and
rclpy's own handlers (which shut the context down at once) are not installed.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

# Long enough for a final checkpoint with the `ami` preset on a CPU: the save waits for a
# training round under way (35 s for a full `ami` dynamics round on one free core,
# docs/performance.md; more on a busy machine), as the manager's save_timeout does.
SHUTDOWN_GRACE = 180.0
# What launch/ami.launch.py gives launch_ros: SIGTERM only after every node's own grace,
# so it reaches a node that hangs, never a save under way.
LAUNCH_SIGTERM_TIMEOUT = SHUTDOWN_GRACE + 10.0
_MANAGER_CHECK_PERIOD = 0.5  # s between looks at the ROS graph while waiting


class StopSignals:
    """SIGINT and SIGTERM, recorded for the spin loop to act on."""

    def __init__(self) -> None:
        self.received: list[int] = []  # appending is atomic: the handler runs between bytecodes
        self._previous = {s: signal.signal(s, self._record) for s in (signal.SIGINT, signal.SIGTERM)}

    def _record(self, signum: int, _frame: Any) -> None:
        self.received.append(signum)

    def name(self, index: int = 0) -> str:
        return signal.Signals(self.received[index]).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def shares_process_group() -> bool:
    """Whether this process is not its group's leader: a SIGINT to the group (a terminal's
    Ctrl-C under ros2 launch) reached the others too."""
    return os.getpgrp() != os.getpid()


class NodeStop:
    """When a managed node's spin loop ends after a signal (the rule in the module docstring)."""

    def __init__(self, node: Any, signals: StopSignals, grace: float) -> None:
        self.node = node
        self.signals = signals
        self.grace = grace
        self._deadline: float | None = None
        self._checked_at = 0.0

    def _managed(self) -> bool:
        return self.node.count_clients(f'{self.node.get_name()}/change_state') > 0

    def __call__(self) -> bool:
        """True when the node should stop spinning now."""
        if not self.signals.received:
            return False
        log = self.node.get_logger()
        if len(self.signals.received) > 1 or self.signals.received[0] != signal.SIGINT:
            if self._deadline is not None:
                log.warning(f'{self.signals.name(-1)} while waiting for the manager: exiting now')
            return True
        now = time.monotonic()
        if self._deadline is None:
            if self.grace <= 0 or not shares_process_group() or not self._managed():
                return True
            self._deadline, self._checked_at = now + self.grace, now
            log.info(f'SIGINT to the whole launch: serving until the manager shuts this node down '
                     f'(at most {self.grace:g} s; Ctrl-C again exits now)')
            return False
        if now >= self._deadline:
            log.warning(f'the manager did not shut this node down within {self.grace:g} s: exiting')
            return True
        if now - self._checked_at >= _MANAGER_CHECK_PERIOD:
            self._checked_at = now
            if not self._managed():
                log.warning('the manager is gone: exiting')
                return True
        return False


class ManagerStop:
    """The manager's first signal (SIGTERM, or SIGINT to its whole process group) starts
    ami/shutdown's path; it ends on its own when that is done (`finished`). A second signal
    ends it at once, and so does the first when it was a SIGINT meant for the manager alone
    (it leads its own process group, as the nodes' rule says) or none of its nodes is there
    any more (nothing to save or shut down)."""

    def __init__(self, signals: StopSignals, manager: Any, start_shutdown: Callable[[], Any]) -> None:
        self.signals = signals
        self.manager = manager
        self.start_shutdown = start_shutdown
        self._started = False

    def _any_node_there(self) -> bool:
        return any(self.manager.count_services(f'{name}/change_state') > 0 for name in self.manager.managed)

    def __call__(self) -> bool:
        if not self.signals.received:
            return False
        log = self.manager.get_logger()
        if len(self.signals.received) > 1:
            log.warning(f'{self.signals.name(-1)} again: exiting without waiting for the shutdown')
            return True
        if not self._started:
            self._started = True
            alone = self.signals.received[0] == signal.SIGINT and not shares_process_group()
            if alone or not self._any_node_there():
                return True
            if self.manager.state != 'shutting_down':  # not when ami/shutdown is under way already
                log.info(f'{self.signals.name()}: pausing the graph, saving the final checkpoint, '
                         'shutting every node down (a second signal exits now)')
                self.start_shutdown()
        return False
