"""Exponential moving average of the UNet's weights: θ_ema ← d·θ_ema + (1 − d)·θ after every optimizer step.

The averaged weights sample better than the raw ones, so they are what validation shows and what the final
pipeline saves. The decay warms up as in diffusers' `EMAModel`, so early steps (when θ moves fast) are not
averaged with a stale start:
    step = optimization_step − update_after_step − 1,  d = 0 while step ≤ 0,
    d = (1 + step) / (10 + step)                        (default), or
    d = 1 − (1 + step / inv_gamma) ^ −power             (use_warmup, Karras et al.),
    then clamped to [min_decay, decay].
"""

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EMAModel:
    r"""An EMA copy of a model's trainable parameters, kept in fp32 beside the model.

    Args:
        model (`nn.Module`): The (unwrapped) model whose trainable parameters are averaged; named as in its
            `state_dict`, so the average can be saved and loaded as UNet weights.
        decay (`float`, *optional*, defaults to 0.9999): Upper bound of the decay.
        min_decay (`float`, *optional*, defaults to 0.0): Lower bound of the decay.
        update_after_step (`int`, *optional*, defaults to 0): The EMA copies the weights until this many steps.
        use_warmup (`bool`, *optional*, defaults to `False`): Use the inverse-gamma warm-up instead of (1+s)/(10+s).
        inv_gamma (`float`, *optional*, defaults to 1.0), power (`float`, *optional*, defaults to 2/3): Warm-up shape.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_warmup: bool = False,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
    ):
        self.decay = decay
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.use_warmup = use_warmup
        self.inv_gamma = inv_gamma
        self.power = power
        self.optimization_step = 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}

    def get_decay(self, optimization_step: int) -> float:
        """The decay used at this (1-based) optimizer step; see the module docstring."""
        step = max(0, optimization_step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_warmup:
            value = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            value = (1 + step) / (10 + step)
        return max(min(value, self.decay), self.min_decay)

    @torch.no_grad()
    def step(self, model: nn.Module) -> None:
        """Move the average toward `model`'s current weights; call once after each optimizer step."""
        self.optimization_step += 1
        weight = 1.0 - self.get_decay(self.optimization_step)
        for name, param in model.named_parameters():
            if name in self.shadow:
                shadow = self.shadow[name]
                shadow.lerp_(param.detach().to(shadow.device, shadow.dtype), weight)  # θ_ema + (1 − d)(θ − θ_ema)

    def to(self, device: torch.device | str) -> "EMAModel":
        self.shadow = {name: t.to(device) for name, t in self.shadow.items()}
        return self

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite `model`'s averaged parameters with the average (for saving or sampling)."""
        for name, param in model.named_parameters():
            if name in self.shadow:
                param.copy_(self.shadow[name].to(param.device, param.dtype))

    @contextlib.contextmanager
    def averaged(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block `model` holds the average; afterwards its own weights, bit for bit, come back."""
        backup = {name: p.detach().clone() for name, p in model.named_parameters() if name in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name in backup:
                        param.copy_(backup[name])

    def state_dict(self) -> dict:
        """Settings, step count and averaged tensors (by parameter name)."""
        settings = {
            k: getattr(self, k) for k in ("decay", "min_decay", "update_after_step", "use_warmup", "inv_gamma", "power")
        }
        return {**settings, "optimization_step": self.optimization_step, "shadow": dict(self.shadow)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore `state_dict()`; the parameter names must be those of this EMA's model."""
        missing = set(self.shadow) - set(state_dict["shadow"])
        unexpected = set(state_dict["shadow"]) - set(self.shadow)
        if missing or unexpected:
            raise ValueError(
                f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}."
            )
        for key in ("decay", "min_decay", "update_after_step", "use_warmup", "inv_gamma", "power", "optimization_step"):
            setattr(self, key, state_dict[key])
        self.shadow = {
            name: state_dict["shadow"][name].to(t.device, t.dtype).clone() for name, t in self.shadow.items()
        }
