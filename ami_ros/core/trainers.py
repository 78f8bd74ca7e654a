"""Trainers of the learning core: VAE, forward dynamics, PPO policy.

About 400 lines on purpose: the three trainers share one base class (rounds,
versions, weights, state) whose contract is easiest to check in one file. An
optimiser's state as tensors and JSON is core/optimizer_state.py.

Each trainer owns its models, an optimiser and a buffer. A node adds data from
its executor thread and calls `train_round()` from a training thread; when
`ready()` says enough new data arrived. `weights()` hands out CPU copies of
the model weights (thread-safe against a running round: the models are only
changed under the trainer's lock, one optimiser step at a time).

`rounds` counts finished rounds and `version` the weights' version (one more
per round; a checkpoint may set it). `state_dict()` returns tensors + a JSON-
able dict (model weights, the flattened optimiser state, the trainer's random
generator, counters), never a pickle; the buffer is saved on its own
(`trainer.buffer.state_dict()`), as checkpoints keep data apart.

Sources: a trainer may learn from several agents at once, each named by a
string (`sources`; `('',)` = one agent). Dynamics chunks and PPO
trajectories never cross two sources (core/source_buffers.py); the VAE's
images are independent, so one buffer serves all and only counts per source.
`add(..., source=...)` with a source the trainer was not given raises ValueError.

Randomness: minibatch orders come from the trainer's own generator (saved).
Reparameterisation noise and dropout use torch's global generator, which the
caller seeds when it needs bit-exact repeats.

Setting torch's thread count is the node's job, not the trainers', and so is
keeping training out of the acting agent's steps (`ami_ros/ros/pacing.py`
hooks the `models` from outside).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence

from ami_ros.core.buffers import ImageBuffer
from ami_ros.core.optimizer_state import flatten_optimizer, load_optimizer, unflatten_optimizer
from ami_ros.core.policy import with_persistence
from ami_ros.core.presets import DynamicsTrainingConfig, PPOTrainingConfig, VAETrainingConfig
from ami_ros.core.rewards.curiosity import prediction_nll
from ami_ros.core.source_buffers import SINGLE_SOURCE, DynamicsBuffers, TrajectoryBuffers, check_sources
from ami_ros.core.trajectory import trajectories_gae

# A round over a big buffer stays bounded: at most this many minibatches per
# epoch (with the reference settings, 2048 images / batch 8 = 256: the whole
# buffer once per epoch).
DEFAULT_MAX_BATCHES = 256


def _to_float_image(images: Tensor) -> Tensor:
    """uint8 [B,3,H,W] -> float in [0, 1], the models' input (as observation.py)."""
    return images.float().div_(255.0)


