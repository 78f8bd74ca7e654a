"""One acting agent as the recorder follows it, without ROS.

An `AgentTrack` holds what the recorder keeps of one agent: its exploration
map, its current episode and the cells it visited, and its last rewards.
The recorder of one agent (`agents:=1`) has one track named '' whose
metrics, artifacts and status keys are today's (`reward`,
`world/cells_visited`, exploration_map.png); with several agents each track
is named by its namespace relative to the recorder's ('agent_1'), which
prefixes all three (`agent_1/reward`, agent_1/exploration_map.png), since
each agent walks its own world and has a map of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ami_ros.record.pictures import ExplorationMap
from ami_ros.record.summary import RewardWindow, reward_summary


class AgentTrack:
    """One agent's map, episode and reward window; `name` '' for the recorder's own namespace."""

    def __init__(self, name: str, cell_size: float, window: int) -> None:
        self.name = name
        self.prefix = f'{name}/' if name else ''
        self.map = ExplorationMap(cell_size)
        self.rewards = RewardWindow(window)
        self.poses = 0
        self.episode: int | None = None
        self.episode_cells: set[tuple[int, int]] = set()
        self._cells_dirty = False

    def key(self, name: str) -> str:
        """This agent's topic, metric or artifact `name` ('agent_1/reward'; 'reward' for '')."""
        return self.prefix + name

    def visit(self, x: float, y: float) -> None:
        """A pose on the map (one already checked to lie on it)."""
        self.poses += 1
        if self.map.visit(x, y):
            self._cells_dirty = True  # logged once a second, not per pose
        self.episode_cells.add(self.map.cell(x, y))

    def start_episode(self, number: int) -> int | None:
        """Episode `number` begins: the cells the one before visited, if it is to be logged.

        The first number (the latched current episode) only starts the count; an
        episode the recorder joined midway counts what it saw.
        """
        ended = len(self.episode_cells) if self.episode is not None and self.episode_cells else None
        self.episode = number
        self.episode_cells = set()
        return ended

    def new_cells(self) -> int | None:
        """The count of cells visited if it grew since last asked, else None."""
        if not self._cells_dirty:
            return None
        self._cells_dirty = False
        return self.map.cells_visited

    def status(self) -> dict[str, int]:
        """The recorder's status keys for this agent (the episode -1 before the first)."""
        return {self.key('cells_visited'): self.map.cells_visited,
                self.key('episode'): -1 if self.episode is None else self.episode,
                self.key('episode_cells'): len(self.episode_cells)}

    def summary(self) -> dict[str, Any]:
        """Cells visited (None when no pose came) and the reward keys."""
        return {'cells_visited': self.map.cells_visited if self.poses else None, **self.rewards.summary()}


def tracks_summary(tracks: Sequence[AgentTrack]) -> dict[str, Any]:
    """The summary's exploration and reward keys: one agent's as today; several agents'
    cells summed and rewards pooled, and each one's own under `agents`."""
    if len(tracks) == 1 and not tracks[0].name:
        return tracks[0].summary()
    cells = [t.map.cells_visited for t in tracks if t.poses]
    return {'cells_visited': sum(cells) if cells else None,
            **reward_summary([t.rewards for t in tracks]),
            'agents': {t.name: t.summary() for t in tracks}}


def tracks_status(tracks: Sequence[AgentTrack]) -> dict[str, int]:
    """The recorder's status keys: one agent's as today; several agents' each prefixed,
    with `cells_visited` their sum."""
    status = {k: v for t in tracks for k, v in t.status().items()}
    if len(tracks) > 1 or tracks[0].name:
        status['cells_visited'] = sum(t.map.cells_visited for t in tracks)
    return status
