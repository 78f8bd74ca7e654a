"""Samples of what the agent predicted: camera t | predicted t+1 | camera t+1 as one picture.

The agent decodes predictions only while someone subscribes to
prediction/image_raw, so a sample subscribes, takes one prediction and the
frames around it, and unsubscribes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.subscription import Subscription
from sensor_msgs.msg import Image

from ami_ros.record.pictures import side_by_side
from ami_ros.ros.images import image_to_rgb, stamp_ns
from ami_ros.ros.managed_node import ManagedNode

# Samples take what comes: best effort matches reliable and best-effort publishers.
SAMPLE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5,
                        reliability=ReliabilityPolicy.BEST_EFFORT)
SAMPLE_TIMEOUT = 10.0  # s to wait for a prediction and the frame after it
SAMPLE_FRAMES = 32  # camera frames kept while sampling, to find the prediction's frame


@dataclass
class _Sample:
    """A sample in progress: its subscriptions and what they got."""

    started: float
    subscriptions: list[Subscription] = field(default_factory=list)
    frames: dict[int, np.ndarray] = field(default_factory=dict)  # stamp ns -> RGB, arrival order
    prediction: tuple[int, np.ndarray] | None = None
    done: bool = False


class PredictionSampler:
    """One sample at a time, in `node`'s namespace (`prefix` 'agent_0/': that agent's topics);
    `on_picture(rgb)` gets each picture.

    `start` begins a sample, `check_timeout` (call it every second or so)
    ends one that waited `timeout` s with what there is, `stop` drops one.
    """

    def __init__(self, node: ManagedNode, on_picture: Callable[[np.ndarray], None],
                 timeout: float = SAMPLE_TIMEOUT, prefix: str = '') -> None:
        self.node = node
        self.prefix = prefix
        self.on_picture = on_picture
        self.timeout = timeout
        self._sample: _Sample | None = None

    def start(self) -> None:
        """Subscribe for a sample, unless one is in progress."""
        if self._sample is not None:
            return
        sample = _Sample(started=time.monotonic())
        sample.subscriptions = [
            self.node.create_subscription(Image, f'{self.prefix}camera/image_raw', self._on_frame,
                                          SAMPLE_QOS),
            self.node.create_subscription(Image, f'{self.prefix}prediction/image_raw', self._on_prediction,
                                          SAMPLE_QOS),
        ]
        self._sample = sample

    def check_timeout(self) -> None:
        sample = self._sample
        if sample is not None and time.monotonic() - sample.started > self.timeout:
            self._finish(timed_out=True)

    def stop(self) -> None:
        """End the sample in progress without a picture."""
        sample, self._sample = self._sample, None
        if sample is None:
            return
        sample.done = True
        # Unsubscribing stops the agent decoding predictions (it publishes only to subscribers).
        for sub in sample.subscriptions:
            self.node.destroy_subscription(sub)

    def _rgb(self, msg: Image) -> np.ndarray | None:
        try:
            return np.array(image_to_rgb(msg))  # a copy: the message buffer is reused
        except ValueError as exc:
            self.node.warn_throttled('sample-image', f'ignoring image for the sample: {exc}')
            return None

    def _on_frame(self, msg: Image) -> None:
        sample = self._sample
        if sample is None or sample.done:
            return
        rgb = self._rgb(msg)
        if rgb is None:
            return
        sample.frames[stamp_ns(msg)] = rgb
        while len(sample.frames) > SAMPLE_FRAMES:
            del sample.frames[next(iter(sample.frames))]
        self._finish()

    def _on_prediction(self, msg: Image) -> None:
        sample = self._sample
        if sample is None or sample.done or sample.prediction is not None:
            return
        rgb = self._rgb(msg)
        if rgb is not None:
            # The agent stamps a prediction with the frame it predicts from.
            sample.prediction = (stamp_ns(msg), rgb)
            self._finish()

    def _finish(self, timed_out: bool = False) -> None:
        """Hand on camera t | predicted t+1 | camera t+1 once all are in (what there is on timeout)."""
        sample = self._sample
        if sample is None or sample.done:
            return
        panels: list[tuple[str, np.ndarray]] = []
        if sample.prediction is not None:
            stamp, predicted = sample.prediction
            before = [t for t in sample.frames if t <= stamp]
            after = [t for t in sample.frames if t > stamp]
            if not after and not timed_out:
                return  # wait for the frame that shows what really came
            if before:
                panels.append(('camera t', sample.frames[stamp if stamp in sample.frames else max(before)]))
            panels.append(('predicted t+1', predicted))
            if after:
                panels.append(('camera t+1', sample.frames[min(after)]))
        elif timed_out and sample.frames:
            panels.append(('camera (no prediction)', sample.frames[next(reversed(sample.frames))]))
        elif not timed_out:
            return
        if panels:
            self.on_picture(side_by_side(panels))
        elif timed_out:
            self.node.warn_throttled('sample-empty', f'no camera/image_raw within {self.timeout:g} s '
                                     'for the image sample', 300.0)
        self.stop()
