"""The offline loop: epochs over steps streamed from bags, the core trainers, one checkpoint.

Each epoch streams the bags again (nothing but the shuffle windows is held
in memory) and feeds three consumers, each through its own bounded shuffle
window and minibatches:

- the VAE (`VAETrainer.train_batch`): every frame;
- the forward dynamics (`DynamicsTrainer.train_batch`): windows of recorded
  steps (`sequences.DynamicsWindows`) whose latents the encoder computes as
  it is now, per batch, without gradients and in eval mode (as the agent
  encodes); the burn-in steps bring the hidden state up without gradients;
- with `imitate`, the policy (`imitation.ImitationTrainer`): each frame with
  its recorded action, on what the policy acts on (the frame, or its latent).

A version is one epoch (as one live round): the checkpoint's models carry
the versions they reached, so a graph started from it acts with versions
above 0 from its first step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ami_ros.core.agent import CuriosityAgent
from ami_ros.core.checkpoint import abort_checkpoint, commit_checkpoint
from ami_ros.core.policy import policy_observation
from ami_ros.core.presets import Preset
from ami_ros.core.trainer_part import write_trainer_part
from ami_ros.core.trainers import DynamicsTrainer, VAETrainer
from ami_ros.offline.imitation import ImitationTrainer
from ami_ros.offline.samples import BagTopics, StreamCounts, iter_steps
from ami_ros.offline.sequences import DynamicsWindows, ShuffleWindow, Window

MODELS = ('vae', 'dynamics', 'policy')
# The trainer nodes whose parts an offline checkpoint holds (their optimisers carry on).
TRAINER_NODES = {'vae': 'vae_trainer', 'dynamics': 'dynamics_trainer'}


@dataclass(frozen=True)
class OfflineConfig:
    preset: Preset
    device: str = 'cpu'
    epochs: int = 3
    batch_size: int = 32
    shuffle_window: int = 2048  # frames held for shuffling, per model
    imitate: bool = False
    seed: int = 0
    models: tuple[str, ...] = ('vae', 'dynamics')  # + 'policy' with imitate (benchmarks pick one)


@dataclass
class Progress:
    """Where training stands: per model samples, seconds spent and the latest losses."""

    epoch: int = 0
    frames: int = 0
    started: float = field(default_factory=time.perf_counter)
    samples: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MODELS, 0))
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MODELS, 0.0))
    last: dict[str, dict[str, float]] = field(default_factory=dict)

    def rate(self, model: str) -> float:
        """Samples per second of `model`'s own training time."""
        return self.samples[model] / self.seconds[model] if self.seconds[model] else 0.0


