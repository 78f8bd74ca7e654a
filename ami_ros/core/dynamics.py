"""SConv forward dynamics: f(z_t, h_t, a_t) -> (mean of z_{t+1}, h_{t+1}).

The hidden state is always an explicit input and output, never kept inside
the module, so the acting agent, the trainer (which starts each chunk from a
stored state) and checkpoints all handle it the same way.

Each SConv layer is a diagonal complex linear recurrence
``h_t = lam * h_{t-1} + g * x_t`` with one learned complex ``lam`` per
channel (|lam| < 1 by construction, so the state cannot blow up), read out as
``Linear(Re(h_t))``. Two equivalent forms exist:

* `ForwardDynamics.step`: one time step, for the agent (O(dim) per layer).
* `ForwardDynamics.forward`: a whole sequence at once for training, using the
  lower-triangular T x T decay matrix ``lam^(t-k)``; it costs O(T^2 * dim)
  per layer and sample, which is cheap for the short training chunks (9).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Normal

from ami_ros.core.presets import ACTION_CHOICES, DynamicsConfig

# Fixed std of the prediction: with sigma = 1/sqrt(2*pi), -log p = pi*(x-mu)^2 exactly.
PREDICTION_STD = 1.0 / math.sqrt(2.0 * math.pi)
HIDDEN_DTYPE = torch.complex64


class SConvLayer(nn.Module):
    """Diagonal complex linear recurrence over channels, read out by one dim x dim linear."""

    def __init__(self, dim: int, min_radius: float = 0.5, max_radius: float = 0.999,
                 max_phase: float = math.pi / 10) -> None:
        super().__init__()
        self.dim = dim
        # Magnitudes spread from fast to slow memory; small phases keep it mostly smoothing.
        radius = torch.linspace(min_radius, max_radius, dim)
        self.radius_logit = nn.Parameter(torch.log(radius) - torch.log1p(-radius))
        self.phase = nn.Parameter(torch.linspace(0.0, max_phase, dim))
        # Input gain sqrt(1 - r^2) (as in the LRU) so slow channels do not dwarf fast ones.
        self.gain_re = nn.Parameter(torch.sqrt(1.0 - radius**2))
        self.gain_im = nn.Parameter(torch.zeros(dim))
        self.out = nn.Linear(dim, dim)

    def _lam(self) -> Tensor:
        r = torch.sigmoid(self.radius_logit)
        return torch.complex(r * torch.cos(self.phase), r * torch.sin(self.phase))

    def _input(self, x: Tensor) -> Tensor:
        return torch.complex(x * self.gain_re, x * self.gain_im)

    def step(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, dim] real, h [B, dim] complex -> (y [B, dim], h' [B, dim])."""
        h = self._lam() * h + self._input(x)
        return self.out(h.real), h

    def forward(self, x: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, T, dim] real, h0 [B, dim] complex -> (y [B, T, dim], h [B, T, dim])."""
        steps = x.shape[1]
        t = torch.arange(steps, device=x.device)
        lag = t[:, None] - t[None, :]  # [T, T], t - k
        causal = lag >= 0
        # lam^n = exp(n*log r) * e^(i n theta); log r via logsigmoid stays finite for any logit.
        log_r = F.logsigmoid(self.radius_logit)
        n = lag.clamp(min=0).to(x.dtype)[..., None]  # [T, T, 1]
        mag = torch.exp(n * log_r) * causal[..., None].to(x.dtype)
        ang = n * self.phase
        d_re, d_im = mag * torch.cos(ang), mag * torch.sin(ang)  # [T, T, dim]
        u_re, u_im = x * self.gain_re, x * self.gain_im  # [B, T, dim]
        # Complex products in real arithmetic, as broadcast multiply-and-sum:
        # complex einsum/bmm on the CPU falls back to a slow per-matrix loop
        # (about 10x slower here), and B*T*T*dim stays small for training chunks.
        u_re, u_im = u_re[:, None], u_im[:, None]  # [B, 1, T(k), dim]
        h = torch.complex((d_re * u_re - d_im * u_im).sum(2), (d_re * u_im + d_im * u_re).sum(2))
        # The initial state decays as lam^(t+1).
        n0 = (t + 1).to(x.dtype)[:, None]  # [T, 1]
        mag0 = torch.exp(n0 * log_r)
        ang0 = n0 * self.phase
        carry = torch.complex(mag0 * torch.cos(ang0), mag0 * torch.sin(ang0))  # [T, dim]
        h = h + carry[None] * h0[:, None, :]
        return self.out(h.real), h


class SConvBlock(nn.Module):
    """Pre-norm residual block: SConv mixing over time, then a feed-forward network."""

    def __init__(self, dim: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.sconv = SConvLayer(dim)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, dim))

    def step(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        y, h = self.sconv.step(self.norm1(x), h)
        x = x + self.drop(y)
        return x + self.ffn(self.norm2(x)), h

    def forward(self, x: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
        y, h = self.sconv(self.norm1(x), h0)
        x = x + self.drop(y)
        return x + self.ffn(self.norm2(x)), h


class ForwardDynamics(nn.Module):
    """Predicts the mean of z_{t+1} from z_t, the action a_t and the hidden state."""

    def __init__(self, latent: int, cfg: DynamicsConfig,
                 action_choices: tuple[int, ...] = ACTION_CHOICES) -> None:
        super().__init__()
        self.latent = latent
        self.depth = cfg.depth
        self.dim = cfg.dim
        self.action_choices = tuple(action_choices)
        self.action_embeddings = nn.ModuleList(
            nn.Embedding(n, cfg.action_embedding) for n in self.action_choices)
        self.input = nn.Linear(latent + cfg.action_embedding * len(self.action_choices), cfg.dim)
        self.blocks = nn.ModuleList(
            SConvBlock(cfg.dim, cfg.ffn, cfg.dropout) for _ in range(cfg.depth))
        self.output = nn.Linear(cfg.dim, latent)

    def initial_hidden(self, batch: int = 1, device: torch.device | str | None = None) -> Tensor:
        """Zero state, complex64 [batch, depth, dim]."""
        if device is None:
            device = self.output.weight.device
        return torch.zeros(batch, self.depth, self.dim, dtype=HIDDEN_DTYPE, device=device)

    def _embed(self, z: Tensor, action: Tensor) -> Tensor:
        emb = [table(action[..., i]) for i, table in enumerate(self.action_embeddings)]
        return self.input(torch.cat([z, *emb], dim=-1))

    def step(self, z: Tensor, hidden: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        """Recurrent form: z [B,L], hidden [B,depth,dim], action [B,5] -> (pred [B,L], hidden')."""
        x = self._embed(z, action)
        states = []
        for i, block in enumerate(self.blocks):
            x, h = block.step(x, hidden[:, i])
            states.append(h)
        return self.output(x), torch.stack(states, dim=1)

    def forward(self, z: Tensor, hidden: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        """Parallel form: z [B,T,L], hidden [B,depth,dim], action [B,T,5] -> (pred [B,T,L], [B,T,depth,dim]).

        hiddens[:, t] is the state after consuming step t, so hiddens[:, -1]
        equals the state T calls of `step` return.
        """
        x = self._embed(z, action)
        states = []
        for i, block in enumerate(self.blocks):
            x, h = block(x, hidden[:, i])
            states.append(h)
        return self.output(x), torch.stack(states, dim=2)

    @staticmethod
    def distribution(pred_mean: Tensor) -> Normal:
        """The prediction as a Gaussian with the fixed std 1/sqrt(2*pi)."""
        return Normal(pred_mean, torch.full_like(pred_mean, PREDICTION_STD))
