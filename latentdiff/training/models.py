"""What the loop trains and with what: the base model's parts, an optional fresh UNet, checks, the optimizer."""

from collections.abc import Iterable

import torch
from diffusers import AutoencoderKL, DDPMScheduler
from transformers import PreTrainedModel

from ..components import vae_scale_factor
from ..models import UNet2DConditionModel
from .config import TrainConfig


def noise_scheduler_for(scheduler: DDPMScheduler, config: TrainConfig) -> DDPMScheduler:
    """The training forward process: the base's schedule, with `--prediction_type`/`--beta_schedule` applied."""
    overrides = {"prediction_type": config.prediction_type, "beta_schedule": config.beta_schedule}
    noise_scheduler = DDPMScheduler.from_config(
        scheduler.config, **{k: v for k, v in overrides.items() if v is not None}
    )
    prediction_type = noise_scheduler.config.prediction_type
    if config.dream_training and prediction_type != "epsilon":
        raise ValueError(
            f"--dream_training is defined for epsilon prediction; this run predicts {prediction_type!r}. Leave out "
            "--dream_training, or train epsilon with --prediction_type epsilon."
        )
    return noise_scheduler


def unet_from_config(path: str, vae: AutoencoderKL, text_encoder: PreTrainedModel) -> UNet2DConditionModel:
    """A randomly initialised UNet from a config.json (or its folder), checked against the VAE and text encoder."""
    try:
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(path))
    except ValueError as error:
        raise ValueError(f"--unet_config {path}: {error}") from error
    latent_channels = vae.config.latent_channels
    if unet.config.in_channels != latent_channels or unet.config.out_channels != latent_channels:
        raise ValueError(
            f"--unet_config {path}: in_channels/out_channels are {unet.config.in_channels}/"
            f"{unet.config.out_channels}, but the VAE's latents have {latent_channels} channels."
        )
    cross = unet.config.cross_attention_dim
    width = text_encoder.config.hidden_size
    if any(dim != width for dim in (cross if isinstance(cross, (list, tuple)) else [cross])):
        raise ValueError(f"--unet_config {path}: cross_attention_dim is {cross}, the text encoder's width is {width}.")
    return unet


def check_resolution(resolution: int, vae: AutoencoderKL, unet: UNet2DConditionModel) -> None:
    """Images must shrink exactly through the VAE (2^(levels−1)) and then the UNet's downsamplers."""
    vae_factor = vae_scale_factor(vae)
    unet_factor = 2 ** (len(unet.config.block_out_channels) - 1)
    factor = vae_factor * unet_factor
    if resolution % factor:
        raise ValueError(
            f"--resolution {resolution} must be a multiple of {factor} (VAE factor {vae_factor} × UNet factor "
            f"{unet_factor}); for example {max(factor, resolution // factor * factor)} or "
            f"{(resolution // factor + 1) * factor}."
        )


def freeze(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """No gradients, on `device`, in `dtype` (cast only when it is not fp32: diffusers warns on any cast)."""
    module.requires_grad_(False).to(device)
    return module.to(dtype=dtype) if dtype != torch.float32 else module


def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen parts: half precision when training in mixed precision, else fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def build_optimizer(
    config: TrainConfig, params: Iterable[torch.nn.Parameter], num_processes: int
) -> torch.optim.Optimizer:
    """AdamW (8-bit with `--use_8bit_adam`), the learning rate scaled by the global batch with `--scale_lr`.

    torch's AdamW is the fused one: one kernel for all parameters instead of a loop over them (SD's 686 tensors on
    a GPU; for the demo's UNet on a CPU 3.4 ms a step instead of 15.9).
    """
    learning_rate = config.learning_rate
    if config.scale_lr:
        learning_rate *= config.gradient_accumulation_steps * config.train_batch_size * num_processes
    optimizer_class, options = torch.optim.AdamW, {"fused": True}
    if config.use_8bit_adam:
        try:
            import bitsandbytes
        except ImportError:  # a ModuleNotFoundError whatever the cause: the CLI's one-line error for a missing extra
            raise ModuleNotFoundError(
                "--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (CUDA only)."
            ) from None
        optimizer_class, options = bitsandbytes.optim.AdamW8bit, {}
    return optimizer_class(
        params,
        lr=learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
        **options,
    )
