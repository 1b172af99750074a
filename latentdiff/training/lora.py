"""LoRA fine-tuning: peft adapters on the UNet (and text encoder), saved in diffusers' LoRA file format.

A LoRA run freezes every base weight W and trains a low-rank update, W' = W + (α / r) · B A with A (r × in) and
B (out × r), B = 0 at the start (Hu et al. 2021, eq. 3), so training starts exactly at the base model. Only A and
B are trained, checkpointed, averaged by the EMA and saved: `pytorch_lora_weights.safetensors`, the file
diffusers' `load_lora_weights` reads (keys `unet.….lora_A.weight` / `text_encoder.…`, the adapters'
`LoraConfig` in the safetensors metadata so rank and α load exactly).
"""

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE as LORA_WEIGHT_NAME
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ..atomic import make_folder, replace_file

UNET_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections, as diffusers' scripts
TEXT_ENCODER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP's attention projections
ADAPTER_NAME = "default"


def add_lora_adapters(
    unet: nn.Module,
    text_encoder: nn.Module | None,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: Sequence[str] = UNET_TARGET_MODULES,
) -> None:
    r"""Attach fresh LoRA adapters to the (frozen) UNet and optionally the text encoder: their parameters are then
    the only ones with `requires_grad`.

    The adapters are kept in fp32 whatever the frozen weights' dtype, so that fp16/bf16 runs update them at full
    precision (the base weights never change, so they can stay in half precision).

    Args:
        unet (`nn.Module`): The UNet, already frozen.
        text_encoder (`nn.Module`, *optional*): The text encoder, already frozen; `None` to leave it without adapters.
        rank (`int`): r, the adapters' rank.
        alpha (`float`, *optional*, defaults to `rank`): α; the update is scaled by α / r.
        dropout (`float`, *optional*, defaults to 0.0): Dropout on the adapters' input.
        target_modules (`Sequence[str]`, *optional*): UNet module names (or name endings) that get adapters.
    """
    settings = dict(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout, init_lora_weights="gaussian")
    unet_lora = LoraConfig(target_modules=list(target_modules), **settings)
    full_rank = _largest_full_rank(unet, unet_lora)
    if full_rank is not None and rank > full_rank:  # and a huge rank would fail allocating, with a traceback
        raise ValueError(
            f"--lora_rank {rank} is more than the widest adapted layer's rank (min(in, out) = {full_rank}): an update "
            "of that rank is no longer low-rank; 4 to 128 is usual."
        )
    try:
        unet.add_adapter(unet_lora)
    except ValueError as error:
        raise ValueError(
            f"--lora_target_modules {' '.join(target_modules)}: {error} The UNet's attention projections "
            "are to_q, to_k, to_v and to_out.0 (the default); its feed-forward layers are ff.net.0.proj and ff.net.2."
        ) from error
    models = [unet]
    if text_encoder is not None:
        text_encoder.add_adapter(LoraConfig(target_modules=list(TEXT_ENCODER_TARGET_MODULES), **settings))
        models.append(text_encoder)
    cast_training_params(models, dtype=torch.float32)


def _largest_full_rank(model: nn.Module, config: LoraConfig) -> int | None:
    """The largest rank a weight of the layers `config` targets can have (matched by peft's own rule); `None` when
    none matches, which peft reports itself."""
    ranks = [min(module.weight.shape[0], module.weight[0].numel()) for name, module in model.named_modules()
             if isinstance(getattr(module, "weight", None), torch.Tensor) and check_target_module_exists(config, name)]
    return max(ranks, default=None)


def _lora_layers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights under peft's names (`….lora_A.weight`), which diffusers' `save_lora_adapter` writes too.

    Not the older `….lora.down.weight` names: diffusers converts only attention projections to those, and a file
    mixing both (any --lora_target_modules beyond to_q/k/v/out) does not load back whole.
    """
    return get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)


def save_lora(folder: str | os.PathLike, unet: nn.Module, text_encoder: nn.Module | None = None) -> Path:
    r"""Write the adapters to `folder/pytorch_lora_weights.safetensors`, atomically; returns the file.

    Args:
        folder (`str` or `os.PathLike`): Where to write (created if missing); an existing file is replaced whole.
        unet (`nn.Module`): The UNet with its adapter.
        text_encoder (`nn.Module`, *optional*): The text encoder, when it has an adapter too.
    """
    folder = make_folder(folder)
    text_encoder_layers = _lora_layers(text_encoder) if text_encoder is not None else None
    text_encoder_metadata = text_encoder.peft_config[ADAPTER_NAME].to_dict() if text_encoder is not None else None
    with tempfile.TemporaryDirectory(prefix=".tmp-lora-", dir=folder) as tmp:
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            tmp, unet_lora_layers=_lora_layers(unet), text_encoder_lora_layers=text_encoder_layers,
            unet_lora_adapter_metadata=unet.peft_config[ADAPTER_NAME].to_dict(),
            text_encoder_lora_adapter_metadata=text_encoder_metadata, weight_name=LORA_WEIGHT_NAME,
        )  # fmt: skip
        written = Path(tmp) / LORA_WEIGHT_NAME
        written.chmod(0o644)  # an ordinary output file, not a private temporary one
        replace_file(written, folder / LORA_WEIGHT_NAME)
    return folder / LORA_WEIGHT_NAME


def restore_lora(folder: str | os.PathLike, unet: nn.Module, text_encoder: nn.Module | None = None) -> None:
    r"""Put the adapter weights of `folder/pytorch_lora_weights.safetensors` back into the attached adapters.

    For resuming: the adapters already exist (same rank and targets) and get the saved values bit for bit.
    Anything that does not fit (another rank, other target modules, a missing text-encoder part) is an error.
    """
    path = Path(folder) / LORA_WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this checkpoint was not saved by a LoRA run (--lora_rank).")
    saved = load_file(path)
    with safe_open(path, framework="pt") as f:
        settings = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    if text_encoder is None and any(key.startswith("text_encoder.") for key in saved):
        raise ValueError(
            f"{path} holds text-encoder adapters too: resume with --train_text_encoder, as the run was started."
        )
    models = {"unet": unet} if text_encoder is None else {"unet": unet, "text_encoder": text_encoder}
    for prefix, model in models.items():
        state_dict = {k.removeprefix(f"{prefix}."): v for k, v in saved.items() if k.startswith(f"{prefix}.")}
        config = model.peft_config[ADAPTER_NAME]
        for option, key in (("--lora_rank", "r"), ("--lora_alpha", "lora_alpha"), ("--lora_dropout", "lora_dropout")):
            if settings.get(f"{prefix}.{key}", getattr(config, key)) != getattr(config, key):
                raise ValueError(
                    f"{path} was trained with {option} {settings[f'{prefix}.{key}']}, this run has "
                    f"{getattr(config, key)}: resume with the value the checkpoint was saved with."
                )
        expected = _lora_layers(model)
        missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
        shapes = [k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(
                f"{path} does not fit this run's {prefix} adapter (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                f"other shapes {shapes[:3]}): resume with the --lora_rank, --lora_target_modules and "
                "--train_text_encoder the checkpoint was saved with."
            )
        set_peft_model_state_dict(model, state_dict, adapter_name=ADAPTER_NAME)
