"""Ours vs diffusers on a CUDA GPU at Stable Diffusion 1.5 size: training throughput and sampling latency.

Each figure of issue 8, for diffusers' UNet2DConditionModel and ours, same config and same weights:
  a  training step: bf16 autocast, fp32 weights, fused AdamW, batch 32, 64×64 latents, 77×768 text
  b  UNet forward, bf16, batch 2 (one CFG image)
  c  50-step DDIM + CFG 7.5, 512×512, 1 image, text encoder + UNet + VAE decode: diffusers'
     StableDiffusionPipeline with its UNet vs our LatentDiffusionPipeline with ours (same VAE, CLIP weights)
  d  the same with 8 images

    python benchmarks/gpu.py --json all.json                  # every part; split it with --only (see README)
    python benchmarks/gpu.py --only b --ours eager,compile,compile+channels-last,compile-cg --diffusers eager
    python benchmarks/gpu.py --only b --profile kernels.txt   # + each variant's top kernels and time by kind
    python benchmarks/gpu.py --table a.json bcd.json          # markdown rows for docs/performance.md
    python benchmarks/gpu.py --device cpu --tiny              # the same code on a tiny config: checks the script
    python benchmarks/gpu.py --plan c:diffusers/eager,c:ours/compile-cg+compile-vae@profile --profile k.txt

A variant is levers joined by '+': eager (none), compile, compile-cg (+ CUDA graphs), compile-max
(max-autotune), channels-last, flash / cudnn / efficient / math (attention kernel), fuse-qkv, compile-vae (c, d),
upcast-norms (ours only: autocast's float32 GroupNorm/LayerNorm, as diffusers has them; ours keeps bf16 ones).
Times are medians of CUDA-event-timed runs after warm-up; peak is torch.cuda.max_memory_allocated over the
variant (weights, optimizer state, activations); FLOPs are counted once per model on the meta device.
Speed-up = diffusers' time / ours (> 1: ours is faster).
"""

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from torch._dynamo.utils import counters
from transformers import CLIPTextModel

import latentdiff
from latentdiff.acceleration import (
    attention_backend,
    compile_pipeline,
    compile_unet,
    count_flops,
    peak_bf16_flops,
)
from latentdiff.models.normalization import set_norm_upcast
from latentdiff.pipelines import LatentDiffusionPipeline
from latentdiff.tiny import SD_SCHEDULE, clip_text_config
from latentdiff.tokenizer import build_clip_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_report import describe, markdown_table, ratios, write_json  # noqa: E402  (beside this file)
from gpu_variants import CUDA_GRAPH_MODES, PARTS, Item, Variant, choose_variants, parse_plan, schedule  # noqa: E402
from kernel_time import describe_breakdown, profile_kernels  # noqa: E402  (beside this file)
from unet import CONFIGS, make_inputs  # noqa: E402  (the UNet benchmark beside this file)

PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5
UNETS = {"diffusers": diffusers.UNet2DConditionModel, "ours": latentdiff.UNet2DConditionModel}


@dataclasses.dataclass(frozen=True)
class Sizes:
    unet: dict  # UNet2DConditionModel config
    vae: dict  # AutoencoderKL config beyond the block types
    text: dict  # CLIPTextConfig beyond vocabulary and special tokens
    train_batch: int
    image: int  # pixels per side
    steps: int  # denoising steps
    images: dict  # part → images per prompt


SD15 = Sizes(
    unet=CONFIGS["sd15"],
    vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512),  # SD-1.5's vae/
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768),  # CLIP ViT-L/14's text tower, SD-1.5's text_encoder/
    train_batch=32, image=512, steps=50, images={"c": 1, "d": 8},
)  # fmt: skip
TINY = Sizes(
    unet=CONFIGS["small"],
    vae=dict(block_out_channels=(32, 32), layers_per_block=1, sample_size=32),
    text=dict(hidden_size=CONFIGS["small"]["cross_attention_dim"], intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4),
    train_batch=4, image=32, steps=4, images={"c": 1, "d": 2},
)  # fmt: skip


def prepare_unet(unet: torch.nn.Module, variant: Variant, compile_now: bool = True) -> torch.nn.Module:
    if variant.upcast_norms and not set_norm_upcast(unet, True):
        raise ValueError("upcast-norms is a lever of our UNet: diffusers' norms are autocast's float32 ones already.")
    if variant.fuse_qkv:  # both UNets have it; ours keeps diffusers' state-dict keys (to_q/k/v are views)
        unet.fuse_qkv_projections()
    if variant.channels_last:
        unet.to(memory_format=torch.channels_last)
    if variant.compile_mode and compile_now:
        compile_unet(unet, variant.compile_mode)
    return unet


