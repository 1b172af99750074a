"""benchmarks/gpu.py's results as text: one line per result, the speed-ups over diffusers, the markdown table of
docs/performance.md, and the JSON file written after every variant."""

import json

from gpu_variants import PARTS

from latentdiff.atomic import atomic_write_text

FIGURE_NAMES = {
    "a": "training step, bf16 autocast, fused AdamW",
    "b": "UNet forward, bf16, batch 2",
    "c": "DDIM + CFG end to end, 1 image",
    "d": "DDIM + CFG end to end, 8 images",
}


def describe(part: str, figures: dict) -> str:
    """One result as the issue's table writes it: '89.8 samples/s, 216 TFLOP/s, MFU 21.9%, 49.0 GiB'."""
    if "error" in figures:
        return f"error: {figures['error']}"
    if part == "a":
        text = f"{figures['samples_per_s']:.1f} samples/s, {figures['tflops_per_s']:.3g} TFLOP/s"
        text += f", MFU {figures['mfu']:.1%}" if figures.get("mfu") is not None else ""
    elif part == "b":
        text = f"{figures['seconds'] * 1e3:.2f} ms, {figures['tflops_per_s']:.3g} TFLOP/s"
    else:
        text = f"{figures['seconds']:.3f} s"
        text += f", {figures['host_syncs']} host syncs" if "host_syncs" in figures else ""
    text += f" (±{figures['spread'] / 2:.0%})" if figures["spread"] >= 0.02 else ""
    text += f", {figures['peak_gib']:.1f} GiB" if figures.get("peak_gib") is not None else ""
    errors = [f"{k[4:]} {figures[k]:.1e}" for k in ("err_vs_diffusers_eager", "err_vs_eager") if k in figures]
    return text + (f"; rel. err. {', '.join(errors)}" if errors else "")


def ratios(results: dict) -> dict:
    """Per part and variant: speed-up over diffusers (its eager run, the same variant, and for ours its fastest
    variant in the run: the issue's "≥ 1.9× diffusers compiled" is ours' best against that) and the peak ratio."""
    table = {}
    for part, rows in results.items():
        base = rows.get("diffusers/eager", {})
        timed = {name: figures["seconds"] for name, figures in rows.items() if "seconds" in figures}
        fastest = min((name for name in timed if name.startswith("diffusers/")), key=timed.get, default=None)
        for name, figures in rows.items():
            if "error" in figures or "seconds" not in base or name == "diffusers/eager":
                continue
            same = rows.get("diffusers/" + name.split("/", 1)[1], {})
            entry = {"speedup_vs_diffusers_eager": base["seconds"] / figures["seconds"],
                     "time_ratio_vs_diffusers_eager": figures["seconds"] / base["seconds"]}  # fmt: skip
            if name.startswith("ours/") and not name.endswith("/eager") and "seconds" in same:
                entry["speedup_vs_diffusers_same_variant"] = same["seconds"] / figures["seconds"]
            if name.startswith("ours/") and fastest not in (None, "diffusers/eager"):
                entry["speedup_vs_diffusers_fastest"] = timed[fastest] / figures["seconds"]
                entry["diffusers_fastest"] = fastest.split("/", 1)[1]
            if figures.get("peak_gib") and base.get("peak_gib"):
                entry["peak_ratio_vs_diffusers_eager"] = figures["peak_gib"] / base["peak_gib"]
            table.setdefault(part, {})[name] = entry
    return table


def markdown_table(results: dict) -> str:
    lines = ["| figure | model / variant | measured | speed-up vs diffusers eager (same variant) "
             "| vs diffusers' fastest | peak vs diffusers |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    speedups = ratios(results)
    for part in PARTS:
        for name, figures in results.get(part, {}).items():
            entry = speedups.get(part, {}).get(name, {})
            speedup = f"×{entry['speedup_vs_diffusers_eager']:.2f}" if entry else ""
            if "speedup_vs_diffusers_same_variant" in entry:
                speedup += f" (×{entry['speedup_vs_diffusers_same_variant']:.2f})"
            fastest = (f"×{entry['speedup_vs_diffusers_fastest']:.2f} ({entry['diffusers_fastest']})"
                       if "speedup_vs_diffusers_fastest" in entry else "")  # fmt: skip
            peak = f"×{entry['peak_ratio_vs_diffusers_eager']:.2f}" if "peak_ratio_vs_diffusers_eager" in entry else ""
            lines.append(f"| {part}: {FIGURE_NAMES[part]} | {name} | {describe(part, figures)} | {speedup} | {fastest} "
                         f"| {peak} |")  # fmt: skip
    return "\n".join(lines)


def write_json(path: str, report: dict) -> None:
    """Atomically: a reader (or a run killed mid-write) never sees half a file."""
    atomic_write_text(path, json.dumps(report, indent=2))
