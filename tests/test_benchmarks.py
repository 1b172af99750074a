"""benchmarks/gpu.py and latentdiff.acceleration without a GPU: the no-CUDA exit, every figure computed on a tiny
CPU run, FLOP counting, and compile-readiness of our UNet (one graph, same numbers, no recompiles per timestep)."""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import diffusers
import pytest
import torch
from conftest import UNET_CONFIGS, load_benchmark, unet_inputs
from torch import nn
from torch.nn import functional as F

from latentdiff import UNet2DConditionModel
from latentdiff.acceleration import attention_backend, compile_unet, count_flops, peak_bf16_flops

GPU_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
CPU_VARIANT = "channels-last+math+fuse-qkv"  # the levers that run on a CPU in seconds


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops: a second thread only adds spin-waiting on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gpu():
    return load_benchmark("gpu")


@pytest.fixture(scope="module")
def tiny_run(gpu, tmp_path_factory):
    """One tiny CPU run of every part: (saved report, printed text)."""
    folder = tmp_path_factory.mktemp("gpu")
    path = folder / "tiny.json"
    argv = ["--device", "cpu", "--tiny", "--repeats", "1", "--warmup", "0", "--peak-tflops", "1",
            "--ours", f"eager,{CPU_VARIANT}", "--json", str(path)]  # fmt: skip
    printed, verbosity = io.StringIO(), diffusers.utils.logging.get_verbosity()
    with contextlib.redirect_stdout(printed):
        assert gpu.main(argv) == 0
    assert diffusers.utils.logging.get_verbosity() == verbosity  # later tests still see diffusers' warnings
    return json.loads(path.read_text()), printed.getvalue(), path


def test_without_cuda_the_script_says_so_and_exits_zero(tmp_path):
    out = tmp_path / "figures.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [sys.executable, str(GPU_SCRIPT), "--json", str(out)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "needs a CUDA GPU" in done.stdout and "--device cpu --tiny" in done.stdout
    assert "samples/s" not in done.stdout and not out.exists()


def test_tiny_cpu_run_computes_every_figure(gpu, tiny_run):
    report, printed, _ = tiny_run
    results, flops = report["results"], report["flops"]
    names = {"diffusers/eager", "ours/eager", f"ours/{CPU_VARIANT}"}
    assert set(results) == set(gpu.PARTS) and all(set(rows) == names for rows in results.values())
    for part, rows in results.items():
        for name, figures in rows.items():
            assert "error" not in figures, (part, name, figures)
            assert figures["seconds"] > 0 and figures["runs"] == [figures["seconds"]]
        # same weights, same inputs, fp32 on the CPU: ours reproduces diffusers, the levers change nothing
        assert rows["ours/eager"]["err_vs_diffusers_eager"] < 1e-4
        assert rows[f"ours/{CPU_VARIANT}"]["err_vs_eager"] < 1e-4
        base = rows["diffusers/eager"]["seconds"]
        assert report["ratios"][part]["ours/eager"]["speedup_vs_diffusers_eager"] == pytest.approx(
            base / rows["ours/eager"]["seconds"]
        )
    training = results["a"]["ours/eager"]
    assert flops["a/ours"] == flops["a/diffusers"] > 0
    assert training["samples_per_s"] == pytest.approx(gpu.TINY.train_batch / training["seconds"])
    assert training["tflops_per_s"] == pytest.approx(flops["a/ours"] / training["seconds"] / 1e12)
    assert training["mfu"] == pytest.approx(training["tflops_per_s"])  # --peak-tflops 1
    forward = results["b"]["ours/eager"]
    assert forward["tflops_per_s"] == pytest.approx(flops["b/ours"] / forward["seconds"] / 1e12)
    assert "| b: UNet forward, bf16, batch 2 | ours/eager |" in printed


def test_table_reprints_saved_results(gpu, tiny_run, capsys):
    report, printed, path = tiny_run
    assert gpu.main(["--table", str(path)]) == 0
    assert capsys.readouterr().out.strip() == gpu.markdown_table(report["results"]).strip()
    assert gpu.markdown_table(report["results"]) in printed


