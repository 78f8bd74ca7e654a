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


POLICY_INPUTS: tuple[str, ...] = ('image', 'latent')


@dataclass(frozen=True)
class PolicyConfig:
    channels: tuple[int, int, int] = (32, 64, 64)  # of its conv trunk (input 'image' only)
    hidden: int = 512
    # What the policy sees: 'image', the frame through its own conv trunk (the
    # reference's design); 'latent', the encoder's z through an MLP, so it acts
    # on the features the VAE learns (docs/experiments.md).
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


PRESETS: dict[str, Preset] = {
    # The default, for learning live on an ordinary CPU: small models, and the
    # policy on the encoder's latent, which explored more of my_way_home than
    # a policy on the frame (docs/experiments.md).
    'cpu': Preset(
        name='cpu',
        encoder=EncoderConfig(channels=(16, 32, 32), hidden=128, latent=64),
        dynamics=DynamicsConfig(dim=128, depth=2, ffn=128),
        policy=PolicyConfig(channels=(16, 32, 32), hidden=128, input='latent'),
        vae_training=VAETrainingConfig(buffer_size=512, min_new=64),
        dynamics_training=DynamicsTrainingConfig(lr=1e-3, buffer_size=512, min_new=64),
        ppo_training=PPOTrainingConfig(lr=3e-4, steps=64),
    ),
    # The reference system's sizes (about 8.7 M parameters).
    'ami': Preset(name='ami'),
    # A scale-up, for a GPU.
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


# What the graph runs unless told otherwise (launch argument and node parameter `preset`).
DEFAULT_PRESET = 'cpu'


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
