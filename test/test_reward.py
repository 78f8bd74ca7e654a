"""Intrinsic rewards: the curiosity reward (Gaussian prediction NLL with fixed
std 1/sqrt(2*pi)), and the registry that finds every reward of core/rewards/
by name, so that adding a reward is adding one file."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.distributions import Normal

import ami_ros
from ami_ros.core import rewards
from ami_ros.core.agent import CuriosityAgent
from ami_ros.core.rewards import IntrinsicReward, make_reward, reward_names
from ami_ros.core.rewards.curiosity import CuriosityReward, prediction_nll


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


def test_the_registry_finds_curiosity_and_names_the_choices_of_an_unknown_reward():
    assert 'curiosity' in reward_names()
    reward = make_reward('curiosity')
    assert isinstance(reward, CuriosityReward) and isinstance(reward, IntrinsicReward)
    mu, x = torch.zeros(2, 4), torch.ones(2, 4)
    torch.testing.assert_close(reward(mu, x), torch.full((2,), math.pi))
    # Curiosity keeps no state: it saves nothing and refuses state it cannot hold.
    assert reward.state_dict() == {}
    reward.load_state_dict({})
    with pytest.raises(ValueError, match='keeps no state'):
        reward.load_state_dict({'counts': torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unknown reward 'novelty'; choose one of .*curiosity"):
        make_reward('novelty')
    with pytest.raises(ValueError, match='unknown reward'):
        CuriosityAgent('cpu', reward='novelty')


def test_two_rewards_may_not_share_a_name(monkeypatch):
    monkeypatch.setattr(rewards, '_REGISTRY', dict(rewards._REGISTRY))
    with pytest.raises(ValueError, match="'curiosity' is taken by"):
        class Impostor(IntrinsicReward):
            name = 'curiosity'

            def __call__(self, prediction: Tensor, observed: Tensor) -> Tensor:
                return observed.sum(-1)


# A reward in a file of its own: the largest error of any latent dimension, with
# memory (how many steps it paid), so that its state goes through the checkpoint.
_NEW_REWARD = '''
from torch import Tensor, tensor

from ami_ros.core.rewards import IntrinsicReward


class WorstDimensionReward(IntrinsicReward):
    name = 'worst_dimension'

    def __init__(self) -> None:
        self.paid = 0

    def __call__(self, prediction: Tensor, observed: Tensor) -> Tensor:
        self.paid += 1
        return (observed - prediction).abs().amax(dim=-1)

    def state_dict(self) -> dict[str, Tensor]:
        return {'paid': tensor(self.paid)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.paid = int(state['paid'])
'''

# Run against a copy of the package that has the new file and nothing else changed.
_USE_NEW_REWARD = '''
import sys
import numpy as np
import torch
import ami_ros
from ami_ros.core.agent import CuriosityAgent
from ami_ros.core.checkpoint import begin_checkpoint, commit_checkpoint
from ami_ros.core.rewards import reward_names

assert ami_ros.__file__.startswith(sys.argv[1]), ami_ros.__file__
assert 'worst_dimension' in reward_names(), reward_names()
frames = np.random.default_rng(0).integers(0, 256, (4, 84, 84, 3), dtype=np.uint8)
agent = CuriosityAgent('cpu', reward='worst_dimension')
for frame in frames[:3]:
    predicted = agent.prediction
    step = agent.step(frame)
expected = float((step.latent - predicted[0]).abs().max())
assert abs(step.reward - expected) < 1e-5, (step.reward, expected)
stage = begin_checkpoint(sys.argv[2])
agent.save_checkpoint(stage)
path = commit_checkpoint(stage, {'preset': 'cpu'})
restored = CuriosityAgent('cpu', reward='worst_dimension')
restored.load_checkpoint(path)
assert restored.reward_fn.paid == agent.reward_fn.paid == 2, restored.reward_fn.paid
# Plain curiosity restores from it too: another reward's memory is left out.
plain = CuriosityAgent('cpu')
plain.load_checkpoint(path)
assert plain.steps == agent.steps
print('ok')
'''


def test_a_reward_in_a_new_file_of_the_package_is_the_agents_by_name(tmp_path):
    """Adding a file to core/rewards/ is enough: no other edit, and the agent
    computes its reward with it and checkpoints its state (which another reward
    does not load)."""
    package = Path(ami_ros.__file__).parent
    copy = tmp_path / 'src'
    # The core is all the agent imports (it imports nothing from ROS).
    (copy / 'ami_ros').mkdir(parents=True)
    shutil.copy(package / '__init__.py', copy / 'ami_ros' / '__init__.py')
    shutil.copytree(package / 'core', copy / 'ami_ros' / 'core',
                    ignore=shutil.ignore_patterns('__pycache__'))
    (copy / 'ami_ros' / 'core' / 'rewards' / 'worst_dimension.py').write_text(_NEW_REWARD)
    checkpoint = tmp_path / 'checkpoints'
    env = {**os.environ, 'PYTHONPATH': str(copy)}
    # Run from the copy: the working directory comes first on the path.
    result = subprocess.run([sys.executable, '-c', _USE_NEW_REWARD, str(copy), str(checkpoint)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == 'ok'
    assert 'worst_dimension' not in reward_names()  # the tree itself is untouched
