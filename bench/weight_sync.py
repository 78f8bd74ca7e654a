"""Benchmark: weight sync from push to the agent acting with the new version.

Runs the real agent process at 10 Hz (frames from this script) and pushes
weights through agent/sync_weights, per model and all four at once, both as
inline bytes (byte_array_value, works across machines) and as a 'file://'
envelope (same machine). For each push it prints: the service round trip,
push -> first experience step with the new version, and the longest
frame->action latency of the steps around the push (how much a swap delays
acting).

    .venv/bin/python bench/weight_sync.py [--preset ami] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
# Linux DDS domains stay in 0..101 (higher ones reach into ephemeral ports).
os.environ.setdefault('ROS_DOMAIN_ID', str(1 + (os.getpid() + 37) % 100))

import numpy as np  # noqa: E402
import rclpy  # noqa: E402
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from sensor_msgs.msg import Image, Joy  # noqa: E402
from std_msgs.msg import UInt8MultiArray  # noqa: E402

from ami_ros.core.envelope import read_header  # noqa: E402
from ami_ros.core.models import MODEL_NAMES, build_models  # noqa: E402
from ami_ros.core.schemas import encode_weights  # noqa: E402
from ami_ros.ros.images import rgb_to_image  # noqa: E402
from ami_ros.ros.managed_node import prefer_synchronous_publication
from ami_ros.ros.node_process import NodeProcess, node_command, write_parameters  # noqa: E402


class Probe:
    def __init__(self, preset: str, log_dir: Path) -> None:
        pfile = write_parameters(log_dir / 'agent.yaml', 'agent',
                                 {'preset': preset, 'publish_prediction': False})
        self.agent = NodeProcess('agent', node_command('agent', 'agent', [pfile]),
                                 log_path=log_dir / 'agent.log')
        prefer_synchronous_publication()  # it stands in for the camera node
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node('sync_probe', context=self.context)
        self.pub = self.node.create_publisher(Image, 'camera/image_raw', 10)
        self.client = self.node.create_client(SetParameters, 'agent/sync_weights')
        self.sent: dict[int, float] = {}
        self.latency: list[tuple[float, float]] = []  # (receive time, ms)
        self.versions: list[tuple[float, dict[str, int]]] = []
        self.swap_windows: list[tuple[float, float]] = []
        self.node.create_subscription(Joy, 'action', self._on_action, 100)
        self.node.create_subscription(UInt8MultiArray, 'experience', self._on_experience, 100)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        threading.Thread(target=self._spin, daemon=True).start()
        self.stop = threading.Event()
        threading.Thread(target=self._frames, daemon=True).start()

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except Exception:
            pass

    def _frames(self) -> None:
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 255, (84, 84, 3), dtype=np.uint8) for _ in range(8)]
        i = 0
        start = time.perf_counter()
        while not self.stop.is_set():
            delay = start + i * 0.1 - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            now = self.node.get_clock().now()
            self.sent[now.nanoseconds] = time.perf_counter()
            self.pub.publish(rgb_to_image(frames[i % 8], now.to_msg()))
            i += 1

    def _on_action(self, msg: Joy) -> None:
        key = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        sent = self.sent.pop(key, None)
        if sent is not None:
            now = time.perf_counter()
            self.latency.append((now, (now - sent) * 1000))

    def _on_experience(self, msg: UInt8MultiArray) -> None:
        _, meta = read_header(bytes(msg.data))
        self.versions.append((time.perf_counter(),
                              {k[8:]: int(v) for k, v in meta.items() if k.startswith('version_')}))

    def push(self, params: list[Parameter], expect: dict[str, int]) -> dict[str, float]:
        t0 = time.perf_counter()
        future = self.client.call_async(SetParameters.Request(parameters=params))
        while not future.done():
            time.sleep(0.001)
        t_answer = time.perf_counter()
        ok = all(r.successful for r in future.result().results)
        if not ok:
            raise RuntimeError(future.result().results[0].reason)
        while True:
            seen = [t for t, v in self.versions
                    if t >= t0 and all(v.get(k) == n for k, n in expect.items())]
            if seen:
                break
            time.sleep(0.005)
        time.sleep(1.0)  # look at the steps that follow the swap too
        self.swap_windows.append((t0 - 0.2, seen[0] + 1.0))
        around = [ms for t, ms in self.latency if t0 - 0.2 <= t <= seen[0] + 1.0]
        return {'answer_ms': (t_answer - t0) * 1000, 'acting_ms': (seen[0] - t0) * 1000,
                'max_step_ms': max(around) if around else float('nan'),
                'baseline_ms': float(np.median([ms for _, ms in self.latency[-50:]]))}

    def close(self) -> None:
        self.stop.set()
        self.agent.stop()
        self.executor.shutdown(timeout_sec=2)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--preset', default='ami')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--transports', nargs='+', default=['file', 'bytes'],
                        choices=['file', 'bytes'])
    args = parser.parse_args()
    print(f'machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores; '
          f'preset {args.preset}')
    with tempfile.TemporaryDirectory() as tmp:
        probe = Probe(args.preset, Path(tmp))
        try:
            while len(probe.latency) < 20:
                time.sleep(0.1)
            states = {n: m.state_dict() for n, m in build_models(args.preset, seed=1).items()}
            version = 0
            for transport in args.transports:
                for group in [[n] for n in MODEL_NAMES] + [list(MODEL_NAMES)]:
                    rows = []
                    for _ in range(args.repeats):
                        version += 1
                        params = []
                        size = 0
                        for name in group:
                            blob = encode_weights(name, states[name], version, args.preset)
                            size += len(blob)
                            if transport == 'bytes':
                                value = ParameterValue(type=ParameterType.PARAMETER_BYTE_ARRAY,
                                                       byte_array_value=blob)
                            else:
                                path = Path(tmp) / f'{name}-{version}.safetensors'
                                path.write_bytes(blob)
                                value = ParameterValue(type=ParameterType.PARAMETER_STRING,
                                                       string_value=f'file://{path}')
                            params.append(Parameter(name=name, value=value))
                        # This script's own encoding competes with its frame thread
                        # for the interpreter: let it settle before timing the push.
                        time.sleep(1.0)
                        rows.append(probe.push(params, dict.fromkeys(group, version)))
                    med = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
                    worst = max(r['max_step_ms'] for r in rows)
                    print(f'{transport:5s} {"+".join(group):32s} {size / 1e6:6.2f} MB: '
                          f'answer {med["answer_ms"]:7.1f} ms, acting with it after '
                          f'{med["acting_ms"]:7.1f} ms, longest step around the swap '
                          f'{worst:6.1f} ms (median step {med["baseline_ms"]:.1f} ms)')
            quiet = sorted(ms for t, ms in probe.latency[20:]
                           if not any(a <= t <= b for a, b in probe.swap_windows))
            print(f'steps away from any swap ({len(quiet)}): p50 {np.percentile(quiet, 50):.1f} ms, '
                  f'p99 {np.percentile(quiet, 99):.1f} ms, max {quiet[-1]:.1f} ms')
        finally:
            probe.close()


if __name__ == '__main__':
    main()
