"""Validation: sample the prompts with a fixed seed, save the PNGs, show them to TensorBoard.

The same seed at every validation makes the images comparable across steps: what changes is the model.
"""

import contextlib
import logging
from pathlib import Path

import diffusers
import numpy as np
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDIMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image
from torch import nn

from ..atomic import atomic_dir
from ..pipelines import LatentDiffusionPipeline
from .config import TrainConfig
from .ema import EMAModel
from .models import TrainingModels

logger = logging.getLogger(__name__)


def inference_scheduler(model_folder: Path, **overrides: object) -> SchedulerMixin:
    """The sampler the base model ships (`scheduler/`), with the training overrides (prediction type, betas).

    Training uses its forward process as a `DDPMScheduler`; the saved pipeline keeps the base's own sampler class
    (DDIM, PNDM, Euler, ...) so that it samples as users of the base model expect.
    """
    config = DDIMScheduler.load_config(model_folder, subfolder="scheduler")
    scheduler_class = getattr(diffusers, config.get("_class_name", ""), None)
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
        logger.warning(f"Unknown scheduler class {config.get('_class_name')!r} in {model_folder}; sampling with DDIM.")
        scheduler_class = DDIMScheduler
    return scheduler_class.from_config(config, **{k: v for k, v in overrides.items() if v is not None})


def sampling_pipeline(
    config: TrainConfig, models: TrainingModels, vae: AutoencoderKL, text_encoder: nn.Module, unet: nn.Module
) -> LatentDiffusionPipeline:
    """The run's parts as a pipeline with the sampler it saves (`inference_scheduler`): for validation during
    training, and for the final pipeline."""
    overrides = dict(prediction_type=config.prediction_type, beta_schedule=config.beta_schedule)
    sampler = inference_scheduler(models.folder, **overrides)
    return LatentDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=models.tokenizer, unet=unet,
                                   scheduler=sampler)  # fmt: skip


@torch.no_grad()
def generate_validation_images(
    pipeline: LatentDiffusionPipeline,
    prompts: list[str],
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
    resolution: int,
    accelerator: Accelerator,
) -> list[Image.Image]:
    """One image per prompt, each from `torch.Generator().manual_seed(seed)`, at the training resolution."""
    pipeline.set_progress_bar_config(disable=True)
    images = []
    with accelerator.autocast():
        for prompt in prompts:
            generator = torch.Generator().manual_seed(seed)  # on the CPU, as `latentdiff generate` draws: same image
            output = pipeline(
                prompt,
                height=resolution,
                width=resolution,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generator,
            )
            images.append(output.images[0])
    return images


def validation_folder(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "validation" / f"step_{step}"


def save_validation_images(
    images: list[Image.Image], prompts: list[str], output_dir: Path, step: int, accelerator: Accelerator
) -> list[Path]:
    """Write `output_dir/validation/step_<step>/<i>.png` (and `prompts.txt`), and log the images to TensorBoard."""
    folder = validation_folder(output_dir, step)
    with atomic_dir(folder) as tmp:
        for i, image in enumerate(images):
            image.save(tmp / f"{i}.png")
        (tmp / "prompts.txt").write_text("".join(f"{i}.png: {p}\n" for i, p in enumerate(prompts)), encoding="utf-8")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            batch = np.stack([np.asarray(image) for image in images])  # (N, H, W, 3) uint8
            tracker.writer.add_images("validation", batch, step, dataformats="NHWC")
    return [folder / f"{i}.png" for i in range(len(images))]


def validate(
    pipeline: LatentDiffusionPipeline, ema: EMAModel | None, config: TrainConfig, seed: int, step: int,
    accelerator: Accelerator,
) -> list[Path]:  # fmt: skip
    """Sample the validation prompts (with the EMA weights swapped in when there is an EMA); save and log them."""
    logger.info(f"Validation at step {step}")
    averaged = ema.averaged(pipeline.unet) if ema is not None else contextlib.nullcontext()
    was_training = pipeline.unet.training
    pipeline.unet.eval()
    with averaged:
        images = generate_validation_images(
            pipeline, config.validation_prompts, seed, config.validation_inference_steps,
            config.validation_guidance_scale, config.resolution, accelerator,
        )  # fmt: skip
    pipeline.unet.train(was_training)
    return save_validation_images(images, config.validation_prompts, Path(config.output_dir), step, accelerator)