def elapsed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call: between CUDA events recorded around it on a GPU (host gaps and compiling included)."""
    if device.type != "cuda":
        start_s = time.perf_counter()
        fn()
        return time.perf_counter() - start_s
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def time_runs(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> dict:
    """Median seconds of `repeats` calls after `warmup` ones; the warm-up times show the compile cost.

    The peak-memory counter restarts here, when the models are built (and the fp32 → bf16 copies made), and again
    after the warm-up: `peak_gib` is what running holds (weights, optimizer state, activations), without what
    compiling and CUDA-graph recording hold once (`peak_gib_with_warmup` has both).
    """
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    warmup_runs = [elapsed(fn, device) for _ in range(warmup)]
    warmup_peak = torch.cuda.max_memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    runs = [elapsed(fn, device) for _ in range(repeats)]
    median = statistics.median(runs)
    figures = {"seconds": median, "spread": (max(runs) - min(runs)) / median, "runs": runs, "warmup_runs": warmup_runs}
    if cuda:
        figures["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        figures["peak_gib_with_warmup"] = max(warmup_peak / 2**30, figures["peak_gib"])
    return figures


def count_host_syncs(fn: Callable[[], object]) -> int:
    """Synchronizing CUDA calls (`.item()`, `if tensor:`, device→host copies) made by one call of `fn`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output - reference).norm() / reference.norm().clamp_min(1e-12)).item()


