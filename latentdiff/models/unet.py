"""Our UNet2DConditionModel: the ε/v-prediction network of latent diffusion (Rombach et al. 2022, sec. 3.3).

It takes diffusers' config keys and has diffusers' state-dict keys and shapes for SD-1.x/2.x-style UNets, so
checkpoints move both ways; the code is our own and keeps ``forward`` free of Python work that would break
``torch.compile(fullgraph=True)``.
"""

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from diffusers.utils.peft_utils import apply_lora_scale
from torch import nn

from .activations import get_activation
from .attention import fuse_projections, projections_fused, unfuse_projections
from .diffusers_api import DiffusersUNetAPI
from .embeddings import SinusoidalTimesteps, TimestepEmbedding
from .normalization import GroupNorm
from .stages import AttentionSpec, DownBlock2D, ResnetSpec, UNetMidBlock2DCrossAttn, UpBlock2D
from .unet_config import check_config, check_fixed_options, drop_fixed_options, per_block


def _refuse_adapters_while_fused(model: nn.Module) -> None:
    if projections_fused(model):
        raise ValueError(
            "This UNet's QKV projections are fused and the fused product would skip a LoRA adapter: call "
            "unet.unfuse_qkv_projections() before adding or loading adapters."
        )


class UNet2DConditionModel(DiffusersUNetAPI, ModelMixin, ConfigMixin, PeftAdapterMixin):
    r"""A conditional UNet that predicts the noise (or velocity) in a noisy latent, given a timestep and text.

    Args:
        sample_size (`int` or `tuple[int, int]`, *optional*): Latent height/width the model was trained at.
        in_channels / out_channels (`int`, defaults to 4): Latent channels in and out.
        center_input_sample (`bool`, defaults to `False`): Map the input from [0, 1] to [-1, 1] first.
        flip_sin_to_cos / freq_shift: The sinusoid convention of the timestep features (see `embeddings.py`).
        down_block_types / up_block_types (`tuple[str]`): `CrossAttnDownBlock2D`/`DownBlock2D` and
            `CrossAttnUpBlock2D`/`UpBlock2D`, one per resolution.
        mid_block_type (`str`, *optional*, defaults to `"UNetMidBlock2DCrossAttn"`): `None` for no middle block.
        only_cross_attention (`bool` or per-block `tuple`): The first attention of the down/up blocks attends to
            the text instead of the image (the middle block's always attends to the image, as in diffusers).
        block_out_channels (`tuple[int]`, defaults to `(320, 640, 1280, 1280)`): Width at each resolution.
        layers_per_block (`int` or per-block `tuple`, defaults to 2): ResNets per down block (+1 per up block).
        downsample_padding (`int`, defaults to 1), mid_block_scale_factor (`float`, defaults to 1).
        dropout (`float`): In the ResNets only, as in diffusers. act_fn (`str`, defaults to `"silu"`),
        norm_num_groups (`int`, defaults to 32),
        norm_eps (`float`, defaults to 1e-5).
        cross_attention_dim (`int` or per-block `tuple`, defaults to 1280): Width of the text embeddings.
        transformer_layers_per_block (`int` or per-block `tuple`, defaults to 1).
        attention_head_dim (`int` or per-block `tuple`, defaults to 8): The number of heads, despite its name:
            diffusers kept this historical misnomer for compatibility with thousands of configs, and so do we.
        num_attention_heads (`int` or per-block `tuple`, *optional*): The number of heads, by its right name;
            stored back as `attention_head_dim` so that diffusers (which rejects this key) loads our config.
        use_linear_projection (`bool`): Linear instead of 1×1-conv `proj_in/out` (SD-2.x).
        upcast_attention (`bool`): Attention in fp32 (SD-2.x at 768 px overflows fp16 otherwise).
        resnet_time_scale_shift (`str`, defaults to `"default"`): `"default"` adds the time embedding,
            `"scale_shift"` modulates the group norm with it (AdaGN).
        class_embed_type (`str`, *optional*), num_class_embeds (`int`, *optional*),
        projection_class_embeddings_input_dim (`int`, *optional*): Class conditioning added to the time embedding.
        conv_in_kernel / conv_out_kernel (`int`, defaults to 3).
        time_cond_proj_dim (`None`): Present because diffusers' pipelines read it; only `None` is supported.

    LoRA: diffusers' adapter API (`PeftAdapterMixin`: `add_adapter`, `set_adapters`, `disable_adapters`, …) works
    on the attention projections, which carry diffusers' names, and `cross_attention_kwargs={"scale": s}` scales the
    adapters for one call, as in diffusers. LoRA and `fuse_qkv_projections()` exclude each other.
    """

    _supports_gradient_checkpointing = True
    ignore_for_config = ["diffusers_only_options"]
    _no_split_modules = ["BasicTransformerBlock", "ResnetBlock2D"]

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        only_cross_attention: bool | tuple[bool, ...] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int | tuple[int, ...] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        dropout: float = 0.0,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int | tuple[int, ...] = 1280,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: int | tuple[int, ...] | None = None,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        projection_class_embeddings_input_dim: int | None = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        time_cond_proj_dim: int | None = None,
        **diffusers_only_options: Any,
    ):
        super().__init__()
        check_fixed_options(diffusers_only_options)  # diffusers' keys for features we lack, at their defaults only
        n_blocks = len(block_out_channels)
        check_config(locals(), n_blocks)
        if num_attention_heads is not None:
            self.register_to_config(attention_head_dim=num_attention_heads, num_attention_heads=None)
        heads = per_block(num_attention_heads or attention_head_dim, n_blocks, "attention_head_dim")
        layers = per_block(layers_per_block, n_blocks, "layers_per_block")
        context_dims = per_block(cross_attention_dim, n_blocks, "cross_attention_dim")
        transformer_layers = per_block(transformer_layers_per_block, n_blocks, "transformer_layers_per_block")
        cross_only = per_block(only_cross_attention, n_blocks, "only_cross_attention")
        for channels, n_heads in zip(block_out_channels, heads):
            if channels % n_heads or channels % norm_num_groups:
                raise ValueError(
                    f"block_out_channels entry {channels} must be divisible by its number of heads ({n_heads}) "
                    f"and by norm_num_groups ({norm_num_groups}). Use diffusers' UNet2DConditionModel for other "
                    "widths."
                )

        def attention_spec(i: int) -> AttentionSpec:
            return AttentionSpec(
                heads[i], context_dims[i], transformer_layers[i], use_linear_projection, cross_only[i], upcast_attention
            )

        # 1. input projection, time (and class) embedding
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], conv_in_kernel, padding=(conv_in_kernel - 1) // 2)
        time_embed_dim = block_out_channels[0] * 4
        self.time_proj = SinusoidalTimesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, act_fn)
        self.class_embedding = self._build_class_embedding(
            class_embed_type, num_class_embeds, projection_class_embeddings_input_dim, block_out_channels[0],
            time_embed_dim, act_fn,
        )  # fmt: skip
        resnet = ResnetSpec(time_embed_dim, norm_num_groups, norm_eps, act_fn, dropout, resnet_time_scale_shift)

        # 2. down path
        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(down_block_types):
            self.down_blocks.append(
                DownBlock2D(
                    block_out_channels[max(i - 1, 0)],
                    block_out_channels[i],
                    layers[i],
                    resnet,
                    attention_spec(i) if block_type == "CrossAttnDownBlock2D" else None,
                    add_downsample=i < n_blocks - 1,
                    downsample_padding=downsample_padding,
                )
            )

        # 3. middle
        self.mid_block = None
        if mid_block_type is not None:
            # diffusers' mid block always starts with self-attention: only_cross_attention is the down/up blocks'
            mid_attention = dataclasses.replace(attention_spec(n_blocks - 1), only_cross_attention=False)
            self.mid_block = UNetMidBlock2DCrossAttn(
                block_out_channels[-1], resnet, mid_attention, mid_block_scale_factor
            )

        # 4. up path: mirror of the down path, one more ResNet per block to consume the downsampler's skip
        self.up_blocks = nn.ModuleList()
        for i, block_type in enumerate(up_block_types):
            level = n_blocks - 1 - i  # the down level this up block mirrors
            self.up_blocks.append(
                UpBlock2D(
                    in_channels=block_out_channels[max(level - 1, 0)],
                    prev_output_channels=block_out_channels[min(level + 1, n_blocks - 1)],
                    out_channels=block_out_channels[level],
                    num_layers=layers[level] + 1,
                    resnet=resnet,
                    attention=attention_spec(level) if block_type == "CrossAttnUpBlock2D" else None,
                    add_upsample=i < n_blocks - 1,
                )
            )
        self.num_upsamplers = n_blocks - 1

        # 5. output
        self.conv_norm_out = GroupNorm(norm_num_groups, block_out_channels[0], eps=norm_eps)
        self.conv_act = get_activation(act_fn)
        self.conv_out = nn.Conv2d(
            block_out_channels[0], out_channels, conv_out_kernel, padding=(conv_out_kernel - 1) // 2
        )

    @staticmethod
    def _build_class_embedding(
        class_embed_type: str | None,
        num_class_embeds: int | None,
        projection_input_dim: int | None,
        timestep_input_dim: int,
        time_embed_dim: int,
        act_fn: str,
    ) -> nn.Module | None:
        if class_embed_type is None:
            return nn.Embedding(num_class_embeds, time_embed_dim) if num_class_embeds is not None else None
        if class_embed_type == "timestep":
            return TimestepEmbedding(timestep_input_dim, time_embed_dim, act_fn)
        if class_embed_type == "identity":
            return nn.Identity()
        if projection_input_dim is None:
            raise ValueError("class_embed_type='projection' needs projection_class_embeddings_input_dim to be set.")
        return TimestepEmbedding(projection_input_dim, time_embed_dim)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "UNet2DConditionModel":
        """diffusers' `ModelMixin.from_pretrained`, reading safetensors only unless `use_safetensors` is given:
        unpickling a `.bin` can run code, so (DESIGN.md, contract 3) it takes `use_safetensors=False` to opt in."""
        if "use_safetensors" in kwargs:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, use_safetensors=True, **kwargs)
        except OSError as error:
            folder = Path(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
            pickles = sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []
            if not pickles:
                raise
            raise OSError(
                f"{folder} holds its weights only as pickle ({', '.join(pickles)}), which can run code when loaded. "
                "If you trust it, pass use_safetensors=False, or convert it to safetensors first."
            ) from error

    @classmethod
    def extract_init_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> tuple[dict, dict, dict]:
        """Refuse configs that need features we do not implement, instead of silently dropping them."""
        config_dict, kwargs = drop_fixed_options(config_dict, kwargs)
        return super().extract_init_dict(config_dict, **kwargs)

    # ---- fused QKV projections: an inference lever; see models/attention.py for how keys stay diffusers' ------

    def fuse_qkv_projections(self) -> None:
        r"""One GEMM for self-attention's Q, K, V and one for cross-attention's K, V (diffusers' method and meaning).

        The state dict keeps diffusers' keys and shapes (`to_q.weight` is a view of the fused weight), so saving and
        `load_state_dict` work as usual and fusing costs no memory. Training still gets correct gradients but gains
        nothing; `.to()` is fine, while code that swaps in new parameter tensors (FSDP, offload hooks) should run
        before fusing. Calling it twice is harmless.

        Raises:
            ValueError: A LoRA adapter is attached (the fused product would skip it).
        """
        fuse_projections(self)

    def unfuse_qkv_projections(self) -> None:
        """Separate Q, K, V products again (a no-op when not fused)."""
        unfuse_projections(self)

    def add_adapter(self, adapter_config: Any, adapter_name: str = "default") -> None:
        """diffusers' `PeftAdapterMixin.add_adapter`, refused while the QKV projections are fused."""
        _refuse_adapters_while_fused(self)
        super().add_adapter(adapter_config, adapter_name)

    def load_lora_adapter(self, *args: Any, **kwargs: Any) -> None:
        """diffusers' `PeftAdapterMixin.load_lora_adapter`, refused while the QKV projections are fused."""
        _refuse_adapters_while_fused(self)
        super().load_lora_adapter(*args, **kwargs)

    def _time_embedding(
        self, sample: torch.Tensor, timestep: torch.Tensor | float | int, class_labels: torch.Tensor | None
    ) -> torch.Tensor:
        if not torch.is_tensor(timestep):
            narrow = sample.device.type in ("mps", "npu")  # no 64-bit types there (diffusers narrows them too)
            if isinstance(timestep, float):
                dtype = torch.float32 if narrow else torch.float64
            else:
                dtype = torch.int32 if narrow else torch.int64
            timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
        elif timestep.ndim == 0:
            timestep = timestep[None].to(sample.device)
        timesteps = timestep.expand(sample.shape[0])  # (B,)
        emb = self.time_embedding(self.time_proj(timesteps).to(sample.dtype))  # (B, 4·C0)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("This UNet is class-conditional: pass class_labels to forward().")
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels).to(sample.dtype)
            emb = emb + self.class_embedding(class_labels).to(sample.dtype)
        return emb

    @apply_lora_scale("cross_attention_kwargs")
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        r"""Predict the noise (or v) in `sample` at `timestep`, conditioned on `encoder_hidden_states`.

        Args:
            sample (`torch.Tensor`): Noisy latents `(B, C, H, W)`.
            timestep (`torch.Tensor` or `float` or `int`): One timestep, or one per sample.
            encoder_hidden_states (`torch.Tensor`): Text embeddings `(B, L, cross_attention_dim)`.
            class_labels (`torch.Tensor`, *optional*): Needed when the config has a class embedding.
            attention_mask / encoder_attention_mask (`torch.Tensor`, *optional*): `(B, L)` or `(B, 1, L)` with
                1 = keep, 0 = discard, for self- and cross-attention keys.
            down_block_additional_residuals / mid_block_additional_residual (*optional*): ControlNet residuals,
                one per skip and one for the middle block: both or neither.
            down_intrablock_additional_residuals (*optional*): T2I-Adapter features, one per down block (as
                diffusers' `StableDiffusionAdapterPipeline` passes them).
            cross_attention_kwargs (`dict`, *optional*): Only `{"scale": s}`, the LoRA scale for this call.
            timestep_cond, added_cond_kwargs: Accepted so diffusers' pipelines can call us; they must be `None`
                (we have no LCM or SDXL conditioning).
            return_dict (`bool`, defaults to `True`): `UNet2DConditionOutput` or a 1-tuple.
        """
        if cross_attention_kwargs is not None and set(cross_attention_kwargs) == {"scale"}:
            raise ValueError(
                "Pass cross_attention_kwargs={'scale': ...} by keyword: the LoRA scale is applied only then (a "
                "positional one would go unapplied, as in diffusers' UNet, which ignores it silently)."
            )
        if timestep_cond is not None or added_cond_kwargs or cross_attention_kwargs:
            raise ValueError(
                "timestep_cond, added_cond_kwargs and cross_attention_kwargs other than the LoRA 'scale' are not "
                "supported by this UNet (SD-1.x/2.x style); pass None."
            )
        if sample.dim() != 4:
            raise ValueError(
                f"sample must be latents (batch, channels, height, width), got shape {tuple(sample.shape)}. Video "
                "pipelines (AnimateDiff, PIA) turn only diffusers' own UNet into a motion UNet: pass them "
                "unet=UNetMotionModel.from_unet2d(this_unet, motion_adapter)."
            )
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError(
                "ControlNet residuals come in pairs: pass both down_block_additional_residuals and "
                "mid_block_additional_residual (diffusers ignores a lone mid residual and takes lone down residuals "
                "as T2I-Adapter features, which go in down_intrablock_additional_residuals)."
            )
        adapter_residuals = list(down_intrablock_additional_residuals or ())
        if len(adapter_residuals) > len(self.down_blocks):
            raise ValueError(
                f"down_intrablock_additional_residuals has {len(adapter_residuals)} entries for "
                f"{len(self.down_blocks)} down blocks: give at most one per block."
            )
        # Latent sizes that are not a multiple of 2^(number of upsamplers) need explicit upsample sizes.
        up_factor = 2**self.num_upsamplers
        odd_size = any(dim % up_factor != 0 for dim in sample.shape[-2:])
        self_bias, cross_bias = (_key_bias(mask, name, sample.dtype) for mask, name in (
            (attention_mask, "attention_mask"), (encoder_attention_mask, "encoder_attention_mask")))  # fmt: skip
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        # 1. time
        emb = self._time_embedding(sample, timestep, class_labels)

        # 2. down
        sample = self.conv_in(sample)
        skips = (sample,)
        for i, block in enumerate(self.down_blocks):
            adapter = adapter_residuals[i] if i < len(adapter_residuals) else None
            sample, block_skips = block(sample, emb, encoder_hidden_states, self_bias, cross_bias, adapter)
            skips += block_skips
        if down_block_additional_residuals is not None:
            skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals))

        # 3. mid
        if self.mid_block is not None:
            sample = self.mid_block(sample, emb, encoder_hidden_states, self_bias, cross_bias)
        if mid_block_additional_residual is not None:  # its down residuals came with it (checked above)
            sample = sample + mid_block_additional_residual

        # 4. up: each block takes as many skips as it has ResNets, newest first
        for i, block in enumerate(self.up_blocks):
            n_skips = len(block.resnets)
            block_skips, skips = skips[-n_skips:], skips[:-n_skips]
            upsample_size = skips[-1].shape[2:] if odd_size and i < len(self.up_blocks) - 1 else None
            sample = block(sample, block_skips, emb, encoder_hidden_states, self_bias, cross_bias, upsample_size)

        # 5. out
        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))
        if not return_dict:
            return (sample,)
        return UNet2DConditionOutput(sample=sample)


def _key_bias(mask: torch.Tensor | None, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    """A `(B, L)` or `(B, 1, L)` mask of 1 = keep as an additive bias `(B, 1, 1, L)`, broadcast over heads and
    queries (diffusers' -10000 for a discarded key)."""
    if mask is None:
        return None
    if mask.ndim == 3 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 2:
        raise ValueError(f"{name} must have shape (B, L) or (B, 1, L), got {tuple(mask.shape)}.")
    return ((1 - mask.to(dtype)) * -10000.0)[:, None, None]
