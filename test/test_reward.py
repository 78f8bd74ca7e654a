"""The curiosity reward: Gaussian prediction NLL with fixed std 1/sqrt(2*pi),
the baseline that takes what each action earns anywhere out of it, and the
normaliser that puts it on PPO's scale."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from ami_ros.core.presets import ACTION_CHOICES
from ami_ros.core.reward import (
    REWARDS,
    ActionRewardBaseline,
    CountedCuriosityReward,
    CuriosityReward,
    NovelCuriosityReward,
    RecentNovelty,
    ReturnNormalizer,
    VisitCounts,
    make_reward,
    prediction_nll,
)


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


def test_reward_registry():
    reward = make_reward('curiosity')
    assert isinstance(reward, CuriosityReward)
    assert set(REWARDS) == {'curiosity', 'novel_curiosity', 'counted_curiosity'}
    mu, x = torch.zeros(2, 4), torch.ones(2, 4)
    torch.testing.assert_close(reward(mu, x), torch.full((2,), math.pi))
    with pytest.raises(ValueError, match='curiosity'):
        make_reward('novelty')


def _trajectories(rounds: int, steps: int = 64, seed: int = 0):
    """Uniform random five-part actions and a reward that is an action effect
    (turning pays 1.0, moving forward 0.1) plus a place novelty term."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(rounds):
        actions = torch.stack([torch.randint(0, n, (steps,), generator=g) for n in ACTION_CHOICES], 1)
        novelty = torch.rand(steps, generator=g)
        effect = 1.0 * (actions[:, 2] != 0).float() + 0.1 * (actions[:, 0] == 1).float()
        yield actions, effect + novelty, novelty


def test_action_baseline_leaves_the_novelty_and_the_mean():
    baseline = ActionRewardBaseline(ACTION_CHOICES)
    for actions, reward, _ in _trajectories(9):
        baseline.adjust(actions, reward)
    actions, reward, novelty = next(_trajectories(1, seed=1))
    adjusted = baseline.adjust(actions, reward)
    # The last round: what each action earns by itself is gone...
    turning = actions[:, 2] != 0
    raw_gap = float(reward[turning].mean() - reward[~turning].mean())
    gap = float(adjusted[turning].mean() - adjusted[~turning].mean())
    assert raw_gap > 0.8 and abs(gap) < 0.15 * raw_gap, (raw_gap, gap)
    # ...what is left follows the novelty, and the trajectory's mean stays.
    assert torch.corrcoef(torch.stack([adjusted, novelty]))[0, 1] > 0.95
    assert torch.corrcoef(torch.stack([reward, novelty]))[0, 1] < 0.7
    torch.testing.assert_close(adjusted.mean(), reward.mean())


def test_action_baseline_state_round_trip():
    baseline = ActionRewardBaseline(ACTION_CHOICES)
    for actions, reward, _ in _trajectories(3):
        baseline.update(actions, reward)
    restored = ActionRewardBaseline(ACTION_CHOICES)
    restored.load_state_dict(baseline.state_dict())
    torch.testing.assert_close(restored.expected(actions), baseline.expected(actions))
    with pytest.raises(ValueError, match='expected'):
        ActionRewardBaseline((3, 3)).load_state_dict(baseline.state_dict())
    with pytest.raises(ValueError, match=r'\[N, 5\]'):
        baseline.expected(actions[:, :2])


