"""latentdiff: latent text-to-image diffusion on the Hugging Face stack."""

from .models import UNet2DConditionModel

__version__ = "0.1.0"

__all__ = ["UNet2DConditionModel", "__version__"]