def test_ours_is_compared_with_the_fastest_diffusers_variant_of_the_run(gpu):
    """The sampling target's ratio (ours' best against diffusers compiled), whatever the variants are named."""
    report = gpu  # its ratios and markdown_table (from gpu_report.py beside it)
    rows = {"diffusers/eager": {"seconds": 1.4, "spread": 0}, "diffusers/compile": {"seconds": 0.7, "spread": 0},
            "diffusers/compile-max": {"error": "OOM"}, "ours/eager": {"seconds": 1.0, "spread": 0},
            "ours/compile-cg+compile-vae": {"seconds": 0.35, "spread": 0}}  # fmt: skip
    entries = report.ratios({"c": rows})["c"]
    assert entries["ours/compile-cg+compile-vae"]["speedup_vs_diffusers_fastest"] == pytest.approx(2.0)
    assert entries["ours/eager"]["speedup_vs_diffusers_fastest"] == pytest.approx(0.7)
    assert {entry.get("diffusers_fastest") for name, entry in entries.items() if name.startswith("ours/")} == {"compile"}
    assert "speedup_vs_diffusers_fastest" not in entries["diffusers/compile"]
    assert "| ×4.00 | ×2.00 (compile) |" in report.markdown_table({"c": rows})
    only_eager = report.ratios({"c": {"diffusers/eager": {"seconds": 1.4}, "ours/eager": {"seconds": 1.0}}})
    assert "speedup_vs_diffusers_fastest" not in only_eager["c"]["ours/eager"]  # the eager column says it already


def test_profile_appends_one_kernel_table_per_variant(gpu, tmp_path):
    """The profiler's table of a call (on the CPU here: the profiler costs ms per operator, so one convolution)."""
    bench = gpu.Bench.__new__(gpu.Bench)  # only the profile file and the device are needed
    bench.profile, bench.device = str(tmp_path / "kernels.txt"), torch.device("cpu")
    conv, image = nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8)
    for name in ("eager", "compile"):
        figures = bench.profile_calls("b", "ours", gpu.Variant(name), lambda: conv(image))
        assert figures["kernel_ms_by_kind"]["gemm/conv"] > 0
    text = (tmp_path / "kernels.txt").read_text()
    assert [line for line in text.splitlines() if line.startswith("## ")] == ["## b ours/eager", "## b ours/compile"]
    assert text.count("Operators by input shape:") == 2  # part b's tables end with the operators by shape
    assert text.count("aten::convolution ") == 4
    assert len(re.findall(r"aten::convolution .*\[\[1, 3, 8, 8\], \[4, 3, 3, 3\], \[4\]", text)) == 2
    bench.profile = None
    assert bench.profile_calls("b", "ours", gpu.Variant("eager"), lambda: conv(image)) == {}


KERNEL_NAMES = {  # as CUDA (cuBLAS, cuDNN, flash, ATen, inductor) and the CPU's ATen operators name them
    "nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT": "gemm/conv",
    "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "gemm/conv",
    "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>": "gemm/conv",
    "nvjet_tst_128x96_64x7_4x1_v_bz_bias_TNT": "gemm/conv",  # cuBLAS 12.8 names its GEMMs without "gemm"
    "void splitKreduce_kernel<32, 16, int, __nv_bfloat16, __nv_bfloat16, float, __nv_bfloat16, true>": "gemm/conv",
    "void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 2, 2, false>": "gemm/conv",
    "void cunn_SoftMaxForward<4, float, float, float, SoftMaxForwardEpilogue>": "attention",
    "triton_tem_fused_mm_1": "gemm/conv",
    "aten::mkldnn_convolution": "gemm/conv",
    "void cudnn::ops::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true>": "copy/cast/layout",
    "flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64, 128, 128, 8>>": "attention",
    "fmha_cutlassB_bf16_aligned_64x64_k64_sm80": "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x64x64": "attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "triton_poi_fused_convolution_silu_0": "compiled (triton)",  # a bias add and SiLU, not a convolution
    "triton_red_fused_native_group_norm_3": "compiled (triton)",
    "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::BFloat16>": "norm",
    "void at::native::elementwise_kernel<128, 2, GroupNormKernelImplInternal<c10::BFloat16, float>::lambda>": "norm",
    "void at::native::vectorized_layer_norm_kernel<c10::BFloat16, float>": "norm",
    "void at::native::multi_tensor_apply_kernel<at::native::FusedAdamMathFunctor<float, 4>>": "optimizer",
    "void at::native::vectorized_elementwise_kernel<4, at::native::bfloat16_copy_kernel_cuda>": "copy/cast/layout",
    "void at::native::CatArrayBatchedCopy<c10::BFloat16, unsigned int, 4, 64, 64>": "copy/cast/layout",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>": "elementwise",
    "aten::silu": "elementwise",
    "aten::empty": "other",
}


