"""Rates, latency percentiles, and when the acting agent's steps run (for nodes and benches)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager


class RateMeter:
    """Events per second over the last `window` seconds."""

    def __init__(self, window: float = 5.0) -> None:
        self.window = window
        self.times: deque[float] = deque()

    def tick(self, now: float | None = None) -> None:
        self.times.append(time.monotonic() if now is None else now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self.times and now - self.times[0] > self.window:
            self.times.popleft()
        return len(self.times) / self.window


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-quantile (0..1) of sorted values by nearest rank; NaN when empty."""
    if not sorted_values:
        return float('nan')
    index = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[index]


class LatencyWindow:
    """The last `size` latencies (ms) with p50 / p99 / max."""

    def __init__(self, size: int = 1000) -> None:
        self.values: deque[float] = deque(maxlen=size)

    def add(self, ms: float) -> None:
        self.values.append(ms)

    def summary(self) -> dict[str, float]:
        values = sorted(self.values.copy())  # copy is atomic; callbacks may append meanwhile
        return {'p50': percentile(values, 0.5), 'p99': percentile(values, 0.99),
                'max': values[-1] if values else float('nan')}


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

    - `pause(site)`, between two pieces of work (a trainer calls it before
      every layer, gradient and optimiser slice, `_Trainer.pause_with`),
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
    clock, `time.time`): a trainer on another machine has nothing to protect
    and runs with quiet = 0.
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
