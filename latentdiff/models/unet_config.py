"""Which diffusers UNet2DConditionModel configs our UNet takes, and a clear error naming the key for the rest.

SD-1.x/2.x configs load as they are; keys for features we do not implement (SDXL's added embeddings, dual
cross-attention, GLIGEN, ...) are accepted only at diffusers' default value, so such a checkpoint fails loudly
instead of loading with a part silently missing.
"""

from typing import Any

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)
CLASS_EMBED_TYPES = (None, "timestep", "identity", "projection")

# diffusers config keys we accept only at diffusers' default: any other value needs code we do not have
# (SDXL's added embeddings, dual cross-attention, GLIGEN, ...), so loading such a config must fail loudly.
FIXED_DIFFUSERS_OPTIONS: dict[str, Any] = {
    "dual_cross_attention": False,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "addition_embed_type_num_heads": 64,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}


# Of those, the keys that only blocks we never build read (SimpleCrossAttn*/ResnetDownsample* blocks, or
# `addition_embed_type="text"`): with SD block types any value gives diffusers the same model, so any is accepted.
INERT_WITH_SD_BLOCKS = ("addition_embed_type_num_heads", "resnet_skip_time_act", "resnet_out_scale_factor",
                        "mid_block_only_cross_attention", "cross_attention_norm")  # fmt: skip


def per_block(value: Any, n_blocks: int, name: str) -> list:
    """Broadcast an int/bool config value to one per block, or check a per-block list's length."""
    if isinstance(value, (list, tuple)):
        if len(value) != n_blocks:
            raise ValueError(f"{name} has {len(value)} entries but the UNet has {n_blocks} blocks: give one per block.")
        return list(value)
    return [value] * n_blocks


def _unsupported(key: str, value: Any, supported: Any) -> ValueError:
    return ValueError(
        f"UNet config key {key!r} = {value!r} is not supported by latentdiff's UNet2DConditionModel "
        f"(supported: {supported}). Use diffusers' UNet2DConditionModel for this checkpoint."
    )


# Sizes: a positive int, or one per block (per side for sample_size); a string or float there (a hand-edited
# config.json) would fail deep inside torch's tensor constructors instead of naming the key.
SIZE_KEYS = ("sample_size", "in_channels", "out_channels", "layers_per_block", "block_out_channels",
             "cross_attention_dim", "attention_head_dim", "num_attention_heads", "transformer_layers_per_block")  # fmt: skip


def check_config(options: dict[str, Any], n_blocks: int) -> None:
    """Sizes, block types, time/class embedding options and per-block list lengths of a constructor call."""
    for key in SIZE_KEYS:
        value = options[key]
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None and not isinstance(item, (list, tuple)) and (
                isinstance(item, bool) or not isinstance(item, int) or item < 1
            ):
                raise ValueError(
                    f"UNet config key {key!r} must be a positive integer (or one per block), got {value!r}."
                )
    for key, allowed, values in (
        ("down_block_types", DOWN_BLOCK_TYPES, options["down_block_types"]),
        ("up_block_types", UP_BLOCK_TYPES, options["up_block_types"]),
        ("mid_block_type", MID_BLOCK_TYPES, [options["mid_block_type"]]),
        ("resnet_time_scale_shift", ("default", "scale_shift"), [options["resnet_time_scale_shift"]]),
        ("class_embed_type", CLASS_EMBED_TYPES, [options["class_embed_type"]]),
        ("time_cond_proj_dim", (None,), [options["time_cond_proj_dim"]]),
    ):
        for value in values:
            if value not in allowed:
                raise _unsupported(key, value, allowed)
    groups = options["norm_num_groups"]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise _unsupported("norm_num_groups", groups, "a positive int that divides every block_out_channels entry")
    for key in ("down_block_types", "up_block_types"):
        if len(options[key]) != n_blocks:
            raise ValueError(
                f"{key} has {len(options[key])} entries but block_out_channels has {n_blocks}: they must match."
            )
    if isinstance(options["transformer_layers_per_block"], (list, tuple)) and any(
        isinstance(v, (list, tuple)) for v in options["transformer_layers_per_block"]
    ):
        raise _unsupported("transformer_layers_per_block", options["transformer_layers_per_block"], "int per block")


def check_fixed_options(options: dict[str, Any]) -> None:
    """Keyword arguments beyond our constructor's own: each must be a `FIXED_DIFFUSERS_OPTIONS` key at its default,
    or an `INERT_WITH_SD_BLOCKS` one (so that `UNet2DConditionModel(**diffusers_unet.config)` works); any other key
    is a `TypeError`, as Python's own."""
    for key, value in options.items():
        if key not in FIXED_DIFFUSERS_OPTIONS:
            raise TypeError(f"UNet2DConditionModel got an unexpected keyword argument {key!r}.")
        if value != FIXED_DIFFUSERS_OPTIONS[key] and key not in INERT_WITH_SD_BLOCKS:
            raise _unsupported(key, value, FIXED_DIFFUSERS_OPTIONS[key])


def drop_fixed_options(config_dict: dict[str, Any], kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`FIXED_DIFFUSERS_OPTIONS` removed from a loaded config and its overrides, after checking each is at its default."""
    merged = {**config_dict, **kwargs}
    check_fixed_options({key: merged[key] for key in FIXED_DIFFUSERS_OPTIONS if key in merged})
    config_dict = {k: v for k, v in config_dict.items() if k not in FIXED_DIFFUSERS_OPTIONS}
    kwargs = {k: v for k, v in kwargs.items() if k not in FIXED_DIFFUSERS_OPTIONS}
    return config_dict, kwargs
