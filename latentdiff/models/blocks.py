"""The UNet's building blocks, one implementation each, with diffusers' module names so state dicts match.

Shapes: images are ``(B, C, H, W)``; token sequences ``(B, N, D)``; the time embedding ``(B, T)``.
"""

from dataclasses import dataclass
from typing import Callable

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

    ``only_cross_attention`` makes the first attention attend to the text as well (some SD-2 variants).
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


class CheckpointedStage(nn.Module):
    """Base for the down/mid/up blocks: runs sub-modules through activation checkpointing when enabled.

    diffusers' ``ModelMixin.enable_gradient_checkpointing`` finds every module with a ``gradient_checkpointing``
    attribute and hands it ``_gradient_checkpointing_func``; we recompute each ResNet and each transformer.
    """

    def __init__(self):
        super().__init__()
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func: Callable | None = None

    def run(self, module: nn.Module, *args: torch.Tensor | None) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(module, *args)
        return module(*args)


@dataclass(frozen=True)
class AttentionSpec:
    """What a stage's transformers need; ``None`` in its place means a block without attention."""

    heads: int
    context_dim: int
    num_layers: int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast: bool = False

    def build_many(self, n: int, channels: int, groups: int) -> nn.ModuleList:
        """A stage's `n` transformers (one after each of its ResNets)."""
        return nn.ModuleList(self.build(channels, groups) for _ in range(n))

    def build(self, channels: int, groups: int) -> Transformer2DModel:
        return Transformer2DModel(
            channels,
            self.heads,
            self.context_dim,
            self.num_layers,
            groups,
            self.use_linear_projection,
            self.only_cross_attention,
            self.upcast,
        )


@dataclass(frozen=True)
class ResnetSpec:
    """The settings shared by every ResNet of the UNet."""

    temb_channels: int
    groups: int
    eps: float
    act_fn: str
    dropout: float
    time_scale_shift: str

    def build(self, in_channels: int, out_channels: int, output_scale_factor: float = 1.0) -> ResnetBlock2D:
        return ResnetBlock2D(
            in_channels,
            out_channels,
            self.temb_channels,
            self.groups,
            self.eps,
            self.act_fn,
            self.dropout,
            self.time_scale_shift,
            output_scale_factor,
        )


class DownBlock2D(CheckpointedStage):
    """``num_layers`` × (ResNet [→ transformer]), then an optional stride-2 downsampler.

    With ``attention`` this is diffusers' ``CrossAttnDownBlock2D``, without it ``DownBlock2D``. Every layer's
    output (and the downsampler's) is kept as a skip for the up path.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        resnet: ResnetSpec,
        attention: AttentionSpec | None,
        add_downsample: bool,
        downsample_padding: int = 1,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            resnet.build(in_channels if i == 0 else out_channels, out_channels) for i in range(num_layers)
        )
        self.has_attention = attention is not None
        if self.has_attention:  # no attribute without: diffusers finds cross-attention blocks by hasattr (LoRA scales)
            self.attentions = attention.build_many(num_layers, out_channels, resnet.groups)
        if add_downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, downsample_padding)])
        else:
            self.downsamplers = None

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        context: torch.Tensor,
        self_bias: torch.Tensor | None = None,
        cross_bias: torch.Tensor | None = None,
        adapter_residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``adapter_residual`` (a T2I-Adapter's feature for this block) is added where diffusers adds it: with
        attention, to the last layer's output before the downsampler; without, to the block's output. Either way
        the skip that holds that tensor gets it too."""
        skips = ()
        for i, resnet in enumerate(self.resnets):
            x = self.run(resnet, x, temb)
            if self.has_attention:
                x = self.run(self.attentions[i], x, context, self_bias, cross_bias)
                if adapter_residual is not None and i == len(self.resnets) - 1:
                    x = x + adapter_residual
            skips += (x,)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips += (x,)
        if adapter_residual is not None and not self.has_attention:
            x = x + adapter_residual
            skips = skips[:-1] + (x,)
        return x, skips


def freeu(
    hidden: torch.Tensor, skip: torch.Tensor, backbone_scale: float, skip_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FreeU's two changes before an up-path concatenation (Si et al. 2023, arXiv:2309.11497): the first half of the
    backbone channels times `backbone_scale`; the skip's four lowest spatial frequencies (the 2×2 around the
    centred zero frequency) times `skip_scale`, in float32 (no bf16 FFT; fp16's is unstable)."""
    half = hidden.shape[1] // 2
    hidden = torch.cat([hidden[:, :half] * backbone_scale, hidden[:, half:]], dim=1)
    height, width = skip.shape[-2:]
    spectrum = torch.fft.fftshift(torch.fft.fft2(skip.float()), dim=(-2, -1))
    mask = torch.ones(height, width, device=skip.device)
    mask[height // 2 - 1 : height // 2 + 1, width // 2 - 1 : width // 2 + 1] = skip_scale
    filtered = torch.fft.ifft2(torch.fft.ifftshift(spectrum * mask, dim=(-2, -1))).real
    return hidden, filtered.to(skip.dtype)


class UpBlock2D(CheckpointedStage):
    """``num_layers`` × (concat a skip → ResNet [→ transformer]), then an optional ×2 upsampler.

    With ``attention`` this is diffusers' ``CrossAttnUpBlock2D``. The skips are consumed last-in first-out.
    """

    def __init__(
        self,
        in_channels: int,
        prev_output_channels: int,
        out_channels: int,
        num_layers: int,
        resnet: ResnetSpec,
        attention: AttentionSpec | None,
        add_upsample: bool,
    ):
        super().__init__()
        resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            input_channels = prev_output_channels if i == 0 else out_channels
            resnets.append(resnet.build(input_channels + skip_channels, out_channels))
        self.resnets = nn.ModuleList(resnets)
        self.has_attention = attention is not None
        if self.has_attention:  # no attribute without: diffusers finds cross-attention blocks by hasattr (LoRA scales)
            self.attentions = attention.build_many(num_layers, out_channels, resnet.groups)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None
        self.freeu: tuple[float, float] | None = None  # (backbone, skip) scales: `UNet2DConditionModel.enable_freeu`

    def forward(
        self,
        x: torch.Tensor,
        skips: tuple[torch.Tensor, ...],
        temb: torch.Tensor,
        context: torch.Tensor,
        self_bias: torch.Tensor | None = None,
        cross_bias: torch.Tensor | None = None,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            skip = skips[-1 - i]
            if self.freeu is not None:
                x, skip = freeu(x, skip, *self.freeu)
            x = torch.cat([x, skip], dim=1)
            x = self.run(resnet, x, temb)
            if self.has_attention:
                x = self.run(self.attentions[i], x, context, self_bias, cross_bias)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(CheckpointedStage):
    """ResNet → (transformer → ResNet) × ``num_layers`` at the lowest resolution."""

    def __init__(
        self,
        channels: int,
        resnet: ResnetSpec,
        attention: AttentionSpec,
        output_scale_factor: float = 1.0,
        num_layers: int = 1,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            resnet.build(channels, channels, output_scale_factor) for _ in range(num_layers + 1)
        )
        self.attentions = attention.build_many(num_layers, channels, resnet.groups)

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        context: torch.Tensor,
        self_bias: torch.Tensor | None = None,
        cross_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.run(self.resnets[0], x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = self.run(attn, x, context, self_bias, cross_bias)
            x = self.run(resnet, x, temb)
        return x
