"""Find a model's folder (a local path or the Hub snapshot of only the files it needs) and check it before loading.

A Stable Diffusion checkpoint is a folder with ``vae/``, ``text_encoder/``, ``tokenizer/``, ``unet/`` and
``scheduler/``. What a loader would report as a confusing error deep inside diffusers or transformers (a part
missing, a damaged or pickle-only weights file, a tokenizer without its vocabulary, weights only in a variant) is
refused here with the file and what to do; pickle weights only with the caller's consent, since unpickling can
run arbitrary code.
"""

import logging
import re
from collections.abc import Collection
from pathlib import Path

from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE as LORA_WEIGHT_NAME
from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open

from .hub import as_hub_id

PIPELINE_FOLDERS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
WEIGHT_FOLDERS = ("vae", "text_encoder", "unet")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")

logger = logging.getLogger(__name__)


def _hub_patterns(
    variant: str | None, allow_pickle: bool, weight_folders: tuple[str, ...] = WEIGHT_FOLDERS
) -> tuple[list[str], list[str]]:
    """Files of a Hub repo that the five parts need: configs, tokenizer files, and one set of weights."""
    allow = ["model_index.json"] + [f"{sub}/*.json" for sub in PIPELINE_FOLDERS] + ["tokenizer/*.txt"]
    suffixes = ["safetensors"] + (["bin"] if allow_pickle else [])
    ignore = []
    for sub in weight_folders:
        for suffix in suffixes:
            if variant is None:  # plain weights only: skip e.g. diffusion_pytorch_model.fp16.safetensors
                allow.append(f"{sub}/*.{suffix}")
                ignore.append(f"{sub}/*.*.{suffix}")
            else:
                allow += [f"{sub}/*.{variant}.{suffix}", f"{sub}/*.{variant}-*.{suffix}"]
    return allow, ignore


def has_variant(part: Path, variant: str) -> bool:
    """Whether a part's folder holds weights of `variant` (`*.fp16.safetensors`, shards `*.fp16-00001-of-00002.*`)."""
    return part.is_dir() and any(f".{variant}." in p.name or f".{variant}-" in p.name for p in part.iterdir())


def _check_plain_weights(folder: Path, variant: str | None, supplied: Collection[str]) -> None:
    """Without a variant, refuse a part whose weights are all variant files (`*.fp16.safetensors`): diffusers says
    only "no file named diffusion_pytorch_model.safetensors found in directory <the pipeline folder>"."""
    if variant is not None:
        return
    for sub in (sub for sub in WEIGHT_FOLDERS if sub not in supplied):
        names = sorted(p.name for p in (folder / sub).iterdir() if p.name.endswith((".safetensors", *PICKLE_SUFFIXES)))
        if names and all(name.count(".") > 1 for name in names):
            variants = sorted({name.split(".")[-2].split("-")[0] for name in names})
            raise FileNotFoundError(
                f"{folder / sub} holds only {' and '.join(variants)} weights ({', '.join(names)}), no plain ones: load "
                f"with that variant (variant={variants[0]!r}; on the command line --variant {variants[0]})."
            )


def _check_variant(folder: Path, variant: str | None) -> None:
    if variant is not None and not any(has_variant(folder / sub, variant) for sub in WEIGHT_FOLDERS):
        raise FileNotFoundError(
            f"{folder} has no {variant!r} weights in any of {', '.join(f'{sub}/' for sub in WEIGHT_FOLDERS)}: "
            "leave out the variant (--variant) to load the plain weights, or name one the model has."
        )


def check_weight_files(folder: Path, allow_pickle: bool = False, supplied: Collection[str] = ()) -> None:
    """Refuse a folder whose parts are missing, or whose weights are damaged or only in pickle formats (unless
    `allow_pickle`); the parts in `supplied` come from the caller (`from_pretrained(folder, scheduler=...)`)."""
    incomplete = any(not (folder / sub).is_dir() for sub in WEIGHT_FOLDERS)
    if incomplete and (folder / LORA_WEIGHT_NAME).is_file():
        raise FileNotFoundError(
            f"{folder} holds LoRA adapters, not a model: load its base model with the adapters on top "
            f"(latentdiff generate --model BASE --lora {folder}; in Python pipe.load_lora_weights)."
        )
    if incomplete and re.fullmatch(r"checkpoint-\d+", folder.name):
        raise FileNotFoundError(
            f"{folder} is a training checkpoint (resume it with --resume_from_checkpoint), not a pipeline: sample "
            "from the run's output folder, or put its UNet into the base pipeline: LatentDiffusionPipeline."
            f"from_pretrained(BASE, unet=UNet2DConditionModel.from_pretrained('{folder / 'unet'}'))."
        )
    for sub in (sub for sub in PIPELINE_FOLDERS if sub not in supplied):
        if not (folder / sub).is_dir():
            raise FileNotFoundError(
                f"{folder} has no {sub}/ folder: a text-to-image model folder needs {', '.join(PIPELINE_FOLDERS)}."
            )
    if "tokenizer" not in supplied:
        _check_tokenizer_files(folder / "tokenizer")
    for sub in (sub for sub in WEIGHT_FOLDERS if sub not in supplied):
        path = folder / sub
        names = sorted(p.name for p in path.iterdir())
        if safetensors := [path / name for name in names if name.endswith(".safetensors")]:
            _check_safetensors(safetensors)
            continue
        pickled = [name for name in names if name.endswith(PICKLE_SUFFIXES)]
        if not pickled:
            raise FileNotFoundError(f"{path} holds no weights file (*.safetensors); found {names}.")
        if not allow_pickle:
            raise ValueError(
                f"{path} holds only pickle weights {pickled}, and unpickling can run arbitrary code, so only "
                "safetensors load by default. If you trust this checkpoint, pass --allow_pickle (in Python "
                "allow_pickle=True), or convert it to safetensors first."
            )


