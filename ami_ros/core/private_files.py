"""Files only this user can see or swap: private folders, exclusive writes, confined reads (no ROS).

The graph reads and writes on requests that anyone on its ROS domain can
send, so a path in a request is never trusted: reads are confined to one
private folder, and everything the graph writes is owner-only. Every refusal
is a `PrivateFileError` whose one line names the rule that was broken, never
what a refused file holds, its size, or whether it exists.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import tempfile
from pathlib import Path

PRIVATE_UMASK = 0o077  # outputs readable by their owner only
DIR_MODE = 0o700
FILE_MODE = 0o600
WEIGHTS_FOLDER = 'ami_ros_weights'


class PrivateFileError(ValueError):
    """A path that breaks a confinement rule; the text names the rule."""


def use_private_umask() -> None:
    """Create every later file and folder of this process owner-only."""
    os.umask(PRIVATE_UMASK)


def weights_root(sync_dir: str) -> Path:
    """The private folder holding the trainers' weight files, one subfolder per trainer.

    `sync_dir` '' = $XDG_RUNTIME_DIR (per user, in memory) when it is set and
    private, else a per-user folder in /dev/shm, else in the temporary directory.
    Trainers write here and the agent reads only from here: both ask this.
    """
    if sync_dir:
        return Path(sync_dir).absolute() / WEIGHTS_FOLDER
    runtime = os.environ.get('XDG_RUNTIME_DIR', '')
    if runtime and os.path.isabs(runtime):
        with contextlib.suppress(OSError):
            info = os.stat(runtime)
            if stat.S_ISDIR(info.st_mode) and _is_private(info):
                return Path(runtime) / WEIGHTS_FOLDER
    shared = '/dev/shm' if os.path.isdir('/dev/shm') else tempfile.gettempdir()
    return Path(shared) / f'{WEIGHTS_FOLDER}-{os.getuid()}'


def _is_private(info: os.stat_result) -> bool:
    return info.st_uid == os.getuid() and not info.st_mode & 0o077


def _not_private(path: Path, info: os.stat_result) -> str | None:
    """Why the folder `info` describes may not hold private files, or None."""
    if not stat.S_ISDIR(info.st_mode):
        return f'{path} is not a folder'
    if info.st_uid != os.getuid():
        return f'{path} belongs to another user (uid {info.st_uid})'
    if info.st_mode & 0o077:
        return f'{path} is open to other users (mode {stat.S_IMODE(info.st_mode):03o}, not 700)'
    return None


def private_dir(path: Path) -> bool:
    """Make `path` a private folder (0700, ours); True if this call created it.

    Missing parents are created 0700 too. An existing `path` is used only if
    it is a real folder (not a symlink), ours and closed to others;
    otherwise PrivateFileError says why, and nothing is changed.
    """
    path = Path(path)
    make_dirs(path.parent)
    try:
        os.mkdir(path, DIR_MODE)  # any umask only takes bits away: never more than 0700
        return True
    except FileExistsError:
        pass
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise PrivateFileError(f'{path} is a symlink, not a private folder')
    problem = _not_private(path, info)
    if problem:
        raise PrivateFileError(problem)
    return False


def make_dirs(path: Path) -> None:
    """Create `path` and its missing parents owner-only (0700); existing ones are left as they are."""
    path = Path(path)
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another process
            os.mkdir(folder, DIR_MODE)


def write_private(path: Path, data: bytes, durable: bool = False) -> None:
    """Write `path` (0600) so readers see the old file or the whole new one.

    The data goes to a fresh hidden temporary file beside it, created with
    O_EXCL|O_NOFOLLOW (never through a planted symlink, never into a file
    someone else opened first), then is renamed onto `path`. With `durable`
    the data is fsynced before the rename.
    """
    path = Path(path)
    tmp = path.parent / f'.{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp'
    try:
        with open(tmp, 'wb', opener=_exclusive_opener) as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _exclusive_opener(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)


def read_confined(path: str, root: Path, max_bytes: int, what: str = 'file') -> bytes:
    """The bytes of the regular file `path`, which must lie inside the private folder `root`.

    Rules, each refused with a PrivateFileError naming it: an absolute path
    without '.' or '..', inside `root`; `root` a real folder of this user
    closed to others; no symlink on the way (every component is opened with
    O_NOFOLLOW, relative to the one before, so nothing can be swapped between
    a check and the open); a regular file (opened O_NONBLOCK, so a FIFO
    never blocks), of this user, at most `max_bytes` long.
    """
    root = Path(os.path.abspath(root))
    if not os.path.isabs(path):
        raise PrivateFileError(f'a {what} path must be absolute')
    parts = [p for p in path.split('/') if p]
    if any(p in ('.', '..') for p in parts):
        raise PrivateFileError(f"a {what} path may not hold '.' or '..'")
    inside = parts[:len(root.parts) - 1] == list(root.parts[1:]) and len(parts) > len(root.parts) - 1
    if not inside:
        raise PrivateFileError(f'{what}s are read only from {root}')
    rel = parts[len(root.parts) - 1:]
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(root, flags | os.O_DIRECTORY)
    except OSError as exc:
        raise PrivateFileError(f'{what}s are read only from {root}, which cannot be opened '
                               f'({errno.errorcode.get(exc.errno, exc.errno)})') from None
    try:
        problem = _not_private(root, os.fstat(fd))
        if problem:
            raise PrivateFileError(f'{what}s are read only from a private folder: {problem}')
        for i, name in enumerate(rel):
            last = i == len(rel) - 1
            try:
                child = os.open(name, flags | (os.O_NONBLOCK if last else os.O_DIRECTORY), dir_fd=fd)
            except OSError as exc:
                raise PrivateFileError(_open_problem(exc, fd, name, root, what)) from None
            os.close(fd)
            fd = child
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PrivateFileError(f'a {what} must be a regular file')
        if info.st_uid != os.getuid():
            raise PrivateFileError(f'a {what} must belong to this user')
        if info.st_size > max_bytes:
            raise PrivateFileError(f'a {what} may hold at most {max_bytes} bytes')
        with open(fd, 'rb', closefd=False) as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:  # grew after the fstat
            raise PrivateFileError(f'a {what} may hold at most {max_bytes} bytes')
        return data
    finally:
        os.close(fd)


def _open_problem(exc: OSError, dir_fd: int, name: str, root: Path, what: str) -> str:
    """The rule an open of `name` inside `root` broke, from its errno and its lstat (never its target)."""
    try:
        info = os.lstat(name, dir_fd=dir_fd)
    except OSError:
        return f'no such {what} in {root}'
    if stat.S_ISLNK(info.st_mode):
        return f'symlinks are not followed inside {root}'
    if exc.errno == errno.ENOTDIR:
        return f'no such {what} in {root} (a part of the path is not a folder)'
    return f'cannot open that {what} ({errno.errorcode.get(exc.errno, exc.errno)})'
