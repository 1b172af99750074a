"""diffusers' UNet methods that its pipelines call on ours: the attention-processor API mapped onto our one
attention path (or refused by name), attention slicing and FreeU, each against diffusers' UNet or pipeline."""

import diffusers
import pytest
import torch
from conftest import UNET_CONFIGS, unet_inputs
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    IPAdapterAttnProcessor2_0,
)
from test_unet import paired_models

from latentdiff.models import attention as attention_module
from latentdiff.pipelines import LatentDiffusionPipeline
from latentdiff.tiny import tiny_components

FREEU = dict(s1=0.9, s2=0.2, b1=1.5, b2=1.6)  # the values diffusers documents for SD-1.x


def test_attn_processors_name_every_attention_as_diffusers_does():
    reference, ours = paired_models(UNET_CONFIGS["sd2"])
    processors = ours.attn_processors
    assert processors.keys() == reference.attn_processors.keys()
    assert {type(p) for p in processors.values()} == {AttnProcessor2_0}
    ours.fuse_qkv_projections()
    assert {type(p) for p in ours.attn_processors.values()} == {FusedAttnProcessor2_0}


def test_set_attn_processor_maps_plain_and_fused_processors_onto_our_path():
    reference, ours = paired_models(UNET_CONFIGS["sd1"])
    inputs = unet_inputs(UNET_CONFIGS["sd1"])
    with torch.no_grad():
        expected = reference(**inputs).sample
        ours.set_attn_processor(FusedAttnProcessor2_0())  # what pipe.fuse_qkv_projections() sets after fusing
        assert attention_module.projections_fused(ours)
        assert (ours(**inputs).sample - expected).abs().max().item() <= 1e-5
        ours.set_default_attn_processor()
        assert not attention_module.projections_fused(ours)
        ours.set_attn_processor({name: AttnProcessor() for name in ours.attn_processors})
        assert (ours(**inputs).sample - expected).abs().max().item() <= 1e-5


