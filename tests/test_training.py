"""Fine-tuning on CPU with the tiny pipeline: the loss falls, resume is exact, caching is transparent, outputs load."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from safetensors import safe_open
from safetensors.torch import load_file
from test_data import write_caption_folder

from latentdiff.training import EMAModel, TrainConfig, parse_train_args, train
from latentdiff.training.checkpoint import STATE_FILE, list_checkpoints, resolve_checkpoint, rotate_checkpoints
from latentdiff.training.losses import diffusion_loss, dream_rectify, min_snr_weights, training_target
from latentdiff.training.models import noise_scheduler_for

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


class Recorder(GeneralTracker):
    """An Accelerate tracker that keeps what the loop logs, to check loss and learning rate step by step."""

    name = "recorder"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.logs: dict[int, dict] = {}

    @property
    def tracker(self):
        return self

    def log(self, values: dict, step: int | None = None, **kwargs):
        self.logs[step] = dict(values)

    def losses(self) -> list[float]:
        return [self.logs[step]["train_loss"] for step in sorted(self.logs)]


@pytest.fixture(scope="module")
def caption_folder(tmp_path_factory) -> Path:
    return write_caption_folder(tmp_path_factory.mktemp("captions") / "images", n=8)


def make_config(pipeline: Path, data: Path, output_dir: Path, **overrides) -> TrainConfig:
    options = dict(
        pretrained_model_name_or_path=str(pipeline), train_data_dir=str(data), output_dir=str(output_dir),
        cache_dir=str(output_dir.parent / "datasets-cache"), resolution=32, train_batch_size=2, max_train_steps=4,
        learning_rate=1e-3, lr_warmup_steps=0, seed=0, report_to="none", checkpointing_steps=1000,
    )  # fmt: skip
    return TrainConfig(**{**options, **overrides})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---- a full run, shared by several tests -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_pipeline_path, caption_folder, tmp_path_factory):
    """16 steps (4 epochs) with EMA, validation after epochs 1 and 3 (every 2) and at the end, TensorBoard,
    checkpoints rotated down to one."""
    recorder = Recorder()
    config = make_config(
        tiny_pipeline_path, caption_folder, tmp_path_factory.mktemp("run") / "out", max_train_steps=16,
        use_ema=True, ema_decay=0.9, validation_prompts=["a red square", "a blue square"], validation_epochs=2,
        validation_inference_steps=3, report_to="tensorboard", checkpointing_steps=8, checkpoints_total_limit=1,
    )  # fmt: skip
    output_dir = train(config, trackers=[recorder])
    return output_dir, recorder


def test_loss_falls(trained):
    losses = trained[1].losses()
    assert len(losses) == 16 and all(np.isfinite(losses))
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert last < 0.6 * first, (first, last)


def test_run_writes_pipeline_card_validation_logs_and_rotates(trained):
    output_dir, recorder = trained
    for name in ("model_index.json", "README.md", "unet/config.json", "vae/config.json", "tokenizer/vocab.json"):
        assert (output_dir / name).is_file(), name
    assert [p.name for p in list_checkpoints(output_dir)] == ["checkpoint-16"]  # checkpoint-8 rotated away
    checkpoint = output_dir / "checkpoint-16"  # the models as folders, saved once (not again as Accelerate's files)
    assert sorted(p.name for p in checkpoint.iterdir()) == ["ema.safetensors", "optimizer.bin", "random_states_0.pkl",
                                                         "scheduler.bin", STATE_FILE, "unet"]  # fmt: skip
    state = json.loads((checkpoint / STATE_FILE).read_text())  # the step, and what a resumed run is checked against
    assert state == {"global_step": 16, "seed": 0, "num_processes": 1, "train_batch_size": 2, "resolution": 32,
                     "gradient_accumulation_steps": 1, "center_crop": False, "random_flip": False,
                     "image_interpolation_mode": "lanczos"}  # fmt: skip
    assert sorted(p.name for p in (output_dir / "validation").iterdir()) == ["step_12", "step_16", "step_4"]
    assert image_size(output_dir / "validation" / "step_16" / "1.png") == (32, 32)
    assert list((output_dir / "logs").rglob("events.out.tfevents.*"))
    card = (output_dir / "README.md").read_text()
    assert "library_name: diffusers" in card and "validation/step_16/0.png" in card and "- learning_rate: 0.001" in card
    assert "- ema_decay: 0.9\n" in card and "lora_" not in card
    assert recorder.logs[1]["lr"] == pytest.approx(1e-3)
    # the saved UNet is the EMA, which is not the raw weights
    final = weights(output_dir / UNET_WEIGHTS)
    assert_same_weights(final, weights(output_dir / "checkpoint-16" / "ema.safetensors"))
    raw = weights(output_dir / "checkpoint-16" / UNET_WEIGHTS)
    assert any(not torch.equal(final[k], raw[k]) for k in final)


def image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def test_output_loads_with_latentdiff_and_diffusers(trained):
    from diffusers import StableDiffusionPipeline

    from latentdiff.pipelines import LatentDiffusionPipeline

    output_dir = trained[0]
    images = []
    for pipeline_class in (LatentDiffusionPipeline, StableDiffusionPipeline):
        pipeline = pipeline_class.from_pretrained(output_dir)
        pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        images.append(pipeline("a red square", num_inference_steps=3, generator=generator, output_type="np").images)
    assert images[0].shape == (1, 32, 32, 3)
    np.testing.assert_allclose(images[0], images[1], atol=1e-4)


# ---- exactness ----------------------------------------------------------------------------------------------------


def run_straight_and_resumed(pipeline: Path, data: Path, tmp_path: Path, **options) -> None:
    """Train 4 steps into tmp_path/straight, and 2 + resume + 2 into tmp_path/resumed (checkpoints every 2 steps);
    check that steps 3 and 4 log the same loss and learning rate, bit for bit."""
    options = {"checkpointing_steps": 2, **options}
    straight, resumed = Recorder(), Recorder()
    train(make_config(pipeline, data, tmp_path / "straight", max_train_steps=4, **options), [straight])
    train(make_config(pipeline, data, tmp_path / "resumed", max_train_steps=2, **options))
    train(make_config(pipeline, data, tmp_path / "resumed", max_train_steps=4, resume_from_checkpoint="latest",
                      **options), [resumed])  # fmt: skip
    assert sorted(resumed.logs) == [3, 4]
    for step in (3, 4):
        assert resumed.logs[step] == straight.logs[step]


def test_resume_is_exact(tiny_pipeline_path, tmp_path):
    """4 steps straight == 2 steps, stop, resume from checkpoint-2, 2 more (mid-epoch, accumulation, all noises)."""
    data = write_caption_folder(tmp_path / "data", n=12)
    options = dict(
        gradient_accumulation_steps=2, random_flip=True, caption_dropout=0.3, noise_offset=0.05,
        input_perturbation=0.1, snr_gamma=5.0, use_ema=True, ema_decay=0.9, lr_scheduler="constant_with_warmup",
        lr_warmup_steps=3, checkpointing_steps=2,
    )  # fmt: skip
    run_straight_and_resumed(tiny_pipeline_path, data, tmp_path, **options)
    for name in (UNET_WEIGHTS, "ema.safetensors"):
        assert_same_weights(
            weights(tmp_path / "straight" / "checkpoint-4" / name),
            weights(tmp_path / "resumed" / "checkpoint-4" / name),
        )
    assert_same_weights(weights(tmp_path / "straight" / UNET_WEIGHTS), weights(tmp_path / "resumed" / UNET_WEIGHTS))


def test_a_run_stopped_between_an_epochs_checkpoint_and_its_validation_validates_on_resume(
    tiny_pipeline_path, caption_folder, tmp_path, monkeypatch
):
    """8 rows at batch 2: epoch 1 ends at step 4 with checkpoint-4, then its validation. Killed in between, the
    resumed run makes step 4's images first, the same as an uninterrupted run's."""
    import latentdiff.training.loop as loop

    options = dict(max_train_steps=8, checkpointing_steps=4, validation_prompts=["a red square"], validation_epochs=1,
                   validation_inference_steps=2, use_ema=True, ema_decay=0.9)  # fmt: skip
    train(make_config(tiny_pipeline_path, caption_folder, tmp_path / "straight", **options))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(loop, "validate", killed)
        with pytest.raises(KeyboardInterrupt):
            train(make_config(tiny_pipeline_path, caption_folder, tmp_path / "killed", **options))
    assert (tmp_path / "killed" / "checkpoint-4").is_dir() and not (tmp_path / "killed" / "validation").exists()
    (tmp_path / "killed" / "validation" / ".tmp-step_4-q1w2e3r4").mkdir(parents=True)  # as a kill in the PNG writes leaves
    train(make_config(tiny_pipeline_path, caption_folder, tmp_path / "killed", resume_from_checkpoint="latest",
                      **options))  # fmt: skip
    for run in ("straight", "killed"):
        assert sorted(p.name for p in (tmp_path / run / "validation").iterdir()) == ["step_4", "step_8"]
    straight, resumed = (_read_png(tmp_path / run / "validation" / "step_4" / "0.png") for run in ("straight", "killed"))
    assert np.array_equal(straight, resumed)


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


@pytest.mark.parametrize(
    "saved, changed",
    [
        ({}, "'image_interpolation_mode': ('bilinear', 'lanczos')"),  # written before the option: bilinear
        ({"image_interpolation_mode": "lanczos", "resolution": 64}, "'resolution': (64, 32)"),
        ({"image_interpolation_mode": "lanczos", "resolution": 32, "train_batch_size": 2}, None),
    ],
)  # fmt: skip
def test_resuming_with_other_image_or_order_settings_warns(tmp_path, caplog, saved, changed):
    from latentdiff.training.loop import _run_seed

    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / STATE_FILE).write_text(json.dumps({"global_step": 2, "seed": 7, "num_processes": 1, **saved}))
    config = TrainConfig(pretrained_model_name_or_path="x", train_data_dir=str(tmp_path), resolution=32,
                         train_batch_size=2)  # fmt: skip
    with caplog.at_level("WARNING"):
        assert _run_seed(config, checkpoint, Accelerator(cpu=True)) == 7
    assert ("will not continue exactly" in caplog.text) == (changed is not None)
    assert changed is None or changed in caplog.text


@pytest.mark.parametrize("batch, warned", [(4, False), (5, True)])
def test_a_batch_larger_than_the_data_set_warns(tiny_pipeline_path, caption_folder, tmp_path, caplog, batch, warned):
    """The log's "batch 5" would otherwise be the only word on a run whose batches hold 4."""
    with caplog.at_level("WARNING"):
        train(make_config(tiny_pipeline_path, caption_folder, tmp_path / "out", max_train_steps=1, max_train_samples=4,
                          train_batch_size=batch))  # fmt: skip
    expected = f"--train_batch_size {batch} is more than the 4 examples each process has: every batch holds just those 4"
    assert (expected in caplog.text) == warned


