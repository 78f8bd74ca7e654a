"""The shared shell of the trainer nodes: learn in a thread, push weights back.

A trainer node wraps one trainer of the learning core (`core/trainers.py`).
Its executor only collects data (subscription callbacks call the trainer's
thread-safe `add`) and talks to the agent; the optimisation runs in a
background thread, so collecting never stops while a round trains:

    training thread: while running: if active and trainer.ready():
                         train_round() -> metrics; encode the new weights
                         (and write their files, with 'file' transport);
                         leave them in the `pending` slot (a newer round
                         replaces an older, not yet sent, one)
    executor:        a 0.2 s timer sends the pending weights with
                     call_async(agent/sync_weights); never waits on it

Weights go to the agent as one `rcl_interfaces/srv/SetParameters` request,
one Parameter per model (name = model name, value = a weights envelope of
`core/schemas.py`, as a 'file://' string by default or inline bytes; see
`sync_transport`), so the VAE's encoder and decoder
change together. If the service is missing, a call fails, times out or is
refused, one throttled line is logged and the newest pending weights are sent
again `sync_retry` s later: a trainer started before the agent, or an agent
that restarts, gets the weights once it is there.

Versions: every trainer starts from `build_models(preset, seed)` with the
agent's seed, so both hold identical initial weights, version 0. A round
makes the next version (1, 2, ...), the version pushed. A restarted trainer
without a checkpoint starts again at 0; the agent accepts whatever version it
is sent and reports it. Restored from a checkpoint, it continues from the
saved version.

Checkpoints (`ami_ros/ros/checkpoint_part.py`; the manager pauses the graph,
then calls `<node name>/save_checkpoint`). A trainer's part, in the
checkpoint directory:

  trainers/<node name>/state.safetensors  envelope 'trainer/<node name>':
                                          model weights, optimiser tensors,
                                          the minibatch generator
  trainers/<node name>/state.json         counters (rounds, version), the
                                          optimiser's non-tensor state
  data/<node name>/buffer.safetensors     envelope 'buffer/<node name>': the
                                          buffer's contents and generator
  data/<node name>/buffer.json            the buffer's counters

A save waits (up to 120 s) for a running round to end, so the state is never
caught half-way through one; it is taken while no round runs and the
executor delivers no data. At start with `checkpoint:=<dir>` the node
restores all of it before its training thread starts and before it
subscribes; a missing or damaged file, or one that does not fit this
trainer, refuses the start with one line naming it. The weights go to the
agent again on activation unless the checkpoint's models/ already hold
exactly them. A checkpoint without this trainer's part (saved while it did
not run) starts it with an empty buffer and a fresh optimiser, from the
agent's saved weights in models/<model>.safetensors and their version when
those are there (else from the seed weights, version 0), with a warning.

Pause (lifecycle deactivate): no round starts, incoming data is ignored (the
agent is paused too, and the step after a pause is marked as a break), and
pending weights wait until activation. A round already running finishes;
at shutdown it is given up at its next pause point (a layer or a minibatch)
so the process ends at once.

The process yields the CPU to the acting agent: `nice` is added to every
thread of the process before any worker thread starts (later threads inherit
it; at 19 the threads also run SCHED_IDLE, only when a core is otherwise
idle), and torch runs `torch_threads` intra-op threads (default 1). Priority
alone does not keep a trainer on the other core from slowing the agent's
step (shared caches and memory bandwidth), so the trainer also keeps out of
the agent's steps in time: the frames' capture stamps (camera/image_raw for
the VAE trainer, each experience step's stamp for the others) give the
frames' rhythm, and each minibatch and each encoding (and file) of new
weights starts only where it fits: never within `guard_ms` before a frame's
capture nor `quiet_ms` after it (`core/timing.py` FrameRhythm; the
windows take at most half of the frames' period). The trainer pauses before
every layer's forward and gradient and every slice of its optimiser step
(`core/trainers.py` SlicedOptimizer), and starts each of these pieces only
where its learnt length fits, so even a minibatch longer than a frame
period keeps out of the agent's steps.

Parameters (every trainer node):
  preset               model preset (the agent's; core/presets.py)
  device               torch device for training: cpu, cuda, cuda:N
  seed                 seed of the initial weights (the agent's seed) and
                       of the trainer's minibatch order
  torch_threads        torch intra-op threads of this process (1)
  nice                 niceness added at start, 0..19 (19: SCHED_IDLE)
  cpus                 CPUs the process may use, taskset style ('1-3');
                       '' = all (default)
  min_new              new samples before a round; 0 = the preset's value
                       (for the policy trainer: PPO steps per update)
  learning_rate        the optimiser's learning rate; 0 = the preset's
                       (REFERENCE.md). A restored optimiser keeps its
                       moments and takes this rate
  min_round_interval   seconds at least between two round starts (0)
  quiet_ms             milliseconds after each frame's capture in which
                       the trainer computes nothing (25; 0 = off, for a
                       trainer on another machine)
  guard_ms             milliseconds before each frame's capture in which
                       no new piece of training starts (12)
  sync_service         the agent's weight service ('agent/sync_weights')
  sync_retry           seconds between tries while pushing fails (2.0)
  sync_timeout         seconds an unanswered push is given up after (10.0)
  sync_transport       'file' (default): the weights envelope is written to
                       sync_dir and named by a 'file://' string value, so no
                       large message crosses DDS into the agent's
                       interpreter; 'bytes': inline byte_array values, for a
                       trainer on another machine
  sync_dir             where 'file' transport writes ('' = /dev/shm)
  max_batches          (VAE and dynamics trainers) minibatches per epoch at
                       most; 0 = the trainer's default

Diagnostics (/diagnostics, status named after the node, every second):
  preset, device, learning_rate (the rate it trains at), active, rounds,
  version, buffer (fill "len/capacity"), buffer_len, buffer_capacity,
  new_count, pushes_ok, pushes_failed, pushed_version (the last version
  the agent accepted; -1 none yet), pending_version (-1 none),
  last_sync ('ok' or the last failure's reason), train_errors,
  restored_from (the checkpoint restored at start, '' none), restored_part
  ('trainer': the whole part; 'models': the agent's weights only; 'none':
  the checkpoint held neither; '' no checkpoint), frame_period_ms (the
  frames' rhythm it keeps out of; 0 none seen), quiet_waited_s (time spent
  waiting for room between the agent's steps), and the last
  round's metrics under the trainer's own names, formatted with 6
  significant digits:
    vae_trainer       loss, reconstruction, kl, grad_norm
    dynamics_trainer  loss, loss_last_epoch, grad_norm; with inverse-dynamics
                      features (preset small-icm) also latent_loss,
                      feature_loss, inverse_loss, inverse_turn_accuracy;
                      with an ensemble (small-ensemble) latent_loss,
                      ensemble_loss, disagreement; with an expected-error
                      head (small-aleatoric) latent_loss,
                      expected_error_loss, expected_error, unexpected_error
    policy_trainer    loss, policy_loss, value_loss, entropy, approx_kl,
                      clip_fraction, grad_norm, reward_mean, advantage_mean,
                      return_mean, policy_version_min
  and for every trainer batches, samples and seconds (the round's duration).
  Node-specific keys are listed in each node's docstring.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from rclpy.lifecycle import LifecycleState, TransitionCallbackReturn
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.task import Future
from std_msgs.msg import UInt8MultiArray
from torch import nn

from ami_ros.core.agent import resolve_device
from ami_ros.core.checkpoint import (
    CheckpointError,
    load_manifest,
    read_json,
    read_tensors,
    write_json,
    write_tensors,
)
from ami_ros.core.envelope import EnvelopeError, specs_of
from ami_ros.core.models import build_models
from ami_ros.core.presets import DEFAULT_PRESET, PRESETS, Preset, get_preset, with_overrides
from ami_ros.core.schemas import ExperienceStep, decode_experience, encode_weights, weights_schema
from ami_ros.core.timing import FrameRhythm
from ami_ros.ros.checkpoint_part import CheckpointPart
from ami_ros.ros.diagnostics import NodeDiagnostics
from ami_ros.ros.managed_node import ManagedNode

# Matches the agent's experience publisher: reliable, deep enough that a
# trainer busy for a moment loses no step.
EXPERIENCE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100,
                            reliability=ReliabilityPolicy.RELIABLE)

# Metrics that are counters of the round rather than measures: published as ints.
_COUNT_METRICS = ('batches', 'samples')

# Time kept free for the agent after each frame's capture: its policy and the
# action's way out (p99 a few ms on a CPU) with room for a slow step.
DEFAULT_QUIET_MS = 25
# ... and before it: an optimiser step, which cannot pause, may start just before.
DEFAULT_GUARD_MS = 12

# How long a checkpoint save waits for a running training round to end.
SAVE_WAIT_S = 120.0
# Format of the JSON files of a trainer's checkpoint part.
PART_FORMAT = 1


def _jsonable(value: Any, where: str) -> Any:
    """`value` as plain JSON types (tuples become lists); anything else is refused.

    Non-finite floats stay (Python's json writes and reads them back)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    raise CheckpointError(f'cannot save {where}: a {type(value).__name__} is not JSON')


def yield_cpu(nice: int) -> None:
    """Lower every thread of this process so the acting agent wins the CPU.

    Linux keeps a niceness per thread: os.nice() alone would miss the DDS
    threads rclpy started before the node existed. Later threads inherit
    from their creator. At nice 19 the threads also go to SCHED_IDLE, which
    runs them only when no normal task wants the core.
    """
    def lower(tid: int) -> None:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        if nice >= 19 and hasattr(os, 'SCHED_IDLE'):
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))

    _for_every_thread(lower)


