"""`train(config)`: fine-tune a latent text-to-image model with Accelerate, from data to a saved pipeline.

`_train` reads top to bottom: 1. checks, seed and Hub repo, 2. models (`models.py`), 3. data, 4. optimizer and
steps, 5. resume, 6. the loop (encode → noise → predict → loss → step → EMA → log → checkpoint → validate), 7. save,
card, push (`finish.py`).

Every random draw is a function of (seed, epoch, row) in the data and of (seed, process, epoch, batch) in the
loop, never of the global RNG's history, so a run resumed from a checkpoint continues exactly as the
uninterrupted run would have (same batches, crops, noise, timesteps: same weights).
"""

import contextlib
import dataclasses
import math
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.tracking import GeneralTracker
from accelerate.utils import DistributedType, broadcast_object_list, gather_object, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..atomic import remove_leftovers
from ..data import drop_bad_images, find_bad_images, load_image_caption_dataset, warn_long_captions
from ..examples import EpochShuffler, ImageCaptionDataset, ImageTransform, derive_seed, make_collate_fn
from ..hub import create_hub_repo
from ..text import encode_prompts
from .accelerator import accelerator_for, check_distributed_support, fit_deepspeed_config
from .checkpoint import (
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    read_state,
    refuse_another_runs_checkpoints,
    register_hooks,
    resolve_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig
from .finish import RunSummary, save_trained
from .latents import cache_latent_dists, encode_latent_dists, sample_latents
from .losses import diffusion_loss
from .models import TrainingModels, build_optimizer, load_training_models, lr_scale
from .output_folder import check_output_folder, output_folder_held
from .validation import sampling_pipeline, validate, validation_folder

logger = get_logger(__name__)


def train(config: TrainConfig, trackers: Sequence[GeneralTracker] = ()) -> Path:
    r"""Fine-tune (or, with `unet_config`, train) the UNet of a Stable Diffusion-style model on image-caption data.

    Runs in one process or, under `accelerate launch`/`torchrun`, in many (data-parallel; only the main process
    writes files and logs). Every option is documented on `TrainConfig`. It makes its own `Accelerator` and clears
    Accelerate's process-wide state when it returns or fails, so it can be called again in the same process.

    Args:
        config (`TrainConfig`): The run's options.
        trackers (`Sequence[GeneralTracker]`, *optional*): Extra Accelerate trackers (objects) that receive the
            logged `train_loss` and `lr` at every optimizer step, next to those of `config.report_to`.

    Returns:
        `Path`: The output folder, holding the trained pipeline (`model_index.json`, `unet/`, ...) or with
        `--lora_rank` the adapters (`pytorch_lora_weights.safetensors`), `README.md`, `checkpoint-<step>/` folders,
        `validation/step_<step>/` images and tracker logs.
    """
    with accelerator_for(config, trackers) as accelerator, contextlib.ExitStack() as held_for_the_run:
        return _train(config, accelerator, held_for_the_run)


def _train(config: TrainConfig, accelerator: Accelerator, held_for_the_run: contextlib.ExitStack) -> Path:
    output_dir = Path(config.output_dir)

    # 1. What this setup supports, the run's seed, the Hub repo
    check_distributed_support(config, accelerator)
    fit_deepspeed_config(config, accelerator)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    refuse_another_runs_checkpoints(output_dir, config.resume_from_checkpoint)
    resume_from = (
        resolve_checkpoint(output_dir, config.resume_from_checkpoint) if config.resume_from_checkpoint else None
    )
    seed = _run_seed(config, resume_from, accelerator)
    set_seed(seed)  # the global RNG: new weights (--unet_config, LoRA) and dropout; noise: the loop's generator
    check_output_folder(config)  # on every process: an error on the main one alone would leave the others waiting
    held_for_the_run.enter_context(output_folder_held(output_dir, accelerator))  # no other run writes there now
    if accelerator.is_main_process:
        leftovers = remove_leftovers(output_dir) + remove_leftovers(output_dir / "validation")  # of a killed run
        if leftovers:
            logger.info(f"Removed what an interrupted write left: {', '.join(str(p) for p in leftovers)}")
    repo_id = None
    if config.push_to_hub and accelerator.is_main_process:  # fail now, not after training, if the token is bad
        repo_id = create_hub_repo(config.hub_model_id or output_dir.resolve().name, token=config.hub_token)

    # 2. Models: the frozen VAE (and text encoder) in the weight dtype, the trained UNet in fp32
    models = load_training_models(config, accelerator)
    vae, text_encoder, unet, ema = models.vae, models.text_encoder, models.unet, models.ema
    register_hooks(accelerator, ema, models.lora)

    # 3. Data: rows → examples (seeded by seed, epoch, row) → one shared order per epoch → each process its batches
    dataset, train_dataloader = _training_data(config, accelerator, seed, models)

    # 4. Optimizer, learning-rate schedule, number of steps
    accum = config.gradient_accumulation_steps
    updates_per_epoch = math.ceil(len(train_dataloader) / accum)
    max_train_steps = config.max_train_steps or config.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    trained = [unet, text_encoder] if config.train_text_encoder else [unet]
    params = [p for model in trained for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(config, params, accelerator.num_processes)
    lr_scheduler = get_scheduler(  # the prepared scheduler steps once per process at each optimizer step
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )  # fmt: skip
    *trained, optimizer, lr_scheduler = accelerator.prepare(*trained, optimizer, lr_scheduler)
    unet = trained[0]
    if config.train_text_encoder:
        text_encoder = trained[1]
    params_to_clip = [p for model in trained for p in model.parameters() if p.requires_grad]  # FSDP's own

    # 5. Resume: weights, optimizer, LR schedule, EMA from the checkpoint; the data position from its step
    global_step = _resume(accelerator, resume_from, config, output_dir)
    if resume_from is not None:
        config = _optimizer_options_in_use(config, optimizer, accelerator.num_processes)
    first_epoch, skip_batches = global_step // updates_per_epoch, (global_step % updates_per_epoch) * accum

    pipeline = None
    if config.validation_prompts and accelerator.is_main_process:
        parts = (vae, accelerator.unwrap_model(text_encoder), accelerator.unwrap_model(unet))
        pipeline = sampling_pipeline(config, models, *parts)
    if accelerator.is_main_process:
        accelerator.init_trackers(config.tracker_project_name, config=_tracker_config(config))
    # An epoch's last checkpoint is saved before its validation: a run stopped between the two owes it
    owed = pipeline is not None and resume_from is not None and skip_batches == 0
    if owed and _validation_due(first_epoch, global_step, max_train_steps, config):
        if not validation_folder(output_dir, global_step).exists():
            validate(pipeline, ema, config, seed, global_step, accelerator)
    logger.info(
        f"Training on {len(dataset)} examples: {accelerator.num_processes} process(es) × batch "
        f"{config.train_batch_size} × {accum} accumulation, {max_train_steps} steps ({num_epochs} epochs), seed {seed}."
    )
    if (per_process := math.ceil(len(dataset) / accelerator.num_processes)) < config.train_batch_size:
        logger.warning(
            f"--train_batch_size {config.train_batch_size} is more than the {per_process} examples each process has: "
            f"every batch holds just those {per_process}, and --learning_rate (with --scale_lr) is meant for the "
            "larger batch."
        )

    # 6. The loop
    generator = torch.Generator(device=accelerator.device)
    progress = tqdm(
        total=max_train_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    micro_losses: list[float] = []  # of the optimizer step being accumulated (fewer at an epoch's end)
    last_epoch = num_epochs if global_step < max_train_steps else first_epoch  # resumed at the end: nothing to train
    for epoch in range(first_epoch, last_epoch):
        train_dataloader.set_epoch(epoch)  # this epoch's shuffled order
        dataset.set_epoch(epoch)  # this epoch's crops, flips, caption choices
        skip = skip_batches if epoch == first_epoch else 0
        batches = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        for batch_index, batch in enumerate(batches, start=skip):
            generator.manual_seed(derive_seed(seed, accelerator.process_index, epoch, batch_index))
            with accelerator.accumulate(*trained):
                # x₀ ~ q(z|x) × scaling factor, with q(z|x) from the cache or encoded now
                if "latent_dist" in batch:
                    latent_dists = batch["latent_dist"]
                else:
                    latent_dists = encode_latent_dists(vae, batch["pixel_values"])
                latents = sample_latents(vae, latent_dists, generator)  # (B, 4, h, w)
                with torch.set_grad_enabled(config.train_text_encoder):
                    encoder_hidden_states = encode_prompts(text_encoder, batch["input_ids"])  # (B, 77, D)
                loss = diffusion_loss(
                    unet, models.noise_scheduler, latents, encoder_hidden_states, generator,
                    snr_gamma=config.snr_gamma, noise_offset=config.noise_offset,
                    input_perturbation=config.input_perturbation,
                    dream_detail_preservation=config.dream_detail_preservation if config.dream_training else None,
                )  # fmt: skip
                mean_loss = accelerator.gather(loss.detach().reshape(1)).mean().item()  # over processes
                if not math.isfinite(mean_loss):
                    raise _non_finite("loss", mean_loss, global_step + 1, epoch, batch_index, output_dir)
                micro_losses.append(mean_loss)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(params_to_clip, config.max_grad_norm)  # same on every process
                    # A finite loss can still overflow the gradients, which would make every weight NaN (and the
                    # next checkpoint with them). fp16's grad scaler (DeepSpeed's too) skips such steps itself.
                    # DeepSpeed returns the norm as a float, of the step it has already taken in `backward`.
                    scaled = accelerator.mixed_precision == "fp16"
                    if grad_norm is not None and not scaled and not math.isfinite(grad_norm):
                        raise _non_finite("gradient norm", float(grad_norm), global_step + 1, epoch, batch_index,
                                          output_dir, deepspeed)  # fmt: skip
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue  # still accumulating

            # One optimizer step is done.
            if ema is not None:
                ema.step(accelerator.unwrap_model(unet))
            global_step += 1
            lr = lr_scheduler.get_last_lr()[0]
            step_loss = sum(micro_losses) / len(micro_losses)
            accelerator.log({"train_loss": step_loss, "lr": lr}, step=global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            micro_losses = []
            if global_step % config.checkpointing_steps == 0:
                state = {"global_step": global_step, "seed": seed, **_what_resuming_keeps(config, accelerator)}
                save_checkpoint(accelerator, output_dir, state, config.checkpoints_total_limit, keep=resume_from)
            if global_step >= max_train_steps:
                break
        if pipeline is not None and _validation_due(epoch + 1, global_step, max_train_steps, config):
            validate(pipeline, ema, config, seed, global_step, accelerator)
    progress.close()

    # 7. Save the pipeline, or the LoRA adapters (EMA weights with --use_ema); final validation, card, upload
    save_trained(config, accelerator, models, unet, text_encoder,
                 RunSummary(seed, global_step, max_train_steps, num_epochs, repo_id))  # fmt: skip
    return output_dir


def _training_data(
    config: TrainConfig, accelerator: Accelerator, seed: int, models: TrainingModels
) -> tuple[ImageCaptionDataset, torch.utils.data.DataLoader]:
    """The examples (each seeded by seed, epoch and row) and the prepared loader: one shared shuffled order per
    epoch, each process its share of the batches."""
    with accelerator.main_process_first():  # the main process fills the datasets cache, the others read it
        rows = load_image_caption_dataset(
            dataset_name=config.dataset_name, dataset_config_name=config.dataset_config_name,
            train_data_dir=config.train_data_dir, cache_dir=config.cache_dir, image_column=config.image_column,
            caption_column=config.caption_column, max_train_samples=config.max_train_samples, seed=seed,
            verbose=accelerator.is_main_process, check_images=False,
        )  # fmt: skip
    # Each process opens its part of the images; all pool their findings, so that all drop the same rows
    found = find_bad_images(rows, config.image_column, accelerator.process_index, accelerator.num_processes,
                            verbose=accelerator.is_main_process)  # fmt: skip
    problems = {row: why for part in gather_object([found]) for row, why in part.items()}
    rows = drop_bad_images(rows, config.image_column, config.on_bad_image, accelerator.is_main_process, problems)
    if accelerator.is_main_process:
        warn_long_captions(rows, config.caption_column, models.tokenizer)
    transform = ImageTransform(
        config.resolution, config.center_crop, config.random_flip, config.image_interpolation_mode
    )
    dataset = ImageCaptionDataset(
        rows, transform, seed, image_column=config.image_column, caption_column=config.caption_column,
        caption_dropout=config.caption_dropout,
    )  # fmt: skip
    if config.cache_latents:
        dataset.use_latent_cache(cache_latent_dists(models.vae, dataset, config.train_batch_size, accelerator))
    # Workers are not persistent: each epoch starts them again with the data set's new epoch (`set_epoch` runs in
    # this process), which costs a fork per worker and epoch, felt only on data sets of a few batches
    train_dataloader = accelerator.prepare(
        torch.utils.data.DataLoader(
            dataset, batch_size=config.train_batch_size, sampler=EpochShuffler(len(dataset), seed),
            collate_fn=make_collate_fn(models.tokenizer), num_workers=config.dataloader_num_workers,
        )
    )  # fmt: skip
    return dataset, train_dataloader


def _what_resuming_keeps(config: TrainConfig, accelerator: Accelerator) -> dict[str, Any]:
    """The settings that decide the data order and the images, saved in each checkpoint: a run resumed with others
    trains on, but no longer as the uninterrupted run would have."""
    return {"num_processes": accelerator.num_processes, "train_batch_size": config.train_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps, "resolution": config.resolution,
            "center_crop": config.center_crop, "random_flip": config.random_flip,
            "image_interpolation_mode": config.image_interpolation_mode}  # fmt: skip


def _run_seed(config: TrainConfig, resume_from: Path | None, accelerator: Accelerator) -> int:
    """The seed of the run: the resumed checkpoint's, else `--seed`, else drawn once and shared by all processes."""
    if resume_from is not None:
        state = read_state(resume_from)
        saved = {"image_interpolation_mode": "bilinear", **state}  # checkpoints from before the option: bilinear
        checks = _what_resuming_keeps(config, accelerator)
        changed = {k: (saved.get(k), v) for k, v in checks.items() if saved.get(k) not in (None, v)}
        if changed:
            logger.warning(f"Resuming with changed {changed} (saved, now): the run will not continue exactly as it "
                           "would have; give the saved values to continue it.")  # fmt: skip
        if config.seed is not None and config.seed != state["seed"]:
            logger.warning(f"--seed {config.seed} ignored: continuing the resumed run's seed {state['seed']}.")
        return state["seed"]
    if config.seed is not None:
        return config.seed
    shared = broadcast_object_list([secrets.randbelow(2**31)])  # the main process's draw
    return shared[0]


def _resume(accelerator: Accelerator, resume_from: Path | None, config: TrainConfig, output_dir: Path) -> int:
    """Load the checkpoint into the prepared objects; returns its step (0 for a new run)."""
    if resume_from is None:
        if config.resume_from_checkpoint:
            logger.info(f"No complete checkpoint in {output_dir}: starting a new run.")
        return 0
    global_step = load_checkpoint(accelerator, resume_from)["global_step"]
    logger.info(f"Resumed from {resume_from} at step {global_step}")
    if later := [p.name for p in list_checkpoints(output_dir) if checkpoint_step(p) > global_step]:
        logger.warning(
            f"{output_dir} also holds {later}, saved by a run that went further: this run replaces them as it "
            "reaches their steps, and until then --resume_from_checkpoint latest means them, not this run."
        )
    return global_step


def _optimizer_options_in_use(
    config: TrainConfig, optimizer: torch.optim.Optimizer, num_processes: int
) -> TrainConfig:
    """`config` with the optimizer settings that a resumed run actually uses.

    Loading a checkpoint brings back the optimizer's settings (learning rate, betas, weight decay, epsilon) with its
    state, and the schedule's base rate, as in diffusers' script: options given now that differ are not applied. A
    warning names them, and the card, `training_config.json` and the trackers get the values in use.
    """
    group, scale = optimizer.param_groups[0], lr_scale(config, num_processes)
    in_use = {"learning_rate": group.get("initial_lr", group["lr"]) / scale,
              "adam_beta1": group["betas"][0], "adam_beta2": group["betas"][1],
              "adam_weight_decay": group["weight_decay"], "adam_epsilon": group["eps"]}  # fmt: skip
    ignored = {k: float(v) for k, v in in_use.items() if not math.isclose(v, getattr(config, k), rel_tol=1e-6)}
    if not ignored:
        return config
    # With --scale_lr the rates compared are the scaled ones: a new batch size changes the rate without a new option
    scaled = f" × {scale} (--scale_lr)" if scale > 1 else ""
    given = ", ".join(f"--{k} {getattr(config, k)}{scaled if k == 'learning_rate' else ''}" for k in ignored)
    kept = ", ".join(f"{k} {v * (scale if k == 'learning_rate' else 1):g}" for k, v in ignored.items())
    logger.warning(f"{given} not applied: the resumed optimizer and learning-rate schedule keep the checkpoint's "
                   f"{kept}. To change them, start a new run from the trained pipeline.")  # fmt: skip
    return dataclasses.replace(config, **ignored)


def _validation_due(epochs_done: int, global_step: int, max_train_steps: int, config: TrainConfig) -> bool:
    """Whether validation runs once this many epochs are done, at this step: after the first epoch and every
    `--validation_epochs`-th one after it, as diffusers' script (its 0-based ``epoch % validation_epochs == 0``), but
    not at the last step: the final validation, of the saved pipeline, covers it."""
    return epochs_done > 0 and (epochs_done - 1) % config.validation_epochs == 0 and global_step < max_train_steps


def _non_finite(
    what: str, value: float, step: int, epoch: int, batch: int, output_dir: Path, stepped: bool = False
) -> FloatingPointError:
    """The error that stops a run at a non-finite loss or gradient norm; `stepped`: the optimizer had already
    applied it (DeepSpeed steps inside `backward`)."""
    stopped = "training stopped" if stepped else "training stopped before updating the weights"
    return FloatingPointError(
        f"The {what} is {value} at step {step} (epoch {epoch}, batch {batch}): {stopped}; the checkpoints in "
        f"{output_dir} are intact. Lower --learning_rate, use bf16 instead of fp16, or resume from the last checkpoint."
    )


def _tracker_config(config: TrainConfig) -> dict:
    """Options as tracker hyperparameters (TensorBoard takes only scalars and strings; no secrets)."""
    values = {k: ", ".join(v) if isinstance(v, list) else v for k, v in config.to_dict().items()}
    return {k: v for k, v in values.items() if v is not None}
