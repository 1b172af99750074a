"""Bad arguments end in one clear line; pickles and remote code are refused; the Hub token never leaks.

Complements tests/test_training.py (TrainConfig's errors, resolution against the VAE × UNet factor),
tests/test_components.py and tests/test_pipeline.py (pickle weights in Python, 14 bad pipeline arguments) and
tests/test_hub.py (the token given as --hub_token, in a subprocess), which these tests do not repeat.
"""

import importlib.util
import json
import logging
import re
import shutil
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file
from test_data import write_caption_folder
from test_hub import TOKEN, FakeHub

from latentdiff.components import load_components
from latentdiff.data import load_image_caption_dataset
from latentdiff.pipelines import LatentDiffusionPipeline
from latentdiff.training import TrainConfig, train

pytestmark = pytest.mark.usefixtures("single_thread")

REPO_ROOT = Path(__file__).resolve().parents[1]
UNSUPPORTED_UNET = {"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}


def train_script():
    """train_scripts/train_text_to_image.py as a module, to call its `main(argv)` in this process."""
    spec = importlib.util.spec_from_file_location(
        "train_text_to_image", REPO_ROOT / "train_scripts" / "train_text_to_image.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def variant_of(pipeline: Path, folder: Path, unet_config: dict | None = None, pickle_suffix: str | None = None) -> Path:
    """A copy of the tiny pipeline with its UNet config changed, or its UNet weights only in a pickle file."""
    shutil.copytree(pipeline, folder)
    if unet_config:
        config = json.loads((folder / "unet" / "config.json").read_text())
        (folder / "unet" / "config.json").write_text(json.dumps({**config, **unet_config}))
    if pickle_suffix:
        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        torch.save(load_file(weights), folder / "unet" / f"diffusion_pytorch_model{pickle_suffix}")
        weights.unlink()
    return folder


@pytest.fixture(scope="module")
def inputs(tiny_pipeline_path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    (root / "empty").mkdir()
    (root / "a-file").write_text("")
    (root / "model.ckpt").write_bytes(b"not really a checkpoint")
    (root / "earlier-run" / "checkpoint-3").mkdir(parents=True)
    (root / "earlier-run" / "checkpoint-3" / "training_state.json").write_text("{}")
    (root / "unet.json").write_text(json.dumps({**json.loads((tiny_pipeline_path / "unet" / "config.json").read_text()),
                                                **UNSUPPORTED_UNET}))  # fmt: skip
    (root / "users" / "unet").mkdir(parents=True)  # a folder of the user's, with names a run's end would replace
    (root / "users" / "README.md").write_text("mine"), (root / "users" / "unet" / "notes.txt").write_text("mine")
    damaged = variant_of(tiny_pipeline_path, root / "damaged") / "text_encoder" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    shutil.rmtree(variant_of(tiny_pipeline_path, root / "no-tokenizer") / "tokenizer")
    variant_of(tiny_pipeline_path, root / "text-size", unet_config={"cross_attention_dim": "big"})
    no_vocabulary = variant_of(tiny_pipeline_path, root / "no-vocabulary") / "tokenizer"
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):  # it loaded as a 2-token tokenizer: prompts all alike
        (no_vocabulary / name).unlink()
    (variant_of(tiny_pipeline_path, root / "no-tokenizer-config") / "tokenizer" / "tokenizer_config.json").unlink()
    no_merges = variant_of(tiny_pipeline_path, root / "no-merges") / "tokenizer"
    for name in ("merges.txt", "tokenizer.json"):  # transformers: "`vocab` and `merges` must be both be ..."
        (no_merges / name).unlink()
    return {
        "pipeline": tiny_pipeline_path, "data": write_caption_folder(root / "data", n=4), "root": root,
        "unsupported": variant_of(tiny_pipeline_path, root / "unsupported", unet_config=UNSUPPORTED_UNET),
        "bin": variant_of(tiny_pipeline_path, root / "bin", pickle_suffix=".bin"),
        "ckpt": variant_of(tiny_pipeline_path, root / "ckpt", pickle_suffix=".ckpt"),
    }  # fmt: skip


# ---- arguments: one line, the option named, no traceback --------------------------------------------------------

ARGUMENT_CASES = {
    "batch size 0": (["--train_batch_size", "0"], r"--train_batch_size must be an integer ≥ 1, got 0"),
    "resolution 36": (["--resolution", "36"], r"--resolution must be a positive multiple of 8, at most 8192 .*, got 36"),
    "missing checkpoint": (["--resume_from_checkpoint", "checkpoint-7"], r"checkpoint-7 does not exist"),
    "output_dir is a file": (["--output_dir", "{root}/a-file"], r"--output_dir .*a-file is a file"),
    "another run's checkpoints": (["--output_dir", "{root}/earlier-run"],
                                  r"earlier-run already holds a run's checkpoints \(checkpoint-3\): continue that run "
                                  r"with --resume_from_checkpoint latest, or give this one another --output_dir"),
    "no such model folder": (["--pretrained_model_name_or_path", "./no/such/model"], r"'./no/such/model' does not exist: give a diffusers pipeline folder"),
    "single-file checkpoint": (["--pretrained_model_name_or_path", "{root}/model.ckpt"],
                               r"model.ckpt is a single file.*diffusers folder.*pickle"),
    ".bin weights": (["--pretrained_model_name_or_path", "{root}/bin"], r"unet holds only pickle weights.*--allow_pickle"),
    ".ckpt weights": (["--pretrained_model_name_or_path", "{root}/ckpt"], r"unet holds only pickle weights.*--allow_pickle"),
    "unsupported UNet folder": (["--pretrained_model_name_or_path", "{root}/unsupported"],
                                r"unsupported/unet/config.json: UNet config key 'mid_block_type' .* not supported"),
    "unsupported --unet_config": (["--unet_config", "{root}/unet.json"],
                                  r"--unet_config .*unet.json: UNet config key 'mid_block_type' .* not supported"),
    "empty data folder": (["--train_data_dir", "{root}/empty"], r"--train_data_dir .*empty holds no images"),
    "missing data folder": (["--train_data_dir", "{root}/nothing"], r"--train_data_dir .*nothing is not a folder"),
    "wrong caption column": (["--caption_column", "caption"], r"caption column 'caption' .* columns are \['image', 'text'\]"),
    "empty --output_dir": (["--output_dir", ""], r"--output_dir is empty: give a path \(or leave the option out\)"),
    "output_dir holds the user's files": (["--output_dir", "{root}/users"],
                                          r"users already holds unet, README.md, not written by a latentdiff run .* "
                                          r"give a new or empty folder"),
    "output_dir is the model": (["--pretrained_model_name_or_path", "{root}/bin", "--output_dir", "{root}/bin"],
                                r"bin is the model folder .* would replace the model it starts from"),
    "output_dir inside a file": (["--output_dir", "{root}/a-file/out"], r"--output_dir .*a-file/out cannot be created: "
                                                                         r".*a-file is a file"),
    "output_dir in the data": (["--output_dir", "{root}/data/out"], r"is inside the data folder \(--train_data_dir"),
    "truncated weights": (["--pretrained_model_name_or_path", "{root}/damaged"],
                          r"damaged/text_encoder/model.safetensors is damaged or truncated .* copy the model again"),
    "a size that is a string in unet/config.json": (["--pretrained_model_name_or_path", "{root}/text-size"],
                                                    r"text-size/unet/config.json: UNet config key 'cross_attention_dim' "
                                                    r"must be a positive integer \(or one per block\), got 'big'"),
    "no tokenizer folder": (["--pretrained_model_name_or_path", "{root}/no-tokenizer"],
                            r"no-tokenizer has no tokenizer/ folder: a text-to-image model folder needs"),
    "tokenizer without its vocabulary": (["--pretrained_model_name_or_path", "{root}/no-vocabulary"],
                                         r"no-vocabulary/tokenizer has no vocab.json \+ merges.txt \(or tokenizer.json\)"
                                         r" \(found \['tokenizer_config.json'\]\): .* download or copy the model again"),
    "tokenizer without its config": (["--pretrained_model_name_or_path", "{root}/no-tokenizer-config"],
                                     r"no-tokenizer-config/tokenizer has no tokenizer_config.json"),
    "tokenizer without merges.txt": (["--pretrained_model_name_or_path", "{root}/no-merges"],
                                     r"no-merges/tokenizer has no vocab.json \+ merges.txt \(or tokenizer.json\) "
                                     r"\(found \['tokenizer_config.json', 'vocab.json'\]\)"),
}  # fmt: skip
if not torch.cuda.is_available():  # the suite's machines: Accelerate has no fp16 autocast on a CPU
    ARGUMENT_CASES["fp16 on a CPU"] = (["--mixed_precision", "fp16"], r"--mixed_precision fp16 needs a GPU.*bf16 or no")
if importlib.util.find_spec("bitsandbytes") is None:
    ARGUMENT_CASES["8-bit Adam, no bitsandbytes"] = (["--use_8bit_adam"], r"--use_8bit_adam needs bitsandbytes: pip")


@pytest.mark.parametrize("case", sorted(ARGUMENT_CASES))
def test_train_script_reports_bad_arguments_in_one_line(inputs, tmp_path, capsys, case):
    overrides, message = ARGUMENT_CASES[case]
    argv = ["--pretrained_model_name_or_path", str(inputs["pipeline"]), "--train_data_dir", str(inputs["data"]),
            "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--resolution", "32",
            "--max_train_steps", "1", "--report_to", "none"]  # fmt: skip
    argv += [value.format(root=inputs["root"]) for value in overrides]  # the last value of an option wins
    assert train_script().main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(message, last), last
    assert not (tmp_path / "out" / "model_index.json").exists()
    assert (inputs["root"] / "users" / "README.md").read_text() == "mine"  # a refused run changes nothing
    assert [p.name for p in (inputs["root"] / "users" / "unet").iterdir()] == ["notes.txt"]


def test_an_output_folder_that_takes_no_files_is_found_before_training(inputs, tmp_path, monkeypatch):
    """Not at the final save, after the whole run (root ignores chmod: the probe's refusal is simulated)."""
    import latentdiff.atomic

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(latentdiff.atomic.tempfile, "mkstemp", refused)
    monkeypatch.setattr("latentdiff.training.loop.load_training_models", None)  # never reached
    with pytest.raises(PermissionError, match=r"--output_dir .*out is not writable \(.* refuses new files: Permission"):
        train(TrainConfig(pretrained_model_name_or_path=str(inputs["pipeline"]), train_data_dir=str(inputs["data"]),
                          output_dir=str(tmp_path / "out"), resolution=32, report_to="none"))  # fmt: skip


def test_a_model_index_that_is_not_a_mapping_is_named(tiny_pipeline_path, tmp_path):
    """diffusers failed on it with `TypeError: pop expected at most 1 argument`."""
    folder = variant_of(tiny_pipeline_path, tmp_path / "model")
    (folder / "model_index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"model_index.json holds a JSON list, not the pipeline's components: restore"):
        LatentDiffusionPipeline.from_pretrained(folder)


@pytest.mark.parametrize("name", ["dtype", "torch_dtype"])
def test_a_dtype_name_is_refused_not_loaded_as_float32(tiny_pipeline_path, name):
    """diffusers loads every part in float32 for `torch_dtype="fp16"`, with a warning only."""
    with pytest.raises(ValueError, match=rf"{name} must be a torch.dtype such as torch.float16 .*, got 'fp16'"):
        LatentDiffusionPipeline.from_pretrained(tiny_pipeline_path, **{name: "fp16"})
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_path, **{name: {"default": torch.bfloat16}})
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.bfloat16}


def test_an_unreadable_weights_file_is_not_called_missing(tiny_pipeline_path, monkeypatch):
    """safetensors reports a file it may not read as "No such file or directory" (simulated: root reads any file;
    checked for real with the permission capabilities dropped)."""
    import latentdiff.model_folder

    def unreadable(path, framework):
        raise FileNotFoundError(f"No such file or directory: {path}")

    monkeypatch.setattr(latentdiff.model_folder, "safe_open", unreadable)
    with pytest.raises(PermissionError, match=r"vae/diffusion_pytorch_model.safetensors exists but cannot be read"):
        LatentDiffusionPipeline.from_pretrained(tiny_pipeline_path)


def test_a_part_missing_from_the_folder_may_be_given_by_the_caller(tiny_pipeline_path, tmp_path):
    """All five parts are required (a folder without tokenizer/ used to load and crash at the first step), except
    those passed to `from_pretrained` instead of the folder's."""
    from diffusers import DDIMScheduler

    folder = variant_of(tiny_pipeline_path, tmp_path / "model")
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    shutil.rmtree(folder / "scheduler")
    with pytest.raises(FileNotFoundError, match=r"model has no scheduler/ folder: a text-to-image model folder needs"):
        LatentDiffusionPipeline.from_pretrained(folder)
    assert LatentDiffusionPipeline.from_pretrained(folder, scheduler=scheduler).scheduler is scheduler


def test_resuming_a_checkpoint_of_another_model_is_one_line(inputs, tmp_path):
    """A checkpoint of a run from another UNet (here one from --unet_config, wider) names the mismatch and what to
    do, instead of torch's size-mismatch listing."""
    config = json.loads((inputs["pipeline"] / "unet" / "config.json").read_text())
    (tmp_path / "wide.json").write_text(json.dumps({**config, "block_out_channels": [64, 64]}))
    options = dict(pretrained_model_name_or_path=str(inputs["pipeline"]), train_data_dir=str(inputs["data"]),
                   output_dir=str(tmp_path / "out"), resolution=32, report_to="none", checkpointing_steps=1)  # fmt: skip
    train(TrainConfig(**options, unet_config=str(tmp_path / "wide.json"), max_train_steps=1))
    with pytest.raises(ValueError, match=r"checkpoint-1/unet holds another model than this run's \(.*\.\.\.\): resume "
                                         r"with the --pretrained_model_name_or_path / --unet_config of the run that"):
        train(TrainConfig(**options, max_train_steps=2, resume_from_checkpoint="latest"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="Accelerate has fp16 autocast on a GPU")
def test_fp16_from_the_accelerate_config_on_a_cpu_is_one_line(inputs, tmp_path, capsys, monkeypatch):
    """fp16 set by `accelerate config` / a launch config (ACCELERATE_MIXED_PRECISION), not by the flag: the same
    check (it read the flag only, and the run crashed at its first step with a dtype mismatch)."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    argv = ["--pretrained_model_name_or_path", str(inputs["pipeline"]), "--train_data_dir", str(inputs["data"]),
            "--output_dir", str(tmp_path / "out"), "--resolution", "32", "--max_train_steps", "1", "--report_to", "none"]  # fmt: skip
    assert train_script().main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: fp16 mixed precision (your accelerate config) needs a GPU"), last


@pytest.mark.parametrize("no_network", ["offline", "refused"])
def test_unreachable_hub_id_is_one_line(inputs, tmp_path, capsys, monkeypatch, no_network):
    if no_network == "offline":  # HF_HUB_OFFLINE=1
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    else:  # a machine without network: huggingface_hub's message has two lines
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    argv = ["--pretrained_model_name_or_path", "no-such-org/no-such-model", "--train_data_dir", str(inputs["data"]),
            "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--report_to", "none"]  # fmt: skip
    assert train_script().main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # the whole message: nothing of it on a line of its own
    assert re.match(r"error: 'no-such-org/no-such-model' is not a local folder, and the Hub could not be reached", last)
    assert "Traceback" not in err


def test_an_unknown_choice_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_script().main(
            ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--on_bad_image", "explode"]
        )
    assert exit_info.value.code == 2 and "invalid choice: 'explode'" in capsys.readouterr().err


def test_an_unknown_option_is_named_with_the_nearest_one(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_script().main(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--scheduler", "ddim"])
    (error,) = capsys.readouterr().err.strip().splitlines()  # without argparse's usage block
    assert exit_info.value.code == 2
    assert error.endswith("error: unrecognized arguments: --scheduler (did you mean --lr_scheduler?); see --help for "
                          "the options.")  # fmt: skip


@pytest.mark.parametrize(
    "flag, advice",
    [("--local-rank=0", "accelerate launch and torchrun give each process its rank"),
     ("--non_ema_revision", "deprecated in diffusers: use --variant non_ema"), ("--rank", "the LoRA rank is --lora_rank here"),
     ("--proportion_empty_prompts", "the share of empty captions is --caption_dropout here"),
     ("--ema_max_decay", "the EMA's maximum decay is --ema_decay here")],
)  # fmt: skip
def test_a_diffusers_option_we_do_not_take_says_what_to_do_instead(capsys, flag, advice):
    with pytest.raises(SystemExit):
        train_script().main(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", flag, "x"])
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert f"error: unrecognized arguments: {flag} ({advice}" in error


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--model", "m"], "latentdiff generate: error: the following arguments are required: --prompt"),
        (["demo", "--preset", "tpu"], "latentdiff demo: error: argument --preset: invalid choice: 'tpu'"),
        (["demo", "--lora-rank", "0"], "latentdiff demo: error: argument --lora-rank: must be an integer ≥ 1, got '0'"),
        (["bogus"], "latentdiff: error: argument command: invalid choice: 'bogus'"),
        (["train"], "latentdiff train: error: the following arguments are required: --pretrained_model_name_or_path"),
    ],
)
def test_cli_argument_errors_are_one_line(capsys, argv, message):
    from latentdiff import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    (line,) = capsys.readouterr().err.strip().splitlines()  # without argparse's usage block
    assert exit_info.value.code == 2 and line.startswith(message) and line.endswith("see --help for the options.")


def test_the_training_script_names_itself_in_usage_and_errors(capsys):
    """`accelerate launch train_scripts/train_text_to_image.py` users read the script's name, as in diffusers."""
    with pytest.raises(SystemExit) as exit_info:
        train_script().main([])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and line.startswith("train_text_to_image.py: error: the following arguments")
    with pytest.raises(SystemExit):
        train_script().main(["--help"])
    assert capsys.readouterr().out.startswith("usage: train_text_to_image.py ")


# ---- pipeline arguments that tests/test_pipeline.py does not try ----------------------------------------------


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_path):
    pipeline = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_path)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(guidance_scale=-1.0), r"guidance_scale must be a finite number ≥ 0 .*got -1.0"),
        (dict(guidance_scale=float("nan")), r"guidance_scale must be a finite number ≥ 0 .*got nan"),
        (dict(guidance_scale=float("inf")), r"guidance_scale must be a finite number ≥ 0 .*got inf"),
        (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 16)),
         r"prompt_embeds must have shape \(batch, tokens, 32\).*got \(1, 77, 16\)"),
        (dict(prompt=None, prompt_embeds=torch.zeros(77, 32)), r"prompt_embeds must have shape \(batch, tokens, 32\)"),
        (dict(negative_prompt_embeds=torch.zeros(1, 77, 16)), r"negative_prompt_embeds must have shape"),
    ],
)  # fmt: skip
def test_pipeline_rejects_negative_guidance_and_embeddings_of_the_wrong_width(pipe, kwargs, match):
    kwargs = {"prompt": "a red square", "num_inference_steps": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


# ---- remote code and pickles ----------------------------------------------------------------------------------

REMOTE_CODE_SWITCHES = re.compile(r"trust_remote_code(?!\s*=\s*False)|custom_pipeline")


def remote_code_switches(paths: list[Path]) -> list[str]:
    return [f"{path}:{number}: {line.strip()}" for path in paths
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
            if REMOTE_CODE_SWITCHES.search(line)]  # fmt: skip


def test_no_source_file_turns_on_remote_code(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("x = 1\nload(name, trust_remote_code=True)\nload(name, **{'custom_pipeline': name})\n")
    assert len(remote_code_switches([planted])) == 2  # the check can fail
    sources = [p for folder in ("latentdiff", "pipelines", "train_scripts") for p in (REPO_ROOT / folder).rglob("*.py")]
    assert len(sources) > 20
    assert remote_code_switches(sources) == []


@pytest.fixture
def booby_trapped(tiny_pipeline_path, tmp_path) -> tuple[Path, Path]:
    """A model folder and a data set folder whose Python files, if ever imported or unpickled, write `marker`."""
    marker = tmp_path / "code-was-run"
    payload = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    model = shutil.copytree(tiny_pipeline_path, tmp_path / "model")
    for sub, config_name, auto_map, module, base in (
        ("text_encoder", "config.json", {"AutoModel": "modeling_evil.Evil"}, "modeling_evil", "CLIPTextModel"),
        ("tokenizer", "tokenizer_config.json", {"AutoTokenizer": ["tokenization_evil.Evil", None]},
         "tokenization_evil", "CLIPTokenizer"),
    ):  # fmt: skip
        config = json.loads((model / sub / config_name).read_text())
        (model / sub / config_name).write_text(json.dumps({**config, "auto_map": auto_map}))
        (model / sub / f"{module}.py").write_text(
            payload + f"from transformers import {base}\nclass Evil({base}): pass\n"
        )
    (model / "scheduler" / "evil_scheduler.py").write_text(payload + "from diffusers import DDIMScheduler as Evil\n")
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "scheduler": ["evil_scheduler", "Evil"]}))
    data = write_caption_folder(tmp_path / "captions" / "images", n=2)
    (data.parent / "captions.py").write_text(payload)  # a data set loading script, which `datasets` once ran
    return model, data, marker


