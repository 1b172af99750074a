"""Train the demo base's small ``AutoencoderKL`` from scratch, because no pretrained VAE can be downloaded here.

A plain reconstruction objective: MSE between the image and the decoder's output for a latent *sampled* from
the encoder's posterior (so the decoder copes with the spread of latents the UNet will later produce), plus a
tiny KL term toward N(0, I) that keeps the latent scale bounded (weight 1e-6, as SD's autoencoder). No
perceptual or adversarial loss: at 32×32 they cost more than they give. ``scaling_factor`` is then set, as for
SD, to 1 / std of the training latents, so scaled latents have unit variance for the diffusion model.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm.auto import tqdm


@dataclass
class VAETrainConfig:
    """How the base's autoencoder is built and trained (the defaults are the committed base's)."""

    resolution: int = 32                         # image side; latents are resolution / 4
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # three blocks → two downsamplings (×4)
    layers_per_block: int = 1
    latent_channels: int = 4
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    kl_weight: float = 1e-6
    seed: int = 0


def build_vae(config: VAETrainConfig) -> AutoencoderKL:
    """A freshly initialised diffusers ``AutoencoderKL`` of the configured size."""
    blocks = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=min(32, config.block_out_channels[0]),
        sample_size=config.resolution,
    )


def train_vae(images: torch.Tensor, config: VAETrainConfig) -> AutoencoderKL:
    r"""Trains a new autoencoder on ``images`` and sets its ``scaling_factor``; returns it in eval mode.

    Args:
        images (`torch.Tensor`): `(N, 3, H, W)` in [-1, 1], with `H == W == config.resolution`.
        config (`VAETrainConfig`): sizes and optimisation settings.
    """
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (config.resolution, config.resolution):
        raise ValueError(f"images must be (N, 3, {config.resolution}, {config.resolution}), got {tuple(images.shape)}.")
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):  # seeded initial weights, without resetting the caller's global RNG
        torch.manual_seed(config.seed)
        vae = build_vae(config)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config))
    progress = tqdm(range(config.steps), desc="VAE", unit="step")
    for _ in progress:
        index = torch.randint(len(images), (config.batch_size,), generator=generator)
        batch = images[index]
        flip = torch.rand(len(batch), generator=generator) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)  # left-right flips: 2× the data
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        mse = F.mse_loss(reconstruction, batch)
        loss = mse + config.kl_weight * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(psnr=f"{_psnr_from_mse(mse.item() / 4):.1f}")  # MSE in [-1, 1] → in [0, 1]
    vae.eval()
    # unit-variance latents for the diffusion model, as SD's 0.18215 does for its VAE
    vae.register_to_config(scaling_factor=1.0 / posterior_means(vae, images).std().item())
    return vae


@torch.no_grad()
def posterior_means(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The posterior means of ``images``: their deterministic, unscaled latents."""
    return torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in images.split(batch_size)])


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> float:
    """Mean over images of 10·log10(1 / MSE) for pixels in [0, 1], through the posterior mean (dB)."""
    scores = []
    for chunk in images.split(batch_size):
        decoded = vae.decode(vae.encode(chunk).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((decoded - chunk) / 2).pow(2).flatten(1).mean(1)  # per image, pixels in [0, 1]
        scores.append(10 * torch.log10(1 / mse.clamp_min(1e-10)))
    return torch.cat(scores).mean().item()


def _lr_factor(step: int, config: VAETrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _psnr_from_mse(mse: float) -> float:
    return 10 * math.log10(1 / max(mse, 1e-10))
