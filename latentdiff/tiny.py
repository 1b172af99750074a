"""A consistent tiny Stable Diffusion (random weights) for tests, examples and the embedded default's base.

No pretrained VAE or CLIP weights can be downloaded here, so tests build this set, save it as a pipeline
folder, and load it back through `from_pretrained` exactly as a user loads a Hub id. Shapes follow SD-1.x in
miniature: the real CLIP tokenizer (49,408 tokens, 77 positions), a 3-level VAE (factor 4, 4 latent channels),
a 2-layer CLIP text encoder and our UNet with cross-attention on the text width.
"""

from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .models import UNet2DConditionModel
from .tokenizer import BOS_TOKEN, EOS_TOKEN, build_clip_tokenizer
from .vae_training import VAETrainConfig, build_vae

# SD-1.x's noise schedule (its scheduler/scheduler_config.json), with DDIM as the sampler.
SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def clip_text_config(tokenizer: CLIPTokenizer, **sizes: Any) -> CLIPTextConfig:
    """A `CLIPTextConfig` of the given sizes whose vocabulary, length and special tokens are the tokenizer's."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS_TOKEN),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )


def tiny_components(
    seed: int = 0,
    *,
    image_size: int = 32,
    vae_channels: tuple[int, ...] = (32, 64, 64),
    text_hidden_size: int = 32,
    unet_channels: tuple[int, int] = (32, 64),
) -> dict:
    r"""Build a tiny, randomly initialised, mutually consistent set of pipeline components.

    Args:
        seed (`int`, *optional*, defaults to 0): Seeds every weight (the global RNG is left untouched).
        image_size (`int`, *optional*, defaults to 32): Image side; the UNet's `sample_size` is this over the VAE
            factor `2 ** (len(vae_channels) - 1)`.
        vae_channels (`tuple[int]`, *optional*, defaults to `(32, 64, 64)`): AutoencoderKL widths, one per level
            (the default has factor 4: 32×32 images ↔ 4×8×8 latents, as the embedded default's base).
        text_hidden_size (`int`, *optional*, defaults to 32): CLIP text width = the UNet's `cross_attention_dim`.
        unet_channels (`tuple[int, int]`, *optional*, defaults to `(32, 64)`): UNet widths
            (a cross-attention level, then a plain one, as the first and last levels of SD-1.x).

    Returns:
        `dict` with `vae`, `text_encoder`, `tokenizer`, `unet`, `scheduler`: the keyword arguments of
        `LatentDiffusionPipeline`.
    """
    vae_factor = 2 ** (len(vae_channels) - 1)
    if image_size % (vae_factor * 2) != 0:
        raise ValueError(f"image_size={image_size} must be a multiple of {vae_factor * 2} (VAE factor × UNet factor).")
    tokenizer = build_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = build_vae(VAETrainConfig(resolution=image_size, block_out_channels=vae_channels))
        text_encoder = CLIPTextModel(
            clip_text_config(
                tokenizer, hidden_size=text_hidden_size, intermediate_size=2 * text_hidden_size, num_hidden_layers=2,
                num_attention_heads=4,
            )  # fmt: skip
        )
        unet = UNet2DConditionModel(
            sample_size=image_size // vae_factor,
            block_out_channels=unet_channels,
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=text_hidden_size,
            attention_head_dim=4,
            norm_num_groups=8,
        )
    return dict(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=DDIMScheduler(**SD_SCHEDULE),
    )


def save_tiny_pipeline(out_dir: str | Path, seed: int = 0, **sizes: Any) -> Path:
    r"""Save `tiny_components(seed, **sizes)` as a diffusers pipeline folder (loadable by diffusers too).

    Args:
        out_dir (`str` or `Path`): The folder to write (`model_index.json`, `unet/`, `vae/`, ...).
        seed (`int`, *optional*, defaults to 0): Seed of the random weights.
        sizes: Keyword arguments of `tiny_components` (`image_size`, `vae_channels`, ...).

    Returns:
        `Path` of the folder.
    """
    from latentdiff.pipelines import LatentDiffusionPipeline  # pipelines depend on us, not the other way round

    LatentDiffusionPipeline(**tiny_components(seed, **sizes)).save_pretrained(out_dir)
    return Path(out_dir)
