"""Causal multi-head softmax attention with rotary positions and a KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import (
    check_bool,
    check_divisible,
    check_offset,
    check_positive,
    check_positive_number,
)
from .cache import LayerCache
from .rotary import rotate_qk


class CausalSelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(D), causal) V over [B, H, T, D] via ``scaled_dot_product_attention``.

    Args:
        dim: model width.
        num_heads: attention heads H.
        head_dim: width D per head; default ``dim // num_heads``.
        rotary: rotate q and k by position (same rotation as retention).
        bias: bias in the projections.
        out_proj: apply W_O; when False return the [B, T, H * D] head outputs (type-C layers).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int | None = None,
        *,
        rotary: bool = True,
        rope_base: float = 10000.0,
        bias: bool = False,
        out_proj: bool = True,
    ) -> None:
        super().__init__()
        check_positive("dim", dim)
        check_positive("num_heads", num_heads)
        if head_dim is None:
            check_divisible(dim, num_heads)
            head_dim = dim // num_heads
        check_positive("head_dim", head_dim)
        for name, flag in (("rotary", rotary), ("bias", bias), ("out_proj", out_proj)):
            check_bool(name, flag)
        check_positive_number("rope_base", rope_base)
        if rotary and head_dim % 2:
            raise ValueError(f"rotary needs an even head_dim, got {head_dim}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.rotary, self.rope_base = rotary, rope_base
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(dim, inner, bias=bias)
        self.k_proj = nn.Linear(dim, inner, bias=bias)
        self.v_proj = nn.Linear(dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, dim, bias=bias) if out_proj else None
        self.out_features = dim if out_proj else inner

    def forward(
        self,
        x: Tensor,
        past: tuple[Tensor, Tensor] | None = None,
        offset: int = 0,
        return_kv: bool = False,
    ) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
        """Attention over x [B, T, dim] at positions ``offset`` .. ``offset + T - 1``.

        ``past``: keys and values [B, H, P, D] of the P earlier positions (rotated keys); the new
        ones are appended and every query attends to all earlier positions and itself.
        Returns ``y`` [B, T, dim], or ``(y, (keys, values))`` with all P + T positions when
        ``return_kv`` or ``past`` is given.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape [B, T, {self.dim}], got {tuple(x.shape)}")
        check_offset(offset)
        B, T, _ = x.shape
        q, k, v = (
            proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        if self.rotary:
            q, k = rotate_qk(q, k, offset, self.rope_base)
        if past is not None:
            _check_past(past, B, self.num_heads, self.head_dim, offset)
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        y = _causal_attention(q, k, v)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        if self.out_proj is not None:
            y = self.out_proj(y)
        return (y, (k, v)) if return_kv or past is not None else y

    def forward_cached(self, x: Tensor, layer_cache: LayerCache, offset: int) -> Tensor:
        """Run with a layer cache: append this call's keys and values to it.

        ``offset`` 0 starts the sequence (keys already in the cache are replaced); ``offset`` > 0
        continues it and needs the keys and values of those ``offset`` positions in the cache.
        """
        past = None
        if offset > 0:
            if layer_cache.keys is None or layer_cache.values is None:
                raise ValueError(
                    f"the cache has no attention keys/values for this layer, but offset={offset} "
                    f"earlier positions should be in it (cache kind {layer_cache.kind!r}): "
                    f"build the cache with model.new_cache(batch) and fill it from position 0"
                )
            past = (layer_cache.keys, layer_cache.values)
        out, (keys, values) = self(x, past, offset, return_kv=True)
        # NOTE: contiguous, like the concatenations of later calls: a prefill's transposed views
        # would give the cache other strides, and a compiled decode would recompile on them.
        # A concatenation is kept as it is: its .contiguous() is an alias of it, which Dynamo
        # refuses to let leave a nested compile region's body
        layer_cache.keys, layer_cache.values = _contiguous(keys), _contiguous(values)
        return out


def _contiguous(x: Tensor) -> Tensor:
    return x if x.is_contiguous() else x.contiguous()


def _check_past(past, B: int, H: int, D: int, offset: int) -> None:
    """(keys, values) of shape [B, H, P, D] each, with P == offset: the cache holds every earlier
    position (the rotary positions of the new tokens start at ``offset``). Lengths that are
    SymInts under torch.compile are not compared: that would install a guard."""
    if not (isinstance(past, (tuple, list)) and len(past) == 2):
        raise ValueError(f"past must be (keys, values) of shape [{B}, {H}, P, {D}], got {past!r}")
    for name, t in zip(("keys", "values"), past, strict=True):
        ok = isinstance(t, Tensor) and t.dim() == 4
        if not ok or (t.shape[0], t.shape[1], t.shape[3]) != (B, H, D):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"past {name} must have shape [{B}, {H}, P, {D}], got {shape}")
    p_keys, p_values = past[0].shape[2], past[1].shape[2]
    if _symbolic(p_keys, p_values, offset):
        return
    if p_keys != p_values:
        raise ValueError(
            f"past keys and values must hold the same number of positions P, got {p_keys} keys "
            f"and {p_values} values"
        )
    if p_keys != offset:
        raise ValueError(
            f"past must hold every earlier position: offset={offset} (the position of the first "
            f"new token) needs {offset} cached keys/values, got {p_keys} (a sliding-window cache "
            f"is not supported: its rotary positions would be wrong)"
        )


def _symbolic(*sizes) -> bool:
    return any(isinstance(n, torch.SymInt) for n in sizes)


def _causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Queries are the last T of the L key positions; query i sees keys j <= L - T + i."""
    T, L = q.shape[2], k.shape[2]
    if T == L:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if T == 1:
        return F.scaled_dot_product_attention(q, k, v)
    # NOTE: is_causal=True aligns the mask top-left (query 0 sees key 0 only), which is wrong
    # once earlier positions are cached; build the bottom-right aligned mask explicitly.
    q_pos = torch.arange(L - T, L, device=q.device)
    k_pos = torch.arange(L, device=q.device)
    mask = k_pos[None, :] <= q_pos[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
