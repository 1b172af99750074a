"""LatentDiffusionPipeline: text → image with our UNet, any diffusers scheduler and classifier-free guidance.

It takes `StableDiffusionPipeline`'s arguments (but IP-Adapter images) and reads and writes its folder format
both ways (`folder_format.py`: plain diffusers opens what it saves).
"""

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import scale_lora_layers
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from latentdiff.acceleration import compile_pipeline
from latentdiff.components import from_unet_latents, vae_scale_factor
from latentdiff.guidance import classifier_free_guidance, rescale_guidance
from latentdiff.models import UNet2DConditionModel
from latentdiff.text import embed_prompts

from .folder_format import StableDiffusionFolderMixin
from .inputs import check_prompt_arguments, check_sampling_arguments, prompt_batch_size

logger = logging.getLogger(__name__)


class LatentDiffusionPipeline(
    StableDiffusionFolderMixin,
    DiffusionPipeline,
    StableDiffusionMixin,
    StableDiffusionLoraLoaderMixin,
    TextualInversionLoaderMixin,
):
    r"""Text-to-image generation with a latent diffusion model (Stable Diffusion 1.x/2.x layout).

    LoRA adapters in diffusers' format (ours from `latentdiff train --lora_rank`, or any SD-1.x/2.x LoRA) load with
    diffusers' own API: `load_lora_weights`, `set_adapters`, `fuse_lora`, `unfuse_lora`, `unload_lora_weights`;
    `cross_attention_kwargs={"scale": s}` scales them for one call (docs/lora.md). Textual-inversion embeddings
    load with `load_textual_inversion` (a token of several vectors is expanded in prompts). diffusers' Stable
    Diffusion helpers work as there: `enable_freeu`, `fuse_qkv_projections`, `enable_attention_slicing`,
    `enable_vae_slicing`, ...

    Args:
        vae (`AutoencoderKL`): Encodes images to latents and decodes latents to images.
        text_encoder (`CLIPTextModel`): Turns token ids into the UNet's conditioning `(B, 77, D)`.
        tokenizer (`CLIPTokenizer`): Turns prompts into token ids.
        unet (`latentdiff.UNet2DConditionModel`): Predicts the noise (or v) in the latents.
        scheduler (`SchedulerMixin`): Any diffusers scheduler (DDIM, DDPM, Euler, DPM-Solver++, ...); swap it with
            `pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)`.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = []
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
    ):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.vae_scale_factor = vae_scale_factor(vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ---- diffusers' memory helpers -----------------------------------------------------------------------------

    def enable_vae_slicing(self) -> None:
        """Decode one image at a time: less memory for large batches."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def enable_vae_tiling(self) -> None:
        """Decode in overlapping tiles: less memory for large images."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    def compile(
        self, mode: str | None = None, vae: bool = True, backend: str | Callable = "inductor"
    ) -> "LatentDiffusionPipeline":
        r"""`torch.compile` the UNet and the VAE decoder in place, as one graph each; returns `self`.

        The defaults are the fastest setting measured at SD-1.5 size (docs/performance.md: 0.40 s for 50 DDIM steps
        with guidance at 512×512 on an H200, 2.3× diffusers' compiled pipeline; the decoder had CUDA graphs then).
        The first call compiles (a minute or more on a GPU); later calls of the same shape reuse the graph, and new
        timesteps do not recompile (the sampling loop passes them as tensors, without host syncs). The models keep
        their classes and state-dict keys, so the pipeline still saves and loads as usual.

        Args:
            mode (`str`, *optional*): `"reduce-overhead"` (CUDA graphs: one launch per UNet call; a new batch size
                or resolution records one more graph), `"default"`, `"max-autotune"` or
                `"max-autotune-no-cudagraphs"`. By default `"reduce-overhead"` with inductor (which leaves the CUDA
                graphs out on a CPU) and `"default"` with another backend, where modes do not apply.
            vae (`bool`, *optional*, defaults to `True`): Also compile the VAE decoder (one call per image, as many
                FLOPs as one and a half guided UNet steps at 512×512), in `mode` without CUDA graphs, which VAE
                slicing and tiling could not use.
            backend (`str` or `Callable`, *optional*, defaults to `"inductor"`): A `torch.compile` backend.
        """
        if mode is None:
            mode = "reduce-overhead" if backend == "inductor" else "default"
        return compile_pipeline(self, mode, vae, backend)

    # ---- the state callbacks may read (as in diffusers) --------------------------------------------------------

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """CFG costs a second UNet half-batch; at scale ≤ 1 it is the conditional model anyway, so skip it."""
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` (e.g. in `callback_on_step_end`) to skip the remaining steps, as in diffusers."""
        return self._interrupt

    @property
    def text_width(self) -> int:
        """Width `D` of the text embeddings the UNet attends to (the text encoder's, or the UNet's without one)."""
        if self.text_encoder is not None:
            return self.text_encoder.config.hidden_size
        width = self.unet.config.cross_attention_dim
        return width if isinstance(width, int) else width[0]

    # ---- the steps of __call__ ---------------------------------------------------------------------------------

    def check_inputs(
        self,
        prompt: str | list[str] | None,
        height: int,
        width: int,
        num_inference_steps: int,
        timesteps: list[int] | None,
        num_images_per_prompt: int,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str],
        guidance_scale: float,
        guidance_rescale: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        sigmas: list[float] | None = None,
    ) -> None:
        """Every argument problem as one clear `ValueError`, before any model runs."""
        check_sampling_arguments(
            guidance_scale, guidance_rescale, height, width, self.vae_scale_factor, num_inference_steps, timesteps,
            self.scheduler, num_images_per_prompt, output_type, generator, sigmas,
        )  # fmt: skip
        if self.text_encoder is None or self.tokenizer is None:  # loaded with text_encoder=None to save memory
            given = (("prompt", prompt), ("negative_prompt", negative_prompt))
            text = [name for name, value in given if value is not None]
            if guidance_scale > 1 and negative_prompt is None and negative_prompt_embeds is None:
                text.append('guidance\'s negative prompt ""')
            if text:
                raise ValueError(
                    f"This pipeline has no text encoder or tokenizer (loaded with None), so it cannot encode "
                    f"{', '.join(text)}: pass prompt_embeds (and negative_prompt_embeds when guidance_scale > 1)."
                )
        check_prompt_arguments(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, self.text_width)
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not available; choose from "
                f"{self._callback_tensor_inputs}."
            )

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        r"""Text embeddings `(B·n, L, D)` for the prompts and, with guidance, for the negative (default `""`) ones.

        Args:
            lora_scale (`float`, *optional*): Scale of the text encoder's LoRA adapters for this call.
            clip_skip (`int`, *optional*): Embed the prompts from the hidden state this many layers before the last
                (`latentdiff.text.encode_prompts`); as in diffusers, the negative prompts keep the last layer.

        Returns:
            `(prompt_embeds, negative_prompt_embeds)`; the second is `None` without classifier-free guidance.
        """
        dtype = self.unet.dtype
        with self._text_encoder_lora_scale(lora_scale):
            if prompt_embeds is None:
                prompts = self._convert_prompts([prompt] if isinstance(prompt, str) else prompt)
                prompt_embeds = embed_prompts(self.tokenizer, self.text_encoder, prompts, clip_skip)
            batch = prompt_embeds.shape[0]
            given_tokens = None if negative_prompt_embeds is None else negative_prompt_embeds.shape[1]
            if do_classifier_free_guidance and given_tokens not in (None, prompt_embeds.shape[1]):  # the cat would fail
                raise ValueError(
                    f"negative_prompt_embeds have {given_tokens} tokens, the prompts {prompt_embeds.shape[1]}: give "
                    "negative_prompt_embeds of the prompts' length."
                )
            if do_classifier_free_guidance and negative_prompt_embeds is None:
                negatives = [negative_prompt or ""] * batch if not isinstance(negative_prompt, list) else negative_prompt
                negatives = self._convert_prompts(negatives)
                tokens = prompt_embeds.shape[1]  # as diffusers: the negatives' length is that of the prompt's
                if tokens > self.tokenizer.model_max_length:
                    raise ValueError(
                        f"prompt_embeds have {tokens} tokens, more than the text encoder's "
                        f"{self.tokenizer.model_max_length}: pass negative_prompt_embeds of the same length as well."
                    )
                negative_prompt_embeds = embed_prompts(self.tokenizer, self.text_encoder, negatives, max_length=tokens)
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, dim=0)
        if not do_classifier_free_guidance:
            return prompt_embeds, None
        negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
        return prompt_embeds, negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)

    def _convert_prompts(self, prompts: list[str]) -> list[str]:
        """`maybe_convert_prompt` (multi-vector textual-inversion tokens) without transformers' "sequence length is
        longer than the specified maximum" warning, which its untruncated `tokenize` raises: `tokenize_prompts`
        says what was cut, in one warning."""
        if self.tokenizer is not None:  # the tokenizer's own warn-once flag, as if it had warned already
            self.tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
        return self.maybe_convert_prompt(prompts, self.tokenizer)

    @contextlib.contextmanager
    def _text_encoder_lora_scale(self, lora_scale: float | None) -> Iterator[None]:
        """Scale the text encoder's LoRA layers inside the block, as diffusers' pipelines do for `{"scale": s}`."""
        if lora_scale is None or self.text_encoder is None:
            yield
            return
        self._lora_scale = lora_scale  # diffusers' `lora_scale` property, read when loading more adapters
        with _lora_scalings_kept(self.text_encoder):
            scale_lora_layers(self.text_encoder, lora_scale)
            yield

    def prepare_latents(
        self,
        batch_size: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Initial noise x_T `(B, C, H/f, W/f)` (or the given latents), scaled by the scheduler's initial sigma."""
        shape = (
            batch_size,
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"Got {len(generator)} generators for {batch_size} images (prompts × num_images_per_prompt): "
                "pass one generator, or one per image."
            )
        if latents is None:
            # Drawn in float32, then cast: one seed gives the same noise in every dtype. (torch's CPU kernel draws
            # bf16/fp16 noise from another stream than float32 in torch 2.6-2.11.)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, but this call needs {shape}.")
        elif not torch.isfinite(latents).all():  # one host read, of the caller's tensor: they would sample black images
            raise ValueError("latents hold NaN or infinite values: pass finite noise (e.g. from torch.randn).")
        return latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

    def _step_kwargs(self, generator: torch.Generator | list[torch.Generator] | None, eta: float) -> dict:
        """`eta` (DDIM's η) and `generator` (stochastic samplers) for the schedulers whose `step` takes them."""
        accepted = inspect.signature(self.scheduler.step).parameters
        return {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}

    def decode_latents(self, latents: torch.Tensor, output_type: str) -> Any:
        """x_0 latents → images in `output_type` (`"latent"` returns them as they are)."""
        if output_type == "latent":
            return latents
        latents = from_unet_latents(self.vae, latents.to(self.vae.dtype))  # undo the training-time shift and scale
        images = self.vae.decode(latents, return_dict=False)[0]  # (B, 3, H, W) in [-1, 1]
        if output_type in ("pil", "np") and not torch.isfinite(images).all():  # they go to the host next anyway
            if torch.float16 in (self.unet.dtype, self.vae.dtype):
                cause = "the float16 UNet or VAE overflowed, most likely: sample in bfloat16 or float32"
            else:
                cause = (f"in {self.unet.dtype} / {self.vae.dtype} the likely source is the scheduler "
                         f"({type(self.scheduler).__name__}) or its settings, or the weights")  # fmt: skip
            logger.warning(f"The images hold NaN or infinite values (they show as black): {cause}.")
        return self.image_processor.postprocess(images, output_type=output_type)

    # ---- generation --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_rescale: float = 0.0,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[["LatentDiffusionPipeline", int, Any, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> StableDiffusionPipelineOutput | tuple:
        r"""Generate images from text.

        Args:
            prompt (`str` or `list[str]`, *optional*): What to draw; or pass `prompt_embeds`.
            height / width (`int`, *optional*, defaults to the UNet's `sample_size` × the VAE factor): Image size,
                a multiple of the VAE factor.
            num_inference_steps (`int`, *optional*, defaults to 50): Denoising steps; more is slower and finer.
            timesteps (`list[int]`, *optional*): Custom descending timesteps, for schedulers that accept them.
            sigmas (`list[float]`, *optional*): Custom descending noise levels, for schedulers that accept them.
            guidance_scale (`float`, *optional*, defaults to 7.5): Classifier-free guidance `s` in
                `ε = ε_u + s (ε_c − ε_u)`; `≤ 1` disables guidance (and the unconditional half-batch).
            negative_prompt (`str` or `list[str]`, *optional*): What to steer away from (replaces `""` as ε_u's prompt).
            num_images_per_prompt (`int`, *optional*, defaults to 1): Images per prompt.
            eta (`float`, *optional*, defaults to 0.0): DDIM's η: 0 is deterministic DDIM, 1 matches DDPM's noise.
            generator (`torch.Generator` or a list, one per image, *optional*): For reproducible noise.
            latents (`torch.Tensor`, *optional*): Initial noise `(B·n, C, H/f, W/f)` instead of a fresh draw.
            prompt_embeds / negative_prompt_embeds (`torch.Tensor`, *optional*): Precomputed text embeddings.
            output_type (`str`, *optional*, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, *optional*, defaults to `True`): Output dataclass, or a tuple `(images, None)`.
            guidance_rescale (`float`, *optional*, defaults to 0.0): Rescale of guided ε towards ε_c's std (Lin et
                al. 2024, sec. 3.4); helps with zero-terminal-SNR models at high guidance.
            cross_attention_kwargs (`dict`, *optional*): Passed to the UNet; `{"scale": s}` scales the LoRA adapters
                of the UNet and the text encoder for this call (0 gives the base model).
            clip_skip (`int`, *optional*): Condition on the text encoder's hidden state this many layers before the
                last (through its final layer norm), as diffusers does: 1 or 2 for models tuned that way.
            callback_on_step_end (`Callable` or diffusers' `PipelineCallback`, *optional*): Called as
                `callback(pipe, i, t, tensors)` after each step; it may return a dict replacing any of those tensors.
                As in diffusers, with guidance `prompt_embeds` is the batch `[negative; positive]` the UNet sees, so
                `diffusers.callbacks.SDCFGCutoffCallback` works.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to `["latents"]`): Which of
                `latents`, `prompt_embeds`, `negative_prompt_embeds` the callback receives.

        Returns:
            `StableDiffusionPipelineOutput` with `images` (list of PIL images, an array `(B, H, W, 3)` in [0, 1], a
            tensor `(B, 3, H, W)`, or latents), and `nsfw_content_detected=None` (no safety checker).
        """
        # 0. defaults and checks
        sample_size = self.unet.config.sample_size
        if sample_size is None and (height is None or width is None):
            raise ValueError("Pass height and width: this UNet's config has no sample_size to take them from.")
        sample_size = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        height = sample_size[0] * self.vae_scale_factor if height is None else height  # 0 is an error, not "default"
        width = sample_size[1] * self.vae_scale_factor if width is None else width
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):  # diffusers' callback objects
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = list(callback_on_step_end_tensor_inputs)
        self.check_inputs(
            prompt, height, width, num_inference_steps, timesteps, num_images_per_prompt, negative_prompt,
            prompt_embeds, negative_prompt_embeds, output_type, callback_on_step_end_tensor_inputs, guidance_scale,
            guidance_rescale, generator, sigmas,
        )  # fmt: skip
        self._guidance_scale = guidance_scale
        self._interrupt = False
        device = self._execution_device
        batch_size = prompt_batch_size(prompt, prompt_embeds) * num_images_per_prompt

        # 1. text: (B·n, L, D); with guidance [uncond; cond] (2·B·n, L, D), as diffusers' callbacks expect
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, self.do_classifier_free_guidance, negative_prompt,
            prompt_embeds, negative_prompt_embeds, lora_scale, clip_skip,
        )  # fmt: skip
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        # 2. timesteps and initial noise x_T. The scheduler keeps its timesteps (and tables) on the CPU, so its
        # per-step bookkeeping (`alphas_cumprod[t]`, `if prev_t >= 0`) reads host memory instead of waiting for the
        # GPU: the loop queues 50 steps of work with no host sync. The UNet gets a device copy made once.
        if timesteps is not None:
            self.scheduler.set_timesteps(timesteps=timesteps, device="cpu")
        elif sigmas is not None:
            self.scheduler.set_timesteps(sigmas=sigmas, device="cpu")
        else:
            self.scheduler.set_timesteps(num_inference_steps, device="cpu")
        timesteps = self.scheduler.timesteps
        unet_timesteps = timesteps.to(device, non_blocking=True)  # pageable memory is staged before it returns
        self._num_timesteps = len(timesteps)
        latents = self.prepare_latents(batch_size, height, width, self.unet.dtype, device, generator, latents)
        step_kwargs = self._step_kwargs(generator, eta)

        # 3. denoise: one UNet call per step on [uncond; cond] when guiding
        lora_kept = _lora_scalings_kept(self.unet) if lora_scale is not None else contextlib.nullcontext()
        with lora_kept, self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                guided = self.do_classifier_free_guidance  # a callback may turn guidance off mid-way
                model_input = torch.cat([latents] * 2) if guided else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                noise_pred = self.unet(
                    model_input, unet_timesteps[i], encoder_hidden_states=prompt_embeds,
                    cross_attention_kwargs=cross_attention_kwargs, return_dict=False,
                )[0]  # fmt: skip
                if guided:
                    noise_uncond, noise_cond = noise_pred.chunk(2)
                    noise_pred = classifier_free_guidance(noise_uncond, noise_cond, self.guidance_scale)
                    if guidance_rescale > 0:
                        noise_pred = rescale_guidance(noise_pred, noise_cond, guidance_rescale)
                else:  # a CUDA-graph UNet (compile "reduce-overhead") rewrites this buffer next step; PNDM keeps ε
                    noise_pred = noise_pred.clone()
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]  # x_{t-1}

                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": prompt_embeds}
                    tensors["negative_prompt_embeds"] = negative_prompt_embeds
                    updates = callback_on_step_end(
                        self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                    )
                    latents = updates.pop("latents", latents)
                    prompt_embeds = updates.pop("prompt_embeds", prompt_embeds)
                progress_bar.update()

        # 4. decode
        images = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, None
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)


@contextlib.contextmanager
def _lora_scalings_kept(model: torch.nn.Module) -> Iterator[None]:
    """Put the LoRA layers' scalings of `model` back as they were when the block ends. A call's `{"scale": s}` is
    undone with diffusers' `unscale_lora_layers`, which after s = 0 sets every adapter to weight 1, so the weights
    chosen with `set_adapters` would be lost for all later calls."""
    from peft.tuners.lora import LoraLayer

    saved = [(layer, dict(layer.scaling)) for layer in model.modules() if isinstance(layer, LoraLayer)]
    try:
        yield
    finally:
        for layer, scaling in saved:
            layer.scaling.update(scaling)
