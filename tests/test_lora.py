"""LoRA fine-tuning: only the adapters train, resume is exact, the file is diffusers' format and loads anywhere."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_data import write_caption_folder
from test_training import Recorder, assert_same_weights, make_config, run_straight_and_resumed

import latentdiff.training.models as training_models
from latentdiff.models import UNet2DConditionModel
from latentdiff.pipelines import LatentDiffusionPipeline
from latentdiff.training import TrainConfig, train
from latentdiff.training.lora import add_lora_adapters

LORA_FILE = "pytorch_lora_weights.safetensors"
PROMPT = "a red square"
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def lora_run(tiny_pipeline_path, tmp_path_factory):
    """24 LoRA steps (rank 4; attention, projections and feed-forward of the UNet, and the text encoder) with EMA
    and validation; the trained models are kept by spying on `load_components`, whose first call gives the models
    the loop trains."""
    data = write_caption_folder(tmp_path_factory.mktemp("captions") / "images", n=8)
    loaded = []

    def spy(*args, **kwargs):
        loaded.append(real(*args, **kwargs))
        return loaded[-1]

    real = training_models.load_components
    training_models.load_components = spy
    recorder = Recorder()
    try:
        config = make_config(
            tiny_pipeline_path, data, tmp_path_factory.mktemp("lora") / "out", max_train_steps=24, lora_rank=4,
            lora_target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"],
            learning_rate=2e-2, train_text_encoder=True, use_ema=True, ema_decay=0.5, checkpointing_steps=12,
            validation_prompts=[PROMPT], validation_epochs=100, validation_inference_steps=3,
        )  # fmt: skip
        output_dir = train(config, [recorder])
    finally:
        training_models.load_components = real
    return output_dir, recorder, loaded[0]


def pipeline_images(pipeline, **kwargs) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipeline(PROMPT, num_inference_steps=3, generator=generator, output_type="np", **kwargs).images


def test_only_the_adapters_train_and_the_loss_falls(lora_run, tiny_pipeline_path):
    output_dir, recorder, trained = lora_run
    losses = recorder.losses()
    assert len(losses) == 24 and np.mean(losses[-6:]) < 0.85 * np.mean(losses[:6]), losses
    base = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_path)
    for name in ("unet", "text_encoder"):
        state = getattr(trained, name).state_dict()
        adapters = [k for k in state if "lora_" in k]
        frozen = {k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}
        assert_same_weights(frozen, getattr(base, name).state_dict())  # every base weight bit for bit
        assert any(k.endswith("lora_B.default.weight") and state[k].abs().max() > 0 for k in adapters), name
    saved = load_file(output_dir / LORA_FILE)
    assert saved and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in saved)
    assert {k.split(".")[0] for k in saved} == {"unet", "text_encoder"}
    assert (output_dir / "checkpoint-24" / LORA_FILE).is_file() and not (output_dir / "checkpoint-24" / "unet").exists()
    assert not (output_dir / "model_index.json").exists()
    card = (output_dir / "README.md").read_text()
    assert "- lora" in card and "pipeline.load_lora_weights(" in card and "- lora_rank: 4" in card
    assert (output_dir / "validation" / "step_24" / "0.png").is_file()


def test_the_saved_file_is_the_ema_of_the_adapters(lora_run):
    output_dir = lora_run[0]
    ema = load_file(output_dir / "checkpoint-24" / "ema.safetensors")
    raw = load_file(output_dir / "checkpoint-24" / LORA_FILE)
    final = load_file(output_dir / LORA_FILE)
    assert ema and all("lora_" in k for k in ema)  # the EMA averages the adapters only
    unet_final = {k: v for k, v in final.items() if k.startswith("unet.")}
    assert any(not torch.equal(unet_final[k], raw[k]) for k in unet_final)  # EMA ≠ raw weights
    lora_b = [k for k in ema if "to_q.lora_B" in k][0]
    saved_b = "unet." + lora_b.replace(".default", "")
    assert torch.equal(final[saved_b], ema[lora_b])


def test_text_encoder_adapters_cover_clips_four_attention_projections(lora_run, tiny_pipeline_path):
    """q, k, v and out_proj in every layer, as diffusers' train_text_to_image_lora.py adapts them."""
    saved = load_file(lora_run[0] / LORA_FILE)
    layers = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_path).text_encoder.config.num_hidden_layers
    for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
        adapted = [key for key in saved if key.startswith("text_encoder.") and f".{projection}.lora_A" in key]
        assert len(adapted) == layers, (projection, adapted)


