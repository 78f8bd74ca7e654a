"""Checkpoint I/O: round trip, atomicity under SIGKILL, retention, clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
from torch import nn

from ami_ros.core import checkpoint as ck
from ami_ros.core import checkpoint_store as store
from ami_ros.core.envelope import TensorSpec, specs_of

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().numpy().tobytes()


def _assert_bit_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        assert got[name].device.type == 'cpu', name
        assert _bits(got[name]) == _bits(t), name


def _save(root: Path, now: datetime, name: str | None = None, preset: str = 'cpu',
          manifest: dict | None = None) -> Path:
    """A small complete checkpoint with one tensor part and one JSON part."""
    stage = ck.begin_checkpoint(root, name=name, now=now)
    ck.write_tensors(stage, 'models/encoder.safetensors', {'w': torch.arange(6.0).reshape(2, 3)},
                     'weights/encoder', {'version': 3})
    ck.write_json(stage, 'trainers/vae/state.json', {'rounds': 7})
    return ck.commit_checkpoint(stage, {'preset': preset, **(manifest or {})})


def _one_line_naming(exc: ck.CheckpointError, needle: str) -> None:
    text = str(exc)
    assert '\n' not in text
    assert needle in text, text


# ----------------------------------------------------------------------------- round trip


def test_round_trip_is_bit_identical_and_manifest_lists_files(tmp_path):
    gen = torch.Generator().manual_seed(0)
    floats = torch.randn(4, 5, generator=gen)
    floats[0, :3] = torch.tensor([float('nan'), float('inf'), -0.0])  # odd bits survive too
    tensors = {
        'f32': floats,
        'c64': torch.randn(3, 2, dtype=torch.complex64, generator=gen),
        'u8': torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=gen),
        'i64': torch.tensor([-(2 ** 62), 0, 2 ** 62 + 1], dtype=torch.int64),
    }
    info = {'rounds': 12, 'lr': 1e-4, 'betas': [0.9, 0.999], 'name': 'vae', 'nested': {'a': [1, None]}}
    stage = ck.begin_checkpoint(tmp_path, now=T0)
    assert stage.name == '.2024-05-01_12-00-00.partial'
    assert store.list_checkpoints(tmp_path) == []  # a stage is never listed
    ck.write_tensors(stage, 'trainers/vae/state.safetensors', tensors, 'trainer/vae', {'version': 4})
    ck.write_json(stage, 'trainers/vae/state.json', info)
    ck.write_json(stage, 'interaction/environment/camera.json', {'fps': 10})
    path = ck.commit_checkpoint(stage, {'preset': 'cpu', 'parameters': {'agent': {'rate': 10.0}}},
                                require=['trainers/vae/state.json', 'trainers/vae/state.safetensors'])

    assert path == tmp_path / '2024-05-01_12-00-00'
    assert not stage.exists()
    assert store.list_checkpoints(tmp_path) == [path]
    assert store.latest_checkpoint(tmp_path) == path
    assert store.resolve_checkpoint('latest', tmp_path) == path
    assert store.resolve_checkpoint(path.name, tmp_path) == path
    assert store.resolve_checkpoint(str(path), tmp_path) == path

    env = ck.read_tensors(path, 'trainers/vae/state.safetensors', 'trainer/vae', specs_of(tensors))
    _assert_bit_identical(env.tensors, tensors)
    assert env.int_meta('version') == 4
    assert ck.read_json(path, 'trainers/vae/state.json') == info

    manifest = ck.load_manifest(path, expected_preset='cpu', verify=True)
    assert manifest['preset'] == 'cpu'
    assert manifest['parameters'] == {'agent': {'rate': 10.0}}
    assert manifest['manual'] is False
    assert manifest['name'] == path.name
    assert manifest['created_unix'] == T0.timestamp()
    assert manifest['ami_ros_version']
    files = manifest['files']
    assert sorted(files) == ['interaction/environment/camera.json', 'trainers/vae/state.json',
                             'trainers/vae/state.safetensors']
    for rel, entry in files.items():
        assert entry['size'] == (path / rel).stat().st_size > 0
        assert len(entry['sha256']) == 64
    assert manifest['parts']['trainers/vae/state'] == ['trainers/vae/state.json',
                                                       'trainers/vae/state.safetensors']
    # No scratch files (stage bookkeeping, temporaries) are left in a checkpoint.
    assert not [p for p in path.rglob('.*')]


@pytest.mark.parametrize('device', [
    'cpu', pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA'))])
def test_module_weights_load_back_on_cpu_bit_identical(tmp_path, device):
    torch.manual_seed(1)
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5)).to(device)
    module(torch.zeros(1, 3, 6, 6, device=device))  # materialise the lazy layer
    state = module.state_dict()
    stage = ck.begin_checkpoint(tmp_path, now=T0)
    ck.write_tensors(stage, 'models/policy.safetensors', state, 'weights/policy')
    path = ck.commit_checkpoint(stage, {'preset': 'cpu'})

    env = ck.read_tensors(path, 'models/policy.safetensors', 'weights/policy', specs_of(state))
    _assert_bit_identical(env.tensors, state)
    restored = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 5))
    restored.load_state_dict(env.tensors)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(restored(x), module.to('cpu')(x))


# ----------------------------------------------------------------------------- atomicity

_CHILD_PRELUDE = """
import os, signal, sys
import torch
from ami_ros.core import checkpoint as ck
root = sys.argv[1]
stage = ck.begin_checkpoint(root)
print(stage, flush=True)
ck.write_tensors(stage, 'models/encoder.safetensors', {'w': torch.full((4,), 9.0)}, 'weights/encoder')
ck.write_json(stage, 'trainers/vae/state.json', {'rounds': 99})
"""

_KILL_BEFORE_COMMIT = """
os.kill(os.getpid(), signal.SIGKILL)
ck.commit_checkpoint(stage, {'preset': 'cpu'})  # never reached
"""

# Dies half-way through writing a large tensor file: half its bytes are on disk.
_KILL_MID_WRITE = """
real_open = open

