"""The whole acting graph through `ami-ros launch`: camera -> agent -> osc_bridge -> OSC.

VRChat cannot run here: a python-osc server on 127.0.0.1 stands in for it and
records what arrives. OBS cannot either: the camera reads a video file the
test generates.
"""

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from pythonosc.dispatcher import Dispatcher
from pythonosc.osc_server import BlockingOSCUDPServer
from ros_harness import ami_ros, start_graph, stop_graph, wait_for

AXES = {'/input/Vertical', '/input/Horizontal', '/input/LookHorizontal'}
BUTTONS = {'/input/Jump', '/input/Run'}


class FakeVRChat:
    """Records (time, address, args) of every OSC message, as VRChat would receive them.

    One thread takes the datagrams in the order they arrive, so `messages` is in arrival order.
    """

    def __init__(self):
        self.messages = []
        self.lock = threading.Lock()
        dispatcher = Dispatcher()
        dispatcher.set_default_handler(self._on_message)
        self.server = BlockingOSCUDPServer(('127.0.0.1', 0), dispatcher)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _on_message(self, address, *args):
        with self.lock:
            self.messages.append((time.monotonic(), address, args))

    def since(self, t0):
        with self.lock:
            return [m for m in self.messages if m[0] >= t0]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _video(path, frames=40):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'MJPG'), 10, (160, 120))
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8))
    writer.release()
    return path


def _ends_released(messages):
    """True when the last messages are a full release, one each: 3 axes 0.0 (floats) and
    2 buttons 0 (ints), with nothing after them."""
    tail = messages[-len(AXES | BUTTONS):]
    values = {address: args for _, address, args in tail}
    return (len(tail) == len(values) == len(AXES | BUTTONS)
            and all(values.get(a) == (0.0,) and type(values[a][0]) is float for a in AXES)
            and all(values.get(b) == (0,) and type(values[b][0]) is int for b in BUTTONS))


@pytest.fixture
def vrchat():
    server = FakeVRChat()
    yield server
    server.close()


@pytest.fixture
def graph(tmp_path, vrchat):
    video = _video(tmp_path / 'obs.avi')
    # The launch's parameters, but an agent that holds nothing (persistence 0):
    # its random policy changes several inputs every step, so the OSC stream,
    # which carries only changes, shows the rate of acting.
    params = yaml.safe_load((Path(__file__).parent.parent / 'config' / 'ami.yaml').read_text())
    params['/**/agent']['ros__parameters']['persistence'] = 0.0
    params_file = tmp_path / 'params.yaml'
    params_file.write_text(yaml.safe_dump(params))
    proc = start_graph(tmp_path, 'world:=vrchat', f'camera_source:={video}', f'vrchat_port:={vrchat.port}',
                       'preset:=cpu', f'params_file:={params_file}')
    yield proc
    stop_graph(proc)


def _declared_parameters(test_node, node_name):
    from rcl_interfaces.srv import ListParameters

    # Trainers run at SCHED_IDLE: on a busy 2-core machine their parameter
    # services answer only when a core is free (one CI run took over 10 s).
    return set(test_node.call(ListParameters, f'{node_name}/list_parameters',
                              timeout=30.0).result.names)


def test_full_chain_pause_resume_shutdown(graph, vrchat, test_node):
    # Actions reach VRChat as well-typed OSC at about the camera's 10 Hz.
    wait_for(lambda: len(vrchat.messages) > 20, 60, message='OSC from the graph')
    # Every parameter config/ami.yaml sets is one its node declares (a typo
    # there would be silently ignored by ROS).
    params = yaml.safe_load((Path(__file__).parent.parent / 'config' / 'ami.yaml').read_text())
    for node_name in ('camera', 'agent', 'osc_bridge', 'vae_trainer', 'dynamics_trainer',
                      'policy_trainer', 'recorder', 'manager'):
        declared = _declared_parameters(test_node, node_name)
        missing = set(params[f'/**/{node_name}']['ros__parameters']) - declared
        assert not missing, f'{node_name} does not declare {missing}'
    t0 = time.monotonic()
    time.sleep(3.0)  # observe three seconds of steady acting
    window = vrchat.since(t0)
    addresses = {a for _, a, _ in vrchat.messages}
    assert addresses <= AXES | BUTTONS, addresses - (AXES | BUTTONS)
    for _, address, args in vrchat.messages:
        assert len(args) == 1
        if address in AXES:
            assert type(args[0]) is float and args[0] in (-1.0, 0.0, 1.0)
        else:
            assert type(args[0]) is int and args[0] in (0, 1)
    # The bridge sends only changes; a random policy changes several inputs per
    # step, so at 10 Hz several messages arrive every 100 ms.
    per_second = len(window) / 3.0
    assert per_second > 10, per_second
    # Distinct 100 ms slots with traffic: about 10 per second.
    slots = {int((t - t0) * 10) for t, _, _ in window}
    assert len(slots) >= 20, len(slots)

    # The release must come after the pause was asked for, and be the last
    # thing VRChat hears: timed from before the request, since the bridge may
    # release before the command returns.
    t_pause = time.monotonic()
    paused = ami_ros('pause')
    assert paused.returncode == 0, paused.stdout + paused.stderr
    wait_for(lambda: _ends_released(vrchat.since(t_pause)), 5, message='release on pause')
    time.sleep(0.5)  # let any in-flight message land before counting silence
    quiet_from = time.monotonic()
    time.sleep(2.0)  # two seconds of pause: nothing may arrive
    assert vrchat.since(quiet_from) == []
    assert _ends_released(vrchat.since(t_pause))
    assert ami_ros('status').stdout.startswith('paused:')

    assert ami_ros('resume').returncode == 0
    t_resume = time.monotonic()
    wait_for(lambda: len(vrchat.since(t_resume)) > 10, 15, message='OSC after resume')

    t_down = time.monotonic()
    done = ami_ros('shutdown')
    assert done.returncode == 0, done.stdout + done.stderr
    assert graph.wait(30) == 0, graph.log_path.read_text()
    assert _ends_released(vrchat.since(t_down))
    out = graph.log_path.read_text()
    assert '[launch] all nodes stopped cleanly' in out


def test_sigint_stops_every_node_with_inputs_released(graph, vrchat):
    wait_for(lambda: len(vrchat.messages) > 10, 60, message='OSC from the graph')
    t_stop = time.monotonic()
    graph.send_signal(signal.SIGINT)
    assert graph.wait(30) == 0, graph.log_path.read_text()
    assert _ends_released(vrchat.since(t_stop))
    # Every node process is gone: no manager answers any more.
    out = ami_ros('status', '--timeout', '2')
    assert out.returncode == 1


def test_a_node_that_dies_makes_the_launcher_fail(tmp_path, vrchat):
    # A camera parameter outside its range makes the camera exit at start.
    params = tmp_path / 'bad.yaml'
    params.write_text('/**/camera:\n  ros__parameters:\n    fps: 1000.0\n')
    proc = subprocess.run(
        [sys.executable, '-m', 'ami_ros.cli', 'launch', 'world:=vrchat', f'params_file:={params}',
         f'vrchat_port:={vrchat.port}', 'duration:=20', 'respawn:=false'],  # test_supervision: respawn
        capture_output=True, text=True, timeout=90, cwd=tmp_path)
    assert proc.returncode == 1
    assert '[launch] camera died with exit code' in proc.stdout
