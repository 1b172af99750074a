"""Our UNet2DConditionModel against diffusers': same keys, same numbers, same files, both directions."""

import json
import sys
import types

import diffusers
import pytest
import torch
from conftest import UNET_CONFIGS, unet_inputs

from latentdiff import UNet2DConditionModel
from latentdiff.models import attention as attention_module
from latentdiff.models.unet_config import FIXED_DIFFUSERS_OPTIONS, INERT_WITH_SD_BLOCKS


def paired_models(config: dict, seed: int = 0) -> tuple[diffusers.UNet2DConditionModel, UNet2DConditionModel]:
    """diffusers' UNet with seeded random weights, and ours holding exactly those weights (strict load)."""
    torch.manual_seed(seed)
    reference = diffusers.UNet2DConditionModel(**config).eval()
    ours = UNet2DConditionModel(**config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def test_state_dict_keys_and_shapes_match(unet_config):
    reference = diffusers.UNet2DConditionModel(**unet_config).state_dict()
    ours = UNet2DConditionModel(**unet_config).state_dict()
    assert sorted(ours) == sorted(reference)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}


def test_forward_matches_diffusers(unet_config):
    reference, ours = paired_models(unet_config)
    inputs = unet_inputs(unet_config)
    with torch.no_grad():
        expected = reference(**inputs).sample
        actual = ours(**inputs).sample
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-5


def test_gradients_match_diffusers(unet_config):
    reference, ours = paired_models(unet_config)
    inputs = unet_inputs(unet_config)
    target = torch.randn(inputs["sample"].shape, generator=torch.Generator().manual_seed(1))
    for model in (reference, ours):
        torch.nn.functional.mse_loss(model(**inputs).sample, target).backward()
    ours_params = dict(ours.named_parameters())
    worst = max((p.grad - ours_params[n].grad).abs().max().item() for n, p in reference.named_parameters())
    assert worst <= 1e-4


