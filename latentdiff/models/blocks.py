"""The UNet's building blocks (ResNet, resamplers, spatial transformer), one implementation each, with diffusers'
module names so state dicts match; `stages.py` puts them together into the down, mid and up blocks.

Shapes: images are ``(B, C, H, W)``; token sequences ``(B, N, D)``; the time embedding ``(B, T)``.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .activations import get_activation
from .attention import Attention
from .normalization import GroupNorm, LayerNorm


class ResnetBlock2D(nn.Module):
    """Two GroupNorm→act→conv stages with the time embedding injected between them, plus a skip.

    ``time_scale_shift="default"`` adds ``W t`` to the features (DDPM); ``"scale_shift"`` is the adaptive group
    norm of Dhariwal & Nichol 2021 (sec. 3): ``h = GN(h)·(1 + s) + b`` with ``(s, b) = W t``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        groups: int,
        eps: float,
        act_fn: str = "silu",
        dropout: float = 0.0,
        time_scale_shift: str = "default",
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        self.scale_shift = time_scale_shift == "scale_shift"
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels * (2 if self.scale_shift else 1))
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.act = get_activation(act_fn)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        t = self.time_emb_proj(self.act(temb))[:, :, None, None]  # (B, C or 2C, 1, 1)
        if self.scale_shift:
            scale, shift = t.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + t)
        h = self.conv2(self.dropout(self.act(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        if self.output_scale_factor == 1.0:  # the usual case: spare a full pass over the tensor
            return skip + h
        return (skip + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3×3 conv; ``padding=0`` pads right/bottom only (the original LDM convention)."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour ×2 (or to ``size``, for odd latent sizes) followed by a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class GEGLU(nn.Module):
    """``a · GELU(b)`` with ``[a, b] = W x``: the gated feed-forward of Shazeer 2020, eq. (6)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # diffusers' layout (keys `net.0`, `net.2`); as in its UNets, the dropout is 0 whatever the config says
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text, GEGLU feed-forward; each with a residual.

    ``only_cross_attention`` makes the first attention a second cross-attention (some SD-2 variants): its keys and
    values come from the text instead of the image, so the image tokens never attend to each other.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        context_dim: int,
        only_cross_attention: bool = False,
        upcast: bool = False,
    ):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, context_dim if only_cross_attention else None, upcast)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim, upcast)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        self_bias: torch.Tensor | None = None,
        cross_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None, self_bias)
        x = x + self.attn2(self.norm2(x), context, cross_bias)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Runs transformer blocks over the ``H·W`` pixels of a feature map, as tokens; residual around it all.

    ``use_linear_projection`` selects linear ``proj_in``/``proj_out`` (SD-2.x) instead of 1×1 convs (SD-1.x):
    the same map, but the weights are stored with different shapes.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        context_dim: int,
        num_layers: int = 1,
        groups: int = 32,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast: bool = False,
    ):
        super().__init__()
        head_dim = channels // heads
        inner = heads * head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        projection = nn.Linear if use_linear_projection else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = projection(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, context_dim, only_cross_attention, upcast)
            for _ in range(num_layers)
        )
        self.proj_out = projection(inner, channels)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        self_bias: torch.Tensor | None = None,
        cross_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear_projection:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(batch, height * width, -1)  # (B, HW, C)
        if self.use_linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, self_bias, cross_bias)
        if self.use_linear_projection:
            h = self.proj_out(h)
        h = h.reshape(batch, height, width, -1).permute(0, 3, 1, 2)  # (B, C, H, W), laid out as (B, H, W, C)
        h = h.contiguous(memory_format=_layout_of(x))  # no NHWC → NCHW → NHWC round trip; the convs' layout
        if not self.use_linear_projection:
            h = self.proj_out(h)
        return h + x


def _layout_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for an NHWC feature map (a model moved with `.to(memory_format=torch.channels_last)`), else the
    default layout: the transformer's output goes back to the convolutions in the layout they run in."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
