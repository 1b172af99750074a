"""Each training option reaches the place where it acts.

The loss, the EMA, the data set and the schedules are each tested on their own, and most runs are compared with
other runs (straight against resumed, cached against not), where an option lost on the way is lost in both. One
run with every such option set, watched where each acts, checks the wiring itself.
"""

import inspect
import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_data import write_caption_folder
from test_training import Recorder, make_config
from transformers import CLIPTokenizer

import latentdiff.training.loop as loop
from latentdiff.pipelines import LatentDiffusionPipeline
from latentdiff.text import tokenize_prompts
from latentdiff.training import train
from latentdiff.training.validation import generate_validation_images

OPTIONS = dict(
    max_train_steps=4, gradient_accumulation_steps=2, snr_gamma=5.0, noise_offset=0.05, input_perturbation=0.1,
    caption_dropout=1.0, beta_schedule="squaredcos_cap_v2", lr_scheduler="constant_with_warmup", lr_warmup_steps=3,
    scale_lr=True, use_ema=True, ema_decay=0.9, checkpointing_steps=2, validation_prompts=["a red square"], validation_epochs=1,
    validation_inference_steps=2,
)  # fmt: skip


@pytest.fixture(scope="module")
def watched_run(tiny_pipeline_path, tmp_path_factory):
    """One run with `OPTIONS`, recording what the loss function and the text encoder were given and what was logged."""
    tmp_path = tmp_path_factory.mktemp("wiring")
    data = write_caption_folder(tmp_path / "data", n=8)
    loss_calls, input_ids = [], []
    real_loss, real_encode = loop.diffusion_loss, loop.encode_prompts
    loss_signature = inspect.signature(real_loss)

    def loss_spy(*args, **kwargs):
        loss_calls.append(loss_signature.bind(*args, **kwargs).arguments)
        return real_loss(*args, **kwargs)

    def encode_spy(text_encoder, ids, *args, **kwargs):
        input_ids.append(ids.clone())
        return real_encode(text_encoder, ids, *args, **kwargs)

    recorder = Recorder()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "diffusion_loss", loss_spy)
        patch.setattr(loop, "encode_prompts", encode_spy)
        config = make_config(tiny_pipeline_path, data, tmp_path / "out", **OPTIONS)
        train(config, [recorder])
    return dict(config=config, loss_calls=loss_calls, input_ids=input_ids, logs=recorder.logs, out=tmp_path / "out")


def test_loss_options_reach_the_loss(watched_run):
    calls = watched_run["loss_calls"]
    assert len(calls) == 8  # 4 optimizer steps × 2 micro-batches
    for arguments in calls:
        assert (arguments["snr_gamma"], arguments["noise_offset"], arguments["input_perturbation"]) == (5.0, 0.05, 0.1)


def test_the_run_trains_on_the_beta_schedule_it_saves(watched_run):
    """--beta_schedule changes the forward process the UNet learns, not only the scheduler config it ships."""
    expected = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    saved = DDPMScheduler.from_pretrained(watched_run["out"], subfolder="scheduler").alphas_cumprod
    torch.testing.assert_close(saved, expected)
    for arguments in watched_run["loss_calls"]:
        torch.testing.assert_close(arguments["noise_scheduler"].alphas_cumprod, expected)


def test_caption_dropout_reaches_the_batches(watched_run, tiny_pipeline_path):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline_path, subfolder="tokenizer")
    empty = tokenize_prompts(tokenizer, [""])[0]
    rows = [row for batch in watched_run["input_ids"] for row in batch]
    assert len(rows) == 16 and all(torch.equal(row, empty) for row in rows)  # --caption_dropout 1: every caption ""


def test_warmup_counts_optimizer_steps_up_to_the_scaled_rate(watched_run):
    """--lr_warmup_steps 3 with accumulation 2: the rate climbs over 3 optimizer steps (6 micro-batches), to
    --scale_lr's 1e-3 × batch 2 × accumulation 2 × 1 process (diffusers' rule)."""
    lrs = [watched_run["logs"][step]["lr"] for step in (1, 2, 3, 4)]
    assert lrs == pytest.approx([4e-3 / 3, 8e-3 / 3, 4e-3, 4e-3])


def test_the_ema_steps_once_per_optimizer_step(watched_run):
    with safe_open(watched_run["out"] / "checkpoint-4" / "ema.safetensors", framework="pt") as handle:
        assert json.loads(handle.metadata()["ema"])["optimization_step"] == 4


def test_validation_samples_the_ema_weights(watched_run):
    """The validation after step 2 (the first epoch's) is what the EMA weights of checkpoint-2 draw for the same
    prompt and seed."""
    config = watched_run["config"]
    pipeline = LatentDiffusionPipeline.from_pretrained(watched_run["out"])
    ema = load_file(watched_run["out"] / "checkpoint-2" / "ema.safetensors")
    pipeline.unet.load_state_dict(ema, strict=True)
    (expected,) = generate_validation_images(
        pipeline, config.validation_prompts, config.seed, config.validation_inference_steps,
        config.validation_guidance_scale, config.resolution, Accelerator(cpu=True),
    )  # fmt: skip
    saved = np.asarray(Image.open(watched_run["out"] / "validation" / "step_2" / "0.png"), dtype=int)
    np.testing.assert_allclose(saved, np.asarray(expected, dtype=int), atol=1)
