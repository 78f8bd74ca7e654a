"""Pacing: side work keeps out of the acting agent's steps on a shared CPU.

The agent steps when a frame arrives. Anything else on its machine competes
with that step for the CPUs, caches and memory bandwidth (and, inside the
agent's process, for the interpreter), so side work goes where no step runs:

- the agent itself builds new weights in its idle time after a step
  (`StepGap`);
- a trainer on the agent's machine learns the frames' rhythm from their
  capture stamps (`FrameRhythm`) and pauses before every layer, gradient
  and optimiser slice of its rounds, starting each piece only where it fits
  before the next step (`TrainerPacing`; the trainer nodes' `pacing`,
  `quiet_ms` and `guard_ms` parameters).

Why this fine a grain: in paired runs of bench/training_interference.py
(`ami`, 2-core VM) pausing only between minibatches kept the agent's step
p99 at 4-8 ms where per-layer pauses kept it at 3-6 ms, and trained about a
quarter fewer VAE rounds (its minibatches rarely fit between two frames).

The learning core knows nothing of this: the pause points are hooks on a
trainer's models and a wrapper of its optimiser, put there from here.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from ami_ros.ros.managed_node import ManagedNode

# Time kept free for the agent after each frame's capture: its policy and the
# action's way out (p99 a few ms on a CPU) with room for a slow step.
DEFAULT_QUIET_MS = 25
# ... and before it: a piece of training that started just before may still run.
DEFAULT_GUARD_MS = 12
PACING_CHOICES = ('auto', 'on', 'off')


class StepGap:
    """Where the acting loop's idle time is, so side work can go there.

    The acting loop calls `step_started()` and `step_ended()`; another thread
    calls `wait(needed, timeout)` before work that would compete with a step
    for the interpreter and the CPU (preparing new weights), and is let go
    when that much work fits before the next step is due. With no steps seen,
    or none for two periods (paused, no camera), there is nothing to protect.
    """

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._busy = False
        self._last_start: float | None = None
        self.period: float | None = None  # smoothed time between step starts

    def step_started(self) -> None:
        with self._cond:
            now = self._clock()
            if self._last_start is not None:
                interval = now - self._last_start
                self.period = interval if self.period is None else 0.8 * self.period + 0.2 * interval
            self._last_start = now
            self._busy = True

    def step_ended(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def _fits(self, needed: float) -> bool:
        if self._busy:
            return False
        if self._last_start is None or self.period is None:
            return True
        now = self._clock()
        if now - self._last_start > 2 * self.period:
            return True  # the steps stopped
        return now + needed <= self._last_start + self.period

    def wait(self, needed: float, timeout: float) -> bool:
        """Block until `needed` seconds fit before the next step; False after `timeout`.

        `timeout=0` only asks whether they fit now."""
        deadline = self._clock() + timeout
        with self._cond:
            while not self._fits(needed):
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return False
                # Woken by a step's end; the poll catches steps that stop coming.
                self._cond.wait(min(remaining, 0.01))
            return True


class FrameRhythm:
    """Keeps a trainer's work out of the acting agent's steps, from the frames' rhythm.

    A trainer on the agent's machine shares its CPUs, caches and memory
    bandwidth: even at the lowest priority, its training slows the agent's
    step down whenever both run at once. The agent steps when a frame
    arrives, and frames come in a steady rhythm (10 Hz), so a trainer that
    sees the frames' capture stamps (`frame(stamp)`) knows when the next steps
    are due and can keep its work outside [capture - guard, capture + quiet]:

    - `pause(site)`, between two pieces of work (a trainer's layers, gradients
      and optimiser slices, `TrainerPacing.attach`),
      waits while that window is on, and until the piece about to start fits
      before the next one (its length learnt per site); `guard` covers a
      piece not yet seen, which may start just before a window;
    - `with slot(kind):` around one longer piece that cannot be split (encoding
      weights) starts it only where it fits before the next window, its
      length predicted from the longest of the last few of its kind; a kind
      that never fits runs right after a window ends.

    The windows take at most half of each period (both shrink in proportion
    for a fast camera), so training always keeps room. With no rhythm seen
    yet, frames stopped (paused, no camera) or quiet = 0, nothing waits.
    Stamps and `clock` must tell the same time (ROS stamps are the system
    clock, `time.time`): a trainer on another machine has nothing to protect.
    """

    HISTORY = 8  # slots of one kind their length is predicted from (the longest)
    PIECE_HISTORY = 5  # runs of a paused piece its length is predicted from (the median)
    MARGIN = 1.2  # the length waited for = the recent one (longest or median) times this
    MAX_SHARE = 0.5  # of each period, at most, kept for the agent

    def __init__(self, quiet: float, guard: float = 0.012, clock=time.time) -> None:
        self.quiet = quiet
        self.guard = guard
        self._clock = clock
        self._lock = threading.Lock()
        self._last: float | None = None
        self._intervals: deque[float] = deque(maxlen=16)
        self.period: float | None = None  # median time between frames
        self._lengths: dict[str, deque[float]] = {}
        self._pieces = threading.local()  # per training thread: the piece running since its pause
        self.waited = 0.0  # seconds spent waiting for room, in total

    def frame(self, stamp: float) -> None:
        """A frame the agent acts on was captured at `stamp` (seconds, `clock`'s time)."""
        with self._lock:
            if self._last is not None and stamp > self._last:
                self._intervals.append(stamp - self._last)
                ordered = sorted(self._intervals)
                self.period = ordered[len(ordered) // 2]  # a lost frame's double gap is outvoted
            if self._last is None or stamp > self._last:
                self._last = stamp

    def delay(self, needed: float, now: float | None = None) -> float:
        """Seconds to wait before `needed` seconds of work fit between two steps (0: go)."""
        now = self._clock() if now is None else now
        with self._lock:
            last, period = self._last, self.period
        if not self.quiet or last is None or period is None or now - last > 3 * period:
            return 0.0
        scale = min(1.0, self.MAX_SHARE * period / (self.quiet + self.guard))
        quiet, guard = self.quiet * scale, self.guard * scale
        phase = (now - last) % period  # time since the latest capture that is due by now
        if phase < quiet:
            return quiet - phase  # that step is running: wait for its window to end
        if needed <= period - guard - phase:  # fits before the next capture's guard
            return 0.0
        if needed > period - guard - quiet and phase < quiet + 0.01:
            return 0.0  # never fits: go now, at the start of a gap, where most room is
        return period - phase + quiet  # the end of the next step's quiet window

    def _wait(self, needed: float) -> None:
        while (wait := self.delay(needed)) > 0:
            wait = max(wait, 0.0005)  # past a window's end for sure, whatever the rounding
            self.waited += wait
            time.sleep(wait)

    def pause(self, site: str | None = None) -> None:
        """Wait while an agent step is due or running.

        With `site`, the name of the piece of work about to start there, also
        wait until that piece fits before the next step: how long it takes is
        learnt from its earlier runs (pause to pause; the median of its last
        few, so one run slowed by preemption does not count).
        """
        now = time.perf_counter()
        opened = getattr(self._pieces, 'open', None)
        if opened is not None:
            last_site, started = opened
            length = now - started
            # Longer than a period: idle time between rounds, not a piece.
            if length < (self.period or 1.0):
                self._lengths.setdefault(last_site, deque(maxlen=self.PIECE_HISTORY)).append(length)
        needed = 0.0
        if site is not None:
            recent = sorted(self._lengths.get(site, ()))
            needed = recent[len(recent) // 2] * self.MARGIN if recent else 0.0
        self._wait(needed)
        self._pieces.open = (site, time.perf_counter()) if site is not None else None

    @contextmanager
    def slot(self, kind: str) -> Iterator[None]:
        """Wait for room for one piece of `kind`, then time it for the next prediction."""
        self._pieces.open = None  # whatever ran since the last pause was not one piece
        lengths = self._lengths.setdefault(kind, deque(maxlen=self.HISTORY))
        self._wait(max(lengths, default=0.0) * self.MARGIN)
        start = time.perf_counter()
        yield
        lengths.append(time.perf_counter() - start)


def pacing_on(choice: str, device: str) -> bool:
    """Whether a trainer on `device` paces itself: 'auto' = only where it trains on the CPU.

    On a GPU the training's work is not on the CPUs the agent steps on.
    """
    return choice == 'on' or (choice == 'auto' and torch.device(device).type == 'cpu')


# Parameters per optimiser slice: one slice's update (Adam reads and writes
# four tensors of this size) takes a few ms, well inside a trainer's guard_ms.
SLICE_ELEMENTS = 1 << 18


class SlicedOptimizer:
    """`optimizer` stepped a slice of its parameters at a time, with `pause(site)` before each.

    Adam and AdamW update each parameter from its own gradient and state
    alone, so stepping slices one after another is the same update as one
    step over all of them; but a whole step over a few million parameters
    takes tens of ms on a CPU, longer than a trainer may run between two of
    the agent's steps. Each slice is an optimiser of the same class and
    settings. `state_dict()` and `load_state_dict()` speak the wrapped
    optimiser's format (one parameter group, state keyed by the index of the
    parameter): checkpoints do not change.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, pause: Callable[[str], None],
                 slice_elements: int = SLICE_ELEMENTS) -> None:
        if len(optimizer.param_groups) != 1:
            raise ValueError('SlicedOptimizer wraps an optimiser of one parameter group')
        group = optimizer.param_groups[0]
        self.params: list[nn.Parameter] = list(group['params'])
        self.pause = pause
        slices: list[list[int]] = []  # indices into params
        current: list[int] = []
        size = 0
        for i, param in enumerate(self.params):
            current.append(i)
            size += param.numel()
            if size >= slice_elements:
                slices.append(current)
                current, size = [], 0
        if current:
            slices.append(current)
        self.slices = slices
        # The settings its class takes (AdamW's defaults hold one its constructor does not).
        accepted = inspect.signature(type(optimizer)).parameters
        settings = {key: group[key] for key in optimizer.defaults if key in accepted}
        self.optimizers = [type(optimizer)([self.params[i] for i in s], **settings) for s in slices]
        self.load_state_dict(optimizer.state_dict())  # whatever it has learnt so far

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The one group's settings and parameters (a copy: set them on `optimizers`)."""
        return [{**self.optimizers[0].param_groups[0], 'params': self.params}]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for n, optimizer in enumerate(self.optimizers):
            self.pause(f'step {n}')
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        state: dict[int, Any] = {}
        for s, optimizer in zip(self.slices, self.optimizers, strict=True):
            state.update({s[i]: entry for i, entry in optimizer.state_dict()['state'].items()})
        group = {k: v for k, v in self.optimizers[0].state_dict()['param_groups'][0].items() if k != 'params'}
        return {'state': state, 'param_groups': [{**group, 'params': list(range(len(self.params)))}]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        groups = state['param_groups']
        if len(groups) != 1 or len(groups[0]['params']) != len(self.params):
            raise ValueError(f'optimiser state is for other parameters (expected one group of '
                             f'{len(self.params)})')
        group = {k: v for k, v in groups[0].items() if k != 'params'}
        entries = {int(k): v for k, v in state['state'].items()}
        for s, optimizer in zip(self.slices, self.optimizers, strict=True):
            optimizer.load_state_dict({
                'state': {i: entries[g] for i, g in enumerate(s) if g in entries},
                'param_groups': [{**group, 'params': list(range(len(s)))}]})


def _pause_before_forwards(models: Mapping[str, nn.Module], pause: Callable[[str], None],
                           layers: bool) -> None:
    """`pause(site)` before each model's forward (where a minibatch starts) and, with
    `layers`, before each of its layers' forwards too."""
    for model_name, model in models.items():
        for name, module in model.named_modules():
            if name and not layers:
                break
            site = f'forward {model_name}.{name}' if name else f'forward {model_name}'
            module.register_forward_pre_hook(lambda _module, _args, site=site: pause(site))


class TrainerPacing:
    """A trainer node's pacing: its parameters, the frames' rhythm and the trainer's pause points.

    `frame(stamp)` is given every frame's capture stamp the trainer sees;
    `attach(trainer, stop)` puts pause points into the trainer's rounds;
    `with slot(kind):` wraps work done between rounds (copying and encoding
    weights). With pacing on, the pause points are before every layer's
    forward, every parameter's gradient and every optimiser slice
    (SlicedOptimizer), each waiting until the piece that follows fits before
    the next step: even a minibatch longer than a frame period keeps out of
    the agent's steps. Off, there is one before each minibatch, nothing
    waits, and the trainer trains flat out. At every pause point `stop(site)`
    is called first (the node gives a round up there at shutdown).
    """

    def __init__(self, rhythm: FrameRhythm | None) -> None:
        self.rhythm = rhythm

    @classmethod
    def declare(cls, node: ManagedNode, device: str) -> TrainerPacing:
        """Declare the node's `pacing`, `quiet_ms` and `guard_ms` parameters; the pacing they give."""
        choice = node.declare(
            'pacing', 'auto', "Keep training out of the acting agent's steps, from the frames' rhythm "
            "(on a shared CPU a trainer slows the agent's step down even at nice 19). 'auto' = on "
            "for a trainer on the CPU, off on CUDA; set 'off' for a trainer on another machine "
            "(nothing to protect there, and its clock is not the frames').", choices=PACING_CHOICES)
        quiet_ms = node.declare(
            'quiet_ms', DEFAULT_QUIET_MS, "With pacing: milliseconds after each frame's capture in "
            'which this trainer computes nothing, so the agent steps alone.', low=1, high=1000)
        guard_ms = node.declare(
            'guard_ms', DEFAULT_GUARD_MS, "With pacing: milliseconds before each frame's capture in "
            'which no piece of training of unknown length starts.', low=0, high=1000)
        on = pacing_on(choice, device)
        return cls(FrameRhythm(quiet_ms / 1000.0, guard_ms / 1000.0) if on else None)

    @property
    def on(self) -> bool:
        return self.rhythm is not None

    def frame(self, stamp: float) -> None:
        if self.rhythm is not None:
            self.rhythm.frame(stamp)

    def attach(self, trainer: Any, stop: Callable[[str], None]) -> None:
        """Pause points in `trainer`'s rounds (it has `models` and `optimizer`); see the class doc."""
        rhythm = self.rhythm
        if rhythm is None:
            _pause_before_forwards(trainer.models, stop, layers=False)
            return

        def pause(site: str) -> None:
            stop(site)
            rhythm.pause(site)

        _pause_before_forwards(trainer.models, pause, layers=True)
        for model_name, model in trainer.models.items():
            for name, param in model.named_parameters():
                if param.requires_grad:
                    param.register_hook(lambda _grad, site=f'gradient {model_name}.{name}': pause(site))
        trainer.optimizer = SlicedOptimizer(trainer.optimizer, pause)

    def slot(self, kind: str) -> AbstractContextManager[None]:
        return self.rhythm.slot(kind) if self.rhythm is not None else nullcontext()

    def status(self) -> dict[str, object]:
        """For the node's diagnostics."""
        rhythm = self.rhythm
        return {'pacing': 'on' if rhythm is not None else 'off',
                'frame_period_ms': f'{((rhythm.period if rhythm else None) or 0.0) * 1000:.1f}',
                'quiet_waited_s': f'{rhythm.waited if rhythm else 0.0:.3f}'}
