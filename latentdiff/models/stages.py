"""The UNet's down, mid and up blocks: stages of ResNets [→ transformers] and a resampler, one implementation
each, with diffusers' module names (``resnets.N``, ``attentions.N``, ``downsamplers.0``) so state dicts match.

Shapes: images are ``(B, C, H, W)``; token sequences ``(B, N, D)``; the time embedding ``(B, T)``.
"""

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .blocks import Downsample2D, ResnetBlock2D, Transformer2DModel, Upsample2D


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
