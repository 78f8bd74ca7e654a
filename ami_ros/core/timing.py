"""Rates, latency percentiles and the acting loop's idle gaps (for nodes and benches)."""

from __future__ import annotations

import threading
import time
from collections import deque


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
