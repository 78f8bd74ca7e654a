"""Trainers on another machine (issue 27): `ami-ros trainers` in one network namespace, the acting
graph (`ami-ros launch ... train:=false network:=subnet`) in another.

The namespaces stand for two machines: a veth pair joins them, with an
address only on each end, each process tree has a /dev/shm of its own (so
neither Fast DDS's shared memory nor the trainers' weight files cross), and
each half names the other's address as its static peer. Weights must reach
the agent over that link, by the payload topic the trainers switch to once
the agent says their files are not on its machine, without holding up the
agent's steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from ros_harness import (
    NamespaceUnavailable,
    fast_trainer_params,
    free_udp_port,
    in_namespace,
    veth_namespaces,
)

ACTING, LEARNING = '10.201.{}.1', '10.201.{}.2'
TIMEOUT = 100.0
# Watches the acting namespace: the agent's and the trainers' /diagnostics, and each action's
# frame stamp -> arrival (the world, the agent and this probe share the clock) from the first
# sync on. Until every model has taken two rounds' weights and 60 actions came since the first
# sync; then one JSON line.
PROBE = '''
import json, sys, time, rclpy
from diagnostic_msgs.msg import DiagnosticArray
from sensor_msgs.msg import Joy
rclpy.init()
node = rclpy.create_node('remote_probe')
status, latency, first_sync = {}, [], [None]
def on_status(msg):
    for s in msg.status:
        status[s.name.lstrip('/')] = {kv.key: kv.value for kv in s.values}
    if first_sync[0] is None and int(status.get('agent', {}).get('syncs_ok', 0)) >= 1:
        first_sync[0] = time.monotonic()
def on_action(msg):
    sent = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
    if first_sync[0] is not None:
        latency.append((node.get_clock().now().nanoseconds - sent) / 1e6)
node.create_subscription(DiagnosticArray, '/diagnostics', on_status, 50)
node.create_subscription(Joy, 'action', on_action, 50)
deadline = time.monotonic() + float(sys.argv[1])
def done():
    agent = status.get('agent', {})
    return len(latency) >= 60 and all(int(agent.get('version_' + m, 0)) >= 2
                                      for m in ('encoder', 'dynamics', 'policy'))
while time.monotonic() < deadline and not done():
    rclpy.spin_once(node, timeout_sec=0.1)
print(json.dumps({'status': status, 'latency': latency}), flush=True)
'''


@pytest.fixture
def namespaces():
    tag = os.getpid() % 100000
    acting, learning = f'ami_acting_{tag}', f'ami_learning_{tag}'
    subnet = 1 + os.getpid() % 250
    try:
        with veth_namespaces((acting, learning), (ACTING.format(subnet), LEARNING.format(subnet))):
            yield acting, learning, subnet
    except NamespaceUnavailable as exc:
        pytest.skip(f'cannot create network namespaces (needs root or CAP_NET_ADMIN): {exc}')


def _rx_bytes(namespace: str) -> int:
    """Bytes received on the namespace's veth end (not its loopback)."""
    links = json.loads(subprocess.run(['ip', '-n', namespace, '-s', '-j', 'link', 'show'],
                                      capture_output=True, text=True, check=True).stdout)
    return sum(link['stats64']['rx']['bytes'] for link in links if link['ifname'] != 'lo')


def test_trainers_in_another_network_namespace_push_weights_over_ip(namespaces, tmp_path):
    acting, learning, subnet = namespaces
    params = fast_trainer_params(tmp_path / 'params.yaml')
    cli = [sys.executable, '-m', 'ami_ros.cli']
    base = {**os.environ, 'ROS_AUTOMATIC_DISCOVERY_RANGE': 'SUBNET'}
    graph_env = {**base, 'ROS_STATIC_PEERS': LEARNING.format(subnet)}
    shm = {acting: tmp_path / 'acting_shm', learning: tmp_path / 'learning_shm'}
    for folder in shm.values():
        folder.mkdir()
        folder.chmod(0o1777)
    procs = []
    try:
        for name, namespace, env, argv in (
                ('graph', acting, graph_env,
                 ['launch', 'world:=doom', 'preset:=cpu', 'train:=false', 'network:=subnet', 'record:=false',
                  'web_api_port:=0', f'vrchat_port:={free_udp_port()}', f'params_file:={params}']),
                ('trainers', learning, {**base, 'ROS_STATIC_PEERS': ACTING.format(subnet)},
                 ['trainers', 'preset:=cpu', f'params_file:={params}'])):
            log = open(tmp_path / f'{name}.log', 'wb')  # noqa: SIM115 - closed with the process
            command = in_namespace(namespace, [*cli, *argv], shm[namespace])
            procs.append((subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log,
                                           stderr=subprocess.STDOUT), log))
        probe = subprocess.run(in_namespace(acting, [sys.executable, '-c', PROBE, str(TIMEOUT)], shm[acting]),
                               capture_output=True, text=True, env=graph_env, timeout=TIMEOUT + 30)
        assert probe.returncode == 0, probe.stderr[-3000:]
        seen = json.loads(probe.stdout.strip().splitlines()[-1])
        logs = {name: (tmp_path / f'{name}.log').read_text(errors='replace')[-3000:]
                for name in ('graph', 'trainers')}
        agent = seen['status'].get('agent', {})
        versions = {m: int(agent.get(f'version_{m}', 0))
                    for m in ('encoder', 'decoder', 'dynamics', 'policy')}
        assert min(versions.values()) >= 2, (versions, logs)
        assert int(agent['syncs_refused']) <= 3, agent  # the first file:// tries, one per trainer
        # Each trainer found out that its files are not on the agent's machine, and sends by topic.
        for trainer in ('vae_trainer', 'dynamics_trainer', 'policy_trainer'):
            assert seen['status'][trainer]['sync_transport'] == 'topic', seen['status'][trainer]
            assert seen['status'][trainer]['pacing'] == 'off'
        assert "cannot read this machine's weight files" in logs['trainers']
        # The weights came over the veth: at least a whole cpu set (1.8 MB) arrived on it.
        assert _rx_bytes(acting) > 1_800_000
        # No step waited for a transfer (inline bytes held steps for 0.1-0.3 s per cpu set);
        # the trainers share this machine's two cores, unpaced, hence the margin.
        latency = sorted(seen['latency'])
        assert len(latency) >= 60 and latency[-1] < 150, latency[-10:]
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.send_signal(2)
        for proc, log in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
    assert [proc.returncode for proc, _ in procs] == [0, 0], logs


