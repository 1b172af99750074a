"""Our UNet2DConditionModel against diffusers' in one process, same config and weights.

Prints forward and forward+backward time (median of interleaved runs) and peak memory for both, the host work
an eager GPU call waits for (Python calls and kernel-running operators, counted exactly), and the ratios
ours/diffusers (below 1.0 means ours is faster / smaller / launches less).

    python benchmarks/unet.py                 # CPU: a small SD-1-like config
    python benchmarks/unet.py --config sd15   # the SD-1.5 UNet (860M parameters), meant for a GPU
    python benchmarks/unet.py --config sd15-thin   # SD-1.5's structure at 32 channels: the host's share of a step
    python benchmarks/unet.py --fuse-qkv      # ours with fused QKV projections against ours without
    python benchmarks/unet.py --json out.json

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA; on CPU it is the growth of the resident set
size (Linux VmHWM, reset before the step) of a fresh child process that holds one model and runs one step:
the CPU allocator keeps no peak counter of its own.
"""

import argparse
import gc
import json
import multiprocessing
import statistics
import sys
import time

import diffusers
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from latentdiff import UNet2DConditionModel

CONFIGS = {
    "small": dict(
        sample_size=16,
        block_out_channels=(64, 128, 128),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=4,
    ),
    "sd15": dict(sample_size=64, cross_attention_dim=768),  # the rest are diffusers' defaults = SD-1.5
    # SD-1.5's blocks, layers and heads at 32 channels on 8×8 latents: the kernels are tiny, so the time is mostly
    # the host's (Python, dispatch), which an eager GPU forward at batch 2 waits for between its launches
    "sd15-thin": dict(sample_size=8, cross_attention_dim=32, block_out_channels=(32, 32, 32, 32), norm_num_groups=8),
}
TEXT_TOKENS = 77


def build(kind: str, config: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """diffusers' UNet with seeded weights, or ours holding exactly those weights ("ours+fuse-qkv": fused)."""
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**config)
    if kind.startswith("ours"):
        reference, model = model, UNet2DConditionModel(**config)
        model.load_state_dict(reference.state_dict(), strict=True)
        del reference
    model = model.to(device)
    model = model if dtype == torch.float32 else model.to(dtype)
    if kind == "ours+fuse-qkv":
        model.fuse_qkv_projections()
    return model


def make_inputs(config: dict, batch: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    size = config["sample_size"]
    sample = torch.randn(batch, 4, size, size, generator=generator).to(device, dtype)
    timestep = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    context = torch.randn(batch, TEXT_TOKENS, config["cross_attention_dim"], generator=generator).to(device, dtype)
    return sample, timestep, context


def step(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], backward: bool) -> None:
    if backward:
        model(*inputs, return_dict=False)[0].float().square().mean().backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            model(*inputs, return_dict=False)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(models: dict, inputs: tuple, backward: bool, repeats: int, device: str) -> dict[str, float]:
    """Median seconds per step; the two models alternate so that load changes hit both alike."""
    times = {kind: [] for kind in models}
    for kind, model in models.items():  # warm-up (allocator, kernels, caches)
        step(model, inputs, backward)
    for _ in range(repeats):
        for kind, model in models.items():
            sync(device)
            start = time.perf_counter()
            step(model, inputs, backward)
            sync(device)
            times[kind].append(time.perf_counter() - start)
    return {kind: statistics.median(values) for kind, values in times.items()}


def python_calls(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """Python-level function calls in one forward (C functions not counted): host work that an eager GPU forward
    waits for between launches, counted exactly instead of timed."""
    calls = 0

    def count(frame, event, arg) -> None:
        nonlocal calls
        calls += event == "call"

    with torch.no_grad():
        sys.setprofile(count)
        try:
            model(*inputs, return_dict=False)
        finally:
            sys.setprofile(None)
    return calls


class KernelOpCounter(TorchDispatchMode):
    """Counts the ATen operators that run a kernel, as the dispatcher sees them below autograd (composite
    operators already split: `linear` arrives as `addmm`), views and other metadata-only results left out. On a
    GPU each is at least one launch in eager mode, so fewer of them is less launch overhead per call."""

    METADATA_ONLY = ("aten::_unsafe_view", "aten::detach", "aten::empty", "aten::lift_fresh", "aten::alias")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not (func.is_view or func._schema.name in self.METADATA_ONLY)
        return func(*args, **(kwargs or {}))


def kernel_ops(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], backward: bool) -> int:
    """Kernel-running operators in one forward (or forward+backward): `KernelOpCounter`."""
    with KernelOpCounter() as counter:
        step(model, inputs, backward)
    return counter.count