class _Trainer:
    """Shared bookkeeping: device, counters, lock, weights and state round trips."""

    kind = 'trainer'

    def __init__(self, models: dict[str, nn.Module], optimizer_params: list[nn.Parameter],
                 device: str, seed: int) -> None:
        self.device = torch.device(device)
        self.models = {name: m.to(self.device) for name, m in models.items()}
        self._params = list(optimizer_params)
        self.optimizer = self._make_optimizer(self._params)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.rounds = 0
        self.version = 0
        # Held around each optimiser step and while copying weights out.
        self._lock = threading.RLock()

    def _make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        raise NotImplementedError

    def _minibatches(self, n: int, batch_size: int, max_batches: int,
                     min_size: int = 1) -> Iterator[Tensor]:
        """Shuffled index batches over n items, at most `max_batches`; a trailing
        batch smaller than `min_size` is skipped (BatchNorm needs 2 samples)."""
        perm = torch.randperm(n, generator=self.generator)
        for count, start in enumerate(range(0, n, batch_size)):
            if count >= max_batches:
                return
            idx = perm[start:start + batch_size]
            if len(idx) < min_size:
                return
            yield idx

    def ready(self) -> bool:
        raise NotImplementedError

    def _round(self) -> dict[str, float]:
        raise NotImplementedError

    def train_round(self) -> dict[str, float]:
        """One training round over the buffer; metrics (means over minibatches)
        plus 'seconds', 'round' and 'version'."""
        start = time.perf_counter()
        for m in self.models.values():
            m.train()
        try:
            metrics = self._round()
        finally:
            for m in self.models.values():
                m.eval()
        self.rounds += 1
        self.version += 1
        metrics['seconds'] = time.perf_counter() - start
        metrics['round'] = float(self.rounds)
        metrics['version'] = float(self.version)
        return metrics

    def _step(self, loss: Tensor, max_grad_norm: float | None) -> float:
        """Backward + optimiser step under the lock; returns the gradient norm."""
        with self._lock:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in self._params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
            if max_grad_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(self._params, max_grad_norm, norm)
            self.optimizer.step()
            return float(norm)

    def weights(self) -> dict[str, dict[str, Tensor]]:
        """Model name -> state_dict, as CPU copies safe to hand to another thread."""
        with self._lock:
            return {name: {k: v.detach().to('cpu', copy=True) for k, v in m.state_dict().items()}
                    for name, m in self.models.items()}

    def load_weights(self, weights: Mapping[str, Mapping[str, Tensor]]) -> None:
        """Load model weights (e.g. from a checkpoint's models/); strict."""
        with self._lock:
            for name, state in weights.items():
                self.models[name].load_state_dict(dict(state))

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(tensors, JSON-able info): model weights, optimiser, generator, counters."""
        with self._lock:
            tensors = {f'model/{name}/{k}': v for name, w in self.weights().items() for k, v in w.items()}
            opt_tensors, opt_info = flatten_optimizer(self.optimizer.state_dict())
            tensors.update(opt_tensors)
            tensors['generator'] = self.generator.get_state().clone()
            info = {'trainer': self.kind, 'rounds': self.rounds, 'version': self.version,
                    'seed': self.seed, 'optimizer': opt_info}
            return tensors, info

    def load_state_dict(self, tensors: Mapping[str, Tensor], info: Mapping[str, Any]) -> None:
        """Restore what `state_dict()` gave; refuses another trainer's state."""
        if info.get('trainer') != self.kind:
            raise ValueError(f'trainer state is of {info.get("trainer")!r}, expected {self.kind!r}')
        weights: dict[str, dict[str, Tensor]] = {name: {} for name in self.models}
        for key, value in tensors.items():
            if key.startswith('model/'):
                _, name, param = key.split('/', 2)
                if name not in weights:
                    raise ValueError(f'trainer state holds weights of unknown model {name!r}')
                weights[name][param] = value
        with self._lock:
            self.load_weights(weights)
            load_optimizer(self.optimizer, unflatten_optimizer(tensors, info['optimizer']))
            self.generator.set_state(tensors['generator'].to(torch.uint8).contiguous().clone())
            self.rounds = int(info['rounds'])
            self.version = int(info['version'])


