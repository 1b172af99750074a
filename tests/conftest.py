"""Shared tiny configurations and fixtures: built once per test session, reused everywhere."""

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

# Three UNet configs that cover the SD-1.x / SD-2.x variants of the interop contract (DESIGN.md).
UNET_CONFIGS = {
    # SD-1.x: conv proj_in/out, one head count for all blocks.
    "sd1": dict(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=4,
        norm_num_groups=8,
    ),
    # SD-2.x: linear projection, per-block head counts, upcast attention.
    "sd2": dict(
        sample_size=8,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=8,
    ),
    # AdaGN time injection, class labels, the other sinusoid convention, LDM-style downsample padding.
    "scale_shift_class": dict(
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=2,
        norm_num_groups=8,
        resnet_time_scale_shift="scale_shift",
        num_class_embeds=10,
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
    ),
}


@pytest.fixture(params=sorted(UNET_CONFIGS))
def unet_config(request) -> dict:
    """Each tiny UNet config in turn, with a ``name`` for messages."""
    return dict(UNET_CONFIGS[request.param])


def unet_inputs(config: dict, batch: int = 2, seed: int = 0, size: int | None = None) -> dict:
    """Deterministic forward inputs for a UNet config (class labels when it is class-conditional)."""
    generator = torch.Generator().manual_seed(seed)
    size = size or config["sample_size"]
    inputs = dict(
        sample=torch.randn(batch, 4, size, size, generator=generator),
        timestep=torch.tensor([10, 900][:batch] + [500] * max(batch - 2, 0)),
        encoder_hidden_states=torch.randn(batch, 7, config["cross_attention_dim"], generator=generator),
    )
    if config.get("num_class_embeds"):
        inputs["class_labels"] = torch.arange(batch) % config["num_class_embeds"]
    return inputs


def load_benchmark(name: str) -> ModuleType:
    """A script of benchmarks/ as a module (they are scripts, not a package: each puts its folder on sys.path)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def clip_tokenizer():
    """Stable Diffusion's CLIP tokenizer, built once from open-clip-torch's BPE file (no download)."""
    from latentdiff.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer()


@pytest.fixture(scope="session")
def tiny_pipeline_path(tmp_path_factory) -> Path:
    """A tiny random SD-style pipeline folder (32×32 images, DDIM), saved once; load it with `from_pretrained`
    exactly as a user loads a Hub id. Treat it as read-only: copy it before changing files."""
    from latentdiff.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_pipeline") / "tiny-sd", seed=0)


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("single_thread")`): the tiny
    models train several times faster without thread hand-offs on the shared 2-core machines, and a subprocess
    started with OMP_NUM_THREADS=1 computes bit for bit the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
