"""The shared shell of the trainer nodes: learn in a thread, push the weights to the agent.

A trainer node wraps one trainer of the learning core (`core/trainers.py`).
Its executor only collects data (subscription callbacks call the trainer's
thread-safe `add`) and talks to the agent; the optimisation runs in a
background thread, so collecting never stops while a round trains:

    training thread: while running: if active and trainer.ready():
                         train_round() -> metrics; encode the new weights
                         and offer them to the push (a newer round replaces
                         an older one not yet sent)
    executor:        data in; the weights out (`ros/weight_push.py`)

Agents: one set of trainers may serve several acting agents (`agents`:
their namespaces relative to the trainer's, `['']` = one agent in the
trainer's own namespace). A trainer takes data from every agent's topics,
keeps each agent's sequences apart (core/source_buffers.py) and pushes each
round's weights to every agent (`ros/weight_push.py`).

Versions: every trainer starts from `build_models(preset, seed)` with the
agent's seed, so both hold identical initial weights, version 0. A round
makes the next version (1, 2, ...), the version pushed. A restarted trainer
without a checkpoint starts again at 0; the agent accepts whatever version it
is sent and reports it. Restored from a checkpoint (`ros/trainer_checkpoint.py`),
it continues from the saved version.

Pause (lifecycle deactivate): no round starts, incoming data is ignored (the
agent is paused too, and the step after a pause is marked as a break), and
pending weights wait until activation. A round already running finishes;
at shutdown it is given up before its next minibatch, so the process ends
at once.

The process yields the CPUs to the acting agent (`ros/process_priority.py`:
niceness, CPU set, one torch thread by default) and, on the agent's CPU,
keeps its work out of the agent's steps (`ros/pacing.py`). Each parameter
is described where it is declared.

Diagnostics (/diagnostics, status named after the node, every second):
preset, device, learning_rate, active, rounds, version, buffer ("len/capacity"),
buffer_len, buffer_capacity, new_count, the push's pushes_ok, pushes_failed,
pushed_version (the last version the agent took; -1 none yet),
pending_version (-1 none), last_sync ('ok' or the last failure's reason),
sync_transport (the one in use: 'auto' switches to 'topic' for an agent elsewhere;
agents' differing ones comma-separated); with several agents also
pushed_version/<ns> and last_sync/<ns> per agent (pushed_version is then the
lowest any agent took, last_sync the first failing agent's '<ns>: reason'),
train_errors, restored_from (the checkpoint restored at start, '' none),
restored_part ('trainer', 'models', 'none'; '' no checkpoint), pacing ('on'
or 'off'), frame_period_ms (the frames' rhythm; 0 none seen),
quiet_waited_s (time spent waiting for room between the agent's steps), the
last round's metrics under the trainer's own names (6 significant digits):

    vae_trainer       loss, reconstruction, kl, grad_norm
    dynamics_trainer  loss, loss_last_epoch, grad_norm
    policy_trainer    loss, policy_loss, value_loss, entropy, approx_kl,
                      clip_fraction, grad_norm, reward_mean, advantage_mean,
                      return_mean, policy_version_min

and for every trainer batches, samples and seconds (the round's duration).
Node-specific keys are listed in each node's docstring.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
from rclpy.lifecycle import LifecycleState, TransitionCallbackReturn
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import UInt8MultiArray
from torch import nn

from ami_ros.core.agent import resolve_device
from ami_ros.core.envelope import EnvelopeError
from ami_ros.core.models import build_models
from ami_ros.core.presets import DEFAULT_PRESET, PRESETS, Preset, get_preset, with_overrides
from ami_ros.core.schemas import ExperienceStep, decode_experience
from ami_ros.graph import relative_name
from ami_ros.ros.checkpoint_part import CheckpointPart
from ami_ros.ros.diagnostics import NodeDiagnostics
from ami_ros.ros.managed_node import ManagedNode
from ami_ros.ros.pacing import TrainerPacing
from ami_ros.ros.process_priority import parse_cpu_list, pin_cpus, yield_cpu
from ami_ros.ros.trainer_checkpoint import TrainerCheckpoint
from ami_ros.ros.weight_push import WeightPush

# Matches the agent's experience publisher: reliable, deep enough that a
# trainer busy for a moment loses no step.
EXPERIENCE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100,
                            reliability=ReliabilityPolicy.RELIABLE)

# Metrics that are counters of the round rather than measures: published as ints.
_COUNT_METRICS = ('batches', 'samples', 'trajectories')
# An agent's namespace relative to the trainer's: ROS name tokens, '/' between them.
_AGENT_NAMESPACE = re.compile(r'[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*')


def parse_agents(values: Sequence[str]) -> tuple[str, ...]:
    """The `agents` parameter checked: relative namespaces, none twice; [] = [''] (ValueError, one line)."""
    agents = tuple(values) or ('',)
    for agent in agents:
        if agent and not _AGENT_NAMESPACE.fullmatch(agent):
            raise ValueError(f"parameter agents: {agent!r} is not a relative namespace (ROS name tokens "
                             "[A-Za-z_][A-Za-z0-9_]* with '/' between them, or '' for this node's own)")
    if len(set(agents)) != len(agents):
        raise ValueError(f'parameter agents names an agent twice: {list(agents)}')
    return agents


class RoundGivenUp(Exception):
    """Raised at a pause point of a round when its node stops: the round is given up."""


class TrainerNode(ManagedNode):
    """Base of vae_trainer, dynamics_trainer and policy_trainer.

    A subclass sets `pushed_models`, `min_new_field` (preset section and
    field that `min_new` overrides) and `caps_batches`, builds its trainer in
    `make_trainer` (learning from `sources`, the agents), subscribes to each
    agent's data in `__init__` (after calling this one; `relative_name`),
    passes the frames' capture stamps to `self.pace_frame` and reports its
    buffer in `buffer_status`.
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
        nice = self.declare('nice', 19, 'Niceness added to every thread at start so the acting agent '
                            'wins the CPU (19: also SCHED_IDLE, run only on an otherwise idle core; '
                            '0 = none).', low=0, high=19)
        cpus = parse_cpu_list(self.declare(
            'cpus', '', "CPUs the trainer may use, taskset style ('1', '1-3'); '' = all. "
            "Keeping trainers off the agent's core spares it their cache traffic."))
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
        self.agents = parse_agents(self.declare(
            'agents', [''], "Namespaces of the agents this trainer learns from and pushes to, "
            "relative to its own ('' = its own namespace, one agent); each agent's sequences are "
            'kept apart.', read_only=True))
        resolve_device(device)  # a clear error for a missing CUDA, before building anything
        self.pacing = TrainerPacing.declare(self, device)
        # Before torch starts its pools and before our thread: threads inherit
        # the creator's niceness and CPU set on Linux.
        if nice:
            yield_cpu(nice)
        if cpus:
            pin_cpus(cpus)
        torch.set_num_threads(threads)
        self.preset = self._with_overrides(get_preset(preset_name), min_new, learning_rate)
        self.trainer = self.make_trainer(self.preset, build_models(self.preset, seed=seed),
                                         device, seed, max_batches, self.agents)
        self._stop = threading.Event()
        self.pacing.attach(self.trainer, self._give_up_at_stop)
        self.push = WeightPush(self, self.pushed_models, self.preset.name, self.agents)

        # Shared between the training thread and the executor, under _lock.
        self._lock = threading.Lock()
        # Held by the training thread for a whole round, and by a checkpoint
        # save while it takes the state: a save never sees half a round.
        self._round_lock = threading.Lock()
        self._metrics: dict[str, float] = {}
        self.train_errors = 0

        self.diagnostics = NodeDiagnostics(self, update=self._update_diagnostics)
        self.diagnostics.set(preset=preset_name, device=device,
                             learning_rate=f'{getattr(self.preset, self.min_new_field[0]).lr:g}')

        # Restore (checkpoint:=) before training can start and before any data
        # arrives (subclasses subscribe after this constructor), so a restored
        # trainer never trains from fresh state first.
        self.trainer_checkpoint = TrainerCheckpoint(self, self.trainer, self.preset.name, self.push,
                                                    self._round_lock, self.buffer_status)
        self.checkpoints = CheckpointPart(self, self.trainer_checkpoint.save, self.trainer_checkpoint.restore,
                                          preset=self.preset.name, after_save=self.diagnostics.report)

        self._thread = threading.Thread(target=self._train_loop, name=f'{node_name}_training',
                                        daemon=True)
        self._thread.start()
        self.get_logger().info(
            f'{node_name} ready: preset {preset_name} on {device}, {threads} torch thread(s), '
            f'nice +{nice}, pacing {"on" if self.pacing.on else "off"}, '
            f'cpus {",".join(map(str, sorted(cpus))) or "all"}; '
            f'pushing {", ".join(self.pushed_models)} to {self.push.service_name}')

    # -- for subclasses ---------------------------------------------------
    def make_trainer(self, preset: Preset, models: dict[str, nn.Module], device: str, seed: int,
                     max_batches: int, sources: tuple[str, ...]) -> Any:
        raise NotImplementedError

    def pace_frame(self, agent: str, stamp: float) -> None:
        """A frame of `agent` captured at `stamp` (s). Only the first agent's set the rhythm:
        several agents' frames together would look like one faster camera."""
        if agent == self.agents[0]:
            self.pacing.frame(stamp)

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

    def _give_up_at_stop(self, _site: str) -> None:
        """At each pause point of a round: a stopping node gives the round up there."""
        if self._stop.is_set():
            raise RoundGivenUp('the node is stopping')

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
                    with self.pacing.slot('weights'):
                        weights = self.trainer.weights()
                pending = self.push.encode(version, weights, self.pacing.slot)
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
            self.push.offer(pending)
            # Every round: DEBUG, so four trainers do not crowd the launcher's status line.
            self.get_logger().debug(
                f'round {int(metrics["round"])}: version {version}, loss {metrics.get("loss", 0):.4g}, '
                f'{metrics["seconds"]:.2f} s')

    # -- diagnostics, lifecycle -------------------------------------------
    def _update_diagnostics(self) -> None:
        with self._lock:
            metrics = dict(self._metrics)
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
            **self.push.status(), train_errors=errors,
            restored_from=str(self.checkpoints.restored_from or ''),
            restored_part=self.trainer_checkpoint.restored_part,
            **self.pacing.status(), **self.node_status())
        self.diagnostics.set(**values)
        if self.push.failing():
            self.diagnostics.warn(f'pushing weights fails: {self.push.last_sync}')
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
        self.push.close()


