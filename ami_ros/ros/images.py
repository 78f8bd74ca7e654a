"""sensor_msgs/Image <-> numpy RGB arrays, without cv_bridge (not on PyPI).

`FrameReader` turns camera Images into the models' frames for a node that
learns from them, counting the ones it cannot use.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sensor_msgs.msg import Image

from ami_ros.core.observation import center_crop_resize
from ami_ros.core.presets import IMAGE_SHAPE


def stamp_ns(msg: object) -> int:
    """A stamped message's header stamp in nanoseconds (the frames' capture time)."""
    stamp = msg.header.stamp
    return stamp.sec * 1_000_000_000 + stamp.nanosec


# encoding -> (channels, index order that gives RGB)
_LAYOUTS: dict[str, tuple[int, tuple[int, ...] | None]] = {
    'rgb8': (3, None),
    'bgr8': (3, (2, 1, 0)),
    'rgba8': (4, (0, 1, 2)),
    'bgra8': (4, (2, 1, 0)),
    'mono8': (1, None),
}
SUPPORTED_ENCODINGS = tuple(_LAYOUTS)


def image_to_rgb(msg: Image) -> np.ndarray:
    """An HxWx3 uint8 RGB view/copy of an Image; ValueError saying why not."""
    layout = _LAYOUTS.get(msg.encoding)
    if layout is None:
        raise ValueError(
            f'unsupported encoding {msg.encoding!r}; use one of {", ".join(SUPPORTED_ENCODINGS)}')
    channels, order = layout
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ValueError(f'empty image {width}x{height}')
    if step < width * channels:
        raise ValueError(f'step {step} is smaller than width*channels {width * channels}')
    data = np.frombuffer(msg.data, dtype=np.uint8)  # bytes-like: no per-element copy
    if data.size < step * height:
        raise ValueError(f'data holds {data.size} bytes, {step * height} expected for '
                         f'{width}x{height} {msg.encoding}')
    rows = data[:step * height].reshape(height, step)[:, :width * channels]
    pixels = rows.reshape(height, width, channels)
    if channels == 1:
        return np.repeat(pixels, 3, axis=2)
    if order is None:
        return pixels
    return pixels[:, :, list(order)]


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
            rgb = image_to_rgb(msg)
        except ValueError as exc:
            self.dropped += 1
            kind = str(exc).split(' ', 1)[0]  # e.g. 'unsupported', 'data', 'step'
            self.warn(f'frame-{kind}', f'dropping frame: {exc}')
            return None
        return center_crop_resize(rgb, IMAGE_SHAPE[1], IMAGE_SHAPE[2])
