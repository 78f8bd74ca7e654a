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
from torch.nn.utils.rnn import pad_sequence

from ami_ros.core.encoder import TRUNK_SIZE, conv_trunk_shapes
from ami_ros.core.presets import ACTION_CHOICES, PolicyConfig


class MultiCategorical:
    """Independent categorical distributions, one per action head; actions are [B, heads].

    Written on the logits directly, not with torch.distributions: the agent
    samples before it acts, and five Categorical objects (argument checks,
    normalisation) cost it about 0.8 ms a step for nothing it uses there.
    """

    def __init__(self, logits: Sequence[Tensor]) -> None:
        self.logits = list(logits)
        self._log_softmax: list[Tensor] | None = None

    def _normalized(self) -> list[Tensor]:
        if self._log_softmax is None:
            self._log_softmax = [torch.log_softmax(lg, -1) for lg in self.logits]
        return self._log_softmax

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """One action per row, all heads in one multinomial draw.

        With a `generator` the draw happens on its device (the agent keeps a
        CPU generator whatever the models' device: restorable sampling); the
        action comes back on the logits' device.
        """
        first = self.logits[0]
        batch = first.shape[0]
        # [B, n_i] per head -> [B * heads, widest], narrow heads padded with
        # -inf (probability 0: never drawn).
        padded = pad_sequence([lg.float().T for lg in self.logits],
                              padding_value=-math.inf).permute(2, 1, 0)
        probs = torch.softmax(padded.reshape(-1, padded.shape[-1]), -1)
        if generator is not None:
            probs = probs.to(generator.device)
        drawn = torch.multinomial(probs, 1, generator=generator)
        return drawn.view(batch, len(self.logits)).to(first.device)

    def mode(self) -> Tensor:
        return torch.stack([lg.argmax(dim=-1) for lg in self.logits], dim=-1)

    def log_prob(self, actions: Tensor) -> Tensor:
        """Per-head log-probabilities [B, heads] of actions [B, heads]."""
        return torch.stack([lp.gather(-1, actions[..., i:i + 1]).squeeze(-1)
                            for i, lp in enumerate(self._normalized())], dim=-1)

    def entropy(self) -> Tensor:
        """Per-head entropies [B, heads]."""
        return torch.stack([-(lp.exp() * lp).sum(-1) for lp in self._normalized()], dim=-1)


MAX_PERSISTENCE = 0.99  # at 1 the policy would have no say at all


def with_persistence(dist: MultiCategorical, previous: Tensor,
                     persistence: Tensor | float) -> MultiCategorical:
    """The acting distribution: each head keeps its previous choice with
    probability `persistence` (rho), else draws from `dist`.

    Per head, p(a) = (1 - rho) pi(a) + rho [a = previous], written as logits
    so that sampling, log-probabilities and PPO's ratio all see it exactly.
    A uniformly random policy that acts at 10 Hz jitters in place; held
    choices walk on and turn in arcs, as people hold keys
    (docs/experiments.md). `previous` [B, heads]; `persistence` a float
    or [B] (rows with 0 are `dist` itself: no previous action).
    """
    keep_policy: Tensor | float
    keep_previous: Tensor | float
    if isinstance(persistence, Tensor):  # per row: the trainer's minibatches
        rho = persistence.to(dist.logits[0].device, torch.float32)
        if bool(((rho < 0) | (rho > MAX_PERSISTENCE)).any()):
            raise ValueError(f'persistence must lie in 0..{MAX_PERSISTENCE}, got {rho.tolist()}')
        rho = rho.unsqueeze(-1)
        keep_policy, keep_previous = torch.log1p(-rho), torch.log(rho)  # log 0 = -inf: no mixing
    else:  # one number, the agent's step: no tensor work beyond the mixing itself
        if not 0.0 <= persistence <= MAX_PERSISTENCE:
            raise ValueError(f'persistence must lie in 0..{MAX_PERSISTENCE}, got {persistence}')
        keep_policy = math.log1p(-persistence)
        keep_previous = math.log(persistence) if persistence > 0 else -math.inf
    logits = []
    for i, lp in enumerate(dist._normalized()):
        held = torch.full_like(lp, -math.inf).scatter(-1, previous[..., i:i + 1], 0.0)
        logits.append(torch.logaddexp(lp + keep_policy, held + keep_previous))
    return MultiCategorical(logits)


def _orthogonal(layer: nn.Module, gain: float) -> nn.Module:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def policy_observation(kind: str, image: Tensor | None, latent: Tensor | None) -> Tensor:
    """What a policy of input `kind` (PolicyConfig.input) acts on, from one step's
    image and latent z; the agent (batched) and the policy trainer (one
    experience step) build it here alike."""
    return image if kind == 'image' else latent


class PolicyValue(nn.Module):
    """Observation -> (MultiCategorical over actions, value [B]).

    The observation is what `cfg.input` names (see `policy_observation`): an
    image [B,3,84,84] in [0,1] ('image', through a conv trunk like the
    encoder's) or the encoder's latent [B, latent_size] ('latent', through an
    MLP).
    """

    def __init__(self, cfg: PolicyConfig, latent_size: int | None = None,
                 action_choices: tuple[int, ...] = ACTION_CHOICES) -> None:
        super().__init__()
        self.action_choices = tuple(action_choices)
        relu_gain = math.sqrt(2.0)  # PPO practice: orthogonal init scaled for ReLU
        layers: list[nn.Module] = []
        if cfg.input == 'latent':
            if not latent_size:
                raise ValueError('a policy on the latent needs the latent size')
            features = latent_size
        else:
            for cin, cout, k, s in conv_trunk_shapes(cfg.channels):
                layers += [_orthogonal(nn.Conv2d(cin, cout, k, s), relu_gain), nn.ReLU()]
            layers.append(nn.Flatten())
            features = cfg.channels[2] * TRUNK_SIZE * TRUNK_SIZE
        self.trunk = nn.Sequential(
            *layers,
            _orthogonal(nn.Linear(features, cfg.hidden), relu_gain),
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
