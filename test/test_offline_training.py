"""`ami-ros train --bag`: offline learning from recorded bags, ours and foreign, into a checkpoint.

The bags are real files written here: rosbags' Writer (mcap and sqlite3, as
`ros2 bag record` writes them) and mcap_ros2's Writer (another MCAP writer),
with frames of a real ViZDoom world.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from ros_harness import ami_ros, start_graph, stop_graph, wait_for

from ami_ros.core.action import action_to_controls
from ami_ros.core.checkpoint import load_manifest, read_tensors
from ami_ros.core.models import build_model
from ami_ros.core.presets import ACTION_CHOICES, get_preset
from ami_ros.core.schemas import weights_schema

PERIOD_NS = 100_000_000  # 10 Hz, as the graph's camera
DOOM_FRAMES = 240


def _typestore():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_JAZZY)


def _header(ts, t_ns: int, frame_id: str = 'camera'):
    time_type = ts.types['builtin_interfaces/msg/Time']
    return ts.types['std_msgs/msg/Header'](stamp=time_type(sec=t_ns // 10**9, nanosec=t_ns % 10**9),
                                           frame_id=frame_id)


def image_msg(ts, rgb: np.ndarray, t_ns: int, encoding: str = 'rgb8'):
    """A sensor_msgs/Image of the typestore holding `rgb` in `encoding` (rgb8, bgr8, mono8, ...)."""
    pixels = {'rgb8': rgb, 'bgr8': rgb[:, :, ::-1], 'mono8': rgb.mean(axis=2, keepdims=True).astype(np.uint8),
              'rgba8': np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])}[encoding]
    pixels = np.ascontiguousarray(pixels)
    h, w, c = pixels.shape
    return ts.types['sensor_msgs/msg/Image'](header=_header(ts, t_ns), height=h, width=w, encoding=encoding,
                                             is_bigendian=0, step=w * c, data=pixels.reshape(-1))


def joy_msg(ts, action, t_ns: int, axes_extra: int = 0):
    axes, buttons = action_to_controls(action)
    return ts.types['sensor_msgs/msg/Joy'](header=_header(ts, t_ns, ''),
                                           axes=np.array(axes + [0.0] * axes_extra, np.float32),
                                           buttons=np.array(buttons, np.int32))


def write_bag(path: Path, messages, storage: str = 'mcap') -> Path:
    """A rosbag2 bag (metadata.yaml + one storage file) of (topic, msgtype, t_ns, msg) in time order."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    ts = _typestore()
    plugin = StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        connections = {}
        for topic, msgtype, t_ns, msg in messages:
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, msgtype, typestore=ts)
            writer.write(connections[topic], t_ns, ts.serialize_cdr(msg, msgtype))
    return path


def doom_recording(frames: int = DOOM_FRAMES, seed: int = 1, gap_at: int = 150):
    """(frames, actions, times) of a ViZDoom world acted in by held random actions, one gap of 3 s."""
    from ami_ros.worlds.doom import DoomWorld, VRChatInputState

    rng = np.random.default_rng(seed)
    world = DoomWorld('my_way_home', frame_skip=4, seed=seed, episode_timeout=600.0)
    inputs = VRChatInputState()
    shots, actions, times = [world.observe().frame], [], []
    try:
        action = [0] * len(ACTION_CHOICES)
        for i in range(frames):
            if i % 4 == 0:  # held for a few steps, as the agent's persistence and people do
                action = [int(rng.integers(n)) for n in ACTION_CHOICES]
                action[3] = 0  # no jumping: my_way_home has nothing to jump on
            axes, buttons = action_to_controls(action)
            for name, value in zip(('Vertical', 'Horizontal', 'LookHorizontal'), axes, strict=True):
                inputs.handle(f'/input/{name}', float(value))
            for name, value in zip(('Jump', 'Run'), buttons, strict=True):
                inputs.handle(f'/input/{name}', int(value))
            actions.append(action)
            shots.append(world.step(inputs.to_buttons()).frame)
    finally:
        world.close()
    t0 = 1_700_000_000 * 10**9
    times = [t0 + i * PERIOD_NS + (3 * 10**9 if i >= gap_at else 0) for i in range(frames)]
    return shots[:frames], actions, times


def graph_messages(frames, actions, times, namespace: str = ''):
    """What the graph's topics carry: the frame, then the agent's action for it 20 ms later."""
    ts = _typestore()
    out = [(f'{namespace}/world/episode', 'std_msgs/msg/UInt32', times[0] - 1,
            ts.types['std_msgs/msg/UInt32'](data=1))]
    for rgb, action, t in zip(frames, actions, times, strict=True):
        out.append((f'{namespace}/camera/image_raw', 'sensor_msgs/msg/Image', t, image_msg(ts, rgb, t)))
        out.append((f'{namespace}/action', 'sensor_msgs/msg/Joy', t + 20_000_000, joy_msg(ts, action, t)))
    return out


