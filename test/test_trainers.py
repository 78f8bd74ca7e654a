"""Trainers of the learning core: PPO loss clipping, learning on toy data,
and exact state round trips (small preset, fixed seeds, a few seconds each)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ami_ros.core.models import build_models
from ami_ros.core.policy import MultiCategorical, with_persistence
from ami_ros.core.presets import get_preset, with_overrides
from ami_ros.core.reward import prediction_nll
from ami_ros.core.trainers import DynamicsTrainer, PPOTrainer, SlicedOptimizer, VAETrainer, ppo_loss


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
    preset = with_overrides(get_preset('small'), vae_training=dict(buffer_size=128, min_new=32))
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
    trainer, world = _toy_dynamics_trainer('small')
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


def test_dynamics_trainer_learns_features_that_tell_the_action_apart():
    # In the toy world the first action head moves the latent; the inverse
    # head must learn to read it from two consecutive latents' features
    # (chance: 1/3), while the latent prediction is learnt as before.
    trainer, world = _toy_dynamics_trainer('small-icm')
    dynamics = trainer.dynamics

    def held_out_accuracy() -> float:
        gen = torch.Generator().manual_seed(7)
        z = torch.randn(256, dynamics.latent, generator=gen)
        a0 = torch.randint(0, 3, (256,), generator=gen)
        a = torch.zeros(256, 5, dtype=torch.int64)
        a[:, 0] = a0
        with torch.no_grad():
            logits = trainer.dynamics.inverse_logits(trainer.dynamics.features(z),
                                                     trainer.dynamics.features(world.next_latent(z, a)))
        return float((logits[0].argmax(-1) == a0).float().mean())

    before = held_out_accuracy()
    rounds = world.train(trainer, 6)
    assert {'latent_loss', 'feature_loss', 'inverse_loss', 'inverse_turn_accuracy'} <= set(rounds[0])
    # The other heads are chance in this world, so the inverse loss falls only
    # so far; what counts is reading the moving head on steps never trained on.
    assert rounds[-1]['inverse_loss'] < rounds[0]['inverse_loss'], [r['inverse_loss'] for r in rounds]
    assert rounds[-1]['latent_loss'] < 0.5 * rounds[0]['latent_loss']
    after = held_out_accuracy()
    assert before < 0.5 and after > 0.9, (before, after)


def test_the_ensembles_disagreement_falls_where_it_has_learnt_and_stays_elsewhere():
    # small-ensemble: the reward is how much the dynamics' predictors disagree.
    # Trained on the toy world it must fall on that world's transitions and
    # stay high on latents unlike any it was trained on (here 4x as large),
    # the two things that make it a reward for going where the model is new.
    trainer, world = _toy_dynamics_trainer('small-ensemble')
    dynamics = trainer.dynamics

    def held_out_disagreement(scale: float) -> float:
        gen = torch.Generator().manual_seed(5)
        z = scale * torch.randn(dynamics.latent, generator=gen)
        dynamics.eval()
        h, total = dynamics.initial_hidden(1), 0.0
        with torch.no_grad():
            for _ in range(32):
                a = world.action()
                _, _, disagreement, _, h = dynamics.step_with_extras(z[None], h, a[None])
                total += float(disagreement[0])
                z = world.next_latent(z, a)
        return total / 32

    before = held_out_disagreement(1.0)
    rounds = world.train(trainer, 6)
    assert {'latent_loss', 'ensemble_loss', 'disagreement'} <= set(rounds[0])
    assert rounds[-1]['ensemble_loss'] < 0.3 * rounds[0]['ensemble_loss'], rounds
    after, unseen = held_out_disagreement(1.0), held_out_disagreement(4.0)
    assert after < 0.5 * before, (before, after)
    assert unseen > 3 * after, (after, unseen)


class _NoisyToyWorld(_ToyWorld):
    """The toy world, where the first action head's third choice also adds
    fresh noise to the next latent: a step that stays hard to predict however
    much the model learns, like a turn that brings unseen walls into view."""

    def next_latent(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(z.shape, generator=self.gen) if int(a[..., 0]) == 2 else 0.0
        return super().next_latent(z, a) + noise


def test_the_expected_error_takes_out_the_noise_and_leaves_the_new():
    # small-aleatoric: the reward is the prediction's error less the error the
    # head expects. After training, noisy steps must be expected to miss (so
    # they pay little although their error stays large), and latents unlike
    # any trained on must pay more than the noise.
    trainer, _ = _toy_dynamics_trainer('small-aleatoric')
    dynamics = trainer.dynamics
    world = _NoisyToyWorld(copy.deepcopy(dynamics), seed=1)

    def held_out(scale: float) -> dict[str, list[tuple[float, float]]]:
        """(error, reward) of quiet and noisy steps along a fresh trajectory."""
        world_gen, world.gen = world.gen, torch.Generator().manual_seed(11)
        z = scale * torch.randn(dynamics.latent, generator=world.gen)
        dynamics.eval()
        h, out = dynamics.initial_hidden(1), {'quiet': [], 'noisy': []}
        with torch.no_grad():
            for _ in range(96):
                a = world.action()
                pred, _, _, guess, h = dynamics.step_with_extras(z[None], h, a[None])
                guess = float(guess[0])
                z = world.next_latent(z, a)
                error = float(prediction_nll(pred[0], z))
                out['noisy' if int(a[0]) == 2 else 'quiet'].append((error, error - guess))
        world.gen = world_gen
        return out

    def mean(pairs, i):
        return sum(p[i] for p in pairs) / len(pairs)

    rounds = world.train(trainer, 10)
    assert {'latent_loss', 'expected_error_loss', 'expected_error', 'unexpected_error'} <= set(rounds[0])
    assert rounds[-1]['expected_error_loss'] < 0.5 * rounds[0]['expected_error_loss'], rounds
    seen, unseen = held_out(1.0), held_out(8.0)
    noisy_error, noisy_reward = mean(seen['noisy'], 0), mean(seen['noisy'], 1)
    quiet_error, quiet_reward = mean(seen['quiet'], 0), mean(seen['quiet'], 1)
    # The noise keeps the noisy steps' error high; the head takes most of it out.
    assert noisy_error > 3 * quiet_error, (noisy_error, quiet_error)
    assert abs(noisy_reward) < 0.25 * noisy_error, (noisy_reward, noisy_error)
    assert abs(quiet_reward) < noisy_error - abs(noisy_reward)
    # A quiet step from latents unlike any trained on (8x as large) is less
    # surprising than a noisy one, so raw curiosity would pay for the noise;
    # beyond the expected, the new place pays more than the noise.
    new_error, new_reward = mean(unseen['quiet'], 0), mean(unseen['quiet'], 1)
    assert new_error < noisy_error, (new_error, noisy_error)
    assert new_reward > noisy_reward, (new_reward, noisy_reward)
    assert new_reward > 3 * quiet_reward, (new_reward, quiet_reward)


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


def _train_bandit(preset, rounds: int, reward_offset: float = 0.0, persistence: float = 0.0):
    """PPO on a bandit: the reward for an action (fraction of heads on a
    target, plus `reward_offset`) arrives with the next entry, as the agent
    sends it; actions are held with `persistence` as the agent holds them.
    Returns the target's mean probability per head under the policy on fixed
    probe observations before and after, and the last round's metrics."""
    latent = preset.policy.input != 'image'
    torch.manual_seed(0)
    policy = build_models(preset, seed=0)['policy']
    trainer = PPOTrainer(policy, preset.ppo_training, seed=0)
    target = torch.tensor([2, 1, 0, 1, 1])
    gen = torch.Generator().manual_seed(3)
    # A latent policy's input: z, and for small-memory the hidden state's features after it.
    memory = 2 * preset.dynamics.depth * preset.dynamics.dim if preset.policy.input == 'latent-hidden' else 0
    shape = (preset.encoder.latent + memory,) if latent else (3, 84, 84)
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
                reward_offset + float((previous_action == target).float().mean())
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


