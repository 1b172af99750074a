"""Multi-head attention, ``softmax(Q Kᵀ / √d) V``, with one kernel choice for the whole UNet.

PyTorch's ``scaled_dot_product_attention`` (flash / memory-efficient / math, picked by PyTorch) is the
default; xFormers' ``memory_efficient_attention`` is used when it is installed and asked for.

Fused projections (an inference lever, diffusers' ``fuse_qkv_projections``): self-attention computes Q, K, V with
one GEMM against ``[W_q; W_k; W_v]``, cross-attention K, V with one against ``[W_k; W_v]``. The concatenation is
the storage and ``to_q/to_k/to_v.weight`` are views of its rows, so the state dict keeps diffusers' keys and
shapes, costs no extra memory, and anything that writes into the parameters (``load_state_dict``, an optimizer
step, an EMA swap) updates the fused weight too.
"""

import importlib.util
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    heads: int,
    bias: torch.Tensor | None = None,
    upcast: bool = False,
    xformers_op: Callable | None = None,
    use_xformers: bool = False,
    slice_size: int | None = None,
) -> torch.Tensor:
    """Attend ``(B, N, heads·d)`` queries over ``(B, L, heads·d)`` keys/values; returns ``(B, N, heads·d)``.

    Args:
        bias (`torch.Tensor`, *optional*):
            Additive bias broadcastable to ``(B, heads, N, L)``; ``-10000`` masks a key out (diffusers' convention).
        upcast (`bool`, defaults to `False`):
            Compute in fp32: SD-2.x's 768-px UNet overflows fp16 in ``Q Kᵀ`` otherwise.
        slice_size (`int`, *optional*):
            diffusers' attention slicing: SDPA over ``slice_size`` of the ``B·heads`` (query, key) pairs at a time,
            for a kernel that would hold all the ``N × L`` weights at once (PyTorch's math fallback). Same result.
    """
    batch, n_query, inner = query.shape
    head_dim = inner // heads
    out_dtype = query.dtype
    if upcast:
        query, key, value = query.float(), key.float(), value.float()
    if use_xformers:
        import xformers.ops

        # xFormers wants (B, N, heads, d) and a bias already expanded over heads and queries.
        q, k, v = (x.reshape(batch, x.shape[1], heads, head_dim) for x in (query, key, value))
        if bias is not None:
            bias = _aligned_bias(bias.expand(batch, heads, n_query, key.shape[1]), q.dtype)
        out = xformers.ops.memory_efficient_attention(q, k, v, attn_bias=bias, op=xformers_op)
        return out.reshape(batch, n_query, inner).to(out_dtype)
    q, k, v = (x.reshape(batch, x.shape[1], heads, head_dim).transpose(1, 2) for x in (query, key, value))  # (B, heads, ·, d)
    if bias is not None:
        bias = bias.to(q.dtype)
    if slice_size is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, heads, N, d)
    else:
        out = _sliced_attention(q, k, v, bias, slice_size)
    return out.transpose(1, 2).reshape(batch, n_query, inner).to(out_dtype)


