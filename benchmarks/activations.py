"""Activation memory of a bf16-autocast training step, ours vs diffusers, counted exactly on a CPU.

A training step's peak memory is the static part (fp32 weights, gradients, AdamW state: the same for both
UNets) plus what the forward keeps for the backward. This script counts the second part: every tensor autograd
saves in one forward (parameters and views of one storage counted once), per sample, split by dtype, under
*CUDA's* autocast rules. A CPU's autocast differs from CUDA's in one place that matters here: it leaves
`group_norm` and `layer_norm` in their input's dtype, where CUDA runs them in float32. `CudaAutocastNorms` applies
CUDA's rule to those two, so the count is what a GPU run saves, without a GPU; all else (convolutions, linears,
attention in bf16) is the same on both devices.

    python benchmarks/activations.py                       # small config, batch 2, 16×16 latents (seconds)
    python benchmarks/activations.py --config sd15 --batch 1   # SD-1.5 at 64×64 latents (~1 min, ~6 GB RAM)
    python benchmarks/activations.py --config sd15 --batch 1 --json out.json

Counted per sample: activations grow linearly with the batch (flash-style attention keeps O(tokens) per
head), so the batch-32 prediction is 32 × the per-sample figure; the bf16 copies of the weights that autocast
caches for the backward are counted apart (once per step, not per sample).
"""

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from latentdiff.models.normalization import set_norm_upcast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unet import CONFIGS, build, make_inputs  # noqa: E402  (the UNet benchmark beside this file)

NORMS = (F.group_norm, F.layer_norm)
MODELS = ("diffusers", "ours", "ours+upcast-norms")
VIEWS_AND_CASTS = {"ToCopyBackward0", "TBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0"}


class CudaAutocastNorms(TorchFunctionMode):
    """CUDA autocast's float32 rule for `group_norm` and `layer_norm`, on a CPU (whose autocast lacks it)."""

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        if func in NORMS and torch.is_autocast_enabled("cpu"):
            upcast = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
            with torch.autocast("cpu", enabled=False):
                return func(*upcast, **kwargs)
        return func(*args, **kwargs)


def is_weight_cast(tensor: torch.Tensor) -> bool:
    """Autocast's low-precision copy of a parameter (or a transposed view of one), which linears and convolutions
    save: its autograd history is a few casts and views down to the parameter's gradient accumulator."""
    node = tensor.grad_fn
    for _ in range(4):
        if node is None or node.name() not in VIEWS_AND_CASTS:
            return node is not None and "AccumulateGrad" in node.name()
        node = node.next_functions[0][0]
    return False


def saved_for_backward(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict:
    """Bytes autograd keeps from one bf16-autocast forward, by dtype; weight casts apart, parameters excluded."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, tuple[int, torch.dtype, bool]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in parameters and pointer not in storages:
            storages[pointer] = (storage.nbytes(), tensor.dtype, is_weight_cast(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), CudaAutocastNorms():
        with torch.autocast("cpu", torch.bfloat16):
            output = model(*inputs, return_dict=False)[0]
    del output
    counts = {"weight_casts": 0, "float32": 0, "bfloat16": 0, "other": 0}
    for nbytes, dtype, weight_cast in storages.values():
        key = "weight_casts" if weight_cast else {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype, "other")
        counts[key] += nbytes
    return counts


def measure(config: dict, batch: int) -> dict:
    """Per-sample activation bytes for each model (weights fp32 as in the issue's training step)."""
    inputs = make_inputs(config, batch, "cpu", torch.float32)
    results = {}
    for name in MODELS:
        model = build("diffusers" if name == "diffusers" else "ours", config, "cpu", torch.float32).train()
        if name == "ours+upcast-norms":
            set_norm_upcast(model, True)
        counts = saved_for_backward(model, inputs)
        activations = sum(v for k, v in counts.items() if k != "weight_casts")
        results[name] = {"per_sample_bytes": activations / batch, "weight_cast_bytes": counts["weight_casts"],
                         **{f"{k}_per_sample_bytes": v / batch for k, v in counts.items() if k != "weight_casts"}}  # fmt: skip
        del model
    return results


def report(results: dict, batch_for_prediction: int) -> str:
    gib = 2**30
    lines = [f"{'model':<20}{'per sample':>12}{'of it fp32':>12}{'weight casts':>14}"
             f"{f'× {batch_for_prediction} + casts':>18}{'vs diffusers':>14}"]  # fmt: skip
    base = results["diffusers"]["per_sample_bytes"]
    for name, r in results.items():
        total = r["per_sample_bytes"] * batch_for_prediction + r["weight_cast_bytes"]
        lines.append(f"{name:<20}{r['per_sample_bytes'] / gib:>10.3f} G{r['float32_per_sample_bytes'] / gib:>10.3f} G"
                     f"{r['weight_cast_bytes'] / gib:>12.3f} G{total / gib:>16.2f} G"
                     f"{r['per_sample_bytes'] / base:>14.3f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--predict-batch", type=int, default=32, help="the batch the totals column is for")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(True)
    results = measure(CONFIGS[args.config], args.batch)
    size = CONFIGS[args.config]["sample_size"]
    print(f"Saved for backward under CUDA's bf16 autocast rules (counted on the CPU): {args.config} config, "
          f"{size}×{size} latents, batch {args.batch}, torch {torch.__version__}, diffusers {diffusers.__version__}")
    print(report(results, args.predict_batch))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "batch": args.batch, "results": results}, indent=2))


if __name__ == "__main__":
    main()
