"""The weight push client: a trainer node sends its newest weights to the agent until taken.

Weights go to the agent as one `rcl_interfaces/srv/SetParameters` request,
one Parameter per model (name = model name, value = a weights envelope of
`core/schemas.py` as a 'file://' string, the 'sha256:' name of one sent on
the payload topic (`ros/weight_payload.py`, another machine), or inline
bytes; see the `sync_transport` parameter), so models that belong together
(the VAE's encoder and decoder) change together. With 'auto' (the default)
weights go as files until the agent answers that a file is not on its
machine, then over the payload topic for good.

The training thread encodes each round's weights (`encode`, writing their
files with 'file' transport) and leaves them in the pending slot (`offer`:
a newer round replaces an older one not yet sent). The executor's 0.2 s
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
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from rclpy.task import Future

from ami_ros.core.private_files import PrivateFileError, private_dir, weights_root, write_private
from ami_ros.core.schemas import encode_weights
from ami_ros.ros.weight_payload import FILE_NOT_HERE, PayloadSender

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

    def __init__(self, sync_dir: str, name: str) -> None:
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
        while len(paths) > self.KEEP:
            paths.pop(0).unlink(missing_ok=True)
        return f'file://{path}'

    def remove(self) -> None:
        if self.created:
            shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class PendingWeights:
    """Encoded weights of one version, waiting to be sent."""

    version: int
    envelopes: dict[str, bytes]  # model name -> weights envelope
    urls: dict[str, str] | None = None  # model name -> its file's 'file://' URL, where written

    def values(self, transport: str, sender: PayloadSender) -> list[ParameterValue]:
        """What the request carries per model with `transport` (sends the payloads first)."""
        if transport in ('auto', 'file') and self.urls is not None:
            return [ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=self.urls[name])
                    for name in self.envelopes]
        if transport == 'bytes':
            return [ParameterValue(type=ParameterType.PARAMETER_BYTE_ARRAY, byte_array_value=blob)
                    for blob in self.envelopes.values()]
        return [ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=sender.send(blob))
                for blob in self.envelopes.values()]


class WeightPush:
    """Pushes `models`' newest weights to the agent's weight service for `node`.

    Declares the node's `sync_*` parameters. `encode` and `offer` may be
    called from any thread; the rest runs on the node's executor.
    """

    def __init__(self, node: ManagedNode, models: tuple[str, ...], preset_name: str) -> None:
        self.node = node
        self.models = models
        self.preset_name = preset_name
        service = node.declare('sync_service', 'agent/sync_weights', "The agent's weight service.")
        self.retry = node.declare('sync_retry', 2.0, 'Seconds between tries while pushing weights '
                                  'fails.', low=0.1, high=600.0)
        self.timeout = node.declare('sync_timeout', 10.0, 'Seconds an unanswered push is given up '
                                    'after.', low=0.5, high=600.0)
        self.transport = node.declare(
            'sync_transport', 'auto', "How weights reach the agent: 'file' = an envelope file "
            "in sync_dir named by a file:// string (same machine; the cheapest for the agent); "
            "'topic' = 1 MiB uint8[] chunks on <sync_service>_payload, named by sha256 in the "
            "request (any machine; ros/weight_payload.py); 'auto' = 'file' until the agent "
            "answers that the file is not on its machine, then 'topic'; 'bytes' = inline byte "
            "arrays (any machine, but seconds of the agent's interpreter for the ami set).",
            choices=('auto', 'file', 'topic', 'bytes'))
        sync_dir = node.declare(
            'sync_dir', '', "Folder for 'file' transport: the files go to a private (0700) "
            "ami_ros_weights folder in it; '' = $XDG_RUNTIME_DIR, else a per-user folder in "
            "/dev/shm. The agent's sync_dir must be the same. Read at start.", read_only=True)
        self.files: WeightFiles | None = None
        if self.transport in ('auto', 'file'):
            try:
                self.files = WeightFiles(sync_dir, f'{node.get_name()}-{os.getpid()}')
            except (PrivateFileError, OSError) as exc:
                node.get_logger().warning(f"weights go by 'topic' transport, not as files: {exc}")
                self.transport = 'topic'
        self.payloads = PayloadSender(node, service)
        self._lock = threading.Lock()
        self._pending: PendingWeights | None = None  # under _lock
        # Executor-side state.
        self.client = node.create_client(SetParameters, service)
        self._in_flight: tuple[Future, PendingWeights, float] | None = None
        self._next_try = 0.0
        self.pushes_ok = 0
        self.pushes_failed = 0
        self.pushed_version = -1  # the last version the agent took
        self.last_sync = 'nothing pushed yet'
        node.create_timer(0.2, self._tick)

    @property
    def service_name(self) -> str:
        return self.client.service_name

    def encode(self, version: int, weights: dict[str, dict[str, torch.Tensor]],
               slot: Callable[[str], AbstractContextManager[None]] | None = None) -> PendingWeights:
        """The weights envelopes, written to files already with 'file' transport.

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
        """Send `pending` next, in place of older weights not yet sent."""
        with self._lock:
            self._pending = pending

    @property
    def pending(self) -> PendingWeights | None:
        """The weights to send next, if any."""
        with self._lock:
            return self._pending

    def status(self) -> dict[str, object]:
        """For the node's diagnostics."""
        pending = self.pending
        return {'pushes_ok': self.pushes_ok, 'pushes_failed': self.pushes_failed,
                'sync_transport': self.transport,
                'pushed_version': self.pushed_version,
                'pending_version': pending.version if pending else -1, 'last_sync': self.last_sync}

    def failing(self) -> bool:
        return self.last_sync not in ('ok', 'nothing pushed yet')

    def close(self) -> None:
        if self.files is not None:
            self.files.remove()

    # -- executor -------------------------------------------------------------
    def _tick(self) -> None:
        now = time.monotonic()
        if self._in_flight is not None:
            future, pending, sent_at = self._in_flight
            if not future.done() and now - sent_at > self.timeout:
                self._failed(pending, f'no answer within {self.timeout:.1f} s')
                self.client.remove_pending_request(future)
                future.cancel()
            return
        if not self.node.is_active or now < self._next_try:
            return
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        if not self.client.service_is_ready():
            self._failed(pending, f'{self.client.service_name} not available')
            return
        if self.transport == 'topic' and not self.payloads.matched():
            self._failed(pending, f'{self.payloads.publisher.topic_name} has no subscriber yet')
            return
        values = pending.values(self.transport, self.payloads)
        request = SetParameters.Request(parameters=[
            Parameter(name=name, value=value) for name, value in zip(pending.envelopes, values, strict=True)])
        future = self.client.call_async(request)
        self._in_flight = (future, pending, now)
        future.add_done_callback(self._on_done)

    def _on_done(self, future: Future) -> None:
        if self._in_flight is None or self._in_flight[0] is not future:
            return  # timed out earlier and already counted
        _, pending, _ = self._in_flight
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            self._failed(pending, f'call failed: {exc}')
            return
        results = future.result().results
        refused = [r.reason for r in results if not r.successful]
        if self.transport == 'auto' and refused and all(FILE_NOT_HERE in r for r in refused):
            # The agent runs on another machine: from now on the weights go over the topic.
            self.node.get_logger().info(f"the agent cannot read this machine's weight files "
                                        f"({refused[0]}); sending weights over "
                                        f'{self.payloads.publisher.topic_name}')
            self.transport = 'topic'
            self._in_flight = None
            with self._lock:
                if self._pending is None:
                    self._pending = pending
            return
        if refused or len(results) != len(pending.envelopes):
            self._failed(pending, 'refused: ' + ('; '.join(refused) or
                                                 f'{len(results)} results for '
                                                 f'{len(pending.envelopes)} models'))
            return
        self._in_flight = None
        self.pushes_ok += 1
        self.pushed_version = pending.version
        if self.last_sync != 'ok':  # the first, or the first after failures
            self.node.get_logger().info(f'agent took version {pending.version} of '
                                        f'{", ".join(pending.envelopes)} ({self.transport})')
        else:
            self.node.get_logger().debug(f'agent took version {pending.version}')
        self.last_sync = 'ok'

    def _failed(self, pending: PendingWeights, reason: str) -> None:
        """Count, log (throttled) and schedule the retry with the newest weights."""
        self._in_flight = None
        self.pushes_failed += 1
        self.last_sync = reason
        self._next_try = time.monotonic() + self.retry
        with self._lock:
            if self._pending is None:  # a newer round would replace it anyway
                self._pending = pending
        self.node.warn_throttled('sync', f'pushing version {pending.version} failed ({reason}); '
                                 f'retrying every {self.retry:g} s')