class _Subscriber:
    """Stands in for the agent's payload node: keeps the chunk callback."""

    def create_subscription(self, _type, _topic, callback, _qos):
        self.deliver = callback


def _receiver(max_bytes: int = 4 << 20):
    from ami_ros.ros.pacing import StepGap
    from ami_ros.ros.weight_payload import PayloadReceiver

    node = _Subscriber()
    return PayloadReceiver(node, 'agent/sync_weights', StepGap(), max_bytes), node.deliver


def _chunks(blob: bytes, label: str | None = None, size: int | None = None):
    """The messages PayloadSender publishes for `blob` (its label and size may be overridden)."""
    from ami_ros.ros.weight_payload import PayloadSender

    sent = []
    sender = PayloadSender.__new__(PayloadSender)
    sender.publisher = type('Publisher', (), {'publish': staticmethod(sent.append)})()
    name = sender.send(blob)
    for msg in sent:
        msg.layout.dim[0].label = label or msg.layout.dim[0].label
        msg.layout.dim[0].size = size or msg.layout.dim[0].size
    return name, sent


def test_payloads_are_assembled_checked_and_refused_with_a_reason():
    from ami_ros.ros.weight_payload import CHUNK_BYTES, PayloadError

    blob = os.urandom(2 * CHUNK_BYTES + 12345)
    receiver, deliver = _receiver()
    name, chunks = _chunks(blob)
    assert len(chunks) == 3
    for msg in reversed(chunks):  # in any order
        deliver(msg)
    assert bytes(receiver.take(name, len(blob), timeout=0.1)) == blob
    # Taken once: a retry sends it again.
    with pytest.raises(PayloadError, match='not received within'):
        receiver.take(name, len(blob), timeout=0.05)
    # Half of one: not whole, named with what came.
    deliver(chunks[0])
    with pytest.raises(PayloadError, match=f'{CHUNK_BYTES} of {len(blob)} bytes'):
        receiver.take(name, len(blob), timeout=0.05)
    # Larger than the model it is for; content that does not match its name.
    for msg in chunks[1:]:
        deliver(msg)
    with pytest.raises(PayloadError, match='at most 1000 expected'):
        receiver.take(name, 1000, timeout=0.05)
    forged_name, forged = _chunks(bytes(len(blob)), label=name.removeprefix('sha256:'))
    for msg in forged:
        deliver(msg)
    with pytest.raises(PayloadError, match='does not match its sha256'):
        receiver.take(name, len(blob), timeout=0.05)
    with pytest.raises(PayloadError, match="looks like 'sha256:"):
        receiver.take('sha256:../../etc', len(blob), timeout=0.05)
    # Dropped unread: larger than any weights, a chunk outside its payload, no label.
    small, deliver_small = _receiver(max_bytes=CHUNK_BYTES)
    for msg, reason in ((chunks[0], f'a {len(blob)}-byte payload, larger than any weights'),
                        (_chunks(blob, size=10)[1][0], f'a chunk at 0+{CHUNK_BYTES} outside its 10-byte'),
                        (_chunks(blob, label='x')[1][0], 'a chunk without a sha256 label')):
        deliver_small(msg)
        assert small.last_drop.startswith(reason)
    assert small.dropped == 3


def test_the_learning_half_is_the_three_trainers_unpaced_and_the_acting_half_records_them():
    from ros_harness import ami_ros

    from ami_ros.graph import TRAINERS, describe

    specs = describe({'preset': 'cpu', 'trainer_device': 'cuda'}, part='trainers')
    assert [s.name for s in specs] == list(TRAINERS)
    assert all(s.parameters['pacing'] == 'off' and s.parameters['device'] == 'cuda' for s in specs)
    acting = {s.name: s for s in describe({'train': 'false'})}
    assert not set(TRAINERS) & set(acting) and set(TRAINERS) <= set(acting['recorder'].parameters['nodes'])
    refused = ami_ros('trainers', 'world:=doom')
    assert refused.returncode == 2 and 'world not for the trainers alone' in refused.stderr
