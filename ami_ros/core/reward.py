"""Intrinsic rewards; the default is curiosity = forward-dynamics prediction error.

The reward at step t is -log p(z_t | prediction made at t-1) under the
dynamics' Gaussian with fixed std 1/sqrt(2*pi), i.e. pi * (z - mu)^2 per
dimension. It is averaged (not summed) over the latent dimension so that the
reward scale, and with it PPO's value targets, does not depend on the latent
size of the preset.
"""

from __future__ import annotations

import math
from typing import Protocol

from torch import Tensor


def prediction_nll(pred_mean: Tensor, observed: Tensor) -> Tensor:
    """-log N(observed | pred_mean, 1/sqrt(2*pi)), per-dimension mean over the last axis."""
    return math.pi * (observed - pred_mean).pow(2).mean(dim=-1)


class RewardFunction(Protocol):
    """Anything that turns a prediction and the observed next latent into a reward [...]."""

    def __call__(self, pred_mean: Tensor, observed: Tensor) -> Tensor: ...


class CuriosityReward:
    """Reward = prediction error (negative log-likelihood) of the observed latent."""

    def __call__(self, pred_mean: Tensor, observed: Tensor) -> Tensor:
        return prediction_nll(pred_mean, observed)


REWARDS: dict[str, type] = {'curiosity': CuriosityReward}


def make_reward(name: str) -> RewardFunction:
    """The reward called `name`; a ValueError listing the choices otherwise."""
    try:
        cls = REWARDS[name]
    except KeyError:
        raise ValueError(f'unknown reward {name!r}; choose one of {", ".join(REWARDS)}') from None
    return cls()
