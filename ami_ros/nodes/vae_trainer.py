"""vae_trainer: trains the observation VAE on camera frames, pushes it to the agent.

Subscribes (for each agent of `agents`, `<agent>/camera/image_raw`):
  camera/image_raw      sensor_msgs/Image (rgb8 84x84; bgr8, rgba8, bgra8,
                        mono8 and other sizes are converted as the agent
                        does); best effort, so any publisher matches. Bad
                        frames are dropped with a throttled warning.
Calls:
  agent/sync_weights    rcl_interfaces/srv/SetParameters: 'encoder' and
                        'decoder' together in one request after each round
                        (each agent's)
Publishes:
  /diagnostics          see ami_ros/ros/trainer_node.py; plus dropped_frames,
                        and frames/<agent> (frames taken) with several agents

Parameters: those of every trainer node (ami_ros/ros/trainer_node.py),
max_batches included; min_new overrides the preset's vae_training.min_new
(new images before a round).
"""

from __future__ import annotations

import sys
from typing import Any

from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from torch import nn

from ami_ros.core.observation import to_uint8_chw
from ami_ros.core.presets import Preset
from ami_ros.core.trainers import DEFAULT_MAX_BATCHES, VAETrainer
from ami_ros.graph import relative_name
from ami_ros.ros.images import FrameReader, stamp_ns
from ami_ros.ros.managed_node import run
from ami_ros.ros.trainer_node import TrainerNode

# Best effort matches publishers of either reliability; a few frames of
# queue absorb a round's GIL contention, and the VAE needs no frame in order.
FRAMES = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                    reliability=ReliabilityPolicy.BEST_EFFORT)


class VAETrainerNode(TrainerNode):
    pushed_models = ('encoder', 'decoder')
    min_new_field = ('vae_training', 'min_new')
    caps_batches = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__('vae_trainer', **kwargs)
        self.frames = FrameReader(self.warn_throttled)
        for agent in self.agents:
            self.create_subscription(Image, relative_name(agent, 'camera/image_raw'),
                                     lambda msg, agent=agent: self.on_frame(msg, agent), FRAMES)

    def make_trainer(self, preset: Preset, models: dict[str, nn.Module], device: str, seed: int,
                     max_batches: int, sources: tuple[str, ...]) -> VAETrainer:
        return VAETrainer(models['encoder'], models['decoder'], preset.vae_training, device=device,
                          seed=seed, max_batches=max_batches or DEFAULT_MAX_BATCHES, sources=sources)

    def on_frame(self, msg: Image, agent: str = '') -> None:
        if not self.is_active:
            return
        self.pace_frame(agent, stamp_ns(msg) / 1e9)
        rgb = self.frames.observation(msg)
        if rgb is not None:
            self.trainer.add(to_uint8_chw(rgb), source=agent)

    def buffer_status(self) -> dict[str, object]:
        buffer = self.trainer.buffer
        return {'buffer_len': len(buffer), 'buffer_capacity': buffer.capacity,
                'new_count': buffer.new_count}

    def node_status(self) -> dict[str, object]:
        status: dict[str, object] = {'dropped_frames': self.frames.dropped}
        if len(self.agents) > 1:
            status.update({f'frames/{agent}': n for agent, n in self.trainer.added_by_source.items()})
        return status


def main(args: list[str] | None = None) -> int:
    return run(VAETrainerNode, args)


if __name__ == '__main__':
    sys.exit(main())
