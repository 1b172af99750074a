"""diffusers' LoRA adapter API (PeftAdapterMixin) on our UNet: same adapter keys and the same numbers as on theirs."""

import pytest
import torch
from conftest import UNET_CONFIGS, unet_inputs
from test_unet import paired_models

peft = pytest.importorskip("peft", reason="LoRA needs peft (the [test] extra installs it)")
from peft.utils import get_peft_model_state_dict  # noqa: E402

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def with_lora(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Add a rank-4 adapter whose B matrices are random (peft's default zeros would make it a no-op)."""
    torch.manual_seed(seed)
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights="gaussian"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    return model


def test_lora_adapter_has_diffusers_keys_and_numbers():
    config = UNET_CONFIGS["sd1"]
    reference, ours = paired_models(config)
    inputs = unet_inputs(config)
    with torch.no_grad():
        base = ours(**inputs).sample
    with_lora(reference)
    with_lora(ours)
    reference_adapter = get_peft_model_state_dict(reference)
    ours_adapter = get_peft_model_state_dict(ours)
    assert sorted(ours_adapter) == sorted(reference_adapter) and len(ours_adapter) > 0
    ours.load_state_dict(reference.state_dict())  # the same random adapter weights in both
    with torch.no_grad():
        adapted = ours(**inputs).sample
        assert (adapted - reference(**inputs).sample).abs().max().item() <= 1e-5
        assert not torch.allclose(adapted, base, atol=1e-4)
        # scale 0 for one call is the base model; disabling the adapter too
        assert torch.allclose(ours(**inputs, cross_attention_kwargs={"scale": 0.0}).sample, base, atol=1e-6)
        half = ours(**inputs, cross_attention_kwargs={"scale": 0.5}).sample
        assert torch.allclose(half, reference(**inputs, cross_attention_kwargs={"scale": 0.5}).sample, atol=1e-5)
        ours.disable_adapters()
        assert torch.allclose(ours(**inputs).sample, base, atol=1e-6)


def test_only_the_lora_scale_is_accepted_in_cross_attention_kwargs():
    config = UNET_CONFIGS["sd1"]
    _, ours = paired_models(config)
    with pytest.raises(ValueError, match="other than the LoRA 'scale'"):
        ours(**unet_inputs(config), cross_attention_kwargs={"gligen": {}})

