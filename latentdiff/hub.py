"""Model cards and uploads to the Hugging Face Hub for trained pipeline folders.

The card is the `README.md` of the output folder: YAML metadata the Hub indexes (library, tags, base model,
data set) and a body with usage, validation images and the training hyperparameters. Tokens are passed to
`huggingface_hub` only; nothing here writes or logs them.
"""

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE as LORA_WEIGHT_NAME
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from .atomic import LEFTOVER_PREFIXES, atomic_write_text

logger = logging.getLogger(__name__)

# Never uploaded: training checkpoints (resumable state, large) and the leftovers of interrupted writes.
# huggingface_hub matches with fnmatch, whose `*` also matches `/`: a folder's pattern covers its files, and
# `*/.tmp-*` finds leftovers at any depth (validation/.tmp-step_8-*).
UPLOAD_IGNORE = ["checkpoint-*"] + [
    pattern for prefix in LEFTOVER_PREFIXES for pattern in (f"{prefix}*", f"*/{prefix}*")
]
CARD_HYPERPARAMETERS = (
    "resolution", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
    "lr_warmup_steps", "max_train_steps", "num_train_epochs", "mixed_precision", "use_ema", "ema_decay",
    "snr_gamma", "noise_offset", "input_perturbation", "caption_dropout", "prediction_type", "train_text_encoder",
    "lora_rank", "lora_alpha", "lora_target_modules", "seed",
)  # fmt: skip


# No network, DNS or proxy: huggingface_hub raises its HTTP client's error, a base class of its own
# HfHubHTTPError (the first one not built in). httpx's (huggingface_hub ≥ 1) is no OSError; requests' (before) was.
_CLIENT_ERROR = next((base for base in HfHubHTTPError.__mro__[1:] if base.__module__ != "builtins"), OSError)


@contextlib.contextmanager
def reaching_the_hub(action: str) -> Iterator[None]:
    """Inside: a Hub request that could not be made becomes a `ConnectionError` saying what it was for (the
    command line's one-line error). An answer of the Hub (401, 404, ...) passes through with its own message."""
    try:
        yield
    except HfHubHTTPError:
        raise
    except _CLIENT_ERROR as error:
        raise ConnectionError(
            f"Could not reach the Hub to {action} ({type(error).__name__}: {error}): check the network, a proxy or "
            "HF_ENDPOINT."
        ) from error


def as_hub_id(name: str | None) -> str | None:
    """`name` if it reads as a Hub repo id rather than a local path, else `None`."""
    if not name or os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return None
    return name


def model_card(
    repo_id: str,
    base_model: str,
    dataset: str | None,
    hyperparameters: dict[str, Any],
    images: list[tuple[str, str]] | None = None,
    global_step: int | None = None,
    lora: bool = False,
) -> str:
    r"""The `README.md` text of a fine-tuned pipeline, or of LoRA adapters for a base pipeline.

    Args:
        repo_id (`str`): The model's Hub id (or folder name), used in the title and the usage snippet.
        base_model (`str`): What was fine-tuned; written to the metadata only when it is a Hub id.
        dataset (`str`, *optional*): The training data; written to the metadata only when it is a Hub id.
        hyperparameters (`dict`): Training options; those of `CARD_HYPERPARAMETERS` that are set are listed.
        images (`list[tuple[str, str]]`, *optional*): `(relative path, prompt)` of validation images.
        global_step (`int`, *optional*): Optimizer steps trained.
        lora (`bool`, *optional*, defaults to `False`): The folder holds LoRA adapters
            (`pytorch_lora_weights.safetensors`) that load on top of `base_model`, not a whole pipeline.
    """
    metadata: dict[str, Any] = {
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": ["latentdiff", "text-to-image", "diffusers", "stable-diffusion", "diffusers-training"]
        + (["lora"] if lora else []),
        "inference": True,
    }
    if as_hub_id(base_model):
        metadata["base_model"] = base_model
    if as_hub_id(dataset):
        metadata["datasets"] = [dataset]
    what = "LoRA adapters for" if lora else "A text-to-image model fine-tuned from"
    form = (
        f"The adapters are `{LORA_WEIGHT_NAME}` in diffusers' LoRA format." if lora
        else "It is a plain diffusers Stable Diffusion pipeline folder."
    )  # fmt: skip
    pipeline_id = base_model if lora else repo_id
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False).strip(),
        "---",
        "",
        f"# {repo_id}",
        "",
        f"{what} **{base_model}**, trained on **{dataset or 'a local data set'}** with latentdiff (Accelerate)"
        f"{f', {global_step} optimizer steps' if global_step else ''}. {form}",
        "",
        "## Usage",
        "",
        "```python",
        "import torch",
        "from diffusers import StableDiffusionPipeline",
        "",
        f'pipeline = StableDiffusionPipeline.from_pretrained("{pipeline_id}", dtype=torch.float16).to("cuda")',
        *([f'pipeline.load_lora_weights("{repo_id}")'] if lora else []),
        f"image = pipeline({json.dumps(images[0][1] if images else 'a photo of a cat')}).images[0]",  # a valid literal
        "```",
        "",
        "or with latentdiff: `LatentDiffusionPipeline.from_pretrained(...)` (same arguments).",
    ]
    if images:
        lines += ["", "## Validation images", "", "| prompt | image |", "|---|---|"]
        # one table row each: a line break (a YAML `>` prompt ends in one) would end the row half-way
        lines += [f"| {' '.join(prompt.split()).replace('|', '/')} | ![]({path}) |" for path, prompt in images]
    lines += ["", "## Training hyperparameters", ""]
    lines += [
        f"- {key}: {hyperparameters[key]}" for key in CARD_HYPERPARAMETERS if hyperparameters.get(key) is not None
    ]
    return "\n".join(lines) + "\n"


