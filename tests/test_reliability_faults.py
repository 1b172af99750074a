"""Faults lose nothing: a kill during a step or a checkpoint write, a NaN/inf, and checkpoint rotation on resume.

Every scenario is compared with one uninterrupted reference run (same options, bit for bit on CPU). The parts
(resolve "latest", rotation with `keep`, exact resume) are unit-tested in tests/test_training.py.
"""

import contextlib
import errno
import hashlib
import itertools
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from test_data import write_caption_folder

import latentdiff.training.checkpoint as checkpoint_module
import latentdiff.training.loop as loop_module
from latentdiff.atomic import atomic_entries, atomic_file, atomic_write_text, disk_full_explained, remove_leftovers
from latentdiff.training import TrainConfig, train
from latentdiff.training.checkpoint import STATE_FILE, list_checkpoints, resolve_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS = 6  # 8 images, batch 2: 4 steps per epoch, so resumes land mid-epoch too
UNET, EMA = "unet/diffusion_pytorch_model.safetensors", "ema.safetensors"
OPTIONS = dict(
    resolution=32, train_batch_size=2, max_train_steps=STEPS, learning_rate=1e-3, lr_warmup_steps=0, seed=0,
    report_to="none", checkpointing_steps=1, use_ema=True, ema_decay=0.9, random_flip=True, caption_dropout=0.2,
)  # fmt: skip


class Killed(BaseException):
    """Stands for SIGKILL inside this process: nothing catches it, nothing after it runs in the loop."""


def kill_at_rename(monkeypatch, chosen: Callable[[Path, Path], bool]) -> None:
    """`os.replace` raises `Killed` at the rename `chosen(source, target)` picks: the process dies right there."""
    original_replace = os.replace

    def replace(source, target):
        if chosen(Path(source), Path(target)):
            raise Killed
        return original_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)


def config_for(pipeline: Path, data: Path, output_dir: Path, **overrides) -> TrainConfig:
    overrides.setdefault("cache_dir", str(output_dir.parent / "datasets-cache"))
    return TrainConfig(
        pretrained_model_name_or_path=str(pipeline), train_data_dir=str(data), output_dir=str(output_dir),
        **{**OPTIONS, **overrides},
    )  # fmt: skip


def assert_same_weights(path_a: Path, path_b: Path, context: str = "") -> None:
    a, b = load_file(path_a), load_file(path_b)
    assert a.keys() == b.keys(), (context, path_a)
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, (context, path_a, len(differing), differing[0], (a[differing[0]] - b[differing[0]]).abs().max())


def assert_ends_like(output_dir: Path, reference: Path, context: str = "") -> None:
    """Final pipeline (EMA weights) and last checkpoint (raw and EMA weights) equal the uninterrupted run's."""
    assert_same_weights(output_dir / UNET, reference / UNET, context)
    for name in (UNET, EMA):
        last = f"checkpoint-{STEPS}/{name}"
        assert_same_weights(output_dir / last, reference / last, context)


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def reference(tiny_pipeline_path, tmp_path_factory, single_thread):
    """The uninterrupted run: (pipeline, data, output folder with the final pipeline and checkpoint-1..6)."""
    root = tmp_path_factory.mktemp("reference")
    data = write_caption_folder(root / "data", n=8)
    output_dir = train(config_for(tiny_pipeline_path, data, root / "out"))
    return tiny_pipeline_path, data, output_dir


# ---- kills --------------------------------------------------------------------------------------------------------


