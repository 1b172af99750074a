"""Where a call's device time goes: torch.profiler's kernels summed by kind, for the profile-based account that
issue 8 asks for when a target is missed (docs/performance.md).

A kind is read from the kernel's name: cuBLAS/CUTLASS/cuDNN kernel names on a GPU (`nvjet_*`, `sm90_xmma_*`,
`flash_fwd_*`, `vectorized_elementwise_kernel<…CUDAFunctor_add…>`), ATen operator names on a CPU
(`aten::convolution`), inductor's `triton_*` kernels. The kernel total against the call's event-timed duration
gives the time the device waited for the host (launch overhead, syncs): what CUDA graphs remove.
"""

from collections.abc import Callable

import torch
from torch.autograd import DeviceType

# (kind, fragments of a lower-cased kernel or operator name); the first entry with a matching fragment wins, so
# the order matters: cuDNN's layout transposes before its other kernels, inductor's GEMM templates (`triton_tem_*`)
# before its fused kernels (`triton_poi_fused_convolution_…` is a bias add, not a convolution), norms (whose CUDA
# kernels include `elementwise_kernel<…GroupNormKernelImplInternal…>` lambdas) before the generic elementwise names.
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "sdpa", "attention", "softmax")),
    ("copy/cast/layout", ("nchwtonhwc", "nhwctonchw")),
    ("gemm/conv", ("triton_tem",)),
    ("compiled (triton)", ("triton",)),
    ("gemm/conv", ("gemm", "gemv", "splitkreduce", "nvjet", "xmma", "cutlass", "cublas", "cudnn", "conv", "aten::mm",
                   "aten::addmm", "aten::bmm", "mkldnn")),  # fmt: skip
    ("norm", ("group_norm", "groupnorm", "layer_norm", "layernorm", "rowwisemoments", "fusedparams", "gammabeta",
              "internalgradients", "welford")),  # fmt: skip
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copy/cast/layout", ("copy", "memcpy", "memset", "transpose", "cat", "contiguous")),
    ("elementwise", ("elementwise", "silu", "gelu", "add", "mul", "div", "sub", "fill", "reduce", "sum", "mean",
                     "upsample", "index", "where", "clamp", "exp", "sqrt", "pow")),  # fmt: skip
)
OTHER = "other"


def kernel_kind(name: str) -> str:
    """The kind of a kernel (GPU) or operator (CPU) from its name; `"other"` when nothing matches."""
    lowered = name.lower()
    for kind, fragments in KERNEL_KINDS:
        if any(fragment in lowered for fragment in fragments):
            return kind
    return OTHER


def profile_kernels(
    fn: Callable[[], object], device: torch.device, calls: int = 3, shapes: bool = False
) -> tuple[str, dict[str, float]]:
    """Profile `calls` calls of `fn`: the operator/kernel table (largest self time first) and milliseconds per
    call by kind (`kernel_kind`), from the kernels' self device time on a GPU or the operators' self CPU time on a
    CPU (self times: nested operators are not counted twice).

    With `shapes`, a second table follows: the operators split by their input shapes, which says what a kernel
    kind is spent on (which tensors 96 copies a step copy, say). Recording shapes costs profiler time, so it is
    for the few-call parts, not a 50-step pipeline.
    """
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities, record_shapes=shapes) as profiler:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    events = profiler.key_averages()
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = events.table(sort_by=sort_by, row_limit=40, max_name_column_width=90)
    if shapes:
        by_shape = profiler.key_averages(group_by_input_shape=True)
        table += "\n\nOperators by input shape:\n" + by_shape.table(
            sort_by="device_time_total" if cuda else "cpu_time_total", row_limit=30, max_name_column_width=40,
            max_shapes_column_width=120,
        )
    by_kind: dict[str, float] = {}
    for event in events:
        if cuda and event.device_type != DeviceType.CUDA:
            continue  # a CPU operator: its kernels are rows of their own
        micros = event.self_device_time_total if cuda else event.self_cpu_time_total
        if micros > 0:
            kind = kernel_kind(event.key)
            by_kind[kind] = by_kind.get(kind, 0.0) + micros / 1e3 / calls
    return table, dict(sorted(by_kind.items(), key=lambda item: -item[1]))


def describe_breakdown(by_kind: dict[str, float], seconds: float) -> str:
    """'kernels 290.1 ms of 356.0 ms (19% outside them): gemm/conv 52%, attention 21%, …' for one call: the
    time outside kernels is the device waiting for the host (launches, syncs; on a CPU: Python)."""
    total = sum(by_kind.values())
    if total <= 0:
        return "no kernel times recorded"
    wall = seconds * 1e3
    shares = ", ".join(f"{kind} {ms / total:.0%}" for kind, ms in by_kind.items())
    return f"kernels {total:.1f} ms of {wall:.1f} ms ({max(wall - total, 0) / wall:.0%} outside them): {shares}"
