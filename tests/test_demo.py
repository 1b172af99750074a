"""The embedded demo end to end at a micro size (fake npm layout, tiny base), and its quality figure."""

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_emoji import make_fake_package
from PIL import Image
from safetensors import safe_open

from latentdiff import quality
from latentdiff.base import REBUILD_COMMAND, BaseConfig
from latentdiff.demo import DemoConfig, run_demo
from latentdiff.vae_training import VAETrainConfig

MICRO_BASE = BaseConfig(
    vae=VAETrainConfig(block_out_channels=(8, 8, 8), steps=2, batch_size=4, warmup_steps=1),
    text_hidden_size=8,
    unet=dict(
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
        norm_num_groups=8,
    ),
    unet_steps=2,
    batch_size=2,
    lr_warmup_steps=0,
    checkpointing_steps=2,
)
MICRO = DemoConfig(
    train_steps=2,
    batch_size=2,
    lr_warmup_steps=0,
    inference_steps=2,
    quality_prompts=2,
    seen_prompts=("red apple, fruit emoji", "father christmas, dark skin tone, person fantasy emoji"),
    heldout_prompts=("secret flag, country flag emoji",),
    base=MICRO_BASE,
)


@pytest.fixture
def demo_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path / "cache"))
    return dict(base_dir=tmp_path / "base", data_root=tmp_path / "data", package=make_fake_package(tmp_path / "pkg"))


