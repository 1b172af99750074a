"""The denoising network and its parts."""

from .unet import UNet2DConditionModel

__all__ = ["UNet2DConditionModel"]