def test_kernels_are_sorted_into_kinds_and_summed_per_call(tmp_path):
    kernel_time = load_benchmark("kernel_time")
    assert {name: kernel_time.kernel_kind(name) for name in KERNEL_NAMES} == KERNEL_NAMES
    line = kernel_time.describe_breakdown({"gemm/conv": 60.0, "attention": 20.0, "norm": 20.0}, seconds=0.125)
    assert line == "kernels 100.0 ms of 125.0 ms (20% outside them): gemm/conv 60%, attention 20%, norm 20%"
    linear, x = nn.Linear(64, 64), torch.randn(256, 64)
    table, by_kind = kernel_time.profile_kernels(lambda: torch.nn.functional.silu(linear(x)), torch.device("cpu"))
    assert "aten::addmm" in table and set(by_kind) >= {"gemm/conv", "elementwise"}
    assert list(by_kind.values()) == sorted(by_kind.values(), reverse=True)  # largest first
    assert "input shape" not in table
    table, _ = kernel_time.profile_kernels(lambda: linear(x).t().contiguous(), torch.device("cpu"), shapes=True)
    by_shape = table.split("Operators by input shape:")[1]
    assert re.search(r"aten::copy_ .*\[\[64, 256\], \[64, 256\], \[\]\]", by_shape)  # the transposed copy, by shape


def test_profiled_training_step_reports_its_time_by_kind(gpu, tmp_path):
    argv = ["--device", "cpu", "--tiny", "--only", "a", "--repeats", "1", "--warmup", "0",
            "--profile", str(tmp_path / "kernels.txt"), "--json", str(tmp_path / "a.json")]  # fmt: skip
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert gpu.main(argv) == 0
    results = json.loads((tmp_path / "a.json").read_text())["results"]["a"]
    for name in ("diffusers/eager", "ours/eager"):
        assert results[name]["kernel_ms_by_kind"]["gemm/conv"] > 0, name
    assert printed.getvalue().count("  kernels ") == 2 and "## a ours/eager" in (tmp_path / "kernels.txt").read_text()


def test_variants_parse_and_bad_ones_are_named():
    variants = load_benchmark("gpu_variants")
    variant = variants.parse_variant("compile-cg+channels-last+cudnn", "b")
    assert (variant.compile_mode, variant.attention, variant.channels_last) == ("reduce-overhead", "cudnn", True)
    assert variants.parse_variant("eager", "a") == variants.Variant("eager")
    assert variants.parse_variant("compile-max", "b").compile_mode == "max-autotune-no-cudagraphs"  # one lever at a time
    assert variants.parse_variant("compile-max+compile-cg", "b").compile_mode == "max-autotune"
    with pytest.raises(ValueError, match="turbo"):
        variants.parse_variant("compile+turbo", "b")
    with pytest.raises(ValueError, match="more than one"):
        variants.parse_variant("compile+compile-max", "b")
    with pytest.raises(ValueError, match="compile-vae"):
        variants.parse_variant("compile+compile-vae", "b")
    with pytest.raises(ValueError, match="compile-vae"):
        variants.parse_variant("compile-vae", "c")
    with pytest.raises(ValueError, match="--only"):
        variants.choose_variants("a,e", None, None, cuda=True)


