"""Intrinsic rewards; the default is curiosity = forward-dynamics prediction error.

The reward at step t is -log p(z_t | prediction made at t-1) under the
dynamics' Gaussian with fixed std 1/sqrt(2*pi), i.e. pi * (z - mu)^2 per
dimension. It is averaged (not summed) over the latent dimension so that the
reward scale, and with it PPO's value targets, does not depend on the latent
size of the preset. Where the preset's dynamics has inverse-dynamics features
(`small-icm`), the agent passes the predicted and observed features instead
of latents: the same measure, in the space of Pathak et al.'s curiosity module.
Where it has an ensemble of predictors (`small-ensemble`), the reward is their
disagreement instead (ForwardDynamics.disagreement, in the same units), paid
for the action the prediction was made with. Where it has an expected-error
head (`small-aleatoric`), the agent takes the error the head expected of the
prediction (DynamicsStep.expected_error, in the same units) out of the
reward: what is left is surprise beyond the usual at that state and action.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor


def prediction_nll(pred_mean: Tensor, observed: Tensor) -> Tensor:
    """-log N(observed | pred_mean, 1/sqrt(2*pi)), per-dimension mean over the last axis."""
    return math.pi * (observed - pred_mean).pow(2).mean(dim=-1)


class RewardFunction(Protocol):
    """Anything that turns a prediction and the observed next latent into a reward [...]."""

    def __call__(self, pred_mean: Tensor, observed: Tensor) -> Tensor: ...


class CuriosityReward:
    """Reward = prediction error (negative log-likelihood) of the observed latent."""

    def __call__(self, pred_mean: Tensor, observed: Tensor) -> Tensor:
        return prediction_nll(pred_mean, observed)


class RecentNovelty:
    """How unlike the last `window` latents a latent is: about 1 for a usual
    step, towards 0 for a view seen moments ago, up to 2 for a new one.

    An episodic-novelty term after Badia et al. 2020 (Never Give Up), but over
    a sliding window instead of an episode (an always-on agent has none): the
    mean squared distance to the `neighbours` nearest latents in the window,
    divided by its running mean, d, gives 2·d/(1+d). Spinning or circling in
    place keeps showing the views of a few seconds ago, so it scores low;
    going somewhere new scores high.
    """

    def __init__(self, window: int = 300, neighbours: int = 10, decay: float = 0.999) -> None:
        if window < neighbours or neighbours < 1:
            raise ValueError(f'need window >= neighbours >= 1, got {window} and {neighbours}')
        self.window, self.neighbours, self.decay = int(window), int(neighbours), float(decay)
        self.memory: Tensor | None = None  # [window, latent] ring buffer
        self.filled = 0
        self.next = 0
        self.mean_sq = 0.0  # running mean of the k-nearest squared distance
        self.seen = 0  # steps in that mean

    def __call__(self, z: Tensor) -> float:
        """The novelty of latent z ([latent] or [1, latent]); then remember it."""
        z = z.detach().reshape(-1).float().cpu()
        novelty = 1.0
        if self.filled >= self.neighbours:
            dist_sq = (self.memory[:self.filled] - z).pow(2).sum(-1)
            nearest = float(dist_sq.topk(self.neighbours, largest=False).values.mean())
            # A plain average at first (while the window fills, distances
            # shrink), an exponential one once 1/(1-decay) steps are in.
            self.seen += 1
            rate = max(1.0 - self.decay, 1.0 / self.seen)
            self.mean_sq += rate * (nearest - self.mean_sq)
            ratio = nearest / max(self.mean_sq, 1e-12)
            novelty = 2.0 * ratio / (1.0 + ratio)
        self._remember(z)
        return novelty

    def _remember(self, z: Tensor) -> None:
        if self.memory is None:
            self.memory = torch.zeros(self.window, z.numel())
        self.memory[self.next] = z
        self.next = (self.next + 1) % self.window
        self.filled = min(self.filled + 1, self.window)

    def state_dict(self) -> dict[str, Tensor]:
        """The window in time order, oldest first (none before the first
        step), and the running mean."""
        state = {'mean_sq': torch.tensor(self.mean_sq, dtype=torch.float64),
                 'seen': torch.tensor(self.seen, dtype=torch.int64)}
        if self.memory is not None:
            order = torch.arange(self.next - self.filled, self.next) % self.window
            state['recent_latents'] = self.memory[order].clone()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.memory, self.filled, self.next = None, 0, 0
        self.mean_sq = float(state['mean_sq'])
        self.seen = int(state['seen'])
        for z in state.get('recent_latents', torch.zeros(0, 0)).float()[-self.window:]:
            self._remember(z)


class NoveltyScaledCuriosity:
    """Curiosity times a novelty factor that remembers what it has seen.

    Stateful: call it once per step, in order, with one latent (the agent
    does); the novelty's memory is agent state (saved with the agent).
    """

    name = 'novelty-scaled curiosity'

    def __init__(self, novelty: RecentNovelty | VisitCounts) -> None:
        self.novelty = novelty

    def __call__(self, pred_mean: Tensor, observed: Tensor) -> Tensor:
        if observed.dim() != 2 or observed.shape[0] != 1:
            raise ValueError(f'{self.name} takes one step at a time ([1, latent]), '
                             f'got {list(observed.shape)}')
        return prediction_nll(pred_mean, observed) * self.novelty(observed[0])

    def state_dict(self) -> dict[str, Tensor]:
        return self.novelty.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.novelty.load_state_dict(state)


class NovelCuriosityReward(NoveltyScaledCuriosity):
    """Curiosity times RecentNovelty: prediction error that counts where the
    view is new, and little where the agent keeps seeing what it just saw."""

    name = 'novel_curiosity'

    def __init__(self) -> None:
        super().__init__(RecentNovelty())


class VisitCounts:
    """How often the agent has seen views like this one over the whole run.

    Count-based novelty after Tang et al. 2017 (#Exploration): a latent's
    SimHash (the signs of `bits` fixed random projections) names its bucket,
    and each bucket keeps a count that decays by `decay` per step, so the
    counts follow an encoder that keeps training. Called with z, it gives
    1/sqrt(1 + count) of z's bucket before this visit (1 for a view never
    seen, small for one seen at the start of every episode), then counts it.
    """

    def __init__(self, bits: int = 16, decay: float = 0.9999, seed: int = 0) -> None:
        if not 1 <= bits <= 62:
            raise ValueError(f'bits must be 1..62 (one int64 key), got {bits}')
        if not 0.0 < decay <= 1.0:
            raise ValueError(f'decay must be in (0, 1], got {decay}')
        self.bits, self.decay, self.seed = int(bits), float(decay), int(seed)
        self.projection: Tensor | None = None  # [bits, latent], made at the first latent
        self.counts: dict[int, tuple[float, int]] = {}  # key -> (count, step it was counted at)
        self.step = 0
        self._weights = 2 ** torch.arange(self.bits, dtype=torch.int64)

    def key(self, z: Tensor) -> int:
        """The bucket of latent z ([latent] or [1, latent])."""
        z = z.detach().reshape(-1).float().cpu()
        if self.projection is None:
            generator = torch.Generator().manual_seed(self.seed)
            self.projection = torch.randn(self.bits, z.numel(), generator=generator)
        if self.projection.shape[1] != z.numel():
            raise ValueError(f'visit counts hash latents of size {self.projection.shape[1]}, '
                             f'got {z.numel()}')
        return int(((self.projection @ z > 0).long() * self._weights).sum())

    def count(self, key: int) -> float:
        """Bucket `key`'s count now, decayed to this step."""
        count, at = self.counts.get(key, (0.0, self.step))
        return count * self.decay ** (self.step - at)

    def __call__(self, z: Tensor) -> float:
        """1/sqrt(1 + how often z's bucket was seen); then count this visit."""
        key = self.key(z)
        seen = self.count(key)
        self.counts[key] = (seen + 1.0, self.step)
        self.step += 1
        return 1.0 / math.sqrt(1.0 + seen)

    def state_dict(self) -> dict[str, Tensor]:
        keys = sorted(self.counts)
        state = {'step': torch.tensor(self.step, dtype=torch.int64),
                 'keys': torch.tensor(keys, dtype=torch.int64),
                 'counts': torch.tensor([self.counts[k][0] for k in keys], dtype=torch.float64),
                 'counted_at': torch.tensor([self.counts[k][1] for k in keys], dtype=torch.int64)}
        if self.projection is not None:
            state['projection'] = self.projection.clone()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        projection = state.get('projection')
        if projection is not None and projection.shape[0] != self.bits:
            raise ValueError(f'visit counts of {projection.shape[0]} bits cannot load into '
                             f'{self.bits}')
        self.projection = None if projection is None else projection.float().clone()
        self.step = int(state['step'])
        self.counts = {int(k): (float(c), int(a)) for k, c, a in
                       zip(state['keys'].tolist(), state['counts'].tolist(),
                           state['counted_at'].tolist(), strict=True)}


