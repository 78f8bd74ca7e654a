"""Benchmark: weight sync from push to the agent acting with the new version.

Runs the real agent process at 10 Hz (frames from this script) and pushes
weights through agent/sync_weights, per model and all four at once, as a
'file://' envelope (same machine), over the payload topic (1 MiB uint8[]
chunks named by sha256, ros/weight_payload.py: any machine) or as inline
bytes (byte_array_value: any machine, slow). For each push it prints: the
service round trip, push -> first experience step with the new version, and
the longest frame->action latency of the steps around the push (how much a
swap delays acting). Each transport gets an agent process of its own; with
--across-namespaces (root only) the agent of 'topic' and 'bytes' runs in a
network namespace of its own with its own /dev/shm, joined to this one by a
veth pair, as on another machine: its weights cross real IP.

    .venv/bin/python bench/weight_sync.py [--preset ami] [--repeats 3] [--across-namespaces]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
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
from ami_ros.ros.managed_node import prefer_synchronous_publication  # noqa: E402
from ami_ros.ros.node_process import NodeProcess, node_command, write_parameters  # noqa: E402
from ami_ros.ros.weight_payload import PayloadSender  # noqa: E402
from ami_ros.ros.weight_push import WeightFiles  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'test'))
from ros_harness import in_namespace, veth_namespaces  # noqa: E402

# This process's end of the veth pair, and the agent's (--across-namespaces).
HOST, PEER = '10.202.{}.1', '10.202.{}.2'


def _payload_process(pipe) -> None:
    """The trainers' side of the payload topic, in a process of its own as on their machine."""
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node('payload_sender', context=context)
    sender = PayloadSender(node, 'agent/sync_weights')
    while not sender.matched():
        time.sleep(0.05)
    pipe.send('matched')
    while (blobs := pipe.recv()) is not None:  # held, as a trainer holds its encoded weights,
        pipe.recv()  # until the push starts
        pipe.send([sender.send(blob) for blob in blobs])
    node.destroy_node()
    rclpy.try_shutdown(context=context)


class TrainerSide:
    """Sends payloads from another process: this one measures the agent, undisturbed by sending."""

    def __init__(self) -> None:
        import multiprocessing

        self.pipe, child = multiprocessing.Pipe()
        self.process = multiprocessing.get_context('spawn').Process(target=_payload_process, args=(child,))
        self.process.start()
        self.pipe.recv()  # matched: chunks sent before that are lost

    def load(self, blobs: list[bytes]) -> None:
        """Hand the sender the encoded weights, before the push is timed."""
        self.pipe.send(blobs)

    def send(self) -> list[str]:
        """Send the loaded weights; their names, once sent."""
        self.pipe.send('go')
        return self.pipe.recv()

    def close(self) -> None:
        self.pipe.send(None)
        self.process.join(10)


