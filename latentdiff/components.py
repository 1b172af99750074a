"""Load the parts of a latent text-to-image model from a local diffusers folder or a Hub id.

A Stable Diffusion checkpoint is a folder with ``vae/``, ``text_encoder/``, ``tokenizer/``, ``unet/`` and
``scheduler/``. Whatever the folder's ``model_index.json`` says, the UNet always loads as *our*
`UNet2DConditionModel` (same config keys and weights as diffusers'). Weights load from safetensors only unless
the caller opts in to pickle files, which can run arbitrary code when unpickled.
"""

import logging
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE as LORA_WEIGHT_NAME
from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextModel, CLIPTokenizer

from .hub import as_hub_id
from .models import UNet2DConditionModel

PIPELINE_FOLDERS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
WEIGHT_FOLDERS = ("vae", "text_encoder", "unet")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")

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


def _hub_patterns(
    variant: str | None, allow_pickle: bool, weight_folders: tuple[str, ...] = WEIGHT_FOLDERS
) -> tuple[list[str], list[str]]:
    """Files of a Hub repo that the five parts need: configs, tokenizer files, and one set of weights."""
    allow = ["model_index.json"] + [f"{sub}/*.json" for sub in PIPELINE_FOLDERS] + ["tokenizer/*.txt"]
    suffixes = ["safetensors"] + (["bin"] if allow_pickle else [])
    ignore = []
    for sub in weight_folders:
        for suffix in suffixes:
            if variant is None:  # plain weights only: skip e.g. diffusion_pytorch_model.fp16.safetensors
                allow.append(f"{sub}/*.{suffix}")
                ignore.append(f"{sub}/*.*.{suffix}")
            else:
                allow += [f"{sub}/*.{variant}.{suffix}", f"{sub}/*.{variant}-*.{suffix}"]
    return allow, ignore


def _has_variant(part: Path, variant: str) -> bool:
    """Whether a part's folder holds weights of `variant` (`*.fp16.safetensors`, shards `*.fp16-00001-of-00002.*`)."""
    return part.is_dir() and any(f".{variant}." in p.name or f".{variant}-" in p.name for p in part.iterdir())


def _part_variant(folder: Path, sub: str, variant: str | None) -> str | None:
    """The variant to load `sub` with. As in diffusers' pipelines, a part without weights of the variant loads its
    plain ones: SD-1.5 has `non_ema` weights for its UNet only."""
    if variant is None or _has_variant(folder / sub, variant):
        return variant
    logger.info(f"{folder / sub} has no {variant!r} weights: loading its plain weights.")
    return None


def _check_plain_weights(folder: Path, variant: str | None, supplied: Collection[str]) -> None:
    """Without a variant, refuse a part whose weights are all variant files (`*.fp16.safetensors`): diffusers says
    only "no file named diffusion_pytorch_model.safetensors found in directory <the pipeline folder>"."""
    if variant is not None:
        return
    for sub in (sub for sub in WEIGHT_FOLDERS if sub not in supplied):
        names = sorted(p.name for p in (folder / sub).iterdir() if p.name.endswith((".safetensors", *PICKLE_SUFFIXES)))
        if names and all(name.count(".") > 1 for name in names):
            variants = sorted({name.split(".")[-2].split("-")[0] for name in names})
            raise FileNotFoundError(
                f"{folder / sub} holds only {' and '.join(variants)} weights ({', '.join(names)}), no plain ones: load "
                f"with that variant (variant={variants[0]!r}; on the command line --variant {variants[0]})."
            )


def _check_variant(folder: Path, variant: str | None) -> None:
    if variant is not None and not any(_has_variant(folder / sub, variant) for sub in WEIGHT_FOLDERS):
        raise FileNotFoundError(
            f"{folder} has no {variant!r} weights in any of {', '.join(f'{sub}/' for sub in WEIGHT_FOLDERS)}: "
            "leave out the variant (--variant) to load the plain weights, or name one the model has."
        )


def check_weight_files(folder: Path, allow_pickle: bool = False, supplied: Collection[str] = ()) -> None:
    """Refuse a folder whose parts are missing, or whose weights are damaged or only in pickle formats (unless
    `allow_pickle`); the parts in `supplied` come from the caller (`from_pretrained(folder, scheduler=...)`)."""
    incomplete = any(not (folder / sub).is_dir() for sub in WEIGHT_FOLDERS)
    if incomplete and (folder / LORA_WEIGHT_NAME).is_file():
        raise FileNotFoundError(
            f"{folder} holds LoRA adapters, not a model: load its base model with the adapters on top "
            f"(latentdiff generate --model BASE --lora {folder}; in Python pipe.load_lora_weights)."
        )
    if incomplete and re.fullmatch(r"checkpoint-\d+", folder.name):
        raise FileNotFoundError(
            f"{folder} is a training checkpoint (resume it with --resume_from_checkpoint), not a pipeline: sample "
            "from the run's output folder, or put its UNet into the base pipeline: LatentDiffusionPipeline."
            f"from_pretrained(BASE, unet=UNet2DConditionModel.from_pretrained('{folder / 'unet'}'))."
        )
    for sub in (sub for sub in PIPELINE_FOLDERS if sub not in supplied):
        if not (folder / sub).is_dir():
            raise FileNotFoundError(
                f"{folder} has no {sub}/ folder: a text-to-image model folder needs {', '.join(PIPELINE_FOLDERS)}."
            )
    if "tokenizer" not in supplied:
        _check_tokenizer_files(folder / "tokenizer")
    for sub in (sub for sub in WEIGHT_FOLDERS if sub not in supplied):
        path = folder / sub
        names = sorted(p.name for p in path.iterdir())
        if safetensors := [path / name for name in names if name.endswith(".safetensors")]:
            _check_safetensors(safetensors)
            continue
        pickled = [name for name in names if name.endswith(PICKLE_SUFFIXES)]
        if not pickled:
            raise FileNotFoundError(f"{path} holds no weights file (*.safetensors); found {names}.")
        if not allow_pickle:
            raise ValueError(
                f"{path} holds only pickle weights {pickled}, and unpickling can run arbitrary code, so only "
                "safetensors load by default. If you trust this checkpoint, pass --allow_pickle (in Python "
                "allow_pickle=True), or convert it to safetensors first."
            )


