"""One buffer per source of experience (per acting agent), so no sequence crosses two agents.

A trainer fed by several agents keeps each agent's steps apart: a dynamics
chunk and a PPO trajectory are stretches of one agent's time. Sources are
named by strings (the trainer nodes use the agents' namespaces); the core
knows nothing else of them. `''` alone is the single agent of a graph
without agent namespaces.

Saved state: with the one source `''` a set saves exactly as its buffer does
(the layout of checkpoints from before sources existed). With several, each
source's tensors are saved under `<source>:<name>` (':' never occurs in a
ROS name) and the JSON-able info is
`{'kind': 'sources', 'buffer': <the buffers' kind>, 'sources': {source: its info}}`.
A restore fills the sources this set has and the state holds, empties the
others, and returns the saved sources it has no buffer for (the caller says so).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from torch import Tensor

from ami_ros.core.buffers import BufferState, DynamicsBuffer, StateInfo, check_kind
from ami_ros.core.trajectory import TrajectoryBuffer

SINGLE_SOURCE = ('',)
SOURCES_KIND = 'sources'

B = TypeVar('B', DynamicsBuffer, TrajectoryBuffer)


def check_sources(sources: Sequence[str]) -> tuple[str, ...]:
    """The sources as a tuple; ValueError for none, a non-string or a duplicate."""
    sources = tuple(sources)
    if not sources:
        raise ValueError('a trainer needs at least one source of experience')
    for source in sources:
        if not isinstance(source, str) or ':' in source:
            raise ValueError(f'a source is a string without ":", not {source!r}')
    if len(set(sources)) != len(sources):
        raise ValueError(f'sources {list(sources)} name one twice')
    return sources


class SourceBuffers(Generic[B]):
    """A buffer of kind `kind` per source, made by `make()`; each has its own lock."""

    def __init__(self, sources: Sequence[str], make: Callable[[], B], kind: str) -> None:
        self.sources = check_sources(sources)
        self.kind = kind
        self._make = make
        self._buffers: dict[str, B] = {source: make() for source in self.sources}

    def __getitem__(self, source: str) -> B:
        try:
            return self._buffers[source]
        except KeyError:
            raise ValueError(f'unknown source {source!r}; this trainer learns from '
                             f'{", ".join(map(repr, self.sources))}') from None

    def __iter__(self) -> Iterator[B]:
        return iter(self._buffers.values())

    def items(self) -> Iterator[tuple[str, B]]:
        return iter(self._buffers.items())

    def __len__(self) -> int:
        return sum(len(b) for b in self)

    def state_dict(self) -> BufferState:
        if self.sources == SINGLE_SOURCE:
            return self._buffers[''].state_dict()
        tensors: dict[str, Tensor] = {}
        infos: dict[str, StateInfo] = {}
        for source, buffer in self.items():
            part, infos[source] = buffer.state_dict()
            tensors.update({f'{source}:{key}': value for key, value in part.items()})
        return tensors, {'kind': SOURCES_KIND, 'buffer': self.kind, 'sources': infos}

    def load_state_dict(self, tensors: dict[str, Tensor], info: StateInfo) -> list[str]:
        """Restore what `state_dict()` gave (either layout); the saved sources this set lacks."""
        if info.get('kind') != SOURCES_KIND:
            check_kind(info, self.kind)
            saved = {'': (tensors, info)}
        else:
            if info.get('buffer') != self.kind or not isinstance(info.get('sources'), dict):
                raise ValueError(f'buffer state holds {info.get("buffer")!r} buffers of sources, '
                                 f'expected {self.kind!r}')
            saved = {source: ({}, part) for source, part in info['sources'].items()}
            for key, value in tensors.items():
                source, sep, name = key.partition(':')
                if not sep or source not in saved:
                    raise ValueError(f'buffer state holds tensor {key!r} of no listed source')
                saved[source][0][name] = value
        for source in self.sources:
            part = saved.get(source)
            if part is None:
                self._buffers[source] = self._make()  # not in the state: starts empty
            else:
                self._buffers[source].load_state_dict(*part)
        return [source for source in saved if source not in self._buffers]


class DynamicsBuffers(SourceBuffers[DynamicsBuffer]):
    """Dynamics steps per source: `capacity` in all, split evenly, each source at least `least`."""

    def __init__(self, sources: Sequence[str], capacity: int, least: int = 2) -> None:
        each = max(int(least), int(capacity) // max(len(tuple(sources)), 1))
        super().__init__(sources, lambda: DynamicsBuffer(each), 'dynamics')

    @property
    def capacity(self) -> int:
        return sum(b.capacity for b in self)

    @property
    def new_count(self) -> int:
        return sum(b.new_count for b in self)

    @property
    def added(self) -> int:
        return sum(b.added for b in self)

    def mark_trained(self) -> None:
        for buffer in self:
            buffer.mark_trained()

    def longest(self) -> int:
        """The most steps one source holds."""
        return max(len(b) for b in self)


class TrajectoryBuffers(SourceBuffers[TrajectoryBuffer]):
    """A PPO trajectory of `steps` per source."""

    def __init__(self, sources: Sequence[str], steps: int) -> None:
        super().__init__(sources, lambda: TrajectoryBuffer(steps), 'trajectory')
        self.steps = int(steps)

    @property
    def dropped(self) -> int:
        return sum(b.dropped for b in self)

    def full(self) -> bool:
        """Whether at least one source's trajectory is full."""
        return any(b.full() for b in self)

    def take_full(self) -> dict[str, dict[str, Tensor]]:
        """Every full trajectory, by source (see TrajectoryBuffer.take); the others wait."""
        taken = {}
        for source, buffer in self.items():
            try:
                taken[source] = buffer.take()
            except ValueError:  # not full, or emptied by a break since
                continue
        return taken

    def drop_older_than(self, min_policy_version: int) -> int:
        """Staleness per source: each drops its own stale prefix; how many went in all."""
        return sum(b.drop_older_than(min_policy_version) for b in self)