def _discounted(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    out, running = [], 0.0
    for r in rewards.tolist():
        running = gamma * running + r
        out.append(running)
    return torch.tensor(out)


def test_return_normalizer_centres_the_reward_and_scales_its_return_to_unit_spread():
    g = torch.Generator().manual_seed(0)
    # Curiosity-like: a large offset and heavy upward spikes.
    raw = 40.0 + 5.0 * torch.randn(6000, generator=g).exp()
    normalizer = ReturnNormalizer(gamma=0.99)
    out = torch.cat([normalizer(chunk) for chunk in raw.split(64)])  # in rounds, as PPO feeds it
    settled = out[2000:]
    assert abs(float(settled.mean())) < 0.05, float(settled.mean())
    spread = float(_discounted(settled, 0.99)[500:].std())
    assert 0.6 < spread < 1.6, spread
    raw_spread = float(_discounted(raw[2000:], 0.99)[500:].std())
    assert raw_spread > 20 * spread  # it did rescale
    # The same stream in other units gives the same rewards: only its shape counts.
    again = ReturnNormalizer(gamma=0.99)
    torch.testing.assert_close(torch.cat([again(chunk) for chunk in (0.01 * raw).split(64)])[2000:],
                               settled, atol=1e-3, rtol=1e-3)
    assert normalizer.mean == pytest.approx(float(raw[-1000:].mean()), rel=0.05)


def test_return_normalizer_follows_a_drifting_scale_and_round_trips():
    g = torch.Generator().manual_seed(1)
    normalizer = ReturnNormalizer(gamma=0.9)
    normalizer(2.0 * torch.rand(3000, generator=g))
    early_scale = normalizer.scale
    normalizer(0.1 * torch.rand(10000, generator=g))  # the forward model learnt: curiosity fell
    # It forgets the old scale over a few thousand steps (the mean's lag is the slow part).
    assert normalizer.scale < 0.2 * early_scale, (normalizer.scale, early_scale)
    restored = ReturnNormalizer(gamma=0.9)
    restored.load_state_dict(normalizer.state_dict())
    more = torch.rand(100, generator=g)
    torch.testing.assert_close(restored(more), normalizer(more))
    with pytest.raises(ValueError, match='expected'):
        restored.load_state_dict({'stats': torch.zeros(3)})
    with pytest.raises(ValueError, match='gamma'):
        ReturnNormalizer(gamma=1.0)


def test_recent_novelty_is_low_for_views_seen_moments_ago_and_high_for_new_ones():
    g = torch.Generator().manual_seed(0)
    novelty = RecentNovelty(window=300, neighbours=10)
    wandering = [novelty(z) for z in torch.randn(600, 16, generator=g)]  # every view new
    # Spinning in place: the same 30 views over and over, a little noisy.
    circle = torch.randn(30, 16, generator=g)
    spinning = [novelty(circle[i % 30] + 0.05 * torch.randn(16, generator=g)) for i in range(300)]
    fresh = novelty(torch.randn(16, generator=g))
    usual, spun = sum(wandering[-100:]) / 100, sum(spinning[-50:]) / 50
    assert 0.8 < usual < 1.2, usual  # a usual step scores about 1
    assert spun < 0.4 * usual, spinning[-5:]
    assert fresh > 3 * spun, (fresh, spun)


def _assert_a_restored_copy_pays_the_same(reward, restored, seen: torch.Tensor,
                                          g: torch.Generator) -> None:
    """`restored`, loaded from `reward`'s state, pays what `reward` pays for the
    next steps: new views and `seen`, a view `reward` remembers."""
    restored.load_state_dict(reward.state_dict())
    for _ in range(5):
        for z in (torch.randn(1, 8, generator=g), seen):
            mu = torch.randn(1, 8, generator=g)
            assert float(restored(mu, z)[0]) == float(reward(mu, z)[0])


def test_novel_curiosity_is_curiosity_times_novelty_and_its_memory_round_trips():
    g = torch.Generator().manual_seed(1)
    reward, twin = NovelCuriosityReward(), RecentNovelty()
    for _ in range(20):
        mu, z = torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g)
        expected = prediction_nll(mu, z) * twin(z)
        torch.testing.assert_close(reward(mu, z), expected)
    _assert_a_restored_copy_pays_the_same(reward, NovelCuriosityReward(), z, g)
    with pytest.raises(ValueError, match='window >= neighbours'):
        RecentNovelty(window=5, neighbours=10)


def test_visit_counts_pay_for_rare_views_and_forget_old_ones():
    g = torch.Generator().manual_seed(5)
    visits = VisitCounts(bits=16, decay=0.999)
    start_room = torch.randn(5, 32, generator=g)  # seen at the start of every episode
    for i in range(500):
        visits(start_room[i % 5] + 0.01 * torch.randn(32, generator=g))
    again = visits(start_room[0])
    new = visits(torch.randn(32, generator=g))
    assert new == 1.0  # a view never seen: its bucket is empty
    assert again < 0.15  # ~100 visits, decayed a little: 1/sqrt(1 + ~95)
    # Nearby latents share a bucket; a latent far away does not.
    assert visits.key(start_room[1]) == visits.key(start_room[1] + 0.01 * torch.randn(32, generator=g))
    assert visits.key(start_room[1]) != visits.key(-start_room[1])
    # Away from the room for 3000 steps, its count decays (0.999^3000 ~ 0.05).
    for _ in range(3000):
        visits(torch.randn(32, generator=g))
    back = visits(start_room[0])
    assert again * 2 < back < 1.0, (again, back)


def test_visit_counts_round_trip_and_refuse_what_does_not_fit():
    g = torch.Generator().manual_seed(6)
    visits = VisitCounts(bits=8)
    latents = torch.randn(40, 16, generator=g)
    for z in latents:
        visits(z)
    restored = VisitCounts(bits=8, seed=99)  # the projection comes from the state
    restored.load_state_dict(visits.state_dict())
    for z in latents[:10]:
        assert restored(z) == visits(z)
    with pytest.raises(ValueError, match='size 16'):
        visits(torch.randn(8))
    with pytest.raises(ValueError, match='8 bits'):
        VisitCounts(bits=12).load_state_dict(visits.state_dict())
    with pytest.raises(ValueError, match='bits'):
        VisitCounts(bits=0)
    with pytest.raises(ValueError, match='decay'):
        VisitCounts(decay=0.0)


def test_counted_curiosity_is_curiosity_over_the_root_of_the_count_and_round_trips():
    g = torch.Generator().manual_seed(7)
    reward, twin = CountedCuriosityReward(), VisitCounts()
    view = torch.randn(1, 8, generator=g)
    for _ in range(20):
        mu = torch.randn(1, 8, generator=g)
        expected = prediction_nll(mu, view) * twin(view[0])
        torch.testing.assert_close(reward(mu, view), expected)
    # The same error pays less each time the same view comes back.
    mu = torch.zeros(1, 8)
    assert float(reward(mu, view)[0]) < 0.25 * float(prediction_nll(mu, view)[0])
    _assert_a_restored_copy_pays_the_same(reward, CountedCuriosityReward(), view, g)
    with pytest.raises(ValueError, match='one step at a time'):
        reward(torch.zeros(2, 8), torch.zeros(2, 8))
