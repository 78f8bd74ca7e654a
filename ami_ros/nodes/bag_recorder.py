"""bag_recorder: records topics of the graph into a rosbag2 bag (MCAP, metadata.yaml).

What `ami-ros bag record` and `ami-ros launch bag:=DIR` run. Subscriptions are
raw, so the bag holds the CDR exactly as rmw serialised it; each topic's type
and its publishers' offered QoS come from the graph, and topics that appear
later are picked up (checked every `discovery_period` s). The writing is on
its own thread behind a bounded queue (ami_ros.bags.recording): a callback
never waits for the disk, and what a full queue drops is shown in the status.

The launch does not list it among the manager's nodes: pausing the graph does
not pause the recording, and it stops after the nodes it records.

Subscribes: `topics` (relative to the namespace; default camera/image_raw,
action, experience, reward, prediction_error, world/pose, world/episode), or
every topic with `all_topics`.
Writes: `output`/metadata.yaml and `output`/<name>_<n>.mcap, split by
`max_duration`/`max_size`. SIGINT, SIGTERM or the lifecycle shutdown close the
bag cleanly; after a SIGKILL every complete chunk stays readable
(ami_ros.bags.reading recovers it).

Parameters: described where they are declared below, and in docs/parameters.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from rclpy.lifecycle import LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

from ami_ros.bags.reading import BagError, message_class
from ami_ros.bags.recording import DEFAULT_TOPICS, BagWriter, QueuedBagWriter
from ami_ros.ros.managed_node import ManagedNode, run

HIDDEN_PREFIX = '_'  # ROS hides topics whose last part starts with it; --all leaves them out


class BagRecorder(ManagedNode):
    """Raw subscriptions feeding a queued bag writer, and the status line."""

    def __init__(self) -> None:
        super().__init__('bag_recorder')
        self.output = self.declare(
            'output', '', "Bag directory to create, new or empty ('' = rosbag2_<date>-<time> in the "
                          'working directory).')
        self.topic_names = list(self.declare(
            'topics', list(DEFAULT_TOPICS), 'Topics to record, relative to the namespace.'))
        self.all_topics = self.declare(
            'all_topics', False,
            'Record every topic of the graph (hidden ones excepted) instead of `topics`.')
        self.max_duration = self.declare(
            'max_duration', 0.0, 'Start a new numbered file after this many seconds (0 = never).',
            low=0.0, high=1e7)
        self.max_size = self.declare(
            'max_size', 0, 'Start a new numbered file once one reaches this many bytes (0 = never).',
            low=0, high=2**62)
        self.compression = self.declare(
            'compression', 'zstd', 'MCAP chunk compression (the files stay indexed).',
            choices=('zstd', 'none'))
        self.queue_size = self.declare(
            'queue_size', 1000, 'Messages waiting for the disk at most; beyond, they are dropped '
                                'and counted in the status.', low=1, high=1_000_000)
        self.discovery_period = self.declare(
            'discovery_period', 0.5, 'Seconds between looks for new topics and publishers.',
            low=0.05, high=60.0)
        self.status_interval = self.declare(
            'status_interval', 10.0, 'Seconds between status lines when the output is not a '
                                     'terminal (a terminal gets one line updated every second; 0 = none).',
            low=0.0, high=3600.0)
        if self.output and Path(self.output).exists() and (
                not Path(self.output).is_dir() or any(Path(self.output).iterdir())):
            raise ValueError(f'output {self.output} exists and is not an empty directory; '
                             'choose a new bag directory')
        self.nice = self.declare(
            'nice', 10, 'Niceness added to every thread when recording starts, so the acting agent '
                        'wins the CPU (the queue absorbs the delay; 0 = unchanged).', low=0, high=19)
        self.bag: QueuedBagWriter | None = None
        self.printer: Any = None
        self._recorded: dict[str, Any] = {}
        self._refused: set[str] = set()

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        from ami_ros.launcher import StatusPrinter
        from ami_ros.ros.process_priority import yield_cpu

        if self.nice:
            yield_cpu(self.nice)  # here, not in __init__: `ami-ros parameters` only constructs nodes

        directory = Path(self.output or time.strftime('rosbag2_%Y_%m_%d-%H_%M_%S'))
        try:
            writer = BagWriter(directory, compression=self.compression, max_bytes=self.max_size,
                               max_duration_s=self.max_duration)
        except (OSError, ValueError) as exc:
            self.get_logger().error(f'cannot record: {exc}')
            return TransitionCallbackReturn.FAILURE
        self.bag = QueuedBagWriter(writer, self.queue_size)
        self.get_logger().info(f'recording into {directory.absolute()}')
        self.printer = StatusPrinter(sys.stdout, plain_interval=self.status_interval or float('inf'))
        self.create_timer(self.discovery_period, self.discover)
        if self.status_interval:
            self.create_timer(1.0, self.show_status)
        self.discover()
        return TransitionCallbackReturn.SUCCESS

    def wanted(self) -> dict[str, str]:
        """Topics to record that have a publisher now: name -> type."""
        found = {}
        names = None if self.all_topics else {self.resolve_topic_name(t) for t in self.topic_names}
        for name, types in self.get_topic_names_and_types():
            if names is not None and name not in names:
                continue
            if names is None and name.rsplit('/', 1)[-1].startswith(HIDDEN_PREFIX):
                continue
            if types and self.count_publishers(name):
                found[name] = types[0]
        return found

    def discover(self) -> None:
        if self.bag is None:
            return
        for name, msgtype in self.wanted().items():
            if name in self._recorded or name in self._refused:
                continue
            try:
                cls = message_class(msgtype)
            except BagError as exc:
                self._refused.add(name)
                self.get_logger().warning(f'not recording {name}: {exc}')
                continue
            offered = [i.qos_profile for i in self.get_publishers_info_by_topic(name)]
            self.bag.add_topic(name, msgtype, [_rosbags_qos(q) for q in offered])
            self._recorded[name] = self.create_subscription(
                cls, name, lambda data, topic=name: self.bag.put(topic, time.time_ns(), data),
                _recording_qos(offered, self.queue_size), raw=True)

    def show_status(self) -> None:
        if self.bag is not None:
            self.printer.status(_StatusLine(self.bag.status()))

    def on_exit(self) -> None:
        if self.bag is None:
            return
        bag, self.bag = self.bag, None
        bag.close()
        if self.printer is not None:
            self.printer.status(_StatusLine(bag.status()))
            self.printer.close()
        writer = bag.writer
        dropped = sum(bag.dropped.values())
        print(f'bag closed: {writer.directory}: {writer.message_count} messages, '
              f'{writer.size / 1e6:.1f} MB in {len(writer.files)} file(s)'
              + (f', {dropped} dropped' if dropped else ''), flush=True)


class _StatusLine:
    """What launcher.StatusPrinter draws: one line cut to the terminal's width."""

    def __init__(self, text: str) -> None:
        self.text = text

    def render(self, width: int) -> str:
        return self.text if len(self.text) <= width else self.text[:width - 1] + '…'