def test_code_in_model_and_data_folders_never_runs(booby_trapped, tmp_path):
    model, data, marker = booby_trapped
    load_components(model)  # explicit classes: auto_map and model_index.json are not followed
    with pytest.raises(ValueError, match="trust_remote_code"):
        LatentDiffusionPipeline.from_pretrained(model)  # diffusers refuses the custom scheduler module
    with pytest.raises(RuntimeError, match="Dataset scripts are no longer supported"):
        load_image_caption_dataset(dataset_name=str(data.parent), cache_dir=str(tmp_path / "cache"))
    output_dir = train(TrainConfig(pretrained_model_name_or_path=str(model), train_data_dir=str(data),
                                   output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), resolution=32,
                                   train_batch_size=2, max_train_steps=1, seed=0, report_to="none"))  # fmt: skip
    assert json.loads((output_dir / "model_index.json").read_text())["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert not marker.exists()


class RunsCode:
    """Unpickling this runs code (what a malicious `optimizer.bin` does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('ran')",)


def test_a_tampered_checkpoint_is_not_unpickled_and_an_incomplete_one_is_named(inputs, tmp_path):
    marker = tmp_path / "code-was-run"
    options = dict(pretrained_model_name_or_path=str(inputs["pipeline"]), train_data_dir=str(inputs["data"]),
                   output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), resolution=32,
                   train_batch_size=2, max_train_steps=1, checkpointing_steps=1, seed=0, report_to="none")  # fmt: skip
    train(TrainConfig(**options))
    torch.save({"state": RunsCode(marker)}, tmp_path / "out" / "checkpoint-1" / "optimizer.bin")
    with pytest.raises(ValueError, match=r"checkpoint-1 holds a pickle .* not loaded.*checkpoints your own runs wrote"):
        train(TrainConfig(**{**options, "max_train_steps": 2, "resume_from_checkpoint": "latest"}))
    assert not marker.exists()
    (tmp_path / "out" / "checkpoint-1" / "optimizer.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"checkpoint-1 is incomplete: optimizer.bin is missing"):
        train(TrainConfig(**{**options, "max_train_steps": 2, "resume_from_checkpoint": "latest"}))


# ---- the Hub token ------------------------------------------------------------------------------------------------


@pytest.fixture
def local_hub(monkeypatch):
    """B's stand-in for the Hub (tests/test_hub.py), served in this process: huggingface_hub is pointed at it."""
    FakeHub.received, FakeHub.authorizations = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield FakeHub
    server.shutdown()


def test_hub_token_from_the_environment_never_leaks(local_hub, inputs, tmp_path, monkeypatch, caplog, capfd):
    """The HF_TOKEN path (tests/test_hub.py covers --hub_token): every log record down to DEBUG, stdout/stderr,
    every file written (TensorBoard events, training_config.json, the card, checkpoints) and every upload."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    config = TrainConfig(
        pretrained_model_name_or_path=str(inputs["pipeline"]), train_data_dir=str(inputs["data"]),
        output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), resolution=32, train_batch_size=2,
        max_train_steps=2, checkpointing_steps=1, seed=0, report_to="tensorboard", validation_prompts=["a red square"],
        validation_inference_steps=2, push_to_hub=True, hub_model_id="me/tiny-finetune",
    )  # fmt: skip
    with caplog.at_level(logging.DEBUG):
        output_dir = train(config)
    assert local_hub.authorizations and all(a == f"Bearer {TOKEN}" for a in local_hub.authorizations)  # it was used
    assert "README.md" in local_hub.received and list((output_dir / "logs").rglob("events.out.tfevents.*"))
    out, err = capfd.readouterr()
    assert TOKEN not in out + err + caplog.text
    assert not [r for r in caplog.records if TOKEN in repr(r.args) or TOKEN in str(r.msg)]
    assert not [p for p in output_dir.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert not [name for name, content in local_hub.received.items() if TOKEN.encode() in content]


def test_a_rejected_token_is_not_echoed(local_hub, inputs, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setattr(local_hub, "do_POST", lambda self: self._reply({"error": "Invalid credentials"}, 401))
    argv = ["--pretrained_model_name_or_path", str(inputs["pipeline"]), "--train_data_dir", str(inputs["data"]),
            "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--push_to_hub", "--hub_token", TOKEN]  # fmt: skip
    with caplog.at_level(logging.DEBUG):
        assert train_script().main(argv) == 2
    err = capsys.readouterr().err
    assert "401" in err and "Traceback" not in err
    assert TOKEN not in err + caplog.text


def test_ctrl_c_during_training_says_how_to_continue(monkeypatch, capsys):
    import latentdiff.training

    from latentdiff.cli import main

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(latentdiff.training, "train", interrupted)
    assert main(["train", "--pretrained_model_name_or_path", "m", "--train_data_dir", "d"]) == 130
    assert "interrupted (checkpoints already written are complete: continue with --resume_from_checkpoint latest)" \
        in capsys.readouterr().err  # fmt: skip


def test_help_of_a_negated_flag_says_it_turns_the_option_off(capsys):
    with pytest.raises(SystemExit):
        train_script().main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--no_foreach_ema, --no-foreach-ema Turn off --foreach_ema." in help_text