def _resident_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _cpu_peak_child(kind: str, config: dict, batch: int, backward: bool, queue) -> None:
    torch.set_num_threads(1)
    model = build(kind, config, "cpu", torch.float32)
    inputs = make_inputs(config, batch, "cpu", torch.float32)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets the peak resident set size (VmHWM) to the current one
    before = _resident_bytes("VmRSS")
    step(model, inputs, backward)
    queue.put(_resident_bytes("VmHWM") - before)


def peak_memory(kind: str, config: dict, batch: int, backward: bool, device: str, dtype: torch.dtype) -> int:
    """Peak bytes of one step beyond the loaded model and inputs."""
    if device == "cuda":
        model = build(kind, config, device, dtype)
        inputs = make_inputs(config, batch, device, dtype)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(model, inputs, backward)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del model, inputs
        torch.cuda.empty_cache()
        return peak
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_cpu_peak_child, args=(kind, config, batch, backward, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default=None, help="default: sd15 on CUDA, small on CPU")
    parser.add_argument("--batch", type=int, default=None, help="default: 2 (one CFG image) for sd15*, 8 for small")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per model and mode")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--fuse-qkv", action="store_true", help="compare ours fused (fuse_qkv_projections) with ours")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config_name = args.config or ("sd15" if device == "cuda" else "small")
    config = CONFIGS[config_name]
    batch = args.batch or (2 if config_name.startswith("sd15") else 8)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    repeats = args.repeats or (20 if device == "cuda" else 7)

    first, second = ("ours+fuse-qkv", "ours") if args.fuse_qkv else ("ours", "diffusers")
    models = {kind: build(kind, config, device, dtype) for kind in (first, second)}
    first_state, second_state = models[first].state_dict(), models[second].state_dict()
    if any(not torch.equal(first_state[k], second_state[k]) for k in second_state):
        raise RuntimeError("The two UNets did not get the same weights; the comparison would be meaningless.")
    inputs = make_inputs(config, batch, device, dtype)
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "config": config_name,
               "batch": batch, "dtype": str(dtype), "torch": torch.__version__, "diffusers": diffusers.__version__,
               "models": [first, second]}
    print(f"UNet benchmark: {config_name} config, batch {batch}, {dtype}, {results['device']}, "
          f"torch {torch.__version__}, diffusers {diffusers.__version__}, median of {repeats}")
    print(f"{'figure':<32}{first:>14}{second:>12}{first + '/' + second:>24}")
    for mode, backward in (("forward", False), ("forward+backward", True)):
        seconds = time_interleaved(models, inputs, backward, repeats, device)
        peaks = {kind: peak_memory(kind, config, batch, backward, device, dtype) for kind in models}
        results[mode] = {"seconds": seconds, "peak_bytes": peaks,
                         "time_ratio": seconds[first] / seconds[second],
                         "memory_ratio": peaks[first] / max(peaks[second], 1)}
        print(f"{mode + ' time (ms)':<32}{seconds[first] * 1e3:>14.2f}{seconds[second] * 1e3:>12.2f}"
              f"{results[mode]['time_ratio']:>24.3f}")
        print(f"{mode + ' peak (MiB)':<32}{peaks[first] / 2**20:>14.1f}{peaks[second] / 2**20:>12.1f}"
              f"{results[mode]['memory_ratio']:>24.3f}")
    counts = {"python calls per forward": {kind: python_calls(model, inputs) for kind, model in models.items()}}
    for mode, backward in (("forward", False), ("forward+backward", True)):
        counts[f"kernel ops per {mode}"] = {kind: kernel_ops(model, inputs, backward) for kind, model in models.items()}
    for figure, count in counts.items():
        results[figure.replace(" ", "_").replace("+", "_")] = count
        print(f"{figure:<32}{count[first]:>14}{count[second]:>12}{count[first] / count[second]:>24.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
