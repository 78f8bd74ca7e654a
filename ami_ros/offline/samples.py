"""Recorded frames and actions -> training steps, streamed, without rclpy.

A bag's camera topic (sensor_msgs/Image in any encoding and size, or
sensor_msgs/CompressedImage jpeg/png) becomes the models' 84x84 RGB frames,
cropped and resized as the agent's camera input is; its action topic
(sensor_msgs/Joy: 3 axes and 2 buttons at least, as the agent publishes and
a remapped gamepad gives) becomes the five-part discrete action.

Pairing: the action of frame t is the newest action received before frame
t+1 arrived, the one the world held from t to t+1 (the agent's own action
for frame t arrives in between; a gamepad's Joy holds until it changes).
Frames before the first action carry none: they train the VAE only.

Segments: a time gap between frames much larger than the frame period
(GAP_FACTOR times the median of the recent periods), an episode change on
`world/episode`, and the end of a bag each start a new segment; the dynamics
never trains across one.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ami_ros.bags.reading import Bag, BagError, open_bag
from ami_ros.core.action import controls_to_action
from ami_ros.core.observation import center_crop_resize, image_to_rgb
from ami_ros.core.presets import IMAGE_SHAPE

IMAGE_TYPE = 'sensor_msgs/msg/Image'
COMPRESSED_TYPE = 'sensor_msgs/msg/CompressedImage'
ACTION_TYPE = 'sensor_msgs/msg/Joy'
EPISODE_TYPE = 'std_msgs/msg/UInt32'
# The graph's topic names (relative: found under any namespace when unambiguous).
DEFAULT_IMAGE_TOPIC = 'camera/image_raw'
DEFAULT_ACTION_TOPIC = 'action'
EPISODE_TOPIC = 'world/episode'
# A gap between frames longer than this many median frame periods breaks the sequence.
GAP_FACTOR = 5.0
_PERIODS_KEPT = 31


@dataclass(frozen=True)
class BagTopics:
    """The topics of one bag that training reads; action and episode may be absent."""

    path: Path
    image: str
    image_count: int
    action: str | None = None
    action_count: int = 0
    episode: str | None = None


@dataclass
class Step:
    """One recorded frame (84x84x3 uint8 RGB), the action held after it, and its segment."""

    frame: np.ndarray
    action: tuple[int, ...] | None
    segment: int


@dataclass
class StreamCounts:
    """What one pass over the bags found."""

    frames: int = 0
    with_action: int = 0
    segments: int = 0
    gaps: int = 0
    episodes: int = 0
    bags: list[str] = field(default_factory=list)


def normalize_type(msgtype: str) -> str:
    """'pkg/Name' (some MCAP writers) -> 'pkg/msg/Name', as rosbag2 spells it."""
    parts = msgtype.split('/')
    return f'{parts[0]}/msg/{parts[1]}' if len(parts) == 2 else msgtype


def _find_topic(bag: Bag, name: str, types: Sequence[str], given: bool) -> str | None:
    """The topic `name` (exact, or its relative name under one namespace), checked to be of `types`.

    Absent: None for a default name, BagError for one the user gave.
    """
    wanted = '/' + name.lstrip('/')
    if name.startswith('/'):
        candidates = [t for t in bag.topics if t == wanted]
    else:
        candidates = [t for t in bag.topics if t == wanted or t.endswith(wanted)]
        if wanted in candidates:
            candidates = [wanted]
    if len(candidates) > 1:
        raise BagError(f'{bag.path}: topic {name} is ambiguous ({", ".join(sorted(candidates))}); '
                       'name one with its namespace')
    if not candidates:
        if given:
            bag.topic(wanted, types)  # raises, listing the bag's topics
        return None
    topic = candidates[0]
    kind = normalize_type(bag.topics[topic].type)
    if kind not in types:
        raise BagError(f'{bag.path}: topic {topic} is {bag.topics[topic].type}, expected '
                       f'{" or ".join(types)}')
    return topic


def resolve_topics(bag: Bag, image_topic: str | None, action_topic: str | None) -> BagTopics:
    """The image, action and episode topics of `bag`; BagError naming the file and topic if unusable."""
    image = _find_topic(bag, image_topic or DEFAULT_IMAGE_TOPIC, (IMAGE_TYPE, COMPRESSED_TYPE), True)
    assert image is not None
    count = bag.topics[image].count
    if count == 0:
        raise BagError(f'{bag.path}: topic {image} holds no frames')
    action = _find_topic(bag, action_topic or DEFAULT_ACTION_TOPIC, (ACTION_TYPE,), bool(action_topic))
    episode = _find_topic(bag, EPISODE_TOPIC, (EPISODE_TYPE,), False)
    return BagTopics(bag.path, image, count, action, bag.topics[action].count if action else 0, episode)


def inspect_bags(paths: Sequence[str | Path], image_topic: str | None = None,
                 action_topic: str | None = None) -> list[BagTopics]:
    """Open every bag and resolve its topics up front, so bad input fails before training starts."""
    found = []
    for path in paths:
        with open_bag(path) as bag:
            found.append(resolve_topics(bag, image_topic, action_topic))
    return found


_TYPESTORE: Any = None


def _typestore() -> Any:
    global _TYPESTORE
    if _TYPESTORE is None:
        from rosbags.typesys import Stores, get_typestore

        _TYPESTORE = get_typestore(Stores.ROS2_JAZZY)
    return _TYPESTORE


def _decode(path: Path, topic: str, msgtype: str, data: bytes) -> Any:
    try:
        return _typestore().deserialize_cdr(data, normalize_type(msgtype))
    except Exception as exc:  # rosbags raises several kinds for bad CDR
        raise BagError(f'{path}: topic {topic}: a message does not decode as {msgtype} '
                       f'({type(exc).__name__}: {" ".join(str(exc).split())[:120]})') from None


def decode_frame(msgtype: str, msg: Any) -> np.ndarray:
    """A decoded Image or CompressedImage -> the models' HxWx3 uint8 RGB frame; ValueError if unusable."""
    if normalize_type(msgtype) == COMPRESSED_TYPE:
        bgr = cv2.imdecode(np.frombuffer(bytes(msg.data), np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f'compressed image ({msg.format or "no format"}) does not decode; '
                             'use jpeg or png')
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    else:
        rgb = image_to_rgb(msg)
    frame = center_crop_resize(rgb, IMAGE_SHAPE[1], IMAGE_SHAPE[2])
    # A view of the message's read-only buffer when no resize was needed: torch wants its own copy.
    return frame if frame.flags.writeable and frame.flags.c_contiguous else np.array(frame)


def decode_action(msg: Any) -> tuple[int, ...]:
    """A decoded Joy -> the five-part action; ValueError if it has too few axes or buttons."""
    axes, buttons = list(msg.axes), list(msg.buttons)
    if len(axes) < 3 or len(buttons) < 2:
        raise ValueError(f'action has {len(axes)} axes and {len(buttons)} buttons; expected at least '
                         '3 axes (Vertical, Horizontal, LookHorizontal) and 2 buttons (Jump, Run)')
    if not all(math.isfinite(v) for v in axes[:3]):
        raise ValueError(f'action axes {axes[:3]} are not finite')
    return tuple(controls_to_action(axes, buttons))


class _Segmenter:
    """Frame times -> 'new segment?' by the gap rule."""

    def __init__(self) -> None:
        self.last_ns: int | None = None
        self.periods: deque[int] = deque(maxlen=_PERIODS_KEPT)

    def is_gap(self, t_ns: int) -> bool:
        last, self.last_ns = self.last_ns, t_ns
        if last is None:
            return False
        period = t_ns - last
        gap = len(self.periods) >= 3 and period > GAP_FACTOR * statistics.median(self.periods)
        if not gap:
            self.periods.append(max(period, 0))
        return gap


def iter_steps(bags: Sequence[BagTopics], counts: StreamCounts | None = None) -> Iterator[Step]:
    """Every recorded frame of `bags` (from `inspect_bags`) as a Step, in time order, streamed."""
    counts = counts if counts is not None else StreamCounts()
    segment = -1
    for topics in bags:
        segment += 1
        counts.segments += 1
        counts.bags.append(str(topics.path))
        segmenter = _Segmenter()
        action: tuple[int, ...] | None = None
        pending: np.ndarray | None = None
        pending_segment = segment
        wanted = [t for t in (topics.image, topics.action, topics.episode) if t]
        with open_bag(topics.path) as bag:
            for message in bag.messages(wanted):
                decoded = _decode(topics.path, message.topic, message.msgtype, message.data)
                if message.topic == topics.action:
                    try:
                        action = decode_action(decoded)
                    except ValueError as exc:
                        raise BagError(f'{topics.path}: topic {message.topic}: {exc}') from None
                    continue
                if message.topic == topics.episode:
                    if pending is not None or counts.frames:
                        segment += 1
                        counts.segments += 1
                        counts.episodes += 1
                    continue
                try:
                    frame = decode_frame(message.msgtype, decoded)
                except ValueError as exc:
                    raise BagError(f'{topics.path}: topic {message.topic}: {exc}') from None
                if segmenter.is_gap(message.timestamp_ns):
                    segment += 1
                    counts.segments += 1
                    counts.gaps += 1
                if pending is not None:
                    yield _step(pending, action, pending_segment, counts)
                pending, pending_segment = frame, segment
        if pending is not None:
            yield _step(pending, action, pending_segment, counts)


def _step(frame: np.ndarray, action: tuple[int, ...] | None, segment: int, counts: StreamCounts) -> Step:
    counts.frames += 1
    counts.with_action += action is not None
    return Step(frame, action, segment)