def test_channels_last_keeps_its_layout_and_the_numbers():
    """A channels-last model (`.to(memory_format=torch.channels_last)`) gives the NCHW model's output, and the 1×1
    conv after each transformer reads NHWC without a round trip through NCHW."""
    config = UNET_CONFIGS["sd1"]  # conv proj_in/proj_out
    _, ours = paired_models(config)
    inputs = unet_inputs(config)
    with torch.no_grad():
        expected = ours(**inputs).sample
        ours.to(memory_format=torch.channels_last)
        layouts = []
        hooks = [
            module.proj_out.register_forward_pre_hook(
                lambda _, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
            )
            for module in ours.modules()
            if type(module).__name__ == "Transformer2DModel"
        ]
        sample = inputs["sample"].to(memory_format=torch.channels_last)
        actual = ours(**{**inputs, "sample": sample}).sample
    for hook in hooks:
        hook.remove()
    assert layouts and all(layouts), layouts
    assert (actual - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("linear", [False, True])
def test_a_transformer_hands_back_its_input_layout(linear):
    """The transformer's output goes to the next ResNet's convolutions in the input's layout: NCHW as diffusers (an
    NHWC-strided result picks other conv kernels, with other last bits: SD-2's linear projection did), and
    channels-last without a round trip."""
    from latentdiff.models.blocks import Transformer2DModel

    block = Transformer2DModel(32, heads=2, context_dim=16, groups=8, use_linear_projection=linear).eval()
    x, context = torch.randn(2, 32, 4, 6), torch.randn(2, 5, 16)
    with torch.no_grad():
        assert block(x, context).is_contiguous()
        assert block(x.to(memory_format=torch.channels_last), context).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("size", [6, 10])
def test_latent_sizes_not_divisible_by_the_up_factor(size):
    """Odd latent sizes go through explicit upsample sizes, as in diffusers."""
    config = UNET_CONFIGS["sd2"]  # two downsamplers: the up factor is 4
    reference, ours = paired_models(config)
    inputs = unet_inputs(config, size=size)
    with torch.no_grad():
        assert torch.allclose(ours(**inputs).sample, reference(**inputs).sample, atol=1e-5)


def test_encoder_attention_mask_matches_diffusers():
    config = UNET_CONFIGS["sd1"]
    reference, ours = paired_models(config)
    inputs = unet_inputs(config)
    inputs["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        masked = ours(**inputs).sample
        assert torch.allclose(masked, reference(**inputs).sample, atol=1e-5)
        # (B, 1, L), as diffusers also takes it
        mask = inputs["encoder_attention_mask"]
        assert torch.equal(ours(**{**inputs, "encoder_attention_mask": mask[:, None]}).sample, masked)
        with pytest.raises(ValueError, match=r"must have shape \(B, L\) or \(B, 1, L\), got \(2, 7, 7\)"):
            ours(**{**inputs, "encoder_attention_mask": torch.ones(2, 7, 7)})
        del inputs["encoder_attention_mask"]
        assert not torch.allclose(masked, ours(**inputs).sample, atol=1e-3)


@pytest.mark.parametrize("option", [dict(mid_block_scale_factor=2.0), dict(center_input_sample=True)],
                         ids=["mid_block_scale_factor", "center_input_sample"])  # fmt: skip
def test_options_off_the_sd_defaults_match_diffusers(option):
    """Config keys SD checkpoints leave at their defaults, which other converted UNets set."""
    config = {**UNET_CONFIGS["sd1"], **option}
    reference, ours = paired_models(config)
    inputs = unet_inputs(config)
    with torch.no_grad():
        actual = ours(**inputs).sample
        assert (actual - reference(**inputs).sample).abs().max().item() <= 1e-5
        _, plain = paired_models(UNET_CONFIGS["sd1"])
        assert (actual - plain(**inputs).sample).abs().max().item() > 1e-3  # the option changed the output


def test_self_attention_mask_matches_diffusers():
    """`attention_mask` masks the keys of each block's first attention: only meaningful (in diffusers too) where
    that one attends to the text, i.e. cross-attention only and no mid block."""
    config = dict(UNET_CONFIGS["sd1"], only_cross_attention=True, mid_block_type=None)
    reference, ours = paired_models(config)
    inputs = unet_inputs(config)
    inputs["attention_mask"] = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        masked = ours(**inputs).sample
        assert (masked - reference(**inputs).sample).abs().max().item() <= 1e-5
        del inputs["attention_mask"]
        assert (masked - ours(**inputs).sample).abs().max().item() > 1e-3


@pytest.mark.parametrize("kernel", [2, 4])
def test_even_conv_kernels_pad_as_diffusers(kernel):
    """diffusers pads conv_in/conv_out by (k - 1) // 2: an even kernel changes the output size, the same in both."""
    config = dict(UNET_CONFIGS["sd1"], conv_out_kernel=kernel)
    reference, ours = paired_models(config)
    inputs = unet_inputs(config)
    with torch.no_grad():
        expected = reference(**inputs).sample
        actual = ours(**inputs).sample
    assert actual.shape == expected.shape and (actual - expected).abs().max().item() <= 1e-5


def test_a_positional_lora_scale_is_refused_with_how_to_pass_it():
    config = UNET_CONFIGS["sd1"]
    _, ours = paired_models(config)
    inputs = unet_inputs(config)
    with pytest.raises(ValueError, match=r"Pass cross_attention_kwargs=\{'scale': \.\.\.\} by keyword"):
        ours(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], None, None, None, {"scale": 0.5})


def test_video_latents_are_refused_with_the_motion_unet_to_use():
    """AnimateDiff and PIA convert only diffusers' UNet: ours got (B, C, frames, H, W) and failed in a conv."""
    config = UNET_CONFIGS["sd1"]
    _, ours = paired_models(config)
    inputs = unet_inputs(config)
    inputs["sample"] = inputs["sample"].unsqueeze(2).expand(-1, -1, 3, -1, -1)
    with pytest.raises(ValueError, match=r"got shape \(2, 4, 3, 8, 8\)\. .*UNetMotionModel.from_unet2d"):
        ours(**inputs)


def test_scalar_timesteps_and_tuple_return():
    config = UNET_CONFIGS["sd1"]
    _, ours = paired_models(config)
    inputs = unet_inputs(config)
    with torch.no_grad():
        batched = ours(inputs["sample"], torch.tensor([7, 7]), inputs["encoder_hidden_states"]).sample
        for timestep in (7, 7.0, torch.tensor(7)):
            (out,) = ours(inputs["sample"], timestep, inputs["encoder_hidden_states"], return_dict=False)
            assert torch.allclose(out, batched, atol=1e-6)


def test_diffusers_checkpoint_loads_into_ours(tmp_path, unet_config):
    reference, _ = paired_models(unet_config)
    reference.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    ours = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    inputs = unet_inputs(unet_config)
    with torch.no_grad():
        assert (ours(**inputs).sample - reference(**inputs).sample).abs().max().item() <= 1e-5


def test_our_checkpoint_loads_into_diffusers(tmp_path, unet_config):
    _, ours = paired_models(unet_config, seed=3)
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "UNet2DConditionModel"
    reference, info = diffusers.UNet2DConditionModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    inputs = unet_inputs(unet_config)
    with torch.no_grad():
        assert (ours(**inputs).sample - reference.eval()(**inputs).sample).abs().max().item() <= 1e-5


def test_pickle_weights_load_only_when_asked_for(tmp_path):
    reference = diffusers.UNet2DConditionModel(**UNET_CONFIGS["sd1"])
    reference.save_pretrained(tmp_path / "unet", safe_serialization=False)  # diffusion_pytorch_model.bin only
    with pytest.raises(OSError, match=r"only as pickle \(diffusion_pytorch_model.bin\).*use_safetensors=False"):
        UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
    ours = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet", use_safetensors=False)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_num_attention_heads_is_stored_as_diffusers_attention_head_dim(tmp_path):
    config = dict(UNET_CONFIGS["sd2"], num_attention_heads=(2, 4, 8))
    del config["attention_head_dim"]
    ours = UNet2DConditionModel(**config)
    assert tuple(ours.config.attention_head_dim) == (2, 4, 8) and ours.config.num_attention_heads is None
    ours.save_pretrained(tmp_path)
    reference = diffusers.UNet2DConditionModel.from_pretrained(tmp_path)
    assert reference.state_dict().keys() == ours.state_dict().keys()


def test_gradient_checkpointing_gives_the_same_gradients():
    config = UNET_CONFIGS["sd1"]
    _, plain = paired_models(config)
    _, checkpointed = paired_models(config)
    checkpointed.enable_gradient_checkpointing()
    checkpointed.train(), plain.train()
    inputs = unet_inputs(config)
    for model in (plain, checkpointed):
        model(**inputs).sample.square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_gradient_checkpointing_recomputes_the_blocks(monkeypatch):
    """The checkpointed forward really goes through the checkpoint function (else memory is not saved)."""
    config = UNET_CONFIGS["sd1"]
    _, model = paired_models(config)
    calls = []
    model.enable_gradient_checkpointing(gradient_checkpointing_func=lambda module, *args: calls.append(module) or module(*args))
    model.train()(**unet_inputs(config)).sample.mean().backward()
    resnets = sum(1 for m in model.modules() if type(m).__name__ == "ResnetBlock2D")
    assert sum(type(m).__name__ == "ResnetBlock2D" for m in calls) == resnets
    calls.clear()
    with torch.no_grad():  # validation in a checkpointed run: nothing to recompute, so no checkpoint function
        model(**unet_inputs(config))
    assert calls == []


# A value other than diffusers' default for each key of a feature our UNet lacks (SDXL's added embeddings, ...)
UNSUPPORTED_VALUES = dict(
    dual_cross_attention=True, reverse_transformer_layers_per_block=[[1, 1], [1, 1]], encoder_hid_dim=32,
    encoder_hid_dim_type="text_proj", addition_embed_type="text_time", addition_time_embed_dim=256,
    time_embedding_type="fourier", time_embedding_dim=64, time_embedding_act_fn="silu", timestep_post_act="silu",
    attention_type="gated", class_embeddings_concat=True,
)  # fmt: skip


def test_every_key_of_a_missing_feature_has_a_refusal_test():
    assert set(UNSUPPORTED_VALUES) == set(FIXED_DIFFUSERS_OPTIONS) - set(INERT_WITH_SD_BLOCKS)


@pytest.mark.parametrize("key", sorted(UNSUPPORTED_VALUES))
def test_unsupported_config_value_names_the_key_in_a_call_and_a_checkpoint(key, tmp_path):
    """A checkpoint of a feature we lack fails loudly instead of loading with that part silently missing."""
    value = UNSUPPORTED_VALUES[key]
    with pytest.raises(ValueError, match=f"'{key}' = .* is not supported"):
        UNet2DConditionModel(**UNET_CONFIGS["sd1"], **{key: value})
    UNet2DConditionModel(**UNET_CONFIGS["sd1"]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=f"'{key}' = .* is not supported"):
        UNet2DConditionModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("upcast", [True, False])
def test_upcast_attention_computes_attention_in_float32(upcast, monkeypatch):
    """SD-2.x's `upcast_attention`: Q Kᵀ overflows fp16 at 768 px otherwise. A CPU does not overflow, so the test
    reads the dtype attention runs in; the block's output keeps the model's dtype either way."""
    config = dict(UNET_CONFIGS["sd2"], upcast_attention=upcast)
    dtypes = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention",
                        lambda q, *args, **kwargs: dtypes.append(q.dtype) or sdpa(q, *args, **kwargs))  # fmt: skip
    model = UNet2DConditionModel(**config).to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in unet_inputs(config).items()}
    with torch.no_grad():
        output = model(**inputs).sample
    assert output.dtype == torch.bfloat16 and dtypes
    assert set(dtypes) == {torch.float32 if upcast else torch.bfloat16}


