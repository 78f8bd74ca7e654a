"""The agent node as a real process: acts on frames, survives bad ones."""

import os
import time

import cv2
import numpy as np
from ros_harness import wait_for
from sensor_msgs.msg import Image, Joy
from std_msgs.msg import Float32, UInt8MultiArray

from ami_ros.core.observation import SUPPORTED_ENCODINGS
from ami_ros.core.presets import get_preset
from ami_ros.core.schemas import decode_experience
from ami_ros.ros.images import rgb_to_image

PRESET = get_preset('cpu')


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
    agent = launch('agent', parameters={'preset': 'cpu'})
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


def _coloured(height, width):
    """An RGB frame whose channels differ everywhere: red grows left to right, green top
    to bottom, blue along the other diagonal; a crop, a squash or a channel swap shows."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    red = 255 * x / (width - 1)
    green = 255 * y / (height - 1)
    blue = 255 * (1 - (x / (width - 1) + y / (height - 1)) / 2)
    return np.stack([red, green, blue], axis=2).round().astype(np.uint8)


def _expected_observation(rgb):
    """What the models should see of `rgb`, worked out here: the largest centred square
    (the observation is square), shrunk to 84x84 by area averaging."""
    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = np.ascontiguousarray(rgb[top:top + side, left:left + side])
    return cv2.resize(square, (84, 84), interpolation=cv2.INTER_AREA)


# encoding, height, width, padding bytes at the end of each row
CONVERSIONS = [('rgb8', 120, 160, 0), ('bgr8', 120, 160, 0), ('rgba8', 160, 100, 0),
               ('bgra8', 90, 200, 8), ('mono8', 120, 160, 0)]


def _image_message(rgb, encoding, padding, stamp):
    """`rgb` laid out as `encoding` says, each row padded by `padding` bytes."""
    if encoding == 'mono8':
        grey = rgb[:, :, :2].mean(axis=2, keepdims=True).round().astype(np.uint8)  # red and green ramps
        pixels, expected = grey, np.repeat(grey, 3, axis=2)
    else:
        pixels = rgb[:, :, ::-1] if encoding.startswith('bgr') else rgb
        if encoding.endswith('a8'):  # an opaque alpha channel the agent must not take for colour
            pixels = np.concatenate([pixels, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
        expected = rgb
    height, width, channels = pixels.shape
    rows = np.zeros((height, width * channels + padding), np.uint8)
    rows[:, :width * channels] = pixels.reshape(height, -1)
    msg = Image(height=height, width=width, encoding=encoding, step=rows.shape[1], data=rows.tobytes())
    msg.header.stamp = stamp
    return msg, expected


def test_agent_converts_other_sizes_and_encodings(launch, test_node):
    # Non-square frames in every supported encoding: the observation each
    # step carries in `experience` is the centred crop of the frame, resized
    # to 84x84, in RGB order.
    launch('agent', parameters={'preset': 'cpu'})
    actions = test_node.collect(Joy, 'action')
    experience = test_node.collect(UInt8MultiArray, 'experience', qos=100)
    pub = _publisher(test_node)
    wait_for(lambda: pub.get_subscription_count() > 0, 15, message='agent subscription')
    expected: dict[int, tuple[str, np.ndarray]] = {}  # stamp (ns) -> (encoding, observation)
    assert set(SUPPORTED_ENCODINGS) == {c[0] for c in CONVERSIONS}
    for encoding, height, width, padding in CONVERSIONS:
        rgb = _coloured(height, width)
        before = len(actions)

        def make(i, rgb=rgb, encoding=encoding, padding=padding):
            now = test_node.node.get_clock().now()
            msg, source = _image_message(rgb, encoding, padding, now.to_msg())
            expected[now.nanoseconds] = (encoding, _expected_observation(source))
            return msg

        _feed_until(test_node, pub, make, lambda before=before: len(actions) >= before + 3)
    wait_for(lambda: len(experience) >= len(actions), 5, message='experience of every action')
    checked: dict[str, int] = {}
    for _, msg in experience:
        step = decode_experience(bytes(msg.data), PRESET)
        encoding, want = expected[step.stamp_ns]
        got = step.observation.permute(1, 2, 0).numpy().astype(np.int16)
        # Some slack for the interpolation, far less than a crop off by a few
        # pixels or a channel swap would make.
        diff = np.abs(got - want.astype(np.int16))
        assert diff.max() <= 3 and diff.mean() <= 1.0, (encoding, diff.max(), diff.mean())
        checked[encoding] = checked.get(encoding, 0) + 1
    assert all(checked.get(c[0], 0) >= 3 for c in CONVERSIONS), checked


def test_agent_drops_garbage_and_keeps_acting(launch, test_node):
    agent = launch('agent', parameters={'preset': 'cpu'})
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
