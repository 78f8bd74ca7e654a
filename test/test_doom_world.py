"""doom_world as a real process: camera frames, pose, OSC control over UDP, lifecycle."""

from __future__ import annotations

import math
import socket

import pytest
from geometry_msgs.msg import PoseStamped
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState
from pythonosc.udp_client import SimpleUDPClient
from rclpy.qos import DurabilityPolicy, QoSProfile
from ros_harness import NodeStatus, free_udp_port, wait_for
from sensor_msgs.msg import Image
from std_msgs.msg import UInt32

START_TIMEOUT = 30.0  # a cold start imports rclpy, torch and ViZDoom on a shared CPU


def stamp_seconds(msg) -> float:
    return msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9


def yaw_degrees(pose: PoseStamped) -> float:
    q = pose.pose.orientation
    return math.degrees(2.0 * math.atan2(q.z, q.w))


def angle_change(before: float, after: float) -> float:
    """Signed change in degrees, in (-180, 180]: negative = clockwise (right)."""
    return (after - before + 180.0) % 360.0 - 180.0


def publish_rate(received: list, seconds: float = 2.0) -> tuple[float, int]:
    """Frames per second of node time, from the stamps of `seconds` of new frames.

    Stamps rather than arrival times, so delivery jitter in the test process
    does not count; returns (rate, frames). The first second is skipped: a
    process that has just started still competes with its own start-up.
    """
    first = max(len(received) - 1, 0)
    wait_for(lambda: len(received) > first and stamp_seconds(received[-1][1])
             - stamp_seconds(received[first][1]) >= 1.0, 10.0, message='frames to warm up')
    start = len(received)
    wait_for(lambda: len(received) > start and stamp_seconds(received[-1][1])
             - stamp_seconds(received[start][1]) >= seconds, seconds + 10.0,
             message=f'{seconds}s of frames')
    frames = [msg for _, msg in received[start:]]
    return (len(frames) - 1) / (stamp_seconds(frames[-1]) - stamp_seconds(frames[0])), len(frames)


def start_world(launch, test_node, **params):
    port = free_udp_port()
    proc = launch('doom_world', parameters={'port': port, 'seed': 1, **params})
    images = test_node.collect(Image, 'camera/image_raw')
    poses = test_node.collect(PoseStamped, 'world/pose')
    wait_for(lambda: (images and poses) or not proc.alive(), START_TIMEOUT, message='first frame and pose')
    assert proc.alive(), proc.output()
    return proc, SimpleUDPClient('127.0.0.1', port), images, poses


def test_frames_pose_and_osc_control(launch, test_node):
    proc, osc, images, poses = start_world(launch, test_node)
    assert 'my_way_home' in proc.output() and 'steps/s' in proc.output()

    image = images[-1][1]
    assert (image.width, image.height, image.encoding, image.step) == (84, 84, 'rgb8', 252)
    assert len(image.data) == 84 * 84 * 3
    assert poses[-1][1].header.frame_id == 'map'
    rate, count = publish_rate(images)
    assert rate == pytest.approx(10.0, rel=0.3), f'{count} frames at {rate:.1f}/s'

    # Forward: the pose moves along its own heading.
    start = poses[-1][1]
    heading = math.radians(yaw_degrees(start))

    def moved_forward() -> float:
        pose = poses[-1][1].pose.position
        return ((pose.x - start.pose.position.x) * math.cos(heading)
                + (pose.y - start.pose.position.y) * math.sin(heading))

    osc.send_message('/input/Vertical', 1.0)
    wait_for(lambda: moved_forward() > 40.0, 10.0, message='world/pose to move forward')
    osc.send_message('/input/Vertical', 0.0)

    # Right turn: the yaw (counter-clockwise, REP 103) goes down.
    yaw0 = yaw_degrees(poses[-1][1])
    osc.send_message('/input/LookHorizontal', 1.0)
    wait_for(lambda: angle_change(yaw0, yaw_degrees(poses[-1][1])) < -20.0, 10.0,
             message='world/pose to turn right')
    osc.send_message('/input/LookHorizontal', 0.0)

    # Released: it stops once Doom's momentum has decayed, and stays.
    def still(count: int) -> bool:
        last = [p.pose for _, p in poses[-count:]]
        return len(last) == count and all(p == last[0] for p in last)

    wait_for(lambda: still(3), 10.0, message='world/pose to stop after release')
    settled = len(poses)
    wait_for(lambda: len(poses) >= settled + 3, 5.0, message='more poses')
    assert still(len(poses) - settled + 3), 'the player moved again with every input released'


