"""Checkpoint I/O of the learning core (no ROS): one directory per checkpoint.

This module writes and reads one checkpoint; `core/checkpoint_store.py`
lists, resolves and removes the checkpoints of a directory.

The whole graph saves one checkpoint together: the manager begins it, every
node writes its own part into it, and the manager commits it. Layout::

    <checkpoint_dir>/YYYY-MM-DD_hh-mm-ss/     (or a manual name; -1, -2 on clashes)
      manifest.json            what is inside: format, ami_ros version, preset, graph
                               parameters, versions, created time, manual flag, and
                               every file with its size and sha256
      models/                  encoder.safetensors, decoder..., dynamics..., policy...
      trainers/<name>/         state.safetensors (optimiser tensors) + state.json (counters)
      data/<buffer>/           buffer.safetensors + buffer.json
      interaction/agent/       state.safetensors (hidden state, rng) + state.json (steps, ...)
      interaction/environment/ <node>.json / <node>.safetensors (camera / bridge / world)

Tensors are stored as tensor envelopes (`ami_ros.core.envelope`: safetensors
with a schema name, validated on load); everything else is JSON. Nothing is
ever unpickled, so loading a checkpoint can never run code.

Atomicity. A checkpoint is *complete* iff its directory name has no leading
'.' and it holds manifest.json. It is assembled in a hidden staging directory
``.<name>.partial`` that no listing looks at:

1. `begin_checkpoint` reserves a name by creating the staging directory
   (mkdir is atomic and fails if it exists, so two saves in the same second,
   even from two processes, get different names).
2. Each part file is written to a temporary file in its own directory,
   fsynced, then `os.replace`d onto its name: a reader never sees half a
   file, and a crash mid-write leaves only a hidden ``*.tmp`` file.
3. `commit_checkpoint` writes manifest.json the same way (after every part,
   listing them with sizes and hashes), fsyncs every directory of the stage,
   renames the staging directory to its final name (one atomic rename on one
   filesystem), then fsyncs the parent so the rename itself is durable.

So a crash or SIGKILL at any moment before the rename leaves only a
``.partial`` directory, which listings ignore and `clean_partials` removes;
after the rename the checkpoint is whole. Retention deletes the same way in
reverse: rename to a hidden ``.<name>.deleting`` first, then remove.

Device portability is the loaders' business: tensors load on the CPU, the
caller moves them with ``.to(device)``. Optimiser state dicts are flattened
to (tensors, JSON) by the trainers (`ami_ros.core.trainers`), whose
`state_dict()` gives exactly what `write_tensors` + `write_json` take.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from ami_ros import __version__
from ami_ros.core.envelope import Envelope, EnvelopeError, TensorSpec, decode, encode
from ami_ros.core.private_files import DIR_MODE, make_dirs, write_private

FORMAT = 'ami_ros-checkpoint'
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
LATEST = 'latest'
PARTIAL_SUFFIX = '.partial'
DELETING_SUFFIX = '.deleting'
_STAGE_INFO = '.stage.json'  # begin -> commit hand-over inside the stage; not part of the checkpoint
_TIME_FORMAT = '%Y-%m-%d_%H-%M-%S'
_NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]*$')
# Keys commit_checkpoint owns; a caller's manifest may not set them.
_OWNED_KEYS = ('format', 'format_version', 'name', 'ami_ros_version', 'created', 'created_unix',
               'files', 'parts')


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or used; one line naming the file and what to do."""

    def __init__(self, message: str) -> None:
        # One line, always: these end up in a service reply or a log line.
        super().__init__(' '.join(str(message).splitlines()))


# --------------------------------------------------------------------------- writing


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `path` (0600, its folders 0700) so readers see the old file or the whole new one, durably.

    The temporary file lives in the same directory (so os.replace is a rename
    on one filesystem) and is hidden (so a leftover from a crash is never
    taken for a part).
    """
    make_dirs(path.parent)
    write_private(path, data, durable=True)  # the data is on disk before the name points at it
    fsync_dir(path.parent)


def _check_relpath(relpath: str | os.PathLike[str], suffix: str) -> Path:
    """A part's path inside a checkpoint: relative, no '..', nothing hidden, right suffix."""
    rel = Path(relpath)
    if rel.is_absolute() or not rel.parts:
        raise ValueError(f'checkpoint part path {str(relpath)!r} must be relative, '
                         f'e.g. models/encoder{suffix}')
    # Hidden names are reserved for temporary files and the stage's own bookkeeping.
    if any(part in ('.', '..') or part.startswith('.') for part in rel.parts):
        raise ValueError(f'checkpoint part path {str(relpath)!r} may not hold "..", "." or hidden names')
    if rel.suffix != suffix:
        raise ValueError(f'checkpoint part path {str(relpath)!r} must end with {suffix}')
    if rel.as_posix() == MANIFEST:
        raise ValueError(f'{MANIFEST} is written by commit_checkpoint, not as a part')
    return rel