def test_resuming_with_other_ema_settings_warns_and_uses_them(tiny_pipeline_path, caption_folder, tmp_path, caplog):
    out, options = tmp_path / "out", dict(use_ema=True, checkpointing_steps=1, max_train_samples=4)
    train(make_config(tiny_pipeline_path, caption_folder, out, max_train_steps=1, ema_decay=0.9, **options))
    with caplog.at_level("WARNING"):
        train(make_config(tiny_pipeline_path, caption_folder, out, max_train_steps=2, ema_decay=0.5,
                          resume_from_checkpoint="latest", **options))  # fmt: skip
    assert "Resuming with changed EMA settings {'decay': (0.9, 0.5)}" in caplog.text
    with safe_open(out / "checkpoint-2" / "ema.safetensors", framework="pt") as f:
        assert json.loads(f.metadata()["ema"])["decay"] == 0.5


def test_resuming_with_other_optimizer_settings_warns_and_records_the_ones_in_use(
    tiny_pipeline_path, caption_folder, tmp_path, caplog
):
    """The checkpoint's optimizer state brings its learning rate and betas back (as in diffusers' script): new
    values are named as not applied, and the card and training_config.json hold the rate the run trained with."""
    out, options = tmp_path / "out", dict(checkpointing_steps=1, max_train_samples=4, learning_rate=1e-3)
    train(make_config(tiny_pipeline_path, caption_folder, out, max_train_steps=1, **options))
    recorder = Recorder()
    with caplog.at_level("WARNING"):
        resumed = make_config(tiny_pipeline_path, caption_folder, out, max_train_steps=2, resume_from_checkpoint="latest",
                              **{**options, "learning_rate": 0.5, "adam_beta2": 0.9})  # fmt: skip
        train(resumed, [recorder])
    assert "--learning_rate 0.5, --adam_beta2 0.9 not applied" in caplog.text
    assert "checkpoint's learning_rate 0.001, adam_beta2 0.999" in caplog.text
    assert recorder.logs[2]["lr"] == pytest.approx(1e-3)
    saved = json.loads((out / "training_config.json").read_text())
    assert (saved["learning_rate"], saved["adam_beta2"]) == (pytest.approx(1e-3), pytest.approx(0.999))
    assert "- learning_rate: 0.001\n" in (out / "README.md").read_text()


