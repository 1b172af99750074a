"""Our UNet2DConditionModel against diffusers': same keys, same numbers, same files, both directions."""

import json

import diffusers
import pytest
import torch
from conftest import UNET_CONFIGS, unet_inputs

from latentdiff import UNet2DConditionModel
from latentdiff.models import attention as attention_module


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
        del inputs["encoder_attention_mask"]
        assert not torch.allclose(masked, ours(**inputs).sample, atol=1e-3)


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


def test_unsupported_config_value_in_a_checkpoint_names_the_key(tmp_path):
    UNet2DConditionModel(**UNET_CONFIGS["sd1"]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["addition_embed_type"] = "text_time"  # SDXL's extra conditioning
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="addition_embed_type"):
        UNet2DConditionModel.from_pretrained(tmp_path)


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
    ],
)
def test_unsupported_constructor_value_names_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        UNet2DConditionModel(**dict(UNET_CONFIGS["sd1"], **{key: value}))


def test_xformers_missing_gives_an_actionable_error(monkeypatch):
    monkeypatch.setattr(attention_module, "xformers_available", lambda: False)
    model = UNet2DConditionModel(**UNET_CONFIGS["sd1"])
    with pytest.raises(ModuleNotFoundError, match=r"pip install latentdiff\[xformers\]"):
        model.enable_xformers_memory_efficient_attention()


def test_forward_compiles_without_graph_breaks():
    config = UNET_CONFIGS["sd2"]
    _, model = paired_models(config)
    inputs = unet_inputs(config)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(**inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
