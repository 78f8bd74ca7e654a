"""Intrinsic rewards: one interface, one module per reward, found by name.

A reward is a subclass of `IntrinsicReward` with a `name`, in a module of
this package: defining the class registers it, and `make_reward(name)`
imports every module here first (pkgutil), so adding a reward means adding
one file. The agent builds its reward through `make_reward`, and the agent
node offers `reward_names()` as its `reward` parameter's choices.

The reward at step t is paid for the action of step t-1 and scores the
prediction the forward dynamics made then against the latent observed now.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from typing import ClassVar

from torch import Tensor

_REGISTRY: dict[str, type[IntrinsicReward]] = {}


class IntrinsicReward(ABC):
    """Turns the dynamics' prediction of z_t and the observed z_t into a reward.

    Subclasses set `name` (the `reward` parameter's value) and implement
    `__call__`. A reward with memory overrides `state_dict` and
    `load_state_dict`; the agent saves that state with its checkpoint part.
    """

    name: ClassVar[str] = ''

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.name:
            return  # an abstract helper class, not a reward to choose
        known = _REGISTRY.get(cls.name)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f'reward name {cls.name!r} is taken by {known.__module__}.{known.__qualname__}')
        _REGISTRY[cls.name] = cls

    @abstractmethod
    def __call__(self, prediction: Tensor, observed: Tensor) -> Tensor:
        """prediction (mean of z_t) and observed z_t [..., L] -> reward [...]."""

    def state_dict(self) -> dict[str, Tensor]:
        """Checkpointed state; none for a reward without memory."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what `state_dict()` gave; a reward without memory refuses any state."""
        if state:
            raise ValueError(f'reward {self.name!r} keeps no state, got {", ".join(sorted(state))}')


def _discover() -> None:
    """Import every module of this package, so that its rewards register."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f'{__name__}.{module.name}')


def reward_names() -> tuple[str, ...]:
    """The names of all rewards in this package, sorted."""
    _discover()
    return tuple(sorted(_REGISTRY))


def make_reward(name: str) -> IntrinsicReward:
    """A new instance of the reward called `name`; a ValueError listing the choices otherwise."""
    names = reward_names()
    if name not in _REGISTRY:
        raise ValueError(f'unknown reward {name!r}; choose one of {", ".join(names)}')
    return _REGISTRY[name]()