def test_diffusers_default_values_of_unsupported_keys_are_accepted(tmp_path):
    reference = diffusers.UNet2DConditionModel(**UNET_CONFIGS["sd1"])
    reference.save_pretrained(tmp_path)  # its config.json lists every diffusers key at its default
    assert "dual_cross_attention" in json.loads((tmp_path / "config.json").read_text())
    UNet2DConditionModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "key, value",
    [
        ("down_block_types", ("SimpleCrossAttnDownBlock2D", "DownBlock2D")),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("resnet_time_scale_shift", "spatial"),
        ("time_cond_proj_dim", 32),
        ("norm_num_groups", None),
    ],
)
def test_unsupported_constructor_value_names_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        UNet2DConditionModel(**dict(UNET_CONFIGS["sd1"], **{key: value}))


def test_a_full_diffusers_config_constructs_ours():
    """`UNet2DConditionModel(**diffusers_unet.config)`: diffusers' keys for features we lack are taken at their
    defaults, refused with the key named otherwise; an unknown key is a TypeError, as for any Python call."""
    reference = diffusers.UNet2DConditionModel(**UNET_CONFIGS["sd1"])
    config = {k: v for k, v in reference.config.items() if not k.startswith("_")}
    ours = UNet2DConditionModel(**config)
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert "dual_cross_attention" not in ours.config  # not saved: diffusers' default applies when it loads ours
    with pytest.raises(ValueError, match="'dual_cross_attention' = True is not supported"):
        UNet2DConditionModel(**dict(config, dual_cross_attention=True))
    with pytest.raises(TypeError, match="unexpected keyword argument 'attention_heads'"):
        UNet2DConditionModel(**UNET_CONFIGS["sd1"], attention_heads=4)