def _for_every_thread(apply: Callable[[int], None]) -> None:
    """`apply(tid)` to every thread of this process that still exists."""
    for tid in os.listdir('/proc/self/task'):
        try:
            apply(int(tid))
        except (OSError, ValueError):  # a thread that just ended
            pass


def parse_cpu_list(spec: str) -> set[int]:
    """CPU ids from a taskset-style list ('1', '1-3', '0,2-3'); empty = none given."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(','))):
        low, _, high = part.partition('-')
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise ValueError(f"cpus {spec!r}: {part!r} is not a CPU id or a range like '1-3'") \
                from None
        if first < 0 or last < first:
            raise ValueError(f"cpus {spec!r}: {part!r} is not a range of CPU ids")
        cpus.update(range(first, last + 1))
    return cpus


def pin_cpus(cpus: set[int]) -> None:
    """Run every thread of this process on `cpus` only (later threads inherit it)."""
    usable = os.sched_getaffinity(0)
    if not cpus <= usable:
        raise ValueError(f'cpus {sorted(cpus)} are not all usable here; this process may use '
                         f'{sorted(usable)}')
    _for_every_thread(lambda tid: os.sched_setaffinity(tid, cpus))


class WeightFiles:
    """Weight envelopes handed to the agent as files, the newest few per model."""

    KEEP = 3  # the agent may still be reading the one before the newest

    def __init__(self, base: str, name: str) -> None:
        root = Path(base) if base else Path('/dev/shm' if os.path.isdir('/dev/shm')
                                            else tempfile.gettempdir())
        self.dir = root / 'ami_ros_weights' / name
        self.written: dict[str, list[Path]] = {}
        self._remove_orphans(self.dir.parent)

    @staticmethod
    def _remove_orphans(parent: Path) -> None:
        """Remove directories of trainers that died without cleaning up (SIGKILL)."""
        for old in parent.glob('*-*'):
            pid = old.name.rsplit('-', 1)[1]
            if pid.isdigit() and not Path(f'/proc/{pid}').exists():
                shutil.rmtree(old, ignore_errors=True)

    def write(self, model: str, version: int, blob: bytes) -> str:
        """Write atomically (the agent never sees half a file); the file:// URL."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f'{model}-v{version}.safetensors'
        tmp = path.with_suffix('.tmp')
        tmp.write_bytes(blob)
        os.replace(tmp, path)
        paths = self.written.setdefault(model, [])
        paths.append(path)
        while len(paths) > self.KEEP:
            paths.pop(0).unlink(missing_ok=True)
        return f'file://{path}'

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class RoundGivenUp(Exception):
    """Raised at a pause point of a round when its node stops: the round is given up."""


