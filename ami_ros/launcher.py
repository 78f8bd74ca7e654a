"""`ami-ros launch`: start the graph of ami_ros/graph.py as processes.

It does what `ros2 launch ami_ros ami.launch.py` does on a ROS 2 install,
for pip installs without launch_ros: one process per node with the same
parameters file and arguments, node output prefixed with the node's name, a
live status line, SIGINT/SIGTERM forwarded to every node in order (world or
camera first, the bridge, which releases every input, after the agent), and a
non-zero exit when a node died.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

from ami_ros.core.timing import LatencyWindow, RateMeter
from ami_ros.graph import describe, params_file, resolve_arguments
from ami_ros.ros.node_process import NodeProcess, node_command, write_parameters

STOP_TIMEOUT = 10.0
SHUTDOWN_TIMEOUT = 180.0  # a final checkpoint of full ami buffers takes a while


def parse_launch_arguments(items: list[str]) -> dict[str, str]:
    """['world:=doom', ...] -> {'world': 'doom'}; ValueError on other forms."""
    args = {}
    for item in items:
        name, sep, value = item.partition(':=')
        if not sep or not name:
            raise ValueError(f'launch arguments look like NAME:=VALUE, got {item!r}')
        args[name] = value
    return args


class _Printer:
    """Node output lines and one status line on the same terminal."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.lock = threading.Lock()
        self.status = ''

    def line(self, text: str) -> None:
        with self.lock:
            if self.tty and self.status:
                self.stream.write('\r\x1b[K')
            self.stream.write(text + '\n')
            if self.tty and self.status:
                self.stream.write(self.status)
            self.stream.flush()

    def set_status(self, text: str) -> None:
        with self.lock:
            self.status = text
            if self.tty:
                self.stream.write('\r\x1b[K' + text)
                self.stream.flush()

    def close(self) -> None:
        with self.lock:
            if self.tty and self.status:
                self.stream.write('\n')
                self.stream.flush()
            self.status = ''


class StatusMonitor:
    """Rates, latency and graph state from the graph's own topics."""

    def __init__(self, namespace: str) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data
        from sensor_msgs.msg import Image, Joy
        from std_msgs.msg import Float32, String

        self._rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context, args=['ami-ros-launch', '--ros-args', '--disable-rosout-logs'],
                   signal_handler_options=rclpy.signals.SignalHandlerOptions.NO)
        self.node = rclpy.create_node('launch_monitor', namespace=namespace or None,
                                      context=self.context, enable_rosout=False)
        self.frames = RateMeter()
        self.actions = RateMeter()
        self.latency = LatencyWindow(100)
        self.reward = float('nan')
        self.state = 'starting'
        self.health: dict[str, dict[str, str]] = {}  # node name -> its latest diagnostic values
        self.node.create_subscription(Image, 'camera/image_raw',
                                      lambda m: self.frames.tick(),
                                      qos_profile_sensor_data)
        self.node.create_subscription(Joy, 'action', self._on_action, 10)
        self.node.create_subscription(Float32, 'reward', self._on_reward, 10)
        self.node.create_subscription(
            String, 'ami/state', lambda m: setattr(self, 'state', m.data),
            QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 20)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except Exception:  # context shut down at exit
            pass

    def _on_action(self, msg) -> None:
        self.actions.tick()
        now = self.node.get_clock().now().nanoseconds
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        if stamp:
            self.latency.add((now - stamp) / 1e6)

    def _on_reward(self, msg) -> None:
        self.reward = msg.data

    def _on_diagnostics(self, msg) -> None:
        for status in msg.status:
            self.health[status.name.rsplit('/', 1)[-1]] = {kv.key: kv.value for kv in status.values}

    def _learning(self) -> str:
        """Steps, weight versions and each trainer's rounds and loss, where known."""
        parts = []
        agent = self.health.get('agent', {})
        if agent:
            versions = '/'.join(agent.get(f'version_{m}', '?') for m in ('encoder', 'dynamics', 'policy'))
            parts.append(f'steps {agent.get("steps", "?")} | weights e/d/p v{versions}')
        for trainer, short in (('vae_trainer', 'vae'), ('dynamics_trainer', 'dyn'),
                               ('policy_trainer', 'ppo')):
            values = self.health.get(trainer)
            if values:
                parts.append(f'{short} r{values.get("rounds", "?")} loss {values.get("loss", "-")}')
        return ' | '.join(parts)

    def line(self, started: float) -> str:
        p50 = self.latency.summary()['p50']
        up = int(time.monotonic() - started)
        learning = self._learning()
        return (f'ami_ros {self.state} | frames {self.frames.rate():4.1f} Hz | '
                f'actions {self.actions.rate():4.1f} Hz | frame->action p50 {p50:.1f} ms | '
                f'reward {self.reward:.3f} | ' + (learning + ' | ' if learning else '')
                + f'up {up // 3600:02d}:{up // 60 % 60:02d}:{up % 60:02d}')

    def shutdown_graph(self, timeout: float) -> str:
        """Call ami/shutdown; the manager's answer or why there is none."""
        from std_srvs.srv import Trigger

        client = self.node.create_client(Trigger, 'ami/shutdown')
        try:
            if not client.wait_for_service(timeout_sec=2.0):
                return 'the manager does not answer; stopping the nodes with SIGINT'
            future = client.call_async(Trigger.Request())
            deadline = time.monotonic() + timeout
            while not future.done() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not future.done():
                return f'no answer from ami/shutdown within {timeout:g} s; stopping with SIGINT'
            return future.result().message
        finally:
            self.node.destroy_client(client)

    def close(self) -> None:
        # The spinning thread leaves rclpy before the node and context go.
        self.executor.shutdown(timeout_sec=5)
        self.thread.join(timeout=5)
        self.node.destroy_node()
        self._rclpy.try_shutdown(context=self.context)


