"""fuse_qkv_projections(): one GEMM for Q, K, V (self) and K, V (cross), same numbers, diffusers' keys throughout."""

import copy

import diffusers
import pytest
import torch
from conftest import UNET_CONFIGS, unet_inputs
from safetensors.torch import load_file
from test_unet import paired_models

from latentdiff import UNet2DConditionModel
from latentdiff.models.attention import Attention, projections_fused

pytestmark = pytest.mark.usefixtures("single_thread")


def attentions(model: torch.nn.Module) -> list[Attention]:
    return [module for module in model.modules() if isinstance(module, Attention)]


def output(model: torch.nn.Module, config: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**unet_inputs(config)).sample


def count_projection_calls(model: torch.nn.Module, config: dict) -> int:
    """How many times the separate `to_k` modules run in one forward (0 when every K comes from a fused GEMM)."""
    calls = []
    handles = [a.to_k.register_forward_hook(lambda *_: calls.append(1)) for a in attentions(model)]
    output(model, config)
    for handle in handles:
        handle.remove()
    return len(calls)


def assert_shares_storage(model: torch.nn.Module) -> None:
    """Every fused projection's weight is a view of its attention's fused weight, rows in order."""
    for attention in attentions(model):
        rows = 0
        for projection in attention.fusable_projections:
            assert projection.weight.data_ptr() == attention.fused_weight[rows].data_ptr()
            rows += projection.weight.shape[0]
        assert rows == attention.fused_weight.shape[0]


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_fused_output_equals_unfused(name):
    config = UNET_CONFIGS[name]
    _, model = paired_models(config)
    expected = output(model, config)
    assert count_projection_calls(model, config) == len(attentions(model))
    model.fuse_qkv_projections()
    assert projections_fused(model)
    assert count_projection_calls(model, config) == 0  # self- and cross-attention K come from the fused GEMMs
    assert_shares_storage(model)
    block, inner = model.down_blocks[0].attentions[0].transformer_blocks[0], config["block_out_channels"][0]
    assert block.attn1.fused_weight.shape == (3 * inner, inner)  # [W_q; W_k; W_v]
    assert block.attn2.fused_weight.shape == (2 * inner, config["cross_attention_dim"])  # [W_k; W_v]
    assert (output(model, config) - expected).abs().max().item() <= 1e-5


def test_state_dict_and_saved_checkpoint_stay_diffusers(tmp_path):
    config = UNET_CONFIGS["sd1"]
    reference, model = paired_models(config)
    shapes = {k: v.shape for k, v in reference.state_dict().items()}
    model.fuse_qkv_projections()
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    model.save_pretrained(tmp_path)
    assert {k: v.shape for k, v in load_file(tmp_path / "diffusion_pytorch_model.safetensors").items()} == shapes
    loaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path).eval()
    loaded.load_state_dict(load_file(tmp_path / "diffusion_pytorch_model.safetensors"), strict=True)
    assert (output(loaded, config) - output(reference, config)).abs().max().item() == 0
    assert (output(model, config) - output(loaded, config)).abs().max().item() <= 1e-5


def test_loading_weights_into_a_fused_model_reaches_the_fused_product():
    config = UNET_CONFIGS["sd2"]
    _, model = paired_models(config, seed=0)
    other, unfused = paired_models(config, seed=1)
    model.fuse_qkv_projections()
    model.load_state_dict(other.state_dict(), strict=True)  # writes into the views, so into the fused weights
    assert (output(model, config) - output(unfused, config)).abs().max().item() <= 1e-5
    _, model = paired_models(config, seed=0)
    model.fuse_qkv_projections()
    model.load_state_dict(other.state_dict(), strict=True, assign=True)  # new tensors: the fused weights are rebuilt
    assert_shares_storage(model)
    assert (output(model, config) - output(unfused, config)).abs().max().item() <= 1e-5


