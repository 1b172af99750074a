"""Load the parts of a latent text-to-image model from a local diffusers folder or a Hub id.

The folder is found and checked first (`latentdiff.model_folder`). Whatever its ``model_index.json`` says, the
UNet always loads as *our* `UNet2DConditionModel` (same config keys and weights as diffusers'). Weights load from
safetensors only unless the caller opts in to pickle files, which can run arbitrary code when unpickled.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler
from transformers import CLIPTextModel, CLIPTokenizer

from .model_folder import has_variant, resolve_model_folder
from .models import UNet2DConditionModel

logger = logging.getLogger(__name__)


@dataclass
class ModelComponents:
    """The five parts of a latent text-to-image model, as `load_components` returns them."""

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    unet: UNet2DConditionModel
    scheduler: DDPMScheduler


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """How much the VAE shrinks each side of an image: its encoder halves it at every level but the last."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def to_unet_latents(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """The VAE's latents as the UNet sees them: shifted and scaled as its config says (SD: z × 0.18215)."""
    if (shift := getattr(vae.config, "shift_factor", None)) is not None:
        z = z - shift
    return z * vae.config.scaling_factor


def from_unet_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_unet_latents`: what the VAE's decoder takes."""
    z = latents / vae.config.scaling_factor
    if (shift := getattr(vae.config, "shift_factor", None)) is not None:
        z = z + shift
    return z


def _part_variant(folder: Path, sub: str, variant: str | None) -> str | None:
    """The variant to load `sub` with. As in diffusers' pipelines, a part without weights of the variant loads its
    plain ones: SD-1.5 has `non_ema` weights for its UNet only."""
    if variant is None or has_variant(folder / sub, variant):
        return variant
    logger.info(f"{folder / sub} has no {variant!r} weights: loading its plain weights.")
    return None


def load_unet(
    folder: Path, *, variant: str | None = None, torch_dtype: torch.dtype | None = None, allow_pickle: bool = False
) -> UNet2DConditionModel:
    """Our UNet from a checked local folder's `unet/` (written by latentdiff or by diffusers); a config our UNet does
    not support (SDXL, SimpleCrossAttn, ...) raises a `ValueError` naming the file and the key."""
    try:
        return UNet2DConditionModel.from_pretrained(
            folder,
            subfolder="unet",
            variant=_part_variant(folder, "unet", variant),
            torch_dtype=torch_dtype,
            use_safetensors=None if allow_pickle else True,
        )
    except ValueError as error:
        raise ValueError(f"{Path(folder) / 'unet' / 'config.json'}: {error}") from error


def load_matching_state_dict(
    model: torch.nn.Module, state_dict: dict, mismatch: str, advice: str, assign: bool = False
) -> None:
    """`model.load_state_dict(state_dict)` where torch's error, a listing of every mismatched key, becomes one
    `ValueError`: `mismatch` (what it means here), the first difference, and `advice`."""
    try:
        model.load_state_dict(state_dict, assign=assign)
    except RuntimeError as error:
        first = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise ValueError(f"{mismatch} ({first[:150]}...): {advice}") from None


def unet_sharing_weights(unet: torch.nn.Module) -> UNet2DConditionModel:
    """Our UNet on the weight tensors of another UNet with the same config and keys (diffusers'): no copy, so both
    see later in-place changes. Adapters or other added modules must be fused and unloaded from it first."""
    with init_empty_weights():
        ours = UNet2DConditionModel.from_config(unet.config)
    load_matching_state_dict(
        ours, unet.state_dict(), f"The {type(unet).__name__}'s weights are not those of a plain UNet",
        "fuse and unload its LoRA adapters first (fuse_lora(), unload_lora_weights()), or pass unet= yourself.",
        assign=True,
    )  # fmt: skip
    return ours.to(device=unet.device, dtype=unet.dtype).train(unet.training)


def load_frozen_parts(
    folder: Path, *, variant: str | None = None, torch_dtype: torch.dtype | None = None, allow_pickle: bool = False
) -> tuple[AutoencoderKL, CLIPTextModel]:
    """The VAE and the text encoder of a checked local folder: what training keeps frozen (by default)."""
    use_safetensors = None if allow_pickle else True
    vae = AutoencoderKL.from_pretrained(
        folder, subfolder="vae", variant=_part_variant(folder, "vae", variant), torch_dtype=torch_dtype,
        use_safetensors=use_safetensors,
    )
    text_encoder = CLIPTextModel.from_pretrained(
        folder, subfolder="text_encoder", variant=_part_variant(folder, "text_encoder", variant),
        use_safetensors=use_safetensors
    )
    if torch_dtype is not None:  # set after loading: transformers renamed its dtype argument across versions
        text_encoder = text_encoder.to(torch_dtype)
    return vae, text_encoder


def load_components(
    pretrained_model_name_or_path: str | Path,
    *,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    allow_pickle: bool = False,
) -> ModelComponents:
    r"""Load VAE, text encoder, tokenizer, our UNet and the noise scheduler of a Stable Diffusion-style model.

    Args:
        pretrained_model_name_or_path (`str` or `Path`): A local diffusers pipeline folder or a Hub id.
        revision (`str`, *optional*): Hub branch, tag or commit.
        variant (`str`, *optional*): Weights variant such as `"fp16"` (`diffusion_pytorch_model.fp16.safetensors`).
        torch_dtype (`torch.dtype`, *optional*): Load the weights in this dtype (default: as saved, usually fp32).
        cache_dir (`str` or `Path`, *optional*): Hub cache folder.
        local_files_only (`bool`, *optional*, defaults to `False`): Use only the Hub cache, never the network.
        allow_pickle (`bool`, *optional*, defaults to `False`): Also load `.bin`/`.ckpt` weights. Unpickling can
            run arbitrary code: only for checkpoints you trust.

    Returns:
        `ModelComponents`. `scheduler` is the folder's scheduler config loaded as a `DDPMScheduler`, whatever class
        the folder names (PNDM, DDIM, ...): training needs the forward process (`add_noise`, betas, prediction type),
        which these share; pipelines keep the folder's own sampler.
    """
    folder = resolve_model_folder(
        pretrained_model_name_or_path,
        revision=revision,
        variant=variant,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        allow_pickle=allow_pickle,
    )
    vae, text_encoder = load_frozen_parts(folder, variant=variant, torch_dtype=torch_dtype, allow_pickle=allow_pickle)
    return ModelComponents(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        unet=load_unet(folder, variant=variant, torch_dtype=torch_dtype, allow_pickle=allow_pickle),
        scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
    )
