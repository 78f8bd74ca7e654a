"""agent: acts on every camera frame with the curiosity agent.

Subscribes:
  camera/image_raw        sensor_msgs/Image (rgb8 84x84; bgr8, rgba8, bgra8,
                          mono8 and other sizes are converted; keeps only the
                          newest frame, never a queue)
Publishes:
  action                  sensor_msgs/Joy, stamped with the frame's stamp
  reward                  std_msgs/Float32, curiosity of the previous action
  prediction_error        std_msgs/Float32, MSE of the latent prediction
  prediction/image_raw    sensor_msgs/Image, the decoded predicted next frame
                          (only while someone subscribes)
  /diagnostics            rate, step latency, steps, model versions

Parameters: preset, device, seed, reward, deterministic, torch_threads,
publish_prediction (see `ami-ros run agent --ros-args -p ...` and README).
"""

from __future__ import annotations

import math
import sys

import torch
from rclpy.lifecycle import LifecycleState, TransitionCallbackReturn
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image, Joy
from std_msgs.msg import Float32

from ami_ros.core.action import action_to_controls
from ami_ros.core.agent import CuriosityAgent
from ami_ros.core.observation import center_crop_resize
from ami_ros.core.presets import IMAGE_SHAPE, PRESETS
from ami_ros.core.reward import REWARDS
from ami_ros.core.timing import LatencyWindow, RateMeter
from ami_ros.ros.diagnostics import NodeDiagnostics
from ami_ros.ros.images import image_to_rgb, rgb_to_image
from ami_ros.ros.managed_node import ManagedNode, run

# The newest frame only: a late agent skips frames instead of queueing them.
# Best effort is compatible with publishers of either reliability.
NEWEST_FRAME = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                          reliability=ReliabilityPolicy.BEST_EFFORT)


class AgentNode(ManagedNode):
    def __init__(self) -> None:
        super().__init__('agent')
        preset = self.declare('preset', 'small', 'Model size preset.', choices=tuple(PRESETS))
        device = self.declare('device', 'cpu', 'Torch device: cpu, cuda or cuda:N.')
        seed = self.declare('seed', 0, 'Seed of the initial weights and of action sampling.',
                            low=0, high=2**31 - 1)
        reward = self.declare('reward', 'curiosity', 'Reward function.', choices=tuple(REWARDS))
        deterministic = self.declare('deterministic', False,
                                     'Act with the most likely action instead of sampling.')
        threads = self.declare('torch_threads', 1, 'Torch intra-op threads of this process.',
                               low=1, high=64)
        self.publish_prediction = self.declare(
            'publish_prediction', True, 'Decode and publish the predicted next frame '
            '(only while prediction/image_raw has subscribers).')
        torch.set_num_threads(threads)
        self.agent = CuriosityAgent(preset, device=device, seed=seed, reward=reward,
                                    deterministic=deterministic)
        self.action_pub = self.create_lifecycle_publisher(Joy, 'action', 10)
        self.reward_pub = self.create_lifecycle_publisher(Float32, 'reward', 10)
        self.error_pub = self.create_lifecycle_publisher(Float32, 'prediction_error', 10)
        self.prediction_pub = self.create_lifecycle_publisher(Image, 'prediction/image_raw', 1)
        self.create_subscription(Image, 'camera/image_raw', self.on_frame, NEWEST_FRAME)
        self.rate = RateMeter()
        self.latency = LatencyWindow(1000)
        self.dropped = 0
        self.diagnostics = NodeDiagnostics(self)
        self.diagnostics.set(preset=preset, device=device)
        self.create_timer(1.0, self._update_diagnostics)
        self.get_logger().info(f'agent ready: preset {preset} on {device}, {threads} torch thread(s)')

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.agent.forget_prediction()  # its frame will not be the next one after the pause
        return super().on_deactivate(state)

    def _frame_rgb(self, msg: Image):
        try:
            rgb = image_to_rgb(msg)
        except ValueError as exc:
            self.dropped += 1
            kind = str(exc).split(' ', 1)[0]  # e.g. 'unsupported', 'data', 'step'
            self.warn_throttled(f'frame-{kind}', f'dropping frame: {exc}')
            return None
        return center_crop_resize(rgb, IMAGE_SHAPE[1], IMAGE_SHAPE[2])

    def on_frame(self, msg: Image) -> None:
        if not self.is_active:
            return
        rgb = self._frame_rgb(msg)
        if rgb is None:
            return
        step = self.agent.step(rgb)
        axes, buttons = action_to_controls(step.action.tolist())
        joy = Joy(axes=axes, buttons=buttons)
        joy.header.stamp = msg.header.stamp
        joy.header.frame_id = msg.header.frame_id
        self.action_pub.publish(joy)
        now = self.get_clock().now().nanoseconds
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        if stamp:
            self.latency.add((now - stamp) / 1e6)
        self.rate.tick()
        if not math.isnan(step.reward):
            self.reward_pub.publish(Float32(data=step.reward))
            self.error_pub.publish(Float32(data=step.prediction_error))
        if self.publish_prediction and self.prediction_pub.get_subscription_count() > 0:
            frame = self.agent.predicted_frame()
            if frame is not None:
                self.prediction_pub.publish(rgb_to_image(frame, msg.header.stamp, 'prediction'))

    def _update_diagnostics(self) -> None:
        lat = self.latency.summary()
        self.diagnostics.set(rate_hz=self.rate.rate(), latency_p50_ms=lat['p50'],
                             latency_p99_ms=lat['p99'], latency_max_ms=lat['max'],
                             steps=self.agent.steps, dropped_frames=self.dropped,
                             active=self.is_active,
                             **{f'version_{k}': v for k, v in self.agent.versions.items()})


def main(args: list[str] | None = None) -> int:
    return run(AgentNode, args)


if __name__ == '__main__':
    sys.exit(main())
