"""Benchmark: what recording a bag costs the agent, and how fast the bag writer writes.

1. The acting chain of bench/acting_latency.py (frames from this script -> agent ->
   osc_bridge) at 10 Hz, in alternating segments without and with a bag_recorder
   process recording its topics, all in one run: frame->action p99 of each, and
   their ratio (goal <= 1.05).
2. The bag writer (ami_ros.bags.recording.BagWriter, zstd and none) against a plain
   write of the same bytes to the same disk, in MB/s of message data.

    .venv/bin/python bench/bag_recording.py [--preset cpu] [--segments 3] [--seconds 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from acting_latency import Chain  # noqa: E402

from ami_ros.core.timing import percentile  # noqa: E402
from ami_ros.ros.node_process import NodeProcess, node_command, write_parameters  # noqa: E402


def latency_pairs(preset: str, segments: int, seconds: float, log_dir: Path, nices: list[int]) -> None:
    chain = Chain(preset, log_dir)
    without: list[float] = []
    with_bag: dict[int, list[float]] = {nice: [] for nice in nices}
    try:
        chain.wait_ready()
        time.sleep(1.0)
        for i in range(segments):
            r = chain.run(10.0, seconds)
            without += chain.latencies
            print(f'  segment {i} without bag: p99 {r["p99"]:.2f} ms, missed {r["missed"]}', flush=True)
            for nice in nices:
                bag = log_dir / f'bag_{i}_nice{nice}'
                params = write_parameters(log_dir / f'{bag.name}.yaml', 'bag_recorder',
                                          {'output': str(bag), 'status_interval': 0.0, 'nice': nice})
                before = chain.node.count_subscribers('action')
                recorder = NodeProcess('bag_recorder', node_command('bag_recorder', 'bag_recorder', [params]),
                                       log_path=log_dir / f'{bag.name}.log')
                deadline = time.monotonic() + 30
                while chain.node.count_subscribers('action') <= before and time.monotonic() < deadline:
                    time.sleep(0.1)  # until the recorder has found the topics
                r = chain.run(10.0, seconds)
                with_bag[nice] += chain.latencies
                recorder.stop()
                print(f'  segment {i} with bag (nice {nice}): p99 {r["p99"]:.2f} ms, missed {r["missed"]}',
                      flush=True)
    finally:
        chain.close()
    p99_without = percentile(sorted(without), 0.99)
    print(f'[{preset}] frame->action p99 without bag {p99_without:.2f} ms ({len(without)} steps)')
    for nice, latencies in with_bag.items():
        p99_with = percentile(sorted(latencies), 0.99)
        print(f'[{preset}] with bag, recorder nice {nice}: p99 {p99_with:.2f} ms ({len(latencies)} steps): '
              f'ratio {p99_with / p99_without:.3f}')


def writer_throughput(directory: Path, megabytes: float) -> None:
    import numpy as np
    from rclpy.serialization import serialize_message
    from sensor_msgs.msg import Image

    from ami_ros.bags.recording import BagWriter

    rng = np.random.default_rng(0)
    # Frames like the doom world's (84x84 rgb, mostly smooth): half random, half repeated rows.
    frames = []
    for _ in range(16):
        rows = rng.integers(0, 255, (84, 1, 3), dtype=np.uint8).repeat(84, axis=1)
        frames.append(serialize_message(Image(height=84, width=84, encoding='rgb8', step=252,
                                              data=rows.tobytes())))
    count = int(megabytes * 1e6 / len(frames[0]))
    total = count * len(frames[0])
    start = time.perf_counter()
    with (directory / 'plain.bin').open('wb') as f:
        for i in range(count):
            f.write(frames[i % 16])
        f.flush()
        os.fsync(f.fileno())
    plain = total / (time.perf_counter() - start) / 1e6
    print(f'plain write of {total / 1e6:.0f} MB: {plain:.0f} MB/s')
    for compression in ('zstd', 'none'):
        start = time.perf_counter()
        writer = BagWriter(directory / f'bag_{compression}', compression=compression)
        writer.add_topic('/camera/image_raw', 'sensor_msgs/msg/Image')
        for i in range(count):
            writer.write('/camera/image_raw', 10**18 + i * 10**8, frames[i % 16])
        writer.close()
        with writer.files[-1].path.open('rb') as f:
            os.fsync(f.fileno())
        rate = total / (time.perf_counter() - start) / 1e6
        print(f'bag writer ({compression}): {rate:.0f} MB/s of message data ({rate / plain:.2f} of '
              f'the plain write), file {writer.size / 1e6:.1f} MB')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--preset', default='cpu')
    parser.add_argument('--segments', type=int, default=3)
    parser.add_argument('--nice', type=int, nargs='+', default=[10],
                        help="the bag recorder's niceness, one segment each (19 = SCHED_IDLE)")
    parser.add_argument('--seconds', type=float, default=20.0, help='length of each segment')
    parser.add_argument('--megabytes', type=float, default=200.0, help='data written by part 2')
    args = parser.parse_args()
    print(f'machine: {platform.node()} {platform.processor() or platform.machine()}, '
          f'{os.cpu_count()} cores, Python {platform.python_version()}')
    with tempfile.TemporaryDirectory() as tmp:
        latency_pairs(args.preset, args.segments, args.seconds, Path(tmp), args.nice)
    with tempfile.TemporaryDirectory(dir='.') as tmp:  # the disk bags usually go to
        writer_throughput(Path(tmp), args.megabytes)


if __name__ == '__main__':
    main()