def test_keys_only_other_block_types_read_are_taken_at_any_value():
    """diffusers builds the same SD model whatever these say (only SimpleCrossAttn/ResnetDownsample blocks read
    them), so ours takes them too and gives diffusers' numbers."""
    inert = dict(resnet_out_scale_factor=2.0, resnet_skip_time_act=True, cross_attention_norm="layer_norm",
                 mid_block_only_cross_attention=True, addition_embed_type_num_heads=8)  # fmt: skip
    reference, ours = paired_models({**UNET_CONFIGS["sd1"], **inert})
    inputs = unet_inputs(UNET_CONFIGS["sd1"])
    with torch.no_grad():
        assert (ours(**inputs).sample - reference(**inputs).sample).abs().max().item() <= 1e-5


@pytest.mark.parametrize("only_cross", [True, (False, True)])
def test_only_cross_attention_leaves_the_mid_block_self_attending(only_cross):
    """The text width equals the last block's, so a mid block built cross-only would load diffusers' weights
    silently and compute something else."""
    config = dict(UNET_CONFIGS["sd1"], only_cross_attention=only_cross, cross_attention_dim=64)
    reference, ours = paired_models(config)
    inputs = unet_inputs(config)
    with torch.no_grad():
        assert (ours(**inputs).sample - reference(**inputs).sample).abs().max().item() <= 1e-5


def test_config_dropout_is_the_resnets_only():
    config = dict(UNET_CONFIGS["sd1"], dropout=0.1)
    reference, ours = (model(**config) for model in (diffusers.UNet2DConditionModel, UNet2DConditionModel))
    active = [{n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0}
              for model in (reference, ours)]  # fmt: skip
    assert active[0] == active[1] and all(".resnets." in name for name in active[1])


def down_block_outputs(model: torch.nn.Module, inputs: dict) -> list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
    """(output, skips) of each down block of one forward."""
    outputs = []
    hooks = [block.register_forward_hook(lambda m, args, out: outputs.append(out)) for block in model.down_blocks]
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    return outputs


