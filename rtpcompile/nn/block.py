"""Pre-norm residual blocks: x + mixer(norm(x)), then x + ffn(norm(x)).

The mixer is retention, causal attention, or (type C) a layer whose heads are split between
retention and attention, concatenated and projected together.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_choice, check_divisible, check_positive, check_positive_number
from .attention import CausalSelfAttention
from .cache import LayerCache
from .retention import MultiScaleRetention

MIXERS = ("retention", "attention", "hybrid")
NORMS = ("rmsnorm", "layernorm")
FFNS = ("swiglu", "gelu")


def make_norm(kind: str, dim: int, eps: float = 1e-6) -> nn.Module:
    """RMSNorm or LayerNorm over the last dimension."""
    check_choice("norm", kind, NORMS)
    check_positive_number("norm_eps", eps)
    return nn.RMSNorm(dim, eps=eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps)


class FeedForward(nn.Module):
    """SwiGLU ``W_2 (silu(x W_1) * x W_3)`` or GELU ``W_2 gelu(x W_1)`` MLP.

    The hidden width is ``ffn_mult * dim`` rounded up to a multiple of 8.
    """

    def __init__(
        self, dim: int, ffn_mult: float = 8 / 3, kind: str = "swiglu", bias: bool = False
    ) -> None:
        super().__init__()
        check_choice("ffn", kind, FFNS)
        check_positive_number("ffn_mult", ffn_mult)
        # NOTE: rounded to 6 decimals first: 2.2 * 200 is 440.00000000000006 in binary floating
        # point, which rounded up to 448
        hidden = 8 * math.ceil(round(ffn_mult * dim, 6) / 8)
        self.kind, self.hidden = kind, hidden
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w3 = nn.Linear(dim, hidden, bias=bias) if kind == "swiglu" else None
        self.w2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x)))


class HybridHeadMixer(nn.Module):
    """Type-C layer: ``W_O concat(MHA_{h_A}(x), MSR_{h_R}(x))`` (Retformer, eq. 11).

    ``retention_heads`` of the ``num_heads`` heads are retention heads (with their own GroupNorm
    and gate), the rest attention heads; both use ``head_dim = dim // num_heads`` for q and k.
    Needs 0 < retention_heads < num_heads; RTPBlock uses a plain mixer otherwise.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        retention_heads: int,
        *,
        head_dim_v: int | None = None,
        bias: bool = False,
        **retention_kwargs,
    ) -> None:
        super().__init__()
        check_divisible(dim, num_heads)
        if num_heads < 2:
            raise ValueError(
                f"a hybrid (type C) layer splits its heads between retention and attention, so "
                f"it needs num_heads >= 2, got {num_heads}"
            )
        if not 0 < retention_heads < num_heads:
            raise ValueError(
                f"retention_heads must be in [1, {num_heads - 1}] for a hybrid layer, "
                f"got {retention_heads}"
            )
        head_dim = dim // num_heads
        rotary = retention_kwargs.get("rotary", True)
        rope_base = retention_kwargs.get("rope_base", 10000.0)
        self.attention = CausalSelfAttention(
            dim,
            num_heads - retention_heads,
            head_dim,
            rotary=rotary,
            rope_base=rope_base,
            bias=bias,
            out_proj=False,
        )
        self.retention = MultiScaleRetention(
            dim,
            retention_heads,
            head_dim,
            head_dim_v,
            bias=bias,
            out_proj=False,
            **retention_kwargs,
        )
        width = self.attention.out_features + self.retention.out_features
        self.out_proj = nn.Linear(width, dim, bias=bias)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        ya = self.attention(x, offset=offset)
        yr = self.retention(x, offset=offset)
        return self.out_proj(torch.cat([ya, yr], dim=-1))

    def forward_cached(self, x: Tensor, layer_cache: LayerCache, offset: int) -> Tensor:
        ya = self.attention.forward_cached(x, layer_cache, offset)
        yr = self.retention.forward_cached(x, layer_cache, offset)
        return self.out_proj(torch.cat([ya, yr], dim=-1))


class RTPBlock(nn.Module):
    """``x = x + mixer(norm1(x)); x = x + ffn(norm2(x))``.

    Args:
        dim, num_heads: width and heads of the mixer (dim must be divisible by num_heads).
        mixer: "retention" (MultiScaleRetention), "attention" (causal softmax attention) or
            "hybrid" (type C: ``retention_heads`` retention heads, the rest attention).
        retention_heads: for "hybrid" only; default half of the heads.
        head_dim_v: value width of retention heads (default 2 * dim // num_heads).
        ffn, ffn_mult: "swiglu" or "gelu" MLP, hidden width ffn_mult * dim.
        norm, norm_eps: "rmsnorm" or "layernorm" before the mixer and the MLP.
        rotary, rope_base, gate, group_norm, learnable_decay: passed to the mixers.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mixer: str = "retention",
        *,
        retention_heads: int | None = None,
        head_dim_v: int | None = None,
        ffn: str = "swiglu",
        ffn_mult: float = 8 / 3,
        norm: str = "rmsnorm",
        norm_eps: float = 1e-6,
        rotary: bool = True,
        rope_base: float = 10000.0,
        gate: bool = True,
        group_norm: bool = True,
        learnable_decay: bool = False,
        bias: bool = False,
    ) -> None:
        super().__init__()
        check_choice("mixer", mixer, MIXERS)
        check_positive("dim", dim)
        check_positive("num_heads", num_heads)
        check_divisible(dim, num_heads)
        if retention_heads is not None and mixer != "hybrid":
            raise ValueError(
                f"retention_heads is for mixer='hybrid' only, got mixer={mixer!r} with "
                f"retention_heads={retention_heads!r}"
            )
        self.kind = mixer
        ret_kwargs = dict(
            rotary=rotary,
            rope_base=rope_base,
            gate=gate,
            group_norm=group_norm,
            learnable_decay=learnable_decay,
        )
        if mixer == "retention":
            self.mixer = MultiScaleRetention(
                dim, num_heads, head_dim_v=head_dim_v, bias=bias, **ret_kwargs
            )
        elif mixer == "attention":
            self.mixer = CausalSelfAttention(
                dim, num_heads, rotary=rotary, rope_base=rope_base, bias=bias
            )
        else:
            heads = num_heads // 2 if retention_heads is None else retention_heads
            self.mixer = HybridHeadMixer(
                dim, num_heads, heads, head_dim_v=head_dim_v, bias=bias, **ret_kwargs
            )
        self.norm1 = make_norm(norm, dim, norm_eps)
        self.norm2 = make_norm(norm, dim, norm_eps)
        self.ffn = FeedForward(dim, ffn_mult, ffn, bias)

    def forward(self, x: Tensor, layer_cache: LayerCache | None = None, offset: int = 0) -> Tensor:
        """x [B, T, dim] at positions offset ..; with ``layer_cache`` the mixer reads and
        updates it (retention state and/or keys and values)."""
        h = self.norm1(x)
        if layer_cache is None:
            h = self.mixer(h, offset=offset)
        else:
            h = self.mixer.forward_cached(h, layer_cache, offset)
        x = x + h
        return x + self.ffn(self.norm2(x))

    def new_layer_cache(self, batch: int, device=None, dtype: torch.dtype = torch.float32):
        """An empty cache for this layer: a zero retention state and/or no keys yet."""
        if self.kind == "attention":
            return LayerCache("attention")
        msr = self.mixer if self.kind == "retention" else self.mixer.retention
        return LayerCache(self.kind, state=msr.init_state(batch, device, dtype))