def test_resuming_with_scale_lr_and_another_batch_names_the_scaled_rates(tiny_pipeline_path, caption_folder, tmp_path,
                                                                        caplog):  # fmt: skip
    """--learning_rate itself is unchanged: the scaled rate it would give is not applied."""
    out, options = tmp_path / "out", dict(checkpointing_steps=1, max_train_samples=4, scale_lr=True)
    train(make_config(tiny_pipeline_path, caption_folder, out, max_train_steps=1, **options))  # batch 2: rate 2e-3
    with caplog.at_level("WARNING"):
        train(make_config(tiny_pipeline_path, caption_folder, out, max_train_steps=2, resume_from_checkpoint="latest",
                          train_batch_size=4, **options))  # fmt: skip
    assert "--learning_rate 0.001 × 4 (--scale_lr) not applied" in caplog.text
    assert "checkpoint's learning_rate 0.002." in caplog.text


def test_cache_latents_gives_the_same_trajectory(tiny_pipeline_path, caption_folder, tmp_path):
    runs = {}
    for cache in (False, True):
        recorder = Recorder()
        config = make_config(tiny_pipeline_path, caption_folder, tmp_path / f"cache-{cache}", center_crop=True,
                             cache_latents=cache, caption_dropout=0.2)  # fmt: skip
        runs[cache] = (train(config, [recorder]), recorder)
    np.testing.assert_allclose(runs[True][1].losses(), runs[False][1].losses(), rtol=1e-4)
    a, b = (weights(runs[c][0] / UNET_WEIGHTS) for c in (False, True))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)


def test_data_loader_workers_give_the_same_run(tiny_pipeline_path, tmp_path):
    """Each example is a function of seed, epoch and row, not of the process that makes it: worker processes
    (which fork the data set and its transforms) change nothing, straight or resumed mid-epoch."""
    data = write_caption_folder(tmp_path / "data", n=6)
    options = dict(random_flip=True, caption_dropout=0.3, train_batch_size=2, checkpointing_steps=2)
    recorders = {workers: Recorder() for workers in (0, 2)}
    for workers, recorder in recorders.items():
        train(make_config(tiny_pipeline_path, data, tmp_path / f"w{workers}", max_train_steps=4,
                          dataloader_num_workers=workers, **options), [recorder])  # fmt: skip
    assert recorders[0].logs == recorders[2].logs
    assert_same_weights(*(weights(tmp_path / f"w{workers}" / UNET_WEIGHTS) for workers in (0, 2)))
    run_straight_and_resumed(tiny_pipeline_path, data, tmp_path / "resume", dataloader_num_workers=2, **options)


def test_options_text_encoder_v_prediction_cosine_bf16(tiny_pipeline_path, caption_folder, tmp_path):
    """The saved pipeline records what was trained: text encoder weights, prediction type, schedule; frozen parts
    are saved as they were loaded (fp32), not as their bf16 training copies."""
    config = make_config(
        tiny_pipeline_path, caption_folder, tmp_path / "out", max_train_steps=2, train_text_encoder=True,
        gradient_checkpointing=True, prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2",
        mixed_precision="bf16", max_train_samples=4, snr_gamma=5.0, seed=None,
    )  # fmt: skip
    output_dir = train(config)
    drawn = json.loads((output_dir / "training_config.json").read_text())["seed"]
    card = (output_dir / "README.md").read_text()
    assert isinstance(drawn, int) and f"- seed: {drawn}\n" in card
    assert "ema_decay" not in card and "lora_" not in card  # no EMA, no LoRA: their defaults did nothing
    scheduler = json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["beta_schedule"] == "squaredcos_cap_v2"
    base, tuned = (
        weights(folder / "text_encoder" / "model.safetensors") for folder in (tiny_pipeline_path, output_dir)
    )
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert_same_weights(weights(tiny_pipeline_path / vae), weights(output_dir / vae))


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_a_half_precision_checkpoint_trains_and_saves_in_fp32(tiny_pipeline_path, caption_folder, tmp_path,
                                                              mixed_precision):  # fmt: skip
    """Many checkpoints store fp16 weights only: the trained UNet and the saved pipeline are fp32 all the same (a
    UNet left in fp16 met fp32 text embeddings in its first forward)."""
    from diffusers import StableDiffusionPipeline

    half = tmp_path / "half"
    StableDiffusionPipeline.from_pretrained(tiny_pipeline_path, dtype=torch.float16).save_pretrained(half)
    assert load_file(half / UNET_WEIGHTS)["conv_in.weight"].dtype == torch.float16
    recorder = Recorder()
    output_dir = train(make_config(half, caption_folder, tmp_path / "out", max_train_steps=2,
                                   mixed_precision=mixed_precision), trackers=[recorder])  # fmt: skip
    assert all(np.isfinite(recorder.losses()))
    saved = StableDiffusionPipeline.from_pretrained(output_dir, safety_checker=None)
    assert {name: model.dtype for name, model in saved.components.items() if hasattr(model, "dtype")} == dict.fromkeys(
        ("vae", "text_encoder", "unet"), torch.float32
    )