@pytest.fixture(scope='module')
def doom(tmp_path_factory):
    root = tmp_path_factory.mktemp('doom')
    frames, actions, times = doom_recording()
    return write_bag(root / 'doom_bag', graph_messages(frames, actions, times)), frames, actions




def _losses(out: Path, model: str) -> list[float]:
    manifest = json.loads((out / 'manifest.json').read_text())
    return [epoch[model]['loss'] for epoch in manifest['offline']['epochs']]


def test_train_lowers_the_losses_and_the_graph_continues_from_its_checkpoint(doom, tmp_path, test_node):
    from mlflow import MlflowClient
    from std_msgs.msg import UInt8MultiArray

    from ami_ros.core.schemas import decode_experience

    bag, _, _ = doom
    out, uri = tmp_path / 'pretrained', f'sqlite:///{tmp_path}/mlflow.db'
    done = ami_ros('train', '--bag', str(bag), '-o', str(out), '--epochs', '4', '--batch-size', '8',
                   '--threads', '2', '--tracking-uri', uri, timeout=240)
    assert done.returncode == 0, done.stderr
    assert [line.split(':')[0] for line in done.stdout.splitlines() if line.startswith('epoch ')] == \
        [f'epoch {i}/4' for i in range(1, 5)]
    manifest = load_manifest(out, expected_preset='cpu', verify=True)
    # Two segments: the 3 s gap in the recording; 240 frames, each with its action.
    assert [(e['frames'], e['segments']) for e in manifest['offline']['epochs']] == [(DOOM_FRAMES, 2)] * 4
    vae, dynamics = _losses(out, 'vae'), _losses(out, 'dynamics')
    assert vae[-1] < 0.8 * vae[0], vae
    assert dynamics[-1] < dynamics[0], dynamics
    assert manifest['versions'] == {'encoder': 4, 'decoder': 4, 'dynamics': 4, 'policy': 0}
    assert manifest['nodes'] == ['agent', 'vae_trainer', 'dynamics_trainer']
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]  # no staging left
    client = MlflowClient(uri)
    [run] = client.search_runs(client.get_experiment_by_name('ami_ros').experiment_id)
    assert run.data.tags['ami_ros.kind'] == 'offline' and run.info.status == 'FINISHED'
    history = [m.value for m in sorted(client.get_metric_history(run.info.run_id, 'epoch/vae/loss'),
                                       key=lambda m: m.step)]
    assert history == pytest.approx(vae)

    # The graph starts from it: the agent acts with the pretrained versions from its
    # first step, the VAE and dynamics trainers carry on with their optimisers.
    experience = test_node.collect(UInt8MultiArray, 'experience', qos=200)
    graph = start_graph(tmp_path, 'world:=doom', f'checkpoint:={out}', 'record:=false')
    try:
        wait_for(lambda: len(experience) >= 5, 90, message=lambda: 'experience from the restored graph; '
                 + graph.log_path.read_text()[-2000:])
    finally:
        stop_graph(graph)
    steps = [decode_experience(bytes(m.data), get_preset('cpu')) for _, m in experience]
    # The first steps act with exactly the checkpoint's versions; later ones may already
    # carry the carrying-on trainers' next rounds, never anything older.
    assert all(step.versions == manifest['versions'] for step in steps[:5]), [s.versions for s in steps[:5]]
    assert all(step.versions[m] >= v for step in steps for m, v in manifest['versions'].items())
    # Seen from (about) the start. The test's subscriber can take a few seconds to match the
    # new agent's publisher on a loaded 2-core machine (CI once saw step 25 first).
    assert min(step.step for step in steps) < 100
    log = graph.log_path.read_text()
    assert log.count('restored (trainer)') == 2 and 'restored (models)' in log, log[-3000:]


def brightness_rule_messages(count: int, seed: int):
    """Frames of random brightness; LookHorizontal turns right (1) on bright ones, left (2) on dark."""
    ts = _typestore()
    rng = np.random.default_rng(seed)
    out, rule = [], []
    for i in range(count):
        level = int(rng.integers(20, 236))
        rgb = np.clip(level + rng.normal(0, 12, (96, 128, 3)), 0, 255).astype(np.uint8)
        action = [int(rng.integers(3)), 0, 1 if level > 128 else 2, 0, int(rng.integers(2))]
        t = 10**18 + i * PERIOD_NS
        out.append(('/camera/image_raw', 'sensor_msgs/msg/Image', t, image_msg(ts, rgb, t, 'rgba8')))
        out.append(('/action', 'sensor_msgs/msg/Joy', t + 10_000_000, joy_msg(ts, action, t)))
        rule.append((rgb, action[2]))
    return out, rule


