"""sensor_msgs/Image <-> numpy RGB arrays, without cv_bridge (not on PyPI).

`FrameReader` turns camera Images into the models' frames for a node that
learns from them, counting the ones it cannot use. Anyone on the graph can
publish a frame: its size is checked against MAX_FRAME_PIXELS before any
pixel is read, and its data against the size its header claims.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sensor_msgs.msg import Image

from ami_ros.core.observation import center_crop_resize, image_to_rgb
from ami_ros.core.presets import IMAGE_SHAPE

# 8K UHD: a larger screen capture is not a camera, and its crop and resize would
# cost the agent seconds of CPU per frame.
MAX_FRAME_PIXELS = 7680 * 4320


def stamp_ns(msg: object) -> int:
    """A stamped message's header stamp in nanoseconds (the frames' capture time)."""
    stamp = msg.header.stamp
    return stamp.sec * 1_000_000_000 + stamp.nanosec


def rgb_to_image(rgb: np.ndarray, stamp, frame_id: str = 'camera') -> Image:
    """An rgb8 Image message holding an HxWx3 uint8 array."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f'expected HxWx3 uint8, got {rgb.dtype} {rgb.shape}')
    msg = Image()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(rgb.shape[0]), int(rgb.shape[1])
    msg.encoding = 'rgb8'
    msg.is_bigendian = 0
    msg.step = int(rgb.shape[1]) * 3
    # Assigning bytes is fast; a numpy array would be copied element by element.
    msg.data = np.ascontiguousarray(rgb).tobytes()
    return msg


class FrameReader:
    """Camera Images as the models' HxWx3 RGB frames; `dropped` counts the unusable ones.

    Other sizes are centre-cropped and resized, other encodings converted;
    what cannot be used is dropped with a warning naming it, through `warn`
    (kind, text), a throttled warning such as `ManagedNode.warn_throttled`.
    """

    def __init__(self, warn: Callable[[str, str], None]) -> None:
        self.warn = warn
        self.dropped = 0

    def observation(self, msg: Image) -> np.ndarray | None:
        """The frame `msg` holds, or None (counted, warned)."""
        try:
            if int(msg.width) * int(msg.height) > MAX_FRAME_PIXELS:
                raise ValueError(f'oversized frame {msg.width}x{msg.height}: more than '
                                 f'{MAX_FRAME_PIXELS} pixels (8K)')
            rgb = image_to_rgb(msg)
        except ValueError as exc:
            self.dropped += 1
            kind = str(exc).split(' ', 1)[0]  # e.g. 'unsupported', 'data', 'step'
            self.warn(f'frame-{kind}', f'dropping frame: {exc}')
            return None
        return center_crop_resize(rgb, IMAGE_SHAPE[1], IMAGE_SHAPE[2])
