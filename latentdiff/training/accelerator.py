"""The run's `Accelerator`: how many processes and devices, precision, trackers, and what they cannot do."""

import contextlib
import os
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.state import AcceleratorState, GradientState
from accelerate.tracking import GeneralTracker, get_available_trackers
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration

from .config import TrainConfig

logger = get_logger(__name__)


@contextlib.contextmanager
def accelerator_for(config: TrainConfig, trackers: Sequence[GeneralTracker]) -> Iterator[Accelerator]:
    """The run's Accelerator; afterwards (even after an error) trackers are flushed and the process-wide state the
    run set (Accelerate's, `--allow_tf32`) is put back, so that `train` can be called again in the same process with
    other settings, and later matmuls in it keep their precision."""
    wanted = config.trackers()
    available = {str(t) for t in get_available_trackers()}
    log_with = [name for name in wanted if name == "all" or name in available]
    output_dir = Path(config.output_dir)
    refuse_sharding_without_accelerators()
    try:
        accelerator = Accelerator(
            cpu=cpu_only_distributed(),
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            log_with=[*log_with, *trackers] or None,
            project_config=ProjectConfiguration(str(output_dir), logging_dir=str(output_dir / config.logging_dir)),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.ddp_timeout))],  # NCCL's: 10 min
        )
    except BaseException:  # a half-made Accelerator's state would break the next `train` in this process
        _reset_accelerate_state()
        raise
    if missing := sorted(set(wanted) - set(log_with)):
        logger.warning(
            f"--report_to {missing}: not installed, not logging there (tensorboard: pip install latentdiff[tracking])."
        )
    tf32 = torch.backends.cuda.matmul.allow_tf32
    if config.allow_tf32:  # faster fp32 matmuls on Ampere and later GPUs
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield accelerator
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        accelerator.end_training()
        _reset_accelerate_state()


def _reset_accelerate_state() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _has_accelerator() -> bool:
    return torch.accelerator.is_available()  # CUDA, XPU, MPS, ... (torch ≥ 2.6, the dependency floor)


def cpu_only_distributed() -> bool:
    """Launched as several processes (torchrun) on a machine without accelerators: data-parallel on CPUs (gloo).

    Accelerate would otherwise treat each CPU process as a separate single-process run (it expects
    `ACCELERATE_USE_CPU` or MPI for multi-CPU), and they would all write the same output folder.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator()


def refuse_sharding_without_accelerators() -> None:
    """An FSDP or DeepSpeed accelerate config on a machine without GPUs: Accelerate shards only over accelerators,
    and would otherwise fail inside its own setup with a traceback (FSDP) or quietly run plain data-parallel."""
    launched = [name for name in ("FSDP", "DeepSpeed") if os.environ.get(f"ACCELERATE_USE_{name.upper()}") == "true"]
    if launched and not _has_accelerator():
        raise ValueError(
            f"Your accelerate config asks for {launched[0]}, which shards over GPUs, and this machine has none: "
            "train on CPUs with train_scripts/accelerate/multi_cpu.yaml or torchrun --nproc_per_node N."
        )


def fit_deepspeed_config(config: TrainConfig, accelerator: Accelerator) -> None:
    """DeepSpeed takes the micro-batch, accumulation and gradient clipping from its own config: its `auto` values
    become the flags' (Accelerate would read the batch from a data loader prepared with the model; ours is prepared
    on its own), and numbers that disagree with the flags are refused, since the step count and the loss scaling
    follow the flags."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    deepspeed_config = accelerator.state.deepspeed_plugin.deepspeed_config
    for key, flag in (("train_micro_batch_size_per_gpu", "train_batch_size"),
                      ("gradient_accumulation_steps", "gradient_accumulation_steps"),
                      ("gradient_clipping", "max_grad_norm")):  # fmt: skip
        wanted, given = getattr(config, flag), deepspeed_config.get(key, "auto")
        if given == "auto":
            deepspeed_config[key] = wanted
        elif float(given) != float(wanted):
            raise ValueError(
                f"Your DeepSpeed config sets {key}: {given}, and --{flag} is {wanted}: set it to auto in the config "
                f"(the flag's value is then used), or pass --{flag} {given}."
            )


def check_distributed_support(config: TrainConfig, accelerator: Accelerator) -> None:
    """Refuse the combinations whose cost or semantics we do not handle, before any work is done."""
    if accelerator.mixed_precision == "fp16" and not accelerator.native_amp:  # the flag's, or the accelerate config's
        source = "--mixed_precision fp16" if config.mixed_precision else "fp16 mixed precision (your accelerate config)"
        raise ValueError(
            f"{source} needs a GPU: on {accelerator.device.type} Accelerate has no fp16 autocast, so the "
            "half-precision VAE and text encoder would feed a float32 UNet. Use --mixed_precision bf16 or no."
        )
    if accelerator.distributed_type == DistributedType.FSDP and (config.use_ema or config.validation_prompts):
        raise ValueError(
            "With FSDP the UNet's weights are sharded over the processes, so --use_ema and --validation_prompts "
            "(which need whole weights on one process during training) are not supported: drop them, or use "
            "DDP (multi_gpu.yaml) or DeepSpeed ZeRO-2 (deepspeed_zero2.yaml), which keep whole weights."
        )
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and config.compile:
        raise ValueError(
            "--compile makes the UNet one graph, which FSDP's hooks around each shard break: leave it out with FSDP, "
            "or use DDP (multi_gpu.yaml) or DeepSpeed ZeRO-2 (deepspeed_zero2.yaml)."
        )
    if fsdp and not accelerator.is_fsdp2 and config.resume_from_checkpoint:
        raise ValueError(
            "--resume_from_checkpoint needs FSDP2 here: under fsdp_version 1 Accelerate loads the sharded optimizer "
            "state back empty. Set fsdp_version: 2 in your accelerate config (train_scripts/accelerate/fsdp.yaml)."
        )
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if sharded and config.lora_rank is not None:
        raise ValueError(
            "--lora_rank trains a few MB of adapters beside frozen weights: run it with DDP (multi_gpu.yaml); "
            "FSDP and DeepSpeed shard the weights, which LoRA runs do not need and latentdiff does not support."
        )
    if sharded and config.train_text_encoder:
        raise ValueError(
            "--train_text_encoder prepares two models, which Accelerate supports with DDP only (multi_gpu.yaml)."
        )