def test_copies_and_dtype_conversion_keep_the_weights_shared():
    config = UNET_CONFIGS["sd1"]
    _, original = paired_models(config)
    other, unfused = paired_models(config, seed=1)
    original.fuse_qkv_projections()
    model = copy.deepcopy(original)  # Parameter.__deepcopy__ clones each weight on its own
    assert_shares_storage(model)
    with torch.no_grad():  # in-place writes, as an EMA swap does them
        for name, param in model.named_parameters():
            param.copy_(other.state_dict()[name])
    assert (output(model, config) - output(unfused, config)).abs().max().item() <= 1e-5
    model.double()
    unfused.double()
    assert_shares_storage(model)
    assert all(a.fused_weight.dtype == torch.float64 for a in attentions(model))
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in unet_inputs(config).items()}
    with torch.no_grad():
        assert torch.allclose(model(**inputs).sample, unfused(**inputs).sample, atol=1e-10)


def test_training_a_fused_model_gives_the_unfused_gradients_and_steps():
    """Under autograd the fused product concatenates the parameters: their gradients fill, and an optimizer's
    in-place step is what the next no-grad (stored-weight) forward sees."""
    config = UNET_CONFIGS["sd2"]
    _, fused = paired_models(config)
    _, unfused = paired_models(config)
    fused.fuse_qkv_projections()
    for model in (fused, unfused):
        model(**unet_inputs(config)).sample.square().mean().backward()
    for (name, p_fused), p_unfused in zip(fused.named_parameters(), unfused.parameters()):
        assert p_fused.grad is not None and torch.allclose(p_fused.grad, p_unfused.grad, atol=1e-6), name
    before = output(fused, config)
    torch.optim.SGD(fused.parameters(), lr=1.0).step()
    assert_shares_storage(fused)
    after = output(fused, config)
    assert (after - before).abs().max().item() > 1e-3
    fused.unfuse_qkv_projections()  # the same weights through the separate projections
    assert (after - output(fused, config)).abs().max().item() <= 1e-5


def test_unfuse_restores_separate_projections_and_fusing_twice_is_harmless():
    config = UNET_CONFIGS["sd1"]
    _, model = paired_models(config)
    expected = output(model, config)
    model.fuse_qkv_projections()
    model.fuse_qkv_projections()
    assert_shares_storage(model)
    assert (output(model, config) - expected).abs().max().item() <= 1e-5
    model.unfuse_qkv_projections()
    model.unfuse_qkv_projections()
    assert not projections_fused(model)
    assert count_projection_calls(model, config) == len(attentions(model))
    for attention in attentions(model):
        storages = {p.weight.untyped_storage().data_ptr() for p in (attention.to_q, attention.to_k, attention.to_v)}
        assert len(storages) == 3
    assert torch.equal(output(model, config), expected)


def test_lora_and_fused_projections_exclude_each_other(tmp_path):
    peft = pytest.importorskip("peft", reason="LoRA needs peft (the [test] extra installs it)")
    from test_unet_lora import with_lora

    config = UNET_CONFIGS["sd1"]
    _, model = paired_models(config)
    with_lora(model)
    adapted = output(model, config)
    with pytest.raises(ValueError, match=r"LoRA adapter is attached.*fuse_lora\(\)"):
        model.fuse_qkv_projections()
    assert not projections_fused(model)  # refused before fusing anything
    # the advice in the message works: merge the adapter, drop the LoRA layers, then fuse
    model.fuse_lora()
    model.unload_lora()
    model.fuse_qkv_projections()
    assert (output(model, config) - adapted).abs().max().item() <= 1e-5

    _, fused = paired_models(config)
    fused.fuse_qkv_projections()
    lora_config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    with pytest.raises(ValueError, match=r"unfuse_qkv_projections\(\) before adding"):
        fused.add_adapter(lora_config)
    with pytest.raises(ValueError, match=r"unfuse_qkv_projections\(\) before adding"):
        fused.load_lora_adapter({}, prefix=None)
    assert all(type(a.to_q) is torch.nn.Linear for a in attentions(fused))
    fused.unfuse_qkv_projections()
    fused.add_adapter(lora_config)
    assert not all(type(a.to_q) is torch.nn.Linear for a in attentions(fused))


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_fused_forward_compiles_without_graph_breaks(grad):
    config = UNET_CONFIGS["sd2"]
    torch.manual_seed(0)
    model = UNet2DConditionModel(**config).eval()
    model.fuse_qkv_projections()
    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        explanation = torch._dynamo.explain(model)(**unet_inputs(config))
    assert explanation.graph_break_count == 0, explanation.break_reasons
