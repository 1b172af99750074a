"""Multi-head attention, ``softmax(Q Kᵀ / √d) V``, with one kernel choice for the whole UNet.

PyTorch's ``scaled_dot_product_attention`` (flash / memory-efficient / math, picked by PyTorch) is the
default; xFormers' ``memory_efficient_attention`` is used when it is installed and asked for.
"""

import importlib.util
from typing import Callable

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
) -> torch.Tensor:
    """Attend ``(B, N, heads·d)`` queries over ``(B, L, heads·d)`` keys/values; returns ``(B, N, heads·d)``.

    Args:
        bias (`torch.Tensor`, *optional*):
            Additive bias broadcastable to ``(B, heads, N, L)``; ``-10000`` masks a key out (diffusers' convention).
        upcast (`bool`, defaults to `False`):
            Compute in fp32: SD-2.x's 768-px UNet overflows fp16 in ``Q Kᵀ`` otherwise.
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
            bias = bias.to(q.dtype).expand(batch, heads, n_query, key.shape[1])
        out = xformers.ops.memory_efficient_attention(q, k, v, attn_bias=bias, op=xformers_op)
        return out.reshape(batch, n_query, inner).to(out_dtype)
    q, k, v = (x.reshape(batch, x.shape[1], heads, head_dim).transpose(1, 2) for x in (query, key, value))  # (B, heads, ·, d)
    if bias is not None:
        bias = bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, heads, N, d)
    return out.transpose(1, 2).reshape(batch, n_query, inner).to(out_dtype)


class Attention(nn.Module):
    """Self-attention (``context=None``) or cross-attention on ``context`` (the text embeddings)."""

    def __init__(
        self,
        query_dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        dropout: float = 0.0,
        upcast: bool = False,
    ):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads = heads
        self.upcast = upcast
        self.use_xformers = False
        self.xformers_op: Callable | None = None
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])

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
        out = attention(
            self.to_q(hidden),
            self.to_k(context),
            self.to_v(context),
            self.heads,
            bias=bias,
            upcast=self.upcast,
            xformers_op=self.xformers_op,
            use_xformers=self.use_xformers,
        )
        return self.to_out[1](self.to_out[0](out))
