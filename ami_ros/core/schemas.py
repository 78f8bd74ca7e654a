"""The envelopes the nodes exchange: experience steps and model weights.

Both ride in the safetensors tensor envelope (`envelope.py`). Decoding checks
every tensor's name, dtype and shape against the receiver's preset and
refuses a step or weights of another preset, with a one-line reason.

experience (schema 'experience', one per agent step; std_msgs/UInt8MultiArray)
  tensors   observation uint8 [3,84,84]   the frame the agent acted on
            latent float32 [L]            z_t, the encoder's mean
            hidden complex64 [depth,dim]  h_t, the dynamics state used with z_t
            action int64 [5]              a_t
            log_prob float32 [5]          per head, under the acting policy
            previous_action int64 [5]     a_{t-1} as the agent held it (zeros if none)
            persistence float32 []        chance each head kept it (0 if none;
                                          policy.with_persistence)
            value float32 []              V(o_t)
            reward float32 []             reward of a_{t-1}, known now (0 if none)
            stamp int64 []                frame stamp, ns
  metadata  preset, step, continues (0/1: follows the previous step without a
            gap), reward_valid (0/1), version_<model> for each model
  A blob larger than the preset's step can be (`experience_max_bytes`) is
  refused before any of it is parsed: anyone on the graph can publish one.

weights (schema 'weights/<model>'; a byte_array Parameter of agent/sync_weights)
  tensors   the model's state_dict
  metadata  preset, model, version
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ami_ros.core.envelope import EnvelopeError, TensorSpec, decode, encode
from ami_ros.core.models import MODEL_NAMES
from ami_ros.core.presets import ACTION_CHOICES, IMAGE_SHAPE, Preset

EXPERIENCE_SCHEMA = 'experience'
# Room for the safetensors header (tensor names, dtypes, shapes, offsets, metadata):
# about 1 KiB in a real step, whatever the preset.
EXPERIENCE_HEADER_BYTES = 16 * 1024


def experience_specs(preset: Preset) -> dict[str, TensorSpec]:
    heads = len(ACTION_CHOICES)
    return {
        'observation': TensorSpec(torch.uint8, IMAGE_SHAPE),
        'latent': TensorSpec(torch.float32, (preset.encoder.latent,)),
        'hidden': TensorSpec(torch.complex64, (preset.dynamics.depth, preset.dynamics.dim)),
        'action': TensorSpec(torch.int64, (heads,)),
        'log_prob': TensorSpec(torch.float32, (heads,)),
        'previous_action': TensorSpec(torch.int64, (heads,)),
        'persistence': TensorSpec(torch.float32, ()),
        'value': TensorSpec(torch.float32, ()),
        'reward': TensorSpec(torch.float32, ()),
        'stamp': TensorSpec(torch.int64, ()),
    }


def experience_max_bytes(preset: Preset) -> int:
    """The largest experience blob a step of `preset` can make: its tensors and a header."""
    data = sum(spec.dtype.itemsize * math.prod(spec.shape) for spec in experience_specs(preset).values())
    return 8 + EXPERIENCE_HEADER_BYTES + data


@dataclass
class ExperienceStep:
    """Everything a trainer needs of one agent step."""

    observation: Tensor
    latent: Tensor
    hidden: Tensor
    action: Tensor
    log_prob: Tensor
    value: float
    reward: float | None  # reward of the previous action; None on a first step
    stamp_ns: int
    step: int
    continues: bool
    versions: dict[str, int] = field(default_factory=dict)
    preset: str = ''
    previous_action: Tensor | None = None  # None = zeros: nothing held
    persistence: float = 0.0


def encode_experience(step: ExperienceStep) -> bytes:
    tensors = {
        'observation': step.observation,
        'latent': step.latent.float(),
        'hidden': step.hidden,
        'action': step.action.long(),
        'log_prob': step.log_prob.float(),
        'previous_action': (torch.zeros_like(step.action).long() if step.previous_action is None
                            else step.previous_action.long()),
        'persistence': torch.tensor(step.persistence, dtype=torch.float32),
        'value': torch.tensor(step.value, dtype=torch.float32),
        'reward': torch.tensor(0.0 if step.reward is None else step.reward, dtype=torch.float32),
        'stamp': torch.tensor(step.stamp_ns, dtype=torch.int64),
    }
    metadata = {'preset': step.preset, 'step': step.step, 'continues': int(step.continues),
                'reward_valid': int(step.reward is not None),
                **{f'version_{k}': v for k, v in step.versions.items()}}
    return encode(tensors, EXPERIENCE_SCHEMA, metadata)


def _check_preset(envelope_preset: str | None, preset: Preset, what: str) -> None:
    if envelope_preset != preset.name:
        raise EnvelopeError(f'{what} is of preset {envelope_preset!r}, this node runs {preset.name!r}')


def decode_experience(blob: bytes | Sequence[int], preset: Preset) -> ExperienceStep:
    """The step a blob holds (bytes, or a message's uint8 array: its size is checked first)."""
    limit = experience_max_bytes(preset)
    if len(blob) > limit:
        raise EnvelopeError(f'experience of {len(blob)} bytes is larger than a {preset.name} step '
                            f'can be ({limit} bytes)')
    env = decode(blob, EXPERIENCE_SCHEMA, experience_specs(preset))
    _check_preset(env.metadata.get('preset'), preset, 'experience')
    t = env.tensors
    valid = env.int_meta('reward_valid')
    return ExperienceStep(
        observation=t['observation'], latent=t['latent'], hidden=t['hidden'], action=t['action'],
        log_prob=t['log_prob'], value=float(t['value']),
        previous_action=t['previous_action'], persistence=float(t['persistence']),
        reward=float(t['reward']) if valid else None, stamp_ns=int(t['stamp']),
        step=env.int_meta('step'), continues=bool(env.int_meta('continues')),
        versions={name: env.int_meta(f'version_{name}', 0) for name in MODEL_NAMES},
        preset=preset.name)


def weights_schema(model: str) -> str:
    return f'weights/{model}'


def encode_weights(model: str, state_dict: Mapping[str, Tensor], version: int, preset: str) -> bytes:
    return encode(state_dict, weights_schema(model),
                  {'preset': preset, 'model': model, 'version': int(version)})


def decode_weights(blob: bytes, model: str, expected: Mapping[str, TensorSpec],
                   preset: Preset) -> tuple[dict[str, Tensor], int]:
    """(state_dict, version) of a weights envelope for `model`, fully validated."""
    env = decode(blob, weights_schema(model), expected)
    _check_preset(env.metadata.get('preset'), preset, f'weights for {model}')
    return env.tensors, env.int_meta('version')
