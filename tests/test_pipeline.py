"""LatentDiffusionPipeline: a correct sampler, StableDiffusionPipeline's behaviour, and folders that move both ways."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline
from diffusers import UNet2DConditionModel as DiffusersUNet
from diffusers.callbacks import SDCFGCutoffCallback
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image
from transformers import CLIPTextModel

from latentdiff.generate import SCHEDULERS, generate_images, set_scheduler
from latentdiff.models import UNet2DConditionModel
from latentdiff.pipelines import LatentDiffusionPipeline
from latentdiff.tiny import tiny_components

STEPS = 3
PROMPTS = ["a photo of a cat", "red apple, fruit emoji"]


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_path) -> LatentDiffusionPipeline:
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_scheduler(pipe: DiffusionPipeline, scheduler_cls: type, **overrides) -> DiffusionPipeline:
    """A pipeline of the same class sharing `pipe`'s models, with another sampler (`pipe` stays untouched)."""
    components = dict(pipe.components, scheduler=scheduler_cls.from_config(pipe.scheduler.config, **overrides))
    new = type(pipe)(**components)
    new.set_progress_bar_config(disable=True)
    return new


def run(pipe, seed: int = 0, **kwargs):
    kwargs = {"prompt": PROMPTS[0], "num_inference_steps": STEPS, "output_type": "np", **kwargs}
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


# ---- the sampler is right ----------------------------------------------------------------------------------------


class ExactNoiseUNet(ModelMixin, ConfigMixin):
    """Stand-in UNet that knows the clean latent x0: ε = (x_t − √ᾱ_t x0) / √(1 − ᾱ_t), ignoring the text."""

    @register_to_config
    def __init__(self, sample_size: int = 8, in_channels: int = 4):
        super().__init__()
        self.register_buffer("x0", torch.zeros(1, in_channels, sample_size, sample_size))
        self.register_buffer("alphas_cumprod", torch.ones(1000))
        self.batch_sizes = []

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=True, **kwargs):
        self.batch_sizes.append(sample.shape[0])
        alpha_bar = self.alphas_cumprod[int(timestep)]
        return ((sample - alpha_bar.sqrt() * self.x0) / (1 - alpha_bar).sqrt(),)


@pytest.fixture
def exact_pipe(pipe):
    unet = ExactNoiseUNet()
    unet.x0.copy_(torch.randn(unet.x0.shape, generator=torch.Generator().manual_seed(7)))
    unet.alphas_cumprod.copy_(pipe.scheduler.alphas_cumprod)
    components = dict(pipe.components, unet=unet)
    return LatentDiffusionPipeline(**components), unet


@pytest.mark.parametrize(
    "scheduler_cls, overrides",
    [(DDIMScheduler, {"set_alpha_to_one": True}), (DDPMScheduler, {})],  # DDIM's last step then lands on ᾱ = 1
)
def test_sampler_recovers_the_clean_latent_from_exact_noise(exact_pipe, scheduler_cls, overrides):
    exact, unet = exact_pipe
    exact = with_scheduler(exact, scheduler_cls, **overrides)
    latents = run(exact, output_type="latent", guidance_scale=1.0, num_inference_steps=4)
    torch.testing.assert_close(latents, unet.x0, atol=1e-4, rtol=0)


def test_identical_conditional_and_unconditional_predictions_equal_no_guidance(exact_pipe):
    exact, unet = exact_pipe
    guided = run(exact, output_type="latent", guidance_scale=7.5, eta=1.0, seed=3)
    assert unet.batch_sizes == [2] * STEPS  # [uncond; cond] in one UNet call per step
    unet.batch_sizes.clear()
    plain = run(exact, output_type="latent", guidance_scale=1.0, eta=1.0, seed=3)
    assert unet.batch_sizes == [1] * STEPS  # guidance_scale <= 1 skips the unconditional half
    torch.testing.assert_close(guided, plain, atol=1e-5, rtol=0)


def test_diffusers_cfg_cutoff_callback_drops_the_unconditional_half(exact_pipe):
    exact, unet = exact_pipe
    run(exact, output_type="latent", callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))
    assert unet.batch_sizes == [2, 2, 1]  # cut after step int(3 · 0.5) = 1


# ---- behaviour ---------------------------------------------------------------------------------------------------


def test_seeds_are_reproducible_and_distinct(pipe):
    first, again, other = run(pipe, seed=0), run(pipe, seed=0), run(pipe, seed=1)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


def test_batch_shapes_and_output_types(pipe):
    images = run(pipe, prompt=PROMPTS, num_images_per_prompt=2, output_type="pil")
    assert len(images) == 4 and all(isinstance(i, Image.Image) and i.size == (32, 32) for i in images)
    array = run(pipe, prompt=PROMPTS, num_images_per_prompt=2, output_type="np")
    assert array.shape == (4, 32, 32, 3) and 0 <= array.min() and array.max() <= 1
    np.testing.assert_allclose(np.stack([np.asarray(i) for i in images]), np.round(array * 255), atol=1)
    tensor = run(pipe, prompt=PROMPTS[0], num_images_per_prompt=3, output_type="pt")
    assert tensor.shape == (3, 3, 32, 32)
    assert run(pipe, output_type="latent", height=48, width=64).shape == (1, 4, 12, 16)
    images, nsfw = pipe(PROMPTS[0], num_inference_steps=1, output_type="np", return_dict=False)
    assert images.shape == (1, 32, 32, 3) and nsfw is None