@pytest.mark.parametrize('preset_name, action_baseline, persistence', [
    ('small', False, 0.0), ('small', True, 0.0), ('small-latent', False, 0.0),
    ('small-memory', False, 0.0), ('small-latent', False, 0.8)])
def test_ppo_trainer_learns_a_bandit_in_every_head(preset_name, action_baseline, persistence):
    # Short credit horizon for a bandit: the reward follows its action at once.
    # A reward that depends on the action alone is exactly what the action
    # baseline takes out: with it, nothing is learned. A policy on the latent
    # learns from float32 latents as one on the frame does from uint8 images.
    # (Not normalised with the baseline: the little of the action's effect its
    # ridge-regularised fit leaves would be scaled back up to unit size.)
    preset = with_overrides(get_preset(preset_name), ppo_training=dict(
        lr=1e-3, gamma=0.5, gae_lambda=0.5, action_baseline=action_baseline,
        normalize_reward=not action_baseline))
    # The latent's smaller MLP takes more rounds.
    # Held actions (persistence) teach the policy through the mixture.
    start, end, metrics = _train_bandit(preset, 20 if preset.policy.input != 'image' else 10,
                                        persistence=persistence)
    assert all(p < 0.55 for p in start), start
    if action_baseline:
        assert metrics['reward_action_effect'] > 0.1, metrics
        assert all(p < 0.5 for p in end[:3]) and all(p < 0.7 for p in end[3:]), (start, end)
    else:
        assert metrics['reward_action_effect'] == 0.0
        assert _learnt(end), (start, end)


