"""The agent node as a real process: acts on frames, survives bad ones."""

import os
import time

import numpy as np
from ros_harness import wait_for
from sensor_msgs.msg import Image, Joy
from std_msgs.msg import Float32

from ami_ros.ros.images import rgb_to_image


def _publisher(test_node):
    return test_node.node.create_publisher(Image, 'camera/image_raw', 10)


def _frame(test_node, shape=(84, 84, 3), seed=0):
    rgb = np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)
    return rgb_to_image(rgb, test_node.node.get_clock().now().to_msg())


def _feed_until(test_node, pub, make_frame, condition, timeout=30.0, period=0.1):
    deadline = time.monotonic() + timeout
    i = 0
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError('timed out feeding frames')
        pub.publish(make_frame(i))
        i += 1
        time.sleep(period)  # pace frames like a 10 Hz camera
    return i


def test_agent_answers_each_frame_with_a_stamped_joy(launch, test_node):
    agent = launch('agent', parameters={'preset': 'small'})
    actions = test_node.collect(Joy, 'action')
    rewards = test_node.collect(Float32, 'reward')
    pub = _publisher(test_node)
    sent = {}

    def make(i):
        msg = _frame(test_node, seed=i)
        sent[(msg.header.stamp.sec, msg.header.stamp.nanosec)] = i
        return msg

    _feed_until(test_node, pub, make, lambda: len(actions) >= 20)
    assert agent.alive()
    for _, joy in actions:
        assert len(joy.axes) == 3 and len(joy.buttons) == 2
        assert all(a in (-1.0, 0.0, 1.0) for a in joy.axes)
        assert all(b in (0, 1) for b in joy.buttons)
        # The action answers a frame we sent: its stamp is that frame's.
        assert (joy.header.stamp.sec, joy.header.stamp.nanosec) in sent
    # Curiosity arrives from the second step on and is a finite number.
    wait_for(lambda: rewards, 5, message='reward')
    assert all(np.isfinite(r.data) and r.data >= 0 for _, r in rewards)
    # Sampling: over 20 steps a random policy does not repeat one action.
    distinct = {(tuple(j.axes), tuple(j.buttons)) for _, j in actions}
    assert len(distinct) > 1


def test_agent_converts_other_sizes_and_encodings(launch, test_node):
    launch('agent', parameters={'preset': 'small'})
    actions = test_node.collect(Joy, 'action')
    pub = _publisher(test_node)
    wait_for(lambda: pub.get_subscription_count() > 0, 15, message='agent subscription')
    for encoding, channels in (('bgr8', 3), ('rgba8', 4), ('mono8', 1), ('rgb8', 3)):
        before = len(actions)

        def make(i, encoding=encoding, channels=channels):
            msg = Image(height=120, width=160, encoding=encoding, step=160 * channels)
            msg.data = np.full(120 * 160 * channels, i % 255, np.uint8).tobytes()
            msg.header.stamp = test_node.node.get_clock().now().to_msg()
            return msg

        _feed_until(test_node, pub, make, lambda before=before: len(actions) >= before + 3)


def test_agent_drops_garbage_and_keeps_acting(launch, test_node):
    agent = launch('agent', parameters={'preset': 'small'})
    actions = test_node.collect(Joy, 'action')
    pub = _publisher(test_node)
    _feed_until(test_node, pub, lambda i: _frame(test_node, seed=i), lambda: len(actions) >= 3)
    garbage = [
        Image(height=84, width=84, encoding='rgb8', step=252, data=b'\x00' * 100),  # too short
        Image(height=84, width=84, encoding='yuv422', step=168, data=b'\x00' * 84 * 168),
        Image(height=0, width=0, encoding='rgb8', step=0),
        Image(height=84, width=84, encoding='rgb8', step=10, data=b'\x00' * 84 * 252),
    ]
    count = len(actions)
    for msg in garbage * 3:
        pub.publish(msg)
        time.sleep(0.05)  # paced like a camera: best-effort delivery, depth 1
    wait_for(lambda: 'dropping frame' in agent.output(), 10, message='a warning about garbage')
    # Garbage produced no action...
    assert len(actions) == count
    # ...and the agent still acts on good frames.
    _feed_until(test_node, pub, lambda i: _frame(test_node, seed=i),
                lambda: len(actions) >= count + 5)
    assert agent.alive()
    out = agent.output()
    assert 'too short' in out or 'bytes' in out
    assert "unsupported encoding 'yuv422'" in out


def test_nodes_publish_synchronously_unless_the_user_chose(monkeypatch):
    from ami_ros.ros.managed_node import prefer_synchronous_publication

    monkeypatch.delenv('RMW_FASTRTPS_PUBLICATION_MODE', raising=False)
    prefer_synchronous_publication()
    assert os.environ['RMW_FASTRTPS_PUBLICATION_MODE'] == 'SYNCHRONOUS'
    monkeypatch.setenv('RMW_FASTRTPS_PUBLICATION_MODE', 'ASYNCHRONOUS')
    prefer_synchronous_publication()
    assert os.environ['RMW_FASTRTPS_PUBLICATION_MODE'] == 'ASYNCHRONOUS'