def test_sigkill_at_a_random_step_then_resume_latest_equals_an_uninterrupted_run(reference, tmp_path):
    """`python train_scripts/train_text_to_image.py` is SIGKILLed at a random step, half the time in the middle of
    writing a checkpoint; every checkpoint-N folder left is complete, and resuming from "latest" ends exactly as
    the uninterrupted run."""
    pipeline, data, reference_dir = reference
    rng = random.Random()  # a different step each run: the scenario is printed with any failure
    step, while_saving = rng.randint(1, STEPS - 2), rng.random() < 0.5
    scenario = f"killed {'while writing checkpoint-' if while_saving else 'after checkpoint-'}{step + while_saving}"
    output_dir = tmp_path / "out"
    config = config_for(pipeline, data, output_dir)
    (tmp_path / "run.json").write_text(json.dumps(config.to_dict()))
    # the UNet is written first, the optimizer and the training state after it: this file means "half written"
    signal_file = f".tmp-checkpoint-{step + 1}/unet/config.json" if while_saving else f"checkpoint-{step}/{STATE_FILE}"
    with open(tmp_path / "log.txt", "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "train_scripts" / "train_text_to_image.py"), str(tmp_path / "run.json")],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while not (output_dir / signal_file).exists():
            assert process.poll() is None, f"{scenario}: the run ended first:\n{(tmp_path / 'log.txt').read_text()}"
            assert time.monotonic() < deadline, scenario
            time.sleep(0.002)
        if not while_saving:
            time.sleep(rng.uniform(0, 0.2))  # somewhere in the next step
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL

    folders = [p for p in output_dir.iterdir() if p.name.startswith("checkpoint-")]
    assert all((p / STATE_FILE).is_file() for p in folders), (scenario, [p.name for p in folders])
    latest = resolve_checkpoint(output_dir, "latest")
    assert latest is not None and int(latest.name.split("-")[1]) >= step, (scenario, latest)
    if while_saving:
        assert latest.name == f"checkpoint-{step}" and (output_dir / f".tmp-checkpoint-{step + 1}").is_dir(), scenario
    train(config_for(pipeline, data, output_dir, resume_from_checkpoint="latest"))
    assert_ends_like(output_dir, reference_dir, scenario)


@pytest.mark.parametrize("where", ["inside save_state", "before the rename"])
def test_killed_while_writing_a_checkpoint_keeps_the_previous_one(reference, tmp_path, monkeypatch, where):
    """A deterministic kill at the two points of a checkpoint write: the half-written folder is never "latest",
    the previous checkpoint loads, and the resumed run ends exactly as the uninterrupted one."""
    pipeline, data, reference_dir = reference
    output_dir = tmp_path / "out"
    partial = output_dir / ".tmp-checkpoint-3"
    if where == "inside save_state":  # the EMA is saved after the UNet folder, before optimizer and RNG states

        def save_file(tensors, path, metadata=None):
            if Path(path).parent == partial:
                raise Killed
            return original_save_file(tensors, path, metadata=metadata)

        original_save_file = checkpoint_module.save_file
        monkeypatch.setattr(checkpoint_module, "save_file", save_file)
    else:  # complete, training_state.json written, not yet renamed
        kill_at_rename(monkeypatch, lambda source, target: source == partial)
    with pytest.raises(Killed):
        train(config_for(pipeline, data, output_dir))
    monkeypatch.undo()

    assert partial.is_dir() and not (output_dir / "checkpoint-3").exists()
    assert [p.name for p in list_checkpoints(output_dir)] == ["checkpoint-1", "checkpoint-2"]
    assert resolve_checkpoint(output_dir, "latest") == output_dir / "checkpoint-2"
    train(config_for(pipeline, data, output_dir, resume_from_checkpoint="latest"))
    assert_ends_like(output_dir, reference_dir)


def test_killed_while_the_final_pipeline_is_swapped_in_leaves_no_mix(reference, tmp_path, monkeypatch):
    """The final pipeline is written beside the checkpoints and swapped in: killed half-way through the swap, the
    folder has no model_index.json (it loads as neither the old pipeline nor a mix of two runs), the old parts wait
    whole as .old-*, and the next run clears them and ends as the uninterrupted one."""
    pipeline, data, reference_dir = reference
    output_dir = tmp_path / "out"
    shutil.copytree(reference_dir, output_dir)
    kill_at_rename(monkeypatch, lambda source, target: target == output_dir / "unet"
                   and source.parent.name.startswith(".tmp-entries-"))  # fmt: skip
    with pytest.raises(Killed):
        train(config_for(pipeline, data, output_dir, resume_from_checkpoint="checkpoint-4"))
    monkeypatch.undo()

    assert not (output_dir / "model_index.json").exists() and not (output_dir / "README.md").exists()
    aside = {p.name.rsplit("-", 1)[0] for p in output_dir.glob(".old-*")}
    assert aside == {".old-model_index.json", ".old-unet", ".old-vae", ".old-text_encoder", ".old-tokenizer",
                     ".old-scheduler", ".old-README.md"}  # fmt: skip
    old_unet = next(output_dir.glob(".old-unet-*")) / "diffusion_pytorch_model.safetensors"
    assert_same_weights(old_unet, reference_dir / UNET)
    train(config_for(pipeline, data, output_dir, resume_from_checkpoint="latest"))  # checkpoint-6: the last step
    assert not list(output_dir.glob(".old-*")) and not list(output_dir.glob(".tmp-*"))
    assert not (output_dir / f"checkpoint-{STEPS + 1}").exists()  # resuming a finished run trains no further step
    assert_ends_like(output_dir, reference_dir)


@pytest.mark.parametrize("lora", [False, True])
def test_a_run_stopped_while_saving_before_any_checkpoint_runs_again_in_its_folder(reference, tmp_path, monkeypatch,
                                                                                     lora):  # fmt: skip
    """training_config.json marks a folder as a run's (a folder holding unet/ or README.md without it is refused as
    someone else's): it is written before the pipeline or the adapters, so a run stopped while saving them, with no
    checkpoint yet, is taken again."""
    pipeline, data, _ = reference
    output_dir = tmp_path / "out"
    config = config_for(pipeline, data, output_dir, max_train_steps=1, checkpointing_steps=100,
                        **({"lora_rank": 4} if lora else {}))  # fmt: skip
    stop_at = output_dir / ("pytorch_lora_weights.safetensors" if lora else "scheduler")
    kill_at_rename(monkeypatch, lambda source, target: target == stop_at)
    with pytest.raises(Killed):
        train(config)
    monkeypatch.undo()
    assert (output_dir / "training_config.json").is_file() and not list_checkpoints(output_dir)
    train(config)
    assert (output_dir / stop_at.name).exists() and (output_dir / "README.md").is_file()


def test_atomic_file_replaces_whole_or_not_at_all_and_writes_an_ordinary_file(tmp_path):
    path = tmp_path / "README.md"
    atomic_write_text(path, "old card")
    with pytest.raises(RuntimeError), atomic_file(path) as handle:
        handle.write(b"half a ca")
        raise RuntimeError("the write failed")
    assert path.read_text() == "old card" and [p.name for p in tmp_path.iterdir()] == ["README.md"]  # no .tmp- left
    atomic_write_text(path, "new card")
    assert path.read_text() == "new card" and [p.name for p in tmp_path.iterdir()] == ["README.md"]
    assert path.stat().st_mode & 0o777 == 0o644  # readable by others, not mkstemp's private 0600


def test_a_rotation_stopped_part_way_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    """A kill while rotation deletes checkpoint-2 must not leave a `checkpoint-2` holding some of its files (it stayed
    so for good, and resuming from it by name said it was interrupted while saving)."""
    import latentdiff.atomic as atomic_module
    from latentdiff.training.checkpoint import rotate_checkpoints

    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}" / "unet").mkdir(parents=True)
        for name in (STATE_FILE, "optimizer.bin", "unet/w.safetensors"):
            (tmp_path / f"checkpoint-{step}" / name).write_text("x")

    def killed_part_way(path, **kwargs):
        next(p for p in Path(path).rglob("*") if p.is_file()).unlink()  # one file gone, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic_module.shutil, "rmtree", killed_part_way)
    with pytest.raises(KeyboardInterrupt):
        rotate_checkpoints(tmp_path, total_limit=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-4", "checkpoint-6"
    ]  # fmt: skip
    assert [p.name.rsplit("-", 1)[0] for p in remove_leftovers(tmp_path)] == [".old-checkpoint-2"]  # the next start
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6"]