class HalfThenDie:
    def __init__(self, f):
        self.f = f
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()
    def write(self, data):
        self.f.write(memoryview(data)[:len(data) // 2])
        self.f.flush()
        os.fsync(self.f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

def dying_open(path, mode='r', *args, **kwargs):
    f = real_open(path, mode, *args, **kwargs)
    return HalfThenDie(f) if 'buffer.safetensors' in str(path) else f

from ami_ros.core import private_files
private_files.open = dying_open  # module globals shadow the builtin there only (it writes the parts)
images = torch.zeros(256, 3, 84, 84, dtype=torch.uint8)
ck.write_tensors(stage, 'data/vae/buffer.safetensors', {'images': images}, 'buffer/vae')
ck.commit_checkpoint(stage, {'preset': 'cpu'})  # never reached
"""

# Dies inside the commit: manifest.json is written, the stage not yet renamed to its name.
_KILL_BEFORE_RENAME = """
class DieAtRename:  # the os module as checkpoint.py sees it, but renaming the stage kills
    def __getattr__(self, name):
        return getattr(os, name)
    def rename(self, src, dst):
        if str(src).endswith(ck.PARTIAL_SUFFIX):
            os.kill(os.getpid(), signal.SIGKILL)
        os.rename(src, dst)

ck.os = DieAtRename()  # module globals: checkpoint.py alone sees it
ck.commit_checkpoint(stage, {'preset': 'cpu'})  # dies inside
"""

_ENDINGS = {'before_commit': _KILL_BEFORE_COMMIT, 'mid_write': _KILL_MID_WRITE,
            'manifest_written': _KILL_BEFORE_RENAME}


def _run_killed_child(script: str, root: Path) -> subprocess.CompletedProcess:
    """Run `script` with `root` as its argument; it must end by SIGKILL."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')]))
    env = {**os.environ, 'PYTHONPATH': pythonpath}
    proc = subprocess.run([sys.executable, '-c', textwrap.dedent(script), str(root)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return proc


@pytest.mark.parametrize('ending', list(_ENDINGS))
def test_sigkill_during_save_leaves_previous_checkpoint_latest(tmp_path, ending):
    previous = _save(tmp_path, T0)
    proc = _run_killed_child(_CHILD_PRELUDE + _ENDINGS[ending], tmp_path)
    stage = Path(proc.stdout.strip())
    assert stage.is_dir() and stage.name.endswith('.partial')
    assert (stage / 'trainers/vae/state.json').is_file()  # the child did get to write parts
    if ending == 'mid_write':
        leftovers = list((stage / 'data/vae').glob('.buffer.safetensors.*.tmp'))
        assert len(leftovers) == 1 and 0 < leftovers[0].stat().st_size < 256 * 3 * 84 * 84
        assert not (stage / 'data/vae/buffer.safetensors').exists()
    if ending == 'manifest_written':  # whole but for its name: still an unfinished save
        manifest = ck.load_manifest(stage, expected_preset='cpu', verify=True)
        assert manifest['name'] == stage.name[1:-len(ck.PARTIAL_SUFFIX)]

    assert store.list_checkpoints(tmp_path) == [previous]
    assert store.latest_checkpoint(tmp_path) == previous
    assert store.resolve_checkpoint('latest', tmp_path) == previous
    ck.load_manifest(previous, expected_preset='cpu', verify=True)
    env_prev = ck.read_tensors(previous, 'models/encoder.safetensors', 'weights/encoder')
    assert torch.equal(env_prev.tensors['w'], torch.arange(6.0).reshape(2, 3))
    assert ck.read_json(previous, 'trainers/vae/state.json') == {'rounds': 7}
    with pytest.raises(ck.CheckpointError, match='unfinished'):
        store.resolve_checkpoint(str(stage), tmp_path)

    # A fresh partial is not cleaned (it could be a save in progress); an old one is.
    assert store.clean_partials(tmp_path, older_than_s=3600) == []
    assert store.clean_partials(tmp_path, older_than_s=0) == [stage]
    assert not stage.exists()
    assert store.list_checkpoints(tmp_path) == [previous]


# Dies while retention removes a checkpoint: hidden, one file gone, manifest.json still there.
_KILL_MID_RETENTION = """
import os, shutil, signal, sys
from pathlib import Path
from ami_ros.core import checkpoint_store as store

class DieMidRemoval:  # shutil as checkpoint_store.py sees it, but removing a tree kills half-way
    def __getattr__(self, name):
        return getattr(shutil, name)
    def rmtree(self, path, ignore_errors=False):
        print(path, flush=True)
        (Path(path) / 'models' / 'encoder.safetensors').unlink()
        os.kill(os.getpid(), signal.SIGKILL)

store.shutil = DieMidRemoval()  # module globals: checkpoint_store.py alone sees it
store.apply_retention(sys.argv[1], keep_last=1)
"""


def test_sigkill_during_retention_leaves_every_other_checkpoint_whole(tmp_path):
    automatic = [_save(tmp_path, T0 + timedelta(minutes=i)) for i in range(3)]
    manual = _save(tmp_path, T0 + timedelta(minutes=3), name='by-hand')
    proc = _run_killed_child(_KILL_MID_RETENTION, tmp_path)
    removing = Path(proc.stdout.strip())
    # The oldest was being removed: hidden first, so its manifest, still
    # there beside a missing part, never makes it look complete.
    assert removing.parent == tmp_path and removing.name.startswith(f'.{automatic[0].name}.')
    assert removing.name.endswith(ck.DELETING_SUFFIX)
    assert (removing / ck.MANIFEST).is_file() and not (removing / 'models/encoder.safetensors').exists()
    assert not automatic[0].exists()
    with pytest.raises(ck.CheckpointError, match='deleted'):
        store.resolve_checkpoint(str(removing), tmp_path)
    # Every other checkpoint, the next doomed one included, is whole.
    assert store.list_checkpoints(tmp_path) == [*automatic[1:], manual]
    assert store.latest_checkpoint(tmp_path) == manual
    for path in (*automatic[1:], manual):
        ck.load_manifest(path, expected_preset='cpu', verify=True)
        env = ck.read_tensors(path, 'models/encoder.safetensors', 'weights/encoder')
        assert torch.equal(env.tensors['w'], torch.arange(6.0).reshape(2, 3))
        assert ck.read_json(path, 'trainers/vae/state.json') == {'rounds': 7}
    # The next retention finishes the job; cleaning takes the half-removed one.
    assert store.apply_retention(tmp_path, keep_last=1) == [automatic[1]]
    assert store.clean_partials(tmp_path, older_than_s=0) == [removing]
    assert store.list_checkpoints(tmp_path) == [automatic[2], manual]


def test_commit_refuses_missing_required_part_and_late_writes(tmp_path):
    stage = ck.begin_checkpoint(tmp_path, now=T0)
    ck.write_json(stage, 'trainers/vae/state.json', {})
    with pytest.raises(ck.CheckpointError, match='missing trainers/ppo/state.json'):
        ck.commit_checkpoint(stage, {'preset': 'cpu'}, require=['trainers/ppo/state.json'])
    assert stage.is_dir() and store.list_checkpoints(tmp_path) == []
    with pytest.raises(ValueError, match='files'):
        ck.commit_checkpoint(stage, {'files': {}})
    path = ck.commit_checkpoint(stage, {'preset': 'cpu'})
    with pytest.raises(ck.CheckpointError, match='gone'):
        ck.write_json(stage, 'trainers/ppo/state.json', {})
    assert not stage.exists()  # the late writer did not recreate the stage
    assert store.list_checkpoints(tmp_path) == [path]
    with pytest.raises(ck.CheckpointError, match='not a checkpoint staging directory'):
        ck.write_json(path, 'x.json', {})  # a committed checkpoint is not a stage
    for bad in ('../x.json', '/abs.json', 'models/.hidden.json', 'manifest.json', 'models/x.txt'):
        with pytest.raises(ValueError):
            ck.write_json(ck.begin_checkpoint(tmp_path, now=T0), bad, {})


def test_same_second_saves_get_distinct_names(tmp_path):
    a = ck.begin_checkpoint(tmp_path, now=T0)
    b = ck.begin_checkpoint(tmp_path, now=T0)  # while a is still open
    assert a != b
    pa = ck.commit_checkpoint(a, {'preset': 'cpu'})
    c = ck.begin_checkpoint(tmp_path, now=T0)  # after a was committed
    pb = ck.commit_checkpoint(b, {'preset': 'cpu'})
    pc = ck.commit_checkpoint(c, {'preset': 'cpu'})
    assert [p.name for p in (pa, pb, pc)] == ['2024-05-01_12-00-00', '2024-05-01_12-00-00-1',
                                              '2024-05-01_12-00-00-2']
    assert store.list_checkpoints(tmp_path) == [pa, pb, pc]


# ----------------------------------------------------------------------------- retention


def test_retention_keeps_newest_automatic_and_every_manual(tmp_path):
    auto = [_save(tmp_path, T0 + timedelta(minutes=i)) for i in range(5)]
    named = _save(tmp_path, T0 - timedelta(days=1), name='before_demo')
    flagged = _save(tmp_path, T0 - timedelta(days=2), manifest={'manual': True})
    stage = ck.begin_checkpoint(tmp_path, now=T0 - timedelta(days=3))  # a save in progress

    assert store.list_checkpoints(tmp_path) == [flagged, named, *auto]
    assert store.apply_retention(tmp_path, keep_last=0) == []
    assert store.apply_retention(tmp_path, keep_last=2) == auto[:3]
    assert store.list_checkpoints(tmp_path) == [flagged, named, *auto[3:]]
    assert not any(p.exists() for p in auto[:3])
    assert stage.is_dir()
    assert ck.load_manifest(named)['manual'] is True
    assert store.apply_retention(tmp_path, keep_last=1) == [auto[3]]
    assert store.apply_retention(tmp_path, keep_last=1) == []
    assert store.latest_checkpoint(tmp_path) == auto[4]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [flagged.name, named.name, auto[4].name, stage.name])  # nothing half-deleted left over


# ----------------------------------------------------------------------------- errors


def test_truncated_tensor_file_is_a_one_line_error_naming_it(tmp_path):
    path = _save(tmp_path, T0)
    file = path / 'models/encoder.safetensors'
    file.write_bytes(file.read_bytes()[:-7])
    with pytest.raises(ck.CheckpointError) as info:
        ck.read_tensors(path, 'models/encoder.safetensors', 'weights/encoder')
    _one_line_naming(info.value, 'models/encoder.safetensors')
    assert 'truncated' in str(info.value)
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_manifest(path)
    _one_line_naming(info.value, 'models/encoder.safetensors')


def test_damaged_bytes_of_same_size_are_caught_by_verify(tmp_path):
    path = _save(tmp_path, T0)
    file = path / 'trainers/vae/state.json'
    data = bytearray(file.read_bytes())
    data[-2] ^= 1
    file.write_bytes(bytes(data))
    ck.load_manifest(path)  # sizes still match
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_manifest(path, verify=True)
    _one_line_naming(info.value, 'trainers/vae/state.json')
    assert 'sha256' in str(info.value)


def test_manifest_from_another_preset_is_refused(tmp_path):
    path = _save(tmp_path, T0, preset='ami')
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_manifest(path, expected_preset='cpu')
    assert str(info.value) == (f"checkpoint {path} was saved with preset 'ami', this graph runs 'cpu'; "
                               'start with preset:=ami or another checkpoint')
    assert ck.load_manifest(path, expected_preset='ami')['preset'] == 'ami'


def test_missing_part_file_is_named(tmp_path):
    path = _save(tmp_path, T0)
    (path / 'trainers/vae/state.json').unlink()
    with pytest.raises(ck.CheckpointError) as info:
        ck.read_json(path, 'trainers/vae/state.json')
    assert str(info.value) == (f'checkpoint {path} is missing trainers/vae/state.json '
                               '(a part was not saved); use another checkpoint')
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_manifest(path)
    _one_line_naming(info.value, 'trainers/vae/state.json')
    with pytest.raises(ck.CheckpointError) as info:
        ck.read_tensors(path, 'models/decoder.safetensors', 'weights/decoder')
    _one_line_naming(info.value, 'models/decoder.safetensors')


def test_corrupt_manifest_is_named(tmp_path):
    path = _save(tmp_path, T0)
    (path / 'manifest.json').write_text('{"format": "ami_ros-checkpoint", "files": {\n')
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_manifest(path, expected_preset='cpu')
    _one_line_naming(info.value, 'manifest.json')
    assert 'damaged' in str(info.value)
    # It still counts as complete (listing does not parse it), so `latest` leads to this clear error.
    assert store.latest_checkpoint(tmp_path) == path
    (path / 'manifest.json').write_text(json.dumps(['not', 'a', 'manifest']))
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_manifest(path)
    _one_line_naming(info.value, 'manifest.json')
    (path / 'manifest.json').unlink()
    assert store.list_checkpoints(tmp_path) == []
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_manifest(path)
    _one_line_naming(info.value, 'manifest.json')


def test_wrong_tensor_schema_or_shape_is_refused(tmp_path):
    path = _save(tmp_path, T0)
    with pytest.raises(ck.CheckpointError, match='models/encoder.safetensors.*schema'):
        ck.read_tensors(path, 'models/encoder.safetensors', 'weights/policy')
    with pytest.raises(ck.CheckpointError, match='shape'):
        ck.read_tensors(path, 'models/encoder.safetensors', 'weights/encoder',
                        {'w': TensorSpec(torch.float32, (3, 3))})


def test_resolve_without_checkpoints_is_clear(tmp_path):
    with pytest.raises(ck.CheckpointError, match='no checkpoint in'):
        store.resolve_checkpoint('latest', tmp_path / 'none')
    with pytest.raises(ck.CheckpointError, match='does not exist'):
        store.resolve_checkpoint('2020-01-01_00-00-00', tmp_path)
    assert store.list_checkpoints(tmp_path / 'none') == []
    assert store.latest_checkpoint(tmp_path) is None