def _recording_qos(offered: list[Any], depth: int) -> QoSProfile:
    """A subscription QoS every offer matches, as ros2 bag adapts it (reliable/latched if all are)."""
    reliable = bool(offered) and all(q.reliability == ReliabilityPolicy.RELIABLE for q in offered)
    latched = bool(offered) and all(q.durability == DurabilityPolicy.TRANSIENT_LOCAL for q in offered)
    return QoSProfile(depth=min(depth, 1000),
                      reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)


def _rosbags_qos(profile: Any) -> Any:
    """rclpy's QoSProfile as rosbags' Qos (what metadata.yaml and the MCAP channel record)."""
    from rosbags.interfaces import (
        Qos,
        QosDurability,
        QosHistory,
        QosLiveliness,
        QosReliability,
        QosTime,
    )

    def duration(value: Any) -> QosTime:
        ns = int(value.nanoseconds)
        if ns >= 2**63 - 1 or ns // 10**9 >= 2**31 - 1:  # infinite, written as rosbag2 does
            return QosTime(2147483647, 4294967295)
        return QosTime(ns // 10**9, ns % 10**9)

    return Qos(QosHistory(int(profile.history)), int(profile.depth),
               QosReliability(int(profile.reliability)), QosDurability(int(profile.durability)),
               duration(profile.deadline), duration(profile.lifespan),
               QosLiveliness(int(profile.liveliness)), duration(profile.liveliness_lease_duration),
               bool(profile.avoid_ros_namespace_conventions))


def main(args: list[str] | None = None) -> int:
    return run(BagRecorder, args)


if __name__ == '__main__':
    sys.exit(main())
