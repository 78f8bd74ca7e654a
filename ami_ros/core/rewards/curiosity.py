"""Curiosity: the forward dynamics' prediction error is the reward.

The reward at step t is -log p(z_t | prediction made at t-1) under the
dynamics' Gaussian with fixed std 1/sqrt(2*pi), i.e. pi * (z - mu)^2 per
dimension. It is averaged (not summed) over the latent dimension so that the
reward scale, and with it PPO's value targets, does not depend on the latent
size of the preset. The dynamics trainer minimises the same measure.
"""

from __future__ import annotations

import math

from torch import Tensor

from ami_ros.core.rewards import IntrinsicReward


def prediction_nll(pred_mean: Tensor, observed: Tensor) -> Tensor:
    """-log N(observed | pred_mean, 1/sqrt(2*pi)), per-dimension mean over the last axis."""
    return math.pi * (observed - pred_mean).pow(2).mean(dim=-1)


class CuriosityReward(IntrinsicReward):
    """Reward = prediction error (negative log-likelihood) of the observed latent."""

    name = 'curiosity'

    def __call__(self, prediction: Tensor, observed: Tensor) -> Tensor:
        return prediction_nll(prediction, observed)
