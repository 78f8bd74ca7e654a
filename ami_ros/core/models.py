"""Build the four models of a preset by name, and count their parameters."""

from __future__ import annotations

import torch
from torch import nn

from ami_ros.core.dynamics import ForwardDynamics
from ami_ros.core.encoder import ObservationDecoder, ObservationEncoder
from ami_ros.core.policy import PolicyValue
from ami_ros.core.presets import Preset, get_preset

MODEL_NAMES: tuple[str, ...] = ('encoder', 'decoder', 'dynamics', 'policy')


def _resolve(preset: Preset | str) -> Preset:
    return get_preset(preset) if isinstance(preset, str) else preset


def build_model(name: str, preset: Preset | str) -> nn.Module:
    """One model of `preset`; a ValueError listing MODEL_NAMES on an unknown name."""
    p = _resolve(preset)
    if name == 'encoder':
        return ObservationEncoder(p.encoder)
    if name == 'decoder':
        return ObservationDecoder(p.encoder)
    if name == 'dynamics':
        return ForwardDynamics(p.encoder.latent, p.dynamics)
    if name == 'policy':
        return PolicyValue(p.policy, p.encoder.latent)
    raise ValueError(f'unknown model {name!r}; choose one of {", ".join(MODEL_NAMES)}')


def build_models(preset: Preset | str, seed: int | None = None) -> dict[str, nn.Module]:
    """All models of `preset`, keyed by MODEL_NAMES.

    With a seed the initial weights are reproducible; the global RNG state is
    left as it was, so building models never perturbs the caller's randomness.
    """
    p = _resolve(preset)
    if seed is None:
        return {name: build_model(name, p) for name in MODEL_NAMES}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {name: build_model(name, p) for name in MODEL_NAMES}


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters (complex parameters would count once each)."""
    return sum(p.numel() for p in module.parameters())


def parameter_counts(preset: Preset | str) -> dict[str, int]:
    """Parameters per model of `preset`, plus 'total'."""
    counts = {name: count_parameters(m) for name, m in build_models(preset, seed=0).items()}
    counts['total'] = sum(counts.values())
    return counts
