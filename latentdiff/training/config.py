"""`TrainConfig`: the one place every fine-tuning option is declared, checked and documented.

The command lines of `train_scripts/train_text_to_image.py` and `latentdiff train` are generated from this
dataclass by `transformers.HfArgumentParser` (`command_line.py`), so a flag, its default, its help text and its
validation exist exactly once. Names follow diffusers' `examples/text_to_image/train_text_to_image.py`, so its commands work.
"""

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..examples import RESAMPLING
from .checkpoint import resolve_checkpoint
from .config_types import check_field_types
from .lora import UNET_TARGET_MODULES

# 64 megapixels, far beyond SD's 512-1024: one 128-channel VAE activation of such an image is 17 GB in bf16 already
LARGEST_RESOLUTION = 8192
# diffusers' get_scheduler names, less piecewise_constant (it needs step rules, which no flag gives)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
LORA_FIELDS = ("lora_alpha", "lora_dropout", "lora_target_modules")  # meaningful only with --lora_rank
EMA_FIELDS = ("ema_decay", "ema_min_decay", "ema_update_after_step", "ema_use_warmup", "ema_inv_gamma", "ema_power",
              "foreach_ema", "offload_ema")
EMA_WARMUP_FIELDS = ("ema_inv_gamma", "ema_power")  # meaningful only with --ema_use_warmup
TRACKERS = ("tensorboard", "wandb", "comet_ml", "mlflow", "aim", "clearml", "dvclive", "swanlab", "trackio")
SECRET_FIELDS = ("hub_token",)  # never logged, saved, printed or written into a model card
PATH_FIELDS = ("pretrained_model_name_or_path", "output_dir", "train_data_dir", "dataset_name", "unet_config",
               "cache_dir", "resume_from_checkpoint")  # fmt: skip


def _help(text: str, **metadata: Any) -> dict[str, Any]:
    return {"help": text, **metadata}