def test_lora_dropout_acts_in_training_only_and_is_saved(tiny_pipeline_path, tmp_path):
    from safetensors import safe_open

    from latentdiff.training.lora import save_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_path / "unet").requires_grad_(False)
    add_lora_adapters(unet, None, rank=2, dropout=0.5)
    with torch.no_grad():  # a trained adapter (B ≠ 0), so that what dropout drops shows in the output
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([10]),
              torch.randn(1, 7, unet.config.cross_attention_dim, generator=generator))  # fmt: skip
    with torch.no_grad():
        assert not torch.equal(unet.train()(*inputs).sample, unet(*inputs).sample)
        assert torch.equal(unet.eval()(*inputs).sample, unet(*inputs).sample)
    with safe_open(save_lora(tmp_path, unet), framework="pt") as handle:
        assert json.loads(handle.metadata()["lora_adapter_metadata"])["unet.lora_dropout"] == 0.5


def test_adapter_loads_into_diffusers_with_the_same_images(lora_run, tiny_pipeline_path):
    from diffusers import StableDiffusionPipeline

    output_dir = lora_run[0]
    images = {}
    for name, pipeline_class in (("ours", LatentDiffusionPipeline), ("diffusers", StableDiffusionPipeline)):
        pipeline = pipeline_class.from_pretrained(tiny_pipeline_path)
        images[f"{name}-base"] = pipeline_images(pipeline)
        pipeline.load_lora_weights(output_dir)
        images[name] = pipeline_images(pipeline)
        images[f"{name}-scale0"] = pipeline_images(pipeline, cross_attention_kwargs={"scale": 0.0})
        pipeline.set_adapters(pipeline.get_active_adapters(), adapter_weights=0.5)
        images[f"{name}-half"] = pipeline_images(pipeline)
        for scale in (0.0, 2.0):  # a call's scale is for that call only: the weight 0.5 stays for later calls
            pipeline_images(pipeline, cross_attention_kwargs={"scale": scale})
            assert pipeline.lora_scale == scale  # as diffusers: scales text-encoder adapters loaded later
            images[f"{name}-half-after-{scale}"] = pipeline_images(pipeline)
    for scale in (0.0, 2.0):  # diffusers' own pipeline loses the weight after a scale of 0
        np.testing.assert_array_equal(images[f"ours-half-after-{scale}"], images["ours-half"])
    assert np.abs(images["ours"] - images["ours-base"]).max() > 1e-2  # the adapter changes the images
    np.testing.assert_allclose(images["ours"], images["diffusers"], atol=1e-4)
    np.testing.assert_allclose(images["ours-half"], images["diffusers-half"], atol=1e-4)
    np.testing.assert_allclose(images["ours-base"], images["diffusers-base"], atol=1e-4)
    np.testing.assert_allclose(images["ours-scale0"], images["ours-base"], atol=1e-6)  # scale 0 is the base model
    assert np.abs(images["ours-half"] - images["ours"]).max() > 1e-3


def test_the_final_validation_image_is_sampled_with_the_saved_adapters(lora_run, tiny_pipeline_path):
    """The run's last validation samples the base model with the adapters it saved, as users will load them."""
    from accelerate import Accelerator
    from PIL import Image

    from latentdiff.training.validation import generate_validation_images

    output_dir = lora_run[0]
    options = json.loads((output_dir / "training_config.json").read_text())
    pipeline = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_path)

    def sample() -> np.ndarray:
        (image,) = generate_validation_images(
            pipeline, [PROMPT], options["seed"], options["validation_inference_steps"],
            options["validation_guidance_scale"], options["resolution"], Accelerator(cpu=True),
        )  # fmt: skip
        return np.asarray(image, dtype=np.int16)

    base = sample()
    pipeline.load_lora_weights(output_dir)
    with Image.open(output_dir / "validation" / "step_24" / "0.png") as saved:
        validation = np.asarray(saved.convert("RGB"), dtype=np.int16)
    assert np.abs(validation - sample()).max() <= 1
    assert np.abs(validation - base).max() > 5


def test_pickle_lora_files_need_allow_pickle(lora_run, tiny_pipeline_path, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(load_file(lora_run[0] / LORA_FILE), pickled / "pytorch_lora_weights.bin")
    pipeline = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_path)
    with pytest.raises(OSError, match="pytorch_lora_weights.safetensors"):
        pipeline.load_lora_weights(pickled)
    with pytest.raises(ValueError, match=r"weight_name='pytorch_lora_weights.bin' is a pickle file.*allow_pickle=True"):
        pipeline.load_lora_weights(pickled, weight_name="pytorch_lora_weights.bin")
    pipeline.load_lora_weights(pickled, allow_pickle=True)
    pickle_images = pipeline_images(pipeline)
    pipeline.unload_lora_weights()
    pipeline.load_lora_weights(lora_run[0])
    np.testing.assert_array_equal(pickle_images, pipeline_images(pipeline))


