"""The demo's tiny base model: built here once (no pretrained VAE or CLIP weights can be downloaded), committed
under ``base_model/``, and reused.

``build_base`` trains it in stages, each written atomically under ``work_dir`` and reused when present, so an
interrupted build resumes at the stage (and, for the UNet, the checkpoint) it was in:

1. ``vae/``: a small ``AutoencoderKL`` trained on the emoji images (``latentdiff.vae_training``);
2. ``init/``: a pipeline folder with that VAE, the real CLIP tokenizer, a fresh small ``CLIPTextModel`` and
   SD's noise schedule (``latentdiff.tiny``), plus ``unet_config.json``;
3. ``train/``: the UNet trained from scratch together with the text encoder *by the fine-tuning code*
   (``latentdiff.training.train`` with ``unet_config`` and ``train_text_encoder``): one training loop for all.

The result is saved in fp16 (a few MB, small enough to commit) with ``build_info.json`` and a README stating
the command and the measured figures; ``load_base`` turns it back into an fp32 folder in the cache, which is
what training and sampling on a CPU want.
"""

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from .atomic import atomic_dir, atomic_write_text
from .cache import cache_dir
from .components import vae_scale_factor
from .emoji import EmojiDataset, load_images
from .pipelines import LatentDiffusionPipeline
from .tiny import tiny_components
from .training import TrainConfig, train
from .vae_training import VAETrainConfig, reconstruction_psnr, train_vae

logger = logging.getLogger(__name__)

BUILD_INFO = "build_info.json"
REBUILD_COMMAND = "latentdiff demo --rebuild-base"


@dataclass
class BaseConfig:
    """Sizes and training budgets of the base (the defaults are the committed base's)."""

    vae: VAETrainConfig = field(default_factory=VAETrainConfig)
    text_hidden_size: int = 64  # CLIP text width = the UNet's cross_attention_dim
    unet: dict = field(default_factory=lambda: dict(
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=32,
    ))  # fmt: skip
    unet_steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 5e-4
    lr_warmup_steps: int = 100
    caption_dropout: float = 0.1
    checkpointing_steps: int = 250  # a killed build resumes from the last of these
    seed: int = 0

    def fingerprint(self) -> str:
        """A short hash of every setting: build stages of another configuration are never reused."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def default_base_dir() -> Path:
    """``base_model/`` of the repository checkout, or ``<cache>/base_model`` when latentdiff is not run from one."""
    repo = Path(__file__).resolve().parents[1]
    return repo / "base_model" if (repo / "pyproject.toml").is_file() else cache_dir() / "base_model"


def build_vae_stage(data: EmojiDataset, config: BaseConfig, work_dir: Path) -> tuple[AutoencoderKL, dict]:
    """Stage 1: the autoencoder, trained on the training split; its PSNR measured on the held-out split."""
    folder = work_dir / "vae"
    if not (folder / "stats.json").is_file():
        vae_config = config.vae
        images = load_images(data.train_dir, vae_config.resolution)
        start = time.perf_counter()
        vae = train_vae(images, vae_config)
        seconds = time.perf_counter() - start
        psnr = reconstruction_psnr(vae, load_images(data.test_dir, vae_config.resolution))
        stats = dict(psnr_db=round(psnr, 2), steps=vae_config.steps, seconds=round(seconds),
                     torch_threads=torch.get_num_threads())  # fmt: skip
        with atomic_dir(folder) as tmp:
            vae.save_pretrained(tmp)
            (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
        logger.info("VAE: %.2f dB PSNR on held-out images after %d steps (%d s)", psnr, vae_config.steps, seconds)
    stats = json.loads((folder / "stats.json").read_text())
    return AutoencoderKL.from_pretrained(folder, dtype=torch.float32), stats


def build_init_stage(vae: AutoencoderKL, config: BaseConfig, work_dir: Path) -> Path:
    """Stage 2: the untrained pipeline folder around the trained VAE, and the UNet config to train from."""
    folder = work_dir / "init"
    if not (folder / "unet_config.json").is_file():
        resolution = config.vae.resolution
        parts = tiny_components(config.seed, image_size=resolution, vae_channels=tuple(config.vae.block_out_channels),
                                text_hidden_size=config.text_hidden_size)  # fmt: skip
        parts["vae"] = vae
        latent_channels = vae.config.latent_channels
        unet_config = dict(config.unet, sample_size=resolution // vae_scale_factor(vae), in_channels=latent_channels,
                           out_channels=latent_channels, cross_attention_dim=config.text_hidden_size)
        with atomic_dir(folder) as tmp:
            LatentDiffusionPipeline(**parts).save_pretrained(tmp)
            (tmp / "unet_config.json").write_text(json.dumps(unet_config, indent=1))
    return folder


def emoji_train_config(data: EmojiDataset, resolution: int, **options: Any) -> TrainConfig:
    """A `TrainConfig` on the emoji training split with what every run on it shares (the base's stage 3, the demo's
    fine-tuning): square images (center crop is a no-op that allows the latent cache), resized bilinearly as the
    committed base was trained, cached latents, the text encoder trained with the UNet, no trackers; `options` give
    the rest. The `datasets` cache of the images goes into latentdiff's cache too."""
    shared = dict(train_data_dir=str(data.train_dir), resolution=resolution, center_crop=True, cache_latents=True,
                  image_interpolation_mode="bilinear", train_text_encoder=True, report_to="none",
                  cache_dir=str(cache_dir() / "datasets"))  # fmt: skip
    return TrainConfig(**{**shared, **options})