# ---- a UNet from scratch, and what is refused -------------------------------------------------------------------


def test_unet_config_trains_from_scratch_and_is_checked(tiny_pipeline_path, caption_folder, tmp_path):
    config = json.loads((tiny_pipeline_path / "unet" / "config.json").read_text())
    config.update(block_out_channels=[16, 32], attention_head_dim=2)
    (tmp_path / "unet.json").write_text(json.dumps(config))
    output_dir = train(make_config(tiny_pipeline_path, caption_folder, tmp_path / "out", max_train_steps=2,
                                   unet_config=str(tmp_path / "unet.json")))  # fmt: skip
    assert json.loads((output_dir / "unet" / "config.json").read_text())["block_out_channels"] == [16, 32]

    config.update(block_out_channels=[8, 8, 8, 8], down_block_types=["DownBlock2D"] * 4,
                  up_block_types=["UpBlock2D"] * 4, norm_num_groups=4)  # fmt: skip
    (tmp_path / "deep.json").write_text(json.dumps(config))
    vae_factor = 2 ** (
        len(json.loads((tiny_pipeline_path / "vae" / "config.json").read_text())["block_out_channels"]) - 1
    )
    resolution = 8 * vae_factor + 8  # a multiple of 8, not of the VAE factor × the deep UNet's factor 8
    message = (
        rf"--resolution {resolution} must be a multiple of {8 * vae_factor} \(VAE factor {vae_factor} × UNet factor 8\)"
    )
    with pytest.raises(ValueError, match=message):
        train(make_config(tiny_pipeline_path, caption_folder, tmp_path / "bad", resolution=resolution,
                          unet_config=str(tmp_path / "deep.json")))  # fmt: skip
    config.update(cross_attention_dim=7)
    (tmp_path / "wide.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="cross_attention_dim is 7, the text encoder's width is 32"):
        train(
            make_config(tiny_pipeline_path, caption_folder, tmp_path / "bad", unet_config=str(tmp_path / "wide.json"))
        )


def test_config_from_command_line_and_files(tmp_path):
    argv = ["--pretrained_model_name_or_path", "org/model", "--train_data_dir", "data", "--use_ema",
            "--validation_prompts", "a cat", "a dog", "--lr_scheduler", "cosine",
            "--hub_token", "hf_secret"]  # fmt: skip
    config = parse_train_args(argv)
    assert config.use_ema and config.validation_prompts == ["a cat", "a dog"] and config.lr_scheduler == "cosine"
    assert "hf_secret" not in repr(config) and "hub_token" not in config.to_dict()
    (tmp_path / "c.yaml").write_text(
        "pretrained_model_name_or_path: org/model\ntrain_data_dir: data\nuse_ema: true\n"
        "validation_prompts: [a cat, a dog]\nlr_scheduler: cosine\nhub_token: hf_secret\n"
    )
    (tmp_path / "c.json").write_text(json.dumps(config.to_dict() | {"hub_token": "hf_secret"}))
    assert parse_train_args([str(tmp_path / "c.yaml")]) == config == parse_train_args([str(tmp_path / "c.json")])
    with pytest.raises(SystemExit):
        parse_train_args(argv + ["--mixed_precision", "fp8"])


def test_config_file_then_flags_that_override_it(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "pretrained_model_name_or_path: org/model\ntrain_data_dir: data\nmixed_precision: no\nresolution: 256\n"
        "validation_prompts: [a cat]\nseed: 3\nlogging_dir: -logs\n"
    )
    config = parse_train_args([str(tmp_path / "base.yaml"), "--output_dir", "run2", "--resolution", "512"])
    assert (config.output_dir, config.resolution, config.seed) == ("run2", 512, 3)  # the later value wins
    assert config.mixed_precision == "no"  # YAML reads a bare `no` as False
    assert config.validation_prompts == ["a cat"] and config.logging_dir == "-logs"  # a value, not a flag


@pytest.mark.parametrize(
    "text, error, message",
    [
        ("train_data_dir: data\nbogus_key: 3\n", ValueError, r"unknown option\(s\) \['bogus_key'\]"),
        ("resolution: [32\n", ValueError, r"c.yaml is not valid YAML: .*line 2"),
        ("- resolution\n- 32\n", ValueError, r"must map option names to values .* got a list"),
        ("pretrained_model_name_or_path: m\ntrain_data_dir: {a: 1}\n", ValueError, r"train_data_dir must be a string"),
        ("pretrained_model_name_or_path: m\nresolution: [64, 128]\n", ValueError, r"resolution takes one value, got"),
        ("pretrained_model_name_or_path: m\nvalidation_prompts: [a cat, --b]\n", ValueError,
         r"c.yaml: the validation_prompts item '--b' would be read as a command-line option"),
        ("pretrained_model_name_or_path: m\ntrain_data_dir: d\nlearning_rate: .nan\n", ValueError,
         r"c.yaml: --learning_rate must be a number > 0, got nan"),  # TrainConfig's own range checks name it too
    ],
)  # fmt: skip
def test_config_file_errors_name_the_file_and_key(tmp_path, text, error, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(error, match=message):
        parse_train_args([str(tmp_path / "c.yaml")])


@pytest.mark.parametrize(
    "text, message",
    [
        ("train_data_dir: data\n", "the following arguments are required: --pretrained_model_name_or_path"),
        ("pretrained_model_name_or_path: m\ntrain_data_dir: d\nresolution: abc\n", "invalid int value: 'abc'"),
        ("pretrained_model_name_or_path: m\ntrain_data_dir: d\nmixed_precision: fp8\n", "invalid choice: 'fp8'"),
        ("pretrained_model_name_or_path: m\ntrain_data_dir: d\nuse_ema: maybe\n", "got maybe but expected"),
    ],
)  # fmt: skip
def test_config_file_values_are_checked_like_flags(tmp_path, capsys, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        parse_train_args([str(tmp_path / "c.yaml")])
    (line,) = capsys.readouterr().err.splitlines()  # one line, not argparse's usage block before it
    assert exit_info.value.code == 2 and message in line
    assert ("c.yaml: argument" in line) == ("required" not in message)  # a bad value is traced to the file


@pytest.mark.parametrize(
    "file_line, flags",
    [
        ("resolution: 64", ["--resolution", "abc"]),
        ("lr_scheduler: cosine", ["--lr_scheduler", "bogus"]),  # argparse's message quotes every choice, 'cosine' too
        ("image_interpolation_mode: bilinear", ["--image-interpolation-mode=cubic"]),
        ("seed: 1", ["--resolution", "None"]),  # the file does not set it
    ],
)  # fmt: skip
def test_a_bad_command_line_value_is_not_blamed_on_the_config_file(tmp_path, capsys, file_line, flags):
    (tmp_path / "ok.yaml").write_text(f"pretrained_model_name_or_path: m\ntrain_data_dir: d\n{file_line}\n")
    with pytest.raises(SystemExit):
        parse_train_args([str(tmp_path / "ok.yaml"), *flags])
    (line,) = capsys.readouterr().err.splitlines()
    assert "invalid" in line and "ok.yaml" not in line


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(train_batch_size=0), ValueError, r"--train_batch_size must be an integer ≥ 1, got 0"),
        (dict(resolution=30), ValueError, r"--resolution must be a positive multiple of 8, at most 8192 .*, got 30"),
        (dict(resolution=8200), ValueError, r"--resolution must be .* at most 8192 .*, got 8200"),
        (dict(dataloader_num_workers=10**6), ValueError, r"--dataloader_num_workers 1000000 is more than 4 per CPU core"),
        (dict(train_data_dir=None), ValueError, r"Give the training data"),
        (dict(cache_latents=True), ValueError, r"--cache_latents .* pass --center_crop"),
        (dict(cache_latents=True, center_crop=True, random_flip=True), ValueError, r"leave out --random_flip"),
        (dict(report_to="tensorbored"), ValueError, r"unknown tracker\(s\) \['tensorbored'\]"),
        (dict(caption_dropout=1.5), ValueError, r"--caption_dropout must be between 0 and 1"),
        (dict(use_ema="False"), ValueError, r"--use_ema must be True or False, got 'False'"),
        (dict(train_batch_size="2"), ValueError, r"--train_batch_size must be an integer, got '2'"),
        (dict(seed=1.5), ValueError, r"--seed must be an integer, got 1.5"),
        (dict(seed=2**32), ValueError, r"--seed must be at most 4294967295 \(2\*\*32 - 1\), got 4294967296"),
        (dict(seed=-1), ValueError, r"--seed must be an integer from 0 to 2\*\*32 - 1, got -1"),
        (dict(train_batch_size=10**20), ValueError, r"--train_batch_size must be at most 4294967295 .*, got 10{20}"),
        (dict(ddp_timeout=10**20), ValueError, r"--ddp_timeout must be at most 4294967295"),
        (dict(adam_beta2=1.0), ValueError, r"--adam_beta2 must be ≥ 0 and < 1 .*, got 1.0"),
        (dict(learning_rate=-1e-4), ValueError, r"--learning_rate must be a number > 0"),
        (dict(max_grad_norm=0), ValueError, r"--max_grad_norm must be a number > 0"),
        (dict(checkpoints_total_limit=0), ValueError, r"--checkpoints_total_limit must be an integer ≥ 1, got 0"),
        (dict(noise_offset=-0.1), ValueError, r"--noise_offset must be a number ≥ 0, got -0.1"),
        (dict(snr_gamma=float("nan")), ValueError, r"--snr_gamma must be > 0"),
        (dict(lr_scheduler="bogus"), ValueError, r"--lr_scheduler must be one of \['linear', "),
        (dict(mixed_precision="fp8"), ValueError, r"--mixed_precision must be one of \['no', 'fp16', 'bf16'\]"),
        (dict(image_interpolation_mode="cubic"), ValueError, r"--image_interpolation_mode must be one of \[.*'bicubic'"),
        (
            dict(resume_from_checkpoint="checkpoint-9"),
            FileNotFoundError,
            r"checkpoint-9 does not exist.*\['checkpoint-3'\]",
        ),
    ],
)
def test_config_errors_name_the_option(tmp_path, overrides, error, message):
    (tmp_path / "out" / "checkpoint-3").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint-3" / STATE_FILE).write_text("{}")
    with pytest.raises(error, match=message):
        TrainConfig(**{"pretrained_model_name_or_path": "m", "train_data_dir": "d", "output_dir": str(tmp_path / "out"),
                       **overrides})  # fmt: skip


