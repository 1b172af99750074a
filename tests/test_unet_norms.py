"""Our GroupNorm/LayerNorm under autocast: no float32 upcast of a bf16 input, numbers within bf16 tolerance.

A CPU's autocast never upcasts the two norms; CUDA's does. `CudaAutocastNorms` (benchmarks/autocast_bytes.py)
applies CUDA's rule on the CPU, so these tests see what a GPU run does.
"""

import diffusers
import pytest
import torch
from conftest import UNET_CONFIGS, load_benchmark, unet_inputs
from torch import nn

from latentdiff import UNet2DConditionModel
from latentdiff.models.normalization import GroupNorm, LayerNorm, set_norm_upcast

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def autocast_bytes():
    return load_benchmark("autocast_bytes")


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output.float() - reference).norm() / reference.norm()).item()


def norm_pairs(eps: float | None = None) -> list[tuple[nn.Module, nn.Module, tuple[int, ...]]]:
    """(torch's norm, ours with the same random affine parameters, an input shape); both norms with `eps` if given."""
    torch.manual_seed(0)
    group_eps, layer_eps = (1e-6, 1e-5) if eps is None else (eps, eps)
    pairs = [(nn.GroupNorm(4, 16, eps=group_eps), GroupNorm(4, 16, eps=group_eps), (2, 16, 8, 8)),
             (nn.LayerNorm(16, eps=layer_eps), LayerNorm(16, eps=layer_eps), (2, 10, 16))]  # fmt: skip
    for plain, ours, _ in pairs:
        nn.init.normal_(plain.weight, 1.0, 0.2)
        nn.init.normal_(plain.bias, 0.0, 0.2)
        ours.load_state_dict(plain.state_dict())
    return pairs


# a large eps against an input of variance 0.01: the bf16 path divides by sqrt(var + eps) with the norm's own eps
@pytest.mark.parametrize("eps, scale", [(None, 1.0), (0.5, 1 / 30)], ids=["small_eps", "large_eps"])
@pytest.mark.parametrize("index", [0, 1], ids=["group_norm", "layer_norm"])
def test_bf16_input_stays_bf16_where_cuda_autocast_upcasts(autocast_bytes, index, eps, scale):
    plain, ours, shape = norm_pairs(eps)[index]
    x = ((torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3 + 1) * scale).requires_grad_()
    exact = plain(x)
    exact.square().sum().backward()
    exact_grads = [x.grad, plain.weight.grad, plain.bias.grad]
    x.grad = None
    with autocast_bytes.CudaAutocastNorms(), torch.autocast("cpu", torch.bfloat16):
        assert plain(x.bfloat16()).dtype == torch.float32  # the emulation upcasts, as CUDA does
        output = ours(x.bfloat16())
    assert output.dtype == torch.bfloat16
    assert relative_error(output, exact) < 1e-2
    output.float().square().sum().backward()
    grads = [x.grad, ours.weight.grad, ours.bias.grad]
    assert [g.dtype for g in grads] == [torch.float32] * 3  # float32 parameters get float32 gradients
    for grad, exact_grad in zip(grads, exact_grads):
        assert relative_error(grad, exact_grad) < 2e-2


@pytest.mark.parametrize("index", [0, 1], ids=["group_norm", "layer_norm"])
def test_without_a_low_precision_input_it_is_torchs_norm(autocast_bytes, index):
    """No autocast, a float32 input or one in the other half dtype under autocast, or `upcast=True`: bit for bit
    torch's norm."""
    plain, ours, shape = norm_pairs()[index]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ours(x), plain(x))
    assert torch.equal(ours.bfloat16()(x.bfloat16()), plain.bfloat16()(x.bfloat16()))
    plain.float(), ours.float()
    with autocast_bytes.CudaAutocastNorms(), torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(ours(x), plain(x))
        assert torch.equal(ours(x.half()), plain(x.half()))  # fp16 activations under bf16 autocast
        ours.upcast = True
        assert torch.equal(ours(x.bfloat16()), plain(x.bfloat16()))


@pytest.mark.parametrize("name", ["sd1", "scale_shift_class"])
def test_unet_under_autocast_is_within_bf16_tolerance_and_upcast_gives_diffusers(autocast_bytes, name):
    config = UNET_CONFIGS[name]
    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(**config)
    ours = UNet2DConditionModel(**config)
    ours.load_state_dict(reference.state_dict())
    inputs = unet_inputs(config)
    with torch.no_grad():
        exact = reference(**inputs).sample
        with autocast_bytes.CudaAutocastNorms(), torch.autocast("cpu", torch.bfloat16):
            diffusers_bf16 = reference(**inputs).sample
            ours_bf16 = ours(**inputs).sample
            assert set_norm_upcast(ours, True) == sum(isinstance(m, (GroupNorm, LayerNorm)) for m in ours.modules())
            ours_upcast = ours(**inputs).sample
    diffusers_error = relative_error(diffusers_bf16, exact)
    assert 1e-3 < diffusers_error < 2e-2  # bf16 at work, not float32
    assert relative_error(ours_bf16, exact) < 2 * diffusers_error
    assert torch.equal(ours_upcast, diffusers_bf16)  # upcast norms: diffusers' autocast numbers exactly
    assert set_norm_upcast(reference, True) == 0  # diffusers' UNet holds none of ours


def test_unet_keeps_and_moves_fewer_bytes_and_upcast_keeps_what_diffusers_keeps(autocast_bytes):
    results = autocast_bytes.measure(UNET_CONFIGS["sd1"])
    diffusers_sample, ours_sample = results["diffusers"]["per_sample"], results["ours"]["per_sample"]
    upcast_sample = results["ours+upcast-norms"]["per_sample"]
    assert ours_sample["saved"] < 0.9 * diffusers_sample["saved"]
    assert ours_sample["saved_float32"] < 0.02 * diffusers_sample["saved_float32"]
    assert upcast_sample["saved"] == diffusers_sample["saved"]
    assert ours_sample["moved_memory_bound"] < 0.7 * diffusers_sample["moved_memory_bound"]
    assert ours_sample["moved_matrix"] == diffusers_sample["moved_matrix"]  # the same products, in bf16
    assert results["ours"]["per_step"]["saved"] > 0  # the weights' bf16 copies: once a step, not per sample
    printed = autocast_bytes.report(results, 32).splitlines()
    assert [line.split()[0] for line in printed[2:]] == ["diffusers", "ours", "ours+upcast-norms"]


def test_autocast_forward_compiles_as_one_graph():
    """The autocast checks and the autocast-off block trace without a break (backward: AOTAutograd's)."""
    config = UNET_CONFIGS["sd1"]
    model = UNet2DConditionModel(**config)
    inputs = unet_inputs(config)

    def loss() -> torch.Tensor:
        with torch.autocast("cpu", torch.bfloat16):
            return model(**inputs).sample.float().square().mean()

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(loss)()
    assert explanation.graph_break_count == 0, explanation.break_reasons
