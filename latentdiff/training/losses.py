"""The denoising objective of latent diffusion (Ho et al. 2020; Rombach et al. 2022, eq. 2), one function per idea.

For clean latents x₀, Gaussian noise ε and t ~ U{0, …, T−1}, the scheduler's forward process gives
    x_t = √ᾱ_t · x₀ + √(1 − ᾱ_t) · ε,
and the UNet learns to predict ε ("epsilon") or v = √ᾱ_t · ε − √(1 − ᾱ_t) · x₀ ("v_prediction",
Salimans & Ho 2022) from (x_t, t, text). All random draws come from the `generator` passed in, so a step's
noise depends only on how that generator was seeded, never on the global RNG.
"""

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn


def snr(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio SNR(t) = ᾱ_t / (1 − ᾱ_t), one per timestep `(B,)`."""
    alphas_cumprod = _alphas_cumprod_at(noise_scheduler, timesteps).float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def _alphas_cumprod_at(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """ᾱ_t for each of `timesteps` `(B,)`; the scheduler keeps its table on the CPU."""
    return noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps]


def min_snr_weights(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, eq. 10, for ε/v targets): min(SNR, γ) / SNR or / (SNR + 1)."""
    ratio = snr(noise_scheduler, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (ratio + 1.0)  # the v target's MSE is (SNR + 1) × the x₀ MSE
    return clipped / ratio  # the ε target's MSE is SNR × the x₀ MSE


def training_target(
    noise_scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should output: ε, or v = √ᾱ_t ε − √(1−ᾱ_t) x₀, as the scheduler's `prediction_type` says."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"Cannot train prediction_type {prediction_type!r}: use 'epsilon' or 'v_prediction'.")


def dream_rectify(
    unet: nn.Module,
    noise_scheduler: DDPMScheduler,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    noise: torch.Tensor,
    target: torch.Tensor,
    detail_preservation: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DREAM (Zhou et al. 2024, Alg. 1): move x_t and the ε target by the model's own error, so that training sees
    the inputs sampling will give it. With ε̂ = ε_θ(x_t, t) (no gradient) and λ = (√(1−ᾱ_t))^p,
        Δ = λ (ε − ε̂),   x̃_t = x_t + √(1−ᾱ_t) Δ,   target ε + Δ.
    Defined for ε-prediction only (the caller checks)."""
    sigma = (1.0 - _alphas_cumprod_at(noise_scheduler, timesteps)) ** 0.5  # √(1−ᾱ_t), (B,)
    sigma = sigma[:, None, None, None]
    with torch.no_grad():
        estimate = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    delta = sigma**detail_preservation * (noise - estimate)
    return noisy_latents + sigma * delta, target + delta


def diffusion_loss(
    unet: nn.Module,
    noise_scheduler: DDPMScheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    generator: torch.Generator,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    input_perturbation: float = 0.0,
    dream_detail_preservation: float | None = None,
) -> torch.Tensor:
    r"""The mean denoising loss of one batch of clean latents.

    Args:
        unet (`nn.Module`): The (possibly wrapped) UNet being trained.
        noise_scheduler (`DDPMScheduler`): Forward process (`add_noise`, ᾱ_t) and `prediction_type`.
        latents (`torch.Tensor`): Clean latents x₀ `(B, C, h, w)`, already × the VAE's scaling factor.
        encoder_hidden_states (`torch.Tensor`): Text conditioning `(B, 77, D)`.
        generator (`torch.Generator`): Source of ε, the timesteps and the optional extra noises.
        snr_gamma (`float`, *optional*): Min-SNR-γ weighting; plain MSE when `None`.
        noise_offset (`float`, defaults to 0): Adds `noise_offset · N(0, 1)` per (image, channel) to ε, which lets
            the model change an image's mean brightness (offset noise).
        input_perturbation (`float`, defaults to 0): Noises x₀ with ε + `input_perturbation` · ξ but keeps ε as the
            target (Ning et al. 2023), reducing the train/sample exposure bias.
        dream_detail_preservation (`float`, *optional*): Train with DREAM (`dream_rectify`) and this p; off when
            `None`.
    """
    batch, channels = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)  # ε
    if noise_offset:
        # drawn in float32 and added into ε's dtype, as diffusers' script: the same ε bit for bit under fp16/bf16
        noise += noise_offset * torch.randn((batch, channels, 1, 1), generator=generator, device=latents.device)
    model_noise = noise
    if input_perturbation:
        xi = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        model_noise = noise + input_perturbation * xi
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator, device=latents.device
    )
    noisy_latents = noise_scheduler.add_noise(latents, model_noise, timesteps)  # x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε
    target = training_target(noise_scheduler, latents, noise, timesteps)
    if dream_detail_preservation is not None:
        noisy_latents, target = dream_rectify(
            unet, noise_scheduler, noisy_latents, timesteps, encoder_hidden_states, noise, target,
            dream_detail_preservation,
        )  # fmt: skip
    prediction = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]

    if snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float())
    per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    return (per_example * min_snr_weights(noise_scheduler, timesteps, snr_gamma)).mean()