def test_python_values_get_the_declared_types(tmp_path):
    """What a caller means: a Path for a string option, an int for a float, one prompt as a string."""
    config = TrainConfig(pretrained_model_name_or_path=tmp_path / "model", train_data_dir=tmp_path / "data",
                         output_dir=tmp_path / "out", learning_rate=1, validation_prompts="a red square")  # fmt: skip
    assert config.output_dir == str(tmp_path / "out") and config.validation_prompts == ["a red square"]
    assert isinstance(config.learning_rate, float)
    json.dumps(config.to_dict())  # what training_config.json holds


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="--output_dir .*file is a file"):
        TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", output_dir=str(tmp_path / "file"))


# ---- the parts ---------------------------------------------------------------------------------------------------


def test_checkpoints_complete_latest_and_rotation_keeps_the_resumed_one(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / STATE_FILE).write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-10").mkdir()  # interrupted before its state file: not complete
    (tmp_path / ".tmp-checkpoint-12").mkdir()  # interrupted before the rename
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
        "checkpoint-8",
    ]
    assert resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-8"
    assert resolve_checkpoint(tmp_path, "checkpoint-4") == tmp_path / "checkpoint-4"
    with pytest.raises(ValueError, match="checkpoint-10 is not a complete checkpoint"):
        resolve_checkpoint(tmp_path, "checkpoint-10")
    assert resolve_checkpoint(tmp_path / "nothing", "latest") is None
    foreign = tmp_path / "diffusers-run"
    (foreign / "checkpoint-500" / "unet").mkdir(parents=True)  # diffusers' script: no training_state.json
    with pytest.raises(ValueError, match="checkpoint-500 in .* has no training_state.json, so latentdiff did not"):
        resolve_checkpoint(foreign, "latest")

    rotate_checkpoints(tmp_path, total_limit=2, keep=tmp_path / "checkpoint-2")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-6", "checkpoint-8"]
    assert not (tmp_path / ".tmp-checkpoint-12").exists()


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(ema_decay=0.99), "--ema_decay is an EMA option: add --use_ema"),
        (dict(offload_ema=True), "--offload_ema is an EMA option: add --use_ema"),
        (dict(use_ema=True, ema_power=0.75), "--ema_power is a setting of the EMA warm-up: add --ema_use_warmup"),
        (dict(lr_scheduler="piecewise_constant"), "lr_scheduler"),
    ],
)
def test_options_that_would_be_ignored_or_crash_are_refused(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(pretrained_model_name_or_path="x", train_data_dir=str(tmp_path), output_dir=str(tmp_path), **options)


@pytest.mark.parametrize("use_warmup, foreach, offload, chunk_bytes, min_decay", [
    (False, True, False, 2**20, 0.0), (True, True, False, 2**20, 0.0), (False, False, False, 2**20, 0.0),
    (False, True, True, 2**20, 0.0), (False, True, True, 100, 0.0), (False, True, False, 100, 0.0),  # 100 bytes: the
    (False, True, False, 2**20, 0.5),  # 4 tensors in 3 chunks; a floor above the first steps' (1 + s) / (10 + s)
])  # fmt: skip
def test_ema_matches_diffusers(monkeypatch, use_warmup, foreach, offload, chunk_bytes, min_decay):
    """On a CPU `_foreach_lerp_` loops over `lerp_` itself, so foreach against per-tensor checks the code path (the
    chunks, the copy back of an offloaded average: a copy here too), not CUDA's multi-tensor kernel."""
    from diffusers.training_utils import EMAModel as DiffusersEMA

    from latentdiff.training import ema

    monkeypatch.setattr(ema, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    options = dict(decay=0.99, min_decay=min_decay, use_warmup=use_warmup, update_after_step=2)
    ours = EMAModel(model, **options, foreach=foreach, offload=offload)
    other_path = EMAModel(model, **options, foreach=not foreach)
    reference = DiffusersEMA(model.parameters(), decay=0.99, min_decay=min_decay, use_ema_warmup=use_warmup,
                             update_after_step=2)  # fmt: skip
    for _ in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.step(model)
        other_path.step(model)
        reference.step(model.parameters())
    for mine, theirs in zip(ours.shadow.values(), reference.shadow_params):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(ours.shadow.values(), other_path.shadow.values()))  # bit for bit
    if offload:  # the average stays in host memory wherever the model goes
        assert all(t.device.type == "cpu" for t in ours.to("meta").shadow.values())

    before = [p.clone() for p in model.parameters()]
    with ours.averaged(model):
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), ours.shadow.values()))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    restored = EMAModel(model)
    restored.load_state_dict(ours.state_dict())
    assert restored.optimization_step == 30 and restored.get_decay(31) == ours.get_decay(31)
    assert all(torch.equal(a, b) for a, b in zip(restored.shadow.values(), ours.shadow.values()))
    wrong = {**ours.state_dict(), "shadow": {**ours.shadow, "0.bias": torch.zeros(1)}}
    with pytest.raises(ValueError, match=r"other shapes for \['0.bias'\]"):
        restored.load_state_dict(wrong)


