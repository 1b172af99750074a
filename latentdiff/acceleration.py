"""Speed levers for a UNet or a text-to-image pipeline (ours or diffusers'), each one switchable.

`benchmarks/gpu.py` measures each lever against diffusers on a GPU (docs/performance.md lists what each is
expected to buy). The helpers work on diffusers' `UNet2DConditionModel` and pipelines as well as ours, so a
comparison gives both models the same treatment.

Compilation is done *in place* (`nn.Module.compile`): the module keeps its class, config and state-dict keys
(`torch.compile(module)` would wrap it and prefix every key with `_orig_mod.`), so a compiled UNet still saves,
loads and sits in a pipeline like the eager one.
"""

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

# torch.compile's inductor modes: "reduce-overhead" adds CUDA graphs (one launch per UNet call instead of ~1,000
# kernel launches), "max-autotune" also benchmarks GEMM/conv configurations while compiling (minutes).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ATTENTION_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
# Dense bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s; first substring of the device name wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0),
                    ("L4", 121.0))  # fmt: skip


def compile_unet(
    unet: nn.Module, mode: str = "default", fullgraph: bool = True, backend: str | Callable = "inductor"
) -> nn.Module:
    r"""Compile a UNet's forward in place with static shapes; returns the same module.

    `fullgraph=True` turns any graph break into an error instead of a silent slow path: our UNet compiles as
    one graph. Shapes are static (`dynamic=False`): a sampling loop calls the UNet with one shape, and a new
    shape (batch, resolution) compiles once more. Pass the timestep as a tensor: a Python number is baked into
    the graph and every new value recompiles.

    Args:
        unet (`nn.Module`): latentdiff's or diffusers' `UNet2DConditionModel` (any `nn.Module` works).
        mode (`str`, *optional*, defaults to `"default"`): One of `COMPILE_MODES` (inductor only).
        fullgraph (`bool`, *optional*, defaults to `True`): Fail on graph breaks.
        backend (`str` or `Callable`, *optional*, defaults to `"inductor"`): A `torch.compile` backend;
            `"aot_eager"` traces forward and backward without generating kernels (a quick readiness check).
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"Unknown compile mode {mode!r}: use one of {COMPILE_MODES}.")
    if backend != "inductor" and mode != "default":
        raise ValueError(f"mode={mode!r} is an inductor option; with backend={backend!r} leave mode='default'.")
    options: dict[str, Any] = {"mode": None if mode == "default" else mode} if backend == "inductor" else {}
    unet.compile(fullgraph=fullgraph, dynamic=False, backend=backend, **options)
    return unet


# The decoder's mode for each mode: the same without CUDA graphs. A CUDA graph writes every output into one buffer
# that its next replay overwrites, and VAE slicing and tiling keep each decoder output while the next one runs
# (diffusers' `AutoencoderKL.decode` concatenates the slices, `tiled_decode` blends the tiles afterwards).
DECODER_MODES = {"default": "default", "reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs",
                 "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs"}  # fmt: skip


def compile_pipeline(pipe: Any, mode: str = "default", vae: bool = False, backend: str | Callable = "inductor") -> Any:
    r"""Compile a text-to-image pipeline's UNet (and optionally its VAE decoder) in place; returns `pipe`.

    The UNet runs once per denoising step and is where the time goes; the VAE decoder runs once per call but
    at full image resolution (as many FLOPs as one and a half guided UNet steps at 512×512). The decoder never
    gets CUDA graphs (`DECODER_MODES`): VAE slicing and tiling keep outputs that a graph replay would overwrite,
    and one call per image has few launches to save.

    Args:
        pipe: A `LatentDiffusionPipeline` or diffusers' `StableDiffusionPipeline` (anything with `unet`, `vae`).
        mode (`str`, *optional*, defaults to `"default"`): One of `COMPILE_MODES`.
        vae (`bool`, *optional*, defaults to `False`): Also compile `pipe.vae.decoder`.
        backend (`str` or `Callable`, *optional*, defaults to `"inductor"`): As in `compile_unet`.
    """
    compile_unet(pipe.unet, mode, backend=backend)
    if vae:
        compile_unet(pipe.vae.decoder, DECODER_MODES[mode], backend=backend)
    return pipe


@contextlib.contextmanager
def attention_backend(name: str | None) -> Iterator[None]:
    r"""Make one kernel family `scaled_dot_product_attention`'s first choice inside the block (`None`: PyTorch
    picks). The others stay as fallbacks, in PyTorch's order: a kernel that refuses some layer's shapes (cuDNN
    and head dim 160, SD-1.5's innermost blocks, on some versions) costs that layer its speed-up, not the run.

    Args:
        name (`str`, *optional*): `"flash"`, `"cudnn"`, `"efficient"` or `"math"`. Under `torch.compile` the
            choice is made while tracing, so enter the block around the first (compiling) call too.
    """
    if name is None:
        yield
        return
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"Unknown attention backend {name!r}: use one of {sorted(ATTENTION_BACKENDS)}.")
    first = ATTENTION_BACKENDS[name]
    with sdpa_kernel([first, *(b for b in ATTENTION_BACKENDS.values() if b != first)], set_priority=True):
        yield


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Floating-point operations of `fn(*args, **kwargs)` as counted by `torch.utils.flop_counter`.

    Matrix products, convolutions and attention count (2 per multiply-add), elementwise work does not: the usual
    model-FLOPs convention behind MFU. Run it on `meta` tensors to count a model too big for the machine at hand;
    attention then counts as its two batched products, the same number as the fused kernels are credited with.
    """
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def peak_bf16_flops(device_name: str) -> float | None:
    """The datasheet dense bf16 FLOP/s of a GPU from its name (`torch.cuda.get_device_name()`), `None` if unknown."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None