def test_imitate_on_a_sqlite3_bag_makes_the_policy_follow_the_rule(tmp_path):
    from ami_ros.cli import main
    from ami_ros.core.observation import center_crop_resize, to_observation

    messages, _ = brightness_rule_messages(320, seed=0)
    bag = write_bag(tmp_path / 'rule', messages, storage='sqlite3')
    out = tmp_path / 'cloned'
    assert main(['train', '--bag', str(bag), '-o', str(out), '--imitate', '--epochs', '6',
                 '--batch-size', '16', '--threads', '1', '--no-record']) == 0
    preset = get_preset('cpu')
    models = {}
    for name in ('encoder', 'policy'):
        models[name] = build_model(name, preset).eval()
        saved = read_tensors(out, f'models/{name}.safetensors', weights_schema(name))
        models[name].load_state_dict(saved.tensors)
    assert read_tensors(out, 'models/policy.safetensors', 'weights/policy').int_meta('version') == 6
    _, held_out = brightness_rule_messages(100, seed=1)  # frames it never saw
    obs = torch.stack([to_observation(center_crop_resize(rgb, 84, 84)) for rgb, _ in held_out])
    with torch.no_grad():
        dist, _ = models['policy'](models['encoder'].encode_mean(obs))
    chosen = dist.mode()[:, 2]
    accuracy = float((chosen == torch.tensor([turn for _, turn in held_out])).float().mean())
    assert accuracy >= 0.85, accuracy  # chance: 0.5 (of the two turns the rule uses)


