"""Bytes a bf16-autocast training step keeps and moves, ours vs diffusers, counted exactly on a CPU.

Two counts over one forward + backward of each UNet (same config, same weights), under *CUDA's* autocast rules:
- saved: what autograd keeps from the forward for the backward (one storage counted once, parameters not).
  With the static part (fp32 weights, AdamW state) this is a training step's peak memory.
- moved: bytes read + written by every memory-bound kernel (norms, activations, adds, casts: each op's tensor
  inputs and outputs; views move nothing). On a GPU these kernels run at memory bandwidth, so this is their time
  at ~3 TB/s; the matrix kernels (convolutions, matrix products, attention) are counted apart.
A CPU's autocast differs from CUDA's in one place that matters here: it leaves `group_norm` and `layer_norm` in
their input's dtype, where CUDA runs them in float32. `CudaAutocastNorms` applies CUDA's rule to those two, so
the counts are a GPU run's; all else (convolutions, linears, attention in bf16) is the same on both devices.

Each count is split into a per-sample part (activations: linear in the batch) and a per-step part (weight casts,
gradient sums) by counting at batch b and 2b; "at batch N" is N × per sample + per step.

    python benchmarks/autocast_bytes.py                                   # small config (seconds)
    python benchmarks/autocast_bytes.py --config sd15 --json out.json     # SD-1.5, 64×64 latents (~2 min, 10 GB RAM)
"""

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from latentdiff.models.normalization import set_norm_upcast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unet import CONFIGS, build, make_inputs  # noqa: E402  (the UNet benchmark beside this file)

MODELS = ("diffusers", "ours", "ours+upcast-norms")
NORMS = (F.group_norm, F.layer_norm)
MATRIX_OPS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward"}  # + attention, by prefix
NO_DATA_OPS = {"_unsafe_view", "detach", "alias", "lift_fresh"}  # views that the schema does not mark as views
GIB = 2**30


class CudaAutocastNorms(TorchFunctionMode):
    """CUDA autocast's float32 rule for `group_norm` and `layer_norm`, on a CPU (whose autocast lacks it)."""

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        if func in NORMS and torch.is_autocast_enabled("cpu"):
            upcast = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
            with torch.autocast("cpu", enabled=False):
                return func(*upcast, **kwargs)
        return func(*args, **kwargs)


class KernelTraffic(TorchDispatchMode):
    """Bytes read + written per ATen op, below autograd and autocast: what the kernels of a GPU run would touch."""

    def __init__(self) -> None:
        super().__init__()
        self.matrix = 0
        self.memory_bound: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name in NO_DATA_OPS:
            return output
        tensors = [t for t in tree_flatten((args, kwargs, output))[0] if isinstance(t, torch.Tensor)]
        moved = sum(t.numel() * t.element_size() for t in tensors)
        if name in MATRIX_OPS or name.startswith("_scaled_dot_product"):
            self.matrix += moved
        else:
            self.memory_bound[name] += moved
        return output


def count_step(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict:
    """One bf16-autocast forward + backward: bytes saved for backward and bytes moved, by kind."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, tuple[int, torch.dtype]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved.setdefault(storage.data_ptr(), (storage.nbytes(), tensor.dtype))
        return tensor

    traffic = KernelTraffic()
    with CudaAutocastNorms(), traffic:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            with torch.autocast("cpu", torch.bfloat16):
                output = model(*inputs, return_dict=False)[0]
        output.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return {
        "saved": sum(nbytes for nbytes, _ in saved.values()),
        "saved_float32": sum(nbytes for nbytes, dtype in saved.values() if dtype == torch.float32),
        "moved_memory_bound": sum(traffic.memory_bound.values()),
        "moved_matrix": traffic.matrix,
    }


def measure(config: dict, batch: int = 1) -> dict:
    """Per model: each count's per-sample and per-step bytes (weights fp32, as in the issue's training step)."""
    results = {}
    for name in MODELS:
        model = build("diffusers" if name == "diffusers" else "ours", config, "cpu", torch.float32).train()
        if name == "ours+upcast-norms":
            set_norm_upcast(model, True)
        once, twice = (count_step(model, make_inputs(config, b, "cpu", torch.float32)) for b in (batch, 2 * batch))
        per_sample = {key: (twice[key] - once[key]) / batch for key in once}
        results[name] = {"per_sample": per_sample, "per_step": {k: once[k] - per_sample[k] * batch for k in once}}
        del model
    return results


def at_batch(result: dict, key: str, batch: int) -> float:
    return result["per_sample"][key] * batch + result["per_step"][key]


def report(results: dict, batch: int) -> str:
    """Per sample, and at `batch`, in GiB; ratios against diffusers at `batch`."""
    header = f"{'model':<19}{'saved/sample':>13}{'of it fp32':>11}{'moved/sample':>13}" + \
        f"{f'saved @{batch}':>11}{f'moved @{batch}':>11}{'saved vs':>10}{'moved vs':>10}"  # fmt: skip
    lines = [header, f"{'':<19}{'(GiB)':>13}{'':>11}{'(mem-bound)':>13}{'':>22}{'diffusers':>10}{'diffusers':>10}"]
    base = results["diffusers"]
    for name, result in results.items():
        sample = result["per_sample"]
        saved, moved = at_batch(result, "saved", batch), at_batch(result, "moved_memory_bound", batch)
        lines.append(
            f"{name:<19}{sample['saved'] / GIB:>13.3f}{sample['saved_float32'] / GIB:>11.3f}"
            f"{sample['moved_memory_bound'] / GIB:>13.3f}{saved / GIB:>11.1f}{moved / GIB:>11.1f}"
            f"{saved / at_batch(base, 'saved', batch):>10.3f}{moved / at_batch(base, 'moved_memory_bound', batch):>10.3f}"
        )  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--batch", type=int, default=1, help="b: counts are taken at b and 2b")
    parser.add_argument("--predict-batch", type=int, default=32, help="the batch of the '@' columns")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    config = CONFIGS[args.config]
    results = measure(config, args.batch)
    size = config["sample_size"]
    print(f"Bytes of one bf16-autocast training step under CUDA's autocast rules, counted on the CPU: {args.config} "
          f"config, {size}×{size} latents, torch {torch.__version__}, diffusers {diffusers.__version__}")  # fmt: skip
    print(report(results, args.predict_batch))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "results": results}, indent=2))


if __name__ == "__main__":
    main()
