"""The activations a diffusers UNet config may name in ``act_fn``."""

from torch import nn

_ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}


def get_activation(name: str) -> nn.Module:
    """A fresh activation module for ``name``; a ``ValueError`` lists the names we know otherwise."""
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"Unsupported act_fn {name!r}: use one of {sorted(_ACTIVATIONS)}.") from None
