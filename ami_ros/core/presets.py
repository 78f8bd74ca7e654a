"""Model and training presets (sizes, and what the policy sees), chosen by name everywhere (`preset`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

# Five categorical action heads: move vertical, move horizontal, look
# horizontal (each {0, +, -}), jump, run (each {0, 1}).
ACTION_CHOICES: tuple[int, ...] = (3, 3, 3, 2, 2)
IMAGE_SHAPE: tuple[int, int, int] = (3, 84, 84)


@dataclass(frozen=True)
class EncoderConfig:
    channels: tuple[int, int, int] = (32, 64, 64)
    hidden: int = 512  # the fully connected layer after the conv trunk
    latent: int = 512


@dataclass(frozen=True)
class DynamicsConfig:
    dim: int = 512
    depth: int = 4
    ffn: int = 512
    action_embedding: int = 8  # per action head
    dropout: float = 0.1
    # Size of the features the curiosity reward is measured in, learnt by
    # predicting the agent's own action from two consecutive latents (the
    # inverse-dynamics features of Pathak et al. 2017); 0: the reward is the
    # error in the VAE latent itself.
    inverse_features: int = 0
    # Predictors of z_{t+1} in an ensemble (the main one and heads - 1 linear
    # heads on the same recurrent features, each trained on its own random
    # half of every batch); with more than one, the curiosity reward is how
    # much they disagree (Pathak et al. 2019), which stays high where the
    # model has seen little and falls where the next view is merely noisy.
    ensemble: int = 1
    # A head that predicts, from the recurrent features a prediction is made
    # from and the action, how large its error will be; the curiosity reward is then
    # the error beyond it (the aleatoric-uncertainty correction of Mavor-Parker
    # et al. 2022), which is near 0 for steps that are always hard to predict,
    # such as turning in place, and stays high where the error is new.
    expected_error: bool = False


POLICY_INPUTS: tuple[str, ...] = ('image', 'latent', 'latent-hidden')


@dataclass(frozen=True)
class PolicyConfig:
    channels: tuple[int, int, int] = (32, 64, 64)  # of its conv trunk (input 'image' only)
    hidden: int = 512
    # What the policy sees: 'image', the frame through its own conv trunk (the
    # reference's design); 'latent', the encoder's z through an MLP, so it acts
    # on the features the VAE learns (README, Performance: exploration);
    # 'latent-hidden', z and the forward dynamics' hidden state (the state it
    # predicts the next latent from), so the policy also has a memory of the
    # steps before, as the reference system's later policies do.
    input: str = 'image'

    def __post_init__(self) -> None:
        if self.input not in POLICY_INPUTS:
            raise ValueError(f'policy input {self.input!r} is not one of {", ".join(POLICY_INPUTS)}')


@dataclass(frozen=True)
class VAETrainingConfig:
    lr: float = 1e-3
    batch_size: int = 8
    epochs: int = 3
    kl_coef: float = 0.01
    buffer_size: int = 2048
    min_new: int = 128  # new images before a round


@dataclass(frozen=True)
class DynamicsTrainingConfig:
    lr: float = 1e-4
    batch_size: int = 8
    epochs: int = 3
    chunk: int = 9  # consecutive steps per training sequence
    buffer_size: int = 2048
    min_new: int = 128
    # Loss weights of the inverse-dynamics features (DynamicsConfig.inverse_features > 0):
    # Pathak et al.'s 0.2 forward / 0.8 inverse, added to the latent prediction's loss.
    feature_coef: float = 0.2
    inverse_coef: float = 0.8


@dataclass(frozen=True)
class PPOTrainingConfig:
    lr: float = 1e-4
    batch_size: int = 8
    epochs: int = 3
    clip: float = 0.1
    value_coef: float = 0.5
    entropy_coef: float = 0.001
    gamma: float = 0.99
    gae_lambda: float = 0.95
    steps: int = 128  # steps per update (the buffer holds steps + 1)
    normalize_advantage: bool = True
    # Take the part of the reward that each action earns anywhere out of it
    # (reward.ActionRewardBaseline). Off by default: in the exploration bench
    # it did not stop the policy from turning (README, Performance).
    action_baseline: bool = False
    # Train on the reward less its running mean, divided by the running spread
    # of its discounted return (reward.ReturnNormalizer), so that the critic's
    # targets stay near unit scale however large curiosity is. Off by default:
    # in the exploration bench the policy then followed plain curiosity well
    # enough to stay where the prediction stays hard (README, Performance).
    normalize_reward: bool = False


@dataclass(frozen=True)
class Preset:
    name: str
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    vae_training: VAETrainingConfig = field(default_factory=VAETrainingConfig)
    dynamics_training: DynamicsTrainingConfig = field(default_factory=DynamicsTrainingConfig)
    ppo_training: PPOTrainingConfig = field(default_factory=PPOTrainingConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SMALL = Preset(
    name='small',
    encoder=EncoderConfig(channels=(16, 32, 32), hidden=128, latent=64),
    dynamics=DynamicsConfig(dim=128, depth=2, ffn=128),
    policy=PolicyConfig(channels=(16, 32, 32), hidden=128),
    vae_training=VAETrainingConfig(buffer_size=512, min_new=64),
    dynamics_training=DynamicsTrainingConfig(lr=1e-3, buffer_size=512, min_new=64),
    ppo_training=PPOTrainingConfig(lr=3e-4, steps=64),
)

_SMALL_LATENT = replace(_SMALL, name='small-latent', policy=replace(_SMALL.policy, input='latent'))

PRESETS: dict[str, Preset] = {
    # Fast on a 2-core CPU: tests, and with small-latent the default run.
    'small': _SMALL,
    # `small` with the policy on the encoder's latent instead of the frame.
    # A preset of its own, so that weights, experience and checkpoints of the
    # two policies are told apart by the preset check they already pass.
    'small-latent': _SMALL_LATENT,
    # `small-latent` with the curiosity reward measured in 32 inverse-dynamics
    # features instead of the 64-dimensional VAE latent.
    'small-icm': replace(_SMALL_LATENT, name='small-icm',
                         dynamics=replace(_SMALL_LATENT.dynamics, inverse_features=32)),
    # `small-latent` with the dynamics' hidden state as the policy's input
    # too: it can tell walking on from being stuck, or a room it just left.
    'small-memory': replace(_SMALL_LATENT, name='small-memory',
                            policy=replace(_SMALL.policy, input='latent-hidden')),
    # `small-latent` rewarded by the disagreement of five predictors of z_{t+1}.
    'small-ensemble': replace(_SMALL_LATENT, name='small-ensemble',
                              dynamics=replace(_SMALL_LATENT.dynamics, ensemble=5)),
    # `small-latent` rewarded by the prediction error beyond the error its
    # dynamics expects at that state and action.
    'small-aleatoric': replace(_SMALL_LATENT, name='small-aleatoric',
                               dynamics=replace(_SMALL_LATENT.dynamics, expected_error=True)),
    # The reference system's sizes (about 8.7 M parameters).
    'ami': Preset(name='ami'),
    # A scale-up trial, meant for a GPU.
    'large': Preset(
        name='large',
        encoder=EncoderConfig(channels=(64, 128, 128), hidden=1024, latent=1024),
        dynamics=DynamicsConfig(dim=1024, depth=8, ffn=2048),
        policy=PolicyConfig(channels=(64, 128, 128), hidden=1024),
        vae_training=VAETrainingConfig(batch_size=32, buffer_size=8192),
        dynamics_training=DynamicsTrainingConfig(batch_size=16, chunk=33, buffer_size=8192),
        ppo_training=PPOTrainingConfig(batch_size=32, steps=256),
    ),
}


# What the graph runs unless told otherwise (launch argument and node
# parameter `preset`): small models, and the policy on the latent, which
# explored more of my_way_home than the policy on the frame (README,
# Performance: exploration).
DEFAULT_PRESET = 'small-latent'


def get_preset(name: str) -> Preset:
    """The preset called `name`; a clear error naming the choices otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f'unknown preset {name!r}; choose one of {", ".join(PRESETS)}') from None


def with_overrides(preset: Preset, **sections: dict[str, Any]) -> Preset:
    """A copy of `preset` with some fields of its sections replaced."""
    changes = {key: replace(getattr(preset, key), **values) for key, values in sections.items()}
    return replace(preset, **changes)
