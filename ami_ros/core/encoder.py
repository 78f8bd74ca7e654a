"""Observation encoder (a convolutional VAE encoder) and its decoder.

The encoder maps a 3x84x84 image in [0, 1] to a diagonal Gaussian over the
latent z; the acting agent uses its mean. The decoder maps z back to an image
and serves the VAE trainer and the `prediction/image_raw` view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Normal

from ami_ros.core.presets import IMAGE_SHAPE, EncoderConfig

# Spatial size after the trunk k8 s4 -> k4 s2 -> k3 s1 on 84x84: 20 -> 9 -> 7.
TRUNK_SIZE = 7
_STD_FLOOR = 1e-4  # keeps the posterior std away from zero (finite KL / log-probs)


def conv_trunk_shapes(channels: tuple[int, int, int]) -> list[tuple[int, int, int, int]]:
    """(in, out, kernel, stride) of the three trunk convolutions shared by encoder and policy."""
    c0, c1, c2 = channels
    return [(IMAGE_SHAPE[0], c0, 8, 4), (c0, c1, 4, 2), (c1, c2, 3, 1)]


class ObservationEncoder(nn.Module):
    """Image [B,3,84,84] in [0,1] -> Normal over z [B, latent]."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.latent = cfg.latent
        layers: list[nn.Module] = []
        for cin, cout, k, s in conv_trunk_shapes(cfg.channels):
            layers += [nn.Conv2d(cin, cout, k, s), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]
        self.trunk = nn.Sequential(*layers, nn.Flatten())
        self.fc = nn.Sequential(
            nn.Linear(cfg.channels[2] * TRUNK_SIZE * TRUNK_SIZE, cfg.hidden), nn.LeakyReLU(0.2))
        self.mean_head = nn.Linear(cfg.hidden, cfg.latent)
        self.std_head = nn.Linear(cfg.hidden, cfg.latent)

    def _features(self, obs: Tensor) -> Tensor:
        return self.fc(self.trunk(obs))

    def forward(self, obs: Tensor) -> Normal:
        h = self._features(obs)
        return Normal(self.mean_head(h), F.softplus(self.std_head(h)) + _STD_FLOOR)

    def encode_mean(self, obs: Tensor) -> Tensor:
        """The posterior mean only (what the agent uses), skipping the std head."""
        return self.mean_head(self._features(obs))


class ObservationDecoder(nn.Module):
    """z [B, latent] -> image [B,3,84,84] in [0,1].

    A narrow linear map to a (c2/4)x7x7 map keeps the parameter count small
    (about 0.5 M for the `ami` preset, most of it in that linear layer), then
    transposed convolutions mirror the encoder trunk (7 -> 9 -> 20) and two
    stride-2 steps (20 -> 42 -> 84) rather than one stride-4 step, which gives
    fewer blocky artefacts for little cost.
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.latent = cfg.latent
        c0, c1, c2 = cfg.channels
        self._seed_channels = max(c2 // 4, 4)
        self.fc = nn.Sequential(
            nn.Linear(cfg.latent, self._seed_channels * TRUNK_SIZE * TRUNK_SIZE), nn.LeakyReLU(0.2))
        act = nn.LeakyReLU(0.2)
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(self._seed_channels, c2, 3, 1), act,  # 7 -> 9
            nn.ConvTranspose2d(c2, c1, 4, 2), act,  # 9 -> 20
            nn.ConvTranspose2d(c1, c0, 4, 2), act,  # 20 -> 42
            nn.ConvTranspose2d(c0, IMAGE_SHAPE[0], 4, 2, padding=1),  # 42 -> 84
        )

    def forward(self, z: Tensor) -> Tensor:
        x = self.fc(z).view(z.shape[0], self._seed_channels, TRUNK_SIZE, TRUNK_SIZE)
        return torch.sigmoid(self.deconv(x))
