"""A run's end-of-run summary, without ROS.

`RunStats` keeps the latest diagnostic values and recent rewards and makes
the summary (summary.json); `summary_line` formats it for a log.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping
from typing import Any


class RunStats:
    """What the end-of-run summary needs: the latest diagnostic values and recent rewards.

    A node counts as a trainer when its diagnostics report `rounds`; every
    key containing 'loss' is a final loss.
    """

    def __init__(self, window: int = 100, step_node: str = 'agent') -> None:
        self.latest: dict[str, dict[str, float]] = {}
        self.rewards: deque[float] = deque(maxlen=max(1, window))
        self.reward_count = 0
        self.step_node = step_node
        self.started = time.time()

    def update(self, node: str, values: Mapping[str, float]) -> None:
        self.latest.setdefault(node, {}).update(values)

    def add_reward(self, value: float) -> None:
        if math.isfinite(value):
            self.rewards.append(float(value))
            self.reward_count += 1

    @property
    def steps(self) -> int | None:
        steps = self.latest.get(self.step_node, {}).get('steps')
        return None if steps is None else int(steps)

    def summary(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        rounds = {node: int(v['rounds']) for node, v in sorted(self.latest.items()) if 'rounds' in v}
        losses = {f'{node}/{key}': value for node, values in sorted(self.latest.items())
                  for key, value in sorted(values.items()) if 'loss' in key}
        mean = sum(self.rewards) / len(self.rewards) if self.rewards else None
        return {
            'steps': self.steps,
            'duration_s': round(time.time() - self.started, 3),
            'rounds': rounds,
            'losses': losses,
            'reward_mean_last_n': mean,
            'reward_window': len(self.rewards),
            'reward_count': self.reward_count,
            **dict(extra or {}),
        }


def summary_line(summary: Mapping[str, Any]) -> str:
    """One log line: steps, rounds per trainer, final losses, cells, recent reward."""
    def fmt(value: Any) -> str:
        return f'{value:.4g}' if isinstance(value, float) else str(value)

    steps = summary.get('steps')
    parts = [f'{steps} agent steps' if steps is not None else 'no agent steps heard']
    parts[0] += f' in {summary.get("duration_s", 0):.0f} s'
    rounds = summary.get('rounds') or {}
    parts.append('rounds ' + (', '.join(f'{k} {v}' for k, v in rounds.items()) if rounds else 'none'))
    losses = summary.get('losses') or {}
    if losses:
        parts.append('losses ' + ', '.join(f'{k} {fmt(v)}' for k, v in losses.items()))
    if summary.get('cells_visited') is not None:
        parts.append(f'{summary["cells_visited"]} cells visited')
    if summary.get('reward_mean_last_n') is not None:
        parts.append(f'reward mean {fmt(summary["reward_mean_last_n"])} over the last '
                     f'{summary.get("reward_window")} steps')
    return '; '.join(parts)