def test_processors_we_cannot_run_are_refused_by_name():
    _, ours = paired_models(UNET_CONFIGS["sd1"])
    other = IPAdapterAttnProcessor2_0(hidden_size=32, cross_attention_dim=24)
    with pytest.raises(NotImplementedError, match=r"cannot run IPAdapterAttnProcessor2_0.*from_pretrained\(folder"):
        ours.set_attn_processor(other)
    mixed = dict(zip(ours.attn_processors, [AttnProcessor2_0(), FusedAttnProcessor2_0()] * 100))
    with pytest.raises(NotImplementedError, match="One attention path for every module"):
        ours.set_attn_processor(mixed)


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "text_mask"])
@pytest.mark.parametrize("slice_size", ["auto", "max", 3])
def test_attention_slicing_gives_the_same_output_in_slices(slice_size, masked, monkeypatch):
    config = UNET_CONFIGS["sd2"]  # heads 2, 4, 8: "auto" slices differ per block
    _, ours = paired_models(config)
    inputs = unet_inputs(config)
    if masked:  # a different mask per sample: each slice must take its own rows of the bias
        inputs["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = ours(**inputs).sample
        ours.set_attention_slice(slice_size)
        calls = []
        sdpa = torch.nn.functional.scaled_dot_product_attention
        counted = lambda *args, **kwargs: calls.append(1) or sdpa(*args, **kwargs)  # noqa: E731
        monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", counted)
        actual = ours(**inputs).sample
    attentions = len(ours.attn_processors)
    assert len(calls) > attentions  # each attention ran in more than one slice
    assert (actual - expected).abs().max().item() <= 1e-5
    ours.set_attention_slice(None)
    with pytest.raises(ValueError, match="slice_size must be"):
        ours.set_attention_slice(0)


def test_freeu_matches_diffusers_and_switches_off():
    reference, ours = paired_models(UNET_CONFIGS["sd2"])
    inputs = unet_inputs(UNET_CONFIGS["sd2"])
    with torch.no_grad():
        plain = ours(**inputs).sample
        reference.enable_freeu(**FREEU)
        ours.enable_freeu(**FREEU)
        expected, actual = reference(**inputs).sample, ours(**inputs).sample
        assert (actual - expected).abs().max().item() <= 1e-5 and (actual - plain).abs().max().item() > 1e-2
        ours.disable_freeu()
        assert torch.equal(ours(**inputs).sample, plain)


def test_diffusers_pipeline_helpers_drive_our_unet_as_theirs():
    """`fuse_qkv_projections`, `enable_freeu` and `enable_attention_slicing` of diffusers' StableDiffusionPipeline
    and of ours (which has the same mixin) with our UNet give diffusers' UNet's images."""
    parts = tiny_components(0)
    reference_unet = diffusers.UNet2DConditionModel.from_config(parts["unet"].config)
    reference_unet.load_state_dict(parts["unet"].state_dict())
    extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs = StableDiffusionPipeline(**dict(parts, unet=reference_unet), **extra)
    pipes = [theirs, StableDiffusionPipeline(**parts, **extra), LatentDiffusionPipeline(**parts)]

    def images(pipe):
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        return pipe("red apple", num_inference_steps=2, generator=generator, output_type="pt").images

    plain = images(theirs)
    helpers = {"fuse_qkv_projections": lambda p: p.fuse_qkv_projections(),
               "enable_freeu": lambda p: p.enable_freeu(**FREEU),
               "enable_attention_slicing": lambda p: p.enable_attention_slicing("max")}  # fmt: skip
    for name, helper in helpers.items():
        results = []
        for pipe in pipes:
            helper(pipe)
            results.append(images(pipe))
            pipe.unfuse_qkv_projections(), pipe.disable_freeu(), pipe.disable_attention_slicing()
        assert all((r - results[0]).abs().max().item() <= 1e-4 for r in results[1:]), name
        assert ((results[0] - plain).abs().max().item() > 1e-3) == (name == "enable_freeu"), name


def test_setting_one_module_s_processor_is_checked_not_stored():
    """SAG and PAG set `attn.processor` on single modules; a processor we cannot run was ignored silently (SAG then
    failed on a missing attention map), and one that is an nn.Module would have become a child with parameters."""
    _, ours = paired_models(UNET_CONFIGS["sd1"])
    attn = ours.mid_block.attentions[0].transformer_blocks[0].attn1
    assert type(attn.processor) is AttnProcessor2_0
    attn.processor = AttnProcessor()  # what the module computes already: a pipeline putting it back
    other = IPAdapterAttnProcessor2_0(hidden_size=32, cross_attention_dim=24)  # an nn.Module
    with pytest.raises(NotImplementedError, match=r"cannot run IPAdapterAttnProcessor2_0"):
        attn.processor = other
    with pytest.raises(NotImplementedError, match=r"one attention path for all modules: .*set_attn_processor\(Fused"):
        attn.processor = FusedAttnProcessor2_0()
    assert "processor" not in dict(attn.named_children()) and type(attn.processor) is AttnProcessor2_0


def test_a_processor_is_known_by_its_class_not_its_name():
    """A user's class named AttnProcessor2_0 computes something else: it was taken, and ignored."""
    _, ours = paired_models(UNET_CONFIGS["sd1"])
    lookalike = type("AttnProcessor2_0", (), {"__call__": lambda self, attn, hidden_states, *a, **k: hidden_states * 0})
    with pytest.raises(NotImplementedError, match=r"cannot run AttnProcessor2_0"):
        ours.set_attn_processor(lookalike())
    with pytest.raises(NotImplementedError, match=r"cannot run IPAdapterAttnProcessor2_0.*diffusers' UNet"):
        ours._load_ip_adapter_weights([])  # what pipe.load_ip_adapter calls (an AttributeError before)


def test_self_attention_guidance_is_refused_by_name():
    from diffusers import StableDiffusionSAGPipeline

    parts = tiny_components(0)
    extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = StableDiffusionSAGPipeline(**parts, **extra)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(NotImplementedError, match=r"cannot run CrossAttnStoreProcessor"):
        pipe("red apple", sag_scale=0.75, num_inference_steps=2, output_type="pt")


def test_block_wise_lora_scales_give_diffusers_images(tmp_path):
    """`set_adapters(name, {"unet": {"down": ...}})` finds blocks with attention by `hasattr(block, "attentions")`:
    our attention-free blocks had the attribute (None), and every dict of scales failed."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    parts = tiny_components(0)
    reference = diffusers.UNet2DConditionModel.from_config(parts["unet"].config)
    reference.load_state_dict(parts["unet"].state_dict())
    adapted = diffusers.UNet2DConditionModel.from_config(parts["unet"].config)
    adapted.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(adapted))
    extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    images = []
    for unet in (reference, parts["unet"]):
        pipe = StableDiffusionPipeline(**dict(parts, unet=unet), **extra)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(tmp_path, adapter_name="a")
        pipe.set_adapters("a", {"unet": {"down": 0.3, "mid": 0.0, "up": {"block_1": [0.5, 1.0]}}})
        generator = torch.Generator().manual_seed(0)
        images.append(pipe("red apple", num_inference_steps=2, generator=generator, output_type="pt").images)
    assert (images[0] - images[1]).abs().max().item() <= 1e-5


def test_auto_slicing_of_one_head_attention_takes_one_row_at_a_time():
    config = dict(UNET_CONFIGS["sd1"], attention_head_dim=1)  # one head: "auto" (half the heads) must still be ≥ 1
    _, ours = paired_models(config)
    inputs = unet_inputs(config)
    with torch.no_grad():
        expected = ours(**inputs).sample
        ours.set_attention_slice("auto")
        assert (ours(**inputs).sample - expected).abs().max().item() <= 1e-5
