"""Training checkpoints: written atomically, found safely, rotated without losing the one we resumed from.

A checkpoint is the folder `output_dir/checkpoint-<step>` that `accelerator.save_state` fills (optimizer, LR
scheduler, RNG states) plus, through the hooks below, diffusers/transformers folders for the trained models
(`unet/`, `text_encoder/`), the EMA weights (`ema.safetensors`) and `training_state.json` (step and seed),
written last. Everything is first written to `.tmp-checkpoint-<step>` and renamed when complete, so a
`checkpoint-<step>` folder that exists is whole: a kill during the write leaves the previous one as "latest".
A LoRA run's checkpoint holds `pytorch_lora_weights.safetensors` (the adapters) instead of the model folders.
"""

import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..atomic import disk_full_explained, remove_folder, replace_folder
from ..components import load_matching_state_dict
from ..models import UNet2DConditionModel
from .ema import EMAModel
from .lora import LORA_WEIGHT_NAME, restore_lora, save_lora

logger = logging.getLogger(__name__)  # messages come from the main process only

PREFIX = "checkpoint-"
STATE_FILE = "training_state.json"  # written last: a checkpoint without it is not complete
EMA_FILE = "ema.safetensors"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step in a checkpoint folder's name (`checkpoint-<step>`)."""
    return int(_NAME.match(Path(path).name).group(1))


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints in `output_dir`, oldest (lowest step) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def refuse_another_runs_checkpoints(output_dir: str | os.PathLike, resume_from_checkpoint: str | None) -> None:
    """A new run (no `--resume_from_checkpoint`) in a folder with checkpoints would mix its own with them, `latest`
    would then pick the other run's, and `--checkpoints_total_limit` would delete them: refuse, saying what to do."""
    if resume_from_checkpoint is None and (existing := list_checkpoints(output_dir)):
        names = ", ".join(p.name for p in existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise ValueError(
            f"{output_dir} already holds a run's checkpoints ({names}): continue that run with "
            "--resume_from_checkpoint latest, or give this one another --output_dir."
        )


def resolve_checkpoint(output_dir: str | os.PathLike, value: str) -> Path | None:
    r"""The checkpoint folder `--resume_from_checkpoint` means, or `None` for `"latest"` when there is none yet.

    Args:
        output_dir (`str` or `os.PathLike`): The run's output folder, where `"latest"` and bare names are looked up.
        value (`str`): `"latest"`, a checkpoint folder path, or a checkpoint name inside `output_dir`.
    """
    if value == "latest":
        checkpoints = list_checkpoints(output_dir)
        if checkpoints:
            return checkpoints[-1]
        folder = Path(output_dir)
        foreign = sorted(p.name for p in folder.iterdir() if _NAME.match(p.name)) if folder.is_dir() else []
        if foreign:  # starting over would silently throw away the run they hold
            raise ValueError(
                f"--resume_from_checkpoint latest: {', '.join(foreign)} in {output_dir} "
                f"{'has' if len(foreign) == 1 else 'have'} no {STATE_FILE}, so latentdiff did not write them "
                "(diffusers' train_text_to_image.py checkpoints look like this) and cannot resume them. Resume with "
                "the script that wrote them, or train into another --output_dir."
            )
        return None
    for candidate in (Path(value), Path(output_dir) / value):
        if candidate.is_dir():
            if not (candidate / STATE_FILE).is_file():
                raise ValueError(
                    f"--resume_from_checkpoint {candidate} is not a complete checkpoint (no {STATE_FILE}; it was "
                    "interrupted while saving, or not written by latentdiff): pick another one or 'latest'."
                )
            return candidate
    available = [p.name for p in list_checkpoints(output_dir)]
    raise FileNotFoundError(
        f"--resume_from_checkpoint {value} does not exist (nor as {Path(output_dir) / value}). "
        f"Checkpoints in {output_dir}: {available or 'none'}; use one of them or 'latest'."
    )


def _by_component(accelerator: Accelerator, models: list) -> dict[str, Any]:
    """The prepared models unwrapped (DDP, torch.compile), by pipeline component name (`unet`, `text_encoder`)."""
    unwrapped = [accelerator.unwrap_model(model) for model in models]
    return {"unet" if isinstance(model, UNet2DConditionModel) else "text_encoder": model for model in unwrapped}


def register_hooks(accelerator: Accelerator, ema: EMAModel | None, lora: bool = False) -> None:
    """Make `save_state`/`load_state` store the models as safetensors folders and the EMA beside them.

    Without the hooks Accelerate pickles bare state dicts; with them a checkpoint's `unet/` is a UNet that
    `from_pretrained` loads, and the EMA is saved and restored with the rest of the training state. In a LoRA run
    (`lora=True`) only the adapters are saved, as one `pytorch_lora_weights.safetensors`: the base weights are the
    base model's, unchanged.
    """

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if weights and accelerator.is_main_process:  # no weights: FSDP / DeepSpeed saved them in their own format
            components = _by_component(accelerator, models)
            if lora:
                save_lora(output_dir, **components)
            else:
                for name, model in components.items():
                    model.save_pretrained(Path(output_dir) / name)
        weights.clear()  # saved above: Accelerate must not write them again
        if ema is not None and accelerator.is_main_process:
            state = ema.state_dict()  # the average as tensors, the rest (settings, step) as the file's metadata
            shadow = {name: tensor.cpu() for name, tensor in state.pop("shadow").items()}
            save_file(shadow, Path(output_dir) / EMA_FILE, metadata={"ema": json.dumps(state)})

    def load_hook(models: list, input_dir: str) -> None:
        components = _by_component(accelerator, models)
        models.clear()  # loaded here: Accelerate must not load them again
        if lora:
            restore_lora(input_dir, **components)
        else:
            for name, model in components.items():
                folder = Path(input_dir) / name
                if not folder.is_dir():
                    lora_run = (Path(input_dir) / LORA_WEIGHT_NAME).is_file()
                    raise FileNotFoundError(
                        f"{folder} is missing: "
                        + ("this checkpoint holds LoRA adapters: resume it with the --lora_rank it was trained with."
                           if lora_run else "the checkpoint is incomplete or was not written by latentdiff.")
                    )  # fmt: skip
                load_matching_state_dict(
                    model, type(model).from_pretrained(folder).state_dict(), f"{folder} holds another model than "
                    "this run's", "resume with the --pretrained_model_name_or_path / --unet_config of the run that "
                    "saved it, or train into a new --output_dir.",
                )  # fmt: skip
        if ema is not None:
            path = Path(input_dir) / EMA_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: this checkpoint was saved without --use_ema.")
            with safe_open(path, framework="pt") as f:
                saved = json.loads(f.metadata()["ema"])
            settings = ema.settings()
            changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
            if changed and accelerator.is_main_process:
                logger.warning(f"Resuming with changed EMA settings {changed} (saved, now): averaging on with these.")
            ema.load_state_dict({**saved, **settings, "shadow": load_file(path)})  # the run's flags, the saved average

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    state: dict[str, Any],
    total_limit: int | None = None,
    keep: Path | None = None,
) -> Path:
    r"""Save the full training state as `output_dir/checkpoint-<state["global_step"]>`, atomically.

    Every process takes part (each saves its RNG state); the main process renames the finished folder and
    then deletes the oldest checkpoints beyond `total_limit`, never `keep` (the one this run resumed from).

    Args:
        state (`dict`): JSON-serialisable bookkeeping, at least `global_step`; returned by `load_checkpoint`.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{PREFIX}{state['global_step']}"
    tmp = output_dir / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    advice = full_disk_advice(output_dir)
    with disk_full_explained(output_dir, final.name, advice, partial=tmp):
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with disk_full_explained(output_dir, final.name, advice, partial=tmp):  # a sync before the rename may say so
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            replace_folder(tmp, final)  # after a resume from an older checkpoint, the new state replaces the stale one
        logger.info(f"Saved training state to {final}")
        if total_limit is not None:
            rotate_checkpoints(output_dir, total_limit, keep, newest=final)
    accelerator.wait_for_everyone()
    return final


def full_disk_advice(output_dir: str | os.PathLike) -> str:
    """What a write that filled the disk left intact in a run's `output_dir`, and how to go on from there."""
    previous = [p.name for p in list_checkpoints(output_dir)]
    if not previous:
        return "No checkpoint has been written yet: free some space and start the run again."
    intact = f"{', '.join(previous)} {'is' if len(previous) == 1 else 'are'} intact"
    return (f"{intact}: free some space (or keep fewer checkpoints with --checkpoints_total_limit) and continue with "
            "--resume_from_checkpoint latest.")  # fmt: skip


