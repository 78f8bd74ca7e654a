"""PPO policy-value network with one categorical head per action part.

The trunk has no BatchNorm: PPO trains on small, highly correlated batches and
acts in eval mode, where batch statistics would make the acting and training
policies differ (and break the importance ratio).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Categorical

from ami_ros.core.encoder import TRUNK_SIZE, conv_trunk_shapes
from ami_ros.core.presets import ACTION_CHOICES, PolicyConfig


class MultiCategorical:
    """Independent categorical distributions, one per action head; actions are [B, heads]."""

    def __init__(self, logits: Sequence[Tensor]) -> None:
        self.logits = list(logits)
        self._dists = [Categorical(logits=lg) for lg in self.logits]

    def sample(self) -> Tensor:
        return torch.stack([d.sample() for d in self._dists], dim=-1)

    def mode(self) -> Tensor:
        return torch.stack([lg.argmax(dim=-1) for lg in self.logits], dim=-1)

    def log_prob(self, actions: Tensor) -> Tensor:
        """Per-head log-probabilities [B, heads] of actions [B, heads]."""
        return torch.stack([d.log_prob(actions[..., i]) for i, d in enumerate(self._dists)], dim=-1)

    def entropy(self) -> Tensor:
        """Per-head entropies [B, heads]."""
        return torch.stack([d.entropy() for d in self._dists], dim=-1)


def _orthogonal(layer: nn.Module, gain: float) -> nn.Module:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class PolicyValue(nn.Module):
    """Image [B,3,84,84] in [0,1] -> (MultiCategorical over actions, value [B])."""

    def __init__(self, cfg: PolicyConfig, action_choices: tuple[int, ...] = ACTION_CHOICES) -> None:
        super().__init__()
        self.action_choices = tuple(action_choices)
        relu_gain = math.sqrt(2.0)  # PPO practice: orthogonal init scaled for ReLU
        layers: list[nn.Module] = []
        for cin, cout, k, s in conv_trunk_shapes(cfg.channels):
            layers += [_orthogonal(nn.Conv2d(cin, cout, k, s), relu_gain), nn.ReLU()]
        self.trunk = nn.Sequential(
            *layers, nn.Flatten(),
            _orthogonal(nn.Linear(cfg.channels[2] * TRUNK_SIZE * TRUNK_SIZE, cfg.hidden), relu_gain),
            nn.ReLU(),
            _orthogonal(nn.Linear(cfg.hidden, cfg.hidden), relu_gain),
            nn.ReLU(),
        )
        # Small policy heads start near-uniform; value head at unit gain.
        self.policy_heads = nn.ModuleList(
            _orthogonal(nn.Linear(cfg.hidden, n), 0.01) for n in self.action_choices)
        self.value_head = _orthogonal(nn.Linear(cfg.hidden, 1), 1.0)

    def forward(self, obs: Tensor) -> tuple[MultiCategorical, Tensor]:
        h = self.trunk(obs)
        dist = MultiCategorical([head(h) for head in self.policy_heads])
        return dist, self.value_head(h).squeeze(-1)
