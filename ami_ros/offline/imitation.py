"""Behaviour cloning: the policy learns to choose the recorded actions (`--imitate`).

Loss = the negative log-likelihood of the recorded action under the policy,
summed over the five heads and averaged over the batch (a cross-entropy per
head). Only the policy's action heads learn; its value head is left to PPO,
which stays on-policy and is not trained offline. A persistence the agent
may mix in when it acts is not part of what is cloned: the recorded action
is the policy's target as it is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# As the PPO trainer clips (CleanRL's default): cloning starts the same policy.
MAX_GRAD_NORM = 0.5
# Cloning fits fixed targets, with no trust region to keep as PPO's small rates
# do: the usual supervised rate (PPO's 1e-4..3e-4 cloned too slowly in trials).
LEARNING_RATE = 1e-3


def cloning_loss(policy: nn.Module, observation: Tensor, actions: Tensor) -> tuple[Tensor, dict[str, float]]:
    """(loss, metrics: loss, accuracy of the most likely action per head, entropy)."""
    dist, _ = policy(observation)
    log_prob = dist.log_prob(actions)  # [B, heads]
    loss = -log_prob.sum(-1).mean()
    with torch.no_grad():
        accuracy = (dist.mode() == actions).float().mean()
        entropy = dist.entropy().sum(-1).mean()
    return loss, {'loss': float(loss.detach()), 'accuracy': float(accuracy), 'entropy': float(entropy)}


class ImitationTrainer:
    """The policy's behaviour cloning: AdamW at LEARNING_RATE (or `lr`), clipped gradients."""

    kind = 'imitation'

    def __init__(self, policy: nn.Module, device: str | torch.device = 'cpu',
                 lr: float = LEARNING_RATE) -> None:
        self.policy = policy.to(device)
        self.device = torch.device(device)
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
        self.version = 0

    def train_batch(self, observation: Tensor, actions: Tensor) -> dict[str, float]:
        """One step on what the policy acts on (images in [0, 1] or latents) and the recorded actions."""
        self.policy.train()
        loss, metrics = cloning_loss(self.policy, observation.to(self.device), actions.to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        metrics['grad_norm'] = float(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), MAX_GRAD_NORM))
        self.optimizer.step()
        self.policy.eval()
        return metrics

    @torch.no_grad()
    def accuracy(self, observation: Tensor, actions: Tensor) -> float:
        """Share of heads whose most likely choice is the recorded one."""
        dist, _ = self.policy(observation.to(self.device))
        return float((dist.mode() == actions.to(self.device)).float().mean())
