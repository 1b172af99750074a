"""Stable Diffusion's folder format, read and written both ways by `LatentDiffusionPipeline`.

* `from_pretrained` opens any SD-1.x/2.x diffusers folder or Hub id, always with *our* `UNet2DConditionModel`
  (same config keys and weights as diffusers'), safetensors only unless `allow_pickle=True`.
* `save_pretrained` writes a folder whose `model_index.json` names `StableDiffusionPipeline` and diffusers'
  `UNet2DConditionModel`, with no safety checker, so plain diffusers (without latentdiff) opens it with
  `DiffusionPipeline.from_pretrained(folder)` or `StableDiffusionPipeline.from_pretrained(folder)`.
"""

import json
import os
from pathlib import Path
from typing import Any, Self

import torch
from diffusers import DiffusionPipeline

from latentdiff.components import load_unet, unet_sharing_weights
from latentdiff.model_folder import PIPELINE_FOLDERS, resolve_model_folder
from latentdiff.models import UNet2DConditionModel
from latentdiff.tokenizer import save_vocab_files

# What model_index.json says, so that plain diffusers loads our folders as a Stable Diffusion pipeline.
STABLE_DIFFUSION_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
}


class StableDiffusionFolderMixin:
    """The loading and saving overrides of a `DiffusionPipeline` subclass (listed before `DiffusionPipeline` among
    its bases) that holds our UNet in a Stable Diffusion folder."""

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, allow_pickle: bool = False, **kwargs: Any
    ) -> Self:
        r"""Load a pipeline from a diffusers folder or a Hub id, with our UNet whatever `model_index.json` names.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): Local folder or Hub id (SD-1.x/2.x layout).
            allow_pickle (`bool`, *optional*, defaults to `False`): Also load `.bin` weights (unpickling can run
                arbitrary code: only for checkpoints you trust).
            kwargs: As `DiffusionPipeline.from_pretrained`: `revision`, `variant`, `dtype`, `cache_dir`,
                `local_files_only`, `token`, `force_download`, components to use instead of the saved ones
                (`scheduler=...`), ... Without `dtype` every part loads in float32, as diffusers' models do:
                transformers would keep an fp16-stored text encoder in fp16 beside an fp32 UNet, which gives other
                images than float32.
        """
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            kwargs["dtype"] = torch.float32
        for name in ("dtype", "torch_dtype"):  # diffusers loads float32 for a string, with a warning only
            if not isinstance(kwargs.get(name, torch.float32), (torch.dtype, dict)):
                raise ValueError(f"{name} must be a torch.dtype such as torch.float16 (or a dict of them by "
                                 f"component), got {kwargs[name]!r}.")  # fmt: skip
        folder = resolve_model_folder(
            pretrained_model_name_or_path,
            revision=kwargs.pop("revision", None),
            variant=kwargs.get("variant"),
            cache_dir=kwargs.pop("cache_dir", None),
            local_files_only=kwargs.pop("local_files_only", False),
            allow_pickle=allow_pickle,
            token=kwargs.pop("token", None),
            force_download=kwargs.pop("force_download", False),
            supplied=[name for name in PIPELINE_FOLDERS if kwargs.get(name) is not None],
        )
        _check_model_index(Path(folder) / "model_index.json")
        if "unet" not in kwargs:
            dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))  # torch_dtype: the deprecated name
            if isinstance(dtype, dict):  # diffusers' per-component dtypes
                dtype = dtype.get("unet", dtype.get("default"))
            kwargs["unet"] = load_unet(
                folder, variant=kwargs.get("variant"), torch_dtype=dtype, allow_pickle=allow_pickle
            )
        kwargs.setdefault("use_safetensors", None if allow_pickle else True)
        return super().from_pretrained(folder, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs: Any) -> Self:
        r"""diffusers' `from_pipe`: this pipeline on the components of another, without new memory. A diffusers
        UNet (e.g. of a `StableDiffusionPipeline`) becomes ours on the same weight tensors; diffusers' `from_pipe`
        would leave it out, since it keeps only components of the class that this pipeline declares."""
        unet = kwargs.get("unet", getattr(pipeline, "unet", None))
        if unet is not None and not isinstance(unet, UNet2DConditionModel):
            kwargs["unet"] = unet_sharing_weights(unet)
        return super().from_pipe(pipeline, **kwargs)

    def load_lora_weights(
        self, pretrained_model_name_or_path_or_dict: str | os.PathLike | dict, adapter_name: str | None = None,
        allow_pickle: bool = False, **kwargs: Any,
    ) -> None:  # fmt: skip
        r"""diffusers' `load_lora_weights`, from safetensors only unless `allow_pickle=True` (as `from_pretrained`):
        diffusers would fall back to a `.bin` file."""
        weight_name = str(kwargs.get("weight_name") or "")
        if not allow_pickle:
            if weight_name and not weight_name.endswith(".safetensors"):
                raise ValueError(
                    f"weight_name={weight_name!r} is a pickle file, and only safetensors LoRA files load by default: "
                    "pass allow_pickle=True if you trust it, or convert it to safetensors."
                )
            kwargs["use_safetensors"] = True
        super().load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, **kwargs)

    def to_json_string(self) -> str:
        """`model_index.json` in Stable Diffusion's form (see the module docstring), so plain diffusers loads it."""
        config = json.loads(super().to_json_string())
        config.update(STABLE_DIFFUSION_INDEX)
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Write `model_index.json`; `save_pretrained` calls this after the components, before any upload.

        It also adds `vocab.json` + `merges.txt` to `tokenizer/` (transformers 5 writes only `tokenizer.json`,
        which transformers 4's `CLIPTokenizer` cannot read), so the folder loads with either version.
        """
        if (Path(save_directory) / "tokenizer").is_dir():
            save_vocab_files(self.tokenizer, Path(save_directory) / "tokenizer")
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)


def _check_model_index(path: Path) -> None:
    """diffusers reads the file itself, and a JSON list or number there failed inside it with a `TypeError`."""
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # missing or not JSON: diffusers' own error names the file
    if not isinstance(index, dict):
        raise ValueError(
            f"{path} holds a JSON {type(index).__name__}, not the pipeline's components: restore the file (or copy "
            "it from the base model's folder)."
        )
