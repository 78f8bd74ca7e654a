"""Bags in and out: `bag:=` on a running doom graph, `ami-ros bag record` stopped by SIGINT and
SIGKILL, `ami-ros bag info` on our bags, foreign bags and bad files (real processes, real files)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ros_harness import ami_ros, free_udp_port, start_graph, stop_graph, wait_for

from ami_ros.bags.reading import BagError, open_bag

DOOM_SECONDS = 18  # recording after the first frame


def info_counts(text: str) -> dict[str, int]:
    """Topic -> count from `ami-ros bag info` output."""
    return {m[1]: int(m[2]) for m in re.finditer(r'Topic: (\S+)\s*\|.*?Count: (\d+)', text)}


def independent_read(files: list[Path]) -> dict[str, int]:
    """Every message parsed by the `mcap` package and rclpy, without ami_ros: topic -> count."""
    import importlib

    from mcap.reader import make_reader
    from rclpy.serialization import deserialize_message

    counts: dict[str, int] = {}
    for file in files:
        with file.open('rb') as stream:
            for schema, channel, message in make_reader(stream).iter_messages():
                package, _, name = schema.name.split('/')
                cls = getattr(importlib.import_module(f'{package}.msg'), name)
                deserialize_message(message.data, cls)  # raises on a message it cannot parse
                counts[channel.topic] = counts.get(channel.topic, 0) + 1
    return counts


def test_bag_records_a_running_doom_graph(tmp_path):
    bag_dir = tmp_path / 'doom_bag'
    proc = start_graph(tmp_path, 'world:=doom', 'train:=false', 'record:=false', f'bag:={bag_dir}',
                       f'vrchat_port:={free_udp_port()}')
    try:
        log = proc.log_path
        wait_for(lambda: '/camera/image_raw=' in log.read_text() or proc.poll() is not None, 120,
                 message=lambda: f'recorded frames; log:\n{log.read_text()[-3000:]}')
        time.sleep(DOOM_SECONDS)
    finally:
        stop_graph(proc, timeout=60)
    output = proc.log_path.read_text()
    assert proc.returncode == 0, output[-3000:]
    assert (bag_dir / 'metadata.yaml').exists(), output[-3000:]
    with open_bag(bag_dir) as bag:
        seconds = bag.duration_ns / 1e9
        counts = {name: t.count for name, t in bag.topics.items()}
        assert not bag.recovered
    assert seconds >= DOOM_SECONDS - 2, counts
    camera = counts['/camera/image_raw']
    # doom_world steps at 10 Hz; the agent acts, rewards and reports once per frame it gets.
    assert 7 <= camera / seconds <= 12, (camera, seconds)
    assert 0.8 * camera <= counts['/world/pose'] <= 1.05 * camera, counts
    for topic in ('/action', '/reward', '/prediction_error', '/experience'):
        assert 0.6 * camera <= counts[topic] <= 1.05 * camera, (topic, counts)
    assert counts['/world/episode'] >= 1, counts
    assert independent_read(sorted(bag_dir.glob('*.mcap'))) == counts
    info = ami_ros('bag', 'info', str(bag_dir))
    assert info.returncode == 0, info.stderr
    assert info_counts(info.stdout) == counts
    assert 'Storage id:        mcap' in info.stdout


def frame_publishers(node):
    from sensor_msgs.msg import Image
    from std_msgs.msg import Float32

    return (node.create_publisher(Image, 'bagtest/camera/image_raw', 10),
            node.create_publisher(Float32, 'bagtest/reward', 10))


def publish_frames(publishers, seconds: float) -> int:
    """Random 160x120 rgb8 frames and a Float32 at 50 Hz for `seconds`: ~3 MB/s, so a
    recorder closes a 1 MiB chunk every ~0.4 s. Returns how many frames went out."""
    from sensor_msgs.msg import Image
    from std_msgs.msg import Float32

    frames, rewards = publishers
    rng = np.random.default_rng(0)
    sent, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        frames.publish(Image(height=120, width=160, encoding='rgb8', step=480,
                             data=rng.integers(0, 255, 120 * 480, dtype=np.uint8).tobytes()))
        rewards.publish(Float32(data=float(sent)))
        sent += 1
        time.sleep(0.02)
    return sent


def start_recording(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, '-m', 'ami_ros.cli', 'bag', 'record', '-o', str(out),
                             '--namespace', 'bagtest', 'camera/image_raw', 'reward',
                             '--status-interval', '1'],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_record_closes_on_sigint_and_recovers_after_sigkill(tmp_path, test_node):
    clean, killed = tmp_path / 'clean', tmp_path / 'killed'
    publishers = frame_publishers(test_node.node)
    recorders = [start_recording(clean), start_recording(killed)]
    try:
        # Both recorders subscribed to both topics before the stream starts.
        wait_for(lambda: all(test_node.node.count_subscribers(p.topic_name) >= 2 for p in publishers),
                 60, message='both recorders subscribed')
        publish_frames(publishers, 5.0)
        recorders[1].kill()
        recorders[0].send_signal(signal.SIGINT)
        out_clean, _ = recorders[0].communicate(timeout=30)
        recorders[1].communicate(timeout=10)
    finally:
        for proc in recorders:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert recorders[0].returncode == 0, out_clean
    assert 'Traceback' not in out_clean, out_clean
    assert re.search(r'bagtest/camera/image_raw=\d+', out_clean), out_clean  # the status line

    from rosbags.rosbag2 import Reader

    assert (clean / 'metadata.yaml').exists()
    with Reader(clean) as reader:  # another reader accepts what we wrote
        frames = sum(c.msgcount for c in reader.connections if c.topic == '/bagtest/camera/image_raw')
        qos = [c.ext.offered_qos_profiles for c in reader.connections]
    assert frames > 100, frames
    assert all(q for q in qos), qos  # the publishers' offered QoS is recorded

    assert not (killed / 'metadata.yaml').exists()
    info = ami_ros('bag', 'info', str(killed))
    assert info.returncode == 0, info.stderr
    assert re.search(r'Recovered:\s+recovered \d+ messages', info.stdout), info.stdout
    recovered = info_counts(info.stdout)
    # Complete chunks (1 MiB each) survive: all but the last few hundred ms of frames.
    assert recovered['/bagtest/camera/image_raw'] > frames // 2, (recovered, frames)
    with open_bag(killed) as bag:
        assert bag.recovered
        from ami_ros.bags.reading import deserialize

        read = sum(1 for m in bag.messages() if deserialize(m.msgtype, m.data) is not None)
        assert read == sum(recovered.values())

    # The clean bag cut in half: read up to its last complete chunk, and said so.
    mcap = next(clean.glob('*.mcap'))
    half = tmp_path / 'half.mcap'
    half.write_bytes(mcap.read_bytes()[:mcap.stat().st_size // 2])
    info = ami_ros('bag', 'info', str(half))
    assert info.returncode == 0, info.stderr
    assert 'Recovered:' in info.stdout
    assert 0 < info_counts(info.stdout)['/bagtest/camera/image_raw'] < frames


@pytest.mark.parametrize('kind', ['empty', 'missing', 'text', 'directory'])
def test_bad_bags_get_one_line_and_exit_1(tmp_path, kind):
    path = {'empty': tmp_path / 'empty.mcap', 'missing': tmp_path / 'nothing.mcap',
            'text': tmp_path / 'notes.mcap', 'directory': tmp_path / 'plain_dir'}[kind]
    if kind == 'empty':
        path.write_bytes(b'')
    elif kind == 'text':
        path.write_text('these are my notes, not a bag\n')
    elif kind == 'directory':
        path.mkdir()
        (path / 'readme.txt').write_text('hello')
    result = ami_ros('bag', 'info', str(path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], result.stderr
    assert 'Traceback' not in result.stderr + result.stdout
    with pytest.raises(BagError):
        open_bag(path)


def test_info_reads_foreign_bags(tmp_path, capsys):
    from mcap_ros2.writer import Writer as McapRos2Writer
    from rclpy.serialization import serialize_message
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore
    from std_msgs.msg import Float32

    from ami_ros.cli import main

    store = get_typestore(Stores.ROS2_JAZZY)
    sqlite_bag = tmp_path / 'sqlite_bag'
    with Writer(sqlite_bag, version=9, storage_plugin=StoragePlugin.SQLITE3) as writer:
        connection = writer.add_connection('/reward', 'std_msgs/msg/Float32', typestore=store)
        for i in range(30):
            writer.write(connection, 10**9 + i * 10**8, serialize_message(Float32(data=float(i))))

    bare = tmp_path / 'other_writer.mcap'
    msgdef, _ = store.generate_msgdef('std_msgs/msg/Float32', ros_version=2)
    with bare.open('wb') as stream:
        writer = McapRos2Writer(stream)
        schema = writer.register_msgdef('std_msgs/msg/Float32', msgdef)
        for i in range(12):
            writer.write_message('/foreign/reward', schema, {'data': float(i)}, log_time=10**9 + i * 10**8)
        writer.finish()

    assert main(['bag', 'info', str(sqlite_bag)]) == 0
    out = capsys.readouterr().out
    assert info_counts(out) == {'/reward': 30} and 'Storage id:        sqlite3' in out
    assert main(['bag', 'info', str(next(sqlite_bag.glob('*.db3')))]) == 0
    assert info_counts(capsys.readouterr().out) == {'/reward': 30}
    assert main(['bag', 'info', str(bare)]) == 0
    out = capsys.readouterr().out
    assert info_counts(out) == {'/foreign/reward': 12} and 'Recovered' not in out
    with open_bag(bare) as bag:
        from ami_ros.bags.reading import deserialize

        values = [deserialize(m.msgtype, m.data).data for m in bag.messages()]
    assert values == [float(i) for i in range(12)]