def _check_tokenizer_files(tokenizer: Path) -> None:
    """Refuse a `tokenizer/` without its vocabulary or its config: transformers loads the first as a tokenizer of two
    tokens (every prompt the same ids: the model samples and trains unconditioned, silently), and the second with
    an unbounded `model_max_length` (an `OverflowError` at the first prompt)."""
    names = sorted(p.name for p in tokenizer.iterdir())
    vocabulary = "tokenizer.json" in names or {"vocab.json", "merges.txt"} <= set(names)
    missing = ([] if vocabulary else ["vocab.json + merges.txt (or tokenizer.json)"]) + (
        [] if "tokenizer_config.json" in names else ["tokenizer_config.json"]
    )
    if missing:
        raise FileNotFoundError(
            f"{tokenizer} has no {' nor '.join(missing)} (found {names}): the tokenizer is incomplete; download or "
            "copy the model again."
        )


def _check_safetensors(paths: list[Path]) -> None:
    """Read each file's header (not its weights): a truncated or damaged file is named now, instead of failing
    inside a library's loader with a message that does not say which file."""
    for path in paths:
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError as error:
            raise ValueError(
                f"{path} is damaged or truncated ({error}): download or copy the model again."
            ) from None
        except OSError:  # safetensors reports a file it may not read as "No such file or directory"
            if not path.exists():
                raise
            raise PermissionError(f"{path} exists but cannot be read: check its permissions.") from None


def resolve_model_folder(
    pretrained_model_name_or_path: str | Path,
    *,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    allow_pickle: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
    supplied: Collection[str] = (),
) -> Path:
    r"""The local folder of a model: the path itself, or the cached Hub snapshot of the files we need.

    Only the five parts are fetched from the Hub (no safety checker, no other variants, pickle files only when
    `allow_pickle`), then the weights are checked with `check_weight_files`. `token` and `force_download` are
    `huggingface_hub.snapshot_download`'s (a private or gated model needs the token, or `hf auth login`).
    `supplied` names the parts the caller gives instead of the folder's.

    Raises:
        `FileNotFoundError`: The name is no local folder and the Hub could not be reached (or has no such model).
        `ValueError`: The weights are pickle files and `allow_pickle` is `False`.
    """
    path = Path(pretrained_model_name_or_path)
    if path.is_file():  # without this check the file name would be tried as a Hub id
        raise ValueError(
            f"{path} is a single file, but a model is a diffusers folder (model_index.json, unet/, vae/, ...). "
            "Convert it with diffusers: StableDiffusionPipeline.from_single_file(path).save_pretrained(folder)"
            + (f" (a {path.suffix} is a pickle: unpickling runs code, only convert files you trust)." if path.suffix in
               PICKLE_SUFFIXES else ".")
        )  # fmt: skip
    if path.is_dir():
        folder = path
    elif as_hub_id(str(pretrained_model_name_or_path)) is None:  # a path, not a repo id: the Hub cannot have it
        raise FileNotFoundError(
            f"{str(pretrained_model_name_or_path)!r} does not exist: give a diffusers pipeline folder (model_index.json, "
            "unet/, vae/, ...) or a Hub id such as org/name."
        )
    else:
        download = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
                        force_download=force_download)  # fmt: skip
        try:
            allow, ignore = _hub_patterns(variant, allow_pickle)
            folder = Path(snapshot_download(str(pretrained_model_name_or_path), allow_patterns=allow,
                                            ignore_patterns=ignore, **download))  # fmt: skip
            if plain := tuple(sub for sub in WEIGHT_FOLDERS if variant and not has_variant(folder / sub, variant)):
                allow, ignore = _hub_patterns(None, allow_pickle, weight_folders=plain)  # the same snapshot folder
                snapshot_download(str(pretrained_model_name_or_path), allow_patterns=allow, ignore_patterns=ignore,
                                  **download)  # fmt: skip
        except (OSError, ValueError) as error:  # offline, no such repo, not a valid repo id, not in the cache
            raise FileNotFoundError(
                f"{str(pretrained_model_name_or_path)!r} is not a local folder, and the Hub could not be reached: "
                f"{type(error).__name__}: {' '.join(str(error).split())}"  # one line: huggingface_hub's have two
            ) from error
    check_weight_files(folder, allow_pickle, supplied)
    _check_plain_weights(folder, variant, supplied)
    _check_variant(folder, variant)
    return folder