def test_negative_prompt_and_embeddings_are_the_same_input(pipe):
    by_text = run(pipe, prompt=PROMPTS, negative_prompt=["blurry", "ugly"], seed=2)
    embeds, negative = pipe.encode_prompt(PROMPTS, pipe.device, 1, True, ["blurry", "ugly"])
    by_embeds = run(pipe, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative, seed=2)
    np.testing.assert_allclose(by_text, by_embeds, atol=1e-6)
    assert np.abs(by_text - run(pipe, prompt=PROMPTS, seed=2)).max() > 1e-4  # the negative prompt matters


def test_callback_sees_and_replaces_tensors(pipe):
    seen, seen_shapes = [], []

    def callback(p, i, t, tensors):
        seen.append((i, int(t), sorted(tensors)))
        seen_shapes.append(tuple(tensors["prompt_embeds"].shape))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == STEPS - 1 else {}

    out = run(pipe, output_type="latent", callback_on_step_end=callback,
              callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])  # fmt: skip
    assert [s[0] for s in seen] == list(range(STEPS)) and seen[0][2] == ["latents", "prompt_embeds"]
    assert seen_shapes == [(2, 77, 32)] * STEPS  # [negative; positive], as in diffusers
    assert [s[1] for s in seen] == pipe.scheduler.timesteps.tolist()
    assert torch.count_nonzero(out) == 0


def test_interrupt_set_by_a_callback_skips_the_remaining_steps(pipe):
    seen = []

    def stop_after_the_first_step(p, i, t, tensors):
        seen.append(i)
        p._interrupt = True
        return {}

    assert run(pipe, callback_on_step_end=stop_after_the_first_step).shape == (1, 32, 32, 3)
    assert seen == [0] and pipe.interrupt
    run(pipe)
    assert not pipe.interrupt  # each call starts uninterrupted


def test_without_a_text_encoder_embeddings_give_the_same_images(pipe, tiny_pipeline_path):
    no_text = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_path, text_encoder=None, tokenizer=None)
    no_text.set_progress_bar_config(disable=True)
    embeds, negative = pipe.encode_prompt(PROMPTS[:1], pipe.device, 1, True)
    by_embeds = run(no_text, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative)
    np.testing.assert_allclose(by_embeds, run(pipe), atol=1e-6)
    with pytest.raises(ValueError, match=r"no text encoder or tokenizer .* cannot encode prompt, guidance's"):
        run(no_text)
    with pytest.raises(ValueError, match=r"cannot encode guidance's negative prompt \"\": pass prompt_embeds \(and"):
        run(no_text, prompt=None, prompt_embeds=embeds)


def test_a_unet_without_sample_size_needs_height_and_width(pipe):
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "sample_size": None})
    sized = LatentDiffusionPipeline(**{**pipe.components, "unet": unet})
    with pytest.raises(ValueError, match="Pass height and width: this UNet's config has no sample_size"):
        sized(PROMPTS[0], num_inference_steps=1)


def test_clip_skip_conditions_on_an_earlier_layer_through_the_final_norm(pipe):
    ids = pipe.tokenizer([PROMPTS[0]], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
        encoder = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)  # transformers <= 5.0 nests the norm
        second_last = encoder.final_layer_norm(hidden[-2])  # diffusers' clip_skip=1
    embeds, negative = pipe.encode_prompt(PROMPTS[0], pipe.device, 1, True, clip_skip=1)
    torch.testing.assert_close(embeds, second_last)
    torch.testing.assert_close(negative, pipe.encode_prompt("", pipe.device, 1, False)[0])  # as diffusers: last layer
    np.testing.assert_allclose(run(pipe, clip_skip=0), run(pipe), atol=1e-6)  # 0: the last layer, as without it
    assert np.abs(run(pipe, clip_skip=1) - run(pipe)).max() > 1e-3
    with pytest.raises(ValueError, match=r"clip_skip must be an integer from 0 to 1 \(the encoder has 2 layers\)"):
        run(pipe, clip_skip=2)


def test_custom_sigmas_give_diffusers_images(pipe, tiny_pipeline_path):
    from diffusers import EulerDiscreteScheduler

    sigmas = [14.6, 6.0, 2.5, 0.9, 0.3]
    euler = with_scheduler(pipe, EulerDiscreteScheduler)
    reference = StableDiffusionPipeline.from_pretrained(tiny_pipeline_path, safety_checker=None)
    reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(run(euler, sigmas=sigmas), run(reference, sigmas=sigmas), atol=1e-4)
    assert euler.num_timesteps == reference.num_timesteps == 4  # Euler: the last sigma is where the last step ends
    with pytest.raises(ValueError, match="DDIMScheduler does not take custom sigmas"):
        run(pipe, sigmas=sigmas)
    with pytest.raises(ValueError, match="at most one of timesteps and sigmas"):
        run(euler, sigmas=sigmas, timesteps=[999, 500])


def test_vae_memory_helpers_keep_the_images(pipe):
    reference = run(pipe, prompt=PROMPTS)
    pipe.enable_vae_slicing()
    pipe.enable_vae_tiling()
    try:
        assert pipe.vae.use_slicing and pipe.vae.use_tiling
        np.testing.assert_allclose(run(pipe, prompt=PROMPTS), reference, atol=1e-5)
    finally:
        pipe.disable_vae_slicing()
        pipe.disable_vae_tiling()


