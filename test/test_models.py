"""Models of the learning core: shapes, sizes, the SConv recurrence, the policy distribution."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal

from ami_ros.core.dynamics import PREDICTION_STD, ForwardDynamics
from ami_ros.core.models import (
    MODEL_NAMES,
    build_model,
    build_models,
    count_parameters,
    parameter_counts,
)
from ami_ros.core.policy import MultiCategorical, PolicyValue, policy_observation, with_persistence
from ami_ros.core.presets import ACTION_CHOICES, IMAGE_SHAPE, DynamicsConfig, PolicyConfig, get_preset


def random_actions(*shape: int, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.stack(
        [torch.randint(0, n, shape, generator=generator) for n in ACTION_CHOICES], dim=-1)


@pytest.fixture(scope='module')
def small_models():
    return build_models('small', seed=0)


@pytest.mark.parametrize('preset_name, batch', [('small', 4), ('small-latent', 3), ('small-icm', 2),
                                                ('small-memory', 2), ('small-ensemble', 2),
                                                ('small-aleatoric', 2), ('ami', 2),
                                                ('large', 1)])
def test_shapes(preset_name, batch):
    preset = get_preset(preset_name)
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

        # The policy sees what its preset says: the frame, the encoder's z, or
        # z and the dynamics' hidden state.
        dist, value = models['policy'](policy_observation(preset.policy.input, obs, z, h1))
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
    small = parameter_counts('small')
    assert small['total'] < ami['total'] / 5, small
    assert count_parameters(torch.nn.Linear(3, 2)) == 8


def test_a_policy_on_the_latent_is_an_mlp_that_takes_no_image():
    policy = build_model('policy', 'small-latent')
    assert not any(isinstance(m, torch.nn.Conv2d) for m in policy.modules())
    # Far fewer parameters than the conv policy of the same sizes.
    assert count_parameters(policy) < count_parameters(build_model('policy', 'small')) / 4
    with pytest.raises(RuntimeError):
        policy(torch.rand(1, *IMAGE_SHAPE))
    with pytest.raises(ValueError, match="policy input 'pixels' is not one of image, latent"):
        PolicyConfig(input='pixels')


def test_a_policy_on_the_hidden_state_tells_two_histories_apart():
    # The same frame's z after two different pasts: a policy on the latent
    # alone cannot tell them apart, one that also reads the dynamics' hidden
    # state can. Its hidden part is layer-normalised, so it does not care how
    # large the state is, only what it holds.
    torch.manual_seed(0)
    models = build_models('small-memory', seed=0)
    dyn, policy = models['dynamics'].eval(), models['policy'].eval()
    z = torch.randn(1, get_preset('small-memory').encoder.latent)
    pasts = []
    with torch.no_grad():
        for seed in (1, 2):
            g = torch.Generator().manual_seed(seed)
            h = dyn.initial_hidden(1)
            for _ in range(5):
                _, h = dyn.step(torch.randn(z.shape, generator=g), h, random_actions(1))
            pasts.append(h)
        first, second = (policy(policy_observation('latent-hidden', None, z, h))[0].logits
                         for h in pasts)
        assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(first, second, strict=True))
        scaled = policy(policy_observation('latent-hidden', None, z, 10 * pasts[0]))[0].logits
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(first, scaled, strict=True))
        on_latent = build_model('policy', 'small-latent').eval()
        assert torch.equal(on_latent(policy_observation('latent', None, z, pasts[0]))[0].logits[0],
                           on_latent(policy_observation('latent', None, z, pasts[1]))[0].logits[0])
    with pytest.raises(ValueError, match='needs the hidden size'):
        PolicyValue(get_preset('small-memory').policy, latent_size=64)


def test_an_ensembles_disagreement_in_both_forms_and_only_where_the_preset_has_one():
    plain = build_model('dynamics', 'small-latent').eval()
    assert not plain.rewards_disagreement and len(plain.ensemble_heads) == 0
    dyn = build_model('dynamics', 'small-ensemble').eval()
    members = get_preset('small-ensemble').dynamics.ensemble
    assert dyn.rewards_disagreement and len(dyn.ensemble_heads) == members - 1
    g = torch.Generator().manual_seed(3)
    batch, steps = 2, 4
    z = torch.randn(batch, steps, dyn.latent, generator=g)
    action = random_actions(batch, steps, generator=g)
    with torch.no_grad():
        assert plain.step_with_extras(z[:, 0], plain.initial_hidden(batch), action[:, 0]).disagreement is None
        preds, _, ensemble, _, _ = dyn.forward_with_extras(z, dyn.initial_hidden(batch), action)
        assert ensemble.shape == (batch, steps, members - 1, dyn.latent)
        h = dyn.initial_hidden(batch)
        for t in range(steps):
            pred, _, disagreement, _, h = dyn.step_with_extras(z[:, t], h, action[:, t])
            torch.testing.assert_close(pred, preds[:, t], atol=1e-5, rtol=1e-5)
            # pi * the members' variance, mean over the latent, as the trainer computes it.
            members_now = torch.cat([preds[:, t, None], ensemble[:, t]], dim=1)
            expected = math.pi * members_now.var(dim=1).mean(dim=-1)
            torch.testing.assert_close(disagreement, expected, atol=1e-5, rtol=1e-4)
            assert (disagreement > 0).all()
    # Members that agree do not disagree.
    same = preds[:, :1].unsqueeze(2).expand(batch, 1, members - 1, dyn.latent)
    assert torch.allclose(dyn.disagreement(preds[:, :1], same), torch.zeros(batch, 1))
    with pytest.raises(ValueError, match='ensemble must be >= 1'):
        ForwardDynamics(64, DynamicsConfig(ensemble=0))


def test_the_expected_error_head_reads_the_state_alike_in_both_forms_and_learns_apart():
    plain = build_model('dynamics', 'small-latent').eval()
    assert not plain.expects_error
    dyn = build_model('dynamics', 'small-aleatoric')
    assert dyn.expects_error
    g = torch.Generator().manual_seed(4)
    batch, steps = 2, 5
    z = torch.randn(batch, steps, dyn.latent, generator=g)
    action = random_actions(batch, steps, generator=g)
    dyn.eval()
    with torch.no_grad():
        first = plain.step_with_extras(z[:, 0], plain.initial_hidden(batch), action[:, 0])
        assert first.expected_error is None
        guesses = dyn.forward_with_extras(z, dyn.initial_hidden(batch), action).expected_error
        assert guesses.shape == (batch, steps)
        h = dyn.initial_hidden(batch)
        for t in range(steps):
            out = dyn.step_with_extras(z[:, t], h, action[:, t])
            torch.testing.assert_close(out.expected_error, guesses[:, t], atol=1e-4, rtol=1e-4)
            h = out.hidden
    # Its loss reaches the head alone: the dynamics learns what it learnt before.
    dyn.train()
    dyn.forward_with_extras(z, dyn.initial_hidden(batch), action).expected_error.sum().backward()
    head = [*dyn.expected_error_norm.parameters(), *dyn.expected_error_head.parameters()]
    assert all(p.grad is not None for p in head)
    head = {id(p) for p in head}
    assert all(p.grad is None for p in dyn.parameters() if id(p) not in head)
    with pytest.raises(ValueError, match='not both'):
        ForwardDynamics(64, DynamicsConfig(ensemble=3, expected_error=True))


def test_build_model_names_and_seed():
    with pytest.raises(ValueError, match='encoder, decoder, dynamics, policy'):
        build_model('critic', 'small')
    with pytest.raises(ValueError, match='unknown preset'):
        build_models('huge')
    state = torch.random.get_rng_state()
    a = build_models('small', seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # caller's RNG untouched
    b = build_models('small', seed=3)
    c = build_models('small', seed=4)
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


def test_inverse_dynamics_features_in_both_forms_and_only_where_the_preset_has_them():
    plain = build_model('dynamics', 'small-latent').eval()
    assert not plain.predicts_features
    assert not any(name.startswith(('features', 'inverse', 'feature_output'))
                   for name, _ in plain.named_parameters())
    dyn = build_model('dynamics', 'small-icm').eval()
    size = get_preset('small-icm').dynamics.inverse_features
    assert dyn.predicts_features and dyn.feature_size == size > 0
    g = torch.Generator().manual_seed(2)
    batch, steps = 2, 5
    z = torch.randn(batch, steps, dyn.latent, generator=g)
    action = random_actions(batch, steps, generator=g)
    with torch.no_grad():
        none = plain.step_with_extras(z[:, 0], plain.initial_hidden(batch), action[:, 0]).features
        assert none is None
        preds, feats, _, _, hiddens = dyn.forward_with_extras(z, dyn.initial_hidden(batch), action)
        assert feats.shape == (batch, steps, size)
        # The same recurrent state predicts both: the step form agrees with the parallel one.
        h = dyn.initial_hidden(batch)
        for t in range(steps):
            pred, feat, _, _, h = dyn.step_with_extras(z[:, t], h, action[:, t])
            torch.testing.assert_close(pred, preds[:, t], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(feat, feats[:, t], atol=1e-5, rtol=1e-5)
        assert dyn.features(z).shape == (batch, steps, size)
        logits = dyn.inverse_logits(dyn.features(z[:, :-1]), dyn.features(z[:, 1:]))
    assert [tuple(head.shape) for head in logits] == [(batch, steps - 1, n) for n in ACTION_CHOICES]


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
    dyn = build_model('dynamics', 'small').eval()
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
    preset = get_preset('small')
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


def test_policy_starts_near_uniform(small_models):
    policy = small_models['policy'].eval()
    with torch.no_grad():
        dist, _ = policy(torch.rand(3, *IMAGE_SHAPE))
    expected = torch.tensor([math.log(n) for n in ACTION_CHOICES]).expand(3, -1)
    torch.testing.assert_close(dist.entropy(), expected, atol=1e-2, rtol=0)


def test_policy_has_no_batchnorm(small_models):
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                   for m in small_models['policy'].modules())
