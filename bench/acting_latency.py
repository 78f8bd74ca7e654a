"""Benchmark: the acting chain's step latency and the highest rate it keeps up with.

Runs, as real processes over real DDS: frames published by this script (the
camera's place, so the send time is known exactly) -> agent -> osc_bridge ->
a python-osc server in this script (VRChat's place). For each preset it
prints the agent's step latency (frame stamp -> action received here, so it
includes DDS both ways), the agent's own figure (frame stamp -> action
published, from its /diagnostics), the achieved rate, missed steps (frames
without an action), and the highest camera rate the agent keeps up with.

    .venv/bin/python bench/acting_latency.py [--presets cpu ami] [--seconds 30]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
# Linux DDS domains stay in 0..101 (higher ones reach into ephemeral ports).
os.environ.setdefault('ROS_DOMAIN_ID', str(1 + os.getpid() % 100))

import numpy as np  # noqa: E402
import rclpy  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from pythonosc.dispatcher import Dispatcher  # noqa: E402
from pythonosc.osc_server import BlockingOSCUDPServer  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from sensor_msgs.msg import Image, Joy  # noqa: E402

from ami_ros.core.timing import percentile  # noqa: E402
from ami_ros.ros.images import rgb_to_image  # noqa: E402
from ami_ros.ros.managed_node import prefer_synchronous_publication
from ami_ros.ros.node_process import NodeProcess, node_command, write_parameters  # noqa: E402


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Chain:
    """agent + osc_bridge (+ extra node) processes, an OSC server, and a probe node."""

    def __init__(self, preset: str, log_dir: Path,
                 extra_nodes: tuple[tuple[str, dict], ...] = (),
                 agent_params: dict | None = None) -> None:
        self.osc_messages = 0
        dispatcher = Dispatcher()
        dispatcher.set_default_handler(self._on_osc)
        port = free_udp_port()
        self.osc = BlockingOSCUDPServer(('127.0.0.1', port), dispatcher)
        threading.Thread(target=self.osc.serve_forever, daemon=True).start()
        self.procs = []
        agent = {'preset': preset, 'publish_prediction': False, **(agent_params or {})}
        for exe, params in (('agent', agent),
                            ('osc_bridge', {'port': port}), *extra_nodes):
            pfile = write_parameters(log_dir / f'{exe}.yaml', exe, params)
            self.procs.append(NodeProcess(exe, node_command(exe, exe, [pfile]),
                                          log_path=log_dir / f'{exe}.log'))
        prefer_synchronous_publication()  # it stands in for the camera node
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node('bench_probe', context=self.context)
        self.pub = self.node.create_publisher(Image, 'camera/image_raw', 10)
        self.sent: dict[int, float] = {}
        self.latencies: list[float] = []
        self.diag: dict[str, dict[str, str]] = {}  # node name -> latest /diagnostics values
        self.node.create_subscription(Joy, 'action', self._on_action, 100)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diag, 10)
        # One thread: rclpy's MultiThreadedExecutor busy-loops a core here.
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        threading.Thread(target=self._spin, daemon=True).start()

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except Exception:
            pass

    def _on_osc(self, address, *args) -> None:
        self.osc_messages += 1

    def _on_action(self, msg: Joy) -> None:
        now = time.perf_counter()
        key = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        sent = self.sent.pop(key, None)
        if sent is not None:
            self.latencies.append((now - sent) * 1000)

    def _on_diag(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            self.diag[status.name.rsplit('/', 1)[-1]] = {kv.key: kv.value for kv in status.values}

    @property
    def agent_diag(self) -> dict[str, str]:
        return self.diag.get('agent', {})

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        rng = np.random.default_rng(0)
        while not self.latencies:
            if time.monotonic() > deadline:
                raise RuntimeError('the agent did not answer; see its log')
            self.send(rng.integers(0, 255, (84, 84, 3), dtype=np.uint8))
            time.sleep(0.1)

    def send(self, rgb: np.ndarray) -> None:
        stamp = self.node.get_clock().now()
        msg = rgb_to_image(rgb, stamp.to_msg())
        self.sent[stamp.nanoseconds] = time.perf_counter()
        self.pub.publish(msg)

    def run(self, fps: float, seconds: float) -> dict[str, float]:
        """Publish frames at `fps` for `seconds`; latency and missed-step figures."""
        rng = np.random.default_rng(1)
        frames = [rng.integers(0, 255, (84, 84, 3), dtype=np.uint8) for _ in range(16)]
        self.sent.clear()
        self.latencies = []
        n = int(fps * seconds)
        start = time.perf_counter()
        for i in range(n):
            target = start + i / fps
            delay = target - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self.send(frames[i % len(frames)])
        time.sleep(0.5)  # let the last answers arrive
        lat = sorted(self.latencies)
        answered = len(lat)
        return {'fps': fps, 'frames': n, 'answered': answered, 'missed': n - answered,
                'rate': answered / seconds, 'p50': percentile(lat, 0.5),
                'p99': percentile(lat, 0.99), 'max': lat[-1] if lat else float('nan')}

    def close(self) -> None:
        for p in self.procs:
            p.stop()
        self.executor.shutdown(timeout_sec=2)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self.osc.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--presets', nargs='+', default=['cpu', 'ami'])
    parser.add_argument('--seconds', type=float, default=30.0, help='length of the 10 Hz run')
    parser.add_argument('--sweep', nargs='+', type=float, default=[20, 30, 45, 60],
                        help='camera rates to try for the highest sustainable rate')
    parser.add_argument('--sweep-seconds', type=float, default=10.0)
    args = parser.parse_args()
    print(f'machine: {platform.node()} {platform.processor() or platform.machine()}, '
          f'{os.cpu_count()} cores, Python {platform.python_version()}')
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            log_dir = Path(tmp) / preset
            log_dir.mkdir()
            # The agent's own percentiles over exactly the measured steps.
            chain = Chain(preset, log_dir, agent_params={'latency_window': int(round(args.seconds * 10))})
            try:
                chain.wait_ready()
                time.sleep(1.0)  # let start-up work (imports, first steps) settle
                r = chain.run(10.0, args.seconds)
                time.sleep(1.5)  # the agent's /diagnostics after the run (1 Hz)
                agent = chain.agent_diag
                print(f'[{preset}] 10 Hz for {args.seconds:g}s: rate {r["rate"]:.2f} Hz, '
                      f'missed {r["missed"]}/{r["frames"]}, frame->action received '
                      f'p50 {r["p50"]:.2f} ms p99 {r["p99"]:.2f} ms max {r["max"]:.2f} ms; '
                      f'agent-side p50 {agent.get("latency_p50_ms", "?")} ms '
                      f'p99 {agent.get("latency_p99_ms", "?")} ms; the step alone '
                      f'p50 {agent.get("step_p50_ms", "?")} ms p99 {agent.get("step_p99_ms", "?")} ms; '
                      f'OSC messages {chain.osc_messages}')
                best = 10.0
                for fps in args.sweep:
                    s = chain.run(fps, args.sweep_seconds)
                    keeps_up = s['missed'] <= 0.01 * s['frames']
                    print(f'[{preset}] {fps:g} fps: answered {s["answered"]}/{s["frames"]}, '
                          f'p99 {s["p99"]:.2f} ms -> {"keeps up" if keeps_up else "falls behind"}')
                    if not keeps_up:
                        break
                    best = fps
                print(f'[{preset}] highest camera rate kept up with: {best:g} fps')
            finally:
                chain.close()


if __name__ == '__main__':
    main()
