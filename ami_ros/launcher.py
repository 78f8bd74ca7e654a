"""`ami-ros launch`: start the graph of ami_ros/graph.py as processes.

It does what `ros2 launch ami_ros ami.launch.py` does on a ROS 2 install,
for pip installs without launch_ros: one process per node with the same
parameters file and arguments, node output prefixed with the node's name,
rviz2 with config/ami.rviz on `rviz:=true` (where rviz2 is installed), and
a status line (`StatusPrinter`: kept at the bottom of a terminal, a plain line
every 10 s in a pipe).

A node that dies is restarted, one that keeps dying given up, and the bridge's
death releases VRChat's inputs (ami_ros.supervision; docs/reliability.md).

On SIGINT/SIGTERM or at `duration:=` it stops the graph through the
manager's ami/shutdown: the manager pauses the nodes in graph order (world or
camera first, the agent, the bridge, which releases every input, then the
trainers and the recorder), saves a final checkpoint, and takes them through
their lifecycle shutdown in the same order. Nodes still running then get
SIGINT, in the same order. It exits 0 when every node stopped cleanly, 1 when
one died or stopped with an error.

The nodes and the launcher's own monitor discover as `network:=` says
(ami_ros.graph.discovery_environment: this machine only by default). What it
prints of node output and of the graph's topics is stripped of control
characters first: a peer's text must not move the cursor or rewrite the terminal.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import tempfile
import threading
import time
import unicodedata
from pathlib import Path
from typing import IO

from ami_ros.graph import (
    RVIZ_MISSING,
    agent_groups,
    describe,
    discovery_environment,
    node_namespace,
    params_file,
    resolve_arguments,
    rviz_command,
)
from ami_ros.graph_monitor import STATUS_WIDTH, GraphStatus, StatusMonitor
from ami_ros.ros.node_process import NodeProcess, node_command, write_parameters
from ami_ros.supervision import RestartPolicy, Supervisor, release_inputs

STOP_TIMEOUT = 10.0
SHUTDOWN_TIMEOUT = 180.0  # a final checkpoint of full ami buffers takes a while
ERASE_LINE = '\r\x1b[K'  # carriage return, then ANSI "erase to the end of the line"
NODE_LOG_FORMAT = '{severity} {message}'
# ESC-introduced sequences, whole: CSI (ESC [ ... final byte), OSC and other strings up to
# BEL or ST, two-character escapes. Removing only the ESC would leave '[2J' behind.
_ESCAPE_SEQUENCE = re.compile(r'\x1b(\[[0-?]*[ -/]*[@-~]|[\]PX^_][^\x07\x1b]*(\x07|\x1b\\)?|[0-~])')


def printable(text: str) -> str:
    """`text` without escape sequences and control characters (C0, C1, DEL, bidi and other
    format characters); a tab becomes a space."""
    text = _ESCAPE_SEQUENCE.sub('', text.replace('\t', ' '))
    return ''.join(ch for ch in text if unicodedata.category(ch) not in ('Cc', 'Cf'))


def parse_launch_arguments(items: list[str]) -> dict[str, str]:
    """['world:=doom', ...] -> {'world': 'doom'}; ValueError on other forms."""
    args = {}
    for item in items:
        name, sep, value = item.partition(':=')
        if not sep or not name:
            raise ValueError(f'launch arguments look like NAME:=VALUE, got {item!r}')
        args[name] = value
    return args


class StatusPrinter:
    """Node output lines and the graph's status on one stream.

    On a terminal the status is one line that stays at the bottom: a node's
    line erases it, is printed, and the status is drawn again below it.
    Elsewhere (a pipe, a file) escape codes would be noise: the status is an
    ordinary `[status] ...` line every `plain_interval` seconds, and once more
    at the end.
    """

    def __init__(self, stream: IO[str], plain_interval: float = 10.0) -> None:
        self.stream = stream
        # A dumb terminal (an editor's shell) shows escape codes as text.
        self.tty = stream.isatty() and os.environ.get('TERM') != 'dumb'
        self.plain_interval = plain_interval
        self.lock = threading.Lock()
        self.shown = ''  # the status line on the terminal now
        self.latest: GraphStatus | None = None
        self.latest_printed = True
        self.last_plain = time.monotonic()

    def width(self) -> int:
        """Columns the status may take: STATUS_WIDTH, less on a narrower terminal."""
        if not self.tty:
            return STATUS_WIDTH
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError):  # not a real terminal after all
            return STATUS_WIDTH
        # One column spare: some terminals wrap as soon as the last one is written.
        return max(20, min(STATUS_WIDTH, columns - 1))

    def line(self, text: str) -> None:
        text = printable(text)
        with self.lock:
            if self.shown:
                self.stream.write(ERASE_LINE)
            self.stream.write(text + '\n')
            if self.shown:
                self.stream.write(self.shown)
            self.stream.flush()

    def status(self, status: GraphStatus, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self.lock:
            self.latest, self.latest_printed = status, False
            if self.tty:
                self.shown = printable(status.render(self.width()))
                self.stream.write(ERASE_LINE + self.shown)
                self.stream.flush()
            elif now - self.last_plain >= self.plain_interval:
                self._print_plain(now)

    def _print_plain(self, now: float) -> None:
        assert self.latest is not None
        prefix = '[status] '
        self.stream.write(prefix + printable(self.latest.render(STATUS_WIDTH - len(prefix))) + '\n')
        self.stream.flush()
        self.latest_printed, self.last_plain = True, now

    def close(self) -> None:
        """Leave the last status in the output, as an ordinary line."""
        with self.lock:
            if self.shown:
                self.stream.write('\n')
                self.stream.flush()
                self.shown = ''
            elif not self.tty and self.latest is not None and not self.latest_printed:
                self._print_plain(time.monotonic())


def launch(given: dict[str, str], duration: float = 0.0, status_interval: float = 1.0,
           part: str = 'graph') -> int:
    """Run the graph (`part`: graph.PARTS) until SIGINT/SIGTERM, `duration` seconds, or every node exits.

    Returns 0 when every node stopped cleanly, 1 when one died or failed.
    """
    args = resolve_arguments(given)
    specs = describe(args, part)
    # The graph proper: the manager and the nodes it manages. The others (bag_recorder,
    # web_api) serve it: once the graph is gone (ami-ros shutdown, the HTTP API) they are
    # stopped too, rather than keeping the launch alive.
    manager = next((s for s in specs if s.name == 'manager'), None)
    graph_names = ({'manager', *manager.parameters['managed_nodes']} if manager is not None
                   else {s.name for s in specs})  # the trainers alone: no manager
    params = params_file(args)
    printer = StatusPrinter(sys.stdout)
    # The launcher names each line's node already, and the status line tells
    # the time: a node's line says its level and message (unless the user
    # chose a format).
    log_format = {'RCUTILS_CONSOLE_OUTPUT_FORMAT':
                  os.environ.get('RCUTILS_CONSOLE_OUTPUT_FORMAT', NODE_LOG_FORMAT)}
    discovery = discovery_environment(args)
    # The monitor below is a node of this process: it discovers as the graph does.
    os.environ.update(discovery)
    stop_requested = threading.Event()

    def on_signal(signum, _frame) -> None:
        stop_requested.set()

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    supervisor: Supervisor | None = None
    viewer: NodeProcess | None = None  # rviz2: not a node of the graph, its exit code not the graph's
    monitor: StatusMonitor | None = None
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix='ami_ros_launch_') as tmp:

        def start(spec, parameters) -> NodeProcess:
            overrides = write_parameters(Path(tmp) / f'{spec.path.replace("/", "-")}.yaml', spec.name,
                                         parameters)
            cmd = node_command(spec.executable, spec.name, [params, overrides],
                               namespace=node_namespace(args['namespace'], spec.namespace))
            return NodeProcess(spec.path, cmd, env={**log_format, **discovery},
                               on_line=lambda text, n=spec.path: printer.line(f'[{n}] {text}'))

        try:
            supervisor = Supervisor(
                specs, start, printer.line,
                release=lambda bridge: release_inputs(bridge.parameters['host'], bridge.parameters['port']),
                policy=RestartPolicy(first_delay=float(args['respawn_delay'])))
            supervisor.start_all()
            printer.line(f'[launch] started {", ".join(p.name for p in supervisor.processes())}')
            if args['rviz'] == 'true':
                rviz = rviz_command(args)
                if rviz is None:
                    printer.line(f'[launch] {RVIZ_MISSING}')
                else:
                    viewer = NodeProcess('rviz2', rviz, env=discovery,
                                         on_line=lambda text: printer.line(f'[rviz2] {text}'))
            what = f'world:={args["world"]} ' if part == 'graph' else 'the trainers alone: '
            printer.line(f'[launch] {what}preset:={args["preset"]} '
                         f'device:={args["device"]} network:={args["network"]}; Ctrl-C stops')
            monitor = StatusMonitor(args['namespace'], [g.namespace for g in agent_groups(args)])
            started = time.monotonic()
            last_status = 0.0
            while not stop_requested.is_set():
                # Once the manager shuts the graph down (ami-ros shutdown, the control API),
                # nodes exit on purpose: none is restarted.
                supervisor.poll(stopping=monitor.state == 'shutting_down')
                if supervisor.settled(graph_names):
                    break
                if duration and time.monotonic() - started >= duration:
                    printer.line(f'[launch] duration {duration:g}s reached, stopping')
                    break
                now = time.monotonic()
                if now - last_status >= status_interval:
                    last_status = now
                    values, problem = supervisor.report()
                    monitor.report.set(**values)
                    if problem:
                        monitor.report.warn(problem)
                    else:
                        monitor.report.ok()
                    printer.status(monitor.snapshot(started, values['restarts']), now)
                stop_requested.wait(0.1)
        finally:
            printer.close()
            procs = supervisor.processes() if supervisor is not None else []
            failed += supervisor.failed if supervisor is not None else []
            if monitor is not None and any(p.name == 'manager' and p.alive() for p in procs):
                # The manager saves the final checkpoint and takes every node
                # through its lifecycle shutdown; signals are the fallback.
                printer.line('[launch] stopping: final checkpoint and shutdown through the manager')
                answer = monitor.shutdown_graph(timeout=SHUTDOWN_TIMEOUT)
                printer.line(f'[launch] {answer}')
                deadline = time.monotonic() + STOP_TIMEOUT
                while (any(p.alive() for p in procs if p.name in graph_names)
                       and time.monotonic() < deadline):
                    time.sleep(0.1)
            # In graph order: frames stop first, then the agent, then the
            # bridge, which releases every input.
            for p in procs:
                code = p.stop(signal.SIGINT, STOP_TIMEOUT)
                if code != 0 and p.name not in failed:
                    failed.append(p.name)
                    printer.line(f'[launch] {p.name} stopped with exit code {code}')
            if viewer is not None:
                viewer.stop(signal.SIGINT, STOP_TIMEOUT)
            if monitor is not None:
                monitor.close()
            for s, handler in old_handlers.items():
                signal.signal(s, handler)
    if failed:
        printer.line(f'[launch] failed: {", ".join(failed)}')
        return 1
    printer.line('[launch] all nodes stopped cleanly')
    return 0
