"""Two processes (torchrun, gloo on CPU): same final weights, disjoint shards, only rank 0 writes the output."""

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file
from test_data import write_caption_folder

REPO_ROOT = Path(__file__).resolve().parents[1]

# Runs the train script unchanged in each process, and records what that process did: the images it checked, the
# rows it loaded, every file-system write it made under the output folder (Python's audit hooks), and its final weights.
DRIVER = r"""
import hashlib, json, os, runpy, sys
from pathlib import Path

results, output_dir, script = Path(sys.argv[1]), Path(sys.argv[2]).resolve(), sys.argv[3]
rank = int(os.environ["RANK"])
record = {"rows": [], "writes": [], "weights": None, "checked": []}

def note(event, path):
    if isinstance(path, (str, bytes, os.PathLike)):
        path = Path(os.fsdecode(path)).resolve()
        if str(path).startswith(str(output_dir)):
            record["writes"].append([event, str(path.relative_to(output_dir))])

def audit(event, args):  # Python-level writes: open for writing, mkdir, rename, remove
    if event == "open" and (any(c in args[1] for c in "wax+") if isinstance(args[1], str)
                            else args[1] is None and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
        note(event, args[0])
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.rename", "os.replace"):
        for path in args[:2] if event in ("os.rename", "os.replace") else args[:1]:
            note(event, path)

# Writes done in C++/Rust (torch.save, safetensors) bypass the audit hook: wrap them before anything imports them.
import safetensors.torch
import torch

def wrap(module, name):
    original = getattr(module, name)
    def recording(obj, path, *args, **kwargs):
        note(name, path)
        return original(obj, path, *args, **kwargs)
    setattr(module, name, recording)
wrap(torch, "save")
wrap(safetensors.torch, "save_file")

import accelerate
import latentdiff.data
import latentdiff.examples

image_problem = latentdiff.data.image_problem
def recording_image_problem(value):  # the images this process opened before training
    record["checked"].append(Path(value["path"]).name)
    return image_problem(value)
latentdiff.data.image_problem = recording_image_problem

getitem = latentdiff.examples.ImageCaptionDataset.__getitem__
def recording_getitem(self, index):
    record["rows"].append([self.epoch, index])
    return getitem(self, index)
latentdiff.examples.ImageCaptionDataset.__getitem__ = recording_getitem

end_training = accelerate.Accelerator.end_training
def recording_end_training(self):
    state = self.unwrap_model(self._models[0]).state_dict()
    record["weights"] = hashlib.sha256(b"".join(state[k].cpu().numpy().tobytes() for k in sorted(state))).hexdigest()
    (results / f"rank{rank}.json").write_text(json.dumps(record))
    return end_training(self)
accelerate.Accelerator.end_training = recording_end_training

sys.addaudithook(audit)
sys.argv = [script] + sys.argv[4:]
runpy.run_path(script, run_name="__main__")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_in_two_processes(
    tiny_pipeline_path: Path, tmp_path: Path, *options: str, empty_image: str | None = None
) -> tuple[list[dict], Path]:
    """The train script under torchrun (2 processes, 4 steps, checkpoints every 2): each rank's record, output dir.
    `empty_image` names one of the 12 images to empty (a file that cannot be trained on)."""
    data = write_caption_folder(tmp_path / "data", n=12)
    if empty_image is not None:
        (data / empty_image).write_bytes(b"")
    output_dir, results = tmp_path / "out", tmp_path / "results"
    results.mkdir()
    (tmp_path / "driver.py").write_text(DRIVER)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(tmp_path / "driver.py"), str(results), str(output_dir),
        str(REPO_ROOT / "train_scripts" / "train_text_to_image.py"),
        "--pretrained_model_name_or_path", str(tiny_pipeline_path), "--train_data_dir", str(data),
        "--output_dir", str(output_dir), "--cache_dir", str(tmp_path / "cache"), "--resolution", "32",
        "--train_batch_size", "2", "--max_train_steps", "4", "--checkpointing_steps", "2", "--seed", "0",
        "--lr_warmup_steps", "0", *options,
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((results / f"rank{r}.json").read_text()) for r in (0, 1)], output_dir


def rank_writes(rank: dict) -> list[list[str]]:
    """What a process wrote, less its check that the output folder takes files: a probe file, removed at once, on
    every process (a refusal on the main one alone would leave the others waiting); in the folder's parent when
    the main process has not made the folder yet."""
    probes = [path for event, path in rank["writes"] if event == "open" and path.startswith(".tmp-probe-")]
    assert len(probes) <= 1 and all(["os.remove", probe] in rank["writes"] for probe in probes), rank["writes"]
    return [write for write in rank["writes"] if write[1] not in probes]


def test_two_processes_share_the_work(tiny_pipeline_path, tmp_path):
    ranks, output_dir = train_in_two_processes(
        tiny_pipeline_path, tmp_path, "--random_flip", "--report_to", "tensorboard",
        "--validation_prompts", "a red square", "--validation_epochs", "1", "--validation_inference_steps", "2",
    )  # fmt: skip

    # identical final weights on both ranks, and they are what was saved
    assert ranks[0]["weights"] == ranks[1]["weights"]
    saved = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    digest = hashlib.sha256(b"".join(saved[k].numpy().tobytes() for k in sorted(saved))).hexdigest()
    assert digest == ranks[0]["weights"]

    # 12 rows, 2 processes × batch 2: 3 batches each per epoch; in each epoch the two shards are disjoint
    for epoch in (0, 1):
        shards = [{row for e, row in rank["rows"] if e == epoch} for rank in ranks]
        assert shards[0] and shards[1] and not shards[0] & shards[1], (epoch, shards)
    assert {row for e, row in ranks[0]["rows"] + ranks[1]["rows"] if e == 0} == set(range(12))

    # rank 0 wrote the pipeline, checkpoints, validation images and logs; rank 1 only its own RNG state
    # inside the checkpoint being written (Accelerate saves one per process)
    written = {path.split(os.sep)[0] for _, path in ranks[0]["writes"]}
    assert {
        "model_index.json",
        "unet",
        "README.md",
        "validation",
        "logs",
        "checkpoint-4",
        ".tmp-checkpoint-4",
    } <= written
    for event, path in rank_writes(ranks[1]):
        parts = Path(path).parts
        assert parts[0].startswith(".tmp-checkpoint-") and (len(parts) == 1 or parts[1:] == ("random_states_1.pkl",)), (
            event,
            path,
        )
    assert ["save", ".tmp-checkpoint-4/random_states_1.pkl"] in ranks[1]["writes"]  # rank 1 is observed
    saved_unet = [path for event, path in ranks[0]["writes"] if event == "save_file" and path.endswith(
        "unet/diffusion_pytorch_model.safetensors")]  # fmt: skip
    assert [path for path in saved_unet if path.startswith(".tmp-entries-")]  # the pipeline: written aside, swapped in
    assert ["os.rename", "model_index.json"] in ranks[0]["writes"]  # os.replace audits as os.rename
    assert (output_dir / "checkpoint-4" / "random_states_1.pkl").is_file()
    assert sorted(p.name for p in (output_dir / "checkpoint-4").iterdir() if p.is_dir()) == ["unet"]  # the DDP-wrapped UNet


def test_two_processes_train_lora_adapters(tiny_pipeline_path, tmp_path):
    """LoRA under DDP: the ranks end with the same weights (frozen base, synchronized adapters); rank 0 saves the
    adapter file, in the run's folder and in each checkpoint, and no full UNet. The processes share out the
    check of the images, and all drop the bad one that one of them found."""
    ranks, output_dir = train_in_two_processes(tiny_pipeline_path, tmp_path, "--lora_rank", "4",
                                               "--learning_rate", "1e-3", empty_image="9.png")  # fmt: skip
    assert ranks[0]["weights"] == ranks[1]["weights"]
    # each process opened half of the images, and both dropped the empty one that only rank 1 opened
    checked = [set(rank["checked"]) for rank in ranks]
    assert len(checked[0]) == len(checked[1]) == 6 and checked[0] | checked[1] == {f"{i}.png" for i in range(12)}
    assert "9.png" in checked[1] and max(row for _, row in ranks[0]["rows"] + ranks[1]["rows"]) == 10
    adapters = load_file(output_dir / "pytorch_lora_weights.safetensors")
    assert adapters and all(".lora_A." in key or ".lora_B." in key for key in adapters)
    assert any(tensor.abs().max() > 0 for key, tensor in adapters.items() if ".lora_B." in key)  # B starts at 0
    assert not (output_dir / "unet").exists()
    assert sorted(p.name for p in (output_dir / "checkpoint-4").iterdir() if p.suffix == ".safetensors") == [
        "pytorch_lora_weights.safetensors"
    ]
    for event, path in rank_writes(ranks[1]):
        assert Path(path).parts[0].startswith(".tmp-checkpoint-"), (event, path)


def test_accelerate_configs_load():
    """Each shipped config is read by Accelerate's own loader (unknown keys or values would raise)."""
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"single_gpu": "NO", "multi_gpu": "MULTI_GPU", "multi_cpu": "MULTI_CPU", "fsdp": "FSDP",
                "deepspeed_zero2": "DEEPSPEED"}  # fmt: skip
    for name, distributed_type in expected.items():
        config = load_config_from_file(str(REPO_ROOT / "train_scripts" / "accelerate" / f"{name}.yaml"))
        assert config.distributed_type.value == distributed_type, name


