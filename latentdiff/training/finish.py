"""The end of a run: the trained pipeline (or LoRA adapters) saved in fp32, a last validation, the card, the upload.

The saved pipeline holds the EMA weights when there is an EMA, and fp32 copies of the frozen parts (the run kept
half-precision copies for speed). It replaces the previous one in `output_dir` whole, so a crash while writing
leaves the old pipeline or none, never a mix.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from ..atomic import atomic_entries, atomic_write_text, disk_full_explained
from ..components import load_frozen_parts, load_unet
from ..hub import model_card, push_to_hub, write_model_card
from ..models import UNet2DConditionModel
from ..pipelines import LatentDiffusionPipeline
from .checkpoint import full_disk_advice
from .config import EMA_FIELDS, LORA_FIELDS, TrainConfig
from .lora import save_lora
from .models import TrainingModels
from .validation import sampling_pipeline, validate

logger = get_logger(__name__)


@dataclass
class RunSummary:
    """What the model card and `training_config.json` report beyond the options."""

    seed: int
    global_step: int
    max_train_steps: int
    num_epochs: int
    repo_id: str | None  # the Hub repo to upload to (main process only), created before training


def save_trained(
    config: TrainConfig, accelerator: Accelerator, models: TrainingModels, unet: torch.nn.Module,
    text_encoder: torch.nn.Module, run: RunSummary,
) -> None:  # fmt: skip
    """Save what the run trained into `config.output_dir`; call on every process (FSDP/ZeRO gather the weights).

    Args:
        models (`TrainingModels`): The run's models as loaded (the base folder, tokenizer, EMA, LoRA or not).
        unet, text_encoder (`torch.nn.Module`): The trained models as `accelerator.prepare` returned them.
    """
    output_dir, lora = Path(config.output_dir), models.lora
    options = config.to_dict() | {"seed": run.seed}  # the seed the run used, also when it was drawn
    accelerator.wait_for_everyone()
    unet_state = None if lora else accelerator.get_state_dict(unet)  # all processes take part in the gather
    if accelerator.is_main_process:
        trained_unet, trained_text_encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
        final = _final_pipeline(config, models, trained_unet, trained_text_encoder, unet_state)
        # first: it marks the folder as a run's (output_folder.py), also if the run is stopped while saving below
        atomic_write_text(output_dir / "training_config.json", json.dumps(options, indent=2))
        if lora:
            with disk_full_explained(output_dir, "the LoRA adapters", full_disk_advice(output_dir)):
                saved = save_lora(output_dir, trained_unet, trained_text_encoder if config.train_text_encoder else None)
            final.load_lora_weights(output_dir)  # as users will: validation below samples from the saved file
        else:  # beside the checkpoints, swapped in whole: a crash leaves the old pipeline or no pipeline, no mix
            with disk_full_explained(output_dir, "the trained pipeline", full_disk_advice(output_dir)):  # the sync too
                with atomic_entries(output_dir, "model_index.json", stale=("README.md",)) as tmp:
                    final.save_pretrained(tmp)  # a failure removes tmp before the free space is measured
            saved = output_dir
        images = []
        if config.validation_prompts:
            paths = validate(final.to(accelerator.device), None, config, run.seed, run.global_step, accelerator)
            images = [(str(p.relative_to(output_dir)), prompt) for p, prompt in zip(paths, config.validation_prompts)]
        unused = (() if config.use_ema else EMA_FIELDS) + (() if lora else LORA_FIELDS)  # defaults that did nothing
        hyperparameters = {k: v for k, v in options.items() if k not in unused} | {
            "max_train_steps": run.max_train_steps, "num_train_epochs": run.num_epochs
        }  # fmt: skip
        card = model_card(
            run.repo_id or config.hub_model_id or output_dir.resolve().name, config.pretrained_model_name_or_path,
            config.dataset_name or config.train_data_dir, hyperparameters, images, run.global_step, lora=lora,
        )  # fmt: skip
        write_model_card(output_dir, card)
        logger.info(f"Saved the trained {'LoRA adapters' if lora else 'pipeline'} to {saved}")
    accelerator.wait_for_everyone()  # the files exist on every process's return; the upload is the main one's alone
    if accelerator.is_main_process and run.repo_id is not None:  # (gigabytes: a barrier could time out under NCCL)
        push_to_hub(output_dir, run.repo_id, token=config.hub_token)


def _final_pipeline(
    config: TrainConfig, models: TrainingModels, trained_unet: torch.nn.Module, trained_text_encoder: torch.nn.Module,
    unet_state: dict | None,
) -> LatentDiffusionPipeline:  # fmt: skip
    """The pipeline to save, all fp32: with LoRA the base model (the adapters are saved beside it), else a fresh UNet
    holding the gathered weights; the EMA's average swapped in where there is one."""
    loading = dict(variant=config.variant, torch_dtype=torch.float32, allow_pickle=config.allow_pickle)
    vae, text_encoder = models.vae, trained_text_encoder
    if models.lora or models.weight_dtype != torch.float32:  # the frozen parts in fp32, not their half copies
        vae, base_text_encoder = load_frozen_parts(models.folder, **loading)
        if models.lora or not config.train_text_encoder:  # a LoRA pipeline starts from the base, then the adapters
            text_encoder = base_text_encoder
    if models.lora:  # the EMA averages the adapters, which are saved from the trained UNet
        unet, averaged = load_unet(models.folder, **loading), trained_unet
    else:
        unet = UNet2DConditionModel.from_config(trained_unet.config)
        unet.load_state_dict(unet_state)
        averaged = unet
    if models.ema is not None:
        models.ema.copy_to(averaged)
    return sampling_pipeline(config, models, vae, text_encoder, unet)