class _Means:
    """Running means of a model's metrics over one epoch."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: v / self.count for k, v in self.sums.items()} if self.count else {}


class OfflineTraining:
    """Trains a preset's models on recorded bags; `train()` then `save(out)`."""

    def __init__(self, cfg: OfflineConfig, bags: list[BagTopics], start: Path | None = None) -> None:
        self.cfg = cfg
        self.bags = bags
        self.preset = p = cfg.preset
        self.device = torch.device(cfg.device)
        source = CuriosityAgent(p, seed=cfg.seed)
        if start is not None:
            source.load_checkpoint(start)
        self.models = {name: m.to(self.device) for name, m in source.models.items()}
        self.start_versions = dict(source.versions)
        self.has_actions = any(b.action for b in bags)
        wanted = set(cfg.models) | ({'policy'} if cfg.imitate else set())
        self.active = [m for m in MODELS if m in wanted and (m == 'vae' or self.has_actions)]
        self.vae = VAETrainer(self.models['encoder'], self.models['decoder'], p.vae_training,
                              str(self.device), cfg.seed)
        self.dynamics = DynamicsTrainer(self.models['dynamics'], p.dynamics_training, str(self.device),
                                        cfg.seed)
        self.imitation = ImitationTrainer(self.models['policy'], self.device)
        for trainer, model in ((self.vae, 'encoder'), (self.dynamics, 'dynamics')):
            trainer.version = trainer.rounds = self.start_versions[model]
        self.imitation.version = self.start_versions['policy']
        self.chunk = p.dynamics_training.chunk
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.progress = Progress()
        self.history: list[dict[str, Any]] = []
        self.counts = StreamCounts()
        self._on_batch: Callable[[Progress], None] | None = None
        self._means: dict[str, _Means] = {}
        self._pending: dict[str, list[Any]] = {}

    # -- encoding -----------------------------------------------------------
    @torch.no_grad()
    def _latents(self, images: Tensor) -> Tensor:
        """The encoder's mean latents of uint8 images [N,3,H,W], in eval mode as the agent encodes."""
        encoder = self.models['encoder']
        encoder.eval()
        return encoder.encode_mean(images.to(self.device).float().div_(255.0))

    # -- one minibatch per model -------------------------------------------------
    def _vae_batch(self, images: list[Tensor]) -> dict[str, float]:
        self.models['encoder'].train()
        self.models['decoder'].train()
        return self.vae.train_batch(torch.stack(images))

    def _dynamics_batch(self, windows: list[Window]) -> dict[str, float]:
        frames = torch.stack([w.frames for w in windows])  # [N, W, 3, H, W]
        actions = torch.stack([w.actions for w in windows]).to(self.device)
        n, length = frames.shape[:2]
        z = self._latents(frames.flatten(0, 1)).view(n, length, -1)
        burn = length - self.chunk
        dynamics = self.models['dynamics']
        h0 = dynamics.initial_hidden(n, self.device)
        if burn > 0:
            with torch.no_grad():
                dynamics.eval()
                _, hiddens = dynamics(z[:, :burn], h0, actions[:, :burn])
            keep = torch.tensor([w.has_burn_in for w in windows], device=self.device)
            h0 = torch.where(keep[:, None, None], hiddens[:, -1], h0)
        dynamics.train()
        metrics = self.dynamics.train_batch(z[:, burn:-1], h0, actions[:, burn:-1], z[:, burn + 1:])
        dynamics.eval()
        return metrics

    def _policy_batch(self, pairs: list[tuple[Tensor, Tensor]]) -> dict[str, float]:
        images = torch.stack([f for f, _ in pairs])
        actions = torch.stack([a for _, a in pairs])
        kind = self.preset.policy.input
        observation = (self._latents(images) if kind == 'latent'
                       else policy_observation(kind, images.to(self.device).float().div_(255.0), None))
        return self.imitation.train_batch(observation, actions)

    # -- the loop -------------------------------------------------------------------
    def train(self, on_batch: Callable[[Progress], None] | None = None,
              on_epoch: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """All epochs; returns each epoch's mean metrics per model (also in `history`)."""
        self._on_batch = on_batch
        for epoch in range(1, self.cfg.epochs + 1):
            self.progress.epoch = epoch
            self._means = {m: _Means() for m in self.active}
            self._pending = {m: [] for m in self.active}
            windows = {m: ShuffleWindow(self._window_size(m), self.generator) for m in self.active}
            sequences = DynamicsWindows(self.chunk, self.chunk - 1)
            self.counts = StreamCounts()
            for step in iter_steps(self.bags, self.counts):
                self.progress.frames += 1
                chw = torch.from_numpy(step.frame).permute(2, 0, 1).contiguous()
                if 'vae' in windows:
                    if epoch == self.cfg.epochs:
                        self.vae.add(chw)  # the live VAE trainer starts with the bag's last frames
                    self._feed('vae', windows['vae'].push(chw))
                if 'dynamics' in windows:
                    window = sequences.add(step, chw)
                    if window is not None:
                        self._feed('dynamics', windows['dynamics'].push(window))
                if 'policy' in windows and step.action is not None:
                    self._feed('policy', windows['policy'].push((chw, torch.tensor(step.action))))
            for model in self.active:
                for item in windows[model].drain():
                    self._feed(model, item)
                if len(self._pending[model]) >= 2:  # BatchNorm needs two samples
                    self._run_batch(model)
            self.history.append(self._end_epoch(epoch, self._means))
            if on_epoch is not None:
                on_epoch(self.history[-1])
        return self.history

    def _feed(self, model: str, item: Any | None) -> None:
        """One item out of `model`'s shuffle window; a minibatch trains once there are enough."""
        if item is None:
            return
        self._pending[model].append(item)
        if len(self._pending[model]) >= self.cfg.batch_size:
            self._run_batch(model)

    def _window_size(self, model: str) -> int:
        per_item = self.chunk - 1 if model == 'dynamics' else 1  # a window holds chunk-1 transitions
        return max(self.cfg.batch_size, self.cfg.shuffle_window // per_item)

    def _run_batch(self, model: str) -> None:
        items, self._pending[model] = self._pending[model], []
        step = {'vae': self._vae_batch, 'dynamics': self._dynamics_batch, 'policy': self._policy_batch}[model]
        start = time.perf_counter()
        metrics = step(items)
        self.progress.seconds[model] += time.perf_counter() - start
        self.progress.samples[model] += len(items) * (self.chunk - 1 if model == 'dynamics' else 1)
        self.progress.last[model] = metrics
        self._means[model].add(metrics)
        if self._on_batch is not None:
            self._on_batch(self.progress)

    def _end_epoch(self, epoch: int, means: dict[str, _Means]) -> dict[str, Any]:
        result: dict[str, Any] = {'epoch': epoch, 'frames': self.counts.frames,
                                  'segments': self.counts.segments}
        for model, running in means.items():
            if not running.count:
                continue
            result[model] = running.means()
            trainer = {'vae': self.vae, 'dynamics': self.dynamics, 'policy': self.imitation}[model]
            trainer.version += 1
            if model != 'policy':
                trainer.rounds += 1
        return result

    # -- output ---------------------------------------------------------------------
    def versions(self) -> dict[str, int]:
        return {'encoder': self.vae.version, 'decoder': self.vae.version,
                'dynamics': self.dynamics.version, 'policy': self.imitation.version}

    def save(self, stage: Path, record: dict[str, Any]) -> Path:
        """Write the checkpoint into `stage` (from begin_checkpoint) and commit it; the final directory.

        The agent's part (models with their versions, a fresh agent state),
        the VAE and dynamics trainers' parts (optimisers; the VAE's buffer
        holds frames of the last epoch), and the record in the manifest. The
        policy trainer has no part: PPO starts its own optimiser from the
        saved (cloned) policy.
        """
        agent = CuriosityAgent(self.preset, seed=self.cfg.seed)
        for name, model in self.models.items():
            agent.models[name].load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
        agent.versions.update(self.versions())
        try:
            agent.save_checkpoint(stage)
            nodes = ['agent']
            self.vae.buffer.mark_trained()  # what it holds was trained on: no round at once
            for model, node in TRAINER_NODES.items():
                trainer = self.vae if model == 'vae' else self.dynamics
                if model in self.active:
                    write_trainer_part(stage, node, trainer.kind, self.preset.name, trainer.state_dict(),
                                       trainer.buffer.state_dict())
                    nodes.append(node)
            return commit_checkpoint(stage, {'preset': self.preset.name, 'nodes': nodes, 'manual': True,
                                             'versions': self.versions(),
                                             'offline': {**record, 'epochs': self.history}})
        except BaseException:
            abort_checkpoint(stage)
            raise