class VAETrainer(_Trainer):
    """Observation VAE: loss = MSE(recon, x) + kl_coef · KL(q(z|x) || N(0, I)).

    Both terms are means per element: MSE over pixels and batch, KL over
    latent dimensions and batch, so neither depends on the batch size. A round
    is `cfg.epochs` epochs over the buffer's contents at round start, in
    minibatches of `cfg.batch_size`, at most `max_batches` per epoch.
    """

    kind = 'vae'

    def __init__(self, encoder: nn.Module, decoder: nn.Module, cfg: VAETrainingConfig,
                 device: str = 'cpu', seed: int = 0, max_batches: int = DEFAULT_MAX_BATCHES,
                 sources: Sequence[str] = SINGLE_SOURCE) -> None:
        self.cfg = cfg
        self.added_by_source = dict.fromkeys(check_sources(sources), 0)  # images per source, ever
        self.max_batches = max_batches
        self.encoder, self.decoder = encoder, decoder
        super().__init__({'encoder': encoder, 'decoder': decoder},
                         list(encoder.parameters()) + list(decoder.parameters()), device, seed)
        self.buffer = ImageBuffer(cfg.buffer_size, seed=seed)

    def _make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.cfg.lr, fused=True)

    def add(self, image: Tensor, source: str = '') -> None:
        """One camera image, uint8 [3, 84, 84], of agent `source`."""
        if source not in self.added_by_source:
            raise ValueError(f'unknown source {source!r}; this trainer learns from '
                             f'{", ".join(map(repr, self.added_by_source))}')
        self.buffer.add(image)
        self.added_by_source[source] += 1

    def ready(self) -> bool:
        return len(self.buffer) >= 2 and self.buffer.new_count >= self.cfg.min_new

    def train_batch(self, images: Tensor) -> dict[str, float]:
        """One optimiser step on uint8 images [B>=2, 3, H, W] (a round's minibatch,
        or offline training's); its loss, reconstruction, kl and grad_norm."""
        x = _to_float_image(images.to(self.device))
        posterior: Normal = self.encoder(x)
        recon = self.decoder(posterior.rsample())
        rec = F.mse_loss(recon, x)
        prior = Normal(torch.zeros_like(posterior.mean), torch.ones_like(posterior.stddev))
        # Mean per element like the MSE: kl_coef then weighs two
        # per-element means (a per-image sum over the latent made the
        # KL dominate and the posterior collapse in trials).
        kl = kl_divergence(posterior, prior).mean()
        loss = rec + self.cfg.kl_coef * kl
        norm = self._step(loss, None)
        return {'loss': float(loss.detach()), 'reconstruction': float(rec.detach()),
                'kl': float(kl.detach()), 'grad_norm': norm}

    def _round(self) -> dict[str, float]:
        images = self.buffer.snapshot(mark_trained=True)
        if len(images) < 2:
            raise ValueError('VAE round needs at least 2 images (BatchNorm)')
        totals = {'loss': 0.0, 'reconstruction': 0.0, 'kl': 0.0, 'grad_norm': 0.0}
        batches = 0
        for _ in range(self.cfg.epochs):
            for idx in self._minibatches(len(images), self.cfg.batch_size, self.max_batches, 2):
                for key, value in self.train_batch(images[idx]).items():
                    totals[key] += value
                batches += 1
        metrics = {k: v / max(batches, 1) for k, v in totals.items()}
        metrics.update(batches=float(batches), samples=float(len(images)))
        return metrics


