"""What benchmarks/gpu.py runs: the parts, the levers a variant joins with '+', and the order of a run (each
part's defaults, or a --plan across parts). Parsing only: nothing here builds a model or touches a GPU."""

import dataclasses

from latentdiff.acceleration import ATTENTION_BACKENDS

PARTS = ("a", "b", "c", "d")
KINDS = ("diffusers", "ours")  # whose UNet (and pipeline) a variant runs

# compile-max alone autotunes GEMMs/convs without CUDA graphs (inductor's "max-autotune" mode also turns them on,
# and coordinate-descent tuning: that is compile-max+compile-cg), so that each lever is measured on its own.
COMPILE_LEVERS = {"compile": "default", "compile-cg": "reduce-overhead", "compile-max": "max-autotune-no-cudagraphs"}
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
LEVERS = ("eager", *COMPILE_LEVERS, "channels-last", "fuse-qkv", "compile-vae", "upcast-norms", *ATTENTION_BACKENDS)
DEFAULT_VARIANTS = {
    "a": {"diffusers": ["eager"], "ours": ["eager", "eager+upcast-norms", "compile"]},
    "b": {"diffusers": ["eager", "compile"], "ours": ["eager", "compile"]},
    "c": {"diffusers": ["eager", "compile"], "ours": ["eager", "compile", "compile-cg+compile-vae"]},  # the target
    "d": {"diffusers": ["eager"], "ours": ["eager", "compile"]},
}
CPU_VARIANTS = {"diffusers": ["eager"], "ours": ["eager"]}  # inductor's C++ build takes minutes on a CPU


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    compile_mode: str | None = None
    attention: str | None = None
    channels_last: bool = False
    fuse_qkv: bool = False
    compile_vae: bool = False
    upcast_norms: bool = False


def parse_variant(name: str, part: str) -> Variant:
    """'compile+channels-last' → Variant; a ValueError names a lever that is unknown or misplaced."""
    levers = set(name.split("+")) - {"eager"}
    unknown = levers - set(LEVERS)
    if unknown or not name:
        raise ValueError(f"Unknown lever(s) {sorted(unknown) or [name]} in variant {name!r}: use {', '.join(LEVERS)}.")
    compile_modes = [COMPILE_LEVERS[lever] for lever in levers if lever in COMPILE_LEVERS]
    if sorted(compile_modes) == ["max-autotune-no-cudagraphs", "reduce-overhead"]:  # compile-max+compile-cg
        compile_modes = ["max-autotune"]
    backends = [lever for lever in levers if lever in ATTENTION_BACKENDS]
    if len(compile_modes) > 1 or len(backends) > 1:
        raise ValueError(f"Variant {name!r} names more than one compile mode or attention kernel: pick one.")
    if "compile-vae" in levers and (part in ("a", "b") or not compile_modes):
        raise ValueError(f"Variant {name!r}: compile-vae goes with a compile lever, in parts c and d only.")
    return Variant(name, compile_modes[0] if compile_modes else None, backends[0] if backends else None,
                   "channels-last" in levers, "fuse-qkv" in levers, "compile-vae" in levers,
                   "upcast-norms" in levers)  # fmt: skip


def choose_variants(only: str, diffusers_names: str | None, ours_names: str | None, cuda: bool) -> dict:
    """{part: {"diffusers": [Variant], "ours": [Variant]}} from the command line, or each part's defaults."""
    parts = [p.strip() for p in only.split(",") if p.strip()]
    if not parts or any(p not in PARTS for p in parts):
        raise ValueError(f"--only {only!r}: choose among {', '.join(PARTS)}, comma-separated.")
    chosen = {}
    for part in parts:
        defaults = DEFAULT_VARIANTS[part] if cuda else CPU_VARIANTS
        names = {"diffusers": diffusers_names, "ours": ours_names}
        chosen[part] = {
            kind: [parse_variant(n.strip(), part) for n in (names[kind].split(",") if names[kind] else defaults[kind])]
            for kind in KINDS
        }
    return chosen


Item = tuple[str, str, Variant, bool]  # part, "diffusers" or "ours", variant, profiled


def schedule(variants: dict) -> list[Item]:
    """The order of a run from `choose_variants`: per part, diffusers' eager run first (every variant's
    reference), then ours, then diffusers' others: a call stopped at the device's time limit has lost the least
    interesting figures. Every item is profiled when --profile is given."""
    items = []
    for part, kinds in variants.items():
        reference = [("diffusers", v) for v in kinds["diffusers"] if v.name == "eager"]
        others = [("diffusers", v) for v in kinds["diffusers"] if v.name != "eager"]
        items += [(part, kind, v, True) for kind, v in reference + [("ours", v) for v in kinds["ours"]] + others]
    return items


def parse_plan(plan: str) -> list[Item]:
    """'c:diffusers/eager,c:ours/compile-cg+compile-vae@profile,a:ours/eager' → items run in that order, across
    parts: one process (one build of the seeded weights) for a whole device call. With --profile only the items
    marked @profile are profiled (a 50-step eager pipeline is a million profiler events: minutes)."""
    items = []
    for entry in (e.strip() for e in plan.split(",") if e.strip()):
        item, marked = entry.removesuffix("@profile"), entry.endswith("@profile")
        part, _, rest = item.partition(":")
        kind, _, name = rest.partition("/")
        if part not in PARTS or kind not in KINDS or not name:
            raise ValueError(f"--plan item {entry!r}: write PART:KIND/VARIANT[@profile], PART among "
                             f"{', '.join(PARTS)}, KIND diffusers or ours, e.g. c:ours/compile-cg+compile-vae.")  # fmt: skip
        items.append((part, kind, parse_variant(name, part), marked))
    if not items:
        raise ValueError("--plan names no item: write PART:KIND/VARIANT items, comma-separated.")
    return items
