"""Measurements for nodes and benches: event rates and latency percentiles.

(When side work may run beside the agent's steps is `ami_ros/ros/pacing.py`.)
"""

from __future__ import annotations

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