def test_ppos_ratio_starts_at_one_on_actions_held_with_persistence():
    # One epoch of one minibatch: its ratio compares the policy with the one
    # that acted, itself, so nothing is clipped and the KL estimate is 0, but
    # only if the trainer recomputes the mixture the agent drew from (with
    # the policy's own probabilities, 80 % of held choices would look new).
    preset = with_overrides(get_preset('small-latent'), ppo_training=dict(epochs=1, batch_size=64, steps=64))
    _, _, held = _train_bandit(preset, 1, persistence=0.8)
    assert held['clip_fraction'] == 0.0 and abs(held['approx_kl']) < 1e-5, held


def test_ppo_trainer_learns_whatever_the_rewards_offset_only_when_it_normalises():
    # Curiosity rewards sit on an offset that drifts as the models learn; the
    # agent never ends an episode, so the offset says nothing about the
    # actions. Normalised, the same bandit is learnt the same with or without
    # it, on returns of unit scale; unnormalised, returns of ~60 are beyond
    # what the clipped value loss lets the critic follow, and it is not learnt.
    def bandit(offset: float, normalize: bool):
        preset = with_overrides(get_preset('small-latent'), ppo_training=dict(
            lr=1e-3, gamma=0.5, gae_lambda=0.5, normalize_reward=normalize))
        return _train_bandit(preset, 20, reward_offset=offset)

    _, plain, plain_metrics = bandit(0.0, True)
    _, offset, offset_metrics = bandit(30.0, True)
    assert _learnt(plain) and _learnt(offset), (plain, offset)
    torch.testing.assert_close(torch.tensor(offset), torch.tensor(plain), atol=0.02, rtol=0)
    assert abs(offset_metrics['return_mean']) < 3.0, offset_metrics
    assert offset_metrics['reward_offset'] == pytest.approx(30.5, abs=0.5)
    assert offset_metrics['reward_mean'] == pytest.approx(plain_metrics['reward_mean'] + 30.0, abs=0.5)
    _, unnormalised, raw_metrics = bandit(30.0, False)
    assert not _learnt(unnormalised), unnormalised
    assert raw_metrics['return_mean'] > 30.0 and 'reward_scale' not in raw_metrics


# ------------------------------------------------------- state round trips

def _make(kind: str, seed: int):
    preset = with_overrides(get_preset('small'), vae_training=dict(buffer_size=24),
                            dynamics_training=dict(buffer_size=40),
                            # the reward's baseline and normaliser: their state round-trips too
                            ppo_training=dict(steps=16, action_baseline=True, normalize_reward=True))
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
    # The action baseline and the reward normaliser are trainer state.
    assert kind != 'ppo' or {'reward_baseline/gram', 'reward_normalizer/stats'} <= a.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize('kind', ['vae', 'dynamics', 'ppo'])
def test_training_pauses_before_every_minibatch_layer_and_gradient(kind):
    """A node keeps training out of the agent's steps through `pause_with`: the
    pause must come often, before each minibatch and inside its forward and
    backward passes, not only between rounds."""
    trainer = _make(kind, seed=0)
    _feed(trainer, kind, seed=1, n=17 if kind == 'ppo' else 24)
    events = []
    real_step = trainer._step

    def step(loss, max_grad_norm):
        events.append('backward')
        result = real_step(loss, max_grad_norm)
        events.append('optimiser step done')
        return result

    trainer._step = step
    trainer.pause_with(lambda site: events.append('pause'))
    metrics = trainer.train_round()
    batches = int(metrics['batches'])
    assert batches >= 2
    per_batch = ' '.join(events).split('optimiser step done')[:-1]
    assert len(per_batch) == batches
    for work in per_batch:
        forward, backward = work.split('backward')
        assert forward.count('pause') >= 5  # the batch's start and the layers' forwards
        assert backward.count('pause') >= 5  # gradients of the layers' parameters


