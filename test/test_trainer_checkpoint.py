"""The trainer nodes' part of a checkpoint: saved on request, restored at start.

The test acts as the manager: it pauses real trainer processes, asks them
for their parts, commits the checkpoint, and starts new processes from it.
The cpu preset, short rounds (min_new 16, max_batches 4). Restore problems and
the fallback to the agent's weights are checked on nodes in this process.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import rclpy
import torch
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState
from rcl_interfaces.msg import Parameter as ParameterMsg
from rcl_interfaces.msg import ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from rclpy.parameter import Parameter
from ros_harness import FrameFeeder, NodeStatus, start_node, wait_for

from ami_ros.core.checkpoint import (
    CheckpointError,
    begin_checkpoint,
    commit_checkpoint,
    read_json,
    read_tensors,
    write_tensors,
)
from ami_ros.core.models import build_models
from ami_ros.core.presets import get_preset
from ami_ros.core.schemas import weights_schema
from ami_ros.core.trainers import DynamicsTrainer, VAETrainer

PRESET = get_preset('cpu')
FRAME_HZ = 15.0
FAST = {'preset': 'cpu', 'min_new': 16, 'max_batches': 4, 'sync_retry': 0.5}
TRAINERS = ('dynamics_trainer', 'vae_trainer')
FILES = ('trainers/{}/state.safetensors', 'trainers/{}/state.json',
         'data/{}/buffer.safetensors', 'data/{}/buffer.json')


def _transition(test_node, node: str, transition: int) -> None:
    reply = test_node.call(ChangeState, f'{node}/change_state',
                           ChangeState.Request(transition=Transition(id=transition)))
    assert reply.success, f'{node}: transition {transition} refused'


def _save(test_node, node: str, stage: Path) -> None:
    value = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=str(stage))
    reply = test_node.call(SetParameters, f'{node}/save_checkpoint',
                           SetParameters.Request(parameters=[ParameterMsg(name='directory', value=value)]),
                           timeout=60.0)
    assert len(reply.results) == 1
    assert reply.results[0].successful, reply.results[0].reason


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().numpy().tobytes()


def _assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert set(got) == set(want), what
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, f'{what}: {name}'
        assert _bits(got[name]) == _bits(t), f'{what}: {name} differs'


def _assert_same_part(a: Path, b: Path, node: str) -> None:
    """Two checkpoints hold the same part of `node`, bit for bit."""
    for pattern in FILES:
        rel = pattern.format(node)
        if rel.endswith('.json'):
            assert read_json(a, rel) == read_json(b, rel), rel
        else:
            env_a, env_b = read_tensors(a, rel, None), read_tensors(b, rel, None)
            assert env_a.schema == env_b.schema and env_a.metadata == env_b.metadata, rel
            _assert_same_tensors(env_b.tensors, env_a.tensors, rel)


def _core_trainer(node: str):
    models = build_models(PRESET, seed=0)
    if node == 'vae_trainer':
        return VAETrainer(models['encoder'], models['decoder'], PRESET.vae_training, max_batches=4)
    return DynamicsTrainer(models['dynamics'], PRESET.dynamics_training, max_batches=4)


def _assert_core_round_trip(ckpt: Path, node: str) -> None:
    """ROS-free: the saved files load into a fresh core trainer and give back exactly themselves."""
    trainer = _core_trainer(node)
    state = read_tensors(ckpt, f'trainers/{node}/state.safetensors', f'trainer/{node}')
    info = read_json(ckpt, f'trainers/{node}/state.json')['state']
    buffer = read_tensors(ckpt, f'data/{node}/buffer.safetensors', f'buffer/{node}')
    buffer_info = read_json(ckpt, f'data/{node}/buffer.json')['state']
    assert any(k.startswith('optimizer/') and k.endswith('/exp_avg') for k in state.tensors)
    trainer.load_state_dict(state.tensors, info)
    trainer.buffer.load_state_dict(dict(buffer.tensors), buffer_info)
    tensors, again = trainer.state_dict()
    _assert_same_tensors(tensors, state.tensors, f'{node} trainer state')
    assert again['rounds'] == info['rounds'] and again['version'] == info['version']
    buffer_tensors, _ = trainer.buffer.state_dict()
    _assert_same_tensors(buffer_tensors, buffer.tensors, f'{node} buffer')


def test_trainers_save_their_part_and_a_new_process_continues_from_it(launch, test_node, tmp_path):
    status = NodeStatus(test_node)
    frames = FrameFeeder(test_node, hz=FRAME_HZ)
    restored: list = []
    try:
        launch('agent', parameters={'preset': 'cpu'})
        saves = {'checkpoint_dir': str(tmp_path / 'checkpoints')}  # where they may write parts
        procs = {name: launch(name, parameters={**FAST, **saves}) for name in TRAINERS}
        wait_for(lambda: all(float(status.get(n, 'rounds', '0')) >= 2 for n in TRAINERS), 120,
                 interval=0.2, message='two rounds of each trainer')

        # The manager's part: pause, ask every node for its part, commit.
        for name in TRAINERS:
            _transition(test_node, name, Transition.TRANSITION_DEACTIVATE)
        stage = begin_checkpoint(tmp_path / 'checkpoints')
        for name in TRAINERS:
            _save(test_node, name, stage)
        ckpt = commit_checkpoint(stage, {'preset': 'cpu'})
        for proc in procs.values():
            assert proc.alive(), proc.output()
            proc.stop()
        saved = {}
        for name in TRAINERS:
            for pattern in FILES:
                assert (ckpt / pattern.format(name)).is_file(), pattern.format(name)
            state = read_json(ckpt, f'trainers/{name}/state.json')
            buffer = read_json(ckpt, f'data/{name}/buffer.json')['state']
            saved[name] = (state['rounds'], state['version'], buffer['size'])
            assert state['rounds'] >= 2 and state['version'] == state['rounds'], state
            assert buffer['size'] >= 16, buffer
            _assert_core_round_trip(ckpt, name)

        # New processes from the checkpoint; not started (autostart off): no data, no rounds.
        for name in TRAINERS:
            # Each round's line is a DEBUG line.
            restored.append(start_node(name, tmp_path / 'restored', parameters={
                **FAST, **saves, 'checkpoint': str(ckpt), 'autostart': False},
                extra_args=['--log-level', f'{name}:=debug']))
        wait_for(lambda: all(status.get(n, 'restored_from') == str(ckpt) for n in TRAINERS), 60,
                 interval=0.2, message='diagnostics of the restored trainers')
        for name in TRAINERS:
            rounds, version, size = saved[name]
            assert status.get(name, 'restored_part') == 'trainer'
            assert int(status.get(name, 'rounds')) == rounds
            assert int(status.get(name, 'version')) == version
            assert int(status.get(name, 'buffer_len')) == size

        # Saved again before any new round: the same part, bit for bit.
        stage = begin_checkpoint(tmp_path / 'checkpoints')
        for name in TRAINERS:
            _save(test_node, name, stage)
        again = commit_checkpoint(stage, {'preset': 'cpu'})
        for name in TRAINERS:
            _assert_same_part(ckpt, again, name)

        # Started, they continue: the next round makes the saved version + 1.
        for name in TRAINERS:
            _transition(test_node, name, Transition.TRANSITION_CONFIGURE)
            _transition(test_node, name, Transition.TRANSITION_ACTIVATE)
        for proc, name in zip(restored, TRAINERS, strict=True):
            rounds, version, _ = saved[name]
            line = f'round {rounds + 1}: version {version + 1},'
            wait_for(lambda proc=proc, line=line: line in proc.output(), 60, interval=0.2,
                     message=f'{name}: "{line}"')
            assert 'round 1:' not in proc.output()
            # The restored weights went to the agent first (the checkpoint holds no agent part).
            wait_for(lambda name=name, version=version:
                     int(status.get(name, 'pushed_version', '-1')) >= version, 30,
                     interval=0.2, message=f'{name} pushing')
            assert proc.alive(), proc.output()
    finally:
        frames.close()
        for proc in restored:
            proc.stop()


# -- in this process: restore problems and the fallback ------------------------

@pytest.fixture
def context():
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    yield ctx
    rclpy.try_shutdown(context=ctx)


@pytest.fixture
def make_node(context):
    """Build a dynamics_trainer in this process (never activated: it never trains by itself)."""
    from ami_ros.nodes.dynamics_trainer import DynamicsTrainerNode

    nodes = []

    def make(checkpoint: Path | str = '', agents: tuple[str, ...] = ('',)) -> DynamicsTrainerNode:
        node = DynamicsTrainerNode(context=context, parameter_overrides=[
            Parameter('preset', value='cpu'), Parameter('nice', value=0),
            Parameter('min_new', value=16), Parameter('max_batches', value=4),
            Parameter('checkpoint', value=str(checkpoint)), Parameter('agents', value=list(agents))])
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.on_exit()
        node.destroy_node()


def _trained_part(node, root: Path, rounds: int = 1) -> Path:
    """Feed `node` random steps (24 per round from each of its agents), train `rounds` rounds,
    save its part into a new checkpoint."""
    gen = torch.Generator().manual_seed(1)
    dyn = PRESET.dynamics
    for _ in range(rounds):
        for _ in range(24):
            for agent in node.agents:
                node.trainer.add(torch.randn(PRESET.encoder.latent, generator=gen),
                                 torch.randn(dyn.depth, dyn.dim, generator=gen).to(torch.complex64),
                                 torch.zeros(5, dtype=torch.int64), source=agent)
        node.trainer.train_round()
    stage = begin_checkpoint(root)
    node.trainer_checkpoint.save(stage)
    return commit_checkpoint(stage, {'preset': 'cpu'})


def test_damaged_or_unfitting_parts_refuse_the_start_naming_the_file(make_node, tmp_path):
    ckpt = _trained_part(make_node(), tmp_path)
    rel = 'trainers/dynamics_trainer/state.safetensors'
    damaged = shutil.copytree(ckpt, tmp_path / 'damaged')
    blob = bytearray((damaged / rel).read_bytes())
    blob[8:16] = b'not json'  # same size: the manifest's check passes, the envelope's does not
    (damaged / rel).write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=rel):
        make_node(damaged)
    # A part without its buffer files is damaged, not absent.
    partial = shutil.copytree(ckpt, tmp_path / 'partial')
    (partial / 'data/dynamics_trainer/buffer.json').unlink()
    manifest = json.loads((partial / 'manifest.json').read_text())
    del manifest['files']['data/dynamics_trainer/buffer.json']
    (partial / 'manifest.json').write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match='data/dynamics_trainer/buffer.json'):
        make_node(partial)


def test_a_restore_queues_the_weights_unless_the_agent_holds_them(make_node, tmp_path):
    first = make_node()
    ckpt = _trained_part(first, tmp_path / 'a', rounds=2)
    node = make_node(ckpt)
    assert (node.trainer.rounds, node.trainer.version) == (2, 2)
    pending = node.push.pending  # no agent part: pushed on activation
    assert pending is not None and pending.version == 2
    assert node.checkpoints.restored_from == ckpt and node.trainer_checkpoint.restored_part == 'trainer'
    # With the agent's part holding exactly these weights, nothing needs pushing.
    stage = begin_checkpoint(tmp_path / 'b')
    first.trainer_checkpoint.save(stage)
    write_tensors(stage, 'models/dynamics.safetensors', first.trainer.weights()['dynamics'],
                  weights_schema('dynamics'), {'version': 2})
    node = make_node(commit_checkpoint(stage, {'preset': 'cpu'}))
    assert node.trainer.version == 2 and node.push.pending is None


def test_a_checkpoint_without_this_trainer_starts_it_from_the_agents_weights(make_node, tmp_path):
    trained = make_node()
    _trained_part(trained, tmp_path / 'scratch')
    weights = trained.trainer.weights()['dynamics']
    stage = begin_checkpoint(tmp_path / 'a')
    write_tensors(stage, 'models/dynamics.safetensors', weights, weights_schema('dynamics'),
                  {'preset': 'cpu', 'model': 'dynamics', 'version': 7})
    node = make_node(commit_checkpoint(stage, {'preset': 'cpu'}))
    assert node.trainer_checkpoint.restored_part == 'models'
    assert (node.trainer.rounds, node.trainer.version, len(node.trainer.buffer)) == (0, 7, 0)
    _assert_same_tensors(node.trainer.weights()['dynamics'], weights, 'weights')
    assert node.push.pending is None  # the agent holds them already
    # Neither part nor weights: fresh, version 0.
    stage = begin_checkpoint(tmp_path / 'b')
    write_tensors(stage, 'models/policy.safetensors', {'w': torch.zeros(1)}, weights_schema('policy'))
    node = make_node(commit_checkpoint(stage, {'preset': 'cpu'}))
    assert node.trainer_checkpoint.restored_part == 'none' and node.trainer.version == 0


def test_a_damaged_or_foreign_checkpoint_ends_the_process_with_one_line(make_node, tmp_path):
    ckpt = _trained_part(make_node(), tmp_path / 'ok')
    rel = 'trainers/dynamics_trainer/state.safetensors'
    truncated = shutil.copytree(ckpt, tmp_path / 'truncated')
    blob = (truncated / rel).read_bytes()
    (truncated / rel).write_bytes(blob[:len(blob) // 2])
    stage = begin_checkpoint(tmp_path / 'ami')
    write_tensors(stage, 'models/dynamics.safetensors', {'w': torch.zeros(1)}, weights_schema('dynamics'))
    foreign = commit_checkpoint(stage, {'preset': 'ami'})
    procs = [start_node('dynamics_trainer', tmp_path / 'logs' / case,
                        parameters={**FAST, 'checkpoint': str(path)})
             for case, path in (('truncated', truncated), ('foreign', foreign))]
    try:
        codes = [proc.wait(60) for proc in procs]
        outputs = [proc.output() for proc in procs]
    finally:
        for proc in procs:
            proc.stop()
    assert codes == [1, 1], outputs
    assert 'cannot start' in outputs[0] and rel in outputs[0], outputs[0]
    assert 'cannot start' in outputs[1] and "preset 'ami'" in outputs[1], outputs[1]


def test_a_save_waits_for_a_running_round_and_gives_up_after_a_bound(make_node, tmp_path, monkeypatch):
    import ami_ros.ros.trainer_checkpoint as trainer_checkpoint

    node = make_node()
    monkeypatch.setattr(trainer_checkpoint, 'SAVE_WAIT_S', 0.3)
    stage = begin_checkpoint(tmp_path)
    node._round_lock.acquire()  # a round is running
    with pytest.raises(CheckpointError, match='did not finish within 0.3 s'):
        node.trainer_checkpoint.save(stage)
    assert not (stage / 'trainers').exists()
    threading.Timer(0.1, node._round_lock.release).start()  # the round ends: the save goes on
    node.trainer_checkpoint.save(stage)
    assert (stage / 'data/dynamics_trainer/buffer.json').is_file()


def test_each_agents_buffer_is_restored_by_its_namespace(make_node, tmp_path):
    saved = make_node(agents=('agent_0', 'agent_1'))
    saved.trainer.add(torch.randn(PRESET.encoder.latent),
                      torch.zeros(PRESET.dynamics.depth, PRESET.dynamics.dim, dtype=torch.complex64),
                      torch.zeros(5, dtype=torch.int64), source='agent_1')  # one step more than agent_0
    ckpt = _trained_part(saved, tmp_path, rounds=2)
    assert (len(saved.trainer.buffer['agent_0']), len(saved.trainer.buffer['agent_1'])) == (48, 49)
    want = saved.trainer.buffer['agent_1'].state_dict()
    node = make_node(ckpt, agents=('agent_1', 'agent_2'))  # agent_0 left out, agent_2 new
    assert (node.trainer.rounds, node.trainer.version) == (2, 2)
    got = node.trainer.buffer['agent_1'].state_dict()
    assert got[1] == want[1]
    _assert_same_tensors(got[0], want[0], "agent_1's buffer")
    assert len(node.trainer.buffer['agent_2']) == 0
    # A single-agent trainer restores the trainer and leaves both agents' buffers out.
    single = make_node(ckpt)
    assert (single.trainer.version, len(single.trainer.buffer)) == (2, 0)
