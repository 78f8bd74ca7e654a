"""The manager pauses, resumes and shuts down the graph; ami-ros drives it."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from ros_harness import wait_for
from sensor_msgs.msg import Image, Joy

from ami_ros.core.checkpoint import list_checkpoints
from ami_ros.ros.images import rgb_to_image


def ami_ros(*args, timeout=30):
    return subprocess.run([sys.executable, '-m', 'ami_ros.cli', *args], capture_output=True,
                          text=True, timeout=timeout)


class FrameFeeder:
    """Publishes frames at 10 Hz from a thread, like a camera."""

    def __init__(self, test_node):
        self.pub = test_node.node.create_publisher(Image, 'camera/image_raw', 10)
        self.clock = test_node.node.get_clock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        rng = np.random.default_rng(0)
        while not self.stop.wait(0.1):
            rgb = rng.integers(0, 255, (84, 84, 3), dtype=np.uint8)
            self.pub.publish(rgb_to_image(rgb, self.clock.now().to_msg()))


def test_pause_resume_status_shutdown(launch, test_node):
    agent = launch('agent', parameters={'preset': 'small'})
    manager = launch('manager', parameters={'managed_nodes': ['agent']})
    actions = test_node.collect(Joy, 'action')
    feeder = FrameFeeder(test_node)
    try:
        wait_for(lambda: len(actions) >= 5, 30, message='actions before pause')

        paused = ami_ros('pause')
        assert paused.returncode == 0, paused.stderr
        assert paused.stdout.strip() == 'paused'
        status = ami_ros('status')
        assert status.returncode == 0
        assert status.stdout.strip() == 'paused: agent=inactive'
        count = len(actions)
        time.sleep(1.5)  # frames keep coming for 1.5 s; a paused agent must not answer them
        assert len(actions) <= count + 1  # one frame may have been in flight

        resumed = ami_ros('resume')
        assert resumed.returncode == 0 and resumed.stdout.strip() == 'running'
        count = len(actions)
        wait_for(lambda: len(actions) >= count + 5, 10, message='actions after resume')
        assert ami_ros('status').stdout.strip() == 'running: agent=active'

        done = ami_ros('shutdown')
        assert done.returncode == 0, done.stdout + done.stderr
        # A clean shutdown leaves a final checkpoint first.
        words, _, path = done.stdout.strip().partition('; final checkpoint ')
        assert words == 'shut down' and path, done.stdout
        assert list_checkpoints(Path(path).parent) == [Path(path)]
        wait_for(lambda: not agent.alive() and not manager.alive(), 15, message='processes exit')
        assert agent.proc.returncode == 0
        assert manager.proc.returncode == 0
    finally:
        feeder.stop.set()


def test_status_reports_unreachable_nodes(launch):
    launch('manager', parameters={'managed_nodes': ['ghost'], 'call_timeout': 1.0})
    status = ami_ros('status')
    assert status.returncode == 1
    assert 'ghost=unreachable' in status.stdout


def test_cli_without_a_graph_says_what_to_do():
    out = ami_ros('pause', '--timeout', '1')
    assert out.returncode == 1
    assert 'no manager answers' in out.stderr and 'ami-ros launch' in out.stderr
