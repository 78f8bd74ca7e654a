"""The weight push client: a trainer node sends its newest weights to every agent until taken.

Weights go to the agent as one `rcl_interfaces/srv/SetParameters` request,
one Parameter per model (name = model name, value = a weights envelope of
`core/schemas.py` as a 'file://' string, the 'sha256:' name of one sent on
the payload topic (`ros/weight_payload.py`, another machine), or inline
bytes; see the `sync_transport` parameter), so models that belong together
(the VAE's encoder and decoder) change together. With 'auto' (the default)
weights go as files until the agent answers that a file is not on its
machine, then over the payload topic for good.

With several agents (the trainer's `agents`), the same weights go to
`<agent namespace>/<sync_service>` of each; each agent is a target of its
own (`ros/weight_target.py`: its call, retries, transport and counters), so
one agent that is dead, missing or paused delays no other.

The training thread encodes each round's weights once (`encode`, writing
their files with 'file' transport, shared by all agents) and leaves them in
every agent's pending slot (`offer`: a newer round replaces an older one not
yet sent). The executor's 0.2 s
timer sends the pending weights with `call_async` and never waits on the
answer. If the service is missing, a call fails, times out or is refused,
one throttled line is logged and the newest pending weights are sent again
`sync_retry` s later: a trainer started before the agent, or an agent that
restarts, gets the weights once it is there. Nothing is sent while the node
is inactive (paused).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ami_ros.core.private_files import PrivateFileError, private_dir, weights_root, write_private
from ami_ros.core.schemas import encode_weights
from ami_ros.ros.weight_target import NOTHING_YET, PendingWeights, WeightTarget

if TYPE_CHECKING:
    from ami_ros.ros.managed_node import ManagedNode


class WeightFiles:
    """Weight envelopes handed to the agent as files, the newest few per model.

    They live in `<weights_root(sync_dir)>/<name>/`: a private folder (0700,
    this user's, checked when it exists already, so no other local user can
    pre-create it and swap the weights), written with O_EXCL|O_NOFOLLOW.
    PrivateFileError when the folder cannot be private.
    """

    KEEP = 3  # the agent may still be reading the one before the newest

    def __init__(self, sync_dir: str, name: str, keep: int = KEEP) -> None:
        self.keep = max(int(keep), 1)
        root = weights_root(sync_dir)
        private_dir(root)
        self.dir = root / name
        self._remove_orphans(root)
        # Removed at close only if made here: never a folder someone else made.
        self.created = private_dir(self.dir)
        self.written: dict[str, list[Path]] = {}

    @staticmethod
    def _remove_orphans(root: Path) -> None:
        """Remove the folders of trainers that died without cleaning up (SIGKILL).

        Only inside the private root, and only real folders of this user.
        """
        for old in root.glob('*-*'):
            pid = old.name.rsplit('-', 1)[1]
            if not pid.isdigit() or Path(f'/proc/{pid}').exists():
                continue
            with contextlib.suppress(OSError):
                info = old.lstat()
                if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
                    shutil.rmtree(old, ignore_errors=True)

    def write(self, model: str, version: int, blob: bytes) -> str:
        """Write atomically (the agent never sees half a file); the file:// URL."""
        path = self.dir / f'{model}-v{version}.safetensors'
        write_private(path, blob)
        paths = self.written.setdefault(model, [])
        paths.append(path)
        while len(paths) > self.keep:
            paths.pop(0).unlink(missing_ok=True)
        return f'file://{path}'

    def remove(self) -> None:
        if self.created:
            shutil.rmtree(self.dir, ignore_errors=True)


