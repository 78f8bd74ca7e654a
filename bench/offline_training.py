"""Offline training throughput (`ami-ros train`) against what the live graph feeds its trainers.

    python bench/offline_training.py [--presets cpu ami] [--frames 1024] [--threads 0]

Records a bag (ami_ros.bags.recording.BagWriter, as `ami-ros bag record`
writes it) of ViZDoom frames with held random actions, then trains on it
one model at a time (vae; dynamics; policy with --imitate), one epoch after
a warm-up pass. Two rates per model: the model's own samples/s (time in its
minibatch steps, latents included) and end to end (the epoch's samples over
its wall time: reading, decoding, shuffling and training). The live graph
feeds each trainer one sample per agent step: 10/s at the camera's 10 Hz.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ami_ros.core.action import action_to_controls
from ami_ros.core.presets import ACTION_CHOICES, get_preset
from ami_ros.offline.samples import inspect_bags
from ami_ros.offline.training import OfflineConfig, OfflineTraining

LIVE_SAMPLES_PER_S = 10.0  # camera at 10 Hz: one frame, one experience step per trainer
GOAL_RATIO = 20.0


def record_doom_bag(path: Path, frames: int, seed: int = 0) -> Path:
    """A bag of `frames` ViZDoom frames (rgb8 84x84) and the held random actions acting on it."""
    from rosbags.typesys import Stores, get_typestore

    from ami_ros.bags.recording import BagWriter
    from ami_ros.worlds.doom import DoomWorld, VRChatInputState

    ts = get_typestore(Stores.ROS2_JAZZY)
    types = ts.types
    rng = np.random.default_rng(seed)
    world = DoomWorld('my_way_home', frame_skip=4, seed=seed)
    inputs = VRChatInputState()
    writer = BagWriter(path)
    writer.add_topic('/camera/image_raw', 'sensor_msgs/msg/Image')
    writer.add_topic('/action', 'sensor_msgs/msg/Joy')
    t = 1_700_000_000 * 10**9
    try:
        rgb = world.observe().frame
        for i in range(frames):
            if i % 4 == 0:
                action = [int(rng.integers(n)) for n in ACTION_CHOICES]
            axes, buttons = action_to_controls(action)
            stamp = types['builtin_interfaces/msg/Time'](sec=t // 10**9, nanosec=t % 10**9)
            header = types['std_msgs/msg/Header'](stamp=stamp, frame_id='camera')
            image = types['sensor_msgs/msg/Image'](header=header, height=84, width=84, encoding='rgb8',
                                                   is_bigendian=0, step=252, data=rgb.reshape(-1))
            joy = types['sensor_msgs/msg/Joy'](header=header, axes=np.array(axes, np.float32),
                                               buttons=np.array(buttons, np.int32))
            writer.write('/camera/image_raw', t, ts.serialize_cdr(image, 'sensor_msgs/msg/Image'))
            writer.write('/action', t + 20_000_000, ts.serialize_cdr(joy, 'sensor_msgs/msg/Joy'))
            for name, value in zip(('Vertical', 'Horizontal', 'LookHorizontal'), axes, strict=True):
                inputs.handle(f'/input/{name}', float(value))
            for name, value in zip(('Jump', 'Run'), buttons, strict=True):
                inputs.handle(f'/input/{name}', int(value))
            rgb = world.step(inputs.to_buttons()).frame
            t += 100_000_000
    finally:
        writer.close()
        world.close()
    return path


def measure(bag: Path, preset: str, model: str, batch_size: int, device: str) -> tuple[float, float]:
    """(the model's own samples/s, end-to-end samples/s) of one epoch after a warm-up epoch."""
    bags = inspect_bags([bag])
    cfg = OfflineConfig(get_preset(preset), device, epochs=1, batch_size=batch_size,
                        imitate=model == 'policy', models=() if model == 'policy' else (model,))
    OfflineTraining(cfg, bags).train()  # warm-up: allocator, kernels, page cache
    training = OfflineTraining(cfg, bags)
    start = time.perf_counter()
    training.train()
    wall = time.perf_counter() - start
    progress = training.progress
    return progress.rate(model), progress.samples[model] / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--presets', nargs='+', default=['cpu', 'ami'])
    parser.add_argument('--frames', type=int, default=1024)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--threads', type=int, default=0, help='0: all cores, as ami-ros train')
    parser.add_argument('--device', default='cpu')
    args = parser.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    print(f'{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, device {args.device}, '
          f'{torch.get_num_threads()} thread(s), batch {args.batch_size}, {args.frames} frames')
    with tempfile.TemporaryDirectory(prefix='ami_ros_bench_offline_') as tmp:
        bag = record_doom_bag(Path(tmp) / 'bag', args.frames)
        print(f'{"preset":<7} {"model":<9} {"model/s":>9} {"end-to-end/s":>13} {"live/s":>7} '
              f'{"ratio":>6}  goal')
        for preset in args.presets:
            for model in ('vae', 'dynamics', 'policy'):
                own, end_to_end = measure(bag, preset, model, args.batch_size, args.device)
                ratio = end_to_end / LIVE_SAMPLES_PER_S
                verdict = 'met' if ratio >= GOAL_RATIO else f'missed (< {GOAL_RATIO:g})'
                print(f'{preset:<7} {model:<9} {own:>9.0f} {end_to_end:>13.0f} {LIVE_SAMPLES_PER_S:>7.0f} '
                      f'{ratio:>6.1f}  {verdict}', flush=True)


if __name__ == '__main__':
    main()