def test_fused_equals_unfused(lora_run, tiny_pipeline_path):
    pipeline = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_path)
    pipeline.load_lora_weights(lora_run[0])
    unfused = pipeline_images(pipeline)
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()  # fused into the base weights: the adapters can go
    fused = pipeline_images(pipeline)
    np.testing.assert_allclose(fused, unfused, atol=1e-4)
    assert not any("lora" in k for k in pipeline.unet.state_dict())


def test_lora_resume_is_exact(tiny_pipeline_path, tmp_path):
    """4 steps straight == 2 steps, stop, resume from checkpoint-2, 2 more: same losses, adapters and EMA."""
    data = write_caption_folder(tmp_path / "data", n=8)
    run_straight_and_resumed(tiny_pipeline_path, data, tmp_path, lora_rank=2, lora_alpha=4.0, caption_dropout=0.3,
                             gradient_accumulation_steps=2, use_ema=True, ema_decay=0.9, train_text_encoder=True)
    for name in (f"checkpoint-4/{LORA_FILE}", "checkpoint-4/ema.safetensors", LORA_FILE):
        assert_same_weights(load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name))


def test_resume_with_another_rank_or_without_lora_is_refused(tiny_pipeline_path, tmp_path):
    data = write_caption_folder(tmp_path / "data", n=4)
    train(make_config(tiny_pipeline_path, data, tmp_path / "out", max_train_steps=1, lora_rank=2, checkpointing_steps=1))
    config = make_config(tiny_pipeline_path, data, tmp_path / "out", max_train_steps=2, lora_rank=4,
                         resume_from_checkpoint="latest")  # fmt: skip
    with pytest.raises(ValueError, match=r"was trained with --lora_rank 2, this run has 4"):
        train(config)
    config = make_config(tiny_pipeline_path, data, tmp_path / "out", max_train_steps=2, lora_rank=2, lora_alpha=8.0,
                         resume_from_checkpoint="latest")  # fmt: skip
    with pytest.raises(ValueError, match=r"was trained with --lora_alpha 2, this run has 8.0"):
        train(config)
    config = make_config(tiny_pipeline_path, data, tmp_path / "out", max_train_steps=2, lora_rank=2, lora_dropout=0.1,
                         resume_from_checkpoint="latest")  # fmt: skip
    with pytest.raises(ValueError, match=r"was trained with --lora_dropout 0.0, this run has 0.1"):
        train(config)
    full = make_config(tiny_pipeline_path, data, tmp_path / "out", max_train_steps=2, resume_from_checkpoint="latest")
    train(make_config(tiny_pipeline_path, data, tmp_path / "te", max_train_steps=1, lora_rank=2, checkpointing_steps=1,
                      train_text_encoder=True))  # fmt: skip
    without_text_encoder = make_config(tiny_pipeline_path, data, tmp_path / "te", max_train_steps=2, lora_rank=2,
                                       resume_from_checkpoint="latest")  # fmt: skip
    with pytest.raises(ValueError, match=r"holds text-encoder adapters too: resume with --train_text_encoder"):
        train(without_text_encoder)
    with pytest.raises(FileNotFoundError, match=r"checkpoint-1/unet is missing: this checkpoint holds LoRA adapters"):
        train(full)


def test_unknown_target_module_is_named(tiny_pipeline_path, tmp_path):
    data = write_caption_folder(tmp_path / "data", n=4)
    config = make_config(tiny_pipeline_path, data, tmp_path / "out", lora_rank=2, lora_target_modules=["to_qq"])
    with pytest.raises(ValueError, match=r"--lora_target_modules to_qq: .*to_q, to_k, to_v and to_out.0"):
        train(config)


