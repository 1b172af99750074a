"""Timestep embedding: the sinusoidal features of the Transformer paper, then a two-layer MLP.

The network is told the noise level through ``t``; a sinusoid bank lets it read both coarse and fine
differences in ``t`` (sec. 3.5 of "Attention Is All You Need", used by DDPM, Ho et al. 2020, appendix B).
"""

import math

import torch
from torch import nn

from .activations import get_activation


def sinusoidal_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Map ``(B,)`` timesteps to ``(B, dim)`` features ``[sin(t ω_k), cos(t ω_k)]`` with ``ω_k = P^(-k / (half - shift))``.

    ``flip_sin_to_cos`` puts the cosines first and ``freq_shift`` shifts the frequency denominator: both exist
    because checkpoints were trained with either convention, and the weights only fit the one they saw.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    frequencies = torch.exp(exponent / (half - freq_shift))  # (half,)
    angles = timesteps[:, None].float() * frequencies[None, :]  # (B, half)
    if flip_sin_to_cos:
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    else:
        features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if dim % 2 == 1:
        features = nn.functional.pad(features, (0, 1))
    return features


class SinusoidalTimesteps(nn.Module):
    """Parameter-free module around :func:`sinusoidal_embedding` (diffusers calls it ``time_proj``)."""

    def __init__(self, dim: int, flip_sin_to_cos: bool, freq_shift: float):
        super().__init__()
        self.dim = dim
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return sinusoidal_embedding(timesteps, self.dim, self.flip_sin_to_cos, self.freq_shift)


class TimestepEmbedding(nn.Module):
    """``linear_2(act(linear_1(x)))``: lifts the sinusoid features to the width every ResNet block reads."""

    def __init__(self, in_features: int, embed_dim: int, act_fn: str = "silu"):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, embed_dim)
        self.act = get_activation(act_fn)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))
