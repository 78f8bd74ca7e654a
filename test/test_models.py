"""Models of the learning core: shapes, sizes, the SConv recurrence, the policy distribution."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from frame_policy_preset import ON_FRAME
from torch.distributions import Normal

from ami_ros.core.dynamics import PREDICTION_STD, ForwardDynamics
from ami_ros.core.models import (
    MODEL_NAMES,
    build_model,
    build_models,
    count_parameters,
    parameter_counts,
)
from ami_ros.core.policy import MultiCategorical, policy_observation, with_persistence
from ami_ros.core.presets import ACTION_CHOICES, IMAGE_SHAPE, PolicyConfig, Preset, get_preset


def random_actions(*shape: int, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.stack(
        [torch.randint(0, n, shape, generator=generator) for n in ACTION_CHOICES], dim=-1)


@pytest.fixture(scope='module')
def small_models():
    return build_models('cpu', seed=0)


@pytest.mark.parametrize('preset, batch', [(get_preset('cpu'), 4), (ON_FRAME, 3), (get_preset('ami'), 2),
                                           (get_preset('large'), 1)], ids=lambda p: getattr(p, 'name', p))
def test_shapes(preset: Preset, batch: int):
    latent = preset.encoder.latent
    models = build_models(preset, seed=0)
    assert set(models) == set(MODEL_NAMES)
    for m in models.values():
        m.eval()
    obs = torch.rand(batch, *IMAGE_SHAPE)
    with torch.no_grad():
        enc = models['encoder']
        assert enc.latent == latent
        post = enc(obs)
        assert isinstance(post, Normal)
        assert post.loc.shape == post.scale.shape == (batch, latent)
        assert (post.scale > 0).all()
        z = enc.encode_mean(obs)
        assert torch.allclose(z, post.loc)

        img = models['decoder'](z)
        assert img.shape == (batch, *IMAGE_SHAPE)
        assert img.min() >= 0 and img.max() <= 1

        dyn = models['dynamics']
        assert (dyn.latent, dyn.depth, dyn.dim) == (latent, preset.dynamics.depth, preset.dynamics.dim)
        h0 = dyn.initial_hidden(batch)
        assert h0.shape == (batch, dyn.depth, dyn.dim) and h0.dtype == torch.complex64
        pred, h1 = dyn.step(z, h0, random_actions(batch))
        assert pred.shape == (batch, latent) and h1.shape == h0.shape and h1.dtype == torch.complex64
        preds, hs = dyn(z[:, None].expand(batch, 3, latent), h0, random_actions(batch, 3))
        assert preds.shape == (batch, 3, latent)
        assert hs.shape == (batch, 3, dyn.depth, dyn.dim) and hs.dtype == torch.complex64

        # The policy sees what its preset says: the frame or the encoder's z.
        dist, value = models['policy'](policy_observation(preset.policy.input, obs, z))
        assert value.shape == (batch,)
        action = dist.sample()
        assert action.shape == (batch, len(ACTION_CHOICES)) and action.dtype == torch.int64
        for i, n in enumerate(ACTION_CHOICES):
            assert dist.logits[i].shape == (batch, n)
            assert ((action[:, i] >= 0) & (action[:, i] < n)).all()
        assert dist.log_prob(action).shape == (batch, len(ACTION_CHOICES))
        assert dist.entropy().shape == (batch, len(ACTION_CHOICES))
        assert dist.mode().shape == (batch, len(ACTION_CHOICES))


def test_parameter_counts():
    ami = parameter_counts('ami')
    assert abs(ami['total'] - 8.7e6) / 8.7e6 < 0.10, ami
    # Each model near its reference size.
    for name, ref in (('encoder', 2.2e6), ('decoder', 0.6e6), ('dynamics', 3.7e6), ('policy', 2.2e6)):
        assert abs(ami[name] - ref) / ref < 0.25, (name, ami[name])
    assert ami['total'] == sum(ami[n] for n in MODEL_NAMES)
    cpu = parameter_counts('cpu')
    assert cpu['total'] < ami['total'] / 5, cpu
    assert count_parameters(torch.nn.Linear(3, 2)) == 8


def test_a_policy_on_the_latent_is_an_mlp_that_takes_no_image():
    policy = build_model('policy', 'cpu')
    assert not any(isinstance(m, torch.nn.Conv2d) for m in policy.modules())
    # Far fewer parameters than the conv policy of the same sizes.
    assert count_parameters(policy) < count_parameters(build_model('policy', ON_FRAME)) / 4
    with pytest.raises(RuntimeError):
        policy(torch.rand(1, *IMAGE_SHAPE))
    with pytest.raises(ValueError, match="policy input 'pixels' is not one of image, latent"):
        PolicyConfig(input='pixels')


def test_build_model_names_and_seed():
    with pytest.raises(ValueError, match='encoder, decoder, dynamics, policy'):
        build_model('critic', 'cpu')
    with pytest.raises(ValueError, match='unknown preset'):
        build_models('huge')
    state = torch.random.get_rng_state()
    a = build_models('cpu', seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # caller's RNG untouched
    b = build_models('cpu', seed=3)
    c = build_models('cpu', seed=4)
    for name in MODEL_NAMES:
        sa, sb = a[name].state_dict(), b[name].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(a['encoder'].mean_head.weight, c['encoder'].mean_head.weight)


@pytest.mark.parametrize('steps', [9, 1])
def test_dynamics_recurrent_equals_parallel(small_models, steps):
    dyn: ForwardDynamics = small_models['dynamics'].eval()
    g = torch.Generator().manual_seed(1)
    batch = 3
    z = torch.randn(batch, steps, dyn.latent, generator=g)
    action = random_actions(batch, steps, generator=g)
    h0 = torch.complex(torch.randn(batch, dyn.depth, dyn.dim, generator=g),
                       torch.randn(batch, dyn.depth, dyn.dim, generator=g))
    with torch.no_grad():
        preds, hiddens = dyn(z, h0, action)
        h = h0
        for t in range(steps):
            pred, h = dyn.step(z[:, t], h, action[:, t])
            torch.testing.assert_close(pred, preds[:, t], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(h, hiddens[:, t], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, hiddens[:, -1], atol=1e-5, rtol=1e-5)
    # The initial state matters (it is really carried, not ignored).
    with torch.no_grad():
        preds_zero, _ = dyn(z, dyn.initial_hidden(batch), action)
    assert (preds_zero - preds).abs().max() > 1e-3


def test_dynamics_keeps_no_state(small_models):
    dyn: ForwardDynamics = small_models['dynamics'].eval()
    assert list(dyn.buffers()) == []
    z = torch.randn(2, dyn.latent)
    action = random_actions(2)
    h = dyn.initial_hidden(2)
    with torch.no_grad():
        first = dyn.step(z, h, action)
        dyn.step(torch.randn(2, dyn.latent), first[1], action)  # an unrelated call in between
        second = dyn.step(z, h, action)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_dynamics_hidden_state_stable():
    dyn = build_model('dynamics', 'cpu').eval()
    g = torch.Generator().manual_seed(2)
    h = dyn.initial_hidden(2)
    with torch.no_grad():
        for _ in range(200):
            z = 3.0 * torch.randn(2, dyn.latent, generator=g)
            pred, h = dyn.step(z, h, random_actions(2, generator=g))
    assert h.dtype == torch.complex64
    assert torch.isfinite(torch.view_as_real(h)).all() and torch.isfinite(pred).all()
    assert h.abs().max() < 1e3


def test_dynamics_distribution_fixed_std():
    mean = torch.randn(4, 8)
    x = torch.randn(4, 8)
    dist = ForwardDynamics.distribution(mean)
    assert torch.allclose(dist.scale, torch.full_like(mean, PREDICTION_STD))
    torch.testing.assert_close(-dist.log_prob(x), math.pi * (x - mean) ** 2)


def test_dynamics_learns_toy_transition():
    """z_{t+1} = roll(z_t) + offset(action): the parallel form must learn it."""
    torch.manual_seed(0)
    preset = get_preset('cpu')
    dyn = ForwardDynamics(preset.encoder.latent, preset.dynamics).train()
    latent = dyn.latent
    offsets = [torch.randn(n, latent) for n in ACTION_CHOICES]

    def batch(size: int = 16, steps: int = 9):
        z = [torch.randn(size, latent)]
        action = random_actions(size, steps)
        for t in range(steps):
            shift = sum(offsets[i][action[:, t, i]] for i in range(len(ACTION_CHOICES)))
            z.append(torch.roll(z[-1], 1, dims=-1) + 0.5 * shift)
        z = torch.stack(z, dim=1)
        return z[:, :-1], action, z[:, 1:]

    def eval_mse() -> float:
        dyn.eval()
        with torch.no_grad():
            z, action, target = batch(64)
            pred, _ = dyn(z, dyn.initial_hidden(64), action)
        dyn.train()
        return F.mse_loss(pred, target).item()

    start = eval_mse()
    opt = torch.optim.Adam(dyn.parameters(), lr=1e-3)
    for _ in range(300):
        z, action, target = batch()
        pred, _ = dyn(z, dyn.initial_hidden(z.shape[0]), action)
        loss = -ForwardDynamics.distribution(pred).log_prob(target).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = eval_mse()
    assert end < 0.3 * start, (start, end)


def test_multicategorical_log_prob_and_entropy():
    g = torch.Generator().manual_seed(5)
    logits = [torch.randn(6, n, generator=g) for n in ACTION_CHOICES]
    dist = MultiCategorical(logits)
    torch.manual_seed(5)
    action = dist.sample()
    manual = torch.stack(
        [F.log_softmax(lg, -1).gather(-1, action[:, i : i + 1]).squeeze(-1) for i, lg in enumerate(logits)],
        dim=-1)
    torch.testing.assert_close(dist.log_prob(action), manual)
    assert torch.equal(dist.mode(), torch.stack([lg.argmax(-1) for lg in logits], -1))

    uniform = MultiCategorical([torch.zeros(2, n) for n in ACTION_CHOICES])
    expected = torch.tensor([math.log(n) for n in ACTION_CHOICES]).expand(2, -1)
    torch.testing.assert_close(uniform.entropy(), expected)


def test_multicategorical_sample_follows_each_heads_probabilities():
    # Heads of different widths are drawn together, padded: each head's
    # frequencies must match its own softmax and never land on padding.
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(1, n, generator=g) * 2 for n in ACTION_CHOICES]
    draws = 20000
    dist = MultiCategorical([lg.expand(draws, -1) for lg in logits])
    actions = dist.sample(torch.Generator().manual_seed(2))
    assert actions.shape == (draws, len(ACTION_CHOICES)) and actions.dtype == torch.int64
    for i, (lg, n) in enumerate(zip(logits, ACTION_CHOICES, strict=True)):
        assert int(actions[:, i].max()) < n
        freq = torch.bincount(actions[:, i], minlength=n).float() / draws
        torch.testing.assert_close(freq, torch.softmax(lg[0], -1), atol=0.015, rtol=0)
    again = dist.sample(torch.Generator().manual_seed(2))
    assert torch.equal(actions, again)


def test_persistence_mixes_the_held_action_into_each_head():
    g = torch.Generator().manual_seed(3)
    logits = [torch.randn(4, n, generator=g, requires_grad=True) for n in ACTION_CHOICES]
    dist = MultiCategorical(logits)
    previous = torch.tensor([[0, 1, 2, 0, 1]] * 4)
    rho = torch.tensor([0.0, 0.5, 0.9, 0.3])
    held = with_persistence(dist, previous, rho)
    for i, (lg, n) in enumerate(zip(logits, ACTION_CHOICES, strict=True)):
        expected = (1 - rho[:, None]) * torch.softmax(lg, -1) + rho[:, None] * F.one_hot(previous[:, i], n)
        torch.testing.assert_close(torch.softmax(held.logits[i], -1), expected)
    # A row with 0 is the policy itself; one number applies to every row.
    torch.testing.assert_close(held.log_prob(previous)[0], dist.log_prob(previous)[0])
    torch.testing.assert_close(with_persistence(dist, previous, 0.5).log_prob(previous)[1],
                               held.log_prob(previous)[1])
    # PPO's gradient reaches every head through the mixture, finite where rho is 0.
    held.log_prob(previous).sum().backward()
    assert all(torch.isfinite(lg.grad).all() and lg.grad.abs().sum() > 0 for lg in logits)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match='persistence must lie in'):
            with_persistence(dist, previous, bad)


@pytest.mark.parametrize('preset', [get_preset('cpu'), ON_FRAME], ids=lambda p: p.name)
def test_policy_starts_near_uniform(preset: Preset):
    policy = build_model('policy', preset).eval()
    obs = policy_observation(preset.policy.input, torch.rand(3, *IMAGE_SHAPE),
                             torch.randn(3, preset.encoder.latent))
    with torch.no_grad():
        dist, _ = policy(obs)
    expected = torch.tensor([math.log(n) for n in ACTION_CHOICES]).expand(3, -1)
    torch.testing.assert_close(dist.entropy(), expected, atol=1e-2, rtol=0)


def test_policy_has_no_batchnorm():
    for preset in (get_preset('cpu'), ON_FRAME):
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                       for m in build_model('policy', preset).modules())