class CountedCuriosityReward(NoveltyScaledCuriosity):
    """Curiosity times VisitCounts' novelty: prediction error that pays where
    the views are rarely seen over the run, and little where they are seen
    every episode however hard they stay to predict (in my_way_home the far
    start room stays about twice as hard as the corridor out of it). A
    lifelong-novelty factor like Never Give Up's (Badia et al. 2020), from
    counts instead of a second network."""

    name = 'counted_curiosity'

    def __init__(self) -> None:
        super().__init__(VisitCounts())


REWARDS: dict[str, type] = {'curiosity': CuriosityReward, 'novel_curiosity': NovelCuriosityReward,
                            'counted_curiosity': CountedCuriosityReward}


def make_reward(name: str) -> RewardFunction:
    """The reward called `name`; a ValueError listing the choices otherwise."""
    try:
        cls = REWARDS[name]
    except KeyError:
        raise ValueError(f'unknown reward {name!r}; choose one of {", ".join(REWARDS)}') from None
    return cls()


class ActionRewardBaseline:
    """How much reward each action part brings in by itself, to take out of it.

    A forward model in latent space finds turning hard to predict wherever the
    agent is: a turn shifts the whole view. Raw curiosity therefore pays for
    turning as such, and a policy learns to spin in place (see the README's
    exploration figures). This keeps a running least-squares fit of the reward
    on the one-hot choices of every action head (an additive model,
    exponentially forgetting old rounds as the policy changes) and `adjust`
    removes the fitted action effect, keeping the trajectory's mean. What is
    left is surprise beyond what is usual for the action taken: novelty of
    the place, not of the movement.
    """

    def __init__(self, choices: tuple[int, ...], decay: float = 0.9, ridge: float = 1.0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f'decay must be in [0, 1), got {decay}')
        self.choices = tuple(int(c) for c in choices)
        self.decay, self.ridge = float(decay), float(ridge)
        size = 1 + sum(self.choices)
        self.gram = torch.zeros(size, size, dtype=torch.float64)
        self.moment = torch.zeros(size, dtype=torch.float64)

    def features(self, actions: Tensor) -> Tensor:
        """[N, heads] integer actions -> [N, 1 + sum(choices)]: a bias and one-hots."""
        if actions.dim() != 2 or actions.shape[1] != len(self.choices):
            raise ValueError(f'actions must be [N, {len(self.choices)}], got {list(actions.shape)}')
        parts = [torch.ones(len(actions), 1, dtype=torch.float64)]
        for head, n in enumerate(self.choices):
            parts.append(torch.nn.functional.one_hot(actions[:, head].long(), n).to(torch.float64))
        return torch.cat(parts, dim=1)

    def update(self, actions: Tensor, rewards: Tensor) -> None:
        """Fold one trajectory's (action, reward) pairs into the fit."""
        x = self.features(actions)
        self.gram.mul_(self.decay).add_(x.T @ x)
        self.moment.mul_(self.decay).add_(x.T @ rewards.to(torch.float64))

    def expected(self, actions: Tensor) -> Tensor:
        """The fitted reward of each action (float32 [N])."""
        # The ridge term keeps the fit defined for choices not seen yet (and
        # the one-hots are collinear with the bias): unseen choices get 0.
        eye = torch.eye(len(self.moment), dtype=torch.float64)
        weights = torch.linalg.solve(self.gram + self.ridge * eye, self.moment)
        return (self.features(actions) @ weights).to(torch.float32)

    def adjust(self, actions: Tensor, rewards: Tensor) -> Tensor:
        """Update with this trajectory, then return its rewards less each
        action's fitted effect (the trajectory's mean reward is kept)."""
        self.update(actions, rewards)
        effect = self.expected(actions)
        return rewards - (effect - effect.mean())

    def state_dict(self) -> dict[str, Tensor]:
        return {'gram': self.gram.clone(), 'moment': self.moment.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        gram, moment = state['gram'], state['moment']
        if gram.shape != self.gram.shape or moment.shape != self.moment.shape:
            raise ValueError(f'reward baseline of shape {list(gram.shape)}, expected {list(self.gram.shape)}')
        self.gram = gram.to(torch.float64).clone()
        self.moment = moment.to(torch.float64).clone()


class ReturnNormalizer:
    """Puts PPO's reward on a fixed scale: minus its running mean, divided by
    the running standard deviation of the discounted return of those centred
    rewards (Burda et al. 2018 divide curiosity by the latter).

    Raw curiosity is about 0.05-2 per step and falls as the forward model
    learns, so its returns (about 100 steps long at gamma 0.99) run to tens,
    far beyond what PPO's clipped value loss (±clip per round) lets the critic
    follow, and the critic's large loss then takes most of the clipped
    gradient of the trunk it shares with the policy. The agent never ends an
    episode, so taking a constant out of every reward changes no policy's
    ranking; it only leaves the critic the part that depends on what the
    agent does. Statistics decay over about 1/(1 - decay) steps, since the
    reward's scale drifts with the models.
    """

    def __init__(self, gamma: float, decay: float = 0.999, epsilon: float = 1e-4) -> None:
        # epsilon (a variance: a spread of 0.01) keeps the first few rewards, and
        # a reward that hardly varies, from being divided by almost nothing.
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f'gamma must be in [0, 1), got {gamma}')
        if not 0.0 < decay < 1.0:
            raise ValueError(f'decay must be in (0, 1), got {decay}')
        self.gamma, self.decay, self.epsilon = float(gamma), float(decay), float(epsilon)
        # [count, reward mean, discounted return of centred rewards, its mean square]
        self.stats = torch.zeros(4, dtype=torch.float64)

    @property
    def mean(self) -> float:
        return float(self.stats[1])

    @property
    def scale(self) -> float:
        """The standard deviation rewards are divided by (1 before any reward)."""
        return math.sqrt(float(self.stats[3])) if self.stats[0] > 0 else 1.0

    def __call__(self, rewards: Tensor) -> Tensor:
        """Fold a trajectory's rewards [N] in, in order, and return them normalised (float32)."""
        count, mean, ret, square = (float(v) for v in self.stats)
        out = torch.empty(len(rewards), dtype=torch.float64)
        for i, r in enumerate(rewards.to(torch.float64).tolist()):
            count += 1.0
            # An average of everything so far until `decay` forgets faster.
            rate = max(1.0 / count, 1.0 - self.decay)
            mean += rate * (r - mean)
            ret = self.gamma * ret + (r - mean)
            square += rate * (ret * ret - square)
            out[i] = (r - mean) / math.sqrt(square + self.epsilon)
        self.stats = torch.tensor([count, mean, ret, square], dtype=torch.float64)
        return out.to(torch.float32)

    def state_dict(self) -> dict[str, Tensor]:
        return {'stats': self.stats.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        stats = state['stats']
        if stats.shape != self.stats.shape:
            raise ValueError(f'reward normaliser state of shape {list(stats.shape)}, '
                             f'expected {list(self.stats.shape)}')
        self.stats = stats.to(torch.float64).clone()