def test_demo_end_to_end_micro(tmp_path, demo_paths):
    from diffusers import StableDiffusionPipeline

    result = run_demo(MICRO, tmp_path / "out", rebuild_base=True, **demo_paths)

    # The base: an fp16 pipeline folder with its build record and the command that rebuilds it.
    base = demo_paths["base_dir"]
    info = json.loads((base / "build_info.json").read_text())
    assert info["unet"]["steps"] == 2 and info["vae"]["steps"] == 2 and info["vae"]["psnr_db"] > 0
    assert REBUILD_COMMAND in (base / "README.md").read_text()
    with safe_open(base / "unet" / "diffusion_pytorch_model.safetensors", "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.float16}

    # The fine-tuned model opens in plain diffusers, with the micro base's architecture.
    pipe = StableDiffusionPipeline.from_pretrained(result.model_dir)
    assert tuple(pipe.unet.config.block_out_channels) == (8, 16)
    assert pipe.text_encoder.dtype == torch.float32 and pipe.text_encoder.config.hidden_size == 8

    # The grid: 2 sections (seen, held out), as wide as the 2 seen prompts.
    with Image.open(result.grid_path) as grid:
        assert grid.mode == "RGB" and grid.width > 2 * 96 and grid.height > 2 * 2 * 96
    saved = json.loads(result.results_path.read_text())
    assert saved["seen"]["count"] == 2 and saved["heldout"]["count"] == 1
    for rates in (saved["seen"], saved["heldout"], saved["heldout_ceiling"]):
        assert all(0 <= rates[k] <= 1 for k in ("name", "subcategory", "chance_name", "chance_subcategory"))
    assert saved["vae_psnr_db"] == result.vae_psnr_db > 0
    assert set(result.seconds) == {"data", "base", "fine-tune", "grid", "quality", "total"}
    assert "latentdiff generate --model" in result.summary()

    # What killed builds left in the cache goes at the next start (the lock says nothing else writes there).
    cache = Path(os.environ["LATENTDIFF_CACHE"])
    leftovers = [cache / "npm" / ".tmp-emoji-datasource-google-16.0.0-x1y2z3w4", cache / ".tmp-base-fp32-a1b2c3d4"]
    for leftover in leftovers:
        (leftover / "package").mkdir(parents=True)
    # A second run reuses data, base and fine-tuned model: nothing is trained again.
    weights = result.model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    again = run_demo(MICRO, tmp_path / "out", **demo_paths)
    assert weights.stat().st_mtime_ns == mtime and not any(p.exists() for p in leftovers)
    assert again.seconds["fine-tune"] < 1.0 and time.perf_counter() - start < result.seconds["total"]
    (result.model_dir / "model_index.json").unlink()  # settings without the model they describe: trained again
    run_demo(MICRO, tmp_path / "out", **demo_paths)
    assert (result.model_dir / "model_index.json").is_file() and weights.stat().st_mtime_ns != mtime

    # With LoRA: adapters on the same base, loaded on top of it for the grid and the figures.
    lora = run_demo(MICRO, tmp_path / "out-lora", lora_rank=2, **demo_paths)
    assert lora.model_dir == tmp_path / "out-lora" / "lora" and lora.grid_path.is_file()
    assert (lora.model_dir / "pytorch_lora_weights.safetensors").is_file()
    assert not (lora.model_dir / "model_index.json").exists()
    assert json.loads(lora.results_path.read_text())["lora_rank"] == 2
    assert f"--lora {lora.model_dir}" in lora.summary()


def test_demo_rejects_prompts_from_the_wrong_split(tmp_path, demo_paths):
    wrong = DemoConfig(seen_prompts=("secret flag, country flag emoji",), base=MICRO_BASE)
    with pytest.raises(ValueError, match="secret flag.*not captions of .*train"):
        run_demo(wrong, tmp_path / "out", **demo_paths)
    with pytest.raises(ValueError, match="Unknown demo preset 'tpu'"):
        run_demo("tpu", tmp_path / "out", **demo_paths)


def test_missing_base_says_how_to_build_it(tmp_path, demo_paths):
    with pytest.raises(FileNotFoundError, match="latentdiff demo --rebuild-base"):
        run_demo(MICRO, tmp_path / "out", **demo_paths)


# The quality figure on known cases.


def color_images(count: int, seed: int = 0) -> torch.Tensor:
    """Distinct flat-coloured images in [-1, 1]."""
    colors = torch.rand(count, 3, 1, 1, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return colors.expand(count, 3, 32, 32).clone()


RECORDS = [dict(name=f"emoji {i}", subcategory=f"group {i % 3}") for i in range(12)]


def test_quality_perfect_model_beats_chance():
    images = color_images(12)
    rates = quality.prompt_following(images + 0.01, RECORDS, images, RECORDS)
    assert rates.name == rates.subcategory == 1.0 and rates.count == 12
    assert rates.chance_name < 0.2 and rates.chance_subcategory < 0.5  # ≈ 1/12 and ≈ 1/3


def test_quality_prompt_blind_model_scores_chance():
    images = color_images(12)
    same_picture = images[:1].expand(12, 3, 32, 32)  # whatever the prompt, the picture of emoji 0
    rates = quality.prompt_following(same_picture, RECORDS, images, RECORDS)
    assert rates.name == pytest.approx(1 / 12) and rates.chance_name == pytest.approx(1 / 12)
    assert rates.subcategory == pytest.approx(1 / 3) and rates.chance_subcategory == pytest.approx(1 / 3)


def test_quality_features_and_errors():
    assert quality.features(torch.zeros(2, 3, 64, 64)).shape == (2, 3 * 16 * 16)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        quality.features(torch.zeros(2, 32, 32))
    with pytest.raises(ValueError, match="one prompt per image"):
        quality.match_rates(RECORDS[:2], RECORDS[:3])
    with pytest.raises(ValueError, match="permutations=0"):  # was ZeroDivisionError
        quality.match_rates(RECORDS[:2], RECORDS[:2], permutations=0)


def test_grid_refuses_an_empty_section():
    from latentdiff.figures import labelled_grid

    for sections in ([], [("seen", [], [], [])]):  # were max() of an empty sequence and a block without images
        with pytest.raises(ValueError, match="at least one section, each with at least one prompt"):
            labelled_grid(sections)


def test_grid_is_as_wide_as_its_widest_section():
    from latentdiff.figures import TILE, labelled_grid

    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    sections = [("seen", ["a", "b", "c"], [red] * 3, [blue] * 3), ("held out", ["d"], [red], [blue])]
    grid = np.asarray(labelled_grid(sections))
    for color in ((255, 0, 0), (0, 0, 255)):  # 4 generated and 4 real images, each whole on the canvas
        assert (grid == color).all(-1).sum() == 4 * TILE * TILE


def test_committed_base_opens_in_plain_diffusers(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from latentdiff.base import default_base_dir, load_base

    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path))
    info = json.loads((default_base_dir() / "build_info.json").read_text())
    fp32 = load_base()
    assert fp32.parent == tmp_path and load_base() == fp32  # made once per version of the weights
    edited = shutil.copytree(default_base_dir(), tmp_path / "edited-base")
    (edited / "README.md").write_text("# reworded prose, the same weights")
    assert load_base(edited) == fp32  # the prose is not part of the version
    pipe = StableDiffusionPipeline.from_pretrained(fp32)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == info["config"]["text_hidden_size"]
    assert pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 32
    image = pipe("red apple, fruit emoji", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_committed_base_readme_is_what_build_base_writes():
    """The card states the latent shape and figures from build_info.json, as `build_base` writes it."""
    from latentdiff.base import base_readme, default_base_dir

    info = json.loads((default_base_dir() / "build_info.json").read_text())
    readme = base_readme(info)
    assert "32×32 images → 4×8×8 latents" in readme  # 3 VAE levels: factor 4
    assert readme == (default_base_dir() / "README.md").read_text()


@pytest.mark.parametrize(
    "threads, cores, busy, expected",
    [(2, 2, 0, 2), (2, 2, 1, 1), (2, 2, 3.5, 1), (64, 64, 32, 32), (4, 64, 40, 4), (8, 16, 10.4, 6)],
)
def test_cpu_training_takes_the_cores_other_processes_leave_free(threads, cores, busy, expected):
    """Threads on cores that others keep busy wait on each other (on 2 cores: 7–12 s a demo step instead of 0.68 s);
    a small share of a big machine, busy elsewhere, keeps its threads."""
    from latentdiff.cpu_threads import threads_for_free_cores

    assert threads_for_free_cores(threads, cores, busy) == expected


@pytest.mark.parametrize("loadavg, omp, threads", [("3.9 3.9 3.9 3/80 9", None, 1), ("3.9 3.9 3.9 1/80 9", None, 2),
                                                   ("3.9 3.9 3.9 3/80 9", "2", 2), (None, None, 2)])  # fmt: skip
def test_demo_threads_follow_the_runnable_count_not_the_lagging_load_average(
    monkeypatch, caplog, tmp_path, loadavg, omp, threads
):
    """The 1-minute load average (3.9 here) still says busy a minute after other work ended; the runnable count (the
    fourth field, reader included) says what runs now. Without /proc/loadavg the threads stay as they are."""
    from latentdiff import cpu_threads

    path = tmp_path / "loadavg"
    if loadavg is not None:
        path.write_text(loadavg)
    monkeypatch.setattr(cpu_threads, "LOADAVG", path)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if omp is not None:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cpu_threads.use_free_cores()
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert ("training with 1 thread(s) instead of 2" in caplog.text) == (threads == 1)


def test_a_second_demo_waits_for_the_cache(tmp_path, monkeypatch, caplog):
    import threading

    from filelock import FileLock

    from latentdiff.cache import cache_lock

    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path))
    (tmp_path / ".tmp-base-fp32-a1b2c3d4").mkdir()  # a killed build's, or the first demo's live write
    first = FileLock(tmp_path / ".lock")
    first.acquire()
    entered = threading.Event()

    def second_demo():
        with cache_lock():
            entered.set()

    with caplog.at_level(logging.WARNING, logger="latentdiff.cache"):
        thread = threading.Thread(target=second_demo)
        thread.start()
        time.sleep(0.5)
        assert not entered.is_set() and (tmp_path / ".tmp-base-fp32-a1b2c3d4").exists()  # the live write is left alone
        first.release()
        thread.join(timeout=30)
    assert entered.is_set() and not (tmp_path / ".tmp-base-fp32-a1b2c3d4").exists()
    assert "Waiting for another latentdiff demo" in caplog.text


