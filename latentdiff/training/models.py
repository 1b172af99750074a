"""What the loop trains and with what: the base model's parts, an optional fresh UNet, checks, the optimizer."""

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.utils import logging as diffusers_logging
from huggingface_hub import utils as hf_hub_utils
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from ..acceleration import compile_unet
from ..components import load_components, vae_scale_factor
from ..model_folder import resolve_model_folder
from ..models import UNet2DConditionModel
from .config import TrainConfig
from .ema import EMAModel
from .lora import add_lora_adapters


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


def lr_scale(config: TrainConfig, num_processes: int) -> int:
    """What `--scale_lr` multiplies `--learning_rate` by: the global batch (1 without it)."""
    return config.gradient_accumulation_steps * config.train_batch_size * num_processes if config.scale_lr else 1


def build_optimizer(
    config: TrainConfig, params: Iterable[torch.nn.Parameter], num_processes: int
) -> torch.optim.Optimizer:
    """AdamW (8-bit with `--use_8bit_adam`), the learning rate scaled by the global batch with `--scale_lr`.

    torch's AdamW is the fused one: one kernel for all parameters instead of a loop over them (SD's 686 tensors on
    a GPU; for the demo's UNet on a CPU 3.4 ms a step instead of 15.9).
    """
    learning_rate = config.learning_rate * lr_scale(config, num_processes)
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


@dataclass
class TrainingModels:
    """A run's models, loaded and set up for training (not yet through `accelerator.prepare`)."""

    folder: Path  # the base model's local folder: the final save reloads fp32 parts and the scheduler from it
    vae: AutoencoderKL  # frozen, in the weight dtype
    text_encoder: PreTrainedModel  # frozen in the weight dtype, or trained (fp32) with --train_text_encoder
    tokenizer: PreTrainedTokenizerBase
    unet: UNet2DConditionModel  # fp32, or frozen in the weight dtype with fp32 LoRA adapters
    noise_scheduler: DDPMScheduler  # the training noise schedule
    weight_dtype: torch.dtype
    lora: bool
    ema: EMAModel | None


@contextlib.contextmanager
def _progress_bars_off() -> Iterator[None]:
    """Inside: no download or weight-loading bars from huggingface_hub, transformers and diffusers (the other
    processes' copies of the main one's)."""
    hub_was_on = not hf_hub_utils.are_progress_bars_disabled()
    libraries_on = [lib for lib in (transformers_logging, diffusers_logging) if lib.is_progress_bar_enabled()]
    hf_hub_utils.disable_progress_bars()
    for library in libraries_on:
        library.disable_progress_bar()
    try:
        yield
    finally:
        if hub_was_on:
            hf_hub_utils.enable_progress_bars()
        for library in libraries_on:
            library.enable_progress_bar()


def load_training_models(config: TrainConfig, accelerator: Accelerator) -> TrainingModels:
    """Load the base model's parts in fp32 (whatever dtype the folder stores: fp16-only checkpoints are common), then
    freeze, adapt and wrap them as the options say."""
    quiet = contextlib.nullcontext() if accelerator.is_local_main_process else _progress_bars_off()
    with accelerator.main_process_first(), quiet:  # one download per machine, one set of progress bars
        folder = resolve_model_folder(
            config.pretrained_model_name_or_path, revision=config.revision, variant=config.variant,
            cache_dir=config.cache_dir, allow_pickle=config.allow_pickle,
        )  # fmt: skip
        parts = load_components(folder, variant=config.variant, torch_dtype=torch.float32, allow_pickle=config.allow_pickle)
    vae, text_encoder = parts.vae, parts.text_encoder
    noise_scheduler = noise_scheduler_for(parts.scheduler, config)
    unet = parts.unet if config.unet_config is None else unet_from_config(config.unet_config, vae, text_encoder)
    check_resolution(config.resolution, vae, unet)
    weight_dtype = weight_dtype_for(accelerator.mixed_precision)
    freeze(vae, accelerator.device, weight_dtype)
    lora = config.lora_rank is not None
    if lora or not config.train_text_encoder:
        freeze(text_encoder, accelerator.device, weight_dtype)
    if lora:  # the base weights stay frozen (in the weight dtype); only the fp32 adapters train
        freeze(unet, accelerator.device, weight_dtype)
        add_lora_adapters(
            unet, text_encoder if config.train_text_encoder else None, config.lora_rank, config.lora_alpha,
            config.lora_dropout, config.lora_target_modules,
        )  # fmt: skip
    if config.train_text_encoder:
        text_encoder.train()
    unet.train()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    if config.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if config.compile:
        compile_unet(unet)  # in place: same module, parameters and state-dict keys for Accelerate and the hooks
    ema = None
    if config.use_ema:
        ema = EMAModel(
            unet, decay=config.ema_decay, min_decay=config.ema_min_decay, update_after_step=config.ema_update_after_step,
            use_warmup=config.ema_use_warmup, inv_gamma=config.ema_inv_gamma, power=config.ema_power,
            foreach=config.foreach_ema, offload=config.offload_ema,
        ).to(accelerator.device)  # fmt: skip
    return TrainingModels(folder, vae, text_encoder, parts.tokenizer, unet, noise_scheduler, weight_dtype, lora, ema)
