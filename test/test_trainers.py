"""Trainers of the learning core: PPO loss clipping, learning on toy data,
and exact state round trips (cpu sizes, fixed seeds, a few seconds each)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from frame_policy_preset import ON_FRAME
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ami_ros.core import trainers as trainer_module
from ami_ros.core.models import build_models
from ami_ros.core.policy import MultiCategorical, with_persistence
from ami_ros.core.presets import Preset, get_preset, with_overrides
from ami_ros.core.rewards.curiosity import prediction_nll
from ami_ros.core.trainers import DynamicsTrainer, PPOTrainer, VAETrainer, ppo_loss
from ami_ros.core.trajectory import gae


def _through_disk(state):
    """What a checkpoint does: safetensors for tensors, JSON for the rest."""
    tensors, info = state
    return st_load(st_save({k: v.contiguous() for k, v in tensors.items()})), json.loads(json.dumps(info))


# ------------------------------------------------------------------ PPO loss

def _loss_grad(new_lp: list[float], advantage: float, clip: float = 0.1):
    new = torch.tensor([new_lp], requires_grad=True)
    old = torch.zeros(1, 5)
    zero = torch.zeros(1)
    loss, metrics = ppo_loss(new, old, torch.tensor([advantage]), zero, zero, zero,
                             torch.zeros(1, 5), clip, value_coef=0.5, entropy_coef=0.0)
    loss.backward()
    return new.grad, metrics


@pytest.mark.parametrize('advantage, joint_log_ratio, clipped', [
    (1.0, 0.3, True),     # ratio 1.35 > 1.1, A > 0: no push further up
    (1.0, 0.05, False),   # ratio within range: gradient flows
    (1.0, -0.3, False),   # ratio below range, A > 0: still pulled up (pessimistic bound)
    (-1.0, -0.3, True),   # ratio 0.74 < 0.9, A < 0: no push further down
    (-1.0, -0.05, False),
    (-1.0, 0.3, False),   # ratio above range, A < 0: still pulled down
])
def test_ppo_surrogate_gradient_is_clipped(advantage, joint_log_ratio, clipped):
    # The joint log-prob is the sum over heads: spread the ratio over two heads.
    grad, metrics = _loss_grad([joint_log_ratio / 2, joint_log_ratio / 2, 0.0, 0.0, 0.0], advantage)
    if clipped:
        assert torch.all(grad == 0)
        assert metrics['clip_fraction'] == 1.0
    else:
        ratio = float(torch.tensor(joint_log_ratio).exp())
        # d(-ratio*A)/d(log p_head) = -A*ratio for every head (joint = sum).
        assert grad == pytest.approx(torch.full((1, 5), -advantage * ratio), abs=1e-6)
    ratio = torch.tensor(joint_log_ratio).exp()
    assert metrics['approx_kl'] == pytest.approx(float((ratio - 1) - joint_log_ratio), abs=1e-6)


def test_ppo_value_loss_takes_max_of_clipped_and_unclipped():
    old = torch.zeros(3)
    new = torch.tensor([1.0, 0.05, -1.0], requires_grad=True)
    returns = torch.ones(3)
    zeros = torch.zeros(3, 5)
    loss, metrics = ppo_loss(zeros, zeros, torch.zeros(3), new, old, returns, zeros,
                             clip=0.1, value_coef=1.0, entropy_coef=0.0)
    # clipped values 0.1, 0.05, -0.1; squared errors (unclipped, clipped):
    # (0, 0.81) -> 0.81, (0.9025, 0.9025), (4, 1.21) -> 4
    assert metrics['value_loss'] == pytest.approx(0.5 * (0.81 + 0.9025 + 4.0) / 3, abs=1e-6)
    loss.backward()
    # First sample: the clipped branch wins and does not depend on the new value.
    assert float(new.grad[0]) == 0.0
    assert float(new.grad[2]) == pytest.approx((-1.0 - 1.0) / 3, abs=1e-6)


def test_ppo_entropy_bonus_sums_heads():
    zeros = torch.zeros(2, 5)
    entropy = torch.tensor([[1.0, 1.0, 1.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0]])
    loss, metrics = ppo_loss(zeros, zeros, torch.zeros(2), torch.zeros(2), torch.zeros(2),
                             torch.zeros(2), entropy, 0.1, 0.5, entropy_coef=0.1)
    assert metrics['entropy'] == pytest.approx(2.0)
    assert float(loss) == pytest.approx(-0.2)


# ------------------------------------------------------------------ learning

def _rectangles(n: int, gen: torch.Generator) -> torch.Tensor:
    """Two coloured rectangles at random places on a dark background."""
    images = torch.full((n, 3, 84, 84), 20, dtype=torch.uint8)
    for k in range(n):
        for _ in range(2):
            x, y = torch.randint(0, 60, (2,), generator=gen).tolist()
            w, h = torch.randint(12, 25, (2,), generator=gen).tolist()
            colour = torch.randint(60, 256, (3,), generator=gen).to(torch.uint8)
            images[k, :, y:y + h, x:x + w] = colour[:, None, None]
    return images


def test_vae_trainer_learns_to_reconstruct():
    preset = with_overrides(get_preset('cpu'), vae_training=dict(buffer_size=128, min_new=32))
    torch.manual_seed(0)
    models = build_models(preset, seed=0)
    trainer = VAETrainer(models['encoder'], models['decoder'], preset.vae_training, seed=0)
    gen = torch.Generator().manual_seed(0)
    held_out = _rectangles(64, gen).float() / 255
    # The best constant guess (the mean image): a VAE that beats it uses its latent.
    mean_image_mse = float(((held_out - held_out.mean(0)) ** 2).mean())

    for image in _rectangles(20, gen):
        trainer.add(image)
    assert not trainer.ready()
    for image in _rectangles(108, gen):
        trainer.add(image)
    assert trainer.ready()
    history = []
    for _ in range(7):
        metrics = trainer.train_round()
        history.append(metrics['reconstruction'])
        assert not trainer.ready()  # the round consumed the new images
        for image in _rectangles(32, gen):
            trainer.add(image)
    assert trainer.rounds == 7 and trainer.version == 7
    assert history[-1] < 0.6 * history[0], history

    encoder, decoder = trainer.encoder.eval(), trainer.decoder.eval()
    with torch.no_grad():
        recon = decoder(encoder.encode_mean(held_out))
    held_out_mse = float(((recon - held_out) ** 2).mean())
    assert held_out_mse < 0.85 * mean_image_mse, (held_out_mse, mean_image_mse)
    weights = trainer.weights()
    assert set(weights) == {'encoder', 'decoder'}
    assert all(t.device.type == 'cpu' for w in weights.values() for t in w.values())


class _ToyWorld:
    """Deterministic latent transition: z' = 0.8·roll(z, 1) + 0.6·E[a_0].

    The agent's copy of the dynamics runs alongside, as the real agent does,
    to supply the hidden state stored with each step.
    """

    def __init__(self, agent_dynamics: torch.nn.Module, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.agent = agent_dynamics.eval()
        latent = self.agent.latent
        self.effects = torch.randn(3, latent, generator=self.gen)
        self.z = torch.randn(latent, generator=self.gen)
        self.h = self.agent.initial_hidden(1)

    def action(self) -> torch.Tensor:
        a = torch.randint(0, 2, (5,), generator=self.gen)
        a[0] = int(torch.randint(0, 3, (1,), generator=self.gen))
        return a

    def next_latent(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return 0.8 * torch.roll(z, 1, dims=-1) + 0.6 * self.effects[a[..., 0]]

    def train(self, trainer: DynamicsTrainer, rounds: int) -> list[dict[str, float]]:
        """Fill the trainer's buffer, then train `rounds` rounds with 64 new steps
        between them; the rounds' metrics."""
        self.feed(trainer, 128)
        metrics = []
        for _ in range(rounds):
            metrics.append(trainer.train_round())
            self.feed(trainer, 64)
        return metrics

    def feed(self, trainer: DynamicsTrainer, steps: int) -> None:
        for _ in range(steps):
            a = self.action()
            trainer.add(self.z, self.h[0], a)
            with torch.no_grad():
                _, self.h = self.agent.step(self.z[None], self.h, a[None])
            self.z = self.next_latent(self.z, a)