def test_model_cpu_offload_gives_the_same_images(pipe, tiny_pipeline_path):
    offloaded = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_path)
    offloaded.set_progress_bar_config(disable=True)
    # on CPU-only machines the hooks "offload" to the CPU itself: the same code path, nothing moves
    offloaded.enable_model_cpu_offload(device="cuda" if torch.cuda.is_available() else "cpu")
    assert len(offloaded._all_hooks) == 3  # text_encoder -> unet -> vae
    np.testing.assert_allclose(run(offloaded, prompt=PROMPTS), run(pipe, prompt=PROMPTS), atol=1e-4)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_named_scheduler_swaps_in(pipe, name):
    cls, overrides = SCHEDULERS[name]
    images = run(with_scheduler(pipe, cls, **overrides), num_inference_steps=2)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_named_schedulers_keep_the_models_schedule_and_their_options(tiny_pipeline_path):
    """`generate --scheduler NAME` swaps the sampler only: a v-prediction model with its own betas stays one."""
    pipeline = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_path)
    pipeline.scheduler.register_to_config(prediction_type="v_prediction", beta_end=0.02)
    for name, (cls, _) in SCHEDULERS.items():
        set_scheduler(pipeline, name)
        config = pipeline.scheduler.config
        assert type(pipeline.scheduler) is cls and (config.prediction_type, config.beta_end) == ("v_prediction", 0.02)
        if name.startswith("dpm++"):
            assert config.algorithm_type == "dpmsolver++" and config.use_karras_sigmas == name.endswith("_karras")


def test_sampling_loop_never_waits_for_the_device(tiny_pipeline_path):
    """A meta tensor has no data, so anything that reads a device value on the host (`.item()`, `if t >= 0`,
    indexing a CPU table with a device timestep, `nonzero`) raises. The whole call (text encoder, UNet with guidance,
    each named scheduler's steps) runs on `meta`: on a GPU it queues every step without a host sync. With the
    scheduler's timesteps on the device, as diffusers' pipelines keep them, every one of these schedulers raises."""
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_path).to("meta")
    pipe.set_progress_bar_config(disable=True)
    for name, (cls, overrides) in sorted(SCHEDULERS.items()):
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **overrides)
        latents = pipe(PROMPTS, num_inference_steps=STEPS, output_type="latent").images
        assert latents.device.type == "meta" and latents.shape == (2, 4, 8, 8), name


def test_compiled_pipeline_traces_the_unet_once_with_eager_images(tiny_pipeline_path):
    """`pipe.compile()` makes one graph of the UNet (and of the VAE decoder) that serves every step: timesteps
    reach it as tensors. The backend here hands dynamo's graph back to eager execution: tracing is checked, not
    inductor's kernels (those are for the GPU run, benchmarks/gpu.py)."""
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    pipe = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_path)
    pipe.set_progress_bar_config(disable=True)
    eager = run(pipe, num_inference_steps=STEPS)
    torch._dynamo.reset()
    assert pipe.compile(vae=True, backend=counting_backend) is pipe
    compiled = run(pipe, num_inference_steps=STEPS)
    assert len(graphs) == 2  # the UNet for all three steps, the VAE decoder once
    np.testing.assert_allclose(compiled, eager, atol=1e-5)
    assert list(pipe.unet.state_dict()) == list(LatentDiffusionPipeline.from_pretrained(tiny_pipeline_path).unet.state_dict())


