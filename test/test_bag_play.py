"""`ami-ros bag play` as a real process: timing, QoS, selection, restamping, into a lone agent."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import rclpy.serialization
from builtin_interfaces.msg import Time
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from ros_harness import NodeStatus, ami_ros, wait_for
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore
from sensor_msgs.msg import Image, Joy
from std_msgs.msg import String

from ami_ros.core.observation import image_to_rgb
from ami_ros.ros.images import rgb_to_image, stamp_ns

NS = 1_000_000_000
# A recording from another day: stamps and receive times far from now.
RECORDED_AT = 1_700_000_000 * NS
JOY_TOPIC, TEXT_TOPIC = '/probe/joy', '/probe/text'
JOY_HZ, TEXT_HZ, SECONDS = 20, 10, 2.0
RECORDED_JOY_QOS = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE,
                              durability=DurabilityPolicy.TRANSIENT_LOCAL)


def _qos(reliability: QosReliability, durability: QosDurability, depth: int) -> Qos:
    never = QosTime(sec=0, nsec=0)
    return Qos(QosHistory.KEEP_LAST, depth, reliability, durability, never, never,
               QosLiveliness.AUTOMATIC, never, False)


def _write_bag(path, topics) -> None:
    """A rosbag2 MCAP bag: `topics` is [(name, msgtype, qos, [(t_ns, msg), ...])]."""
    store = get_typestore(Stores.ROS2_JAZZY)
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        timed = []
        for name, msgtype, qos, messages in topics:
            conn = writer.add_connection(name, msgtype, typestore=store, offered_qos_profiles=[qos])
            timed += [(t, conn, msg) for t, msg in messages]
        for t, conn, msg in sorted(timed, key=lambda x: x[0]):
            writer.write(conn, t, rclpy.serialization.serialize_message(msg))


def _play(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, '-m', 'ami_ros.cli', 'bag', 'play', *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


@pytest.fixture
def probe_bag(tmp_path):
    """2 s of a stamped Joy (reliable, transient local) and a String (best effort): their indices."""
    joys = []
    for i in range(int(SECONDS * JOY_HZ)):
        t = RECORDED_AT + i * NS // JOY_HZ
        msg = Joy(axes=[float(i)])
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(t - 3_000_000, NS)  # 3 ms before
        joys.append((t, msg))
    texts = [(RECORDED_AT + i * NS // TEXT_HZ + 1000, String(data=str(i)))
             for i in range(int(SECONDS * TEXT_HZ))]
    path = tmp_path / 'probe'
    _write_bag(path, [
        (JOY_TOPIC, 'sensor_msgs/msg/Joy', _qos(QosReliability.RELIABLE, QosDurability.TRANSIENT_LOCAL, 50),
         joys),
        (TEXT_TOPIC, 'std_msgs/msg/String', _qos(QosReliability.BEST_EFFORT, QosDurability.VOLATILE, 5),
         texts)])
    return path, joys, texts


def _subscribe(test_node, prefix: str = ''):
    """Subscribers with the recorded QoS: a transient-local one only matches a transient-local player."""
    joys = test_node.collect(Joy, prefix + JOY_TOPIC, RECORDED_JOY_QOS)
    texts = test_node.collect(String, prefix + TEXT_TOPIC, QoSProfile(
        depth=50, reliability=ReliabilityPolicy.BEST_EFFORT))
    return joys, texts


def _spread(received) -> float:
    return received[-1][0] - received[0][0]


def test_play_keeps_timing_qos_and_selects(test_node, probe_bag):
    path, recorded_joys, recorded_texts = probe_bag
    joys, texts = _subscribe(test_node)
    started_wall = time.time_ns()
    out = _finish(_play(path, '--wait-for-subscribers'))
    wait_for(lambda: len(joys) == len(recorded_joys), 5, message=lambda: f'{len(joys)} joys')
    # Every message of the reliable topic, in order, as recorded but for the stamp.
    assert [j.axes[0] for _, j in joys] == [m.axes[0] for _, m in recorded_joys]
    # Stamps moved onto the playing clock as one shift: their spacing is the recording's,
    # and each is within the run's wall time (the recorded ones are from 2023).
    shifts = {stamp_ns(j) - stamp_ns(m) for (_, j), (_, m) in zip(joys, recorded_joys, strict=True)}
    assert len(shifts) == 1
    assert started_wall < stamp_ns(joys[0][1]) < time.time_ns()
    # Best effort on one machine loses nothing either, or very little.
    assert len(texts) >= len(recorded_texts) - 2
    assert {t.data for _, t in texts} <= {m.data for _, m in recorded_texts}
    # The recorded timing: 2 s of messages take about 2 s.
    full_spread = _spread(joys)
    assert 1.6 < full_spread < 2.6, full_spread
    assert 'done' in out and f'{len(recorded_joys) + len(recorded_texts)} messages' in out

    # Twice the rate, under a namespace: half the time, on the namespaced names.
    fast_joys, _ = _subscribe(test_node, '/fast')
    proc = _play(path, '--rate', '2', '--namespace', '/fast', '--topics', JOY_TOPIC,
                 '--wait-for-subscribers')
    seen = wait_for(lambda: test_node.node.get_publishers_info_by_topic('/fast' + JOY_TOPIC), 20,
                    message='the player on /fast/probe/joy')
    _finish(proc)
    wait_for(lambda: len(fast_joys) == len(recorded_joys), 5, message=lambda: f'{len(fast_joys)} joys')
    ratio = _spread(fast_joys) / full_spread
    assert 0.35 < ratio < 0.7, ratio
    # The player offered what the recording says.
    offered = seen[0].qos_profile
    assert offered.reliability.name == 'RELIABLE' and offered.durability.name == 'TRANSIENT_LOCAL'

    # Only the stamped topic, from 1 s on, remapped: exactly its later messages, nothing else.
    remapped = test_node.collect(Joy, '/replayed/joy', RECORDED_JOY_QOS)
    texts.clear()
    _finish(_play(path, '--topics', 'probe/joy', '--start-offset', '1.0',
                  '--remap', 'probe/joy:=/replayed/joy', '--wait-for-subscribers'))
    later = [m.axes[0] for t, m in recorded_joys if t >= RECORDED_AT + NS]
    wait_for(lambda: len(remapped) == len(later), 5, message=lambda: f'{len(remapped)} joys')
    assert [j.axes[0] for _, j in remapped] == later
    assert not texts and len(joys) == len(recorded_joys)


def test_keep_stamps_publishes_the_recorded_bytes(test_node, probe_bag):
    path, recorded_joys, _ = probe_bag
    joys, _ = _subscribe(test_node)
    _finish(_play(path, '--topics', JOY_TOPIC, '--keep-stamps', '--rate', '4', '--wait-for-subscribers'))
    wait_for(lambda: len(joys) == len(recorded_joys), 5, message=lambda: f'{len(joys)} joys')
    assert [stamp_ns(j) for _, j in joys] == [stamp_ns(m) for _, m in recorded_joys]


def _pattern(i: int) -> np.ndarray:
    """Frame i of the recorded camera: a gradient whose offset and channel order tell i."""
    y, x = np.mgrid[0:84, 0:84]
    return np.stack([(x + 3 * i) % 256, (y + 5 * i) % 256, np.full_like(x, i)], axis=2).astype(np.uint8)


def test_agent_acts_on_played_frames_with_live_latency(launch, test_node, tmp_path):
    frames = []
    for i in range(50):  # 5 s at 10 Hz
        t = RECORDED_AT + i * NS // 10
        sec, nanosec = divmod(t - 5_000_000, NS)  # the camera's stamp, 5 ms before the recorder's
        msg = rgb_to_image(_pattern(i), Time(sec=sec, nanosec=nanosec), frame_id=f'frame{i}')
        frames.append((t, msg))
    bag = tmp_path / 'camera'
    _write_bag(bag, [('/camera/image_raw', 'sensor_msgs/msg/Image',
                      _qos(QosReliability.RELIABLE, QosDurability.VOLATILE, 10), frames)])
    status = NodeStatus(test_node)
    launch('agent', parameters={'preset': 'cpu'})
    actions = test_node.collect(Joy, 'action')
    played = test_node.collect(Image, 'camera/image_raw')
    wait_for(lambda: status.get('agent', 'active') == 'True', 60, message='the agent active')
    proc = _play(bag, '--loop', '--wait-for-subscribers', '2')  # the agent and this test
    wait_for(lambda: len(actions) >= 60, 30, message=lambda: f'{len(actions)} actions')
    proc.send_signal(signal.SIGINT)
    out = _finish(proc, timeout=15)
    assert 'stopped' in out  # Ctrl-C: a clean stop, the last status kept

    # The frames went out as recorded (pixels), stamped now.
    for _, msg in played[:5]:
        i = int(msg.header.frame_id.removeprefix('frame'))
        assert np.array_equal(image_to_rgb(msg), _pattern(i))
    by_stamp = {stamp_ns(m): m.header.frame_id for _, m in played}
    assert len(by_stamp) == len(played)  # every played frame has a stamp of its own, also when looped
    # One action per frame it acted on, stamped and named as that frame.
    stamps = [stamp_ns(a) for _, a in actions]
    assert len(set(stamps)) == len(stamps)
    assert all(by_stamp.get(stamp_ns(a)) == a.header.frame_id for _, a in actions)
    # It keeps only the newest frame: a slow first step may skip one or two, not more.
    assert len(actions) >= 0.8 * len(played), (len(actions), len(played))
    # Latency from the frames' stamps is the agent's own, not the recording's age.
    wait_for(lambda: status.number('agent', 'steps') >= 60, 5, message='agent diagnostics')
    latency = status.number('agent', 'latency_p99_ms')
    assert 0 < latency < 1000, latency
    assert status.number('agent', 'step_p99_ms') <= latency


def test_bad_bags_get_one_line(tmp_path, probe_bag):
    broken = tmp_path / 'broken.mcap'
    broken.write_bytes(b'not a bag at all' * 10)
    empty = tmp_path / 'empty'
    empty.mkdir()
    for path in (tmp_path / 'missing', broken, empty):
        result = ami_ros('bag', 'play', str(path), timeout=30)
        assert result.returncode == 1, result
        assert 'Traceback' not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and path.name in lines[0], result.stderr
    # A topic the bag does not have: a usage error, naming the bag and the topic.
    result = ami_ros('bag', 'play', str(probe_bag[0]), '--topics', '/nope', timeout=30)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and '/nope' in result.stderr
    assert str(probe_bag[0]) in result.stderr


def test_restamp_changes_only_the_stamp():
    from ami_ros.bags.play import restamp, starts_with_header

    msg = Joy(axes=[0.5, -1.0], buttons=[1, 0])
    msg.header.stamp.sec, msg.header.stamp.nanosec = 1_700_000_000, 123
    msg.header.frame_id = 'pad'
    raw = rclpy.serialization.serialize_message(msg)
    moved = rclpy.serialization.deserialize_message(restamp(raw, lambda s: s + 5 * NS + 7), Joy)
    assert stamp_ns(moved) == stamp_ns(msg) + 5 * NS + 7
    assert (moved.header.frame_id, list(moved.axes), list(moved.buttons)) == ('pad', [0.5, -1.0], [1, 0])
    msg.header.stamp.sec, msg.header.stamp.nanosec = 0, 0  # unstamped stays unstamped
    raw = rclpy.serialization.serialize_message(msg)
    assert restamp(raw, lambda s: s + NS) == raw
    assert starts_with_header(Joy) and starts_with_header(Image) and not starts_with_header(String)