def _stage_name(stage: Path) -> str:
    """The final name of a staging directory, which must still exist."""
    name = stage.name
    if not (name.startswith('.') and name.endswith(PARTIAL_SUFFIX)):
        raise CheckpointError(f'{stage} is not a checkpoint staging directory (.<name>{PARTIAL_SUFFIX}); '
                              'get one from begin_checkpoint')
    # A late writer must not recreate a stage that was committed or aborted (its part would be lost).
    if not stage.is_dir():
        raise CheckpointError(f'checkpoint staging directory {stage} is gone (already committed or aborted); '
                              'this part was not saved')
    return name[1:-len(PARTIAL_SUFFIX)]


def confined_stage(directory: str, checkpoint_dir: str | os.PathLike[str]) -> Path:
    """The staging directory a save request names, if it may be written to; else CheckpointError.

    Anyone on the ROS domain can ask a node to save, so the request is held
    to the rules: an absolute path without '.' or '..', a `.<name>.partial`
    stage directly under `checkpoint_dir`, itself a real folder (not a
    symlink) of this user that others cannot write to.
    """
    root = Path(os.path.abspath(checkpoint_dir))
    if not os.path.isabs(directory):
        raise CheckpointError('save_checkpoint needs an absolute staging directory')
    if any(part in ('.', '..') for part in directory.split('/')):
        raise CheckpointError("save_checkpoint refuses '.' and '..' in the staging directory")
    stage = Path(directory)
    if stage.parent != root:
        raise CheckpointError(f'save_checkpoint writes only stages directly under {root} '
                              "(this node's checkpoint_dir)")
    _stage_name(stage)
    info = stage.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise CheckpointError('save_checkpoint refuses a staging directory that is a symlink')
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise CheckpointError('save_checkpoint refuses a staging directory of another user '
                              'or one others can write to')
    return stage


def begin_checkpoint(checkpoint_dir: str | os.PathLike[str], name: str | None = None,
                     now: datetime | None = None) -> Path:
    """Reserve a new checkpoint and return its staging directory.

    The final name is `now` (local time, default: the present) as
    YYYY-MM-DD_hh-mm-ss, or `name` for a manual checkpoint (never removed by
    retention); -1, -2, ... is appended when the name is taken, by a
    complete checkpoint or by a save in progress.
    """
    root = Path(checkpoint_dir)
    when = now if now is not None else datetime.now().astimezone()
    if name is not None and (not _NAME_RE.match(name) or name.endswith((PARTIAL_SUFFIX, DELETING_SUFFIX))):
        raise ValueError(f'checkpoint name {name!r} must be letters, digits, "_", "-", "." '
                         'and start with a letter or digit')
    base = name if name is not None else when.strftime(_TIME_FORMAT)
    make_dirs(root)
    for attempt in range(10_000):
        final = base if attempt == 0 else f'{base}-{attempt}'
        stage = root / f'.{final}{PARTIAL_SUFFIX}'
        try:
            stage.mkdir(DIR_MODE)  # atomic reservation: fails if another save holds this name
        except FileExistsError:
            continue
        # Checked after the reservation: the rename from stage to final is atomic, so
        # for any name either its stage or its final directory exists, never neither.
        if (root / final).exists():
            stage.rmdir()
            continue
        info = {'name': final, 'manual': name is not None,
                'created': when.isoformat(timespec='seconds'), 'created_unix': when.timestamp()}
        _atomic_write(stage / _STAGE_INFO, json.dumps(info).encode())
        return stage
    raise CheckpointError(f'no free checkpoint name for {base} in {root}; remove old checkpoints')


def write_tensors(stage: str | os.PathLike[str], relpath: str | os.PathLike[str],
                  tensors: Mapping[str, torch.Tensor], schema: str,
                  metadata: Mapping[str, object] | None = None) -> Path:
    """Write one tensor part (an envelope named `schema`) atomically; returns its path.

    `relpath` ends with .safetensors, e.g. ``models/encoder.safetensors``.
    Tensors on any device are copied to the CPU.
    """
    stage = Path(stage)
    _stage_name(stage)
    path = stage / _check_relpath(relpath, '.safetensors')
    _atomic_write(path, encode(tensors, schema, metadata))
    return path