@dataclass
class PendingWeights:
    """Encoded weights of one version, waiting to be sent."""

    version: int
    blobs: dict[str, bytes | str]  # model name -> weights envelope, or its 'file://' URL


class TrainerNode(ManagedNode):
    """Base of vae_trainer, dynamics_trainer and policy_trainer.

    A subclass sets `pushed_models`, `min_new_field` (preset section and
    field that `min_new` overrides) and `caps_batches`, builds its trainer in
    `make_trainer`, subscribes to its data in `__init__` (after calling this
    one) and reports its buffer in `buffer_status`.
    """

    pushed_models: tuple[str, ...] = ()
    min_new_field: tuple[str, str] = ('', '')
    caps_batches = False  # whether the trainer takes max_batches

    def __init__(self, node_name: str, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        preset_name = self.declare('preset', DEFAULT_PRESET, 'Model preset, the agent\'s (core/presets.py).',
                                   choices=tuple(PRESETS))
        device = self.declare('device', 'cpu', 'Torch device for training: cpu, cuda or cuda:N.')
        seed = self.declare('seed', 0, 'Seed of the initial weights (use the agent\'s) and of '
                            'the minibatch order.', low=0, high=2**31 - 1)
        threads = self.declare('torch_threads', 1, 'Torch intra-op threads of this process.',
                               low=1, high=64)
        nice = self.declare('nice', 19, 'Niceness added at start so the acting agent wins the '
                            'CPU (0 = none).', low=0, high=19)
        min_new = self.declare('min_new', 0, 'New samples before a round; 0 = the preset\'s '
                               'value.', low=0, high=1_000_000)
        learning_rate = self.declare('learning_rate', 0.0, 'The optimiser\'s learning rate; '
                                     '0 = the preset\'s. Read at start; a restored optimiser '
                                     'keeps its moments and takes this rate.', low=0.0, high=1.0)
        max_batches = 0
        if self.caps_batches:
            max_batches = self.declare('max_batches', 0, 'Minibatches per epoch at most, so a '
                                       'round stays short on a CPU; 0 = the trainer\'s default.',
                                       low=0, high=1_000_000)
        self.min_round_interval = self.declare(
            'min_round_interval', 0.0, 'Seconds at least between two round starts.',
            low=0.0, high=3600.0)
        quiet_ms = self.declare(
            'quiet_ms', DEFAULT_QUIET_MS, 'Milliseconds after each frame\'s capture in which this '
            'trainer computes nothing, so the agent steps alone (0 = off; for a trainer on '
            'another machine).', low=0, high=1000)
        guard_ms = self.declare(
            'guard_ms', DEFAULT_GUARD_MS, 'Milliseconds before each frame\'s capture in which no '
            'new piece of training starts (the longest piece that cannot be split).',
            low=0, high=1000)
        # Frames' capture stamps (subclasses report them) tell when the agent steps.
        self.rhythm = FrameRhythm(quiet_ms / 1000.0, guard_ms / 1000.0)
        self.sync_service = self.declare('sync_service', 'agent/sync_weights',
                                         'The agent\'s weight service.')
        self.sync_retry = self.declare('sync_retry', 2.0, 'Seconds between tries while pushing '
                                       'weights fails.', low=0.1, high=600.0)
        self.sync_timeout = self.declare('sync_timeout', 10.0, 'Seconds an unanswered push is '
                                         'given up after.', low=0.5, high=600.0)
        self.sync_transport = self.declare(
            'sync_transport', 'file', "How weights reach the agent: 'file' = an envelope file "
            "in sync_dir named by a file:// string (same machine; no copy through DDS, which "
            "costs the agent's interpreter time); 'bytes' = inline byte arrays (any machine).",
            choices=('file', 'bytes'))
        sync_dir = self.declare('sync_dir', '', "Directory for 'file' transport; '' = /dev/shm "
                                '(memory) if present, else the temporary directory.')
        self._sync_dir = WeightFiles(sync_dir, f'{self.get_name()}-{os.getpid()}')
        cpus = parse_cpu_list(self.declare(
            'cpus', '', "CPUs the trainer may use, taskset style ('1', '1-3'); '' = all. "
            "Keeping trainers off the agent's core spares it their cache traffic."))
        # Before torch starts its pools and before our thread: threads inherit
        # the creator's niceness and CPU set on Linux.
        if nice:
            yield_cpu(nice)
        if cpus:
            pin_cpus(cpus)
        torch.set_num_threads(threads)
        self.preset = self._with_overrides(get_preset(preset_name), min_new, learning_rate)
        resolve_device(device)  # a clear error for a missing CUDA, before building anything
        self.trainer = self.make_trainer(self.preset, build_models(self.preset, seed=seed),
                                         device, seed, max_batches)
        self.trainer.pause_with(self._pause_training)

        # Shared between the training thread and the executor, under _lock.
        self._lock = threading.Lock()
        # Held by the training thread for a whole round, and by a checkpoint
        # save while it takes the state: a save never sees half a round.
        self._round_lock = threading.Lock()
        self._pending: PendingWeights | None = None
        self._metrics: dict[str, float] = {}
        self.train_errors = 0
        # Executor-side push state.
        self.client = self.create_client(SetParameters, self.sync_service)
        self._in_flight: tuple[Future, PendingWeights, float] | None = None
        self._next_try = 0.0
        self.pushes_ok = 0
        self.pushes_failed = 0
        self.pushed_version = -1
        self.last_sync = 'nothing pushed yet'
        self.create_timer(0.2, self._push_tick)

        self.diagnostics = NodeDiagnostics(self, update=self._update_diagnostics)
        self.diagnostics.set(preset=preset_name, device=device,
                             learning_rate=f'{getattr(self.preset, self.min_new_field[0]).lr:g}')

        # Restore (checkpoint:=) before training can start and before any data
        # arrives (subclasses subscribe after this constructor), so a restored
        # trainer never trains from fresh state first.
        self.restored_part = ''
        self.checkpoints = CheckpointPart(self, self._save_part, self._restore_part,
                                          preset=self.preset.name,
                                          after_save=self.diagnostics.report)

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._train_loop, name=f'{node_name}_training',
                                        daemon=True)
        self._thread.start()
        self.get_logger().info(
            f'{node_name} ready: preset {preset_name} on {device}, {threads} torch thread(s), '
            f'nice +{nice}, cpus {",".join(map(str, sorted(cpus))) or "all"}; '
            f'pushing {", ".join(self.pushed_models)} to {self.sync_service}')

    # -- for subclasses ---------------------------------------------------
    def make_trainer(self, preset: Preset, models: dict[str, nn.Module], device: str, seed: int,
                     max_batches: int) -> Any:
        raise NotImplementedError

    def buffer_status(self) -> dict[str, object]:
        """buffer_len, buffer_capacity and what else the buffer tells (new_count...)."""
        raise NotImplementedError

    def before_round(self) -> None:
        """Called on the training thread right before a round (policy staleness)."""

    def node_status(self) -> dict[str, object]:
        """Extra diagnostics of the node (called on the executor)."""
        return {}

    # -- training thread --------------------------------------------------
    def _with_overrides(self, preset: Preset, min_new: int, learning_rate: float) -> Preset:
        """The preset with this node's min_new and learning_rate, where set (0 = the preset's)."""
        section, name = self.min_new_field
        values: dict[str, Any] = {}
        if min_new:
            values[name] = int(min_new)
        if learning_rate:
            values['lr'] = float(learning_rate)
        return with_overrides(preset, **{section: values}) if values else preset

    def _pause_training(self, site: str) -> None:
        """Between two pieces of a round: give the round up at stop, else keep out of the agent's steps."""
        if self._stop.is_set():
            raise RoundGivenUp('the node is stopping')
        self.rhythm.pause(site)

    def _train_loop(self) -> None:
        last_start = -float('inf')
        while not self._stop.is_set():
            wait = last_start + self.min_round_interval - time.monotonic()
            if not self.is_active or wait > 0 or not self.trainer.ready():
                self._stop.wait(min(max(wait, 0.05), 0.2))
                continue
            last_start = time.monotonic()
            try:
                with self._round_lock:  # a checkpoint save waits for the whole round
                    if not self.is_active:  # paused while a save held the lock
                        continue
                    self.before_round()
                    if not self.trainer.ready():  # staleness may have emptied it
                        continue
                    metrics = self.trainer.train_round()
                    version = int(self.trainer.version)
                    with self.rhythm.slot('weights'):
                        weights = self.trainer.weights()
                pending = self._encode(version, weights)
            except Exception as exc:  # noqa: BLE001 - a failed round must not end training
                if self._stop.is_set():
                    return  # given up at stop (RoundGivenUp, however torch passed it on)
                with self._lock:
                    self.train_errors += 1
                self.warn_throttled('train', f'training round failed: {type(exc).__name__}: {exc}')
                self._stop.wait(1.0)  # no hot loop on a persistent failure
                continue
            with self._lock:
                self._metrics = metrics
                self._pending = pending  # replaces an older one that was not sent yet
            self.get_logger().info(
                f'round {int(metrics["round"])}: version {version}, loss {metrics.get("loss", 0):.4g}, '
                f'{metrics["seconds"]:.2f} s')

    def _encode(self, version: int, weights: dict[str, dict[str, torch.Tensor]]) -> PendingWeights:
        """The weights envelopes, written to files already with 'file' transport.

        On the training thread, one model at a time, each where it fits
        between two agent steps.
        """
        blobs: dict[str, bytes | str] = {}
        for name in self.pushed_models:
            with self.rhythm.slot(f'encode {name}'):
                blob = encode_weights(name, weights[name], version, self.preset.name)
                blobs[name] = (self._sync_dir.write(name, version, blob)
                               if self.sync_transport == 'file' else blob)
        return PendingWeights(version, blobs)

    # -- checkpoints (executor / constructor) -----------------------------
    def _part_paths(self) -> dict[str, str]:
        name = self.get_name()
        return {'state': f'trainers/{name}/state.safetensors', 'state_json': f'trainers/{name}/state.json',
                'buffer': f'data/{name}/buffer.safetensors', 'buffer_json': f'data/{name}/buffer.json'}

    def _save_part(self, stage: Path) -> None:
        """Write this trainer's part into the staging directory `stage`.

        The state is taken while no round runs (waiting up to SAVE_WAIT_S for
        one to end) on the executor, so no data arrives meanwhile either; the
        files are written afterwards from those copies.
        """
        name = self.get_name()
        if not self._round_lock.acquire(timeout=SAVE_WAIT_S):
            raise CheckpointError(f'{name}: a training round did not finish within {SAVE_WAIT_S:g} s; '
                                  'its part was not saved (try again later)')
        try:
            tensors, info = self.trainer.state_dict()
            buffer_tensors, buffer_info = self.trainer.buffer.state_dict()
        finally:
            self._round_lock.release()
        paths = self._part_paths()
        meta = {'node': name, 'trainer': self.trainer.kind, 'preset': self.preset.name,
                'rounds': int(info['rounds']), 'version': int(info['version'])}
        # JSON first: a failure there leaves no tensor file without its counters.
        state_json = {'format': PART_FORMAT, **meta, 'state': _jsonable(info, paths['state_json'])}
        buffer_json = {'format': PART_FORMAT, 'node': name,
                       'state': _jsonable(buffer_info, paths['buffer_json'])}
        write_tensors(stage, paths['state'], tensors, f'trainer/{name}', meta)
        write_json(stage, paths['state_json'], state_json)
        write_tensors(stage, paths['buffer'], buffer_tensors, f'buffer/{name}',
                      {'node': name, 'buffer': str(buffer_info.get('kind', ''))})
        write_json(stage, paths['buffer_json'], buffer_json)
        self.get_logger().info(f'saved checkpoint part: {meta["rounds"]} rounds, version '
                               f'{meta["version"]}, buffer {self.buffer_status()["buffer_len"]}')

    def _restore_part(self, ckpt: Path) -> None:
        """Restore from checkpoint `ckpt` (its manifest is already checked); see the module doc."""
        name = self.get_name()
        files = load_manifest(ckpt)['files']
        if any(rel.startswith((f'trainers/{name}/', f'data/{name}/')) for rel in files):
            self._restore_trainer(ckpt)
            self._queue_restored_weights(ckpt, files)
            self.restored_part = 'trainer'
        else:
            self.restored_part = self._restore_models(ckpt, files)
        self.get_logger().info(
            f'restored ({self.restored_part}): {self.trainer.rounds} rounds, version '
            f'{self.trainer.version}, buffer {self.buffer_status()["buffer_len"]}')

    @staticmethod
    def _state_of(ckpt: Path, relpath: str) -> dict[str, Any]:
        data = read_json(ckpt, relpath)
        if not isinstance(data, dict) or not isinstance(data.get('state'), dict):
            raise CheckpointError(f'checkpoint {ckpt}: {relpath} is damaged (no "state" object); '
                                  'use another checkpoint')
        if data.get('format') != PART_FORMAT:
            raise CheckpointError(f'checkpoint {ckpt}: {relpath} has format {data.get("format")!r}, '
                                  f'this ami_ros reads {PART_FORMAT}; use another checkpoint')
        return data['state']

    def _restore_trainer(self, ckpt: Path) -> None:
        name = self.get_name()
        paths = self._part_paths()
        state = read_tensors(ckpt, paths['state'], f'trainer/{name}')
        info = self._state_of(ckpt, paths['state_json'])
        buffer = read_tensors(ckpt, paths['buffer'], f'buffer/{name}')
        buffer_info = self._state_of(ckpt, paths['buffer_json'])
        for relpath, load in ((paths['state'], lambda: self.trainer.load_state_dict(state.tensors, info)),
                              (paths['buffer'], lambda: self.trainer.buffer.load_state_dict(
                                  dict(buffer.tensors), buffer_info))):
            try:
                load()
            except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
                raise CheckpointError(f'checkpoint {ckpt}: {relpath} does not fit this {name} '
                                      f'({type(exc).__name__}: {exc}); use another checkpoint') from exc

    def _read_models(self, ckpt: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int]]:
        """The agent's saved weights of the pushed models, checked against ours, and their versions."""
        weights, versions = {}, {}
        for model in self.pushed_models:
            relpath = f'models/{model}.safetensors'
            env = read_tensors(ckpt, relpath, weights_schema(model),
                               specs_of(self.trainer.models[model].state_dict()))
            try:
                versions[model] = env.int_meta('version', 0)
            except EnvelopeError as exc:
                raise CheckpointError(f'checkpoint {ckpt}: {relpath} cannot be used ({exc}); '
                                      'use another checkpoint') from None
            weights[model] = env.tensors
        return weights, versions

    def _restore_models(self, ckpt: Path, files: dict[str, Any]) -> str:
        """No part of ours: start from the agent's saved weights if there are any."""
        name = self.get_name()
        missing = f'holds no {name} part (trainers/{name}/, data/{name}/; saved without this trainer?)'
        if not any(f'models/{model}.safetensors' in files for model in self.pushed_models):
            self.get_logger().warning(
                f'checkpoint {ckpt} {missing} and no models/ weights of {", ".join(self.pushed_models)}: '
                'starting fresh from the seed weights, version 0')
            return 'none'
        weights, versions = self._read_models(ckpt)  # all of them: a missing one names its file
        self.trainer.load_weights(weights)
        self.trainer.version = max(versions.values())
        self.get_logger().warning(
            f'checkpoint {ckpt} {missing}: starting with an empty buffer and a fresh optimiser from '
            f'the saved weights of {", ".join(self.pushed_models)}, version {self.trainer.version}')
        return 'models'

    def _queue_restored_weights(self, ckpt: Path, files: dict[str, Any]) -> None:
        """Push the restored weights on activation unless the agent restores exactly them.

        A round's weights may still have been waiting for the agent when the
        checkpoint was taken (or the agent's part may be missing).
        """
        if self.trainer.version == 0:
            return  # the seed weights, which the agent holds too
        ours = self.trainer.weights()
        if all(f'models/{model}.safetensors' in files for model in self.pushed_models):
            try:
                theirs, _ = self._read_models(ckpt)
            except CheckpointError:
                theirs = {}  # the agent's part is its own business: just send ours
            if theirs and all(
                    set(theirs[m]) == set(ours[m]) and all(torch.equal(theirs[m][k], ours[m][k])
                                                           for k in ours[m])
                    for m in self.pushed_models):
                return
        self._pending = self._encode(int(self.trainer.version), ours)

    # -- pushing (executor) -----------------------------------------------
    def _push_tick(self) -> None:
        now = time.monotonic()
        if self._in_flight is not None:
            future, pending, sent_at = self._in_flight
            if not future.done() and now - sent_at > self.sync_timeout:
                self._push_failed(pending, f'no answer within {self.sync_timeout:.1f} s')
                self.client.remove_pending_request(future)
                future.cancel()
            return
        if not self.is_active or now < self._next_try:
            return
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        if not self.client.service_is_ready():
            self._push_failed(pending, f'{self.client.service_name} not available')
            return
        values = [ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=blob)
                  if isinstance(blob, str) else
                  ParameterValue(type=ParameterType.PARAMETER_BYTE_ARRAY, byte_array_value=blob)
                  for blob in pending.blobs.values()]
        request = SetParameters.Request(parameters=[
            Parameter(name=name, value=value) for name, value in zip(pending.blobs, values, strict=True)])
        future = self.client.call_async(request)
        self._in_flight = (future, pending, now)
        future.add_done_callback(self._on_push_done)

    def _on_push_done(self, future: Future) -> None:
        if self._in_flight is None or self._in_flight[0] is not future:
            return  # timed out earlier and already counted
        _, pending, _ = self._in_flight
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            self._push_failed(pending, f'call failed: {exc}')
            return
        results = future.result().results
        refused = [r.reason for r in results if not r.successful]
        if refused or len(results) != len(pending.blobs):
            self._push_failed(pending, 'refused: ' + ('; '.join(refused) or
                                                      f'{len(results)} results for '
                                                      f'{len(pending.blobs)} models'))
            return
        self._in_flight = None
        self.pushes_ok += 1
        self.pushed_version = pending.version
        if self.last_sync != 'ok':
            self.get_logger().info(f'agent took version {pending.version} of '
                                   f'{", ".join(pending.blobs)}')
        self.last_sync = 'ok'

    def _push_failed(self, pending: PendingWeights, reason: str) -> None:
        """Count, log (throttled) and schedule the retry with the newest weights."""
        self._in_flight = None
        self.pushes_failed += 1
        self.last_sync = reason
        self._next_try = time.monotonic() + self.sync_retry
        with self._lock:
            if self._pending is None:  # a newer round would replace it anyway
                self._pending = pending
        self.warn_throttled('sync', f'pushing version {pending.version} failed ({reason}); '
                            f'retrying every {self.sync_retry:g} s')

    # -- diagnostics, lifecycle -------------------------------------------
    def _update_diagnostics(self) -> None:
        with self._lock:
            metrics = dict(self._metrics)
            pending = self._pending
            errors = self.train_errors
        values: dict[str, object] = {}
        for key, value in metrics.items():
            if key in ('round', 'version'):
                continue  # the counters below say it
            values[key] = int(value) if key in _COUNT_METRICS else f'{value:.6g}'
        status = self.buffer_status()
        values.update(
            active=self.is_active, rounds=self.trainer.rounds, version=self.trainer.version,
            buffer=f'{status["buffer_len"]}/{status["buffer_capacity"]}', **status,
            pushes_ok=self.pushes_ok, pushes_failed=self.pushes_failed,
            pushed_version=self.pushed_version,
            pending_version=pending.version if pending else -1,
            last_sync=self.last_sync, train_errors=errors,
            restored_from=str(self.checkpoints.restored_from or ''),
            restored_part=self.restored_part,
            frame_period_ms=f'{(self.rhythm.period or 0.0) * 1000:.1f}',
            quiet_waited_s=f'{self.rhythm.waited:.3f}', **self.node_status())
        self.diagnostics.set(**values)
        if self.last_sync not in ('ok', 'nothing pushed yet'):
            self.diagnostics.warn(f'pushing weights fails: {self.last_sync}')
        else:
            self.diagnostics.ok()

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop.set()
        return super().on_shutdown(state)

    def on_exit(self) -> None:
        """Stop the training thread; a round in progress is given up at its next pause point."""
        self._stop.set()
        self._thread.join(timeout=5.0)
        if self._thread.is_alive():  # a daemon: it ends with the process
            self.get_logger().warning('a training round was still running at exit')
        self._sync_dir.remove()