class DynamicsTrainer(_Trainer):
    """Forward dynamics on chunks of `cfg.chunk` consecutive steps.

    Each chunk starts from the hidden state the agent stored with its first
    step and runs the parallel form over chunk-1 transitions; loss =
    prediction_nll(pred, next latent).mean() (the curiosity reward's own
    measure). Gradients are clipped to `max_grad_norm`.
    """

    kind = 'dynamics'

    def __init__(self, dynamics: nn.Module, cfg: DynamicsTrainingConfig, device: str = 'cpu',
                 seed: int = 0, max_batches: int = DEFAULT_MAX_BATCHES,
                 max_grad_norm: float | None = 1.0, sources: Sequence[str] = SINGLE_SOURCE) -> None:
        self.cfg = cfg
        self.max_batches = max_batches
        self.max_grad_norm = max_grad_norm
        self.dynamics = dynamics
        super().__init__({'dynamics': dynamics}, list(dynamics.parameters()), device, seed)
        # buffer_size is the total: each source gets its share, at least one chunk.
        self.buffer = DynamicsBuffers(sources, cfg.buffer_size, least=max(cfg.chunk, 2))

    def _make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.cfg.lr, fused=True)

    def add(self, latent: Tensor, hidden: Tensor, action: Tensor, continues: bool = True,
            source: str = '') -> None:
        """One step of agent `source`: z_t [L], h_t [depth, dim] complex64, a_t [5]."""
        self.buffer[source].add(latent, hidden, action, continues)

    def break_sequence(self, source: str | None = None) -> None:
        """The next step of `source` (None: of every source) does not follow its last one."""
        for buffer in (self.buffer if source is None else [self.buffer[source]]):
            buffer.break_sequence()

    def ready(self) -> bool:
        return self.buffer.longest() >= self.cfg.chunk and self.buffer.new_count >= self.cfg.min_new

    def _loss(self, z: Tensor, h0: Tensor, a: Tensor, target: Tensor) -> Tensor:
        """The loss of one minibatch: the next latents' prediction NLL."""
        pred, _ = self.dynamics(z, h0, a)
        return prediction_nll(pred, target).mean()

    def train_batch(self, z: Tensor, h0: Tensor, a: Tensor, target: Tensor) -> dict[str, float]:
        """One optimiser step on a minibatch of chunks (a round's, or offline
        training's): z, a [B, T, .], h0 [B, depth, dim], target [B, T, L]; loss, grad_norm."""
        dev = self.device
        loss = self._loss(z.to(dev), h0.to(dev), a.to(dev), target.to(dev))
        norm = self._step(loss, self.max_grad_norm)
        return {'loss': float(loss.detach()), 'grad_norm': norm}

    def _round(self) -> dict[str, float]:
        # Each source's chunks on their own: none spans two agents.
        parts = [chunks for b in self.buffer
                 if len((chunks := b.chunks(self.cfg.chunk, mark_trained=True))[0])]
        if not parts:
            raise ValueError(f'no unbroken run of {self.cfg.chunk} steps in the dynamics buffer')
        z, h0, a, target = (torch.cat(tensors) for tensors in zip(*parts, strict=True))
        totals = {'loss': 0.0, 'grad_norm': 0.0}
        last_epoch = 0.0
        batches = 0
        for epoch in range(self.cfg.epochs):
            epoch_loss, epoch_batches = 0.0, 0
            for idx in self._minibatches(len(z), self.cfg.batch_size, self.max_batches):
                metrics = self.train_batch(z[idx], h0[idx], a[idx], target[idx])
                totals['grad_norm'] += metrics['grad_norm']
                epoch_loss += metrics['loss']
                epoch_batches += 1
            totals['loss'] += epoch_loss
            batches += epoch_batches
            if epoch == self.cfg.epochs - 1:
                last_epoch = epoch_loss / max(epoch_batches, 1)
        metrics = {k: v / max(batches, 1) for k, v in totals.items()}
        metrics.update(loss_last_epoch=last_epoch, batches=float(batches), samples=float(len(z)))
        return metrics


def ppo_loss(new_log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, new_value: Tensor,
             old_value: Tensor, returns: Tensor, entropy: Tensor, clip: float, value_coef: float,
             entropy_coef: float) -> tuple[Tensor, dict[str, float]]:
    """Clipped PPO objective for multi-head actions.

    The joint action log-probability is the sum over heads, so one ratio per
    sample is clipped. Value loss is 0.5·max((V−R)², (V_clipped−R)²) with
    V_clipped = V_old + clamp(V − V_old, ±clip) (the reference's clip_vloss).
    Entropy is summed over heads, averaged over the batch, and rewarded.
    Returns (loss, metrics: policy_loss, value_loss, entropy, approx_kl,
    clip_fraction, loss).
    """
    log_ratio = new_log_prob.sum(-1) - old_log_prob.sum(-1)
    ratio = log_ratio.exp()
    surrogate = torch.min(ratio * advantages, ratio.clamp(1.0 - clip, 1.0 + clip) * advantages)
    policy_loss = -surrogate.mean()
    clipped_value = old_value + (new_value - old_value).clamp(-clip, clip)
    value_loss = 0.5 * torch.max((new_value - returns).pow(2), (clipped_value - returns).pow(2)).mean()
    entropy_mean = entropy.sum(-1).mean()
    loss = policy_loss + value_coef * value_loss - entropy_coef * entropy_mean
    with torch.no_grad():
        approx_kl = ((ratio - 1.0) - log_ratio).mean()  # the low-variance k3 estimator
        clip_fraction = ((ratio - 1.0).abs() > clip).float().mean()
    metrics = {'loss': float(loss.detach()), 'policy_loss': float(policy_loss.detach()),
               'value_loss': float(value_loss.detach()), 'entropy': float(entropy_mean.detach()),
               'approx_kl': float(approx_kl), 'clip_fraction': float(clip_fraction)}
    return loss, metrics


