"""Images → VAE latents for training, on the fly or from a cache built once (`--cache_latents`).

The VAE encoder outputs a diagonal Gaussian q(z|x) (mean and log-variance). Both paths keep that distribution
and draw z ~ q(z|x) with the training step's generator, so caching changes the cost, not the samples.
"""

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from tqdm.auto import tqdm

from ..components import to_unet_latents
from ..examples import ImageCaptionDataset


@torch.no_grad()
def encode_latent_dists(vae: AutoencoderKL, pixel_values: torch.Tensor) -> torch.Tensor:
    """Parameters `(B, 2C, h, w)` (mean, log-variance) of q(z|x) for images `(B, 3, H, W)` in [-1, 1].

    Made contiguous: a CPU VAE may return them channels-last, and the UNet would then run in that layout, with
    other kernels (other roundings) than from the cache, whose rows are stacked contiguous.
    """
    return vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.parameters.contiguous()


def sample_latents(vae: AutoencoderKL, latent_dists: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """z ~ q(z|x), shifted and scaled as the VAE's config says (SD: z × 0.18215), the UNet's x₀ `(B, C, h, w)`."""
    return to_unet_latents(vae, DiagonalGaussianDistribution(latent_dists).sample(generator=generator))


@torch.no_grad()
def cache_latent_dists(
    vae: AutoencoderKL, dataset: ImageCaptionDataset, batch_size: int, accelerator: Accelerator
) -> torch.Tensor:
    """Encode every row of `dataset` once; returns the `(N, 2C, h, w)` distributions on the CPU.

    Every process encodes the whole data set (it later samples its own shard of it each epoch), so this costs
    one pass of the VAE encoder, and the cache needs N × 2C × h × w values of memory (with SD's VAE, 16 MB per
    1,000 images at 256 px in fp16; 8× that, 131 MB, at 512 px in fp32).
    """
    dists = []
    for start in tqdm(
        range(0, len(dataset), batch_size), desc="Caching latents", disable=not accelerator.is_local_main_process
    ):
        rows = range(start, min(start + batch_size, len(dataset)))
        pixel_values = torch.stack([dataset.image(i) for i in rows])  # (B, 3, H, W)
        dists.append(encode_latent_dists(vae, pixel_values).cpu())
    return torch.cat(dists)