class Bench:
    """Holds the seeded weights (on the CPU) and builds fresh models from them for every variant."""

    def __init__(self, sizes: Sizes, device: torch.device, warmup: int, repeats: dict, peak_flops: float | None,
                 profile: str | None = None):  # fmt: skip
        self.sizes, self.device, self.warmup, self.repeats, self.peak_flops = sizes, device, warmup, repeats, peak_flops
        self.profile = profile  # a text file that gets each timed variant's kernel table
        if profile and device.type == "cuda":  # the profiler set up before any CUDA graph is captured: a replay of a
            with torch.profiler.profile():  # graph captured earlier can hang or fail in it (pytorch/pytorch#75504)
                pass
        # bf16 as the issue measures it; fp32 on a CPU, whose bf16 convolutions are slower, not faster
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.tokenizer = build_clip_tokenizer()
        self.text_config = clip_text_config(self.tokenizer, **sizes.text)
        levels = len(sizes.vae["block_out_channels"])
        self.vae_config = dict(sizes.vae, down_block_types=("DownEncoderBlock2D",) * levels,
                               up_block_types=("UpDecoderBlock2D",) * levels)  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.states = {
                "unet": diffusers.UNet2DConditionModel(**sizes.unet).state_dict(),
                "vae": AutoencoderKL(**self.vae_config).state_dict(),
                "text_encoder": CLIPTextModel(self.text_config).state_dict(),
            }
        self.references: dict = {}  # (part, kind) → eager output, for the correctness columns
        self.flops: dict = {}

    def build(self, factory: Callable[[], torch.nn.Module], state: str, dtype: torch.dtype) -> torch.nn.Module:
        """A module constructed on the device (fast init) holding the seeded weights, strictly loaded."""
        with torch.device(self.device):
            module = factory()
        module.load_state_dict(self.states[state], strict=True)
        return module.to(dtype=dtype)

    def unet(self, kind: str, dtype: torch.dtype) -> torch.nn.Module:
        return self.build(lambda: UNETS[kind](**self.sizes.unet), "unet", dtype)

    def meta_flops(self, kind: str, batch: int, train: bool) -> int:
        """FLOPs of one forward (or forward + backward) at `batch`, counted on meta tensors: no memory, no time."""
        with torch.device("meta"):
            unet = UNETS[kind](**self.sizes.unet)
        inputs = make_inputs(self.sizes.unet, batch, "meta", torch.float32)
        if train:
            return count_flops(lambda: unet(*inputs, return_dict=False)[0].square().mean().backward())
        with torch.no_grad():
            return count_flops(unet, *inputs, return_dict=False)

    def count(self, key: tuple[str, str], counter: Callable[[], int]) -> int:
        if key not in self.flops:
            self.flops[key] = counter()
        return self.flops[key]

    def profile_calls(self, part: str, kind: str, variant: Variant, call: Callable[[], object]) -> dict:
        """With --profile: append the call's kernel table to the profile file; return its device milliseconds
        per call by kernel kind (`kernel_ms_by_kind`), the input of the profile-based account."""
        if not self.profile:
            return {}
        try:  # one call of a 50-step pipeline is ~1 M profiler events already: minutes of post-processing each
            few_calls = part in ("a", "b")
            table, by_kind = profile_kernels(call, self.device, calls=3 if few_calls else 1, shapes=few_calls)
        except Exception as error:  # noqa: BLE001  (a profiler failure must not lose the variant's timings)
            table, by_kind = f"profiling failed: {type(error).__name__}: {error}", {}
        with open(self.profile, "a") as handle:
            handle.write(f"\n## {part} {kind}/{variant.name}\n{table}\n")
        return {"kernel_ms_by_kind": by_kind} if by_kind else {}

    # ---- the parts: each returns its figures, the output that the correctness columns compare, and its call --

    def training(self, kind: str, variant: Variant) -> tuple[dict, torch.Tensor, Callable[[], None]]:
        batch = self.sizes.train_batch
        unet = prepare_unet(self.unet(kind, torch.float32).train(), variant)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=True)
        sample, timestep, context = make_inputs(self.sizes.unet, batch, self.device, torch.float32)
        noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(1)).to(self.device)
        first = {}  # the first step's prediction and gradient norm: same weights, same batch in every variant

        def step() -> None:
            autocast = torch.autocast(self.device.type, torch.bfloat16, enabled=self.dtype == torch.bfloat16)
            with autocast, attention_backend(variant.attention):
                prediction = unet(sample, timestep, context, return_dict=False)[0]
            loss = F.mse_loss(prediction.float(), noise)
            loss.backward()
            if not first:  # the warm-up's first call: checked after timing, so no host sync in the timed steps
                first["prediction"] = prediction.detach().float()
                first["grad_norm"] = torch.nn.utils.clip_grad_norm_(unet.parameters(), float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        figures = time_runs(step, self.device, self.warmup, self.repeats["a"])
        flops = self.count(("a", kind), lambda: self.meta_flops(kind, batch, train=True))
        figures["samples_per_s"] = batch / figures["seconds"]
        figures["tflops_per_s"] = flops / figures["seconds"] / 1e12
        figures["mfu"] = figures["tflops_per_s"] * 1e12 / self.peak_flops if self.peak_flops else None
        figures["grad_norm_step1"] = first["grad_norm"].item()  # the backward's check: compare across variants
        return figures, first["prediction"].cpu(), step  # the forward's check: the error columns compare it

    def forward(self, kind: str, variant: Variant) -> tuple[dict, torch.Tensor, Callable[[], None]]:
        unet = prepare_unet(self.unet(kind, self.dtype).eval(), variant)
        inputs = make_inputs(self.sizes.unet, 2, self.device, self.dtype)
        outputs = []

        def call() -> None:
            with torch.no_grad(), attention_backend(variant.attention):
                outputs[:] = [unet(*inputs, return_dict=False)[0]]

        figures = time_runs(call, self.device, self.warmup, self.repeats["b"])
        flops = self.count(("b", kind), lambda: self.meta_flops(kind, 2, train=False))
        figures["tflops_per_s"] = flops / figures["seconds"] / 1e12
        return figures, outputs[0].float().cpu(), call

    def pipeline(self, kind: str, variant: Variant, part: str) -> tuple[dict, torch.Tensor, Callable[[], None]]:
        dtype = self.dtype
        components = dict(
            vae=self.build(lambda: AutoencoderKL(**self.vae_config), "vae", dtype).eval(),
            text_encoder=self.build(lambda: CLIPTextModel(self.text_config), "text_encoder", dtype).eval(),
            tokenizer=self.tokenizer,
            unet=prepare_unet(self.unet(kind, dtype).eval(), variant, compile_now=False),
            scheduler=DDIMScheduler(**SD_SCHEDULE),
        )
        if kind == "ours":
            pipe = LatentDiffusionPipeline(**components)
        else:
            pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)  # fmt: skip
        if variant.compile_mode:
            compile_pipeline(pipe, variant.compile_mode, vae=variant.compile_vae)
        pipe.set_progress_bar_config(disable=True)
        outputs = []

        def call() -> None:
            generator = torch.Generator(self.device).manual_seed(0)
            with attention_backend(variant.attention):
                images = pipe(PROMPT, height=self.sizes.image, width=self.sizes.image,
                              num_inference_steps=self.sizes.steps, guidance_scale=GUIDANCE,
                              num_images_per_prompt=self.sizes.images[part], generator=generator,
                              output_type="pt").images  # fmt: skip
            outputs[:] = [images]

        figures = time_runs(call, self.device, self.warmup, self.repeats[part])
        if self.device.type == "cuda":
            figures["host_syncs"] = count_host_syncs(call)
        return figures, outputs[0].float().cpu(), call

    def run(self, part: str, kind: str, variant: Variant, profile: bool = True) -> dict:
        """One variant's figures (with its kernel table if `profile` and --profile); an error (OOM, graph break,
        missing lever) is recorded, not raised."""
        torch._dynamo.reset()  # a fresh compile cache (and the last variant's CUDA-graph pools let go), then free
        _release(self.device)
        counters["inductor"].clear()
        try:
            if part == "a":
                figures, output, call = self.training(kind, variant)
            elif part == "b":
                figures, output, call = self.forward(kind, variant)
            else:
                figures, output, call = self.pipeline(kind, variant, part)
            if profile:
                figures |= self.profile_calls(part, kind, variant, call)
        except Exception as error:  # noqa: BLE001  (the next variant still runs within the device call)
            return {"error": f"{type(error).__name__}: {str(error)[:400]}"}
        figures.setdefault("peak_gib", None)  # None: not on a GPU
        if variant.compile_mode in CUDA_GRAPH_MODES:  # a graph inductor could not capture runs without CUDA graphs
            figures["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
        if variant.name == "eager":
            self.references[(part, kind)] = output
        if (part, "diffusers") in self.references and (kind, variant.name) != ("diffusers", "eager"):
            figures["err_vs_diffusers_eager"] = relative_error(output, self.references[(part, "diffusers")])
        if kind == "ours" and variant.name != "eager" and (part, "ours") in self.references:
            figures["err_vs_eager"] = relative_error(output, self.references[(part, "ours")])
        return figures


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def benchmark(args: argparse.Namespace, device: torch.device, items: list[Item], argv: list[str]) -> dict:
    """Run every item in order, printing each result as it comes; returns the results."""
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (peak_bf16_flops(name) if cuda else None)
    repeats = {p: args.repeats or (dict(a=10, b=50, c=5, d=3)[p] if cuda else 2) for p in PARTS}
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)  # compile-cg records on the 2nd call
    bench = Bench(TINY if args.tiny else SD15, device, warmup, repeats, peak, args.profile)
    meta = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
            "latentdiff": latentdiff.__version__, "sizes": "tiny" if args.tiny else "sd15",
            "peak_bf16_tflops": peak / 1e12 if peak else None,
            "argv": argv}  # fmt: skip
    print("gpu benchmark: " + ", ".join(f"{k} {v}" for k, v in meta.items() if k != "argv"), flush=True)
    results: dict = {}
    for part, kind, variant, profile in items:
        figures = bench.run(part, kind, variant, profile)
        results.setdefault(part, {})[f"{kind}/{variant.name}"] = figures
        print(f"{part} {kind}/{variant.name}: {describe(part, figures)}", flush=True)
        if "kernel_ms_by_kind" in figures:
            print(f"  {describe_breakdown(figures['kernel_ms_by_kind'], figures['seconds'])}", flush=True)
        if args.json:  # after every variant: a run stopped at the device's time limit keeps what it measured
            flops = {f"{p}/{k}": value for (p, k), value in bench.flops.items()}
            write_json(args.json, {"meta": meta, "flops": flops, "results": results, "ratios": ratios(results)})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (with --tiny: a check)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and few steps instead of SD-1.5")
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated parts among a,b,c,d")
    parser.add_argument("--ours", default=None, help="comma-separated variants of ours for every part run")
    parser.add_argument("--diffusers", default=None, help="comma-separated variants of diffusers' for every part")
    parser.add_argument("--plan", default=None, help="instead of --only/--ours/--diffusers: comma-separated "
                        "PART:KIND/VARIANT items run in this order, @profile marking those --profile profiles")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per variant (default 3 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default per part)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: by GPU name)")
    parser.add_argument("--json", default=None, help="write every figure to this file")
    parser.add_argument("--profile", default=None, help="append each variant's kernel table to this file and report "
                        "its device time by kernel kind")
    parser.add_argument("--table", nargs="+", default=None, metavar="JSON", help="print saved results as markdown")
    args = parser.parse_args(argv)

    if args.table:
        results: dict = {}
        for path in args.table:
            for part, rows in json.loads(Path(path).read_text())["results"].items():
                results.setdefault(part, {}).update(rows)
        print(markdown_table(results))
        return 0
    device = torch.device(args.device)
    try:
        if args.plan is not None:
            if args.ours or args.diffusers or args.only != parser.get_default("only"):
                raise ValueError("--plan names every item itself: leave out --only, --ours and --diffusers.")
            items = parse_plan(args.plan)
        else:
            items = schedule(choose_variants(args.only, args.diffusers, args.ours, cuda=device.type == "cuda"))
    except ValueError as error:  # a bad part, variant or plan item: one line naming it, exit status 2
        parser.error(str(error))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU and none is visible here: no figures. "
              "To check the script on this machine: python benchmarks/gpu.py --device cpu --tiny")  # fmt: skip
        return 0

    verbosity = diffusers.utils.logging.get_verbosity()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*lru_cache")  # dynamo tracing diffusers' is_torch_version
        diffusers.utils.logging.set_verbosity_error()  # "modules that should be kept in float32: []" on every .to()
        try:
            results = benchmark(args, device, items, sys.argv[1:] if argv is None else argv)
        finally:
            diffusers.utils.logging.set_verbosity(verbosity)
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