class WeightPush:
    """Pushes `models`' newest weights to the weight service of every agent of `agents`.

    `agents`: the agents' namespaces relative to `node`'s ('' = the node's own).
    Declares the node's `sync_*` parameters. `encode` and `offer` may be
    called from any thread; the rest runs on the node's executor.
    """

    def __init__(self, node: ManagedNode, models: tuple[str, ...], preset_name: str,
                 agents: Sequence[str] = ('',)) -> None:
        self.node = node
        self.models = models
        self.preset_name = preset_name
        service = node.declare('sync_service', 'agent/sync_weights', "The agent's weight service, "
                               "relative to each agent's namespace (see `agents`).")
        self.retry = node.declare('sync_retry', 2.0, 'Seconds between tries while pushing weights '
                                  'fails.', low=0.1, high=600.0)
        self.timeout = node.declare('sync_timeout', 10.0, 'Seconds an unanswered push is given up '
                                    'after.', low=0.5, high=600.0)
        self.transport = node.declare(
            'sync_transport', 'auto', "How weights reach the agent: 'file' = an envelope file "
            "in sync_dir named by a file:// string (same machine; the cheapest for the agent); "
            "'topic' = 1 MiB uint8[] chunks on <sync_service>_payload, named by sha256 in the "
            "request (any machine; ros/weight_payload.py); 'auto' = 'file' until the agent "
            "answers that the file is not on its machine, then 'topic' (per agent); 'bytes' = "
            "inline byte arrays (any machine, but seconds of the agent's interpreter for the ami set).",
            choices=('auto', 'file', 'topic', 'bytes'))
        sync_dir = node.declare(
            'sync_dir', '', "Folder for 'file' transport: the files go to a private (0700) "
            "ami_ros_weights folder in it; '' = $XDG_RUNTIME_DIR, else a per-user folder in "
            "/dev/shm. The agent's sync_dir must be the same. Read at start.", read_only=True)
        self.files: WeightFiles | None = None
        if self.transport in ('auto', 'file'):
            try:
                # Each agent may still read the version before the one it is sent.
                self.files = WeightFiles(sync_dir, f'{node.get_name()}-{os.getpid()}',
                                         keep=WeightFiles.KEEP + len(agents) - 1)
            except (PrivateFileError, OSError) as exc:
                node.get_logger().warning(f"weights go by 'topic' transport, not as files: {exc}")
                self.transport = 'topic'
        self.targets = [WeightTarget(node, ns, service, self.transport, self.retry, self.timeout)
                        for ns in agents]
        node.create_timer(0.2, self._tick)

    @property
    def service_name(self) -> str:
        return ', '.join(t.client.service_name for t in self.targets)

    def encode(self, version: int, weights: dict[str, dict[str, torch.Tensor]],
               slot: Callable[[str], AbstractContextManager[None]] | None = None) -> PendingWeights:
        """The weights envelopes, written to files already with 'file' transport (once for all agents).

        One model at a time, each inside `slot(kind)` where given (the trainer's pacing).
        """
        envelopes: dict[str, bytes] = {}
        urls: dict[str, str] = {}
        for name in self.models:
            with slot(f'encode {name}') if slot is not None else nullcontext():
                envelopes[name] = encode_weights(name, weights[name], version, self.preset_name)
                if self.files is not None and self.transport in ('auto', 'file'):
                    urls[name] = self.files.write(name, version, envelopes[name])
        return PendingWeights(version, envelopes, urls or None)

    def offer(self, pending: PendingWeights) -> None:
        """Send `pending` to every agent next, in place of older weights not yet sent."""
        for target in self.targets:
            target.offer(pending)

    @property
    def pending(self) -> PendingWeights | None:
        """The newest weights some agent has still to be sent, if any."""
        waiting = [p for p in (t.pending for t in self.targets) if p is not None]
        return max(waiting, key=lambda p: p.version) if waiting else None

    @property
    def last_sync(self) -> str:
        """'ok', NOTHING_YET, or the failure of the first agent whose last push failed."""
        failing = [t for t in self.targets if t.failing()]
        if failing:
            target = failing[0]
            return f'{target.namespace}: {target.last_sync}' if len(self.targets) > 1 else target.last_sync
        return 'ok' if any(t.last_sync == 'ok' for t in self.targets) else NOTHING_YET

    def status(self) -> dict[str, object]:
        """For the node's diagnostics: totals, and per agent where there are several."""
        pending = self.pending
        taken = [t.pushed_version for t in self.targets if t.pushed_version >= 0]
        transports = dict.fromkeys(t.transport for t in self.targets)
        status: dict[str, object] = {
            'pushes_ok': sum(t.pushes_ok for t in self.targets),
            'pushes_failed': sum(t.pushes_failed for t in self.targets),
            'sync_transport': ','.join(transports),
            # The lowest: what every agent that took weights holds at least.
            'pushed_version': min(taken) if taken else -1,
            'pending_version': pending.version if pending else -1, 'last_sync': self.last_sync}
        if len(self.targets) > 1:
            for target in self.targets:
                status[f'pushed_version/{target.namespace}'] = target.pushed_version
                status[f'last_sync/{target.namespace}'] = target.last_sync
        return status

    def failing(self) -> bool:
        """Whether any agent's last push failed."""
        return any(t.failing() for t in self.targets)

    def close(self) -> None:
        if self.files is not None:
            self.files.remove()

    def _tick(self) -> None:
        if not self.node.is_active:
            return  # paused: nothing is sent, the pending slots wait
        now = time.monotonic()
        for target in self.targets:
            target.tick(now)