@dataclass
class TrainConfig:
    r"""Every option of a fine-tuning run. Build it in Python, or from a command line / YAML / JSON file with
    `parse_train_args`. Bad values raise a `ValueError` (or `FileNotFoundError`) naming the option.
    """

    # Model
    pretrained_model_name_or_path: str = field(
        metadata=_help("Base pipeline: a Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) or a local folder.")
    )
    revision: str | None = field(default=None, metadata=_help("Git revision (branch, tag, commit) of the base model."))
    variant: str | None = field(default=None, metadata=_help("Weight variant of the base model files, e.g. 'fp16'."))
    unet_config: str | None = field(
        default=None,
        metadata=_help("A UNet config.json (or a folder holding one): train a UNet from scratch with it instead of "
                       "fine-tuning the base model's UNet. Its in_channels and cross_attention_dim must match the base "
                       "model's VAE and text encoder."),
    )  # fmt: skip
    allow_pickle: bool = field(
        default=False, metadata=_help("Also load .bin/.ckpt pickle weights (unsafe for untrusted files).")
    )
    cache_dir: str | None = field(default=None, metadata=_help("Where downloaded models and data sets are stored."))

    # Data
    dataset_name: str | None = field(
        default=None,
        metadata=_help("A Hub data set id, a folder written by `Dataset.save_to_disk`, a .csv/.parquet file whose "
                       "image column holds paths (relative to the file), or a local data set folder."),
    )  # fmt: skip
    dataset_config_name: str | None = field(
        default=None, metadata=_help("Config of the Hub data set, if it has several.")
    )
    train_data_dir: str | None = field(
        default=None,
        metadata=_help("An `imagefolder` folder: images plus a metadata.jsonl with `file_name` and the caption column. "
                       "With --dataset_name, it is passed to it as `data_dir`."),
    )  # fmt: skip
    image_column: str = field(default="image", metadata=_help("The data set column holding the images."))
    caption_column: str = field(
        default="text", metadata=_help("The column holding a caption, or a list of captions (one is drawn at random).")
    )
    max_train_samples: int | None = field(default=None, metadata=_help("Train on a random subset of this size."))
    on_bad_image: Literal["skip", "error"] = field(
        default="skip",
        metadata=_help("Images that cannot be read (truncated, empty, not images, missing, decompression bombs) are "
                       "found before training: skip them with one summary warning, or stop with an error listing them."),
    )  # fmt: skip
    resolution: int = field(default=512, metadata=_help("Images are resized (shorter side) and cropped to this size."))
    center_crop: bool = field(default=False, metadata=_help("Crop the center; otherwise a random crop."))
    random_flip: bool = field(default=False, metadata=_help("Flip images horizontally at random."))
    image_interpolation_mode: Literal[tuple(RESAMPLING)] = field(
        default="lanczos", metadata=_help("The filter that resizes the images (torchvision's names, as diffusers).")
    )
    caption_dropout: float = field(
        default=0.0,
        metadata=_help("Probability of training on the empty caption instead, so classifier-free guidance works."),
    )
    cache_latents: bool = field(
        default=False,
        metadata=_help("Encode each image once with the VAE and train from the cached latent distributions "
                       "(needs --center_crop and no --random_flip)."),
    )  # fmt: skip
    dataloader_num_workers: int = field(default=0, metadata=_help("Data loading subprocesses (0: main process)."))
    ddp_timeout: int = field(
        default=1800,
        metadata=_help("Seconds a process waits for the others (transformers' option): validation and the final "
                       "save run on the main process while the others wait, so raise it when they take longer."),
    )  # fmt: skip

    # Optimisation
    seed: int | None = field(default=None, metadata=_help("Seed of all randomness: the same seed gives the same run."))
    train_batch_size: int = field(default=16, metadata=_help("Batch size per process."))
    num_train_epochs: int = field(default=100, metadata=_help("Epochs to train, unless --max_train_steps is set."))
    max_train_steps: int | None = field(
        default=None, metadata=_help("Total optimizer steps; overrides --num_train_epochs.")
    )
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Batches accumulated per optimizer step."))
    gradient_checkpointing: bool = field(default=False, metadata=_help("Recompute activations: less memory, slower."))
    learning_rate: float = field(default=1e-4, metadata=_help("Peak learning rate (after warm-up)."))
    scale_lr: bool = field(
        default=False, metadata=_help("Multiply the learning rate by accumulation steps × batch size × processes.")
    )
    lr_scheduler: Literal[LR_SCHEDULERS] = field(default="constant", metadata=_help("Learning-rate schedule."))
    lr_warmup_steps: int = field(default=500, metadata=_help("Warm-up steps of the learning-rate schedule."))
    snr_gamma: float | None = field(
        default=None, metadata=_help("γ of min-SNR-γ loss weighting (Hang et al. 2023); 5.0 is recommended.")
    )
    use_8bit_adam: bool = field(default=False, metadata=_help("8-bit AdamW from bitsandbytes (GPU only)."))
    allow_tf32: bool = field(default=False, metadata=_help("Allow TF32 matmuls on Ampere or newer GPUs."))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW β1."))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW β2."))
    adam_weight_decay: float = field(default=1e-2, metadata=_help("AdamW weight decay."))
    adam_epsilon: float = field(default=1e-8, metadata=_help("AdamW ε."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradients are clipped to this global norm."))
    train_text_encoder: bool = field(default=False, metadata=_help("Fine-tune the text encoder too."))
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata=_help("Mixed precision; by default the value of your `accelerate config`.")
    )
    compile: bool = field(
        default=False,
        metadata=_help("torch.compile the UNet (one graph, in place): faster steps on a GPU after a compile of a minute "
                       "or more at the first step."),
    )  # fmt: skip
    enable_xformers_memory_efficient_attention: bool = field(
        default=False, metadata=_help("Use xFormers' memory-efficient attention (needs the xformers package).")
    )

    # LoRA
    lora_rank: int | None = field(
        default=None,
        metadata=_help("Train LoRA adapters of this rank (4-64 is usual) instead of the whole UNet: the base weights "
                       "stay frozen and the output is pytorch_lora_weights.safetensors in diffusers' format."),
    )  # fmt: skip
    lora_alpha: float | None = field(
        default=None, metadata=_help("LoRA α: the adapters' update is scaled by α / rank; defaults to the rank.")
    )
    lora_dropout: float = field(default=0.0, metadata=_help("Dropout on the adapters' input."))
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(UNET_TARGET_MODULES),
        metadata=_help("UNet modules (names or name endings) that get adapters, space- or comma-separated. With "
                       "--train_text_encoder the text encoder's attention projections get adapters too."),
    )  # fmt: skip

    # Diffusion
    prediction_type: Literal["epsilon", "v_prediction"] | None = field(
        default=None, metadata=_help("What the UNet predicts; by default what the base model's scheduler says.")
    )
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] | None = field(
        default=None,
        metadata=_help("Override the base scheduler's noise schedule (squaredcos_cap_v2 is the cosine schedule); "
                       "mostly useful with --unet_config."),
    )  # fmt: skip
    noise_offset: float = field(default=0.0, metadata=_help("Scale of offset noise (0.1 is common); 0 disables it."))
    input_perturbation: float = field(
        default=0.0, metadata=_help("Scale of input perturbation (Ning et al. 2023; 0.1 is recommended).")
    )
    dream_training: bool = field(
        default=False,
        metadata=_help("DREAM (Zhou et al. 2024): train on the noisy latents the model's own estimate leads to; one "
                       "more UNet forward (without gradients) per step; epsilon prediction only."),
    )  # fmt: skip
    dream_detail_preservation: float = field(
        default=1.0, metadata=_help("DREAM's p in λ = (√(1−ᾱ_t))^p (with --dream_training).")
    )

    # EMA (decay warm-up as diffusers' EMAModel)
    use_ema: bool = field(default=False, metadata=_help("Keep an EMA of the UNet; it is validated and saved."))
    ema_decay: float = field(default=0.9999, metadata=_help("Maximum EMA decay."))
    ema_min_decay: float = field(default=0.0, metadata=_help("Minimum EMA decay."))
    ema_update_after_step: int = field(default=0, metadata=_help("Copy the weights until this many steps."))
    ema_use_warmup: bool = field(
        default=False, metadata=_help("Decay 1-(1+step/inv_gamma)^-power instead of (1+step)/(10+step).")
    )
    ema_inv_gamma: float = field(default=1.0, metadata=_help("inv_gamma of the EMA warm-up (with --ema_use_warmup)."))
    ema_power: float = field(default=2 / 3, metadata=_help("power of the EMA warm-up (with --ema_use_warmup)."))
    foreach_ema: bool = field(
        default=True,
        metadata=_help("Update the EMA with multi-tensor operations over up to 64 MB of parameters each instead of "
                       "one per parameter (the same numbers; on by default here, off in diffusers)."),
    )  # fmt: skip
    offload_ema: bool = field(
        default=False,
        metadata=_help("Keep the EMA in host memory and bring it to the GPU only for its update: frees a copy of the "
                       "trained weights from the GPU, costs two transfers per step."),
    )  # fmt: skip

    # Validation
    validation_prompts: list[str] | None = field(
        default=None, metadata=_help("Prompts sampled every --validation_epochs and at the end.")
    )
    validation_epochs: int = field(
        default=5, metadata=_help("Validate after epochs 1, N+1, 2N+1, ... (as diffusers' script) and at the end.")
    )
    validation_inference_steps: int = field(default=20, metadata=_help("Sampling steps of validation images."))
    validation_guidance_scale: float = field(default=7.5, metadata=_help("Guidance scale of validation images."))

    # Outputs, logging, checkpoints
    output_dir: str = field(
        default="sd-model-finetuned", metadata=_help("Where the pipeline, checkpoints, logs and images are written.")
    )
    logging_dir: str = field(default="logs", metadata=_help("Tracker logs, relative to --output_dir."))
    report_to: str = field(
        default="tensorboard",
        metadata=_help("Trackers, comma-separated: tensorboard (needs latentdiff[tracking]), wandb, ..., all or none."),
    )
    tracker_project_name: str = field(default="text2image-fine-tune", metadata=_help("Project name of the trackers."))
    checkpointing_steps: int = field(default=500, metadata=_help("Save the full training state every this many steps."))
    checkpoints_total_limit: int | None = field(
        default=None, metadata=_help("Keep only this many checkpoints (never the one the run resumed from).")
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata=_help("A checkpoint folder (or its name in --output_dir), or 'latest'.")
    )

    # Hub
    push_to_hub: bool = field(
        default=False,
        metadata=_help("Upload the output folder at the end: the pipeline (or LoRA adapters), its model card, "
                       "validation images and logs, not the checkpoints."),
    )  # fmt: skip
    hub_model_id: str | None = field(
        default=None, metadata=_help("Repo id to push to; defaults to the output folder name.")
    )
    hub_token: str | None = field(
        default=None, repr=False, metadata=_help("Hub token; by default the one of `hf auth login` or $HF_TOKEN.")
    )

    def __post_init__(self) -> None:
        check_field_types(self)
        positive = ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "checkpointing_steps",
                    "validation_epochs", "validation_inference_steps", "ddp_timeout")  # fmt: skip
        for name in positive + ("max_train_steps", "max_train_samples", "checkpoints_total_limit", "lora_rank"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be an integer ≥ 1, got {value!r}.")
        for name in ("learning_rate", "max_grad_norm", "adam_epsilon", "ema_inv_gamma", "ema_power"):
            if not 0 < getattr(self, name) < float("inf"):  # ≤ 0 would not train, or would climb the loss
                raise ValueError(f"--{name} must be a number > 0, got {getattr(self, name)!r}.")
        for name in ("adam_weight_decay", "noise_offset", "input_perturbation", "validation_guidance_scale",
                     "dream_detail_preservation"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"--{name} must be a number ≥ 0, got {getattr(self, name)!r}.")
        for name in ("dataloader_num_workers", "lr_warmup_steps", "ema_update_after_step"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be ≥ 0, got {getattr(self, name)!r}.")
        for name in ("caption_dropout", "ema_decay", "ema_min_decay"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name} must be between 0 and 1, got {getattr(self, name)!r}.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= (beta := getattr(self, name)) < 1.0:
                raise ValueError(f"--{name} must be ≥ 0 and < 1 (AdamW's defaults: 0.9, 0.999), got {beta!r}.")
        self._check_lora()
        self._check_companions()
        if self.seed is not None and self.seed < 0:  # numpy's seeds (up to LARGEST_INT), which `set_seed` sets too
            raise ValueError(f"--seed must be an integer from 0 to 2**32 - 1, got {self.seed!r}.")
        if self.snr_gamma is not None and not 0 < self.snr_gamma < float("inf"):
            raise ValueError(f"--snr_gamma must be > 0 (5.0 is recommended), got {self.snr_gamma!r}.")
        for name in PATH_FIELDS:
            if (value := getattr(self, name)) is not None and not value.strip():  # "" would mean the current folder
                raise ValueError(f"--{name} is empty: give a path (or leave the option out).")
        if not 8 <= self.resolution <= LARGEST_RESOLUTION or self.resolution % 8:
            raise ValueError(f"--resolution must be a positive multiple of 8, at most {LARGEST_RESOLUTION} (SD 1.x "
                             f"trains at 512, 2.x at 768), got {self.resolution!r}.")  # fmt: skip
        if self.dataloader_num_workers > 4 * (cores := os.cpu_count() or 1):
            raise ValueError(f"--dataloader_num_workers {self.dataloader_num_workers} is more than 4 per CPU core "
                             f"({4 * cores} here): each worker is a process with its own memory; 0 to {cores} is "
                             "usual.")  # fmt: skip
        if self.dataset_name is None and self.train_data_dir is None:
            raise ValueError("Give the training data: --dataset_name (Hub id, file or folder) or --train_data_dir.")
        if self.cache_latents and (not self.center_crop or self.random_flip):
            raise ValueError(
                "--cache_latents encodes each image once, so it cannot train on random crops or flips: "
                "pass --center_crop and leave out --random_flip (or drop --cache_latents)."
            )
        self.trackers()  # checks --report_to
        for name in ("output_dir", "cache_dir"):
            if (value := getattr(self, name)) is not None and Path(value).is_file():
                raise ValueError(f"--{name} {value} is a file: give a folder (it is created if missing).")
        if self.unet_config is not None and not Path(self.unet_config).exists():
            raise FileNotFoundError(
                f"--unet_config {self.unet_config} does not exist: give a config.json or its folder."
            )
        if self.resume_from_checkpoint not in (None, "latest"):
            resolve_checkpoint(self.output_dir, self.resume_from_checkpoint)  # raises FileNotFoundError

    def _changed(self, names: tuple[str, ...]) -> list[str]:
        """Which of the fields `names` are set away from their defaults."""
        defaults = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
                    for f in dataclasses.fields(self) if f.name in names}  # fmt: skip
        return [name for name in names if getattr(self, name) != defaults[name]]

    def _check_companions(self) -> None:
        """An option that acts only with another one is an error without it, instead of being silently ignored."""
        for names, needed, flag, what in ((EMA_FIELDS, self.use_ema, "--use_ema", "an EMA option"),
                                          (EMA_WARMUP_FIELDS, self.ema_use_warmup, "--ema_use_warmup",
                                           "a setting of the EMA warm-up"),
                                          (("dream_detail_preservation",), self.dream_training, "--dream_training",
                                           "a setting of DREAM")):  # fmt: skip
            changed = [] if needed else self._changed(names)
            if changed:
                raise ValueError(f"--{changed[0]} is {what}: add {flag} for it to take effect, or leave it out.")

    def _check_lora(self) -> None:
        items = self.lora_target_modules  # "to_q,to_k" or ["to_q", "to_k"] (a string became a one-item list)
        self.lora_target_modules = [name.strip() for item in items for name in item.split(",") if name.strip()]
        if self.lora_rank is None:
            changed = self._changed(LORA_FIELDS)
            if changed:
                raise ValueError(f"--{changed[0]} is a LoRA option: add --lora_rank (e.g. 8) to train LoRA adapters.")
            return
        if self.unet_config is not None:
            raise ValueError("--lora_rank trains adapters on a pretrained UNet; it cannot be combined with "
                             "--unet_config (a UNet from scratch): drop one of them.")  # fmt: skip
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"--lora_alpha must be > 0, got {self.lora_alpha!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if not self.lora_target_modules:
            raise ValueError("--lora_target_modules is empty: name the UNet modules to adapt, e.g. to_q to_k to_v.")

    def trackers(self) -> list[str]:
        """`report_to` as Accelerate's `log_with` list (empty for `none`)."""
        names = [name.strip() for name in self.report_to.split(",") if name.strip()]
        if names in ([], ["none"]):
            return []
        if names == ["all"]:
            return ["all"]
        unknown = [name for name in names if name not in TRACKERS]
        if unknown:
            raise ValueError(f"--report_to {self.report_to!r}: unknown tracker(s) {unknown}; choose from {TRACKERS}, "
                             "'all' or 'none'.")  # fmt: skip
        return names

    def to_dict(self) -> dict[str, Any]:
        """The options without secrets (the Hub token): what trackers, logs and model cards may show."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in SECRET_FIELDS}