def card_for_repo(card: str, repo_id: str) -> str:
    """A card `model_card` wrote at training time, named after the output folder (`# model`), renamed for the repo
    it is pushed to: its title and the usage snippet's id. Other cards come back unchanged."""
    title = re.search(r"^# (.+)$", card, flags=re.MULTILINE)
    if title is None or "- latentdiff" not in card or title.group(1) == repo_id:
        return card
    old = title.group(1)
    card = card[: title.start()] + f"# {repo_id}" + card[title.end() :]
    # a LoRA card loads its base with from_pretrained: that id stays, even when it reads as the folder's name
    for call in ("load_lora_weights",) if re.search(r"^- lora$", card, flags=re.MULTILINE) else ("from_pretrained",):
        card = card.replace(f'{call}("{old}"', f'{call}("{repo_id}"')
    return card


def write_model_card(output_dir: str | os.PathLike, text: str) -> Path:
    """Write `text` to `output_dir/README.md` atomically."""
    return atomic_write_text(Path(output_dir) / "README.md", text)


def create_hub_repo(repo_id: str, token: str | None = None) -> str:
    """Create the model repo if needed (done before training, so a bad token fails in seconds); returns its id."""
    with reaching_the_hub(f"create the repo {repo_id}"):
        return HfApi(token=token).create_repo(repo_id, exist_ok=True).repo_id


def push_to_hub(
    folder: str | os.PathLike, repo_id: str, token: str | None = None, commit_message: str = "End of training"
) -> str:
    r"""Upload a trained pipeline or LoRA folder (weights, card, validation images, logs; no checkpoints) to the Hub.

    Args:
        folder (`str` or `os.PathLike`): The training output folder: a pipeline (`model_index.json`) or LoRA
            adapters (`pytorch_lora_weights.safetensors`).
        repo_id (`str`): Target model repo; created if missing.
        token (`str`, *optional*): Hub token; defaults to the logged-in one (`hf auth login`, `$HF_TOKEN`).
        commit_message (`str`, *optional*): Message of the upload commit.

    Returns:
        `str`: The repo id (with the namespace the Hub resolved).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: push the output folder of a training run.")
    if not any((folder / name).is_file() for name in ("model_index.json", LORA_WEIGHT_NAME)):
        raise FileNotFoundError(
            f"{folder} has no model_index.json nor {LORA_WEIGHT_NAME}: push a saved pipeline or LoRA folder."
        )
    repo_id = create_hub_repo(repo_id, token=token)
    card = folder / "README.md"
    if card.is_file() and (text := card.read_text(encoding="utf-8")) != (renamed := card_for_repo(text, repo_id)):
        write_model_card(folder, renamed)  # the folder keeps what the Hub shows
    with reaching_the_hub(f"upload {folder} to {repo_id}"):
        HfApi(token=token).upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, ignore_patterns=UPLOAD_IGNORE
        )
    logger.info(f"Uploaded {folder} to the Hub repo {repo_id}")
    return repo_id