def test_a_rank_beyond_the_adapted_layers_is_named(tiny_pipeline_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_path / "unet").requires_grad_(False)
    widest = max(unet.config.block_out_channels)  # the attention projections are channels × channels
    with pytest.raises(ValueError, match=rf"--lora_rank 100000 is more than .* = {widest}\): .* 4 to 128"):
        add_lora_adapters(unet, None, rank=100000)  # peft builds it (a big enough rank fails allocating, with a traceback)
    with pytest.raises(ValueError, match=rf"--lora_rank {widest + 1} is more than"):
        add_lora_adapters(unet, None, rank=widest + 1)
    add_lora_adapters(unet, None, rank=widest)
    assert {module.lora_A["default"].out_features for name, module in unet.named_modules() if name.endswith("to_q")} == {widest}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(lora_rank=0), r"--lora_rank must be an integer ≥ 1, got 0"),
        (dict(lora_alpha=8.0), r"--lora_alpha is a LoRA option: add --lora_rank"),
        (dict(lora_rank=4, lora_alpha=-1.0), r"--lora_alpha must be > 0"),
        (dict(lora_rank=4, lora_dropout=1.0), r"--lora_dropout must be in \[0, 1\)"),
        (dict(lora_rank=4, lora_target_modules=[" , "]), r"--lora_target_modules is empty"),
    ],
)
def test_lora_option_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", **overrides)


def test_lora_with_unet_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"--lora_rank .* cannot be combined with --unet_config"):
        TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", lora_rank=4,
                    unet_config=str(tmp_path / "config.json"))  # fmt: skip


def test_target_modules_parse_from_the_command_line():
    from latentdiff.training import parse_train_args

    config = parse_train_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--lora_rank", "8",
                               "--lora_target_modules", "to_q,to_v", "ff.net.2"])  # fmt: skip
    assert config.lora_rank == 8 and config.lora_target_modules == ["to_q", "to_v", "ff.net.2"]


def test_gradient_checkpointing_and_bf16_train_the_fp32_adapters(tiny_pipeline_path, tmp_path):
    data = write_caption_folder(tmp_path / "data", n=4)
    runs = {}
    for checkpointing in (False, True):
        recorder = Recorder()
        config = make_config(tiny_pipeline_path, data, tmp_path / f"gc-{checkpointing}", max_train_steps=3,
                             lora_rank=2, mixed_precision="bf16", gradient_checkpointing=checkpointing)  # fmt: skip
        runs[checkpointing] = (load_file(train(config, [recorder]) / LORA_FILE), recorder.losses())
    (plain, plain_losses), (checkpointed, checkpointed_losses) = runs[False], runs[True]
    assert all(t.dtype == torch.float32 for t in plain.values())
    np.testing.assert_allclose(checkpointed_losses, plain_losses, rtol=1e-5)
    assert any(k.endswith("lora_B.weight") and t.abs().max() > 0 for k, t in checkpointed.items())  # gradients arrived
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-4, atol=1e-6)


def _read_images(paths) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(path)) for path in paths]).astype(np.int16)


def test_generate_cli_with_lora_and_scale(lora_run, tiny_pipeline_path, tmp_path, capsys):
    from latentdiff.cli import main

    def generate(name: str, *extra: str) -> np.ndarray:
        argv = ["generate", "--model", str(tiny_pipeline_path), "--prompt", PROMPT, "--steps", "3", "--device", "cpu",
                "--output-dir", str(tmp_path / name), *extra]  # fmt: skip
        assert main(argv) == 0
        return _read_images(sorted((tmp_path / name).glob("000-*.png")))

    output_dir = lora_run[0]
    base = generate("base")
    adapted = generate("lora", "--lora", str(output_dir))
    as_file = generate("file", "--lora", str(output_dir / LORA_FILE), "--lora-scale", "1.0")
    half = generate("bf16", "--lora", str(output_dir), "--dtype", "bf16")
    assert half.shape == adapted.shape and 0 < np.abs(half - adapted).mean() < 8  # bf16 ran: near, not equal
    off = generate("off", "--lora", str(output_dir), "--lora-scale", "0")
    assert np.abs(adapted - base).max() > 2  # 8-bit levels
    assert np.array_equal(as_file, adapted) and np.array_equal(off, base)
    # a named file is the one loaded, also beside a pytorch_lora_weights.safetensors of other adapters
    (tmp_path / "two").mkdir()
    shutil.copy(output_dir / "checkpoint-12" / LORA_FILE, tmp_path / "two" / LORA_FILE)  # step 12's raw adapters
    shutil.copy(output_dir / LORA_FILE, tmp_path / "two" / "final.safetensors")
    assert np.abs(generate("two", "--lora", str(tmp_path / "two")) - adapted).max() > 2  # the folder's default file
    assert np.array_equal(generate("named", "--lora", str(tmp_path / "two" / "final.safetensors")), adapted)

    capsys.readouterr()
    assert main(["generate", "--model", str(tiny_pipeline_path), "--prompt", "x", "--lora", str(tmp_path)]) == 2
    assert f"error: --lora {tmp_path} holds no {LORA_FILE}" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_pipeline_path), "--prompt", "x", "--lora", "./missing"]) == 2
    assert "error: --lora ./missing does not exist" in capsys.readouterr().err
    # checked before the base model loads: a typo costs no model load (here the model is missing too)
    assert main(["generate", "--model", str(tmp_path / "no-model"), "--prompt", "x", "--lora", "./missing"]) == 2
    assert "error: --lora ./missing does not exist" in capsys.readouterr().err
    torch.save(load_file(output_dir / LORA_FILE), tmp_path / "adapters.bin")
    assert main(["generate", "--model", str(tiny_pipeline_path), "--prompt", "x", "--lora",
                 str(tmp_path / "adapters.bin")]) == 2  # fmt: skip
    assert "adapters.bin is not a .safetensors file: only safetensors LoRA files load here" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_pipeline_path), "--prompt", "x", "--lora", str(tmp_path)]) == 2
    assert f"--lora {tmp_path} holds only pickle weights (adapters.bin)" in capsys.readouterr().err  # a folder of it
    (tmp_path / "not-lora.safetensors").write_bytes(b"junk")
    assert main(["generate", "--model", str(tiny_pipeline_path), "--prompt", "x", "--lora",
                 str(tmp_path / "not-lora.safetensors")]) == 2  # fmt: skip
    assert "not-lora.safetensors is not a LoRA weights file (" in capsys.readouterr().err
    from latentdiff.tiny import save_tiny_pipeline

    other_base = save_tiny_pipeline(tmp_path / "other", unet_channels=(16, 32), text_hidden_size=16)
    assert main(["generate", "--model", str(other_base), "--prompt", "x", "--lora", str(output_dir)]) == 2
    error = capsys.readouterr().err
    assert f"error: --lora {output_dir} does not fit this model (size mismatch for " in error
    assert "Traceback" not in error


