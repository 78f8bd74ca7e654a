"""Camera frames -> the observation the models see (3x84x84 in [0, 1])."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:
    import torch

# torch is imported where tensors are made: camera and doom_world only crop
# and resize, and need not pay torch's second of start-up and ~200 MB.


def center_crop_resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop an HxWxC image to the target aspect, then resize to it."""
    h, w = rgb.shape[:2]
    if (h, w) == (height, width):
        return rgb
    target = width / height
    if w / h > target:  # too wide: cut the sides
        new_w = max(1, round(h * target))
        x0 = (w - new_w) // 2
        rgb = rgb[:, x0:x0 + new_w]
    elif w / h < target:  # too tall: cut top and bottom
        new_h = max(1, round(w / target))
        y0 = (h - new_h) // 2
        rgb = rgb[y0:y0 + new_h]
    shrinking = rgb.shape[0] > height
    return cv2.resize(np.ascontiguousarray(rgb), (width, height),
                      interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


# encoding -> (channels, index order that gives RGB)
_LAYOUTS: dict[str, tuple[int, tuple[int, ...] | None]] = {
    'rgb8': (3, None),
    'bgr8': (3, (2, 1, 0)),
    'rgba8': (4, (0, 1, 2)),
    'bgra8': (4, (2, 1, 0)),
    'mono8': (1, None),
}
SUPPORTED_ENCODINGS = tuple(_LAYOUTS)


def image_to_rgb(msg: Any) -> np.ndarray:
    """An HxWx3 uint8 RGB view/copy of a sensor_msgs/Image (rclpy's or a decoded
    bag's: anything with its fields); ValueError saying why not."""
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


def to_observation(rgb: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> float tensor [3, H, W] in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255.0)


def to_uint8_chw(rgb: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> uint8 tensor [3, H, W], the form buffers and envelopes store."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()
