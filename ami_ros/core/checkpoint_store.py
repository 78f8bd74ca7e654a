"""The checkpoints of a directory (no ROS): list, resolve, keep the newest, clean up.

What makes a checkpoint complete, and how one is written and read, is in
`core/checkpoint.py`. Removal mirrors its atomic commit: a checkpoint is
renamed to a hidden ``.<name>.<tag>.deleting`` directory before anything in
it is deleted, so a crash half-way never leaves half a checkpoint that a
listing would take for whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from ami_ros.core.checkpoint import (
    DELETING_SUFFIX,
    LATEST,
    MANIFEST,
    PARTIAL_SUFFIX,
    CheckpointError,
    fsync_dir,
)

# --------------------------------------------------------------------------- listing


def _is_complete(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith('.') and (path / MANIFEST).is_file()


def _peek_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest for sorting and retention, or None when it does not parse."""
    try:
        data = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _sort_key(path: Path) -> tuple[float, str]:
    manifest = _peek_manifest(path)
    created = manifest.get('created_unix') if manifest else None
    if not isinstance(created, (int, float)):
        # A damaged manifest still lists (loading it says what is wrong); order it by file time.
        try:
            created = (path / MANIFEST).stat().st_mtime
        except OSError:
            created = 0.0
    return float(created), path.name


def list_checkpoints(checkpoint_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints in `checkpoint_dir`, oldest first (created time, then name)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _is_complete(p)), key=_sort_key)


def latest_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def resolve_checkpoint(arg: str | os.PathLike[str], checkpoint_dir: str | os.PathLike[str]) -> Path:
    """The checkpoint named by a launch argument: 'latest', a path, or a name in `checkpoint_dir`."""
    if str(arg) == LATEST:
        found = latest_checkpoint(checkpoint_dir)
        if found is None:
            raise CheckpointError(f'no checkpoint in {checkpoint_dir} (none was saved yet); '
                                  'start without checkpoint:= or give a checkpoint directory')
        return found
    path = Path(arg).expanduser()
    if not path.is_absolute() and not path.exists() and (Path(checkpoint_dir) / path).exists():
        path = Path(checkpoint_dir) / path
    if not path.is_dir():
        raise CheckpointError(f'checkpoint {path} does not exist; give a directory from {checkpoint_dir} '
                              f'or checkpoint:={LATEST}')
    if path.name.startswith('.'):
        raise CheckpointError(f'checkpoint {path} is an unfinished or deleted save; use another checkpoint')
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f'checkpoint {path} has no {MANIFEST} (not a checkpoint or an unfinished '
                              'save); use another checkpoint')
    return path



def manual_checkpoints(checkpoint_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints saved on request (never removed by retention), oldest first."""
    return [p for p in list_checkpoints(checkpoint_dir)
            if (manifest := _peek_manifest(p)) is None or manifest.get('manual') is not False]


def checkpoint_bytes(path: Path) -> int:
    """The size of a checkpoint's files."""
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += (Path(dirpath) / name).lstat().st_size
    return total


def save_refusal(checkpoint_dir: str | os.PathLike[str], max_manual: int | None,
                 reserve: int) -> str | None:
    """Why a new checkpoint may not be saved, or None.

    `max_manual`: for a save on request, how many manual checkpoints may be
    kept (retention never removes them). Free space: a save needs the newest
    checkpoint's size (the next one is about as large) and leaves `reserve`
    bytes free.
    """
    try:
        if max_manual is not None:
            count = len(manual_checkpoints(checkpoint_dir))
            if count >= max_manual:
                return (f'checkpoint not saved: {checkpoint_dir} holds {count} checkpoints saved on '
                        f'request already (max_manual_checkpoints {max_manual}); remove some by hand first')
        folder = Path(checkpoint_dir)
        while not folder.exists():  # not made yet: the disk it will be on
            folder = folder.parent
        newest = latest_checkpoint(checkpoint_dir)
        needed = reserve + (checkpoint_bytes(newest) if newest is not None else 0)
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        return f'checkpoint not saved: cannot look into {checkpoint_dir} ({exc.strerror})'
    if free >= needed:
        return None
    mib = 1 << 20
    return (f'checkpoint not saved: {free / mib:.0f} MiB free in {checkpoint_dir}, {needed / mib:.0f} MiB '
            'needed (the newest checkpoint plus min_free_mb)')


# --------------------------------------------------------------------------- cleaning


def _remove_dir(path: Path) -> None:
    """Hide, then delete: a crash half-way leaves a hidden directory, never half a checkpoint."""
    hidden = path.parent / f'.{path.name}.{secrets.token_hex(3)}{DELETING_SUFFIX}'
    os.rename(path, hidden)
    fsync_dir(path.parent)
    shutil.rmtree(hidden, ignore_errors=True)


def apply_retention(checkpoint_dir: str | os.PathLike[str], keep_last: int) -> list[Path]:
    """Remove all but the newest `keep_last` automatic checkpoints; returns what was removed.

    Manual checkpoints (a name given to begin_checkpoint, or manifest
    ``manual: true``) and ones whose manifest cannot be read are never
    removed. keep_last=0 keeps everything.
    """
    if keep_last < 0:
        raise ValueError(f'keep_last must be >= 0, got {keep_last}')
    if keep_last == 0:
        return []
    automatic = []
    for path in list_checkpoints(checkpoint_dir):
        manifest = _peek_manifest(path)
        if manifest is not None and manifest.get('manual') is False:
            automatic.append(path)
    doomed = automatic[:-keep_last] if len(automatic) > keep_last else []
    for path in doomed:
        _remove_dir(path)
    return doomed


def _newest_mtime(path: Path) -> float:
    newest = path.stat().st_mtime
    for dirpath, _, filenames in os.walk(path):
        for name in [*filenames, '.']:
            with contextlib.suppress(OSError):
                newest = max(newest, (Path(dirpath) / name).stat().st_mtime)
    return newest


def clean_partials(checkpoint_dir: str | os.PathLike[str], older_than_s: float = 3600.0,
                   now: float | None = None) -> list[Path]:
    """Remove unfinished saves (and interrupted deletions) untouched for `older_than_s` seconds.

    The age is that of the newest file inside, so a save still being
    written is left alone. Returns what was removed.
    """
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    current = time.time() if now is None else now
    removed = []
    for path in sorted(root.iterdir()):
        if not (path.is_dir() and path.name.startswith('.')
                and path.name.endswith((PARTIAL_SUFFIX, DELETING_SUFFIX))):
            continue
        try:
            age = current - _newest_mtime(path)
        except OSError:
            continue  # removed under our feet
        if age >= older_than_s:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