def test_a_plan_runs_its_items_in_order_and_profiles_the_marked_ones(gpu, tmp_path, capsys):
    """One process for a whole device call: items across parts in the order given, @profile where marked."""
    profile, out = tmp_path / "kernels.txt", tmp_path / "plan.json"
    plan = "b:diffusers/eager,b:ours/eager@profile,a:ours/eager,b:ours/channels-last"
    argv = ["--device", "cpu", "--tiny", "--repeats", "1", "--warmup", "0", "--plan", plan,
            "--profile", str(profile), "--json", str(out)]  # fmt: skip
    assert gpu.main(argv) == 0
    printed = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if line[:2] in ("a ", "b ")]
    assert printed == ["b diffusers/eager", "b ours/eager", "a ours/eager", "b ours/channels-last"]
    results = json.loads(out.read_text())["results"]
    assert "kernel_ms_by_kind" in results["b"]["ours/eager"]
    assert not any("kernel_ms_by_kind" in results[p][n] for p, n in [("b", "diffusers/eager"), ("a", "ours/eager")])
    assert [line for line in profile.read_text().splitlines() if line.startswith("## ")] == ["## b ours/eager"]
    assert results["b"]["ours/channels-last"]["err_vs_eager"] < 1e-4  # the reference ran earlier in the plan


@pytest.mark.parametrize("item", ["e:ours/eager", "c:theirs/eager", "c:ours", "c:ours/compile-vae", ""])
def test_a_bad_plan_item_is_named_before_anything_runs(gpu, item, capsys):
    with pytest.raises(SystemExit) as stopped:
        gpu.main(["--device", "cpu", "--tiny", "--plan", item])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "--plan" in error or "compile-vae" in error, error
    assert item.split(":")[0] in error


def test_a_plan_with_the_per_part_options_is_refused(gpu, capsys):
    with pytest.raises(SystemExit) as stopped:
        gpu.main(["--device", "cpu", "--tiny", "--plan", "b:ours/eager", "--ours", "compile"])
    assert stopped.value.code == 2 and "leave out --only, --ours and --diffusers" in capsys.readouterr().err


def test_count_flops_counts_products_at_two_per_multiply_add():
    assert count_flops(nn.Linear(8, 16), torch.randn(4, 8)) == 2 * 4 * 8 * 16
    conv = nn.Conv2d(3, 5, 3)  # 7×7 → 5×5
    assert count_flops(conv, torch.randn(2, 3, 7, 7)) == 2 * 2 * 5 * 5 * 5 * 3 * 9


def test_sd15_flops_on_meta_match_between_models_and_the_issue(gpu):
    """Counted without memory on `meta`: ours does diffusers' arithmetic, ≈ 1.6 TFLOP per CFG forward (issue 8)."""
    bench = gpu.Bench.__new__(gpu.Bench)  # only the sizes are needed, not the seeded weights
    bench.sizes = gpu.SD15
    forward = {kind: bench.meta_flops(kind, 2, train=False) for kind in gpu.UNETS}
    assert forward["ours"] == forward["diffusers"]
    assert 1.55e12 < forward["ours"] < 1.65e12
    train = bench.meta_flops("ours", 2, train=True)
    assert 2 * forward["ours"] < train <= 3 * forward["ours"]  # backward ≈ 2× forward, less the inputs' grads


def test_peak_flops_by_device_name():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert peak_bf16_flops("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert peak_bf16_flops("NVIDIA H100 NVL") == pytest.approx(835e12)
    assert peak_bf16_flops("NVIDIA H200") == pytest.approx(989.4e12)
    assert peak_bf16_flops("Some GPU") is None


def test_compile_and_attention_options_are_checked():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="turbo"):
        compile_unet(model, mode="turbo")
    with pytest.raises(ValueError, match="inductor"):
        compile_unet(model, mode="reduce-overhead", backend="aot_eager")
    with pytest.raises(ValueError, match="flashy"):
        with attention_backend("flashy"):
            pass
    q, k, v = torch.randn(3, 1, 2, 16, 160).unbind(0)  # SD-1.5's innermost head dim
    with attention_backend("cudnn"):  # first choice, not the only one: here (no cuDNN) another kernel runs
        preferred = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(preferred, F.scaled_dot_product_attention(q, k, v))