class Probe:
    def __init__(self, preset: str, log_dir: Path, transport: str, namespace: str | None = None,
                 subnet: int = 0) -> None:
        pfile = write_parameters(log_dir / 'agent.yaml', 'agent',
                                 {'preset': preset, 'publish_prediction': False,
                                  'sync_dir': str(log_dir)})
        command, env = node_command('agent', 'agent', [pfile]), {}
        if namespace is not None:  # another machine: discovery over the veth, a /dev/shm of its own
            shm = log_dir / 'agent_shm'
            shm.mkdir()
            shm.chmod(0o1777)
            command = in_namespace(namespace, command, shm)
            env = {'ROS_AUTOMATIC_DISCOVERY_RANGE': 'SUBNET', 'ROS_STATIC_PEERS': HOST.format(subnet)}
            os.environ.update(ROS_AUTOMATIC_DISCOVERY_RANGE='SUBNET', ROS_STATIC_PEERS=PEER.format(subnet))
        self.agent = NodeProcess('agent', command, log_path=log_dir / 'agent.log', env=env)
        prefer_synchronous_publication()  # it stands in for the camera node
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node('sync_probe', context=self.context)
        self.pub = self.node.create_publisher(Image, 'camera/image_raw', 10)
        self.client = self.node.create_client(SetParameters, 'agent/sync_weights')
        self.files = WeightFiles(str(log_dir), 'bench')
        self.payloads = TrainerSide() if transport == 'topic' else None
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

    def value(self, transport: str, name: str, version: int, blob: bytes) -> ParameterValue:
        """What a Parameter carries for `blob`: inline bytes, or the file it is written to."""
        if transport == 'bytes':
            return ParameterValue(type=ParameterType.PARAMETER_BYTE_ARRAY, byte_array_value=blob)
        return ParameterValue(type=ParameterType.PARAMETER_STRING,
                              string_value=self.files.write(name, version, blob))

    def push(self, transport: str, blobs: dict[str, bytes], version: int) -> dict[str, float]:
        """Push `blobs` as a trainer does: the file is written before, the payload sent within the timing."""
        if transport == 'file':
            values = {n: self.value(transport, n, version, b) for n, b in blobs.items()}
        elif transport == 'topic':
            self.payloads.load(list(blobs.values()))
        time.sleep(0.5)  # as a trainer's weights are ready before its push
        t0 = time.perf_counter()
        if transport == 'topic':
            values = {n: ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=name)
                      for n, name in zip(blobs, self.payloads.send(), strict=True)}
        elif transport == 'bytes':
            values = {n: self.value(transport, n, version, b) for n, b in blobs.items()}
        params = [Parameter(name=n, value=v) for n, v in values.items()]
        expect = dict.fromkeys(blobs, version)
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
        self.files.remove()
        if self.payloads is not None:
            self.payloads.close()
        self.executor.shutdown(timeout_sec=2)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--preset', default='ami')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--transports', nargs='+', default=['file', 'topic'],
                        choices=['file', 'topic', 'bytes'])
    parser.add_argument('--groups', choices=['each', 'all'], default='each',
                        help='each: every model alone, then all four; all: all four only')
    parser.add_argument('--across-namespaces', action='store_true',
                        help="the agent of 'topic' and 'bytes' in a network namespace of its own (root)")
    args = parser.parse_args()
    print(f'machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores; '
          f'preset {args.preset}')
    states = {n: m.state_dict() for n, m in build_models(args.preset, seed=1).items()}
    groups = ([[n] for n in MODEL_NAMES] if args.groups == 'each' else []) + [list(MODEL_NAMES)]
    subnet = 1 + os.getpid() % 250
    namespace = f'ami_bench_{os.getpid()}'
    links = (veth_namespaces((None, namespace), (HOST.format(subnet), PEER.format(subnet)))
             if args.across_namespaces else contextlib.nullcontext())
    with tempfile.TemporaryDirectory() as tmp, links:
        for transport in args.transports:
            remote = args.across_namespaces and transport != 'file'
            log_dir = Path(tmp) / transport
            log_dir.mkdir()
            probe = Probe(args.preset, log_dir, transport, namespace if remote else None, subnet)
            try:
                run_transport(probe, transport, states, groups, args, 'another network namespace'
                              if remote else 'this machine')
            finally:
                probe.close()


def run_transport(probe: Probe, transport: str, states: dict, groups: list[list[str]],
                  args: argparse.Namespace, where: str) -> None:
    while len(probe.latency) < 20:
        time.sleep(0.1)
    version = 0
    for group in groups:
        rows = []
        for _ in range(args.repeats):
            version += 1
            blobs = {name: encode_weights(name, states[name], version, args.preset) for name in group}
            size = sum(len(b) for b in blobs.values())
            # This script's own encoding competes with its frame thread
            # for the interpreter: let it settle before timing the push.
            time.sleep(1.0)
            rows.append(probe.push(transport, blobs, version))
        med = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
        worst = max(r['max_step_ms'] for r in rows)
        print(f'{transport:5s} {"+".join(group):32s} {size / 1e6:6.2f} MB ({where}): '
              f'answer {med["answer_ms"]:7.1f} ms, acting with it after '
              f'{med["acting_ms"]:7.1f} ms, longest step around the swap '
              f'{worst:6.1f} ms (median step {med["baseline_ms"]:.1f} ms)', flush=True)
    quiet = sorted(ms for t, ms in probe.latency[20:]
                   if not any(a <= t <= b for a, b in probe.swap_windows))
    print(f'{transport:5s} steps away from any swap ({len(quiet)}): p50 {np.percentile(quiet, 50):.1f} ms, '
          f'p99 {np.percentile(quiet, 99):.1f} ms, max {quiet[-1]:.1f} ms', flush=True)


if __name__ == '__main__':
    main()
