"""Generate images to files: the library side of ``latentdiff generate`` (the CLI only parses and prints).

Each image has its own seed (`seed + k` for the k-th image overall), drawn on the CPU, so an image is
reproducible on any device and whatever batch it was generated in.
"""

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE as LORA_WEIGHT_NAME
from PIL import Image
from safetensors import SafetensorError

from latentdiff.atomic import atomic_file, check_writable, make_folder
from latentdiff.hub import as_hub_id, reaching_the_hub
from latentdiff.pipelines import LatentDiffusionPipeline
from latentdiff.pipelines.inputs import is_finite_number

# Short name → (scheduler class, config overrides). Each is built with `from_config(pipe.scheduler.config)`,
# so the model's noise schedule and prediction type carry over.
SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpm++_karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
}
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip


@dataclass
class GenerationResult:
    """What `generate_images` wrote: one PNG per image (prompt-major order), their seeds, and the grid."""

    image_paths: list[Path]
    seeds: list[int]
    grid_path: Path


def _scheduler_entry(name: str) -> tuple[type, dict]:
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}.")
    return SCHEDULERS[name]


def set_scheduler(pipe: LatentDiffusionPipeline, name: str) -> None:
    """Swap the pipeline's sampler by short name (see `SCHEDULERS`), keeping the model's noise schedule."""
    cls, overrides = _scheduler_entry(name)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **overrides)


def _resolve_dtype(torch_dtype: torch.dtype | str | None) -> torch.dtype | None:
    if torch_dtype is None or isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype not in DTYPES:
        raise ValueError(f"Unknown torch_dtype {torch_dtype!r}: choose one of {', '.join(DTYPES)}.")
    return DTYPES[torch_dtype]


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to generate on (default: CUDA, else MPS, else CPU); a clear error for one that is not here."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"Unknown device {device!r}: use cpu, cuda, cuda:1 or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {str(device)!r}: no CUDA GPU is available to this torch ({torch.__version__}); "
                         "use cpu.")  # fmt: skip
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"Device {str(device)!r}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"Device {str(device)!r}: MPS is not available here; use cpu.")
    return device


def _slug(text: str, max_length: int = 40) -> str:
    """A file-name-safe short form of a prompt: "A red apple!" → "a-red-apple"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_length].rstrip("-") or "empty"


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically, so a crash never leaves a truncated image at `path`."""
    with atomic_file(path) as handle:
        image.save(handle, format="PNG")


def make_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Tile equally sized images row by row, `columns` per row."""
    width, height = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


@dataclass(frozen=True)
class LoraSource:
    """Where `--lora` points, resolved before the base model loads (a typo should not cost a model load)."""

    given: str  # as the user wrote it, for messages
    location: str  # what `load_lora_weights` takes: a folder or a Hub id
    options: dict[str, str]  # `weight_name` for a file
    hub_id: str | None  # set when nothing local matched: downloaded while loading


def lora_source(lora: str | os.PathLike) -> LoraSource:
    """Check a `--lora` folder, `.safetensors` file or Hub id."""
    path = Path(lora)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(
                f"--lora {path} is not a .safetensors file: only safetensors LoRA files load here (pickle files can "
                "run code when loaded). Convert it, or load it in Python with pipe.load_lora_weights(..., "
                "allow_pickle=True)."
            )
        return LoraSource(str(lora), str(path.parent), {"weight_name": path.name}, None)
    if path.is_dir():
        if not (path / LORA_WEIGHT_NAME).is_file():
            if pickles := sorted(p.name for p in path.glob("*.bin")):
                raise ValueError(
                    f"--lora {path} holds only pickle weights ({', '.join(pickles)}), which can run code when "
                    "loaded: convert them to safetensors, or load them in Python with pipe.load_lora_weights(..., "
                    "allow_pickle=True) if you trust them."
                )
            raise FileNotFoundError(
                f"--lora {path} holds no {LORA_WEIGHT_NAME}: give the output folder of a LoRA run (--lora_rank) "
                "or the .safetensors file itself."
            )
        return LoraSource(str(lora), str(path), {}, None)
    if (hub_id := as_hub_id(str(lora))) is None:
        raise FileNotFoundError(f"--lora {lora} does not exist: give a LoRA folder, file or Hub id.")
    return LoraSource(str(lora), hub_id, {}, hub_id)


def load_lora(pipe: LatentDiffusionPipeline, source: LoraSource, scale: float = 1.0) -> None:
    """Load the LoRA adapters `source` names into `pipe` at strength `scale`."""
    lora, hub_id, location, options = source.given, source.hub_id, source.location, source.options
    try:
        with reaching_the_hub(f"download the LoRA {hub_id}") if hub_id else contextlib.nullcontext():
            pipe.load_lora_weights(location, adapter_name="lora", **options)
    except (RuntimeError, ValueError, KeyError) as error:  # shapes or names that are not this model's
        raise ValueError(
            f"--lora {lora} does not fit this model ({_summary(error, prefer='mismatch')}). A LoRA loads on the base "
            "model it was trained on (same UNet and text encoder sizes): pass that model as --model."
        ) from error
    except (OSError, SafetensorError) as error:  # no network, no such Hub repo, or a file that is no LoRA weights
        if hub_id:
            raise FileNotFoundError(
                f"--lora {lora} is no local folder or file, and the Hub did not give it: {_summary(error)}"
            ) from error
        raise ValueError(
            f"--lora {lora} is not a LoRA weights file ({_summary(error)}): give the output folder of a LoRA run "
            f"(--lora_rank) or its {LORA_WEIGHT_NAME}."
        ) from error
    pipe.set_adapters(["lora"], adapter_weights=[scale])


def _summary(error: Exception, prefer: str = "") -> str:
    """One line of a (possibly multi-line) error: the first line mentioning `prefer`, else the first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return next((line for line in lines if prefer and prefer in line), lines[0])[:300]


