"""The bounded shuffle window, and the forward dynamics' training windows.

`ShuffleWindow` holds at most `capacity` items and lets them out in random
order (each new item swaps out a random held one), so a bag far larger than
memory is still trained on in shuffled minibatches.

`DynamicsWindows` cuts each segment of recorded steps into training windows
for the dynamics: `chunk` consecutive steps (chunk-1 transitions, as the
live trainer's chunks), preceded by `burn_in` steps whose only use is to
bring the hidden state to where the agent's would be (the live trainer
starts from the hidden state the agent stored; offline it is recomputed).
Windows follow each other with stride chunk-1, so each transition is trained
once per epoch. The first window of a segment has no steps before it: its
burn-in is padding and it starts from the zero state, as the agent does.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from torch import Tensor

from ami_ros.offline.samples import Step

T = TypeVar('T')


class ShuffleWindow(Generic[T]):
    """A bounded shuffle buffer: `push` returns a random held item once full; `drain` the rest."""

    def __init__(self, capacity: int, generator: torch.Generator) -> None:
        if capacity < 1:
            raise ValueError(f'shuffle window must hold at least 1 item, got {capacity}')
        self.capacity = int(capacity)
        self.generator = generator
        self.items: list[T] = []

    def push(self, item: T) -> T | None:
        if len(self.items) < self.capacity:
            self.items.append(item)
            return None
        slot = int(torch.randint(self.capacity, (1,), generator=self.generator))
        out, self.items[slot] = self.items[slot], item
        return out

    def drain(self) -> Iterator[T]:
        order = torch.randperm(len(self.items), generator=self.generator).tolist()
        items, self.items = self.items, []
        for i in order:
            yield items[i]


@dataclass
class Window:
    """burn_in + chunk steps of one segment: frames uint8 [W,3,H,W], actions int64 [W,5]."""

    frames: Tensor
    actions: Tensor
    has_burn_in: bool


class DynamicsWindows:
    """Steps in time order -> `Window`s that never cross a segment or a step without action."""

    def __init__(self, chunk: int, burn_in: int) -> None:
        if chunk < 2:
            raise ValueError(f'chunk must be >= 2, got {chunk}')
        self.chunk, self.burn_in = int(chunk), int(burn_in)
        self.steps: deque[tuple[Tensor, Tensor]] = deque(maxlen=self.chunk + self.burn_in)
        self.segment: int | None = None
        self.length = 0  # steps of the current run
        self.next_end = self.chunk  # run length at which the next window completes

    def _restart(self, segment: int | None) -> None:
        self.steps.clear()
        self.segment = segment
        self.length = 0
        self.next_end = self.chunk

    def add(self, step: Step, chw: Tensor) -> Window | None:
        """Add one step (its frame as uint8 [3,H,W]); a completed window, if this step ends one."""
        if step.action is None:
            self._restart(None)
            return None
        if step.segment != self.segment:
            self._restart(step.segment)
        self.steps.append((chw, torch.tensor(step.action, dtype=torch.int64)))
        self.length += 1
        if self.length < self.next_end:
            return None
        self.next_end += self.chunk - 1  # the next window starts at this window's last step
        held = list(self.steps)
        has_burn_in = self.length >= self.chunk + self.burn_in
        if not has_burn_in:  # the segment's first window: pad the burn-in with its first step
            held = held[-self.chunk:]
            held = [held[0]] * self.burn_in + held
        frames = torch.stack([f for f, _ in held])
        actions = torch.stack([a for _, a in held])
        return Window(frames, actions, has_burn_in)