def _sharded_accelerator(distributed_type: str, deepspeed_config: dict | None = None, fsdp2: bool = True):
    """What `check_distributed_support` and `fit_deepspeed_config` read of an FSDP or DeepSpeed Accelerator, which
    Accelerate builds only on GPUs."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(deepspeed_config=deepspeed_config)
    return SimpleNamespace(distributed_type=DistributedType[distributed_type], is_fsdp2=fsdp2, mixed_precision="no",
                           native_amp=True, state=SimpleNamespace(deepspeed_plugin=plugin))  # fmt: skip


def _config(**options):
    from latentdiff.training import TrainConfig

    return TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", **options)


def test_deepspeed_takes_batch_accumulation_and_clipping_from_the_flags():
    """DeepSpeed's own `auto` values become the flags' (Accelerate would take the batch from a loader prepared with
    the model; ours is prepared apart), and numbers of its own that disagree are refused, naming both."""
    import pytest

    from latentdiff.training.accelerator import fit_deepspeed_config

    config = _config(train_batch_size=3, gradient_accumulation_steps=2, max_grad_norm=0.5)
    deepspeed_config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                        "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}  # fmt: skip
    fit_deepspeed_config(config, _sharded_accelerator("DEEPSPEED", deepspeed_config))
    assert deepspeed_config == {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2,
                                "gradient_clipping": 0.5, "zero_optimization": {"stage": 2}}  # fmt: skip
    fit_deepspeed_config(config, _sharded_accelerator("DEEPSPEED", {"gradient_accumulation_steps": 2}))  # agrees
    with pytest.raises(ValueError, match=r"sets gradient_clipping: 1.0, and --max_grad_norm is 0.5: set it to auto"):
        fit_deepspeed_config(config, _sharded_accelerator("DEEPSPEED", {"gradient_clipping": 1.0}))


def test_fsdp_is_refused_where_it_would_resume_without_optimizer_state_or_not_compile():
    """FSDP1 loads a sharded optimizer state back empty; FSDP's shard hooks break a one-graph compile (both seen
    in real FSDP runs of CPU processes)."""
    import pytest

    from latentdiff.training.accelerator import check_distributed_support

    check_distributed_support(_config(resume_from_checkpoint="latest"), _sharded_accelerator("FSDP"))
    check_distributed_support(_config(), _sharded_accelerator("FSDP", fsdp2=False))
    with pytest.raises(ValueError, match="--resume_from_checkpoint needs FSDP2 here: .* Set fsdp_version: 2"):
        check_distributed_support(_config(resume_from_checkpoint="latest"), _sharded_accelerator("FSDP", fsdp2=False))
    for fsdp2 in (True, False):
        with pytest.raises(ValueError, match="--compile makes the UNet one graph, which FSDP's hooks"):
            check_distributed_support(_config(compile=True), _sharded_accelerator("FSDP", fsdp2=fsdp2))


def test_an_fsdp_or_deepspeed_config_without_gpus_is_one_clear_error(monkeypatch):
    """Accelerate shards only over GPUs: on a CPU machine it would fail inside its setup (FSDP) or quietly train
    data-parallel (DeepSpeed)."""
    import pytest

    from latentdiff.training import train
    from latentdiff.training.accelerator import _has_accelerator

    if _has_accelerator():
        pytest.skip("this machine has a GPU: Accelerate would shard")
    for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
        with monkeypatch.context() as patch:
            patch.setenv(variable, "true")
            with pytest.raises(ValueError, match=f"asks for {name}, which shards over GPUs, and this machine has none"):
                train(_config())