def test_ema_of_bf16_weights_is_fp32_and_converts_a_chunk_at_a_time(monkeypatch):
    """DeepSpeed keeps bf16 module weights: the fp32 average must not make an fp32 copy of all of them at once."""
    from latentdiff.training import ema

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)]).to(torch.bfloat16)
    full_precision = copy.deepcopy(model).float()  # the same values, already fp32: nothing to convert
    ours, reference = EMAModel(model, decay=0.9), EMAModel(full_precision, decay=0.9)
    converted = []
    original_chunks = ema._chunks
    monkeypatch.setattr(ema, "CHUNK_BYTES", 64 * 64 * 4)  # one weight matrix (the biases join the next chunk)
    monkeypatch.setattr(ema, "_chunks", lambda *a: (converted.append(c) or c for c in original_chunks(*a)))
    for _ in range(5):
        with torch.no_grad():
            for p, q in zip(model.parameters(), full_precision.parameters()):
                p.add_(torch.randn_like(p))
                q.copy_(p)
        ours.step(model)
        reference.step(full_precision)
    assert all(t.dtype == torch.float32 for t in ours.shadow.values())
    assert all(torch.equal(a, b) for a, b in zip(ours.shadow.values(), reference.shadow.values()))
    biggest = max(sum(shadow.numel() * 4 for shadow, _ in chunk) for chunk in converted)
    assert len(converted) >= 4 * 5 and biggest <= 64 * 64 * 4 + 64 * 4  # no chunk held all 66 KB of the weights