def _held_out_nll(dynamics: torch.nn.Module, world: _ToyWorld, steps: int = 64) -> float:
    """Mean prediction NLL along a fresh trajectory of the toy world, with the
    model run recurrently from a zero state as the agent runs it."""
    gen = torch.Generator().manual_seed(99)
    z = torch.randn(dynamics.latent, generator=gen)
    dynamics.eval()
    h = dynamics.initial_hidden(1)
    total = 0.0
    with torch.no_grad():
        for _ in range(steps):
            a = torch.randint(0, 2, (5,), generator=gen)
            a[0] = int(torch.randint(0, 3, (1,), generator=gen))
            pred, h = dynamics.step(z[None], h, a[None])
            z = world.next_latent(z, a)
            total += float(prediction_nll(pred[0], z))
    return total / steps


def _toy_dynamics_trainer(preset_name: str) -> tuple[DynamicsTrainer, _ToyWorld]:
    """A dynamics trainer with a small buffer, and a toy world run by a copy of its model."""
    preset = with_overrides(get_preset(preset_name), dynamics_training=dict(buffer_size=128, min_new=64))
    torch.manual_seed(0)
    dynamics = build_models(preset, seed=0)['dynamics']
    world = _ToyWorld(copy.deepcopy(dynamics), seed=1)
    return DynamicsTrainer(dynamics, preset.dynamics_training, seed=0), world