def _mcap_ros2_bag(path: Path, frames, actions) -> Path:
    """A lone .mcap of another writer (mcap_ros2), bgr8 160x120 frames under a namespace."""
    from mcap_ros2.writer import Writer

    ts = _typestore()
    with open(path, 'wb') as stream:
        writer = Writer(stream)
        schemas = {t: writer.register_msgdef(t, ts.generate_msgdef(t, ros_version=2)[0])
                   for t in ('sensor_msgs/msg/Image', 'sensor_msgs/msg/Joy')}
        for i, (rgb, action) in enumerate(zip(frames, actions, strict=True)):
            t = 10**18 + i * PERIOD_NS
            stamp = {'sec': t // 10**9, 'nanosec': t % 10**9}
            big = cv2.resize(rgb, (160, 120), interpolation=cv2.INTER_LINEAR)
            writer.write_message('/robot/camera/image_raw', schemas['sensor_msgs/msg/Image'], {
                'header': {'stamp': stamp, 'frame_id': 'camera'}, 'height': 120, 'width': 160,
                'encoding': 'bgr8', 'is_bigendian': 0, 'step': 480,
                'data': np.ascontiguousarray(big[:, :, ::-1]).tobytes()}, log_time=t, publish_time=t)
            axes, buttons = action_to_controls(action)
            writer.write_message('/robot/action', schemas['sensor_msgs/msg/Joy'], {
                'header': {'stamp': stamp, 'frame_id': ''}, 'axes': axes, 'buttons': buttons},
                log_time=t + 5_000_000, publish_time=t + 5_000_000)
        writer.finish()
    return path


def test_foreign_bags_are_read_and_trained_from(doom, tmp_path, capsys):
    from ami_ros.cli import main
    from ami_ros.core.observation import center_crop_resize
    from ami_ros.offline.samples import inspect_bags, iter_steps

    _, frames, actions = doom
    n = 64
    lone = _mcap_ros2_bag(tmp_path / 'foreign.mcap', frames[:n], actions[:n])
    # Topics found under their namespace; bgr8 160x120 comes out as the RGB frame, cropped and resized.
    steps = list(iter_steps(inspect_bags([lone])))
    assert len(steps) == n and [tuple(s.action) for s in steps] == [tuple(a) for a in actions[:n]]
    expected = center_crop_resize(cv2.resize(frames[10], (160, 120), interpolation=cv2.INTER_LINEAR), 84, 84)
    assert np.abs(steps[10].frame.astype(int) - expected.astype(int)).mean() < 1.0
    assert main(['train', '--bag', str(lone), '-o', str(tmp_path / 'a'), '--epochs', '1', '--threads', '1',
                 '--batch-size', '8', '--no-record']) == 0
    assert json.loads((tmp_path / 'a' / 'manifest.json').read_text())['versions']['dynamics'] == 1

    # Frames only, as CompressedImage (jpeg and png) on a topic chosen by flag: the encoder alone.
    ts = _typestore()
    messages = []
    for i, rgb in enumerate(frames[:n]):
        fmt = '.jpg' if i % 2 else '.png'
        data = np.frombuffer(cv2.imencode(fmt, rgb[:, :, ::-1])[1].tobytes(), np.uint8)
        msg = ts.types['sensor_msgs/msg/CompressedImage'](header=_header(ts, i * PERIOD_NS),
                                                          format=fmt[1:], data=data)
        messages.append(('/eyes', 'sensor_msgs/msg/CompressedImage', 1 + i * PERIOD_NS, msg))
    compressed = write_bag(tmp_path / 'compressed', messages)
    steps = list(iter_steps(inspect_bags([compressed], image_topic='/eyes')))
    assert np.abs(steps[0].frame.astype(int) - frames[0].astype(int)).max() == 0  # png is lossless
    assert np.abs(steps[1].frame.astype(int) - frames[1].astype(int)).mean() < 8  # jpeg nearly
    capsys.readouterr()
    # ... continuing from the first checkpoint's models (--from): their versions go on.
    assert main(['train', '--bag', str(compressed), '-o', str(tmp_path / 'b'), '--image-topic', '/eyes',
                 '--from', str(tmp_path / 'a'), '--epochs', '1', '--threads', '1', '--no-record']) == 0
    said = capsys.readouterr().out
    assert 'frames only (no action topic): training the encoder (VAE) only' in said
    manifest = json.loads((tmp_path / 'b' / 'manifest.json').read_text())
    assert manifest['nodes'] == ['agent', 'vae_trainer']
    assert manifest['versions'] == {'encoder': 2, 'decoder': 2, 'dynamics': 1, 'policy': 0}
    dynamics = [read_tensors(tmp_path / c, 'models/dynamics.safetensors', 'weights/dynamics').tensors
                for c in ('a', 'b')]
    assert all(torch.equal(dynamics[0][k], dynamics[1][k]) for k in dynamics[0])  # carried, untrained


def test_bad_input_gets_one_line_naming_file_and_topic_and_writes_nothing(doom, tmp_path, capsys,
                                                                          monkeypatch):
    from ami_ros.cli import main
    from ami_ros.offline.training import OfflineTraining

    bag, frames, actions = doom
    ts = _typestore()
    empty = tmp_path / 'empty.mcap'
    empty.touch()
    cut = tmp_path / 'cut.db3'
    whole = write_bag(tmp_path / 'whole', graph_messages(frames[:20], actions[:20], list(range(1, 21))),
                      storage='sqlite3')
    data = next(whole.glob('*.db3')).read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    short_joy = [('/action', 'sensor_msgs/msg/Joy', 2,
                  ts.types['sensor_msgs/msg/Joy'](header=_header(ts, 0), axes=np.zeros(2, np.float32),
                                                  buttons=np.zeros(2, np.int32)))]
    narrow = write_bag(tmp_path / 'narrow', graph_messages(frames[:3], actions[:3], [1, 3, 5])[1:2]
                       + short_joy)
    chatter = write_bag(tmp_path / 'chatter', [('/chatter', 'std_msgs/msg/String', 1,
                                                ts.types['std_msgs/msg/String'](data='hi'))])
    cases = [
        ([str(tmp_path / 'missing')], str(tmp_path / 'missing')),
        ([str(empty)], str(empty)),
        ([str(cut)], str(cut)),
        ([str(chatter)], 'camera/image_raw'),
        ([str(bag), '--image-topic', '/action'], '/action is sensor_msgs/msg/Joy'),
        ([str(narrow)], 'topic /action: action has 2 axes'),
        ([str(bag), '--action-topic', '/joy'], 'no topic /joy'),
    ]
    out = tmp_path / 'out'
    for args, named in cases:
        capsys.readouterr()
        code = main(['train', '--bag', *args, '-o', str(out), '--threads', '1', '--no-record'])
        err = capsys.readouterr().err
        assert code == 1, (args, err)
        assert err.count('\n') == 1 and err.startswith('ami-ros train: ') and named in err, (args, err)
        assert 'Traceback' not in err
        if args[0] != str(tmp_path / 'missing'):
            assert args[0].split('/')[-1] in err or str(bag) in err, err
    # Ctrl-C while training: nothing half-written either.
    monkeypatch.setattr(OfflineTraining, 'train', lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(['train', '--bag', str(bag), '-o', str(out), '--threads', '1', '--no-record']) == 130
    assert 'nothing was written' in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith('.')]
