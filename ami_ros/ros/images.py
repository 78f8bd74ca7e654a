"""sensor_msgs/Image <-> numpy RGB arrays, without cv_bridge (not on PyPI)."""

from __future__ import annotations

import numpy as np
from sensor_msgs.msg import Image

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