class ExperienceTrainerNode(TrainerNode):
    """A trainer fed by each agent's `experience` topic (dynamics and policy).

    Decodes each message against this node's preset, drops undecodable ones
    with a throttled warning naming the reason, and notices breaks in time,
    per agent: a step the agent marks `continues=False` (its first step,
    after a pause), or a step number that does not follow the last one
    received from that agent (a lost message, an agent restart).
    `add_step(step, follows, source)` gets each step with its agent's namespace.
    """

    def __init__(self, node_name: str, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self.undecodable = 0
        # Per agent: steps received, steps missing between two received ones
        # (not agent-marked breaks), the last step number.
        self.received_from = dict.fromkeys(self.agents, 0)
        self.gaps_from = dict.fromkeys(self.agents, 0)
        self._last_step: dict[str, int | None] = dict.fromkeys(self.agents)
        for agent in self.agents:
            self.create_subscription(UInt8MultiArray, relative_name(agent, 'experience'),
                                     lambda msg, agent=agent: self._on_experience(msg, agent),
                                     EXPERIENCE_QOS)

    @property
    def received(self) -> int:
        return sum(self.received_from.values())

    @property
    def gaps(self) -> int:
        return sum(self.gaps_from.values())

    def add_step(self, step: ExperienceStep, follows: bool, source: str = '') -> None:
        raise NotImplementedError

    def _on_experience(self, msg: UInt8MultiArray, agent: str = '') -> None:
        if not self.is_active:
            return
        try:
            step = decode_experience(msg.data, self.preset)  # sized before it is copied
        except EnvelopeError as exc:
            self.undecodable += 1
            kind = str(exc).split(' ', 2)[:2]  # one throttle per kind of problem
            self.warn_throttled(f'experience-{"-".join(kind)}', f'dropping experience: {exc}')
            return
        self.pace_frame(agent, step.stamp_ns / 1e9)
        last = self._last_step[agent]
        expected = None if last is None else last + 1
        if step.continues and expected is not None and step.step != expected:
            self.gaps_from[agent] += 1
            self.warn_throttled(f'gap {agent}', f'experience step {step.step} after {last}'
                                f'{f" from {agent}" if agent else ""}: treating it as a break in time')
        follows = step.continues and step.step == expected
        self._last_step[agent] = step.step
        self.received_from[agent] += 1
        try:
            self.add_step(step, follows, agent)
        except ValueError as exc:  # a shape the buffer does not hold: say it, keep going
            self.undecodable += 1
            self.warn_throttled('add', f'dropping experience step {step.step}: {exc}')

    def node_status(self) -> dict[str, object]:
        status: dict[str, object] = {'received': self.received, 'undecodable': self.undecodable,
                                     'gaps': self.gaps}
        if len(self.agents) > 1:
            status.update({f'received/{agent}': n for agent, n in self.received_from.items()})
        return status