def test_dynamics_trainer_learns_a_deterministic_transition():
    trainer, world = _toy_dynamics_trainer('cpu')
    before = _held_out_nll(trainer.dynamics, world)
    world.feed(trainer, 63)
    assert not trainer.ready()
    world.feed(trainer, 65)
    assert trainer.ready()
    losses = []
    for _ in range(4):
        losses.append(trainer.train_round()['loss'])
        assert not trainer.ready()
        world.feed(trainer, 64)
    assert losses[-1] < 0.2 * losses[0], losses
    assert _held_out_nll(trainer.dynamics, world) < 0.2 * before
    assert set(trainer.weights()) == {'dynamics'}


def _act(dist: MultiCategorical, previous: torch.Tensor | None, persistence: float):
    """Like the agent: actions row after row, each head holding the one before
    with `persistence`; (actions, log_probs, [(previous action, persistence)])."""
    if not persistence:
        actions = dist.sample()
        return actions, dist.log_prob(actions), [(None, 0.0)] * len(actions)
    actions, log_probs, held = [], [], []
    for k in range(dist.logits[0].shape[0]):
        row = MultiCategorical([lg[k:k + 1] for lg in dist.logits])
        rho = 0.0 if previous is None else persistence
        before = torch.zeros(1, len(dist.logits), dtype=torch.int64) if previous is None else previous[None]
        mixed = with_persistence(row, before, rho)
        action = mixed.sample()
        actions.append(action[0])
        log_probs.append(mixed.log_prob(action)[0])
        held.append((before[0], rho))
        previous = action[0]
    return torch.stack(actions), torch.stack(log_probs), held