class ExperienceTrainerNode(TrainerNode):
    """A trainer fed by the agent's `experience` topic (dynamics and policy).

    Decodes each message against this node's preset, drops undecodable ones
    with a throttled warning naming the reason, and notices breaks in time:
    a step the agent marks `continues=False` (its first step, after a pause),
    or a step number that does not follow the last one received (a lost
    message, an agent restart). `add_step(step, follows)` gets each step.
    """

    def __init__(self, node_name: str, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self.received = 0
        self.undecodable = 0
        self.gaps = 0  # steps missing between two received ones (not agent-marked breaks)
        self._last_step: int | None = None
        self.create_subscription(UInt8MultiArray, 'experience', self._on_experience, EXPERIENCE_QOS)

    def add_step(self, step: ExperienceStep, follows: bool) -> None:
        raise NotImplementedError

    def _on_experience(self, msg: UInt8MultiArray) -> None:
        if not self.is_active:
            return
        try:
            step = decode_experience(bytes(msg.data), self.preset)
        except EnvelopeError as exc:
            self.undecodable += 1
            kind = str(exc).split(' ', 2)[:2]  # one throttle per kind of problem
            self.warn_throttled(f'experience-{"-".join(kind)}', f'dropping experience: {exc}')
            return
        self.rhythm.frame(step.stamp_ns / 1e9)
        expected = None if self._last_step is None else self._last_step + 1
        if step.continues and expected is not None and step.step != expected:
            self.gaps += 1
            self.warn_throttled('gap', f'experience step {step.step} after {self._last_step}: '
                                'treating it as a break in time')
        follows = step.continues and step.step == expected
        self._last_step = step.step
        self.received += 1
        try:
            self.add_step(step, follows)
        except ValueError as exc:  # a shape the buffer does not hold: say it, keep going
            self.undecodable += 1
            self.warn_throttled('add', f'dropping experience step {step.step}: {exc}')

    def node_status(self) -> dict[str, object]:
        return {'received': self.received, 'undecodable': self.undecodable, 'gaps': self.gaps}