ADAPTER_CONFIGS = dict(  # the last one starts with a block that downsamples without attention
    UNET_CONFIGS, plain_first=dict(UNET_CONFIGS["sd1"], down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
)  # fmt: skip


@pytest.mark.parametrize("name", sorted(ADAPTER_CONFIGS))
def test_controlnet_and_t2i_adapter_residuals_match_diffusers(name):
    config = ADAPTER_CONFIGS[name]
    reference, ours = paired_models(config)
    inputs = unet_inputs(config)
    generator = torch.Generator().manual_seed(1)
    blocks = down_block_outputs(ours, inputs)
    with torch.no_grad():  # ControlNet: one residual per skip (conv_in's output and every block's), and the mid's
        skips = [ours.conv_in(inputs["sample"])] + [skip for _, block_skips in blocks for skip in block_skips]
    controlnet = dict(
        down_block_additional_residuals=tuple(torch.randn(s.shape, generator=generator) for s in skips),
        mid_block_additional_residual=torch.randn(blocks[-1][0].shape, generator=generator),
    )
    # a T2I-Adapter's feature has the shape of the block's output, or of its last layer's before a downsampler
    adapter = dict(down_intrablock_additional_residuals=[
        torch.randn((block_skips[len(block.resnets) - 1] if block.has_attention else out).shape,
                    generator=generator) for block, (out, block_skips) in zip(ours.down_blocks, blocks)
    ])  # fmt: skip
    with torch.no_grad():
        plain = ours(**inputs).sample
        for residuals in (controlnet, adapter):
            copies = {k: [t.clone() for t in v] if isinstance(v, list) else v for k, v in residuals.items()}
            expected = reference(**inputs, **copies).sample  # diffusers pops the adapter list: give it a copy
            actual = ours(**inputs, **residuals).sample
            assert (actual - expected).abs().max().item() <= 1e-5
            assert (actual - plain).abs().max().item() > 1e-2  # the residuals were used
    with pytest.raises(ValueError, match="ControlNet residuals come in pairs"):
        ours(**inputs, mid_block_additional_residual=controlnet["mid_block_additional_residual"])
    with pytest.raises(ValueError, match="ControlNet residuals come in pairs"):
        ours(**inputs, down_block_additional_residuals=controlnet["down_block_additional_residuals"])


def test_xformers_missing_gives_an_actionable_error(monkeypatch):
    monkeypatch.setattr(attention_module, "xformers_available", lambda: False)
    model = UNet2DConditionModel(**UNET_CONFIGS["sd1"])
    with pytest.raises(ModuleNotFoundError, match=r"pip install latentdiff\[xformers\]"):
        model.enable_xformers_memory_efficient_attention()


def _fake_xformers(calls: list) -> types.ModuleType:
    """xformers as its docs define `ops.memory_efficient_attention`: (B, M, heads, d) tensors in and out, an additive
    bias of shape (B, heads, M, N), scale 1/√d; its CUTLASS kernel refuses a bias whose strides (but the last, 1) are
    not multiples of 16 bytes. The CPU has no xformers build; this checks our layout glue."""

    def memory_efficient_attention(query, key, value, attn_bias=None, op=None):
        calls.append((query.shape, None if attn_bias is None else attn_bias.shape, op))
        if attn_bias is not None:
            alignment = 128 // torch.finfo(attn_bias.dtype).bits
            assert attn_bias.shape == (*query.shape[:1], query.shape[2], query.shape[1], key.shape[1])
            assert attn_bias.stride(-1) == 1 and all(stride % alignment == 0 for stride in attn_bias.stride()[:-1])
        scores = torch.einsum("bmhd,bnhd->bhmn", query, key) / query.shape[-1] ** 0.5
        if attn_bias is not None:
            scores = scores + attn_bias
        return torch.einsum("bhmn,bnhd->bmhd", scores.softmax(-1), value)

    package = types.ModuleType("xformers")
    package.ops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    return package


def test_xformers_backend_gives_the_sdpa_output(monkeypatch):
    calls = []
    package = _fake_xformers(calls)
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", package.ops)
    monkeypatch.setattr(attention_module, "xformers_available", lambda: True)
    for name in ("sd1", "sd2"):  # conv and linear projections, one head dim and per-block heads, upcast
        config = UNET_CONFIGS[name]
        _, ours = paired_models(config)
        inputs = unet_inputs(config)
        inputs["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
        with torch.no_grad():
            expected = ours(**inputs).sample
            ours.enable_xformers_memory_efficient_attention(attention_op="op")
            calls.clear()
            actual = ours(**inputs).sample
        n_attention = sum(isinstance(m, attention_module.Attention) for m in ours.modules())
        assert len(calls) == n_attention and all(op == "op" for *_, op in calls)
        assert sum(bias is not None for _, bias, _ in calls) == n_attention // 2  # the text masked, cross only
        assert (actual - expected).abs().max().item() <= 1e-5
        ours.disable_xformers_memory_efficient_attention()
        calls.clear()
        with torch.no_grad():
            assert torch.equal(ours(**inputs).sample, expected) and not calls


def test_forward_compiles_without_graph_breaks():
    config = UNET_CONFIGS["sd2"]
    _, model = paired_models(config)
    inputs = unet_inputs(config)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(**inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
