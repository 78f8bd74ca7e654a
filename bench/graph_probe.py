"""What the benches see of a running graph from outside it: its node processes and its /diagnostics.

`bench_run_directory` readies a run's directory and DDS domain;
`node_processes` finds the processes a launcher started (by the `__node:=`
and `__ns:=` remaps on their command lines); `GraphProbe` is an rclpy node
of the bench's own process, in its own context, spun by one background
thread, that keeps each node's latest /diagnostics values (and, on request,
all of them, for counters read between two reports).
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import time
from pathlib import Path

import psutil

NODE_NAME = re.compile(r'__node:=(\w+)')
NODE_NAMESPACE = re.compile(r'__ns:=/([\w/]+)')


def bench_run_directory(out: Path | None, prefix: str) -> Path:
    """`out` (made), or a new temporary directory; the graph it will start is kept to this machine, in a
    DDS domain of its own unless the environment names one."""
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    os.environ.setdefault('ROS_DOMAIN_ID', str(40 + os.getpid() % 50))
    out = out or Path(tempfile.mkdtemp(prefix=prefix))
    out.mkdir(parents=True, exist_ok=True)
    return out


def node_processes(launcher_pid: int) -> dict[str, psutil.Process]:
    """The live process of each node a launcher started, keyed by its name in the graph:
    'agent' for /agent, 'agent_1/agent' for /agent_1/agent."""
    found = {}
    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.Error:
        return {}
    for child in children:
        try:
            cmdline = ' '.join(child.cmdline())
            match = NODE_NAME.search(cmdline)
            if match and child.status() != psutil.STATUS_ZOMBIE:
                namespace = NODE_NAMESPACE.search(cmdline)
                found[f'{namespace.group(1)}/{match.group(1)}' if namespace else match.group(1)] = child
        except psutil.Error:  # it just ended
            continue
    return found


class GraphProbe:
    """An rclpy node beside the graph that collects /diagnostics; add subscriptions to `.node`.

    `diagnostics` maps each status's name (the node's fully qualified name,
    '/agent' or '/agent_1/agent') to (receive time, values); with
    `history=True`, `history` keeps every report in order."""

    def __init__(self, name: str, history: bool = False) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor

        self._rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        self.diagnostics: dict[str, tuple[float, dict[str, str]]] = {}
        self.history: dict[str, list[tuple[float, dict[str, str]]]] | None = {} if history else None
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 50)
        # One thread: rclpy's MultiThreadedExecutor busy-loops a core, which the graph needs.
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except Exception:  # the context is shut down at the end
            pass

    def _on_diagnostics(self, msg: object) -> None:
        now = time.monotonic()
        for status in msg.status:
            values = {kv.key: kv.value for kv in status.values}
            self.diagnostics[status.name] = (now, values)
            if self.history is not None:
                self.history.setdefault(status.name, []).append((now, values))

    def resolve(self, node: str) -> str | None:
        """The status name `node` stands for: itself, '/node', or the one name ending in '/node'."""
        if node in self.diagnostics:
            return node
        if f'/{node}' in self.diagnostics:
            return f'/{node}'
        matches = [n for n in list(self.diagnostics) if n.endswith(f'/{node}')]
        return matches[0] if len(matches) == 1 else None

    def values(self, node: str) -> dict[str, str]:
        """The latest /diagnostics values of `node` ({} none yet)."""
        name = self.resolve(node)
        return self.diagnostics[name][1] if name else {}

    def number(self, node: str, key: str) -> float | None:
        try:
            return float(self.values(node)[key])
        except (KeyError, ValueError):
            return None

    def by_short_name(self) -> dict[str, tuple[float, dict[str, str]]]:
        """The latest reports keyed by the node's own name without namespace ('agent')."""
        return {name.rsplit('/', 1)[-1]: report for name, report in list(self.diagnostics.items())}

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=5)
        self._thread.join(timeout=5)
        self.node.destroy_node()
        self._rclpy.try_shutdown(context=self.context)