def generate_images(
    model: str,
    prompts: list[str],
    *,
    output_dir: str | Path,
    negative_prompt: str | None = None,
    scheduler: str = "ddim",
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    seed: int = 0,
    num_images_per_prompt: int = 1,
    height: int | None = None,
    width: int | None = None,
    device: str | torch.device | None = None,
    torch_dtype: torch.dtype | str | None = None,
    lora: str | os.PathLike | None = None,
    lora_scale: float = 1.0,
    clip_skip: int | None = None,
    variant: str | None = None,
) -> GenerationResult:
    r"""Load a model, generate `num_images_per_prompt` images per prompt, and write PNGs plus a grid.

    Args:
        model (`str`): Local pipeline folder or Hub id.
        prompts (`list[str]`): The prompts; the grid has one row per prompt.
        output_dir (`str` or `Path`): Created if needed; gets `{k:03d}-{prompt-slug}-seed{seed}.png` and `grid.png`.
        negative_prompt (`str`, *optional*): Used for every prompt.
        scheduler (`str`, *optional*, defaults to `"ddim"`): A key of `SCHEDULERS` (ddim, ddpm, euler, dpm++, ...).
        num_inference_steps (`int`, *optional*, defaults to 50), guidance_scale (`float`, *optional*, defaults to 7.5).
        seed (`int`, *optional*, defaults to 0): Image k (over all prompts) uses seed `seed + k`.
        num_images_per_prompt (`int`, *optional*, defaults to 1).
        height / width (`int`, *optional*): Default: the model's native size.
        device (`str`, *optional*): Default: CUDA, else MPS, else CPU.
        torch_dtype (`torch.dtype` or `str`, *optional*): e.g. `"fp16"` on a GPU; default float32.
        lora (`str` or `os.PathLike`, *optional*): LoRA adapters to load on top of `model`: a folder or Hub id holding
            `pytorch_lora_weights.safetensors` (what `latentdiff train --lora_rank` writes), or the file itself.
        lora_scale (`float`, *optional*, defaults to 1.0): Strength of the adapters; 0 gives the base model.
        clip_skip (`int`, *optional*): Condition on the text encoder's layer this many before the last.
        variant (`str`, *optional*): Weights variant such as `"fp16"` (`*.fp16.safetensors`), for a model that has
            no plain weights; a part without the variant loads its plain weights.

    Returns:
        `GenerationResult` with the image paths, their seeds and the grid path.
    """
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}.")
    _scheduler_entry(scheduler)  # fail before the (slow) model load
    device = _resolve_device(device)
    if not is_finite_number(lora_scale):
        raise ValueError(f"lora_scale must be a finite number, got {lora_scale!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63 - 10**6:
        raise ValueError(f"seed must be an integer from 0 to {2**63 - 10**6 - 1}, got {seed!r}.")
    output_dir = Path(output_dir)
    check_writable(output_dir, "output_dir")  # before sampling, not at the first PNG
    source = None if lora is None else lora_source(lora)
    # float32 unless asked: left to the libraries, a folder stored in fp16 loads as a mix (transformers keeps the
    # text encoder's fp16, diffusers makes the UNet fp32)
    pipe = LatentDiffusionPipeline.from_pretrained(
        model, dtype=_resolve_dtype(torch_dtype) or torch.float32, variant=variant
    )
    if source is not None:
        load_lora(pipe, source, lora_scale)
    pipe = pipe.to(device)
    set_scheduler(pipe, scheduler)

    paths, seeds, images = [], [], []
    for prompt in prompts:
        prompt_seeds = [seed + len(seeds) + i for i in range(num_images_per_prompt)]
        result = pipe(
            prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt,
            height=height,
            width=width,
            generator=[torch.Generator("cpu").manual_seed(s) for s in prompt_seeds],
            clip_skip=clip_skip,
        )
        make_folder(output_dir)  # after the first images: a bad argument leaves no folder
        for image, image_seed in zip(result.images, prompt_seeds):
            path = output_dir / f"{len(paths):03d}-{_slug(prompt)}-seed{image_seed}.png"
            save_png(image, path)
            paths.append(path)
            images.append(image)
        seeds += prompt_seeds
    grid = output_dir / "grid.png"
    save_png(make_grid(images, columns=num_images_per_prompt), grid)
    return GenerationResult(image_paths=paths, seeds=seeds, grid_path=grid)