class PPOTrainer(_Trainer):
    """PPO on the agents' trajectories (see TrajectoryBuffer for the reward
    convention), one per source. A round: take every source's full trajectory
    (each buffer keeps its last entry), GAE on each alone (bootstrapped from
    its own last value), then on their concatenation: optional advantage
    normalisation,
    `cfg.epochs` epochs of shuffled minibatches with `ppo_loss`. Gradients are
    clipped to `max_grad_norm` (0.5, the CleanRL default the reference cites).
    """

    kind = 'ppo'

    def __init__(self, policy: nn.Module, cfg: PPOTrainingConfig, device: str = 'cpu', seed: int = 0,
                 max_grad_norm: float | None = 0.5, sources: Sequence[str] = SINGLE_SOURCE) -> None:
        self.cfg = cfg
        self.max_grad_norm = max_grad_norm
        self.policy = policy
        super().__init__({'policy': policy}, list(policy.parameters()), device, seed)
        self.buffer = TrajectoryBuffers(sources, cfg.steps)

    def _make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.cfg.lr, fused=True)

    def add(self, observation: Tensor, action: Tensor, log_prob: Tensor, value: float | Tensor,
            reward: float | Tensor, policy_version: int, previous_action: Tensor | None = None,
            persistence: float = 0.0, source: str = '') -> None:
        """Entry t of agent `source`: observation (what the policy acted on, see
        policy.policy_observation: uint8 [3,84,84] or a float32 vector),
        action [5], log_prob [5], value; `reward` is for the action of entry t-1;
        the action held and its persistence where the agent held one."""
        self.buffer[source].add(observation, action, log_prob, value, reward, policy_version,
                                previous_action, persistence)

    def ready(self) -> bool:
        return self.buffer.full()

    def _round(self) -> dict[str, float]:
        cfg = self.cfg
        taken = list(self.buffer.take_full().values())
        traj, rewards, advantages, returns = trajectories_gae(taken, cfg.gamma, cfg.gae_lambda)
        raw_advantage = float(advantages.mean())
        if cfg.normalize_advantage:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        dev = self.device
        obs = traj['observation']
        actions, old_log_prob = traj['action'].to(dev), traj['log_prob'].to(dev)
        old_value, advantages, returns = traj['value'].to(dev), advantages.to(dev), returns.to(dev)
        # The agent acted with the policy mixed with the action it held: the
        # ratio compares that same mixture (policy.with_persistence).
        previous, persistence = traj['previous_action'].to(dev), traj['persistence'].to(dev)
        persistent = bool((persistence > 0).any())
        totals: dict[str, float] = {}
        batches = 0
        for _ in range(cfg.epochs):
            for idx in self._minibatches(len(obs), cfg.batch_size, len(obs)):
                x = obs[idx].to(dev)
                # Images travel as uint8; latents are the policy's input as they are.
                dist, value = self.policy(_to_float_image(x) if x.dtype == torch.uint8 else x)
                # The entropy bonus keeps the policy's own choice open; the
                # persistence is fixed, nothing to learn there.
                entropy = dist.entropy()
                if persistent:
                    dist = with_persistence(dist, previous[idx], persistence[idx])
                loss, metrics = ppo_loss(dist.log_prob(actions[idx]), old_log_prob[idx], advantages[idx],
                                         value, old_value[idx], returns[idx], entropy,
                                         cfg.clip, cfg.value_coef, cfg.entropy_coef)
                metrics['grad_norm'] = self._step(loss, self.max_grad_norm)
                for key, v in metrics.items():
                    totals[key] = totals.get(key, 0.0) + v
                batches += 1
        out = {k: v / max(batches, 1) for k, v in totals.items()}
        out.update(batches=float(batches), samples=float(len(obs)), trajectories=float(len(taken)),
                   reward_mean=float(rewards.mean()), advantage_mean=raw_advantage,
                   return_mean=float(returns.mean()),
                   policy_version_min=float(traj['policy_version'].min()))
        return out
