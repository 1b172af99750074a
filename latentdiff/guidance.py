"""Classifier-free guidance as small pure functions (Ho & Salimans 2022; Lin et al. 2024 for the rescale)."""

import torch


def classifier_free_guidance(noise_uncond: torch.Tensor, noise_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """ε = ε_u + s (ε_c − ε_u): s = 1 is the conditional model, s > 1 pushes away from the unconditional one."""
    return noise_uncond + scale * (noise_cond - noise_uncond)


def rescale_guidance(noise_guided: torch.Tensor, noise_cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Pull the guided prediction's per-sample std back to the conditional one's, mixed by `rescale` ∈ [0, 1].

    Large guidance scales inflate the std of ε and over-expose images; this is eq. (15)-(16) of "Common
    Diffusion Noise Schedules and Sample Steps are Flawed" (Lin et al. 2024, sec. 3.4).
    """
    dims = list(range(1, noise_cond.ndim))
    rescaled = noise_guided * (noise_cond.std(dim=dims, keepdim=True) / noise_guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * noise_guided