def write_json(stage: str | os.PathLike[str], relpath: str | os.PathLike[str], obj: Any) -> Path:
    """Write one JSON part atomically; returns its path. `relpath` ends with .json."""
    stage = Path(stage)
    _stage_name(stage)
    path = stage / _check_relpath(relpath, '.json')
    _atomic_write(path, json.dumps(obj, indent=2, sort_keys=True).encode())
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def _part_files(root: Path) -> list[Path]:
    """Every visible file below `root`, as sorted relative paths (hidden ones are scratch)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith('.')]
        for fname in filenames:
            if not fname.startswith('.'):
                found.append((Path(dirpath) / fname).relative_to(root))
    return sorted(found, key=lambda p: p.as_posix())


def commit_checkpoint(stage: str | os.PathLike[str], manifest: Mapping[str, Any] | None = None,
                      require: Iterable[str] = ()) -> Path:
    """Finish a checkpoint: write manifest.json, then rename the stage to its final name.

    `manifest` holds what the caller records (``preset``, ``parameters``,
    ``versions``, ``manual``, ...); the format, ami_ros version, name,
    created time and the list of files (``files``: relpath -> size, sha256;
    ``parts``: relpath without suffix -> its files) are added here. Every
    path in `require` must have been written, or nothing is committed (the
    stage stays, for `abort_checkpoint`). Call it only after every writer
    is done. Returns the final directory.
    """
    stage = Path(stage)
    final_name = _stage_name(stage)
    caller = dict(manifest or {})
    owned = [key for key in _OWNED_KEYS if key in caller]
    if owned:
        raise ValueError(f'manifest keys {", ".join(owned)} are set by commit_checkpoint')
    try:
        info = json.loads((stage / _STAGE_INFO).read_text())
    except (OSError, ValueError):
        raise CheckpointError(f'{stage} has no readable {_STAGE_INFO}: it was not made by begin_checkpoint '
                              'or was already committed; begin a new checkpoint') from None
    files = _part_files(stage)
    present = {rel.as_posix() for rel in files}
    missing = sorted(Path(r).as_posix() for r in require if Path(r).as_posix() not in present)
    if missing:
        raise CheckpointError(f'checkpoint {final_name} is missing {", ".join(missing)} '
                              '(a part was not saved); nothing was committed')
    # Leftover temporary files of a crashed writer are not part of the checkpoint.
    for dirpath, _, filenames in os.walk(stage):
        for fname in filenames:
            if fname.endswith('.tmp') and fname.startswith('.'):
                with contextlib.suppress(OSError):
                    os.unlink(Path(dirpath) / fname)
    parts: dict[str, list[str]] = {}
    for rel in files:
        parts.setdefault(rel.with_suffix('').as_posix(), []).append(rel.as_posix())
    full = {
        'format': FORMAT, 'format_version': FORMAT_VERSION, 'ami_ros_version': __version__,
        'name': final_name, 'created': info['created'], 'created_unix': info['created_unix'],
        **caller,
        'manual': bool(info['manual'] or caller.get('manual', False)),
        'parts': parts,
        'files': {rel.as_posix(): {'size': (stage / rel).stat().st_size, 'sha256': _sha256(stage / rel)}
                  for rel in files},
    }
    _atomic_write(stage / MANIFEST, json.dumps(full, indent=2, sort_keys=True).encode())
    (stage / _STAGE_INFO).unlink()
    # Every directory entry of the stage is durable before the rename publishes it.
    for dirpath, _, _ in os.walk(stage, topdown=False):
        fsync_dir(Path(dirpath))
    final = stage.parent / final_name
    if final.exists():  # begin_checkpoint's reservation makes this unreachable unless someone meddled
        raise CheckpointError(f'checkpoint {final} already exists; the save stays in {stage}')
    os.rename(stage, final)
    fsync_dir(stage.parent)
    return final


def abort_checkpoint(stage: str | os.PathLike[str]) -> None:
    """Throw away an unfinished checkpoint's staging directory."""
    stage = Path(stage)
    if stage.name.startswith('.') and stage.name.endswith(PARTIAL_SUFFIX):
        shutil.rmtree(stage, ignore_errors=True)
    else:
        _stage_name(stage)  # refuses anything that is not a stage