def _aligned_bias(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A copy of ``bias`` in ``dtype`` whose rows start on 16-byte boundaries, as xFormers' kernels read them.

    Its CUTLASS kernel refuses a bias with any stride but the last not a multiple of 16 bytes: the text's 77 keys
    would be. The copy is a slice of a buffer padded to the next multiple, as xFormers itself advises.
    """
    alignment = 128 // torch.finfo(dtype).bits  # elements in 16 bytes
    n_key = bias.shape[-1]
    padded = torch.empty(*bias.shape[:-1], -(-n_key // alignment) * alignment, dtype=dtype, device=bias.device)
    return padded[..., :n_key].copy_(bias)


def _sliced_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, slice_size: int
) -> torch.Tensor:
    """SDPA on ``slice_size`` rows of the flattened ``(B·heads)`` at a time; ``(B, heads, N, d)`` out."""
    batch, heads = q.shape[:2]
    q, k, v = (x.flatten(0, 1) for x in (q, k, v))  # (B·heads, ·, d)
    if bias is not None:
        bias = bias.expand(batch, heads, *bias.shape[2:]).flatten(0, 1)  # (B·heads, 1 or N, L)
    out = [
        F.scaled_dot_product_attention(
            q[i : i + slice_size], k[i : i + slice_size], v[i : i + slice_size],
            attn_mask=None if bias is None else bias[i : i + slice_size],
        )  # fmt: skip
        for i in range(0, q.shape[0], slice_size)
    ]
    return torch.cat(out).unflatten(0, (batch, heads))


class Attention(nn.Module):
    """Self-attention (``context_dim=None``) or cross-attention on ``context`` (the text embeddings)."""

    def __init__(
        self,
        query_dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        upcast: bool = False,
    ):
        super().__init__()
        inner = heads * head_dim
        self.is_cross_attention = context_dim is not None  # K, V come from the text: only they can be fused
        context_dim = context_dim or query_dim
        self.heads = heads
        self.upcast = upcast
        self.use_xformers = False
        self.xformers_op: Callable | None = None
        self.slice_size: int | None = None  # diffusers' attention slicing (`UNet2DConditionModel.set_attention_slice`)
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        # diffusers' layout (its key `to_out.0.weight`); its UNets build the dropout at 0 whatever the config says
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])
        # [W_q; W_k; W_v] (self) or [W_k; W_v] (cross) once fused; not persistent: the views carry the keys
        self.register_buffer("fused_weight", None, persistent=False)
        self.register_load_state_dict_post_hook(_fuse_again_after_load)

    @property
    def processor(self) -> Any:
        """diffusers' per-module processor, read: the one that computes what this module does."""
        from .diffusers_api import processor_of  # diffusers' API is built on this module

        return processor_of(self)

    def __setattr__(self, name: str, value: Any) -> None:
        """`attn.processor = p` (SAG and PAG set one module's) is checked, never stored: our path is one for the
        whole UNet. Ahead of nn.Module's, which would register a processor that is a module as a child."""
        if name == "processor":
            from .diffusers_api import check_module_processor

            check_module_processor(self, value)
            return
        super().__setattr__(name, value)

    @property
    def fusable_projections(self) -> tuple[nn.Module, ...]:
        """The projections that one GEMM replaces when fused, in the order of their rows in ``fused_weight``."""
        return (self.to_k, self.to_v) if self.is_cross_attention else (self.to_q, self.to_k, self.to_v)

    def check_fusable(self) -> None:
        """Raise unless every projection to fuse is a plain ``nn.Linear`` (a LoRA layer's adapter would be skipped)."""
        for projection in self.fusable_projections:
            if type(projection) is not nn.Linear:
                raise ValueError(
                    f"Cannot fuse the QKV projections: a projection is a {type(projection).__name__}, not a plain "
                    "nn.Linear (a LoRA adapter is attached), and the fused product would skip the adapter. Merge it "
                    "into the weights first (`fuse_lora()` then `unload_lora()`) or remove it (`unload_lora()`), then "
                    "call fuse_qkv_projections()."
                )

    def fuse_projections(self) -> None:
        """Make the projections' weights rows of one ``fused_weight``; calling it again rebuilds the same thing."""
        self.check_fusable()
        projections = self.fusable_projections
        fused = torch.cat([p.weight.detach() for p in projections])  # (3·inner or 2·inner, in_features)
        rows = 0
        for projection in projections:
            n_rows = projection.weight.shape[0]
            projection.weight.data = fused[rows : rows + n_rows]  # same Parameter object, now a view of `fused`
            rows += n_rows
        self.fused_weight = fused

    def unfuse_projections(self) -> None:
        """Give each projection its own storage again (a no-op when not fused)."""
        if self.fused_weight is None:
            return
        for projection in self.fusable_projections:
            projection.weight.data = projection.weight.data.clone()
        self.fused_weight = None

    def _apply(self, fn: Callable, recurse: bool = True) -> "Attention":
        """``.to()``, ``.half()``, ...: convert the parameters alone, then rebuild the fused weight from them.

        The conversion gives each parameter a new tensor of its own, which would leave ``fused_weight`` a stale copy.
        """
        fused = self.fused_weight is not None
        self.fused_weight = None
        super()._apply(fn, recurse)
        if fused:
            self.fuse_projections()
        return self

    def __setstate__(self, state: dict) -> None:
        """``copy.deepcopy`` and unpickling copy each parameter on its own (``Parameter.__deepcopy__`` clones): the
        copy's fused weight would be a stale duplicate, so share again."""
        super().__setstate__(state)
        if self.fused_weight is not None:
            self.fuse_projections()

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op: Callable | None = None) -> None:
        """Called by diffusers' ``ModelMixin.enable_xformers_memory_efficient_attention`` on every module."""
        if valid and not xformers_available():
            raise ModuleNotFoundError(
                "enable_xformers_memory_efficient_attention() needs the xformers package, which is not installed: "
                "run `pip install latentdiff[xformers]` (a CUDA build of xformers matching your torch), "
                "or keep the default PyTorch SDPA attention."
            )
        self.use_xformers = valid
        self.xformers_op = attention_op

    def forward(
        self, hidden: torch.Tensor, context: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        context = hidden if context is None else context
        if self.fused_weight is None:
            query, key, value = self.to_q(hidden), self.to_k(context), self.to_v(context)
        elif self.is_cross_attention:
            query = self.to_q(hidden)
            key, value = F.linear(context, self._fused_weight()).chunk(2, dim=-1)  # (B, L, inner) each
        else:
            query, key, value = F.linear(hidden, self._fused_weight()).chunk(3, dim=-1)  # (B, N, inner) each
        out = attention(
            query,
            key,
            value,
            self.heads,
            bias=bias,
            upcast=self.upcast,
            xformers_op=self.xformers_op,
            use_xformers=self.use_xformers,
            slice_size=self.slice_size,
        )
        return self.to_out[1](self.to_out[0](out))

    def _fused_weight(self) -> torch.Tensor:
        """The stored concatenation, or, when autograd must reach the parameters, a fresh one built from them."""
        if torch.is_grad_enabled() and any(p.weight.requires_grad for p in self.fusable_projections):
            return torch.cat([p.weight for p in self.fusable_projections])  # backward splits the gradient by rows
        return self.fused_weight


def _fuse_again_after_load(module: Attention, incompatible_keys: object) -> None:
    """After ``load_state_dict``: ``assign=True`` swaps in new parameter tensors, so rebuild the fused weight."""
    if module.fused_weight is not None:
        module.fuse_projections()


def fuse_projections(model: nn.Module) -> None:
    """Fuse every `Attention` in `model`, after checking them all: a refusal leaves nothing half-fused."""
    attentions = [module for module in model.modules() if isinstance(module, Attention)]
    for module in attentions:
        module.check_fusable()
    for module in attentions:
        module.fuse_projections()


def unfuse_projections(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, Attention):
            module.unfuse_projections()


def projections_fused(model: nn.Module) -> bool:
    return any(isinstance(module, Attention) and module.fused_weight is not None for module in model.modules())