def test_atomic_entries_replace_only_their_names_and_a_failed_block_changes_nothing(tmp_path):
    target = tmp_path / "run"
    for name, text in (("model_index.json", "old"), ("README.md", "old card"), ("keep.txt", "kept")):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_text(text)
    (target / "unet").mkdir()
    (target / "unet" / "w").write_text("old weights")
    with pytest.raises(RuntimeError), atomic_entries(target, "model_index.json", stale=("README.md",)) as tmp:
        (tmp / "model_index.json").write_text("new")
        raise RuntimeError("the save failed")
    assert (target / "model_index.json").read_text() == "old" and (target / "unet" / "w").read_text() == "old weights"
    with atomic_entries(target, "model_index.json", stale=("README.md",)) as tmp:
        (tmp / "unet").mkdir()
        (tmp / "unet" / "w").write_text("new weights")
        (tmp / "unet" / "w").chmod(0o600)  # as safetensors ≥ 0.8 leaves its files
        (tmp / "model_index.json").write_text("new")
    assert (target / "model_index.json").read_text() == "new" and (target / "unet" / "w").read_text() == "new weights"
    assert (target / "unet" / "w").stat().st_mode & 0o777 == 0o644  # an ordinary file, not a private one
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt", "model_index.json", "unet"]  # README was stale
    (target / ".tmp-unet-k3j_9x0a").mkdir(), (target / ".old-unet-123").write_text("")
    (target / ".tmp-checkpoint-3").mkdir()  # a checkpoint whose save was interrupted
    (target / ".tmp-notes.txt").write_text("the user's"), (target / ".old-drafts").mkdir()  # not ours: kept
    assert [p.name for p in remove_leftovers(target)] == [".old-unet-123", ".tmp-checkpoint-3", ".tmp-unet-k3j_9x0a"]
    assert sorted(p.name for p in target.iterdir()) == [".old-drafts", ".tmp-notes.txt", "keep.txt", "model_index.json",
                                                        "unet"]  # fmt: skip


