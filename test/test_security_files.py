"""What the graph reads and writes on the local disk (issue #28), attacked as a peer on the ROS domain.

One graph for the module, started once: an agent, a manager (at most one
checkpoint on request) and a VAE trainer whose weight folder someone
pre-created open to everyone. This process sends the requests another
process on the domain could send: weight syncs naming files, save requests
naming folders, saves on request. Every refusal must name the rule, leak
nothing of the file named, and leave the nodes running.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from rcl_interfaces.msg import Parameter as ParameterMsg
from rcl_interfaces.msg import ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from ros_harness import (
    FrameFeeder,
    NodeStatus,
    ami_ros,
    start_node,
    sync_weights,
    wait_for,
    weights_parameter,
)
from ros_harness import (
    TestNode as RosProbe,
)
from sensor_msgs.msg import Joy

from ami_ros.core.checkpoint import abort_checkpoint, begin_checkpoint
from ami_ros.core.checkpoint_store import list_checkpoints, save_refusal
from ami_ros.core.envelope import size_limit, specs_of
from ami_ros.core.models import build_models
from ami_ros.core.presets import get_preset
from ami_ros.core.private_files import PrivateFileError, private_dir, weights_root
from ami_ros.core.schemas import encode_weights
from ami_ros.ros.node_process import NodeProcess
from ami_ros.ros.weight_push import WeightFiles

PRESET = get_preset('cpu')
SECRET = b'SECRET-do-not-tell-' * 500
HOUR = 3600.0


@dataclass
class Graph:
    test: RosProbe
    procs: dict[str, NodeProcess]
    actions: list
    status: NodeStatus
    sync_root: Path  # the agent's private weights folder
    ckpt: Path  # checkpoint_dir of the agent and the manager
    outside: Path  # a folder of this user outside both
    hostile: Path  # the trainer's weights folder, pre-created open to everyone

    def keeps_acting(self) -> None:
        assert all(p.alive() for p in self.procs.values()), {n: p.output()[-2000:]
                                                              for n, p in self.procs.items()}
        count = len(self.actions)
        wait_for(lambda: len(self.actions) >= count + 5, 20, message='the agent acting afterwards')


@pytest.fixture(scope='module')
def graph(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('security')
    sync_root = weights_root(str(tmp / 'sync'))
    private_dir(sync_root)
    ckpt, outside = tmp / 'ckpt', tmp / 'outside'
    outside.mkdir()
    # A save that crashed two hours ago: the manager must remove it when it starts.
    stale = ckpt / '.2020-01-01_00-00-00.partial'
    (stale / 'models').mkdir(parents=True)
    (stale / 'models' / 'encoder.safetensors').write_bytes(b'half')
    for path in (stale / 'models' / 'encoder.safetensors', stale / 'models', stale):
        os.utime(path, (time.time() - 2 * HOUR,) * 2)
    hostile = tmp / 'hostile' / 'ami_ros_weights'
    hostile.mkdir(parents=True)
    hostile.chmod(0o777)
    logs = tmp / 'logs'
    test = RosProbe('security_probe')
    procs = {
        'agent': start_node('agent', logs, {'preset': 'cpu', 'sync_dir': str(tmp / 'sync'),
                                            'checkpoint_dir': str(ckpt)}),
        'vae_trainer': start_node('vae_trainer', logs, {
            'preset': 'cpu', 'min_new': 16, 'max_batches': 2, 'sync_retry': 0.5,
            'sync_dir': str(hostile.parent)}),
        'manager': start_node('manager', logs, {
            'managed_nodes': ['agent'], 'checkpoint_dir': str(ckpt), 'preset': 'cpu',
            'checkpoint_interval': 0.0, 'max_manual_checkpoints': 1}),
    }
    actions = test.collect(Joy, 'action')
    status = NodeStatus(test)
    frames = FrameFeeder(test)
    try:
        wait_for(lambda: len(actions) >= 5, 60, message='the agent acting')
        yield Graph(test, procs, actions, status, sync_root, ckpt, outside, hostile)
    finally:
        frames.close()
        for proc in procs.values():
            proc.stop()
        test.close()


@pytest.fixture
def nodes(graph, request):
    request.node.ami_ros_started = list(graph.procs.values())  # their logs on a failure
    return graph


def _file_param(path: str, model: str = 'policy'):
    return weights_parameter(model, value=ParameterValue(type=ParameterType.PARAMETER_STRING,
                                                          string_value=f'file://{path}'))


def _refusal(graph: Graph, path: str) -> str:
    results = sync_weights(graph.test, _file_param(path))
    assert len(results) == 1 and not results[0].successful, path
    return results[0].reason


def test_sync_weights_reads_only_regular_files_of_the_private_weights_folder(nodes):
    g = nodes
    policy = build_models(PRESET, seed=5)['policy'].state_dict()
    blob = encode_weights('policy', policy, 5, 'cpu')
    limit = size_limit(specs_of(policy))
    secret = g.outside / 'secret.txt'
    secret.write_bytes(SECRET)
    (g.outside / 'policy.safetensors').write_bytes(blob)  # good weights, in the wrong place
    trainer = g.sync_root / 'trainer-1'
    trainer.mkdir(mode=0o700)
    (trainer / 'policy-v5.safetensors').write_bytes(blob)
    (g.sync_root / 'secret-link').symlink_to(secret)
    (g.sync_root / 'outside-link').symlink_to(g.outside, target_is_directory=True)
    os.mkfifo(g.sync_root / 'pipe.safetensors')
    with open(g.sync_root / 'huge.safetensors', 'wb') as f:
        f.truncate(limit + 1)  # sparse: costs no disk
    cases = {
        'secret outside': (str(secret), 'read only from'),
        'weights outside': (str(g.outside / 'policy.safetensors'), 'read only from'),
        '/dev/zero': ('/dev/zero', 'read only from'),
        'traversal': (f'{g.sync_root}/../../outside/secret.txt', "'..'"),
        'symlink to a file': (str(g.sync_root / 'secret-link'), 'symlinks are not followed'),
        'symlinked folder': (str(g.sync_root / 'outside-link' / 'secret.txt'), 'symlinks are not followed'),
        'FIFO': (str(g.sync_root / 'pipe.safetensors'), 'regular file'),
        'oversized': (str(g.sync_root / 'huge.safetensors'), f'at most {limit} bytes'),
        'relative': ('policy.safetensors', 'absolute'),
    }
    if os.getuid() == 0:  # only root can give a file away
        foreign = trainer / 'foreign.safetensors'
        foreign.write_bytes(blob)
        os.chown(foreign, 65534, 65534)
        cases['another user'] = (str(foreign), 'belong to this user')
    reasons = {}
    for name, (path, rule) in cases.items():
        started = time.monotonic()
        reasons[name] = reason = _refusal(g, path)
        assert time.monotonic() - started < 5, f'{name}: the sync thread was held'
        assert rule in reason, (name, reason)
        for leak in ('SECRET', str(len(SECRET)), 'Errno'):
            assert leak not in reason, (name, reason)
    # Whether a file outside exists is not told either.
    assert _refusal(g, str(g.outside / 'missing.txt')) == reasons['secret outside']
    # A folder others may write to is no proof the trainer wrote the file.
    g.sync_root.chmod(0o777)
    try:
        assert 'private folder' in _refusal(g, str(trainer / 'policy-v5.safetensors'))
    finally:
        g.sync_root.chmod(0o700)
    # The same weights from the private folder are taken: the rules, not the weights, refused them.
    results = sync_weights(g.test, _file_param(str(trainer / 'policy-v5.safetensors')))
    assert [r.successful for r in results] == [True], results
    # Inline weights larger than the model needs are refused unread.
    results = sync_weights(g.test, weights_parameter('policy', blob + bytes(limit)))
    assert not results[0].successful and f'at most {limit} bytes' in results[0].reason
    g.keeps_acting()


def _save_part(graph: Graph, directory: str) -> tuple[bool, str]:
    value = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=directory)
    reply = graph.test.call(SetParameters, 'agent/save_checkpoint', SetParameters.Request(
        parameters=[ParameterMsg(name='directory', value=value)]), timeout=30)
    return reply.results[0].successful, reply.results[0].reason


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.lstat().st_mode for p in root.rglob('*')}


def test_save_checkpoint_writes_only_stages_directly_under_checkpoint_dir(nodes):
    g = nodes
    foreign = begin_checkpoint(g.outside / 'checkpoints')  # a real stage, in the wrong folder
    linked = g.ckpt / '.linked.partial'
    linked.symlink_to(foreign, target_is_directory=True)
    plain = g.ckpt / 'plain'
    plain.mkdir()
    before = _tree(g.outside)
    try:
        cases = {
            'foreign folder': (str(foreign), 'directly under'),
            'traversal': (f'{g.ckpt}/../outside/checkpoints/{foreign.name}', "'..'"),
            'symlinked stage': (str(linked), 'symlink'),
            'not a stage': (str(plain), 'staging directory'),
            'relative': (foreign.name, 'absolute'),
        }
        for name, (directory, rule) in cases.items():
            ok, reason = _save_part(g, directory)
            assert not ok and rule in reason, (name, reason)
        assert _tree(g.outside) == before, 'something was written outside checkpoint_dir'
        assert list(plain.iterdir()) == []
        # A stage the manager would make is written, owner-only.
        stage = begin_checkpoint(g.ckpt)
        ok, reason = _save_part(g, str(stage))
        assert ok, reason
        modes = _tree(stage)
        assert 'models/policy.safetensors' in modes
        for rel, mode in modes.items():
            assert stat.S_IMODE(mode) == (0o700 if stat.S_ISDIR(mode) else 0o600), (rel, oct(mode))
        abort_checkpoint(stage)
    finally:
        linked.unlink()
        plain.rmdir()
    g.keeps_acting()


def test_the_manager_saves_owner_only_caps_manual_saves_and_cleans_up(nodes):
    g = nodes
    wait_for(lambda: not any(g.ckpt.glob('.2020-*')), 30, message='the stale stage removed at start')
    for name, proc in g.procs.items():  # every node process writes with a private umask
        umask = next(line for line in Path(f'/proc/{proc.proc.pid}/status').read_text().splitlines()
                     if line.startswith('Umask:'))
        assert umask.split()[1] == '0077', (name, umask)
    saved = ami_ros('save')
    assert saved.returncode == 0, saved.stdout + saved.stderr
    path = Path(saved.stdout.strip())
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    modes = _tree(path)
    assert 'manifest.json' in modes and 'models/encoder.safetensors' in modes
    for rel, mode in modes.items():
        assert stat.S_IMODE(mode) == (0o700 if stat.S_ISDIR(mode) else 0o600), (rel, oct(mode))
    # One more on request is one too many (retention never removes them).
    refused = ami_ros('save')
    assert refused.returncode != 0
    assert 'max_manual_checkpoints 1' in refused.stdout + refused.stderr
    assert list_checkpoints(g.ckpt) == [path]
    assert not list(g.ckpt.glob('.*.partial'))
    g.keeps_acting()


def test_a_precreated_open_weights_folder_is_not_used(nodes):
    g = nodes
    trainer = g.procs['vae_trainer']
    wait_for(lambda: "weights go by 'topic' transport" in trainer.output(), 30,
             message='the trainer refusing the open folder')
    assert 'open to other users' in trainer.output()
    # The weights still reach the agent, over the payload topic.
    wait_for(lambda: g.status.number('agent', 'version_encoder') >= 1, 90, interval=0.2,
             message='trained encoder weights at the agent')
    assert list(g.hostile.iterdir()) == []  # nothing written where others could swap it
    trainer.stop()
    assert g.hostile.is_dir()  # nor removed: the trainer did not make it


def test_weight_files_are_private_and_refuse_folders_others_control(tmp_path):
    files = WeightFiles(str(tmp_path / 'mine'), 'vae_trainer-1')
    url = files.write('encoder', 3, b'blob')
    path = Path(url.removeprefix('file://'))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for folder in (path.parent, path.parent.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    files.remove()
    assert not path.parent.exists() and path.parent.parent.is_dir()
    # A trainer folder that was there already is used, but never removed.
    (tmp_path / 'mine' / 'ami_ros_weights' / 'vae_trainer-2').mkdir(mode=0o700)
    kept = WeightFiles(str(tmp_path / 'mine'), 'vae_trainer-2')
    kept.remove()
    assert kept.dir.is_dir()
    target = tmp_path / 'elsewhere'
    target.mkdir(mode=0o700)
    (tmp_path / 'link').mkdir()
    (tmp_path / 'link' / 'ami_ros_weights').symlink_to(target, target_is_directory=True)
    with pytest.raises(PrivateFileError, match='symlink'):
        WeightFiles(str(tmp_path / 'link'), 'vae_trainer-1')
    if os.getuid() == 0:
        (tmp_path / 'foreign' / 'ami_ros_weights').mkdir(parents=True, mode=0o700)
        os.chown(tmp_path / 'foreign' / 'ami_ros_weights', 65534, 65534)
        with pytest.raises(PrivateFileError, match='another user'):
            WeightFiles(str(tmp_path / 'foreign'), 'vae_trainer-1')
    assert list(target.iterdir()) == []


def test_a_save_needs_the_free_space_of_the_newest_checkpoint(tmp_path):
    assert save_refusal(tmp_path / 'ckpt', None, 0) is None
    refused = save_refusal(tmp_path / 'ckpt', None, 1 << 60)
    assert 'MiB free' in refused and 'MiB needed' in refused