def rotate_checkpoints(
    output_dir: str | os.PathLike, total_limit: int, keep: Path | None = None, newest: Path | None = None
) -> list[Path]:
    r"""Delete all but the newest `total_limit` complete checkpoints, and leftover partial ones.

    Args:
        keep (`Path`, *optional*): Never deleted: the checkpoint this run resumed from.
        newest (`Path`, *optional*): The checkpoint just written. Checkpoints of later steps were left by a run that
            went further before this one resumed from an earlier point: they are not this run's to delete, and
            they must not push out the one just written.
    """
    checkpoints = list_checkpoints(output_dir)
    if newest is not None:
        checkpoints = [p for p in checkpoints if checkpoint_step(p) <= checkpoint_step(newest)]
    kept = None if keep is None else Path(keep).resolve()
    removed = [p for p in checkpoints[: max(len(checkpoints) - total_limit, 0)] if p.resolve() != kept]
    removed += [p for p in Path(output_dir).glob(f".tmp-{PREFIX}*") if p.is_dir()]
    for path in removed:
        remove_folder(path)
    if removed:
        logger.info(f"Removed old checkpoints: {', '.join(p.name for p in removed)}")
    return removed


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """The `state` a checkpoint was saved with (step, seed, ...), without loading anything else."""
    return json.loads((Path(path) / STATE_FILE).read_text())


def load_checkpoint(accelerator: Accelerator, path: str | os.PathLike) -> dict[str, Any]:
    """Restore everything `save_checkpoint` saved (models, optimizer, LR scheduler, EMA, RNG); return its `state`.

    Models and EMA are safetensors; Accelerate reads the optimizer, scheduler and RNG pickles with torch's
    `weights_only` unpickler, which refuses anything but tensors and plain values: a tampered file is an error.
    """
    try:
        accelerator.load_state(str(path))
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds a pickle with more than tensors and numbers, so it was not loaded (unpickling it could run "
            f"code). Resume only from checkpoints your own runs wrote. ({str(error).splitlines()[-1]})"
        ) from error
    except FileNotFoundError as error:  # a file removed or lost after the checkpoint was completed
        if error.filename is None:  # not the OS's: a load hook's own message, which says more
            raise
        raise FileNotFoundError(
            f"{path} is incomplete: {Path(error.filename).name} is missing. Resume from another checkpoint "
            f"(--resume_from_checkpoint checkpoint-N), or remove {Path(path).name} to make `latest` skip it."
        ) from error
    return read_state(path)