def test_a_checkpoint_replaced_when_the_run_was_killed_is_put_back(tmp_path, monkeypatch):
    """Killed between `replace_folder`'s two renames: the old checkpoint is aside, the new one not yet in; the next
    start puts the old one back instead of deleting the only complete copy."""
    import latentdiff.atomic as atomic

    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir(), (checkpoint / "w").write_text("old")
    renames, rename = [], os.replace

    def killed_at_the_second_rename(source, destination):
        renames.append(destination)
        if len(renames) == 2:
            raise KeyboardInterrupt
        rename(source, destination)

    monkeypatch.setattr(os, "replace", killed_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt), atomic.atomic_dir(checkpoint) as tmp:
        (tmp / "w").write_text("new")
    monkeypatch.undo()
    assert not checkpoint.exists()
    assert [p.name for p in remove_leftovers(tmp_path)] == [f".replaced-checkpoint-4-{os.getpid()}"]
    assert (checkpoint / "w").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["checkpoint-4"]


# ---- a full disk ---------------------------------------------------------------------------------------------------

SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 373440 vs 373328"  # torch.save, disk full


def nearly_full(free: int = 3 * 2**20):
    """`shutil.disk_usage` of a disk with `free` bytes left."""
    return lambda path: shutil._ntuple_diskusage(total=22 * 2**20, used=22 * 2**20 - free, free=free)


def test_disk_full_while_writing_a_checkpoint_says_so_and_loses_nothing(reference, tmp_path, monkeypatch):
    """The disk fills up half-way through checkpoint-3 (torch's zip writer then reports only "unexpected pos"): one
    error says the disk is full, names what was being written and what is intact; the partial folder is removed
    (giving the space back), and resuming from "latest" ends exactly as the uninterrupted run."""
    pipeline, data, reference_dir = reference
    output_dir = tmp_path / "out"
    partial = output_dir / ".tmp-checkpoint-3"

    def save_file(tensors, path, metadata=None):
        if Path(path).parent == partial:
            Path(path).write_bytes(b"\0" * 1000)
            monkeypatch.setattr(shutil, "disk_usage", nearly_full())
            raise RuntimeError(SHORT_WRITE)
        return original_save_file(tensors, path, metadata=metadata)

    original_save_file = checkpoint_module.save_file
    monkeypatch.setattr(checkpoint_module, "save_file", save_file)
    with pytest.raises(OSError, match=r"Could not write checkpoint-3: the disk holding .* is full \(3 MiB free") as error:
        train(config_for(pipeline, data, output_dir))
    monkeypatch.undo()

    assert error.value.errno == errno.ENOSPC and isinstance(error.value.__cause__, RuntimeError)
    assert "checkpoint-1, checkpoint-2 are intact" in str(error.value)
    assert "--resume_from_checkpoint latest" in str(error.value)
    assert sorted(p.name for p in output_dir.iterdir()) == ["checkpoint-1", "checkpoint-2"]  # no partial folder
    train(config_for(pipeline, data, output_dir, resume_from_checkpoint="latest"))
    assert_ends_like(output_dir, reference_dir)


def test_disk_full_while_writing_the_final_pipeline_says_so_and_loses_nothing(reference, tmp_path, monkeypatch):
    """safetensors wraps a full disk in its own exception type; the final save still ends in the one error, leaves
    no half-written pipeline, and resuming the finished run writes the pipeline without training further."""
    pipeline, data, reference_dir = reference
    output_dir = tmp_path / "out"

    def save_file(tensors, path, metadata=None):
        if Path(path).parent.parent.name.startswith(".tmp-entries-"):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return original_save_file(tensors, path, metadata=metadata)

    original_save_file = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(OSError, match=r"Could not write the trained pipeline: the disk holding .* is full") as error:
        train(config_for(pipeline, data, output_dir))
    monkeypatch.undo()

    assert error.value.errno == errno.ENOSPC
    assert f"checkpoint-{STEPS - 1}, checkpoint-{STEPS} are intact" in str(error.value)
    checkpoints = [f"checkpoint-{n}" for n in range(1, STEPS + 1)]  # and no partial pipeline; the config is written
    assert sorted(p.name for p in output_dir.iterdir()) == [*checkpoints, "training_config.json"]  # first: a run's
    train(config_for(pipeline, data, output_dir, resume_from_checkpoint="latest"))
    assert not (output_dir / f"checkpoint-{STEPS + 1}").exists()
    assert_ends_like(output_dir, reference_dir)