def load_manifest(path: str | os.PathLike[str], expected_preset: str | None = None,
                  verify: bool = False) -> dict[str, Any]:
    """Read and check a checkpoint's manifest; every problem is a one-line CheckpointError.

    Checks: manifest.json exists and parses, the format is one this build
    reads, the preset is `expected_preset` (when given), and every listed
    file exists with its listed size (and sha256 with `verify`).
    """
    path = Path(path)
    where = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f'checkpoint {path} does not exist; use another checkpoint')
    try:
        text = where.read_text()
    except FileNotFoundError:
        raise CheckpointError(f'checkpoint {path} has no {MANIFEST} (an unfinished save?); '
                              'use another checkpoint') from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f'cannot read {where} ({exc.__class__.__name__}); '
                              'use another checkpoint') from None
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise CheckpointError(f'{where} is damaged (not JSON: {exc}); use another checkpoint') from None
    if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
        raise CheckpointError(f'{where} is not an ami_ros checkpoint manifest; use another checkpoint')
    files = manifest.get('files')
    if not isinstance(files, dict):
        raise CheckpointError(f'{where} is damaged (no file list); use another checkpoint')
    version = manifest.get('format_version')
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f'checkpoint {path} has format version {version!r}, this ami_ros '
                              f'{__version__} reads up to {FORMAT_VERSION}; '
                              'upgrade ami_ros or use another checkpoint')
    if expected_preset is not None:
        preset = manifest.get('preset')
        if preset != expected_preset:
            saved = f'preset {preset!r}' if preset is not None else 'no preset recorded'
            hint = (f'preset:={preset} or another checkpoint' if isinstance(preset, str)
                    else 'another checkpoint')
            raise CheckpointError(f'checkpoint {path} was saved with {saved}, this graph runs '
                                  f'{expected_preset!r}; start with {hint}')
    for rel, entry in files.items():
        file = path / rel
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f'checkpoint {path} is missing {rel} (a part was lost); '
                                  'use another checkpoint') from None
        want = entry.get('size') if isinstance(entry, dict) else None
        if size != want:
            raise CheckpointError(f'checkpoint {path}: {rel} has {size} bytes, the manifest says {want} '
                                  '(truncated or damaged); use another checkpoint')
        if verify and _sha256(file) != entry.get('sha256'):
            raise CheckpointError(f'checkpoint {path}: {rel} does not match its sha256 in the manifest '
                                  '(damaged); use another checkpoint')
    return manifest


def _read_part(ckpt: Path, relpath: str | os.PathLike[str], suffix: str) -> bytes:
    rel = _check_relpath(relpath, suffix)
    try:
        return (ckpt / rel).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f'checkpoint {ckpt} is missing {rel.as_posix()} (a part was not saved); '
                              'use another checkpoint') from None
    except OSError as exc:
        raise CheckpointError(f'cannot read {ckpt / rel} ({exc.__class__.__name__}: {exc.strerror}); '
                              'use another checkpoint') from None


def read_tensors(ckpt: str | os.PathLike[str], relpath: str | os.PathLike[str], schema: str | None,
                 expected: Mapping[str, TensorSpec] | None = None, *, allow_extra: bool = False,
                 require_finite: bool = False) -> Envelope:
    """Load one tensor part on the CPU, checked against `schema` and `expected`.

    `require_finite` is off by default: a checkpoint restores exactly what
    was saved (its integrity is the manifest's sizes and hashes).
    """
    ckpt = Path(ckpt)
    blob = _read_part(ckpt, relpath, '.safetensors')
    try:
        return decode(blob, schema, expected, allow_extra=allow_extra, require_finite=require_finite)
    except EnvelopeError as exc:
        raise CheckpointError(f'checkpoint {ckpt}: {Path(relpath).as_posix()} cannot be used ({exc}); '
                              'use another checkpoint') from exc


def read_json(ckpt: str | os.PathLike[str], relpath: str | os.PathLike[str]) -> Any:
    """Load one JSON part."""
    ckpt = Path(ckpt)
    blob = _read_part(ckpt, relpath, '.json')
    try:
        return json.loads(blob)
    except ValueError as exc:
        raise CheckpointError(f'checkpoint {ckpt}: {Path(relpath).as_posix()} is damaged (not JSON: {exc}); '
                              'use another checkpoint') from None