def test_time_scale_and_lifecycle(launch, test_node):
    status = NodeStatus(test_node)
    proc, osc, images, _ = start_world(launch, test_node, time_scale=3.0)
    rate, count = publish_rate(images)
    assert rate == pytest.approx(30.0, rel=0.3), f'{count} frames at {rate:.1f}/s'
    # Its /diagnostics: the rate asked for and kept, the OSC input taken and not.
    osc.send_message('/input/Vertical', 0.0)
    osc.send_message('/input/NotAnInput', 1)
    wait_for(lambda: (status.get('doom_world', 'osc_messages'),
                      status.get('doom_world', 'ignored_osc')) == ('1', '1'), 5,
             message=lambda: f'the OSC counts in the diagnostics: {status.status.get("doom_world")}')
    assert status.get('doom_world', 'target_rate_hz') == '30.000'
    assert status.number('doom_world', 'rate_hz') == pytest.approx(30.0, rel=0.3)
    assert status.number('doom_world', 'steps') >= count

    request = ChangeState.Request()
    request.transition.id = Transition.TRANSITION_DEACTIVATE
    assert test_node.call(ChangeState, 'doom_world/change_state', request).success
    # One frame already in flight may still land; after that nothing comes.
    paused = len(images)
    with pytest.raises(AssertionError):
        wait_for(lambda: len(images) > paused + 1, 1.5, message='frames while inactive')
    paused = len(images)

    request.transition.id = Transition.TRANSITION_ACTIVATE
    assert test_node.call(ChangeState, 'doom_world/change_state', request).success
    wait_for(lambda: len(images) >= paused + 5, 5.0, message='frames after activate')

    # The manager's shutdown ends the process cleanly (OSC server closed, game closed).
    request.transition.id = Transition.TRANSITION_ACTIVE_SHUTDOWN
    assert test_node.call(ChangeState, 'doom_world/change_state', request).success
    wait_for(lambda: not proc.alive(), 10.0, message='doom_world to exit after shutdown')
    assert proc.proc.returncode == 0, proc.output()


def test_episodes_restart_and_are_announced(launch, test_node):
    latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    episodes = test_node.collect(UInt32, 'world/episode', qos=latched)
    # Episodes of 1 s of game time, 3x faster than real time: one every ~0.33 s.
    start_world(launch, test_node, time_scale=3.0, episode_timeout=1.0)
    wait_for(lambda: len(episodes) >= 4, 10.0, message='four episodes')
    numbers = [m.data for _, m in episodes]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers
    # A subscriber that comes late still learns the current episode at once.
    late = test_node.collect(UInt32, 'world/episode', qos=latched)
    wait_for(lambda: late, 5.0, message='the current episode for a late subscriber')
    assert late[0][1].data >= numbers[-1]


def test_busy_port_is_one_clear_error(launch):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
        proc = launch('doom_world', parameters={'port': port})
        wait_for(lambda: not proc.alive(), START_TIMEOUT, message='doom_world to exit')
    assert proc.proc.returncode != 0
    errors = [line for line in proc.output().splitlines() if str(port) in line]
    assert len(errors) == 1 and 'in use' in errors[0] and 'port:=' in errors[0], proc.output()
