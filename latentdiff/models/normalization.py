"""GroupNorm and LayerNorm that stay in autocast's low-precision dtype instead of being upcast to float32.

CUDA autocast puts `group_norm` and `layer_norm` on its float32 list. In a UNet trained under bf16 autocast
that costs three full-size passes per norm: a float32 copy of the bf16 input (kept for backward), a float32
output, and a float32 SiLU (or a bf16 cast per projection: Q, K and V each cast the same float32 LayerNorm
output again) before the next convolution casts back to bf16. The norm kernels already accumulate their
statistics in float32 for bf16/fp16 inputs, so running them on the low-precision input loses only the
rounding of the output, which the next matrix product applies anyway. These subclasses do that when their
input is already in the autocast dtype; otherwise (no autocast, a float32 input) they are `nn.GroupNorm` and
`nn.LayerNorm` exactly. Parameters and state-dict keys are unchanged, and `isinstance` checks still hold.

`set_norm_upcast(model, True)` restores autocast's float32 norms: the numerics of diffusers' UNet.
"""

import torch
import torch.nn.functional as F
from torch import nn


_LOW_PRECISION = (torch.bfloat16, torch.float16)
# The device types that have an autocast, asked once here: torch.compile cannot trace
# `torch.amp.is_autocast_available` in torch 2.6-2.11 (a graph break per norm, an error under fullgraph=True),
# while a lookup in a frozenset traces. ("meta" has none: `torch.is_autocast_enabled("meta")` raises.)
_AUTOCAST_DEVICES = frozenset(
    device for device in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "maia", "xla", "ipu", "privateuseone")
    if torch.amp.is_autocast_available(device)
)


class _AutocastDtypeNorm:
    """What the two norms share: when to skip the float32 upcast, and how (the subclass says which norm)."""

    upcast: bool = False  # True: leave the norm to autocast's float32 rule (per instance: `set_norm_upcast`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._low_precision_dtype(x)
        if dtype is None:
            return super().forward(x)  # torch's norm, under autocast's rules
        with torch.autocast(x.device.type, enabled=False):
            return self._normalize(x, _cast(self.weight, dtype), _cast(self.bias, dtype))

    def _low_precision_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The autocast dtype when `x` is already in it (and the upcast is not asked for), else None."""
        if self.upcast or x.dtype not in _LOW_PRECISION:  # the cheap checks first: this runs for every norm call
            return None
        device = x.device.type
        if device not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device):
            return None
        dtype = torch.get_autocast_dtype(device)
        return dtype if x.dtype == dtype else None


def _cast(parameter: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if parameter is None else parameter.to(dtype)


class GroupNorm(_AutocastDtypeNorm, nn.GroupNorm):
    def _normalize(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)


class LayerNorm(_AutocastDtypeNorm, nn.LayerNorm):
    def _normalize(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


def set_norm_upcast(model: nn.Module, upcast: bool) -> int:
    r"""Choose, for every norm of ours in `model`, between the low-precision path and autocast's float32 one.

    Args:
        model (`nn.Module`): Our UNet (or any module holding these norms).
        upcast (`bool`): `True` gives autocast's float32 norms, as diffusers' UNet has them; `False` (the
            default of every norm) keeps a bf16/fp16 input in its dtype.

    Returns:
        `int`: How many norms were set; 0 means `model` holds none of ours (e.g. a diffusers UNet).
    """
    norms = [module for module in model.modules() if isinstance(module, _AutocastDtypeNorm)]
    for norm in norms:
        norm.upcast = upcast
    return len(norms)
