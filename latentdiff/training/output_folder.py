"""Whether `--output_dir` may take a run's files: the end of a run replaces some of its entries whole, so those
must be a run's own, the folder must be neither the model a run starts from nor inside its data, and no other run
may be writing into it."""

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from ..atomic import check_writable, make_folder
from ..model_folder import LORA_WEIGHT_NAME
from .checkpoint import list_checkpoints
from .config import TrainConfig

logger = logging.getLogger(__name__)

# How long a run waits for its output folder's lock before it refuses: a run killed a moment ago holds it until all
# its processes have ended, its data loader workers too, which inherit it (0.05 s after a SIGKILL, measured).
LOCK_WAIT_S = 10.0

# What the end of a run replaces whole (the pipeline's parts and the card), or writes over (the LoRA file).
REPLACED_ENTRIES = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "README.md",
                    "training_config.json", LORA_WEIGHT_NAME)  # fmt: skip


def check_output_folder(config: TrainConfig) -> None:
    """Refuse an `--output_dir` whose files a run would wrongly replace or whose result would be read back as data;
    check that it takes files (or, while it does not exist, that its parent does), before any work is done."""
    output_dir = Path(config.output_dir).resolve()
    for flag, data in (("--train_data_dir", config.train_data_dir), ("--dataset_name", config.dataset_name)):
        if data and Path(data).is_dir() and output_dir.is_relative_to(Path(data).resolve()):
            raise ValueError(
                f"--output_dir {config.output_dir} is inside the data folder ({flag} {data}): the next run would "
                "read its validation images as training data. Give a folder outside it."
            )
    model = Path(config.pretrained_model_name_or_path)
    if model.is_dir() and output_dir == model.resolve():
        raise ValueError(
            f"--output_dir {config.output_dir} is the model folder (--pretrained_model_name_or_path): the run would "
            "replace the model it starts from. Give another folder."
        )
    if output_dir.is_dir() and not _holds_a_run(output_dir):
        if foreign := [name for name in REPLACED_ENTRIES if (output_dir / name).exists()]:
            raise ValueError(
                f"--output_dir {config.output_dir} already holds {', '.join(foreign)}, not written by a latentdiff "
                "run (there is no training_config.json or checkpoint), which the run would replace: give a new or "
                "empty folder."
            )
    check_writable(output_dir, "--output_dir")


def _holds_a_run(folder: Path) -> bool:
    return (folder / "training_config.json").is_file() or bool(list_checkpoints(folder))


@contextlib.contextmanager
def output_folder_held(output_dir: Path, accelerator: Accelerator) -> Iterator[None]:
    """Hold `output_dir` (created if missing) for the block; a run started into it meanwhile is refused, on all of
    its processes. Its start would delete this run's writes in progress (`.tmp-*`) as a killed run's leftovers,
    and the two would write the same checkpoint folders.

    The main process takes an advisory `flock` on the folder itself, so nothing is added to the folder, and the
    kernel releases it however the process ends (once the data loader's worker processes, which inherit it, have
    ended too: hence a short wait, `LOCK_WAIT_S`, before a refusal). Where the file system has no such locks on
    folders (some network file systems; Windows), the folder is not guarded.
    """
    held, refusal = None, None
    if accelerator.is_main_process:
        make_folder(output_dir)
        held, refusal = _lock_folder(output_dir)
    refusal = broadcast_object_list([refusal])[0]
    try:
        if refusal is not None:
            raise ValueError(refusal)
        yield
    finally:
        if held is not None:
            os.close(held)


def _lock_folder(folder: Path) -> tuple[int | None, str | None]:
    """An open descriptor of `folder` holding its lock, or why it cannot be had (None, None: no locks here)."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None, None
    descriptor = os.open(folder, os.O_RDONLY)
    deadline = time.monotonic() + LOCK_WAIT_S
    for attempt in itertools.count():
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return descriptor, None
        except BlockingIOError:
            if time.monotonic() >= deadline:
                break
            if attempt == 0:
                logger.warning(f"{folder} is held by another run: waiting up to {LOCK_WAIT_S:.0f} s for it ...")
            time.sleep(1.0)
        except OSError:  # a file system without locks on folders
            os.close(descriptor)
            return None, None
    os.close(descriptor)
    return None, (
        f"--output_dir {folder} is in use by another training run (on this machine, or on one sharing the folder; "
        f"waited {LOCK_WAIT_S:.0f} s): wait for it to end, or give another --output_dir."
    )
