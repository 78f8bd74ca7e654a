"""osc_bridge as a real process: Joy over DDS in, OSC over UDP out.

VRChat cannot run here; a python-osc server on a free local port stands in
for it and records every message with the Python types python-osc decoded
(OSC float -> float, int -> int, bool -> bool), so an int sent as a bool
would show.
"""

from __future__ import annotations

import math
import signal
import threading
import time

import pytest
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState
from pythonosc.dispatcher import Dispatcher
from pythonosc.osc_server import BlockingOSCUDPServer
from ros_harness import NodeStatus, wait_for
from sensor_msgs.msg import Joy

from ami_ros.nodes.osc_bridge import joy_problem

# docs/reference.md's VRChat input addresses: nothing else may ever arrive.
VRCHAT_INPUTS = {f'/input/{n}' for n in (
    'Vertical', 'Horizontal', 'LookHorizontal', 'MoveForward', 'MoveBackward', 'MoveLeft',
    'MoveRight', 'LookLeft', 'LookRight', 'Jump', 'Run')}
RELEASE = {('/input/Vertical', 0.0, float), ('/input/Horizontal', 0.0, float),
           ('/input/LookHorizontal', 0.0, float), ('/input/Jump', 0, int), ('/input/Run', 0, int)}


class OscRecorder:
    """A stand-in VRChat: records (time, address, value, type) of every message."""

    def __init__(self) -> None:
        self.records: list[tuple[float, str, object, type]] = []
        self._lock = threading.Lock()
        dispatcher = Dispatcher()
        dispatcher.set_default_handler(self._on_message)
        # Blocking (one handler thread), not Threading: a thread per datagram
        # could record them out of order, and the checks below rely on order.
        self.server = BlockingOSCUDPServer(('127.0.0.1', 0), dispatcher)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _on_message(self, address: str, *args: object) -> None:
        assert len(args) == 1, (address, args)
        with self._lock:
            self.records.append((time.monotonic(), address, args[0], type(args[0])))

    def since(self, index: int) -> list[tuple[float, str, object, type]]:
        with self._lock:
            return self.records[index:]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def vrchat():
    recorder = OscRecorder()
    yield recorder
    recorder.close()
    strangers = {r[1] for r in recorder.records} - VRCHAT_INPUTS
    assert not strangers, f'addresses VRChat does not know: {strangers}'


def expect(rec: OscRecorder, start: int, expected: list[tuple[str, float | int, type]]) -> int:
    """Wait for exactly `expected` right after `start`; the index after them."""
    wait_for(lambda: len(rec.since(start)) >= len(expected), 10, message=f'OSC {expected}')
    got = [(a, v, t) for _, a, v, t in rec.since(start)[:len(expected)]]
    assert [(a, t) for a, _, t in got] == [(a, t) for a, _, t in expected], got
    for (_, value, _), (_, want, _) in zip(got, expected, strict=True):
        assert value == pytest.approx(want, abs=1e-6), got
    return start + len(expected)


def expect_release(rec: OscRecorder, start: int) -> int:
    """Wait for a release-all (5 messages, any order) right after `start`."""
    wait_for(lambda: len(rec.since(start)) >= 5, 10, message='release of every input')
    got = {(a, v, t) for _, a, v, t in rec.since(start)[:5]}
    assert got == RELEASE, got
    return start + 5


def joy(axes: list[float], buttons: list[int]) -> Joy:
    return Joy(axes=[float(a) for a in axes], buttons=buttons)


def action_publisher(test_node):
    pub = test_node.node.create_publisher(Joy, 'action', 10)
    wait_for(lambda: pub.get_subscription_count() > 0, 10, message='osc_bridge subscribing action')
    return pub


def change_state(test_node, transition: int) -> None:
    req = ChangeState.Request()
    req.transition.id = transition
    assert test_node.call(ChangeState, 'osc_bridge/change_state', req).success