def _train_bandit(preset, rounds: int, persistence: float = 0.0):
    """PPO on a bandit: the reward for an action (fraction of heads on a
    target) arrives with the next entry, as the agent
    sends it; actions are held with `persistence` as the agent holds them.
    Returns the target's mean probability per head under the policy on fixed
    probe observations before and after, and the last round's metrics."""
    latent = preset.policy.input != 'image'
    torch.manual_seed(0)
    policy = build_models(preset, seed=0)['policy']
    trainer = PPOTrainer(policy, preset.ppo_training, seed=0)
    target = torch.tensor([2, 1, 0, 1, 1])
    gen = torch.Generator().manual_seed(3)
    shape = (preset.encoder.latent,) if latent else (3, 84, 84)
    probe = torch.randn(16, *shape, generator=gen) if latent else torch.rand(16, *shape, generator=gen)

    def target_probs() -> list[float]:
        trainer.policy.eval()
        with torch.no_grad():
            dist, _ = trainer.policy(probe)
        return [float(torch.softmax(lg, -1)[:, target[i]].mean()) for i, lg in enumerate(dist.logits)]

    start = target_probs()
    previous_action = None
    for _ in range(rounds):
        # Act like the agent: noise observations, sampled actions.
        n = 64 if previous_action is not None else 65
        if latent:
            obs = torch.randn(n, *shape, generator=gen)
        else:
            obs = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=gen)
        with torch.no_grad():
            dist, value = trainer.policy(obs if latent else obs.float() / 255)
            actions, log_prob, held = _act(dist, previous_action, persistence)
        for k in range(n):
            reward = 0.0 if previous_action is None else \
                float((previous_action == target).float().mean())
            assert not trainer.ready()
            trainer.add(obs[k], actions[k], log_prob[k], value[k], reward, trainer.version,
                        previous_action=held[k][0], persistence=held[k][1])
            previous_action = actions[k]
        assert trainer.ready()
        metrics = trainer.train_round()
        assert len(trainer.buffer) == 1  # the last entry starts the next trajectory
        for key in ('policy_loss', 'value_loss', 'entropy', 'approx_kl', 'clip_fraction', 'seconds'):
            assert key in metrics
    return start, target_probs(), metrics


def _learnt(probs: list[float]) -> bool:
    return all(p > 0.6 for p in probs[:3]) and all(p > 0.75 for p in probs[3:])


@pytest.mark.parametrize('preset, persistence', [(ON_FRAME, 0.0), (get_preset('cpu'), 0.0),
                                               (get_preset('cpu'), 0.8)], ids=['frame', 'latent', 'held'])
def test_ppo_trainer_learns_a_bandit_in_every_head(preset: Preset, persistence: float):
    # Short credit horizon for a bandit: the reward follows its action at once.
    # A policy on the latent learns from float32 latents as one on the frame
    # does from uint8 images.
    preset = with_overrides(preset, ppo_training=dict(lr=1e-3, gamma=0.5, gae_lambda=0.5))
    # The latent's smaller MLP takes more rounds.
    # Held actions (persistence) teach the policy through the mixture.
    start, end, _ = _train_bandit(preset, 20 if preset.policy.input != 'image' else 10,
                                  persistence=persistence)
    assert all(p < 0.55 for p in start), start
    assert _learnt(end), (start, end)


def test_ppos_ratio_starts_at_one_on_actions_held_with_persistence():
    # One epoch of one minibatch: its ratio compares the policy with the one
    # that acted, itself, so nothing is clipped and the KL estimate is 0, but
    # only if the trainer recomputes the mixture the agent drew from (with
    # the policy's own probabilities, 80 % of held choices would look new).
    preset = with_overrides(get_preset('cpu'), ppo_training=dict(epochs=1, batch_size=64, steps=64))
    _, _, held = _train_bandit(preset, 1, persistence=0.8)
    assert held['clip_fraction'] == 0.0 and abs(held['approx_kl']) < 1e-5, held


# ------------------------------------------------------- state round trips

def _make(kind: str, seed: int):
    preset = with_overrides(ON_FRAME, vae_training=dict(buffer_size=24),
                            dynamics_training=dict(buffer_size=40), ppo_training=dict(steps=16))
    models = build_models(preset, seed=seed)
    if kind == 'vae':
        return VAETrainer(models['encoder'], models['decoder'], preset.vae_training, seed=seed)
    if kind == 'dynamics':
        return DynamicsTrainer(models['dynamics'], preset.dynamics_training, seed=seed)
    return PPOTrainer(models['policy'], preset.ppo_training, seed=seed)