def test_lora_name_that_is_no_path_and_an_unreachable_hub_is_one_line(tiny_pipeline_path, monkeypatch, capsys):
    """A mistyped run folder (no ./) reads as a Hub id; with the Hub unreachable that is one error line."""
    import huggingface_hub

    from latentdiff.cli import main

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    argv = ["generate", "--model", str(tiny_pipeline_path), "--prompt", "x", "--lora", "sd-naruto-lra"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "error: --lora sd-naruto-lra is no local folder or file, and the Hub did not give it: Could not reach " \
        "the Hub to download the LoRA sd-naruto-lra" in error and "Traceback" not in error  # fmt: skip


def test_diffusers_script_lora_loads_and_mixes_with_ours(lora_run, tiny_pipeline_path, tmp_path):
    """An adapter made the way diffusers' train_text_to_image_lora.py saves it (its UNet, `lora.down`/`lora.up` key
    names) loads into our pipeline, alone and mixed with ours, with the images diffusers' pipeline gives."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    reference = StableDiffusionPipeline.from_pretrained(tiny_pipeline_path)
    torch.manual_seed(0)
    reference.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                          target_modules=["to_k", "to_q", "to_v", "to_out.0"]))  # fmt: skip
    with torch.no_grad():  # a trained-looking adapter: B ≠ 0
        for name, parameter in reference.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.2)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(reference.unet))
    assert any(".lora.down.weight" in k for k in layers)  # the old naming of diffusers' script
    StableDiffusionPipeline.save_lora_weights(tmp_path / "theirs", unet_lora_layers=layers)

    images = {}
    for name, pipeline_class in (("ours", LatentDiffusionPipeline), ("diffusers", StableDiffusionPipeline)):
        pipeline = pipeline_class.from_pretrained(tiny_pipeline_path)
        base = pipeline_images(pipeline)
        pipeline.load_lora_weights(tmp_path / "theirs", adapter_name="theirs")
        images[f"{name}-theirs"] = pipeline_images(pipeline)
        pipeline.load_lora_weights(lora_run[0], adapter_name="ours")
        pipeline.set_adapters(["theirs", "ours"], adapter_weights=[0.7, 0.5])
        images[f"{name}-mixed"] = pipeline_images(pipeline)
        assert np.abs(images[f"{name}-theirs"] - base).max() > 1e-2
    np.testing.assert_allclose(images["ours-theirs"], images["diffusers-theirs"], atol=1e-4)
    np.testing.assert_allclose(images["ours-mixed"], images["diffusers-mixed"], atol=1e-4)
    assert np.abs(images["ours-mixed"] - images["ours-theirs"]).max() > 1e-3