def launch(given: dict[str, str], duration: float = 0.0, status_interval: float = 1.0) -> int:
    """Run the graph until SIGINT/SIGTERM, `duration` seconds, or every node exits.

    Returns 0 when every node stopped cleanly, 1 when one died or failed.
    """
    args = resolve_arguments(given)
    specs = describe(args)
    params = params_file(args)
    printer = _Printer(sys.stdout)
    stop_requested = threading.Event()

    def on_signal(signum, _frame) -> None:
        stop_requested.set()

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    procs: list[NodeProcess] = []
    monitor: StatusMonitor | None = None
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix='ami_ros_launch_') as tmp:
        try:
            for spec in specs:
                overrides = write_parameters(Path(tmp) / f'{spec.name}.yaml', spec.name,
                                             spec.parameters)
                cmd = node_command(spec.executable, spec.name, [params, overrides],
                                   namespace=args['namespace'])
                procs.append(NodeProcess(spec.name, cmd,
                                         on_line=lambda text, n=spec.name: printer.line(f'[{n}] {text}')))
            printer.line(f'[launch] started {", ".join(p.name for p in procs)} '
                         f'(world:={args["world"]} preset:={args["preset"]} device:={args["device"]}); '
                         'Ctrl-C stops')
            monitor = StatusMonitor(args['namespace'])
            started = time.monotonic()
            last_status = 0.0
            reported: set[str] = set()
            while not stop_requested.is_set():
                for p in procs:
                    code = p.proc.poll()
                    if code is not None and p.name not in reported:
                        reported.add(p.name)
                        if code != 0:
                            failed.append(p.name)
                            printer.line(f'[launch] {p.name} died with exit code {code}; '
                                         'see its output above')
                        else:
                            printer.line(f'[launch] {p.name} exited')
                if all(p.proc.poll() is not None for p in procs):
                    break
                if duration and time.monotonic() - started >= duration:
                    printer.line(f'[launch] duration {duration:g}s reached, stopping')
                    break
                now = time.monotonic()
                if now - last_status >= (status_interval if printer.tty else 10.0):
                    last_status = now
                    text = monitor.line(started)
                    printer.set_status(text) if printer.tty else printer.line(f'[status] {text}')
                stop_requested.wait(0.1)
        finally:
            printer.close()
            if monitor is not None and any(p.name == 'manager' and p.alive() for p in procs):
                # The manager saves the final checkpoint and takes every node
                # through its lifecycle shutdown; signals are the fallback.
                printer.line('[launch] stopping: final checkpoint and shutdown through the manager')
                answer = monitor.shutdown_graph(timeout=SHUTDOWN_TIMEOUT)
                printer.line(f'[launch] {answer}')
                deadline = time.monotonic() + STOP_TIMEOUT
                while any(p.alive() for p in procs) and time.monotonic() < deadline:
                    time.sleep(0.1)
            for p in procs:  # in graph order: frames stop first, the bridge releases last
                code = p.stop(signal.SIGINT, STOP_TIMEOUT)
                if code != 0 and p.name not in failed:
                    failed.append(p.name)
                    printer.line(f'[launch] {p.name} stopped with exit code {code}')
            if monitor is not None:
                monitor.close()
            for s, handler in old_handlers.items():
                signal.signal(s, handler)
    if failed:
        printer.line(f'[launch] failed: {", ".join(failed)}')
        return 1
    printer.line('[launch] all nodes stopped cleanly')
    return 0