def test_compile_defaults_to_the_measured_fastest_setting(pipe, monkeypatch):
    """`pipe.compile()` without arguments is the setting docs/performance.md measured fastest: CUDA graphs
    ("reduce-overhead") for the UNet, and the VAE decoder compiled too. The decoder never gets CUDA graphs: VAE
    slicing and tiling keep each decoder output while the next call would overwrite it. A backend other than
    inductor takes no mode."""
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: calls.append((self, kwargs)))
    pipe.compile()
    assert [(module, kwargs.get("mode"), kwargs["backend"]) for module, kwargs in calls] == [
        (pipe.unet, "reduce-overhead", "inductor"), (pipe.vae.decoder, None, "inductor")]
    calls.clear()
    pipe.compile(backend="aot_eager")
    assert [(module, "mode" in kwargs) for module, kwargs in calls] == [(pipe.unet, False), (pipe.vae.decoder, False)]
    calls.clear()
    pipe.compile(mode="max-autotune")
    assert [(module, kwargs.get("mode")) for module, kwargs in calls] == [
        (pipe.unet, "max-autotune"), (pipe.vae.decoder, "max-autotune-no-cudagraphs")]
    calls.clear()
    pipe.compile(mode="default", vae=False)
    assert [(module, kwargs.get("mode")) for module, kwargs in calls] == [(pipe.unet, None)]


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_a_unet_that_reuses_its_output_buffer_gives_the_same_images(pipe, monkeypatch, name):
    """A UNet compiled with CUDA graphs (`pipe.compile("reduce-overhead")`) returns the same static buffer every
    step and rewrites it at the next call. Multistep samplers keep earlier predictions (PNDM keeps ε itself), so
    the loop must not hand them that buffer; without guidance nothing else copies it. Emulated here: the UNet's
    output is copied into one reused tensor."""
    cls, overrides = SCHEDULERS[name]
    sampler = with_scheduler(pipe, cls, **overrides)
    expected = run(sampler, num_inference_steps=4, guidance_scale=1.0)
    unet_forward, buffer = sampler.unet.forward, []

    def forward_into_one_buffer(*args, **kwargs):
        output = unet_forward(*args, **kwargs)[0]
        if not buffer or buffer[0].shape != output.shape:
            buffer[:] = [torch.empty_like(output)]
        return (buffer[0].copy_(output),)

    monkeypatch.setattr(sampler.unet, "forward", forward_into_one_buffer)
    np.testing.assert_array_equal(run(sampler, num_inference_steps=4, guidance_scale=1.0), expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(height=30), "divisible by the VAE factor 4, got 30x32"),
        (dict(height=0), "height must be a positive integer number of pixels, got 0"),
        (dict(width=-8), "width must be a positive integer number of pixels, got -8"),
        (dict(height=32.0), "height must be a positive integer number of pixels, got 32.0"),
        (dict(generator=42), "generator must be a torch.Generator"),
        (dict(prompt_embeds=torch.zeros(1, 77, 32)), "exactly one of prompt and prompt_embeds"),
        (dict(prompt=None), "exactly one of prompt and prompt_embeds"),
        (dict(prompt=3), "prompt must be a string"),
        (dict(prompt=[]), r"prompt must be a string or a non-empty list of strings, got \[\]"),
        (dict(prompt=PROMPTS, negative_prompt=["only one"]), "negative_prompt has 1 entries but there are 2 prompts"),
        (dict(negative_prompt="x", negative_prompt_embeds=torch.zeros(1, 77, 32)), "at most one of negative_prompt"),
        (dict(prompt=None, prompt_embeds=torch.zeros(2, 77, 32), negative_prompt_embeds=torch.zeros(1, 77, 32)),
         "must have the same shape"),
        (dict(prompt=PROMPTS, negative_prompt_embeds=torch.zeros(1, 77, 32)), "has 1 rows but there are 2 prompts"),
        (dict(negative_prompt_embeds=torch.zeros(1, 10, 32)), "negative_prompt_embeds have 10 tokens, the prompts 77"),
        (dict(num_inference_steps=0), "num_inference_steps must be a positive integer"),
        (dict(guidance_rescale=2.0), "guidance_rescale must be a number from 0 .* to 1"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt must be a positive integer"),
        (dict(num_images_per_prompt=True), "num_images_per_prompt must be a positive integer, got True"),
        (dict(num_inference_steps=True), "num_inference_steps must be a positive integer, got True"),
        (dict(output_type="jpeg"), "output_type must be one of"),
        (dict(callback_on_step_end_tensor_inputs=["noise_pred"]), r"\['noise_pred'\] are not available"),
        (dict(generator=[torch.Generator()] * 3), "Got 3 generators for 1 images"),
        (dict(latents=torch.zeros(1, 4, 16, 16)), r"latents have shape \(1, 4, 16, 16\), but this call needs"),
        (dict(latents=torch.full((1, 4, 8, 8), float("nan"))), "latents hold NaN or infinite values"),
    ],
)  # fmt: skip
def test_bad_arguments_raise_clear_errors(pipe, kwargs, match):
    kwargs = {"prompt": PROMPTS[0], "num_inference_steps": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_images_that_overflowed_are_named_in_a_warning(pipe, monkeypatch, caplog):
    """NaN images show as black in PIL: the call says so, and names the likely source (a float16 overflow, or in
    float32 the scheduler: UniPC's bh1 solver with a zero final sigma makes NaN in diffusers too)."""
    decode = pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode", lambda z, return_dict: (decode(z, return_dict=False)[0] * float("nan"),))
    with caplog.at_level(logging.WARNING, logger="latentdiff"):
        image = pipe(PROMPTS[0], num_inference_steps=1).images[0]
    assert "The images hold NaN or infinite values (they show as black)" in caplog.text
    assert "in torch.float32 / torch.float32 the likely source is the scheduler (DDIMScheduler)" in caplog.text
    assert "float16" not in caplog.text and not np.asarray(image).any()  # not blamed on an overflow it cannot have
    caplog.clear()
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="latentdiff"):
        pipe(PROMPTS[0], num_inference_steps=1)
    assert "NaN" not in caplog.text


def test_nan_images_in_np_are_named_and_a_float16_vae_alone_is_blamed(pipe, monkeypatch, caplog):
    """The warning covers "np" output too, and a float16 VAE under a float32 UNet is named as the overflow."""
    def nan_images(z, return_dict):
        return (torch.full((z.shape[0], 3, 64, 64), float("nan"), dtype=z.dtype),)

    monkeypatch.setattr(pipe.vae, "decode", nan_images)
    with caplog.at_level(logging.WARNING, logger="latentdiff"):
        pipe(PROMPTS[0], num_inference_steps=1, output_type="np")
    assert "NaN or infinite values" in caplog.text and "the likely source is the scheduler" in caplog.text
    caplog.clear()
    monkeypatch.setattr(type(pipe.vae), "dtype", property(lambda vae: torch.float16))  # the weights stay as they are
    assert pipe.vae.dtype == torch.float16 and pipe.unet.dtype == torch.float32
    with caplog.at_level(logging.WARNING, logger="latentdiff"):
        pipe(PROMPTS[0], num_inference_steps=1, output_type="np")
    assert "the float16 UNet or VAE overflowed" in caplog.text