def test_actions_pause_resume_and_sigterm(launch, test_node, vrchat):
    # release_after is long here so no idle release falls between the steps.
    proc = launch('osc_bridge', parameters={
        'port': vrchat.port, 'velocity': [0.5, 1.0, 1.0], 'release_after': 10.0})
    i = expect_release(vrchat, 0)  # at start, before any action
    pub = action_publisher(test_node)

    pub.publish(joy([1, 0, 0], [0, 0]))  # only Vertical changed, scaled by velocity 0.5
    i = expect(vrchat, i, [('/input/Vertical', 0.5, float)])
    pub.publish(joy([1, 0, 0], [0, 0]))  # unchanged: nothing may be sent ...
    pub.publish(joy([1, -1, 0], [1, 0]))  # ... so these two come next
    i = expect(vrchat, i, [('/input/Horizontal', -1.0, float), ('/input/Jump', 1, int)])
    pub.publish(joy([-0.4, -1, 0.5], [1, 1]))  # a gamepad's in-between values
    i = expect(vrchat, i, [('/input/Vertical', -0.2, float), ('/input/LookHorizontal', 0.5, float),
                           ('/input/Run', 1, int)])

    change_state(test_node, Transition.TRANSITION_DEACTIVATE)  # pause
    i = expect_release(vrchat, i)
    pub.publish(joy([1, 1, 1], [1, 1]))
    # Observing absence needs a wait: give the ignored action time to have
    # gone out if the bridge wrongly sent it while inactive.
    time.sleep(0.5)
    assert vrchat.since(i) == []

    change_state(test_node, Transition.TRANSITION_ACTIVATE)  # resume
    i = expect_release(vrchat, i)
    pub.publish(joy([1, 0, 0], [0, 1]))  # values are sent again after a release
    i = expect(vrchat, i, [('/input/Vertical', 0.5, float), ('/input/Run', 1, int)])

    code = proc.stop(signal.SIGTERM)
    log = proc.log_path.read_text()  # stop() closed the log, so not proc.output()
    assert code == 0, log
    expect_release(vrchat, i)
    assert 'Traceback' not in log


def test_bad_actions_idle_release_and_lifecycle_shutdown(launch, test_node, vrchat):
    status = NodeStatus(test_node)
    proc = launch('osc_bridge', parameters={'port': vrchat.port, 'release_after': 0.5})
    i = expect_release(vrchat, 0)
    pub = action_publisher(test_node)
    for bad in (joy([1, 0], [0, 0]), joy([1, 0, 0], [0]), joy([1.5, 0, 0], [0, 0]),
                joy([0, 0, 0], [2, 0]), joy([math.nan, 0, 0], [0, 0])):
        pub.publish(bad)
    # The bad ones came first on the same topic: only this one may arrive.
    pub.publish(joy([0, 1, 0], [0, 0]))
    i = expect(vrchat, i, [('/input/Horizontal', 1.0, float)])
    sent_at = vrchat.records[i - 1][0]
    # One warning per kind of fault (each throttled on its own).
    for reason in ('expected 3 axes', 'axis Vertical = 1.5', 'button Jump = 2'):
        wait_for(lambda r=reason: f'ignored action: {r}' in proc.output(), 10,
                 message=f'warning "{reason}"')

    i = expect_release(vrchat, i)  # no more actions: released after release_after
    idle = vrchat.records[i - 1][0] - sent_at
    assert 0.45 <= idle <= 2.0, idle
    assert proc.alive()
    # Its /diagnostics count what happened: one action taken, five ignored,
    # every datagram the server got, the release at start and the idle one.
    wait_for(lambda: (status.get('osc_bridge', 'actions'), status.get('osc_bridge', 'ignored_actions'),
                      status.get('osc_bridge', 'osc_messages'), status.get('osc_bridge', 'releases'))
             == ('1', '5', str(i), '2'), 5,
             message=lambda: f'the counts in the diagnostics: {status.status.get("osc_bridge")}')
    assert status.get('osc_bridge', 'send_errors') == '0'
    assert status.get('osc_bridge', 'target') == f'127.0.0.1:{vrchat.port}'

    change_state(test_node, Transition.TRANSITION_ACTIVE_SHUTDOWN)  # as the manager stops the graph
    i = expect_release(vrchat, i)
    assert proc.proc.wait(10) == 0
    # Observing absence needs a wait: let the recorder take any datagram
    # still queued; the exit must not release a second time.
    time.sleep(0.2)
    assert vrchat.since(i) == []


@pytest.mark.parametrize('axes, buttons, problem', [
    ([1, 0], [0, 0], 'expected 3 axes'),
    ([1, 0, 0], [0, 0, 0], 'got 3 axes and 3 buttons'),
    ([0, 1.5, 0], [0, 0], 'axis Horizontal = 1.5'),
    ([0, 0, -2], [0, 0], 'axis LookHorizontal = -2'),
    ([math.nan, 0, 0], [0, 0], 'axis Vertical = nan'),
    ([0, 0, 0], [0, -1], 'button Run = -1'),
])
def test_joy_problem_names_the_fault(axes, buttons, problem):
    # The node throttles its warnings, so each fault's wording is checked here.
    assert problem in joy_problem(joy(axes, buttons))[1]


def test_valid_joy_has_no_problem():
    assert joy_problem(joy([-1, 0, 1], [1, 0])) is None