def _feed(trainer, kind: str, seed: int, n: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        if kind == 'vae':
            trainer.add(torch.randint(0, 256, (3, 84, 84), dtype=torch.uint8, generator=gen))
        elif kind == 'dynamics':
            h = torch.randn(2, 128, generator=gen).to(torch.complex64)
            trainer.add(torch.randn(64, generator=gen), h, torch.randint(0, 2, (5,), generator=gen))
        else:
            trainer.add(torch.randint(0, 256, (3, 84, 84), dtype=torch.uint8, generator=gen),
                        torch.randint(0, 2, (5,), generator=gen), -torch.rand(5, generator=gen),
                        float(torch.randn((), generator=gen)), float(torch.rand((), generator=gen)), 0)


@pytest.mark.parametrize('kind', ['vae', 'dynamics', 'ppo'])
def test_trainer_state_round_trip_continues_identically(kind):
    original = _make(kind, seed=0)
    _feed(original, kind, seed=1, n=17 if kind == 'ppo' else 24)
    torch.manual_seed(10)
    original.train_round()

    restored = _make(kind, seed=5)  # other initial weights and generator
    state = _through_disk(original.state_dict())
    buffer_state = _through_disk(original.buffer.state_dict())
    restored.load_state_dict(*state)
    restored.buffer.load_state_dict(*buffer_state)
    assert (restored.rounds, restored.version) == (1, 1)
    with pytest.raises(ValueError):
        other = 'ppo' if kind != 'ppo' else 'vae'
        _make(other, seed=0).load_state_dict(*state)

    for trainer in (original, restored):
        _feed(trainer, kind, seed=2, n=16)
        torch.manual_seed(11)  # dropout and reparameterisation noise
        trainer.train_round()
    for name, weights in original.weights().items():
        for key, value in weights.items():
            assert torch.equal(restored.weights()[name][key], value), (name, key)
    # The optimiser state matches as well, not only the weights it produced.
    a, b = original.state_dict()[0], restored.state_dict()[0]
    assert a.keys() == b.keys() and any(k.startswith('optimizer/') for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_restored_optimizer_keeps_its_fused_kernels_when_loading_older_state():
    """A checkpoint from before fused kernels must not turn them off."""
    saved = _make('dynamics', seed=0)
    _feed(saved, 'dynamics', seed=1, n=24)
    saved.train_round()
    tensors, info = _through_disk(saved.state_dict())
    info['optimizer']['param_groups'][0]['fused'] = None  # as such checkpoints hold it
    restored = _make('dynamics', seed=2)
    restored.load_state_dict(tensors, info)
    assert restored.optimizer.param_groups[0]['fused'] is True
    _feed(restored, 'dynamics', seed=3, n=16)
    restored.train_round()  # and it steps with the restored moments


def test_a_restored_optimizer_keeps_its_moments_and_takes_its_own_learning_rate():
    """A trainer restarted with another learning_rate parameter trains at that rate
    from the checkpoint's Adam moments (the checkpoint's rate is not state)."""
    saved = _make('vae', seed=0)
    _feed(saved, 'vae', seed=1, n=24)
    saved.train_round()
    tensors, info = _through_disk(saved.state_dict())
    restarted = _make('vae', seed=0)
    lr = saved.optimizer.param_groups[0]['lr'] * 5
    restarted.optimizer.param_groups[0]['lr'] = lr  # as built from learning_rate:=
    restarted.load_state_dict(tensors, info)
    assert restarted.optimizer.param_groups[0]['lr'] == lr
    ours = restarted.state_dict()[0]
    moments = [k for k in tensors if k.startswith('optimizer/') and k.endswith('/exp_avg')]
    assert moments and all(torch.equal(ours[k], tensors[k]) for k in moments)


# ------------------------------------------------- several sources (agents)

def test_dynamics_chunks_of_a_round_never_span_two_sources(monkeypatch):
    preset = with_overrides(get_preset('cpu'), dynamics_training=dict(buffer_size=64, min_new=1, epochs=1))
    cfg = preset.dynamics_training
    trainer = DynamicsTrainer(build_models(preset, seed=0)['dynamics'], cfg, max_batches=1000,
                              sources=('agent_0', 'agent_1'))
    latent, depth, dim = preset.encoder.latent, preset.dynamics.depth, preset.dynamics.dim
    # Interleaved one step each, as two agents' messages arrive: every latent
    # says which agent it is (sign) and its step, so a crossing chunk would show.
    for t in range(20):
        for sign, source in ((1.0, 'agent_0'), (-1.0, 'agent_1')):
            trainer.add(torch.full((latent,), sign * (t + 1)), torch.zeros(depth, dim, dtype=torch.complex64),
                        torch.zeros(5, dtype=torch.int64), source=source)
    with pytest.raises(ValueError, match='unknown source'):
        trainer.add(torch.zeros(latent), torch.zeros(depth, dim, dtype=torch.complex64),
                    torch.zeros(5, dtype=torch.int64))
    seen = []
    original = trainer.train_batch
    monkeypatch.setattr(trainer, 'train_batch', lambda z, h0, a, target: (
        seen.append(torch.cat([z[..., 0], target[..., -1:, 0]], dim=1)), original(z, h0, a, target))[1])
    metrics = trainer.train_round()
    windows = torch.cat(seen)  # [N, chunk]: the latents' first value along each chunk
    assert metrics['samples'] == len(windows) == 2 * (20 - cfg.chunk + 1)
    for row in windows:
        assert (row > 0).all() or (row < 0).all(), row  # one agent's steps ...
        assert torch.equal(row.abs().diff(), torch.ones(cfg.chunk - 1)), row  # ... in time order


def test_ppo_runs_gae_on_each_sources_trajectory_alone(monkeypatch):
    preset = with_overrides(get_preset('cpu'), ppo_training=dict(
        steps=6, epochs=1, batch_size=64, normalize_advantage=False, gamma=0.9, gae_lambda=0.8))
    cfg = preset.ppo_training
    trainer = PPOTrainer(build_models(preset, seed=0)['policy'], cfg, sources=('a', 'b', 'c'))
    gen = torch.Generator().manual_seed(4)
    values = {s: torch.randn(cfg.steps + 1, generator=gen) for s in 'abc'}
    rewards = {s: torch.rand(cfg.steps + 1, generator=gen) for s in 'abc'}
    for t in range(cfg.steps + 1):
        for s in ('a', 'b', 'c') if t < cfg.steps else ('a', 'b'):  # c stays one short
            trainer.add(torch.randn(preset.encoder.latent, generator=gen), torch.zeros(5, dtype=torch.int64),
                        torch.full((5,), -1.0), values[s][t], rewards[s][t], 0, source=s)
        assert trainer.ready() == (t == cfg.steps)
    seen = []
    original = trainer_module.ppo_loss
    monkeypatch.setattr(trainer_module, 'ppo_loss', lambda *args, **kw: (seen.append(args[2]), original(
        *args, **kw))[1])
    metrics = trainer.train_round()
    # Each source's GAE bootstraps from its own last value.
    alone = torch.cat([gae(rewards[s][1:], values[s][:-1], values[s][-1], cfg.gamma, cfg.gae_lambda)[0]
                       for s in 'ab'])
    crossing = gae(torch.cat([rewards[s][1:] for s in 'ab']), torch.cat([values[s][:-1] for s in 'ab']),
                   values['b'][-1], cfg.gamma, cfg.gae_lambda)[0]
    got = torch.cat(seen).sort().values
    assert torch.allclose(got, alone.sort().values)
    assert not torch.allclose(got, crossing.sort().values)  # the test tells them apart
    assert metrics['trajectories'] == 2 and metrics['samples'] == 2 * cfg.steps
    # The full ones were taken (each keeps its last entry); c waits for its next step.
    assert [len(trainer.buffer[s]) for s in 'abc'] == [1, 1, cfg.steps]