def test_prompt_embeds_of_another_length_get_negatives_of_that_length_as_in_diffusers(pipe, tiny_pipeline_path):
    """Embeddings of fewer than 77 tokens (e.g. from a prompt-weighting tool): the negative prompt is embedded at
    their length, as diffusers does, instead of failing to concatenate; more than 77 need negative embeddings."""
    from latentdiff.text import embed_prompts

    reference = StableDiffusionPipeline.from_pretrained(tiny_pipeline_path, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    embeds = embed_prompts(pipe.tokenizer, pipe.text_encoder, [PROMPTS[0]])[:, :16]
    for negative_prompt in (None, "blurry"):
        images = [run(p, prompt=None, prompt_embeds=embeds, negative_prompt=negative_prompt) for p in (pipe, reference)]
        np.testing.assert_allclose(images[0], images[1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="prompt_embeds have 80 tokens, more than the text encoder's 77: pass "):
        run(pipe, prompt=None, prompt_embeds=torch.cat([embeds] * 5, dim=1))


def test_from_pipe_takes_a_diffusers_pipelines_unet_over_as_ours_on_the_same_weights(pipe, tiny_pipeline_path):
    """diffusers' `from_pipe` keeps only components of the declared class: ours converts the UNet, sharing its
    tensors (no new memory), and gives the diffusers pipeline's images."""
    reference = StableDiffusionPipeline.from_pretrained(tiny_pipeline_path, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    ours = LatentDiffusionPipeline.from_pipe(reference)
    assert isinstance(ours.unet, UNet2DConditionModel) and ours.vae is reference.vae
    shared = dict(reference.unet.named_parameters())
    assert all(p.data_ptr() == shared[name].data_ptr() for name, p in ours.unet.named_parameters())
    np.testing.assert_allclose(run(ours), run(reference), atol=1e-5, rtol=0)


def test_custom_timesteps_need_a_scheduler_that_takes_them(pipe):
    assert run(with_scheduler(pipe, DDPMScheduler), timesteps=[999, 500, 0]).shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="does not take custom timesteps"):
        run(pipe, timesteps=[999, 500, 0])


# ---- interop with diffusers --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    """A tiny pipeline saved by diffusers' own StableDiffusionPipeline with diffusers' own UNet."""
    components = tiny_components(seed=1)
    ours = components.pop("unet")
    unet = DiffusersUNet(**{k: v for k, v in ours.config.items() if not k.startswith("_")})
    unet.load_state_dict(ours.state_dict())
    folder = tmp_path_factory.mktemp("from_diffusers") / "sd"
    StableDiffusionPipeline(
        **components, unet=unet, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    ).save_pretrained(folder)
    return folder


INTEROP_CALL = dict(prompt=PROMPTS, negative_prompt=["blurry", "ugly"], num_inference_steps=STEPS,
                    guidance_scale=5.0, guidance_rescale=0.5, num_images_per_prompt=2, eta=1.0)  # fmt: skip


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DDPMScheduler])
def test_diffusers_folder_loads_into_ours_with_the_same_images(diffusers_folder, scheduler_cls):
    reference = StableDiffusionPipeline.from_pretrained(diffusers_folder, safety_checker=None)
    ours = LatentDiffusionPipeline.from_pretrained(diffusers_folder)
    assert type(ours.unet) is UNet2DConditionModel
    for output_type in ("latent", "np"):
        images = [
            run(with_scheduler(p, scheduler_cls), seed=4, output_type=output_type, **INTEROP_CALL)
            for p in (reference, ours)
        ]
        torch.testing.assert_close(torch.as_tensor(images[1]), torch.as_tensor(images[0]), atol=1e-4, rtol=0)


def test_cfg_cutoff_callback_gives_diffusers_images(diffusers_folder):
    """diffusers' `SDCFGCutoffCallback` replaces `prompt_embeds` with the conditional half mid-way: the loop must
    take the returned embeddings (the real UNet's batch then fits them)."""
    reference = StableDiffusionPipeline.from_pretrained(diffusers_folder, safety_checker=None)
    ours = LatentDiffusionPipeline.from_pretrained(diffusers_folder)
    images = [
        run(p, seed=2, num_inference_steps=4, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))
        for p in (reference, ours)
    ]
    torch.testing.assert_close(torch.as_tensor(images[1]), torch.as_tensor(images[0]), atol=1e-4, rtol=0)


CHILD = """
import json, sys
sys.meta_path.insert(0, Blocker())  # belt and braces: even a regular (non-editable) install stays invisible
try:
    import latentdiff
    raise SystemExit("latentdiff is importable in the child")
except ModuleNotFoundError:
    pass
import numpy as np, torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline
folder, out = sys.argv[1], sys.argv[2]
auto = DiffusionPipeline.from_pretrained(folder)
assert type(auto) is StableDiffusionPipeline, type(auto)
pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
pipe.set_progress_bar_config(disable=True)
call = json.loads(sys.argv[3])
images = {}
for cls in (DDIMScheduler, DDPMScheduler):
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    images[cls.__name__] = pipe(generator=torch.Generator().manual_seed(4), output_type="np", **call).images
np.savez(out, **images)
"""
BLOCKER = """
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "latentdiff":
            raise ModuleNotFoundError(name)
"""


