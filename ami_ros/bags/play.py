"""Playing a bag into the ROS graph (`ami-ros bag play`).

A plain rclpy node publishes each recorded message's CDR bytes untouched,
with one publisher per topic and the QoS its recorder was offered. Messages
go out on the bag's own timing, scaled by the rate: each one is due at
start + (its time - the bag's) / rate on the monotonic clock, so a late
message never delays the next ones (sleeping the gaps would add up every
lateness).

Restamping: recorded header stamps are hours or days old, so an agent that
measures frame -> action latency from the stamp would report the bag's age,
and rqt / rviz would show the data as stale. By default a message whose
type begins with a std_msgs/Header (Image, Joy, ...) gets its stamp moved
onto the playing clock by the same map as its time: new = wall time at the
start + (stamp - the bag's start) / rate. Stamps that were equal stay equal
(an action keeps its frame's stamp) and a stamp's distance to its recording
time is kept (scaled by the rate), so latencies read from played stamps are
those of the live run plus the player's own. Only the 8 bytes of the stamp change. Zero
stamps (unstamped) stay zero. `keep_stamps` publishes the bytes as recorded.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from ami_ros.bags.reading import BagError, message_class
from ami_ros.core.timing import RateMeter

# What a topic gets when the bag has no offered QoS for it, or its recorded
# publishers disagree: reliable reaches subscribers of either reliability.
DEFAULT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                         reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
# Encapsulation ids of plain CDR (XCDR1), big and little endian: a message
# starting with a Header has its stamp (int32 sec, uint32 nanosec) at bytes 4..12.
_PLAIN_CDR = {b'\x00\x00': '>', b'\x00\x01': '<'}
_NS = 1_000_000_000
ACK_TIMEOUT = 2.0  # seconds the player waits at the end for reliable subscribers to have everything


class PlayError(Exception):
    """Playing cannot start (a topic not in the bag, nothing playable): one line for the user."""


@dataclass
class PlayOptions:
    rate: float = 1.0
    loop: bool = False
    topics: Sequence[str] = ()  # recorded names to play; empty: every topic
    start_offset: float = 0.0  # seconds of the bag skipped at the start
    keep_stamps: bool = False
    wait_for_subscribers: int = 0  # start once every played topic has this many subscribers


@dataclass
class PlayProgress:
    """What the status line says: where in the bag, how much was sent, how fast."""

    bag_seconds: float = 0.0  # time in the bag of the newest message sent
    duration: float = 0.0
    sent: int = 0
    rate_hz: float = 0.0  # messages per second, recently
    speed: float = 1.0
    loop: int = 1
    state: str = 'playing'

    def render(self, width: int = 120) -> str:
        """One line of at most `width` characters; the fields that do not fit are left out whole."""
        fields = [f'{self.state} {self.bag_seconds:.1f}/{self.duration:.1f} s', f'{self.sent} messages',
                  f'{self.rate_hz:.1f} msg/s', f'x{self.speed:g}'] + ([f'loop {self.loop}']
                                                                      if self.loop > 1 else [])
        text = fields[0]
        for more in fields[1:]:
            if len(text) + 3 + len(more) > width:
                break
            text += ' | ' + more
        return text[:width]


def starts_with_header(cls: type) -> bool:
    """Whether a message class's first field is a std_msgs/Header (where a stamp sits)."""
    fields = list(cls.get_fields_and_field_types().items())
    return bool(fields) and fields[0][1] in ('std_msgs/Header', 'std_msgs/msg/Header')


def restamp(raw: bytes, move: Callable[[int], int]) -> bytes:
    """`raw` (a CDR message starting with a Header) with its stamp replaced by move(stamp_ns).

    Only plain CDR, which rmw and rosbags write, is touched; another
    encapsulation goes out as recorded.
    """
    order = _PLAIN_CDR.get(raw[:2])
    if order is None:
        return raw
    sec, nanosec = struct.unpack_from(order + 'iI', raw, 4)
    old = sec * _NS + nanosec
    if not old:
        return raw
    out = bytearray(raw)
    struct.pack_into(order + 'iI', out, 4, *divmod(max(1, move(old)), _NS))
    return bytes(out)


def publisher_qos(offered: Iterable[Any] | None) -> QoSProfile:
    """The QoS to publish a topic with, from its recorded offered profiles.

    Reliability, durability and history depth as recorded when every
    recorded publisher offered the same; DEFAULT_QOS otherwise. A profile
    is rosbags' Qos.
    """
    chosen = set()
    for profile in offered or ():
        try:
            # rosbags' enums are plain Enums whose values are rmw's numbers.
            reliability = ReliabilityPolicy(profile.reliability.value)
            durability = DurabilityPolicy(profile.durability.value)
            history = HistoryPolicy(profile.history.value)
            depth = int(profile.depth)
        except (AttributeError, TypeError, ValueError):
            return DEFAULT_QOS
        chosen.add((reliability, durability, history, depth))
    if len(chosen) != 1:
        return DEFAULT_QOS
    reliability, durability, history, depth = chosen.pop()
    known = (ReliabilityPolicy.RELIABLE, ReliabilityPolicy.BEST_EFFORT)
    if reliability not in known:
        reliability = DEFAULT_QOS.reliability
    if durability not in (DurabilityPolicy.VOLATILE, DurabilityPolicy.TRANSIENT_LOCAL):
        durability = DEFAULT_QOS.durability
    if history != HistoryPolicy.KEEP_ALL:
        history = HistoryPolicy.KEEP_LAST
        depth = depth if depth > 0 else DEFAULT_QOS.depth
    return QoSProfile(history=history, depth=max(depth, 1), reliability=reliability,
                      durability=durability)


