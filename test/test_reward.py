"""The curiosity reward: Gaussian prediction NLL with fixed std 1/sqrt(2*pi)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from ami_ros.core.reward import REWARDS, CuriosityReward, make_reward, prediction_nll


def test_prediction_nll_is_pi_mse_and_gaussian_nll():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(5, 7, 32, generator=g)
    x = torch.randn(5, 7, 32, generator=g)
    nll = prediction_nll(mu, x)
    assert nll.shape == (5, 7)
    torch.testing.assert_close(nll, math.pi * ((x - mu) ** 2).mean(-1))
    gaussian = -Normal(mu, 1.0 / math.sqrt(2.0 * math.pi)).log_prob(x).mean(-1)
    torch.testing.assert_close(nll, gaussian, atol=1e-5, rtol=1e-5)
    assert (nll > 0).all()


def test_zero_error_gives_zero():
    z = torch.randn(3, 16)
    assert torch.equal(prediction_nll(z, z), torch.zeros(3))


def test_scale_independent_of_latent_size():
    # Same per-dimension error -> same reward whatever the latent size.
    for size in (8, 64, 512):
        mu = torch.zeros(size)
        assert prediction_nll(mu, mu + 0.5).item() == pytest.approx(math.pi * 0.25)


def test_reward_registry():
    reward = make_reward('curiosity')
    assert isinstance(reward, CuriosityReward)
    assert set(REWARDS) == {'curiosity'}
    mu, x = torch.zeros(2, 4), torch.ones(2, 4)
    torch.testing.assert_close(reward(mu, x), torch.full((2,), math.pi))
    with pytest.raises(ValueError, match='curiosity'):
        make_reward('novelty')
