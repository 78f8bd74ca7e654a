"""A run's end-of-run summary, without ROS.

`RunStats` keeps the latest diagnostic values and makes the summary
(summary.json) with what the caller adds (an agent's exploration and its
`RewardWindow`, ami_ros.record.agent_track); `summary_line` formats it for a log.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any


class RewardWindow:
    """The last `window` finite rewards of one agent, and how many there were in all."""

    def __init__(self, window: int = 100) -> None:
        self.values: deque[float] = deque(maxlen=max(1, window))
        self.count = 0

    def add(self, value: float) -> None:
        if math.isfinite(value):
            self.values.append(float(value))
            self.count += 1

    def summary(self) -> dict[str, Any]:
        return reward_summary([self])


def reward_summary(windows: Sequence[RewardWindow]) -> dict[str, Any]:
    """The summary's reward keys over `windows` together (several agents: all their last rewards)."""
    values = [v for w in windows for v in w.values]
    return {'reward_mean_last_n': sum(values) / len(values) if values else None,
            'reward_window': len(values), 'reward_count': sum(w.count for w in windows)}


class RunStats:
    """What the end-of-run summary needs from diagnostics: their latest values.

    A node counts as a trainer when its diagnostics report `rounds`; every
    key containing 'loss' is a final loss.
    """

    def __init__(self, step_node: str = 'agent') -> None:
        self.latest: dict[str, dict[str, float]] = {}
        self.step_node = step_node
        self.started = time.time()

    def update(self, node: str, values: Mapping[str, float]) -> None:
        self.latest.setdefault(node, {}).update(values)

    @property
    def steps(self) -> int | None:
        steps = self.latest.get(self.step_node, {}).get('steps')
        return None if steps is None else int(steps)

    def summary(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        rounds = {node: int(v['rounds']) for node, v in sorted(self.latest.items()) if 'rounds' in v}
        losses = {f'{node}/{key}': value for node, values in sorted(self.latest.items())
                  for key, value in sorted(values.items()) if 'loss' in key}
        return {
            'steps': self.steps,
            'duration_s': round(time.time() - self.started, 3),
            'rounds': rounds,
            'losses': losses,
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
        agents = summary.get('agents') or {}
        if agents:  # several agents: each one's own map
            parts[-1] += ' (' + ', '.join(f'{name} {a.get("cells_visited") or 0}'
                                          for name, a in agents.items()) + ')'
    if summary.get('reward_mean_last_n') is not None:
        parts.append(f'reward mean {fmt(summary["reward_mean_last_n"])} over the last '
                     f'{summary.get("reward_window")} steps')
    return '; '.join(parts)