@pytest.mark.parametrize("detail_preservation", [1.0, 0.5])
def test_dream_matches_diffusers(detail_preservation):
    from conftest import UNET_CONFIGS, unet_inputs
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_dream_and_update_latents

    from latentdiff import UNet2DConditionModel

    torch.manual_seed(0)
    unet, scheduler = UNet2DConditionModel(**UNET_CONFIGS["sd1"]), DDPMScheduler(beta_schedule="scaled_linear")
    inputs = unet_inputs(UNET_CONFIGS["sd1"], batch=2)
    noisy, timesteps, text = inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]
    noise = torch.randn_like(noisy)
    ours = dream_rectify(unet, scheduler, noisy, timesteps, text, noise, noise, detail_preservation)
    theirs = compute_dream_and_update_latents(unet, scheduler, timesteps, noise, noisy, noise, text,
                                              detail_preservation)  # fmt: skip
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-6, atol=1e-6)
    assert not torch.equal(ours[0], noisy) and not ours[1].requires_grad  # moved, and no gradient through ε̂


def test_dream_training_runs_and_changes_the_steps(tiny_pipeline_path, caption_folder, tmp_path):
    losses = {}
    for dream in (False, True):
        recorder = Recorder()
        train(make_config(tiny_pipeline_path, caption_folder, tmp_path / str(dream), max_train_steps=3,
                          dream_training=dream), trackers=[recorder])  # fmt: skip
        losses[dream] = recorder.losses()
    assert all(np.isfinite(losses[True])) and losses[True] != losses[False]


def test_dream_refuses_v_prediction_and_needs_its_flag(tmp_path):
    from diffusers import DDPMScheduler

    options = dict(pretrained_model_name_or_path="m", train_data_dir="d", output_dir=str(tmp_path))
    config = TrainConfig(**options, dream_training=True, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="--dream_training is defined for epsilon prediction; this run predicts 'v_pr"):
        noise_scheduler_for(DDPMScheduler(), config)
    with pytest.raises(ValueError, match="--dream_detail_preservation is a setting of DREAM: add --dream_training"):
        TrainConfig(**options, dream_detail_preservation=0.5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_parts_match_diffusers(prediction_type):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type)
    timesteps = torch.tensor([0, 10, 250, 500, 999])
    snr = compute_snr(scheduler, timesteps)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1 if prediction_type == "v_prediction" else snr)
    torch.testing.assert_close(min_snr_weights(scheduler, timesteps, 5.0), expected)

    latents, noise = torch.randn(5, 4, 2, 2), torch.randn(5, 4, 2, 2)
    target = training_target(scheduler, latents, noise, timesteps)
    alpha = scheduler.alphas_cumprod[timesteps].sqrt()[:, None, None, None]
    sigma = (1 - scheduler.alphas_cumprod[timesteps]).sqrt()[:, None, None, None]
    torch.testing.assert_close(target, noise if prediction_type == "epsilon" else alpha * noise - sigma * latents)

    # the loss depends on the generator only: the same seed gives the same loss
    unet = lambda x, t, c, return_dict: (x * 0.5,)  # noqa: E731
    losses = [
        diffusion_loss(unet, scheduler, latents, None, torch.Generator().manual_seed(3), 5.0, 0.1, 0.1)
        for _ in range(2)
    ]
    assert losses[0] == losses[1] and torch.isfinite(losses[0])