@pytest.mark.parametrize('make', [lambda p: torch.optim.Adam(p, lr=1e-2),
                                  lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)],
                         ids=['adam', 'adamw'])
@pytest.mark.parametrize('max_norm', [None, 0.5])
def test_sliced_optimizer_is_the_single_optimizer_stepped_in_pieces(make, max_norm):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                              torch.nn.ReLU(), torch.nn.Linear(64, 4))
    twin = copy.deepcopy(net)
    single = make(list(twin.parameters()))
    pauses = []
    sliced = SlicedOptimizer(list(net.parameters()), make, slice_elements=1000)
    assert len(sliced.slices) >= 3  # the test means something only with several slices
    for step in range(5):
        x = torch.randn(32, 16, generator=torch.Generator().manual_seed(step))
        for model in (net, twin):
            model(x).pow(2).mean().backward()
        norm = sliced.clip_grad_norm(max_norm, lambda site: pauses.append(site.split()[0]))
        expected = torch.nn.utils.clip_grad_norm_(
            list(twin.parameters()), max_norm if max_norm is not None else float('inf'))
        assert norm == pytest.approx(float(expected), rel=1e-5)
        sliced.step(lambda site: pauses.append(site.split()[0]))
        single.step()
        sliced.zero_grad()
        single.zero_grad()
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert pauses.count('step') == 5 * len(sliced.slices)
    assert pauses.count('norm') == 5 * len(sliced.slices)
    assert pauses.count('clip') == (5 * len(sliced.slices) if max_norm else 0)

    # Its state is the single optimiser's, both ways (checkpoints do not change).
    state, reference = sliced.state_dict(), single.state_dict()
    assert state['param_groups'] == reference['param_groups']
    assert state['state'].keys() == reference['state'].keys()
    for pid, entry in reference['state'].items():
        for key, value in entry.items():
            torch.testing.assert_close(state['state'][pid][key], value, rtol=1e-6, atol=1e-7)
    restored = SlicedOptimizer(list(copy.deepcopy(net).parameters()), make, slice_elements=1000)
    restored.load_state_dict(reference)
    assert restored.state_dict()['state'].keys() == reference['state'].keys()
    with pytest.raises(ValueError, match='other parameters'):
        SlicedOptimizer(list(net[0].parameters()), make).load_state_dict(reference)


def test_sliced_optimizer_keeps_its_fused_kernels_when_loading_older_state():
    net = torch.nn.Linear(8, 8)
    old = torch.optim.Adam(net.parameters(), lr=1e-3)  # as checkpoints before fused kernels
    net(torch.randn(2, 8)).sum().backward()
    old.step()
    sliced = SlicedOptimizer(list(net.parameters()), lambda p: torch.optim.Adam(p, lr=1e-3, fused=True))
    sliced.load_state_dict(old.state_dict())
    assert all(o.param_groups[0]['fused'] for o in sliced.optimizers)
    sliced.step()  # and it steps with the restored moments


def test_a_restored_optimizer_keeps_its_moments_and_takes_its_own_learning_rate():
    """A trainer restarted with another learning_rate parameter trains at that rate
    from the checkpoint's Adam moments (the checkpoint's rate is not state)."""
    net = torch.nn.Linear(8, 8)
    saved = SlicedOptimizer(list(net.parameters()), lambda p: torch.optim.Adam(p, lr=1e-3))
    net(torch.randn(2, 8)).sum().backward()
    saved.step()
    restarted = SlicedOptimizer(list(net.parameters()), lambda p: torch.optim.Adam(p, lr=5e-3),
                                slice_elements=40)
    restarted.load_state_dict(saved.state_dict())
    assert [o.param_groups[0]['lr'] for o in restarted.optimizers] == [5e-3] * len(restarted.optimizers)
    assert len(restarted.optimizers) > 1  # the rate holds in every slice
    ours, theirs = restarted.state_dict(), saved.state_dict()
    assert ours['state'].keys() == theirs['state'].keys()
    for pid, entry in theirs['state'].items():
        for key, value in entry.items():
            assert torch.equal(ours['state'][pid][key], value), (pid, key)
