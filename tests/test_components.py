"""load_components: our UNet from any SD folder, safetensors only by default, one clear error when unreachable."""

import shutil

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers import UNet2DConditionModel as DiffusersUNet

from latentdiff.components import ModelComponents, load_components
from latentdiff.models import UNet2DConditionModel
from latentdiff.pipelines import LatentDiffusionPipeline


def test_loads_all_parts_with_our_unet(tiny_pipeline_path):
    parts = load_components(tiny_pipeline_path)
    assert isinstance(parts, ModelComponents)
    assert type(parts.unet) is UNet2DConditionModel
    assert isinstance(parts.scheduler, DDPMScheduler)  # the folder saved a DDIMScheduler: same schedule, DDPM class
    assert parts.scheduler.config.beta_schedule == "scaled_linear" and parts.scheduler.config.beta_end == 0.012
    assert parts.unet.config.cross_attention_dim == parts.text_encoder.config.hidden_size
    assert len(parts.tokenizer) == 49408
    # the saved weights are the ones loaded (diffusers' UNet reads the same file)
    reference = DiffusersUNet.from_pretrained(tiny_pipeline_path, subfolder="unet")
    torch.testing.assert_close(parts.unet.state_dict(), reference.state_dict())


def test_torch_dtype_applies_to_every_model(tiny_pipeline_path):
    parts = load_components(tiny_pipeline_path, torch_dtype=torch.bfloat16)
    assert {parts.vae.dtype, parts.text_encoder.dtype, parts.unet.dtype} == {torch.bfloat16}


def test_pickle_weights_need_allow_pickle(tiny_pipeline_path, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_pipeline_path, folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(folder / "unet", safe_serialization=False)  # writes diffusion_pytorch_model.bin
    with pytest.raises(ValueError, match=r"only pickle weights.*allow_pickle=True"):
        load_components(folder)
    parts = load_components(folder, allow_pickle=True)
    torch.testing.assert_close(parts.unet.state_dict(), unet.state_dict())


def test_a_variant_only_the_unet_has_loads_the_other_parts_plain(tiny_pipeline_path, tmp_path):
    folder = tmp_path / "with_non_ema"  # SD-1.5's layout: non_ema weights for the UNet only
    shutil.copytree(tiny_pipeline_path, folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    with torch.no_grad():
        unet.conv_in.weight.add_(1.0)
    unet.save_pretrained(folder / "unet", variant="non_ema")
    parts = load_components(folder, variant="non_ema")
    torch.testing.assert_close(parts.unet.state_dict(), unet.state_dict())
    torch.testing.assert_close(parts.vae.state_dict(), load_components(folder).vae.state_dict())
    with pytest.raises(FileNotFoundError, match=r"with_non_ema has no 'fp16' weights in any of vae/, text_encoder/"):
        load_components(folder, variant="fp16")


def test_a_hub_variant_fetches_plain_weights_for_the_parts_without_it(tiny_pipeline_path, tmp_path, monkeypatch):
    from huggingface_hub.utils import filter_repo_objects

    import latentdiff.model_folder as model_folder

    repo = tmp_path / "repo"  # a Hub repo with fp16 weights for the UNet only
    shutil.copytree(tiny_pipeline_path, repo)
    UNet2DConditionModel.from_pretrained(repo, subfolder="unet").save_pretrained(repo / "unet", variant="fp16")
    snapshot = tmp_path / "snapshot"

    def snapshot_download(repo_id, allow_patterns, ignore_patterns, **options):
        assert options["token"] == token and options["force_download"] == (token is not None)
        files = [str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(repo / name, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(model_folder, "snapshot_download", snapshot_download)
    token = None
    parts = load_components("org/model", variant="fp16")
    assert isinstance(parts.vae, AutoencoderKL)
    weights = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*.safetensors"))
    assert weights == ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
                       "vae/diffusion_pytorch_model.safetensors"]  # fmt: skip
    token = "hf_private"  # a private model: the pipeline passes the token (and force_download) to the download
    LatentDiffusionPipeline.from_pretrained("org/model", variant="fp16", token=token, force_download=True)


def test_missing_part_is_named(tiny_pipeline_path, tmp_path):
    folder = tmp_path / "no_vae"
    shutil.copytree(tiny_pipeline_path, folder, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(FileNotFoundError, match="has no vae/ folder"):
        load_components(folder)


def test_lora_and_checkpoint_folders_say_how_to_sample_from_them(tiny_pipeline_path, tmp_path):
    lora = tmp_path / "my-lora"
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"my-lora holds LoRA adapters, not a model: .*--model BASE --lora"):
        load_components(lora)
    checkpoint = tmp_path / "run" / "checkpoint-20"
    shutil.copytree(tiny_pipeline_path / "unet", checkpoint / "unet")
    with pytest.raises(FileNotFoundError, match=r"checkpoint-20 is a training checkpoint .* unet=UNet2DConditionModel"):
        load_components(checkpoint)


@pytest.mark.parametrize(
    "name, message",
    [("no-such-org/no-such-model", "is not a local folder, and the Hub could not be reached"),
     ("./not/a/folder/nor/an/id", "'./not/a/folder/nor/an/id' does not exist: give a diffusers pipeline folder")],
)  # fmt: skip
def test_missing_folder_or_unreachable_hub_id_gives_one_clear_error(name, message, tmp_path):
    with pytest.raises(FileNotFoundError, match=message):
        load_components(name, cache_dir=tmp_path, local_files_only=True)


def test_hub_download_fetches_only_the_five_parts_in_one_format():
    from huggingface_hub.utils import filter_repo_objects

    from latentdiff.model_folder import _hub_patterns

    repo = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
            "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors", "tokenizer/merges.txt",
            "safety_checker/model.safetensors", "feature_extractor/preprocessor_config.json",
            "v1-5-pruned.ckpt"]  # fmt: skip

    def fetched(variant, allow_pickle):
        allow, ignore = _hub_patterns(variant, allow_pickle)
        return {f for f in filter_repo_objects(repo, allow_patterns=allow, ignore_patterns=ignore) if "/" in f}

    common = {"unet/config.json", "tokenizer/merges.txt"}
    assert fetched(None, False) == common | {
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    }
    assert fetched("fp16", False) == common | {
        "unet/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.fp16.safetensors"}  # fmt: skip
    assert "unet/diffusion_pytorch_model.bin" in fetched(None, True)


def test_variant_weights_are_found_by_file_name_whole_or_sharded(tmp_path):
    from latentdiff.model_folder import has_variant

    names = {"diffusion_pytorch_model.safetensors": None, "model.fp16.safetensors": "fp16",
             "diffusion_pytorch_model.non_ema-00001-of-00002.safetensors": "non_ema"}  # fmt: skip
    for name, variant in names.items():
        part = tmp_path / name.replace(".", "_")
        part.mkdir()
        (part / name).write_bytes(b"")
        assert [v for v in ("fp16", "non_ema") if has_variant(part, v)] == ([variant] if variant else []), name
    assert not has_variant(tmp_path / "no-such-part", "fp16")
