"""diffusers' UNet methods that its pipelines call, answered without its attention-processor machinery.

Our attention has one code path (SDPA, or xFormers when asked for, with optional fused projections and slicing),
not a processor object per module. diffusers' pipelines still speak the processor API: `pipe.fuse_qkv_projections()`
sets `FusedAttnProcessor2_0`, `enable_attention_slicing()` calls `set_attention_slice`, `enable_freeu()` calls
`enable_freeu`, PAG and IP-Adapter read `attn_processors` and set processors of their own. Processors that compute
what our path computes are mapped onto it; any other is refused with an error that names it and says where it
works: diffusers' own UNet, which loads our weights as they are.
"""

from typing import Any

from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    XFormersAttnProcessor,
)

from .attention import Attention, fuse_projections, projections_fused, unfuse_projections

# diffusers processors that compute plain attention, as our path does, by the path that runs them: xFormers' with
# its op, the fused one after `fuse_qkv_projections()`, the rest (the classic, the SDPA one) unfused on SDPA. The
# classes themselves, not their names or subclasses: another class of the same name computes something else.
_PATHS = {AttnProcessor: "plain", AttnProcessor2_0: "plain", FusedAttnProcessor2_0: "fused",
          XFormersAttnProcessor: "xformers"}  # fmt: skip


def _unsupported_processor(names: set[str]) -> NotImplementedError:
    return NotImplementedError(
        f"latentdiff's UNet has one attention path (PyTorch SDPA or xFormers), not per-module processors, so it "
        f"cannot run {', '.join(sorted(names))}. Features built on processors (IP-Adapter, PAG, SAG, custom "
        "processors) need diffusers' UNet, which loads these weights as they are: "
        "diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder='unet')."
    )


def processor_of(module: Attention) -> Any:
    """The diffusers processor that computes what `module` computes now."""
    if module.use_xformers:
        return XFormersAttnProcessor(module.xformers_op)
    return FusedAttnProcessor2_0() if module.fused_weight is not None else AttnProcessor2_0()


def check_module_processor(module: Attention, processor: Any) -> None:
    """`attn.processor = p` on one module, as SAG, PAG and other pipelines do: taken only when `p` computes what the
    module computes already (a pipeline putting the processor back), since the path is one for the whole UNet."""
    path = _PATHS.get(type(processor))
    if path is None:
        raise _unsupported_processor({type(processor).__name__})
    if path != _PATHS[type(processor_of(module))]:
        raise NotImplementedError(
            f"latentdiff's UNet has one attention path for all modules: choose it for the whole UNet with "
            f"unet.set_attn_processor({type(processor).__name__}()), not for one module."
        )


class DiffusersUNetAPI:
    """Mixed into our `UNet2DConditionModel` (an `nn.Module` whose `Attention` modules carry diffusers' names)."""

    def _attentions(self) -> dict[str, Attention]:
        return {name: module for name, module in self.named_modules() if isinstance(module, Attention)}

    @property
    def attn_processors(self) -> dict[str, Any]:
        """What each attention computes, as the diffusers processor that computes the same, under diffusers' keys
        (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor`)."""
        return {f"{name}.processor": processor_of(module) for name, module in self._attentions().items()}

    def set_attn_processor(self, processor: Any | dict[str, Any]) -> None:
        """Accept the diffusers processors our attention path computes (`AttnProcessor`, `AttnProcessor2_0`,
        `FusedAttnProcessor2_0`, `XFormersAttnProcessor`), one for every module; refuse any other.

        Raises:
            NotImplementedError: Another processor (IP-Adapter's, PAG's, a custom one), or different ones per module.
        """
        chosen = list(processor.values()) if isinstance(processor, dict) else [processor]
        unknown = {type(p).__name__ for p in chosen if type(p) not in _PATHS}
        if unknown:
            raise _unsupported_processor(unknown)
        paths = {_PATHS[type(p)] for p in chosen}
        if len(paths) > 1:
            raise NotImplementedError(
                f"One attention path for every module, not several ({sorted({type(p).__name__ for p in chosen})}): "
                "pass one processor, or the same kind for every key."
            )
        (path,) = paths
        if path == "xformers":
            self.set_use_memory_efficient_attention_xformers(True, chosen[0].attention_op)
            return
        self.set_use_memory_efficient_attention_xformers(False)
        if path == "fused":
            if not projections_fused(self):
                fuse_projections(self)
        else:
            unfuse_projections(self)

    def _load_ip_adapter_weights(self, *args: Any, **kwargs: Any) -> None:
        """What `pipe.load_ip_adapter` calls: IP-Adapter runs in processors of its own, which our path has not."""
        raise _unsupported_processor({"IPAdapterAttnProcessor2_0"})

    def load_attn_procs(self, *args: Any, **kwargs: Any) -> None:
        """diffusers' loader of attention-processor weights (Custom Diffusion, old LoRA files): the same refusal;
        LoRA files load with `pipe.load_lora_weights`."""
        raise _unsupported_processor({"the processors of load_attn_procs"})

    def set_default_attn_processor(self) -> None:
        """diffusers' reset to plain attention: SDPA, unfused, no xFormers."""
        self.set_attn_processor(AttnProcessor2_0())

    def set_attention_slice(self, slice_size: str | int | None) -> None:
        r"""diffusers' attention slicing: attention in slices of the `batch·heads` rows, which lowers the peak memory
        of a kernel that holds all attention weights at once (PyTorch's math fallback) and gives the same result.

        Args:
            slice_size (`str` or `int`, *optional*): `"auto"` (half the heads at a time), `"max"` (one at a time),
                a number of rows, or `None` (off).
        """
        if slice_size is not None and slice_size not in ("auto", "max"):
            if isinstance(slice_size, bool) or not isinstance(slice_size, int) or slice_size < 1:
                raise ValueError(f"slice_size must be 'auto', 'max', a positive integer or None, got {slice_size!r}.")
        for module in self._attentions().values():
            if slice_size == "auto":
                module.slice_size = max(module.heads // 2, 1)
            else:
                module.slice_size = 1 if slice_size == "max" else slice_size

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        r"""FreeU (Si et al. 2023, arXiv:2309.11497): in the first two up blocks, amplify half of the backbone's
        channels by `b1`/`b2` and scale the lowest spatial frequencies of the skip features by `s1`/`s2`.
        Training-free, for sampling.

        Args:
            s1, s2 (`float`): Skip-feature scales of stages 1 and 2 (< 1 against over-smoothing).
            b1, b2 (`float`): Backbone scales of stages 1 and 2 (> 1).
        """
        for block, backbone, skip in zip(self.up_blocks[:2], (b1, b2), (s1, s2)):
            block.freeu = (backbone, skip)

    def disable_freeu(self) -> None:
        """Back to the plain up path."""
        for block in self.up_blocks:
            block.freeu = None