def test_our_folder_opens_in_plain_diffusers_with_the_same_images(pipe, tiny_pipeline_path, tmp_path):
    index = json.loads((tiny_pipeline_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    # Stable Diffusion's whole form, without a safety checker and without requiring one (diffusers warns otherwise)
    assert index["safety_checker"] == index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    call = dict(INTEROP_CALL, num_inference_steps=STEPS)
    # -I -S: no cwd, no PYTHONPATH, no .pth files (so no editable-install hook); then only plain site-packages
    site_dirs = [p for p in sys.path if p.endswith("site-packages")]
    script = f"import sys; sys.path += {site_dirs!r}\n" + textwrap.dedent(BLOCKER) + textwrap.dedent(CHILD)
    out = tmp_path / "images.npz"
    subprocess.run(
        [sys.executable, "-I", "-S", "-c", script, str(tiny_pipeline_path), str(out), json.dumps(call)],
        cwd=tmp_path, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    expected = np.load(out)
    for scheduler_cls in (DDIMScheduler, DDPMScheduler):
        ours = run(with_scheduler(pipe, scheduler_cls), seed=4, **call)
        np.testing.assert_allclose(ours, expected[scheduler_cls.__name__], atol=1e-4, rtol=0)


def test_from_pipe_drives_our_unet_in_diffusers_img2img(pipe, tiny_pipeline_path):
    """A diffusers pipeline class built from ours with `from_pipe` (handed our UNet and the parts we leave out, as
    docs/architecture.md shows) samples with our UNet and gives the images of that class with diffusers' UNet."""
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline.from_pipe(
        pipe, unet=pipe.unet, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    assert img2img.unet is pipe.unet and img2img.safety_checker is None
    reference = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_pipeline_path, requires_safety_checker=False)
    assert isinstance(reference.unet, DiffusersUNet)
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    images = [
        p("a red square", image=init, strength=0.6, num_inference_steps=5, output_type="np",
          generator=torch.Generator().manual_seed(0)).images  # fmt: skip
        for p in (img2img, reference)
    ]
    np.testing.assert_allclose(images[0], images[1], atol=1e-4, rtol=0)


def test_textual_inversion_loads_and_expands_as_in_diffusers(tiny_pipeline_path):
    """A two-vector embedding: "<toy>" in a prompt (and a negative prompt) must become "<toy> <toy>_1", as
    StableDiffusionPipeline does, or only the first vector would condition the image."""
    ours = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_path)
    reference = StableDiffusionPipeline.from_pretrained(tiny_pipeline_path, requires_safety_checker=False)
    width = ours.text_encoder.config.hidden_size
    embedding = torch.randn(2, width, generator=torch.Generator().manual_seed(0)) * 3
    images = []
    for p in (ours, reference):
        p.load_textual_inversion({"<toy>": embedding.clone()})
        p.set_progress_bar_config(disable=True)
        assert p.maybe_convert_prompt("a <toy>", p.tokenizer) == "a <toy> <toy>_1"
        images.append(p("a <toy> photo", negative_prompt="<toy>", num_inference_steps=3, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images)  # fmt: skip
    np.testing.assert_allclose(images[0], images[1], atol=1e-4, rtol=0)
    plain = ours("a photo", num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert np.abs(images[0] - plain).max() > 1e-2  # the embedding conditions the image


def test_pickle_weights_need_allow_pickle(tiny_pipeline_path, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_pipeline_path, folder)
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    (folder / "text_encoder" / "model.safetensors").unlink()
    torch.save(
        text_encoder.state_dict(), folder / "text_encoder" / "pytorch_model.bin"
    )  # transformers 5 writes no .bin
    with pytest.raises(ValueError, match=r"text_encoder holds only pickle weights.*allow_pickle=True"):
        LatentDiffusionPipeline.from_pretrained(folder)
    loaded = LatentDiffusionPipeline.from_pretrained(folder, allow_pickle=True)
    torch.testing.assert_close(loaded.text_encoder.state_dict(), text_encoder.state_dict())


def test_save_reload_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "again")
    reloaded = LatentDiffusionPipeline.from_pretrained(tmp_path / "again")
    reloaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(reloaded, prompt=PROMPTS), run(pipe, prompt=PROMPTS))


# ---- generate_images ---------------------------------------------------------------------------------------------


def test_generate_images_writes_pngs_and_a_grid(tiny_pipeline_path, tmp_path):
    result = generate_images(str(tiny_pipeline_path), PROMPTS, output_dir=tmp_path / "out", scheduler="euler_a",
                             num_inference_steps=2, num_images_per_prompt=2, seed=10, device="cpu")  # fmt: skip
    assert [p.name for p in result.image_paths] == [
        "000-a-photo-of-a-cat-seed10.png", "001-a-photo-of-a-cat-seed11.png",
        "002-red-apple-fruit-emoji-seed12.png", "003-red-apple-fruit-emoji-seed13.png",
    ]  # fmt: skip
    assert result.seeds == [10, 11, 12, 13]
    assert Image.open(result.grid_path).size == (64, 64) and all(
        Image.open(p).size == (32, 32) for p in result.image_paths
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [p.name for p in result.image_paths] + ["grid.png"]
    )
    # each image depends on its own seed only: the third image again, alone
    again = generate_images(str(tiny_pipeline_path), [PROMPTS[1]], output_dir=tmp_path / "again", scheduler="euler_a",
                            num_inference_steps=2, seed=12, device="cpu")  # fmt: skip
    alone, in_batch = (np.asarray(Image.open(p), dtype=int) for p in (again.image_paths[0], result.image_paths[2]))
    np.testing.assert_allclose(alone, in_batch, atol=1)  # batched float sums may round one step apart


def test_generate_cli_clip_skip(tiny_pipeline_path, tmp_path, capsys):
    from latentdiff.cli import main

    def generate(name: str, *extra: str) -> np.ndarray:
        argv = ["generate", "--model", str(tiny_pipeline_path), "--prompt", PROMPTS[0], "--steps", "2",
                "--device", "cpu", "--output-dir", str(tmp_path / name), *extra]  # fmt: skip
        assert main(argv) == 0
        return np.asarray(Image.open(tmp_path / name / "000-a-photo-of-a-cat-seed0.png"), dtype=int)

    assert np.abs(generate("skip1", "--clip-skip", "1") - generate("last")).max() > 0
    np.testing.assert_array_equal(generate("skip0", "--clip-skip", "0"), generate("last"))
    capsys.readouterr()
    assert main(["generate", "--model", str(tiny_pipeline_path), "--prompt", "x", "--clip-skip", "5",
                 "--output-dir", str(tmp_path / "bad")]) == 2  # fmt: skip
    assert "error: clip_skip must be an integer from 0 to 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_generate_cli_passes_its_sampling_options_to_the_pipeline(pipe, tiny_pipeline_path, tmp_path):
    from latentdiff.cli import main

    argv = ["generate", "--model", str(tiny_pipeline_path), "--prompt", "a cat", "--steps", "2", "--device", "cpu",
            "--negative-prompt", "blurry", "--guidance-scale", "3", "--height", "32", "--width", "48",
            "--num-images", "2", "--seed", "5", "--output-dir", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    saved = np.asarray(Image.open(tmp_path / "out" / "001-a-cat-seed6.png"), dtype=int)
    expected = pipe("a cat", negative_prompt="blurry", guidance_scale=3.0, height=32, width=48, num_inference_steps=2,
                    generator=[torch.Generator().manual_seed(6)]).images[0]  # fmt: skip
    assert saved.shape == (32, 48, 3)
    np.testing.assert_allclose(saved, np.asarray(expected, dtype=int), atol=1)
    assert Image.open(tmp_path / "out" / "grid.png").size == (96, 32)  # a row per prompt, a column per image


def test_a_long_prompt_gives_a_short_file_name(tiny_pipeline_path, tmp_path):
    """File names keep 40 characters of the prompt: a whole 370-character one exceeds the 255-byte name limit."""
    prompt = "a very long prompt about " + "a red apple and a green pear, " * 12
    result = generate_images(str(tiny_pipeline_path), [prompt], output_dir=tmp_path, num_inference_steps=1, device="cpu")
    assert [p.name for p in result.image_paths] == ["000-a-very-long-prompt-about-a-red-apple-and-seed0.png"]
    assert result.image_paths[0].is_file()


def test_dtype_names_load_that_dtype(tiny_pipeline_path, tmp_path):
    def image(name: str, dtype) -> np.ndarray:
        result = generate_images(str(tiny_pipeline_path), ["a cat"], output_dir=tmp_path / name, num_inference_steps=2,
                                 device="cpu", torch_dtype=dtype)  # fmt: skip
        return np.asarray(Image.open(result.image_paths[0]), dtype=int)

    bf16 = image("bf16", "bf16")
    np.testing.assert_array_equal(bf16, image("bfloat16", torch.bfloat16))
    assert np.abs(bf16 - image("fp16", "fp16")).max() > 0  # a name for one half precision is not the other


def test_a_per_component_dtype_dict_gives_each_part_its_dtype(tiny_pipeline_path):
    """diffusers' `dtype={component: dtype, "default": ...}` form."""
    pipeline = LatentDiffusionPipeline.from_pretrained(
        tiny_pipeline_path, dtype={"unet": torch.bfloat16, "default": torch.float32}
    )
    assert pipeline.unet.dtype == torch.bfloat16 and pipeline.vae.dtype == pipeline.text_encoder.dtype == torch.float32


def test_generate_images_default_is_float32_for_a_folder_stored_in_fp16(tiny_pipeline_path, tmp_path):
    """Left to the libraries, an fp16 folder loads as a mix (fp16 text encoder, fp32 UNet): other images than fp32."""
    half = tmp_path / "half"
    StableDiffusionPipeline.from_pretrained(tiny_pipeline_path, dtype=torch.float16).save_pretrained(half)
    runs = [generate_images(str(half), PROMPTS[:1], output_dir=tmp_path / str(dtype), num_inference_steps=2,
                            device="cpu", torch_dtype=dtype).image_paths[0] for dtype in (None, "fp32")]  # fmt: skip
    assert np.array_equal(*(np.asarray(Image.open(path)) for path in runs))
    pipe = LatentDiffusionPipeline.from_pretrained(half)  # the Python API too
    assert pipe.text_encoder.dtype == pipe.unet.dtype == pipe.vae.dtype == torch.float32
    assert LatentDiffusionPipeline.from_pretrained(half, dtype=torch.float16).text_encoder.dtype == torch.float16


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(scheduler="plms"), "Unknown scheduler 'plms'"), (dict(torch_dtype="fp8"), "Unknown torch_dtype 'fp8'"),
     (dict(prompts="a cat"), "non-empty list of strings"), (dict(device="gpu"), "Unknown device 'gpu': use cpu"),
     (dict(seed=1.5), r"seed must be an integer from 0 to \d+, got 1.5"), (dict(lora_scale="1"), "lora_scale must be"),
     pytest.param(dict(device="cuda"), "Device 'cuda': no CUDA GPU is available",
                  marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here"))],
)  # fmt: skip
def test_generate_images_rejects_bad_arguments(tiny_pipeline_path, tmp_path, kwargs, match):
    kwargs = {"prompts": PROMPTS, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate_images(str(tiny_pipeline_path), output_dir=tmp_path, **kwargs)


def test_generate_images_names_a_cuda_index_past_the_last_gpu(tiny_pipeline_path, tmp_path, monkeypatch):
    """With one GPU, cuda:0 is the only one: cuda:1 is refused before the model loads, naming how many there are."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"Device 'cuda:1': there are 1 CUDA devices \(cuda:0 \.\.\.\)"):
        generate_images(str(tiny_pipeline_path), PROMPTS, output_dir=tmp_path, device="cuda:1")
    assert not any(tmp_path.iterdir())


def test_a_model_with_only_fp16_weights_names_the_variant_and_generate_loads_it(tiny_pipeline_path, tmp_path):
    """diffusers said only "no file named diffusion_pytorch_model.safetensors found in directory <model>", and
    `latentdiff generate` had no --variant."""
    from latentdiff.cli import main

    model = tmp_path / "fp16-only"
    shutil.copytree(tiny_pipeline_path, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model.fp16.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"fp16-only/unet holds only fp16 weights .* --variant fp16"):
        LatentDiffusionPipeline.from_pretrained(model)
    argv = ["generate", "--model", str(model), "--prompt", "a cat", "--steps", "2", "--device", "cpu",
            "--output-dir", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    assert main(argv + ["--variant", "fp16"]) == 0 and (tmp_path / "out" / "grid.png").is_file()


def test_generate_images_checks_its_output_folder_before_sampling(tiny_pipeline_path, tmp_path, monkeypatch):
    """A file, or a folder that takes no files, is named before the model loads, not at the first PNG."""
    import latentdiff.atomic

    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match=r"output_dir .*a-file is a file: give a folder"):
        generate_images(str(tiny_pipeline_path), PROMPTS, output_dir=tmp_path / "a-file")
    with pytest.raises(ValueError, match=r"output_dir .*a-file/out cannot be created: .*a-file is a file"):
        generate_images("no/such/model", PROMPTS, output_dir=tmp_path / "a-file" / "out")  # before the model load

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(latentdiff.atomic.tempfile, "mkstemp", refused)  # as a read-only folder (root ignores chmod)
    monkeypatch.setattr(LatentDiffusionPipeline, "from_pretrained", None)  # never reached
    with pytest.raises(PermissionError, match=r"output_dir .*new/out is not writable \(.* refuses new files: Perm"):
        generate_images(str(tiny_pipeline_path), PROMPTS, output_dir=tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()


def test_generate_cli_help_names_every_scheduler_and_lora_scale_needs_lora(capsys):
    from latentdiff.cli import build_parser, main

    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    scheduler_help = next(action.help for action in generate._actions if action.dest == "scheduler")
    assert scheduler_help.split(" (default")[0].replace(" or ", ", ").split(", ") == list(SCHEDULERS)
    assert main(["generate", "--model", "m", "--prompt", "x", "--lora-scale", "0.5"]) == 2
    assert "error: --lora-scale sets the strength of --lora" in capsys.readouterr().err


@pytest.mark.parametrize("rescale", [0.0, 0.3, 0.7, 1.0])
def test_guidance_rescale_is_diffusers_rescale_noise_cfg(rescale):
    """Pure tensors against diffusers' function over the range (at 0.5 a swapped mix would give the same result)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    from latentdiff.guidance import classifier_free_guidance, rescale_guidance

    generator = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 2, 4, 8, 8, generator=generator)
    guided = classifier_free_guidance(uncond, cond, 7.0)
    ours = rescale_guidance(guided, cond, rescale)
    torch.testing.assert_close(ours, rescale_noise_cfg(guided, cond, rescale))
    if rescale == 1.0:  # the guided prediction's per-sample std pulled back to the conditional one's
        torch.testing.assert_close(ours.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))


def test_decoding_undoes_the_shift_and_scale_that_training_applies(tiny_pipeline_path):
    """A VAE whose config has a shift_factor: the pipeline decodes (x / scale + shift), the inverse of what training
    feeds the UNet ((z − shift) × scale); it used to divide by the scale only."""
    from latentdiff.components import from_unet_latents, to_unet_latents

    pipe = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_path)
    pipe.vae.register_to_config(shift_factor=0.3)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    latents = to_unet_latents(pipe.vae, z)
    torch.testing.assert_close(latents, (z - 0.3) * pipe.vae.config.scaling_factor)
    torch.testing.assert_close(from_unet_latents(pipe.vae, latents), z)
    with torch.no_grad():
        expected = pipe.image_processor.postprocess(pipe.vae.decode(z).sample, output_type="pt")
        torch.testing.assert_close(pipe.decode_latents(latents, "pt"), expected)


def test_a_long_prompt_gives_our_one_warning_and_not_transformers_misleading_one(tiny_pipeline_path, caplog):
    """diffusers' textual-inversion check tokenizes the whole prompt first, and transformers then warns that running
    it "will result in indexing errors": not so here, where `tokenize_prompts` cuts it and says what was lost."""
    import transformers

    fresh = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_path)  # a tokenizer that has not warned yet
    transformers.utils.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            fresh(" ".join(["cat"] * 100), num_inference_steps=1, output_type="latent")
    finally:
        transformers.utils.logging.disable_propagation()
    messages = [record.getMessage() for record in caplog.records]
    assert len([m for m in messages if "longer than 77 tokens" in m]) == 1, messages
    assert not [m for m in messages if "longer than the specified maximum sequence length" in m], messages


def test_tiny_components_refuse_an_image_size_the_unet_cannot_halve():
    from latentdiff.tiny import tiny_components

    with pytest.raises(ValueError, match=r"image_size=36 must be a multiple of 8 \(VAE factor × UNet factor\)"):
        tiny_components(image_size=36)  # 36 / 4 = 9 latent pixels: the UNet's one downsampling cannot halve them
