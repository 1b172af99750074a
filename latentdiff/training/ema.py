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


CHUNK_BYTES = 64 * 2**20  # the most average bytes that one multi-tensor update (and its temporary copies) covers


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
        foreach (`bool`, *optional*, defaults to `True`): Update the tensors with multi-tensor operations, each over
            up to 64 MB of them (a few kernel launches on a GPU instead of one per parameter, 686 for SD-1.5); the
            same numbers either way. Parameters of another dtype or device than the fp32 average are converted one
            such chunk at a time, so their fp32 copies (3.4 GB for bf16 SD-1.5 weights) never exist all at once.
        offload (`bool`, *optional*, defaults to `False`): Keep the average in host memory (pinned when there is a
            GPU) and bring it to the model's device only to update it: frees its fp32 copy of the weights (3.4 GB
            for SD-1.5) from the GPU at the cost of two transfers per step.
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
        foreach: bool = True,
        offload: bool = False,
    ):
        self.decay = decay
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.use_warmup = use_warmup
        self.inv_gamma = inv_gamma
        self.power = power
        self.foreach = foreach
        self.offload = offload
        self.optimization_step = 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}
        if offload:
            self.shadow = {name: _host_copy(t) for name, t in self.shadow.items()}

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
        pairs = [(self.shadow[name], p.detach()) for name, p in model.named_parameters() if name in self.shadow]
        for chunk in _chunks(pairs, CHUNK_BYTES if self.foreach else 0):
            shadows = [shadow for shadow, _ in chunk]
            work = [s.to(p.device, copy=True, non_blocking=True) for s, p in chunk] if self.offload else shadows
            targets = [param.to(w.device, w.dtype) for w, (_, param) in zip(work, chunk)]  # no copy when they match
            torch._foreach_lerp_(work, targets, weight)  # θ_ema + (1 − d)(θ − θ_ema), for the chunk's tensors at once
            if self.offload:
                for shadow, average in zip(shadows, work):
                    shadow.copy_(average)  # blocking: the host copy is complete when step() returns

    def to(self, device: torch.device | str) -> "EMAModel":
        """Move the average to `device`; an offloaded average stays in host memory."""
        if not self.offload:
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

    SETTINGS = ("decay", "min_decay", "update_after_step", "use_warmup", "inv_gamma", "power")

    def settings(self) -> dict:
        """The constructor's averaging settings (what a checkpoint records beside the average)."""
        return {k: getattr(self, k) for k in self.SETTINGS}

    def state_dict(self) -> dict:
        """Settings, step count and averaged tensors (by parameter name)."""
        return {**self.settings(), "optimization_step": self.optimization_step, "shadow": dict(self.shadow)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore `state_dict()`; the parameter names must be those of this EMA's model."""
        missing = set(self.shadow) - set(state_dict["shadow"])
        unexpected = set(state_dict["shadow"]) - set(self.shadow)
        if missing or unexpected:
            raise ValueError(
                f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}."
            )
        wrong = [name for name, t in self.shadow.items() if state_dict["shadow"][name].shape != t.shape]
        if wrong:
            raise ValueError(f"EMA state does not match the model: other shapes for {wrong[:5]}.")
        for key in (*self.SETTINGS, "optimization_step"):
            setattr(self, key, state_dict[key])
        with torch.no_grad():
            for name, t in self.shadow.items():
                t.copy_(state_dict["shadow"][name])  # in place: keeps the device, dtype and pinned memory


def _chunks(pairs: list[tuple[torch.Tensor, torch.Tensor]], max_bytes: int) -> Iterator[list]:
    """`pairs` (average, parameter) in consecutive runs whose averages hold at most `max_bytes` (at least one pair)."""
    chunk, size = [], 0
    for pair in pairs:
        nbytes = pair[0].numel() * pair[0].element_size()
        if chunk and size + nbytes > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append(pair)
        size += nbytes
    if chunk:
        yield chunk


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in host memory, pinned when a GPU is there so that transfers can overlap other work."""
    host = tensor.detach().to("cpu", copy=True)
    return host.pin_memory() if torch.cuda.is_available() else host