def test_an_output_dir_that_is_a_file_is_named_before_anything_runs(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"output_dir .*notes.txt is a file: give a folder"):
        run_demo(output_dir=tmp_path / "notes.txt", base_dir=tmp_path / "no-base", data_root=tmp_path / "no-data")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_train_vae_refuses_images_that_are_not_square_at_the_resolution():
    import torch

    from latentdiff.vae_training import train_vae

    with pytest.raises(ValueError, match=r"images must be \(N, 3, 32, 32\), got \(4, 3, 8, 32\)"):
        train_vae(torch.zeros(4, 3, 8, 32), VAETrainConfig(steps=1, batch_size=2))


def test_train_vae_sees_both_orientations_of_an_image(monkeypatch):
    from diffusers import AutoencoderKL

    from latentdiff.vae_training import train_vae

    image = -torch.ones(1, 3, 16, 16)
    image[..., :8] = 1.0  # left half white: its mirror image differs
    batches = []
    encode = AutoencoderKL.encode

    def recording(self, x, *args, **kwargs):
        if torch.is_grad_enabled():  # training batches, not the final scaling pass
            batches.append(x.detach().clone())
        return encode(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", recording)
    train_vae(image, VAETrainConfig(resolution=16, block_out_channels=(8, 8), steps=1, batch_size=16, warmup_steps=1))
    seen = torch.cat(batches)
    plain, mirrored = ((seen == view).flatten(1).all(1) for view in (image, image.flip(-1)))
    assert len(seen) == 16 and plain.any() and mirrored.any() and (plain | mirrored).all()


def test_train_vae_sets_the_scaling_factor_that_gives_the_unet_unit_variance_latents():
    """As SD's 0.18215 for its VAE: 1 / std of the posterior means of the training images."""
    from latentdiff.components import to_unet_latents
    from latentdiff.vae_training import posterior_means, train_vae

    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    vae = train_vae(images, VAETrainConfig(resolution=16, block_out_channels=(8, 8), steps=1, batch_size=2,
                                           warmup_steps=1))  # fmt: skip
    latents = to_unet_latents(vae, posterior_means(vae, images))
    torch.testing.assert_close(latents.std().item(), 1.0, rtol=0, atol=1e-3)


def test_latentdiff_cache_expands_the_home_folder(monkeypatch, tmp_path):
    """`LATENTDIFF_CACHE=~/x` unexpanded made a folder named `~` in the working folder."""
    from latentdiff.cache import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LATENTDIFF_CACHE", "~/ldcache")
    assert cache_dir() == tmp_path / "ldcache"