def test_compile_unet_hands_the_mode_to_torch_compile(monkeypatch):
    """Inductor's modes are GPU work; here the call torch.compile gets is what can be checked."""
    calls = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kwargs: calls.append(kwargs))
    compile_unet(nn.Linear(2, 2), mode="max-autotune")
    compile_unet(nn.Linear(2, 2))
    assert [(c.get("mode"), c["fullgraph"], c["backend"]) for c in calls] == [("max-autotune", True, "inductor"),
                                                                               (None, True, "inductor")]  # fmt: skip


def test_attention_backend_gives_torch_the_named_kernel_first(monkeypatch):
    """CPU SDPA ignores the priority (it runs flash whenever allowed), so on CPU only the request to torch is seen."""
    from torch.nn.attention import SDPBackend

    from latentdiff import acceleration

    asked = []
    real = acceleration.sdpa_kernel

    def recording(backends, set_priority=False):
        asked.append((backends[0], set_priority))
        return real(backends, set_priority=set_priority)

    monkeypatch.setattr(acceleration, "sdpa_kernel", recording)
    cuda = torch.backends.cuda
    for name in ("math", "efficient"):
        with attention_backend(name):  # the other kernels stay as fallbacks
            assert cuda.flash_sdp_enabled() and cuda.cudnn_sdp_enabled()
            assert cuda.mem_efficient_sdp_enabled() and cuda.math_sdp_enabled()
    assert asked == [(SDPBackend.MATH, True), (SDPBackend.EFFICIENT_ATTENTION, True)]  # True: an order, not a set


def test_kernel_op_count_leaves_out_views_and_sees_ours_launch_fewer():
    """benchmarks/unet.py's proxy for eager launches: a Linear on a 3-D input is one `addmm` (its reshapes are
    views), a reshape that must copy is one `clone`; ours skips diffusers' divisions by an output scale of 1.0 and
    the copies before `proj_out`, at every config."""
    bench = load_benchmark("unet")
    linear, x = nn.Linear(4, 4), torch.randn(3, 2, 4)
    with bench.KernelOpCounter() as counter:
        linear(x).permute(2, 0, 1).reshape(-1)
    assert counter.count == 2
    for name in ("sd1", "sd2"):
        config = UNET_CONFIGS[name]
        inputs = tuple(unet_inputs(config, batch=2).values())  # sample, timestep, text
        ours, theirs = _ours(config), diffusers.UNet2DConditionModel(**config)
        for backward in (False, True):
            assert bench.kernel_ops(ours, inputs, backward) < bench.kernel_ops(theirs, inputs, backward), name


def _ours(config: dict) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**config)


def test_compiled_unet_is_one_graph_with_eager_numbers_and_keys():
    """fullgraph=True through AOTAutograd (forward and backward traced); inductor's codegen is for the GPU run."""
    config = UNET_CONFIGS["sd2"]
    eager, compiled = _ours(config), compile_unet(_ours(config), backend="aot_eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())  # in place: no `_orig_mod.` prefix
    inputs = unet_inputs(config)
    torch._dynamo.reset()
    for model in (eager, compiled):
        model(**inputs).sample.square().mean().backward()
    assert torch.allclose(compiled(**inputs).sample, eager(**inputs).sample, atol=1e-5)
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(p_compiled.grad, p_eager.grad, atol=1e-5), name


def test_new_timestep_values_do_not_recompile():
    """A sampling loop feeds a new timestep every step: as a tensor it is an input, not a constant of the graph."""
    config = UNET_CONFIGS["sd1"]
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    model = compile_unet(_ours(config).eval(), backend=counting_backend)
    inputs = unet_inputs(config)
    with torch.no_grad():
        for t in (999, 500, 1):
            model(inputs["sample"], torch.tensor(t), inputs["encoder_hidden_states"])
    assert len(graphs) == 1


def test_image_check_benchmark_runs_every_figure(capsys):
    load_benchmark("image_check").main(["--images", "6", "--size", "64", "--threads", "1", "2", "--repeats", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[:2] for row in rows] == [["1", "1"], ["1", "2"], ["2", "1"], ["2", "2"]]
    assert all(float(row[2]) > 0 for row in rows) and rows[0][3] == "1.00"
