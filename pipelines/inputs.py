"""The argument checks of `LatentDiffusionPipeline.__call__`: every problem as one clear `ValueError`, naming the
argument and what to pass instead, before any model runs. Kept apart so that the pipeline reads as the sampler."""

import inspect
import math
from typing import Any

import torch
from diffusers import SchedulerMixin

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool), neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_positive_int(value: Any) -> bool:
    """An int ≥ 1 (not a bool: `True` is an int to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_sampling_arguments(
    guidance_scale: float,
    guidance_rescale: float,
    height: int,
    width: int,
    vae_scale_factor: int,
    num_inference_steps: int,
    timesteps: list[int] | None,
    scheduler: SchedulerMixin,
    num_images_per_prompt: int,
    output_type: str,
    generator: Any = None,
    sigmas: list[float] | None = None,
) -> None:
    """Guidance, image size, steps (or custom timesteps or sigmas the scheduler must accept), images per prompt,
    output type, generator(s)."""
    if not is_finite_number(guidance_scale) or guidance_scale < 0:
        raise ValueError(
            f"guidance_scale must be a finite number ≥ 0 (1 or less turns guidance off; 7.5 is usual), "
            f"got {guidance_scale!r}."
        )
    if not is_finite_number(guidance_rescale) or not 0 <= guidance_rescale <= 1:
        raise ValueError(
            f"guidance_rescale must be a number from 0 (off) to 1 (0.7 is usual), got {guidance_rescale!r}."
        )
    for name, size in (("height", height), ("width", width)):
        if not is_positive_int(size):
            raise ValueError(f"{name} must be a positive integer number of pixels, got {size!r}.")
    if height % vae_scale_factor or width % vae_scale_factor:
        raise ValueError(f"height and width must be divisible by the VAE factor {vae_scale_factor}, got {height}x{width}.")
    if timesteps is not None and sigmas is not None:
        raise ValueError("Pass at most one of timesteps and sigmas (got both).")
    if timesteps is None and sigmas is None and not is_positive_int(num_inference_steps):
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
    for name, custom in (("timesteps", timesteps), ("sigmas", sigmas)):
        if custom is not None and name not in inspect.signature(scheduler.set_timesteps).parameters:
            raise ValueError(f"{type(scheduler).__name__} does not take custom {name}; use num_inference_steps.")
    if not is_positive_int(num_images_per_prompt):
        raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}.")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
    generators = generator if isinstance(generator, list) else [generator]
    if not all(g is None or isinstance(g, torch.Generator) for g in generators):
        raise ValueError(
            f"generator must be a torch.Generator (or one per image), got {generator!r}: e.g. "
            "torch.Generator().manual_seed(0)."
        )


def check_prompt_arguments(
    prompt: str | list[str] | None,
    negative_prompt: str | list[str] | None,
    prompt_embeds: torch.Tensor | None,
    negative_prompt_embeds: torch.Tensor | None,
    text_width: int,
) -> None:
    """Exactly one of prompt / prompt_embeds, at most one negative, matching batch sizes, embeddings `(B, L, text_width)`."""
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("Pass exactly one of prompt and prompt_embeds (got both or neither).")
    for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
        if embeds is not None and (embeds.ndim != 3 or embeds.shape[-1] != text_width):
            raise ValueError(
                f"{name} must have shape (batch, tokens, {text_width}), the text encoder's width, got "
                f"{tuple(embeds.shape)}."
            )
    if prompt is not None and not (isinstance(prompt, str) or _is_str_list(prompt)):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}.")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("Pass at most one of negative_prompt and negative_prompt_embeds (got both).")
    if negative_prompt is not None and not (isinstance(negative_prompt, str) or _is_str_list(negative_prompt)):
        raise ValueError(f"negative_prompt must be a string or a list of strings, got {negative_prompt!r}.")
    batch = prompt_batch_size(prompt, prompt_embeds)
    if isinstance(negative_prompt, list) and len(negative_prompt) != batch:
        raise ValueError(
            f"negative_prompt has {len(negative_prompt)} entries but there are {batch} prompts: give one per "
            "prompt, or a single string for all."
        )
    if negative_prompt_embeds is not None and prompt_embeds is not None:
        if prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(
                f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                f"{tuple(negative_prompt_embeds.shape)} must have the same shape."
            )
    elif negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] != batch:
        raise ValueError(
            f"negative_prompt_embeds has {negative_prompt_embeds.shape[0]} rows but there are {batch} prompts."
        )


def prompt_batch_size(prompt: str | list[str] | None, prompt_embeds: torch.Tensor | None) -> int:
    """How many prompts a call has (before `num_images_per_prompt`)."""
    if prompt is None:
        return prompt_embeds.shape[0]
    return 1 if isinstance(prompt, str) else len(prompt)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(v, str) for v in value)