def train_stage_config(init: Path, data: EmojiDataset, config: BaseConfig, output_dir: Path) -> TrainConfig:
    """Stage 3's options: a UNet from scratch and the text encoder, on the training split (latents cached)."""
    return emoji_train_config(
        data,
        config.vae.resolution,
        pretrained_model_name_or_path=str(init),
        unet_config=str(init / "unet_config.json"),
        caption_dropout=config.caption_dropout,
        train_batch_size=config.batch_size,
        max_train_steps=config.unet_steps,
        learning_rate=config.learning_rate,
        lr_scheduler="cosine",
        lr_warmup_steps=config.lr_warmup_steps,
        seed=config.seed,
        mixed_precision="no",
        checkpointing_steps=config.checkpointing_steps,
        checkpoints_total_limit=1,
        resume_from_checkpoint="latest",
        output_dir=str(output_dir),
    )


def build_base(data: EmojiDataset, config: BaseConfig | None = None, out_dir: Path | None = None,
               work_dir: Path | None = None) -> Path:  # fmt: skip
    r"""Trains the base model in stages and writes it, in fp16, as a diffusers pipeline folder.

    Args:
        data (`EmojiDataset`): the emoji data set (`latentdiff.emoji.prepare_emoji_dataset`).
        config (`BaseConfig`, *optional*): sizes and budgets; the committed base's by default.
        out_dir (`Path`, *optional*, defaults to `default_base_dir()`): the pipeline folder to (re)write.
        work_dir (`Path`, *optional*, defaults to `<cache>/base-build-<fingerprint>`): the stages' folders.

    Returns:
        `Path` of `out_dir`, holding the pipeline, `build_info.json` and `README.md`.
    """
    config = config or BaseConfig()
    out_dir = Path(out_dir) if out_dir is not None else default_base_dir()
    work_dir = Path(work_dir) if work_dir is not None else cache_dir() / f"base-build-{config.fingerprint()}"
    vae, vae_stats = build_vae_stage(data, config, work_dir)
    init = build_init_stage(vae, config, work_dir)
    trained = work_dir / "train"
    stats_file = work_dir / "train_stats.json"
    if not stats_file.is_file():
        start = time.perf_counter()
        train(train_stage_config(init, data, config, trained))
        stats = dict(steps=config.unet_steps, seconds=round(time.perf_counter() - start))
        atomic_write_text(stats_file, json.dumps(stats))  # the stage's completion marker: whole or absent
    unet_stats = json.loads(stats_file.read_text())

    pipeline = LatentDiffusionPipeline.from_pretrained(trained, dtype=torch.float32)
    info = dict(command=REBUILD_COMMAND, config=asdict(config), vae=vae_stats, unet=unet_stats,
                num_train_images=data.num_train, num_heldout_images=data.num_heldout,
                torch=torch.__version__, torch_threads=torch.get_num_threads())  # fmt: skip
    with atomic_dir(out_dir) as tmp:
        pipeline.to(torch.float16).save_pretrained(tmp)
        (tmp / BUILD_INFO).write_text(json.dumps(info, indent=1))
        (tmp / "README.md").write_text(base_readme(info))
    return out_dir


