"""The manager pauses, resumes and shuts down the graph; ami-ros drives it."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from ros_harness import FrameFeeder, NodeStatus, wait_for
from sensor_msgs.msg import Joy
from std_msgs.msg import UInt8MultiArray

from ami_ros.core.agent import CuriosityAgent
from ami_ros.core.checkpoint_store import list_checkpoints
from ami_ros.core.presets import get_preset
from ami_ros.core.schemas import decode_experience


def ami_ros(*args, timeout=30):
    return subprocess.run([sys.executable, '-m', 'ami_ros.cli', *args], capture_output=True,
                          text=True, timeout=timeout)


def test_pause_resume_status_shutdown(launch, test_node):
    health = NodeStatus(test_node)
    agent = launch('agent', parameters={'preset': 'cpu'})
    manager = launch('manager', parameters={'managed_nodes': ['agent']})
    actions = test_node.collect(Joy, 'action')
    experience = test_node.collect(UInt8MultiArray, 'experience')
    feeder = FrameFeeder(test_node)
    try:
        wait_for(lambda: len(actions) >= 5, 30, message='actions before pause')

        paused = ami_ros('pause')
        assert paused.returncode == 0, paused.stderr
        assert paused.stdout.strip() == 'paused'
        status = ami_ros('status')
        assert status.returncode == 0
        assert status.stdout.strip() == 'paused: agent=inactive'
        wait_for(lambda: health.get('manager', 'state') == 'paused', 5,
                 message=lambda: f"the manager's diagnostics: {health.status.get('manager')}")
        assert health.get('manager', 'checkpoints_saved') == '0'
        count = len(actions)
        time.sleep(1.5)  # frames keep coming for 1.5 s; a paused agent must not answer them
        assert len(actions) <= count + 1  # one frame may have been in flight

        saved_now = ami_ros('save')
        assert saved_now.returncode == 0, saved_now.stdout + saved_now.stderr
        # Its /diagnostics count the checkpoint and name it; a save while
        # paused leaves the graph paused.
        wait_for(lambda: health.get('manager', 'checkpoints_saved') == '1', 5,
                 message=lambda: f"the manager's diagnostics: {health.status.get('manager')}")
        assert health.get('manager', 'last_checkpoint') == saved_now.stdout.strip()
        assert health.get('manager', 'state') == 'paused' and health.level['manager'] == 0

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
        # The one saved on request stays besides the final one.
        assert Path(path) in list_checkpoints(Path(path).parent)
        wait_for(lambda: not agent.alive() and not manager.alive(), 15, message='processes exit')
        # The graph stayed paused after the final checkpoint: no step acted
        # after it (its state would have been lost).
        saved = CuriosityAgent('cpu')
        saved.load_checkpoint(path)
        last = max(decode_experience(bytes(m.data), get_preset('cpu')).step for _, m in experience)
        assert last <= saved.steps, (last, saved.steps)
        assert agent.proc.returncode == 0
        assert manager.proc.returncode == 0
    finally:
        feeder.close()


def test_a_pause_waits_for_a_node_that_is_still_being_discovered(launch, test_node):
    # The manager comes up first; a pause asked before it has discovered the
    # agent's lifecycle services waits for them (up to call_timeout) instead
    # of answering "agent: not reachable" at once, and then pauses it.
    launch('manager', parameters={'managed_nodes': ['agent'], 'call_timeout': 60.0})
    wait_for(lambda: ami_ros('status', '--timeout', '5').stdout.strip(), 30,
             message='the manager answering')
    pausing = subprocess.Popen([sys.executable, '-m', 'ami_ros.cli', 'pause', '--timeout', '90'],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Still waiting a second later (the old manager answered at once).
    with pytest.raises(subprocess.TimeoutExpired):
        pausing.wait(timeout=1.0)
    launch('agent', parameters={'preset': 'cpu'})
    out, err = pausing.communicate(timeout=90)
    assert pausing.returncode == 0 and out.strip() == 'paused', out + err
    assert ami_ros('status').stdout.strip() == 'paused: agent=inactive'


def test_status_reports_unreachable_nodes(launch):
    launch('manager', parameters={'managed_nodes': ['ghost'], 'call_timeout': 1.0})
    status = ami_ros('status')
    assert status.returncode == 1
    assert 'ghost=unreachable' in status.stdout


def test_cli_without_a_graph_says_what_to_do():
    out = ami_ros('pause', '--timeout', '1')
    assert out.returncode == 1
    assert 'no manager answers' in out.stderr and 'ami-ros launch' in out.stderr
