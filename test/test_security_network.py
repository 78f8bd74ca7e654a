"""What a peer on the network can do to a running graph (issue #28, the network half).

Every attack comes from another process, as a peer on the ROS domain would
send it: this test process, or a probe in a network namespace of its own,
which stands for another machine (its own addresses and its own /dev/shm).
The graph under attack runs through `ami-ros launch` with the defaults and a
shell environment that widens discovery and names static peers, which the
launcher must override.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped
from pythonosc.osc_bundle_builder import OscBundleBuilder
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.udp_client import SimpleUDPClient
from rclpy.qos import DurabilityPolicy, QoSProfile
from ros_harness import (
    NamespaceUnavailable,
    NodeStatus,
    free_udp_port,
    in_namespace,
    start_graph,
    stop_graph,
    veth_namespaces,
    wait_for,
)
from sensor_msgs.msg import Image, Joy
from std_msgs.msg import String, UInt8MultiArray

from ami_ros.launcher import StatusPrinter

START_TIMEOUT = 90.0  # six node processes importing torch on two cores
HOST, PEER = '10.200.{}.1', '10.200.{}.2'  # the veth ends, a /30 of their own
# The user's shell as a careless profile leaves it: discovery across the subnet, a static peer.
WIDE_OPEN = {'ROS_AUTOMATIC_DISCOVERY_RANGE': 'SUBNET'}

PROBE = '''
import json, sys, time, rclpy
rclpy.init()
node = rclpy.create_node('netns_probe')
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline and sys.argv[1] not in dict(node.get_topic_names_and_types()):
    rclpy.spin_once(node, timeout_sec=0.2)
print(json.dumps(sorted(dict(node.get_topic_names_and_types()))), flush=True)
'''


@pytest.fixture(scope='module')
def graph(tmp_path_factory):
    """The default graph (world doom, recorder on) under a shell that asks for the subnet."""
    cwd = tmp_path_factory.mktemp('graph')
    tracking = f'sqlite:///{cwd}/mlflow.db'
    proc = start_graph(cwd, 'world:=doom', 'preset:=cpu', 'train:=false', f'vrchat_port:={free_udp_port()}',
                       env={**WIDE_OPEN, 'ROS_STATIC_PEERS': PEER.format(_subnet()),
                            'MLFLOW_TRACKING_URI': tracking})
    proc.tracking_uri = tracking
    yield proc
    stop_graph(proc)


def _subnet() -> int:
    return 1 + os.getpid() % 250  # parallel runs take different /30s


def _status(name: str, **values: str) -> DiagnosticStatus:
    return DiagnosticStatus(name=name, values=[KeyValue(key=k, value=v) for k, v in values.items()])


def _log(proc) -> str:
    return proc.log_path.read_text(errors='replace')


def _probe(namespace: str, topic: str, seconds: float) -> list[str]:
    """The topics a node in `namespace` discovers within `seconds` (stops early on `topic`).

    It asks across its subnet and names the host's veth end as a static peer,
    with a /dev/shm of its own, as another machine would."""
    env = {**os.environ, 'ROS_AUTOMATIC_DISCOVERY_RANGE': 'SUBNET',
           'ROS_STATIC_PEERS': HOST.format(_subnet())}
    done = subprocess.run(in_namespace(namespace, [sys.executable, '-c', PROBE, topic, str(seconds)]),
                          capture_output=True, text=True, env=env, timeout=seconds + 30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def peer_namespace():
    """A network namespace joined to this one by a veth pair, with addresses only on the ends."""
    namespace = f'ami_peer_{os.getpid()}'
    try:
        with veth_namespaces((None, namespace), (HOST.format(_subnet()), PEER.format(_subnet()))):
            yield namespace
    except NamespaceUnavailable as exc:
        pytest.skip(f'cannot create a network namespace (needs root or CAP_NET_ADMIN): {exc}')


def test_without_the_opt_in_another_network_namespace_cannot_reach_the_graph(
        graph, peer_namespace, tmp_path, test_node):
    health = NodeStatus(test_node)
    wait_for(lambda: health.get('agent', 'steps'), START_TIMEOUT, message='the default graph running')
    # The graph runs, this machine sees it; the namespace, although named as a static peer, does not.
    seen = _probe(peer_namespace, '/action', 8.0)
    assert '/action' not in seen and not [t for t in seen if t.startswith('/camera')], seen
    # With the opt-in (a namespace of its own, the default graph runs on) it must: the probe works.
    opened = start_graph(tmp_path, 'world:=doom', 'preset:=cpu', 'train:=false', 'record:=false',
                         'namespace:=open', 'network:=subnet', f'vrchat_port:={free_udp_port()}')
    try:
        wait_for(lambda: health.get('open/agent', 'steps'), START_TIMEOUT, message='the opened graph')
        seen = _probe(peer_namespace, '/open/action', 20.0)
        assert '/open/action' in seen, seen
    finally:
        stop_graph(opened)
    assert opened.returncode == 0, _log(opened)[-3000:]


def test_a_running_graph_refuses_what_peers_send_and_runs_on(graph, launch, test_node):
    node = test_node.node
    health = NodeStatus(test_node)
    actions = test_node.collect(Joy, 'action')
    # A trainer of its own, in a namespace of its own: the graph runs without trainers.
    trainer = launch('dynamics_trainer', namespace='lab', parameters={'preset': 'cpu'})
    wait_for(lambda: len(actions) > 5 and health.get('recorder', 'recording') == 'True'
             and health.get('lab/dynamics_trainer', 'received'), START_TIMEOUT,
             message=lambda: f'the graph acting and recording:\n{_log(graph)[-3000:]}')
    port = int(health.get('doom_world', 'osc_input').rsplit(':', 1)[1])
    before = {(node_name, key): health.number(node_name, key) for node_name, key in (
        ('recorder', 'metrics_logged'), ('doom_world', 'osc_messages'), ('doom_world', 'steps'),
        ('agent', 'steps'))}
    attacked = time.time()

    # The recorder: a pose at 1e30, names MLflow refuses, a node not of this graph, steps at 1e30.
    pose = PoseStamped()
    pose.pose.position.x = pose.pose.position.y = 1e30
    node.create_publisher(PoseStamped, 'world/pose', 10).publish(pose)
    node.create_publisher(DiagnosticArray, '/diagnostics', 10).publish(DiagnosticArray(status=[
        _status('/agent', **{'..': '1.0', 'x' * 300: '2.0'}), _status('/intruder', loss='0.5'),
        _status('/agent', steps='1e30')]))
    # The agent: a 100000x100000 header with 10 bytes of data (again and again below: the
    # agent takes the newest frame only, and the world's own frames come at 10 Hz).
    image = Image(height=100_000, width=100_000, encoding='rgb8', step=300_000, data=bytes(10))
    images = node.create_publisher(Image, 'camera/image_raw', 10)
    # A trainer: 10 MB of experience, for a step of some 24 kB.
    node.create_publisher(UInt8MultiArray, 'lab/experience', 10).publish(
        UInt8MultiArray(data=bytes(10_000_000)))
    # doom_world: an OSC bundle timed an hour ahead, then a plain message.
    bundle = OscBundleBuilder(time.time() + 3600)
    jump = OscMessageBuilder('/input/Jump')
    jump.add_arg(1)
    bundle.add_content(jump.build())
    osc = SimpleUDPClient('127.0.0.1', port)
    osc.send(bundle.build())
    osc.send_message('/input/Run', 0)
    # The launcher's status line: a state with escape codes and a carriage return.
    node.create_publisher(String, 'ami/state', QoSProfile(
        depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)).publish(String(data='\x1b[2J\x1b[31mPWNED\r'))

    def grown(node_name: str, key: str, by: float = 1) -> bool:
        return health.number(node_name, key) >= before[node_name, key] + by

    wait_for(lambda: health.number('recorder', 'refused') >= 5, 15,
             message=lambda: f'5 refusals: {health.status.get("recorder")}')
    wait_for(lambda: images.publish(image) or health.number('agent', 'dropped_frames') >= 1, 15,
             interval=0.1, message='the frame dropped')
    wait_for(lambda: health.number('lab/dynamics_trainer', 'undecodable') >= 1, 15,
             message='the experience refused')
    # Every node goes on: the world steps and takes OSC, the agent acts, the recorder records.
    wait_for(lambda: grown('doom_world', 'osc_messages', 2) and grown('doom_world', 'steps', 20)
             and grown('agent', 'steps', 20) and grown('recorder', 'metrics_logged', 20), 20,
             message=lambda: f'the graph going on: {health.status}')
    wait_for(lambda: '[status] PWNED' in _log(graph), 15, message='a status line with the state')
    assert trainer.alive(), trainer.output()
    assert 'larger than a cpu step can be' in trainer.output()
    stop_graph(graph)
    log = _log(graph)
    assert graph.returncode == 0, log[-3000:]
    # One line per kind of refusal (the second bad name of the status is counted, not logged).
    for line in ('ignoring pose (1e+30, 1e+30) is outside the map', "metric name 'agent/..' is a path",
                 "status of 'intruder', not a node of this graph", 'ignoring steps 1e+30',
                 'dropping frame: oversized frame 100000x100000'):
        assert line in log, line
    assert '\x1b[2J' not in log and not [line for line in log.split('\n') if 'PWNED' in line and '\r' in line]

    from mlflow import MlflowClient

    client = MlflowClient(graph.tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name('ami_ros').experiment_id])
    assert run.info.status == 'FINISHED'
    assert not [key for key in run.data.metrics if key.startswith('intruder') or '..' in key]
    later = [m for m in client.get_metric_history(run.info.run_id, 'agent/steps')
             if m.timestamp > attacked * 1000 + 2000]
    assert later and all(m.value < 1e9 for m in later)  # recorded on, with the agent's own steps


def test_the_launcher_prints_node_output_without_control_characters():
    for tty in (False, True):
        stream = io.StringIO()
        stream.isatty = lambda tty=tty: tty
        printer = StatusPrinter(stream)
        printer.line('[agent] \x1b]0;owned\x07\x1b[2J\x1b[1;31mred\x1b[0m\rover\x08\x07 \u202egnp.exe\ttab')
        text = stream.getvalue()
        assert text.endswith('[agent] redover gnp.exe tab\n'), repr(text)


def test_the_exploration_map_picture_stays_bounded_at_the_map_edges():
    from ami_ros.record.pictures import ExplorationMap

    world = ExplorationMap(cell_size=1)  # the finest grid, corners of a Doom map: 65536 cells a side
    for x, y in ((-32768, -32768), (32767, 32767), (0, 0)):
        world.visit(x, y)
    height, width, _ = world.render(max_size=512).shape
    assert max(height, width) <= 2 * 512 + 8 and world.cells_visited == 3