def load_base(base_dir: Path | None = None) -> Path:
    """An fp32 copy of the (fp16) base folder in the cache, made once per version of its weights.

    Raises:
        FileNotFoundError: when ``base_dir`` holds no base model (build one with ``latentdiff demo --rebuild-base``).
    """
    base_dir = Path(base_dir) if base_dir is not None else default_base_dir()
    if not (base_dir / "model_index.json").is_file():
        raise FileNotFoundError(
            f"No base model in {base_dir} (no model_index.json). Build it with `{REBUILD_COMMAND}` "
            "(about an hour on 2 CPU cores), or run from a repository checkout, which ships base_model/."
        )
    digest = hashlib.sha256()
    for path in sorted(base_dir.rglob("*")):
        if path.is_file() and path.name != "README.md":  # weights and configs, not prose
            digest.update(path.relative_to(base_dir).as_posix().encode() + path.read_bytes())
    fp32_dir = cache_dir() / f"base-fp32-{digest.hexdigest()[:12]}"
    if not (fp32_dir / "model_index.json").is_file():
        pipeline = LatentDiffusionPipeline.from_pretrained(base_dir, dtype=torch.float32)
        with atomic_dir(fp32_dir) as tmp:
            pipeline.save_pretrained(tmp)
            shutil.copy(base_dir / BUILD_INFO, tmp / BUILD_INFO)
    return fp32_dir


def base_readme(info: dict) -> str:
    """The base folder's README: what it is, the exact command that rebuilt it, and what was measured."""
    config, vae, unet = info["config"], info["vae"], info["unet"]
    side = config["vae"]["resolution"]
    latent_side = side // 2 ** (len(config["vae"]["block_out_channels"]) - 1)
    latent = f"{config['vae']['latent_channels']}×{latent_side}×{latent_side}"
    blocks = tuple(config["vae"]["block_out_channels"])
    vae_what = f"AutoencoderKL, blocks {blocks}, {side}×{side} images → {latent} latents"
    vae_measured = (
        f"{vae['psnr_db']} dB PSNR on the {info['num_heldout_images']} held-out images; "
        f"{vae['steps']} steps, batch {config['vae']['batch_size']}, {vae['seconds'] / 60:.1f} min"
    )
    unet_what = (
        f"latentdiff's UNet2DConditionModel, blocks {tuple(config['unet']['block_out_channels'])}, trained from "
        f"scratch by `latentdiff.training.train` (`unet_config`, `train_text_encoder`, caption dropout "
        f"{config['caption_dropout']})"
    )
    unet_measured = f"{unet['steps']} steps, batch {config['batch_size']}, {unet['seconds'] / 60:.1f} min"
    tokenizer_what = "SD-1.x's CLIP BPE tokenizer (49,408 tokens, from open-clip-torch's vocabulary)"
    text_what = f"CLIPTextModel, width {config['text_hidden_size']}, 2 layers, trained from scratch with the UNet"
    return f"""# The demo's tiny base model

A text-to-image latent diffusion model trained from scratch on the {info['num_train_images']} training images
of the emoji data set (`emoji-datasource-google` 16.0.0; images Apache-2.0), because no pretrained VAE or CLIP
weights can be downloaded offline. A diffusers pipeline folder (fp16 safetensors): `latentdiff demo` loads it
in fp32 and fine-tunes it.

Rebuilt by `latentdiff.base.build_base`, which this command runs (before the demo) when asked to:

```bash
{info['command']}
```

| part | what | measured |
|---|---|---|
| tokenizer | {tokenizer_what} | - |
| vae | {vae_what} | {vae_measured} |
| text_encoder | {text_what} | - |
| unet | {unet_what} | {unet_measured} |

Times are wall-clock on a 2-core CPU machine shared with other jobs (torch {info['torch']}, {info['torch_threads']}
thread(s): `OMP_NUM_THREADS=1` avoids thread oversubscription when cores are shared).
All settings: `build_info.json`.
"""