@pytest.mark.parametrize("snr_gamma, dtype", [(None, torch.float32), (5.0, torch.float32), (5.0, torch.bfloat16)])
def test_diffusion_loss_is_its_formula_on_the_same_draws(snr_gamma, dtype):
    """Rebuild ε (with offset noise), ξ and t from the generator in the loss's order: the UNet must see
    add_noise(x₀, ε + γξ, t) and the loss must be the (min-SNR-weighted) MSE against ε itself, not ε + γξ. In bf16
    the offset is drawn in float32 and added into ε, as diffusers' script does (bit for bit)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear")
    latents = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    seen = []
    unet = lambda x, t, c, return_dict: (seen.append(x) or torch.zeros_like(x),)  # noqa: E731
    loss = diffusion_loss(unet, scheduler, latents, None, torch.Generator().manual_seed(5), snr_gamma,
                          noise_offset=0.1, input_perturbation=0.2)  # fmt: skip

    draws = torch.Generator().manual_seed(5)
    noise = torch.randn(latents.shape, generator=draws, dtype=dtype)
    noise += 0.1 * torch.randn((3, 4, 1, 1), generator=draws)  # offset noise, per image and channel
    xi = torch.randn(latents.shape, generator=draws, dtype=dtype)
    timesteps = torch.randint(0, 1000, (3,), generator=draws)
    torch.testing.assert_close(seen[0], scheduler.add_noise(latents, noise + 0.2 * xi, timesteps), rtol=0, atol=0)
    per_example = (noise.float() ** 2).mean(dim=(1, 2, 3))  # the prediction is 0: the error is ε (float32, as the loss)
    weights = torch.ones(3) if snr_gamma is None else min_snr_weights(scheduler, timesteps, snr_gamma)
    assert not torch.allclose(weights, torch.ones(3)) or snr_gamma is None
    torch.testing.assert_close(loss, (per_example * weights).mean())


def test_an_epoch_ending_mid_accumulation_is_a_step_and_the_logged_loss_is_the_mean(
    tiny_pipeline_path, tmp_path, monkeypatch
):
    """10 rows at batch 2 are 5 batches: with 2 to accumulate, an epoch is 3 optimizer steps (Accelerate steps at
    the loader's end), so 2 epochs are 6; each step logs the mean of its micro-batches' losses, not their sum."""
    import latentdiff.training.loop as loop

    constant = lambda unet, *args, **kwargs: sum(p.sum() for p in unet.parameters()) * 0 + 0.25  # noqa: E731
    monkeypatch.setattr(loop, "diffusion_loss", constant)
    recorder = Recorder()
    data = write_caption_folder(tmp_path / "ten", n=10)
    config = make_config(tiny_pipeline_path, data, tmp_path / "out", max_train_steps=None, num_train_epochs=2,
                         gradient_accumulation_steps=2)  # fmt: skip
    output_dir = train(config, [recorder])
    assert sorted(recorder.logs) == [1, 2, 3, 4, 5, 6]
    card = (output_dir / "README.md").read_text()  # the steps the epochs came to, not the unset option
    assert "- max_train_steps: 6\n" in card and "- num_train_epochs: 2\n" in card
    assert recorder.losses() == pytest.approx([0.25] * 6)


def test_allow_tf32_holds_for_the_run_only(tiny_pipeline_path, caption_folder, tmp_path, monkeypatch):
    import latentdiff.training.loop as loop

    seen, real = [], loop.diffusion_loss
    monkeypatch.setattr(loop, "diffusion_loss", lambda *a, **k: seen.append(torch.backends.cuda.matmul.allow_tf32)
                        or real(*a, **k))  # fmt: skip
    assert not torch.backends.cuda.matmul.allow_tf32
    train(make_config(tiny_pipeline_path, caption_folder, tmp_path / "out", max_train_steps=1, allow_tf32=True))
    assert seen == [True] and not torch.backends.cuda.matmul.allow_tf32  # later matmuls in the process: full fp32


def test_ddp_timeout_reaches_the_process_group(tmp_path):
    """How long the other processes wait for the main one's validation or final save (NCCL's default: 10 min)."""
    from datetime import timedelta

    from latentdiff.training.accelerator import accelerator_for

    config = make_config(tmp_path, tmp_path, tmp_path / "out", ddp_timeout=7200)
    with accelerator_for(config, []) as accelerator:
        assert accelerator.init_handler.to_kwargs() == {"timeout": timedelta(hours=2)}
    with pytest.raises(ValueError, match="--ddp_timeout must be an integer ≥ 1, got 0"):
        make_config(tmp_path, tmp_path, tmp_path / "out", ddp_timeout=0)


def test_other_processes_load_without_progress_bars_and_put_them_back():
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub import utils as hf_hub_utils
    from transformers.utils import logging as transformers_logging

    from latentdiff.training.models import _progress_bars_off

    def bars() -> tuple[bool, bool, bool]:
        return (not hf_hub_utils.are_progress_bars_disabled(), transformers_logging.is_progress_bar_enabled(),
                diffusers_logging.is_progress_bar_enabled())  # fmt: skip

    before = bars()
    with _progress_bars_off():
        assert bars() == (False, False, False)
    assert bars() == before


def test_compile_trains_like_eager(tiny_pipeline_path, caption_folder, tmp_path, monkeypatch):
    """`--compile` through AOTAutograd (forward and backward graphs traced, run without codegen): the same losses
    and weights as eager. Inductor's kernels are for the GPU run (benchmarks/gpu.py)."""
    import functools

    import latentdiff.training.models as training_models
    from latentdiff.acceleration import compile_unet

    monkeypatch.setattr(training_models, "compile_unet", functools.partial(compile_unet, backend="aot_eager"))
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        recorder = Recorder()
        config = make_config(tiny_pipeline_path, caption_folder, tmp_path / f"compile-{compiled}", max_train_steps=3,
                             compile=compiled)  # fmt: skip
        runs[compiled] = (weights(train(config, [recorder]) / UNET_WEIGHTS), recorder.losses())
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert graphs == 0 if not compiled else 1 <= graphs <= 2, graphs  # the UNet (+ a last, smaller batch)
    np.testing.assert_allclose(runs[True][1], runs[False][1], rtol=1e-5)
    for key, value in runs[False][0].items():
        # atol 1e-4 (a tenth of one Adam step at lr 1e-3): on torch 2.6-2.9 AOTAutograd's gradients differ from eager
        # in the last bits, and Adam turns that into up to 1.6e-5 on a weight whose gradient is near 0
        torch.testing.assert_close(runs[True][0][key], value, rtol=1e-4, atol=1e-4)


def test_an_accelerator_that_fails_to_build_leaves_the_next_run_unaffected(tmp_path, monkeypatch):
    import latentdiff.training.accelerator as accelerator_module

    def half_built(*args, **kwargs):
        build(*args, **kwargs)  # Accelerate's process-wide state is set up here ...
        raise RuntimeError("the accelerator failed")  # ... and the constructor fails after it

    build = accelerator_module.Accelerator
    monkeypatch.setattr(accelerator_module, "Accelerator", half_built)
    config = TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", output_dir=str(tmp_path), report_to="none")
    with pytest.raises(RuntimeError, match="the accelerator failed"), accelerator_module.accelerator_for(config, []):
        pass
    monkeypatch.undo()
    config = TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", output_dir=str(tmp_path),
                         report_to="none", mixed_precision="bf16")  # fmt: skip
    with accelerator_module.accelerator_for(config, []) as accelerator:
        assert accelerator.mixed_precision == "bf16"


def test_a_tracker_that_is_not_installed_is_named_in_a_warning_and_left_out(tmp_path, monkeypatch, caplog):
    import latentdiff.training.accelerator as accelerator_module

    monkeypatch.setattr(accelerator_module, "get_available_trackers", lambda: [])
    config = TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", output_dir=str(tmp_path),
                         report_to="wandb")  # fmt: skip
    with caplog.at_level("WARNING"), accelerator_module.accelerator_for(config, []) as accelerator:
        assert accelerator.log_with == []
    assert "--report_to ['wandb']: not installed, not logging there" in caplog.text