def _check_tokenizer_files(tokenizer: Path) -> None:
    """Refuse a `tokenizer/` without its vocabulary or its config: transformers loads the first as a tokenizer of two
    tokens (every prompt the same ids: the model samples and trains unconditioned, silently), and the second with
    an unbounded `model_max_length` (an `OverflowError` at the first prompt)."""
    names = sorted(p.name for p in tokenizer.iterdir())
    vocabulary = "tokenizer.json" in names or {"vocab.json", "merges.txt"} <= set(names)
    missing = ([] if vocabulary else ["vocab.json + merges.txt (or tokenizer.json)"]) + (
        [] if "tokenizer_config.json" in names else ["tokenizer_config.json"]
    )
    if missing:
        raise FileNotFoundError(
            f"{tokenizer} has no {' nor '.join(missing)} (found {names}): the tokenizer is incomplete; download or "
            "copy the model again."
        )


def _check_safetensors(paths: list[Path]) -> None:
    """Read each file's header (not its weights): a truncated or damaged file is named now, instead of failing
    inside a library's loader with a message that does not say which file."""
    for path in paths:
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError as error:
            raise ValueError(
                f"{path} is damaged or truncated ({error}): download or copy the model again."
            ) from None
        except OSError:  # safetensors reports a file it may not read as "No such file or directory"
            if not path.exists():
                raise
            raise PermissionError(f"{path} exists but cannot be read: check its permissions.") from None


def resolve_model_folder(
    pretrained_model_name_or_path: str | Path,
    *,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    allow_pickle: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
    supplied: Collection[str] = (),
) -> Path:
    r"""The local folder of a model: the path itself, or the cached Hub snapshot of the files we need.

    Only the five parts are fetched from the Hub (no safety checker, no other variants, pickle files only when
    `allow_pickle`), then the weights are checked with `check_weight_files`. `token` and `force_download` are
    `huggingface_hub.snapshot_download`'s (a private or gated model needs the token, or `hf auth login`).
    `supplied` names the parts the caller gives instead of the folder's.

    Raises:
        `FileNotFoundError`: The name is no local folder and the Hub could not be reached (or has no such model).
        `ValueError`: The weights are pickle files and `allow_pickle` is `False`.
    """
    path = Path(pretrained_model_name_or_path)
    if path.is_file():  # without this check the file name would be tried as a Hub id
        raise ValueError(
            f"{path} is a single file, but a model is a diffusers folder (model_index.json, unet/, vae/, ...). "
            "Convert it with diffusers: StableDiffusionPipeline.from_single_file(path).save_pretrained(folder)"
            + (f" (a {path.suffix} is a pickle: unpickling runs code, only convert files you trust)." if path.suffix in
               PICKLE_SUFFIXES else ".")
        )  # fmt: skip
    if path.is_dir():
        folder = path
    elif as_hub_id(str(pretrained_model_name_or_path)) is None:  # a path, not a repo id: the Hub cannot have it
        raise FileNotFoundError(
            f"{str(pretrained_model_name_or_path)!r} does not exist: give a diffusers pipeline folder (model_index.json, "
            "unet/, vae/, ...) or a Hub id such as org/name."
        )
    else:
        download = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
                        force_download=force_download)  # fmt: skip
        try:
            allow, ignore = _hub_patterns(variant, allow_pickle)
            folder = Path(snapshot_download(str(pretrained_model_name_or_path), allow_patterns=allow,
                                            ignore_patterns=ignore, **download))  # fmt: skip
            if plain := tuple(sub for sub in WEIGHT_FOLDERS if variant and not _has_variant(folder / sub, variant)):
                allow, ignore = _hub_patterns(None, allow_pickle, weight_folders=plain)  # the same snapshot folder
                snapshot_download(str(pretrained_model_name_or_path), allow_patterns=allow, ignore_patterns=ignore,
                                  **download)  # fmt: skip
        except (OSError, ValueError) as error:  # offline, no such repo, not a valid repo id, not in the cache
            raise FileNotFoundError(
                f"{str(pretrained_model_name_or_path)!r} is not a local folder, and the Hub could not be reached: "
                f"{type(error).__name__}: {' '.join(str(error).split())}"  # one line: huggingface_hub's have two
            ) from error
    check_weight_files(folder, allow_pickle, supplied)
    _check_plain_weights(folder, variant, supplied)
    _check_variant(folder, variant)
    return folder


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