def test_a_failed_write_with_space_left_keeps_its_own_error(tmp_path):
    partial = tmp_path / ".tmp-x"
    partial.mkdir()
    with pytest.raises(PermissionError, match="read-only"), disk_full_explained(tmp_path, "x", "advice", partial):
        raise PermissionError("read-only")
    assert partial.is_dir()  # left for the next run's start to clear, as after any other failure
    with pytest.raises(OSError, match="Could not write x: .* advice") as error:
        with disk_full_explained(tmp_path, "x", "advice", partial):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert error.value.errno == errno.ENOSPC and not partial.exists()
    with pytest.raises(FileNotFoundError) as error, disk_full_explained(tmp_path / "gone", "x", "advice"):
        raise FileNotFoundError("the run's folder was removed")
    assert str(error.value) == "the run's folder was removed"  # its own error, not the free-space check's


# ---- NaN and inf ------------------------------------------------------------------------------------------------


class InfiniteGradient(torch.autograd.Function):
    """The identity whose gradient is infinite: a finite loss with overflowing gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


FAULTS = {
    "nan loss": (lambda loss: loss * float("nan"), r"The loss is nan at step 4"),
    "inf loss": (lambda loss: loss * float("inf"), r"The loss is inf at step 4"),
    "inf gradient": (InfiniteGradient.apply, r"The gradient norm is (inf|nan) at step 4"),
    "inf gradient, norm a float (as DeepSpeed's)": (InfiniteGradient.apply, r"The gradient norm is (inf|nan) at step 4"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_nan_or_inf_stops_naming_the_step_and_keeps_checkpoints_and_output(reference, tmp_path, monkeypatch, fault):
    """A finished run is resumed from checkpoint-2 and hits a non-finite value at step 4: it stops with an error
    naming the step, before any weight is updated, and every file of the folder stays as it was (checkpoint-3,
    saved again on the way, holds the same weights)."""
    pipeline, data, reference_dir = reference
    output_dir = tmp_path / "out"
    shutil.copytree(reference_dir, output_dir)
    before = file_hashes(output_dir)
    corrupt, message = FAULTS[fault]
    real_loss, steps = loop_module.diffusion_loss, itertools.count(3)  # resumed after step 2: the next is 3

    def faulty_loss(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        return corrupt(loss) if next(steps) == 4 else loss

    monkeypatch.setattr(loop_module, "diffusion_loss", faulty_loss)
    if "float" in fault:
        from accelerate import Accelerator

        real_clip = Accelerator.clip_grad_norm_
        monkeypatch.setattr(Accelerator, "clip_grad_norm_", lambda *args, **kwargs: float(real_clip(*args, **kwargs)))
    with pytest.raises(FloatingPointError, match=message + r".*checkpoints in .* are intact"):
        train(config_for(pipeline, data, output_dir, resume_from_checkpoint="checkpoint-2"))

    after = file_hashes(output_dir)
    assert after.keys() == before.keys()
    assert not [name for name in before if before[name] != after[name] and not name.startswith("checkpoint-3/")]
    for name in (UNET, EMA):
        assert_same_weights(output_dir / "checkpoint-3" / name, reference_dir / "checkpoint-3" / name)


# ---- rotation ---------------------------------------------------------------------------------------------------


def test_total_limit_never_deletes_the_resumed_or_the_new_checkpoint(reference, tmp_path, caplog):
    """Resuming from checkpoint-2 of a finished 6-step run with --checkpoints_total_limit 1 and 4 steps: the
    checkpoint resumed from and the one just written stay; the other run's later checkpoints are not this run's
    to delete (a warning says "latest" means them)."""
    pipeline, data, reference_dir = reference
    output_dir = tmp_path / "out"
    shutil.copytree(reference_dir, output_dir)
    config = config_for(pipeline, data, output_dir, max_train_steps=4, checkpoints_total_limit=1,
                        resume_from_checkpoint="checkpoint-2")  # fmt: skip
    with caplog.at_level(logging.WARNING):
        train(config)
    names = [p.name for p in list_checkpoints(output_dir)]
    assert names == ["checkpoint-2", "checkpoint-4", "checkpoint-5", "checkpoint-6"], names
    assert_same_weights(output_dir / "checkpoint-2" / UNET, reference_dir / "checkpoint-2" / UNET)
    assert_same_weights(output_dir / "checkpoint-4" / UNET, reference_dir / "checkpoint-4" / UNET)
    assert any("checkpoint-5" in r.getMessage() and "latest" in r.getMessage() for r in caplog.records)


# ---- machine crashes (power cut, preempted VM): what the OS had not yet written is lost --------------------------


class WriteJournal:
    """Records, in order, each `os.fsync` (by the path its descriptor names), `os.replace` and `os.mkdir`, to check
    that what a run publishes reached the disk before the rename that publishes it, and the rename after it."""

    def __init__(self, monkeypatch):
        self.events: list[tuple] = []
        fsync, replace, mkdir = os.fsync, os.replace, os.mkdir

        def recorded_mkdir(path, *args, **kwargs):
            mkdir(path, *args, **kwargs)
            self.events.append(("mkdir", Path(os.path.realpath(path))))

        def recorded_fsync(fd):
            self.events.append(("sync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
            return fsync(fd)

        def recorded_replace(source, target):
            source, target = Path(os.path.realpath(source)), Path(os.path.realpath(target))
            replace(source, target)
            self.events.append(("rename", source, target))

        monkeypatch.setattr(os, "fsync", recorded_fsync)
        monkeypatch.setattr(os, "replace", recorded_replace)
        monkeypatch.setattr(os, "mkdir", recorded_mkdir)

    def folders_not_durable(self, top: Path) -> list[str]:
        """Folders made at `top` or under it, still there under the name they were made with, whose entry in their
        parent was not synced after they were made: a machine crash could lose them with the synced files inside.
        (A temporary folder renamed into place is the rename's to sync: `not_durable` checks that.)"""
        top = Path(os.path.realpath(top))
        made = [(i, path) for i, (kind, path, *_) in enumerate(self.events) if kind == "mkdir"]
        return [
            f"{path}: its entry in {path.parent} not synced"
            for i, path in made
            if path.is_dir() and (path == top or top in path.parents) and ("sync", path.parent) not in self.events[i:]
        ]

    def not_durable(self, folder: Path) -> list[str]:
        """Files under `folder` a machine crash could leave empty, half-written or missing: written in place, or
        published by a rename before their data and the folders holding them were synced, or not synced after."""
        problems = []
        for path in sorted(Path(os.path.realpath(p)) for p in folder.rglob("*") if p.is_file()):
            name = path.relative_to(os.path.realpath(folder))
            index, source, target = next(
                ((i, *names) for i, (kind, *names) in reversed(list(enumerate(self.events)))
                 if kind == "rename" and (path == names[1] or names[1] in path.parents)),
                (None, None, None),
            )  # fmt: skip
            if index is None:
                problems.append(f"{name}: written in place")
                continue
            before, after = self.events[:index], self.events[index + 1 :]
            old = source / path.relative_to(target)
            unsynced = [p for p in (old, *old.parents) if p == source or source in p.parents]
            unsynced = [p for p in unsynced if ("sync", p) not in before]
            if unsynced:
                problems.append(f"{name}: {', '.join(map(str, unsynced))} not synced before the rename")
            if ("sync", target.parent) not in after:
                problems.append(f"{name}: the rename to {target} not synced")
        return problems


@pytest.mark.skipif(sys.platform != "linux", reason="reads descriptors' paths from /proc/self/fd")
@pytest.mark.parametrize("lora", [False, True])
def test_everything_a_run_writes_is_on_the_disk_before_its_name(reference, tmp_path, monkeypatch, lora):
    """A power cut or a preempted VM loses the OS's unwritten cache; ext4 and XFS may have put a rename on the disk
    before the data, so a checkpoint-N/ or a model folder that the rename made "complete" would hold empty files.
    Every file of a run (checkpoints, the final pipeline or adapters, validation images, the card, the run's
    options) must be synced before the rename that publishes it, and the rename synced after it."""
    pipeline, data, _ = reference
    output_dir = tmp_path / "runs" / "out"  # two new folders: their names must reach the disk too
    config = config_for(pipeline, data, output_dir, max_train_steps=2, checkpointing_steps=1, validation_epochs=1,
                        validation_prompts=["a red square"], cache_dir=str(tmp_path / "datasets-cache"),
                        **({"lora_rank": 4} if lora else {}))  # fmt: skip
    journal = WriteJournal(monkeypatch)
    train(config)
    monkeypatch.undo()
    assert (output_dir / "checkpoint-2" / STATE_FILE).is_file() and list((output_dir / "validation").rglob("*.png"))
    assert journal.not_durable(output_dir) == []
    assert journal.folders_not_durable(tmp_path / "runs") == []


def test_a_written_image_is_on_the_disk_before_its_name(tmp_path, monkeypatch):
    from latentdiff.atomic import atomic_dir, replace_file

    journal = WriteJournal(monkeypatch)
    atomic_write_text(tmp_path / "card.md", "card")
    with atomic_dir(tmp_path / "images") as folder:
        (folder / "nested").mkdir()
        (folder / "nested" / "0.png").write_bytes(b"png")
    (tmp_path / ".tmp-weights").write_bytes(b"weights")
    replace_file(tmp_path / ".tmp-weights", tmp_path / "weights.safetensors")
    assert journal.not_durable(tmp_path) == []
    (tmp_path / "in_place.txt").write_text("x")
    assert journal.not_durable(tmp_path) == ["in_place.txt: written in place"]  # the check can fail


@pytest.mark.skipif(sys.platform != "linux", reason="reads descriptors' paths from /proc/self/fd")
def test_generated_images_and_their_new_folders_are_on_the_disk(tiny_pipeline_path, tmp_path, monkeypatch):
    from latentdiff.generate import generate_images

    journal = WriteJournal(monkeypatch)
    result = generate_images(str(tiny_pipeline_path), ["a red square"], output_dir=tmp_path / "images" / "run1",
                             num_inference_steps=1, seed=0, device="cpu")  # fmt: skip
    monkeypatch.undo()
    assert result.image_paths and all(path.is_file() for path in result.image_paths)
    assert journal.not_durable(tmp_path / "images") == []
    assert journal.folders_not_durable(tmp_path / "images") == []


@pytest.mark.skipif(sys.platform != "linux", reason="reads descriptors' paths from /proc/self/fd")
def test_folders_made_for_outputs_are_on_the_disk_with_their_names(tmp_path, monkeypatch):
    from latentdiff.atomic import atomic_dir, make_folder

    journal = WriteJournal(monkeypatch)
    assert make_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    make_folder(tmp_path / "a" / "b")  # already there: nothing to make
    with atomic_dir(tmp_path / "c" / "d" / "images") as folder:  # c/ and d/ are made for it
        (folder / "0.png").write_bytes(b"png")
    assert journal.not_durable(tmp_path) == []
    assert journal.folders_not_durable(tmp_path) == []
    (tmp_path / "plain").mkdir()
    assert journal.folders_not_durable(tmp_path) == [f"{tmp_path / 'plain'}: its entry in {tmp_path} not synced"]


def test_syncing_on_windows_opens_files_for_writing(tmp_path, monkeypatch):
    """Windows' fsync (`_commit`, i.e. FlushFileBuffers) needs a handle with write access and fails with EBADF on
    one opened read-only, where POSIX syncs any descriptor: emulated here, as the test machines run Linux."""
    import fcntl

    from latentdiff import atomic
    from latentdiff.atomic import atomic_dir, replace_file

    fsync = os.fsync

    def windows_fsync(fd):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return fsync(fd)

    (tmp_path / ".tmp-weights").write_bytes(b"weights")
    monkeypatch.setattr(os, "fsync", windows_fsync)
    monkeypatch.setattr(atomic, "_WINDOWS", True, raising=False)  # os.name itself would switch pathlib too
    replace_file(tmp_path / ".tmp-weights", tmp_path / "weights.safetensors")
    with atomic_dir(tmp_path / "images") as folder:
        (folder / "0.png").write_bytes(b"png")
    monkeypatch.undo()
    assert (tmp_path / "weights.safetensors").read_bytes() == b"weights"
    assert (tmp_path / "images" / "0.png").read_bytes() == b"png"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_in_a_saved_folder_does_not_block_the_sync(tmp_path):
    """Opening a named pipe to sync it would wait for a writer forever: only files and folders are synced."""
    from latentdiff.atomic import atomic_dir

    def save():
        with atomic_dir(tmp_path / "out") as folder:
            os.mkfifo(folder / "pipe")
            (folder / "0.png").write_bytes(b"png")

    worker = threading.Thread(target=save, daemon=True)  # a blocked open cannot be interrupted: left behind
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive() and (tmp_path / "out" / "0.png").read_bytes() == b"png"


@pytest.mark.skipif(sys.platform == "win32", reason="folder locks are flock, which Windows lacks")
def test_a_second_run_into_a_live_runs_folder_is_refused_and_deletes_nothing(reference, tmp_path, monkeypatch):
    """Started into the folder of a run still writing, a run would delete that run's write in progress as a killed
    run's leftover (and the two would write the same checkpoints): it is refused before it touches anything, after
    waiting a while (what a killed run's data loader workers hold is released within seconds)."""
    import fcntl

    import latentdiff.training.output_folder as output_folder

    monkeypatch.setattr(output_folder, "LOCK_WAIT_S", 2.0)

    pipeline, data, _ = reference
    output_dir = tmp_path / "out"
    live_write = output_dir / ".tmp-checkpoint-3"  # what the live run is writing now
    live_write.mkdir(parents=True)
    (live_write / "optimizer.bin").write_bytes(b"half")
    live_run = os.open(output_dir, os.O_RDONLY)  # its lock, as its main process holds it (flock: per open file)
    fcntl.flock(live_run, fcntl.LOCK_EX)
    live_run_ends = threading.Timer(1.0, os.close, [live_run])
    try:
        with pytest.raises(ValueError, match=r"--output_dir .*out is in use by another training run .*waited 2 s"):
            train(config_for(pipeline, data, output_dir, max_train_steps=1))
        assert (live_write / "optimizer.bin").read_bytes() == b"half"
        live_run_ends.start()  # while the next run waits for the folder
        train(config_for(pipeline, data, output_dir, max_train_steps=1))
    finally:
        if live_run_ends.is_alive() or live_run_ends.finished.is_set():
            live_run_ends.join()
        else:
            os.close(live_run)
    assert not live_write.exists() and (output_dir / "model_index.json").is_file()


@pytest.mark.parametrize("code", [errno.ENOTSUP, errno.EIO])
def test_a_sync_the_file_system_cannot_do_is_skipped_and_a_failing_disk_loses_nothing(tmp_path, monkeypatch, code):
    """A file system that cannot flush (ENOTSUP, EINVAL, ENOSYS: some FUSE and network ones) must not stop a run's
    saves; a disk that fails the flush (EIO) stops the save before the rename, and the old folder stays whole."""
    from latentdiff.atomic import atomic_dir

    with atomic_dir(tmp_path / "images") as folder:
        (folder / "0.png").write_bytes(b"old")

    def fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fsync)
    with contextlib.ExitStack() as expect:
        if code == errno.EIO:
            expect.enter_context(pytest.raises(OSError, match=os.strerror(errno.EIO)))
        with atomic_dir(tmp_path / "images") as folder:
            (folder / "0.png").write_bytes(b"new")
    monkeypatch.undo()
    assert (tmp_path / "images" / "0.png").read_bytes() == (b"old" if code == errno.EIO else b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # no .tmp- left either way


def test_a_folder_written_atomically_holds_ordinary_files(tmp_path):
    """Writers that make private files (safetensors ≥ 0.8, `tempfile`) inside an `atomic_dir` leave 0644 files in an
    ordinary 0755 folder, as everything else a run writes."""
    import tempfile

    from latentdiff.atomic import atomic_dir

    with atomic_dir(tmp_path / "images") as folder:
        descriptor, private = tempfile.mkstemp(dir=folder)
        os.close(descriptor)
    written = tmp_path / "images" / Path(private).name
    assert written.stat().st_mode & 0o777 == 0o644 and (tmp_path / "images").stat().st_mode & 0o777 == 0o755


@pytest.mark.skipif(sys.platform == "win32", reason="folder locks are flock, which Windows lacks")
def test_a_held_output_folder_is_refused_to_a_second_holder_until_released(tmp_path, monkeypatch):
    """The lock is exclusive: two runs holding it at once (a shared lock each) would delete each other's writes."""
    from types import SimpleNamespace

    import latentdiff.training.output_folder as output_folder

    monkeypatch.setattr(output_folder, "LOCK_WAIT_S", 0.0)
    main_process = SimpleNamespace(is_main_process=True)
    with output_folder.output_folder_held(tmp_path / "out", main_process):
        with pytest.raises(ValueError, match=r"--output_dir .*out is in use by another training run"):
            with output_folder.output_folder_held(tmp_path / "out", main_process):
                pass
    with output_folder.output_folder_held(tmp_path / "out", main_process):  # released: the next run may start
        pass