def resolve_topics(available: Sequence[str], wanted: Sequence[str]) -> list[str]:
    """The bag's topic names to play: `wanted` (leading '/' optional), or all of `available`."""
    if not wanted:
        return list(available)
    by_name = {name.lstrip('/'): name for name in available}
    missing = [t for t in wanted if t.lstrip('/') not in by_name]
    if missing:
        raise PlayError(f'no topic {", ".join(missing)} in the bag; it has {", ".join(available)}')
    return list(dict.fromkeys(by_name[t.lstrip('/')] for t in wanted))


class BagPlayer:
    """Publishes a bag's messages with a node, on the bag's timing (see the module's doc)."""

    def __init__(self, node: Any, bag: Any, options: PlayOptions,
                 warn: Callable[[str], None] = print) -> None:
        if options.rate <= 0:
            raise PlayError(f'the rate must be above 0, not {options.rate:g}')
        if options.start_offset < 0:
            raise PlayError(f'the start offset must be 0 or more, not {options.start_offset:g}')
        self.node, self.bag, self.options = node, bag, options
        self.publishers: dict[str, Any] = {}
        self.stamped: set[str] = set()
        for topic in resolve_topics(list(bag.topics), options.topics):
            info = bag.topics[topic]
            if info.serialization_format != 'cdr':
                warn(f'skipping {topic}: its messages are {info.serialization_format}, not CDR')
                continue
            try:
                cls = message_class(info.type)
            except BagError as exc:
                warn(f'skipping {topic}: {exc}')
                continue
            qos = publisher_qos(info.offered_qos_profiles)
            # Relative, so that the node's namespace and remap rules apply.
            self.publishers[topic] = node.create_publisher(cls, topic.lstrip('/') or topic, qos)
            if not options.keep_stamps and starts_with_header(cls):
                self.stamped.add(topic)
        if not self.publishers:
            raise PlayError('nothing to play: no topic of the bag has a type installed here')
        self.origin = bag.start_ns + round(options.start_offset * _NS)  # int: a float loses ns at 1e18
        self.progress = PlayProgress(duration=max(0.0, (bag.end_ns - bag.start_ns) / _NS),
                                     speed=options.rate)
        self.rate = RateMeter(window=2.0)
        self._report: Callable[[PlayProgress], None] = lambda progress: None
        self._interval = 0.25
        self._last_report = 0.0

    def published_names(self) -> dict[str, str]:
        """Recorded name -> the name it is published on (namespace and remaps applied)."""
        return {topic: pub.topic_name for topic, pub in self.publishers.items()}

    def play(self, stop: threading.Event, on_progress: Callable[[PlayProgress], None] = lambda p: None,
             progress_interval: float = 0.25) -> PlayProgress:
        """Play (and loop) until the end or `stop`; the progress at the end."""
        self._report, self._interval = on_progress, progress_interval
        if self.options.wait_for_subscribers > 0:
            self.progress.state = 'waiting for subscribers'
            while not stop.is_set() and any(p.get_subscription_count() < self.options.wait_for_subscribers
                                            for p in self.publishers.values()):
                self._idle(stop, time.monotonic() + 0.1)
        self.progress.state = 'playing'
        while not stop.is_set():
            if not self._play_once(stop) or not self.options.loop:
                break
            self.progress.loop += 1
        self.progress.state = 'stopped' if stop.is_set() else 'done'
        self._wait_for_acks()
        self._tick(force=True)
        return self.progress

    def _play_once(self, stop: threading.Event) -> int:
        """One pass through the bag from the start offset; the messages it sent."""
        rate, origin = self.options.rate, self.origin
        start_mono = time.monotonic_ns()
        start_wall = self.node.get_clock().now().nanoseconds

        def move(stamp: int) -> int:
            return start_wall + int((stamp - origin) / rate)

        sent = 0
        for topic, _msgtype, t_ns, raw in self.bag.messages(list(self.publishers)):
            if t_ns < origin or topic not in self.publishers:
                continue
            if self._idle(stop, (start_mono + (t_ns - origin) / rate) / _NS):
                break
            data = raw if isinstance(raw, bytes) else bytes(raw)
            if topic in self.stamped:
                data = restamp(data, move)
            self.publishers[topic].publish(data)
            sent += 1
            self.progress.sent += 1
            self.progress.bag_seconds = (t_ns - self.bag.start_ns) / _NS
            self.rate.tick()
            self._tick()
        return sent

    def _idle(self, stop: threading.Event, until: float) -> bool:
        """Wait until monotonic time `until`, reporting progress; True if stopped."""
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return stop.is_set()
            if stop.wait(min(left, self._interval)):
                return True
            self._tick()

    def _tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_report < self._interval:
            return
        self._last_report = now
        self.progress.rate_hz = self.rate.rate(now)
        self._report(self.progress)

    def _wait_for_acks(self) -> None:
        """Give reliable subscribers a moment to have every message before the node goes."""
        deadline = time.monotonic() + ACK_TIMEOUT
        for pub in self.publishers.values():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            wait = getattr(pub, 'wait_for_all_acked', None)
            if wait is not None and pub.qos_profile.reliability == ReliabilityPolicy.RELIABLE:
                from rclpy.duration import Duration

                wait(Duration(nanoseconds=int(left * _NS)))
