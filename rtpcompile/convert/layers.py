"""Converted layers: an attention module's own Q/K/V/O weights driving retention.

Each class keeps the original projections as children under their original names (so a
state dict keeps its keys and shares the tensors), keeps the rotary embedding the model passes
in, and adds two new parameters: a per-head decay (``decay_logit``, gamma = sigmoid) and a
per-head output RMS norm (``out_norm``). Retention runs through ``rtpcompile.ops``: the chunkwise
form for a prefill that fills the cache, the recurrent form once a state exists, "auto" (the
planner's choice) without a cache. ``head_mix`` keeps some heads as softmax attention (type C).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .cache import layer_slot
from .find import AttentionSite, round_half_up


def resolve_decay(decay, num_heads: int) -> Tensor:
    """Per-head gamma, float32 [num_heads], from "retnet", a sequence/tensor or a callable."""
    if isinstance(decay, str):
        if decay != "retnet":
            raise ValueError(
                f"decay must be 'retnet', a sequence, a tensor or a callable, got {decay!r}"
            )
        return ops.retention_init_decay(num_heads)
    values = decay(num_heads) if callable(decay) else decay
    gamma = torch.as_tensor(values, dtype=torch.float32).flatten().cpu()
    if gamma.numel() == 1:
        gamma = gamma.expand(num_heads).clone()
    if gamma.shape != (num_heads,):
        raise ValueError(f"decay must give {num_heads} values (one per head), got {gamma.numel()}")
    if bool(((gamma <= 0) | (gamma >= 1)).any()):
        raise ValueError(f"decay values must lie in (0, 1), got {gamma.tolist()}")
    return gamma


class RetrofitRetention(nn.Module):
    """Shared core of every converted layer: decay, output norm, cache, retention and mixing."""

    def __init__(
        self, site: AttentionSite, head_mix: float | None, decay, learn_decay: bool, eps: float
    ) -> None:
        super().__init__()
        self.site = site
        group = site.num_heads // site.num_kv_heads
        kv_ret = site.num_kv_heads
        if head_mix is not None:  # NOTE: at least one K/V group becomes retention
            kv_ret = min(site.num_kv_heads, max(1, round_half_up(head_mix * site.num_kv_heads)))
        self.retention_heads = kv_ret * group  # NOTE: whole GQA groups, so K/V heads split cleanly
        self.retention_kv_heads = kv_ret
        self.layer_idx = site.cache_index
        self.eps = eps
        logit = torch.logit(resolve_decay(decay, max(self.retention_heads, 1)).double()).float()
        if learn_decay:
            self.decay_logit = nn.Parameter(logit)
        else:
            self.register_buffer("decay_logit", logit)
        self.out_norm = nn.Parameter(torch.ones(max(self.retention_heads, 1), site.head_dim))
        self.attn_scale = site.head_dim**-0.5

    def new_parameters(self) -> list[nn.Parameter]:
        """The parameters retrofit added (the ones distillation stage 1 trains)."""
        return [p for p in (self.decay_logit, self.out_norm) if isinstance(p, nn.Parameter)]

    def gamma(self) -> Tensor:
        return torch.sigmoid(self.decay_logit)

    def mix(self, q: Tensor, k: Tensor, v: Tensor, cache) -> Tensor:
        """q [B, H, T, D], k/v [B, H_kv, T, D] (rotated) -> mixed heads [B, T, H * D]."""
        B, H, T, D = q.shape
        group = H // k.shape[1]
        slot = layer_slot(cache, self.layer_idx)
        r, rk = self.retention_heads, self.retention_kv_heads
        parts = []
        if r > 0:
            kr = k[:, :rk].repeat_interleave(group, dim=1)
            vr = v[:, :rk].repeat_interleave(group, dim=1)
            parts.append(self._norm(self._retain(q[:, :r], kr, vr, slot)))
        if r < H:
            parts.append(self._attend(q[:, r:], k[:, rk:], v[:, rk:], slot, group))
        if slot is not None:
            slot.seen += T
        o = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return o.transpose(1, 2).reshape(B, T, H * D)

    def _retain(self, q: Tensor, k: Tensor, v: Tensor, slot) -> Tensor:
        gamma = self.gamma().to(q.device)
        if slot is None:
            return ops.retention(q, k, v, gamma, form="auto")
        if slot.state is None:
            o, state = ops.retention_chunkwise(q, k, v, gamma, output_final_state=True)
        else:
            o, state = ops.retention_recurrent(q, k, v, gamma, slot.state)
        slot.state = state.detach() if not torch.is_grad_enabled() else state
        return o

    def _norm(self, o: Tensor) -> Tensor:
        # NOTE: the retention sum is unnormalised (it grows with 1 / (1 - gamma)); a per-head RMS
        # norm brings it back to the scale of an attention average before the output projection.
        dtype = torch.promote_types(o.dtype, torch.float32)
        x = o.to(dtype)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        x = x * self.out_norm[: o.shape[1], None, :].to(dtype)
        return x.to(o.dtype)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, slot, group: int) -> Tensor:
        """Softmax heads of a type-C layer, K/V cached in the same slot as the state."""
        if slot is not None:
            k, v = slot.update(k, v)
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        T, L = q.shape[-2], k.shape[-2]
        mask = None
        if T > 1:
            mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(diagonal=L - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.attn_scale)

    def extra_repr(self) -> str:
        s = self.site
        kind = "retention" if self.retention_heads == s.num_heads else "hybrid (type C)"
        return (
            f"{kind}, layer={s.index}, heads={s.num_heads}, kv_heads={s.num_kv_heads}, "
            f"retention_heads={self.retention_heads}, head_dim={s.head_dim}, "
            f"converted_from={s.family}:{s.name}"
        )


def _heads(x: Tensor, head_dim: int) -> Tensor:
    """[B, T, H * D] -> [B, H, T, D]."""
    return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class LlamaStyleRetention(RetrofitRetention):
    """Converted Llama/Mistral/Qwen2-style attention (separate q/k/v/o projections, GQA, RoPE)."""

    def __init__(self, original: nn.Module, site: AttentionSite, **kw) -> None:
        super().__init__(site, **kw)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            if isinstance(getattr(original, name, None), nn.Module):
                setattr(self, name, getattr(original, name))
        self.attn_scale = float(getattr(original, "scaling", self.attn_scale))
        self.config = getattr(original, "config", None)
        self.head_dim = site.head_dim

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings=None,
        attention_mask=None,
        past_key_values=None,
        **kwargs,
    ):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k = self.q_proj(hidden_states).view(shape), self.k_proj(hidden_states).view(shape)
        if hasattr(self, "q_norm"):  # Qwen3-style per-head q/k norms
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if position_embeddings is not None:
            cos, sin = (t.unsqueeze(1) for t in position_embeddings)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        return self.o_proj(self.mix(q, k, v, past_key_values)), None


class GPT2StyleRetention(RetrofitRetention):
    """Converted GPT-2 attention: fused ``c_attn`` (Conv1D) and ``c_proj``; no rotary."""

    def __init__(self, original: nn.Module, site: AttentionSite, **kw) -> None:
        super().__init__(site, **kw)
        self.c_attn, self.c_proj = original.c_attn, original.c_proj
        self.resid_dropout = getattr(original, "resid_dropout", nn.Identity())
        self.split_size = original.split_size
        self.attn_scale = float(getattr(original, "scaling", self.attn_scale))
        self.config = getattr(original, "config", None)

    def forward(self, hidden_states: Tensor, past_key_values=None, attention_mask=None, **kwargs):
        if kwargs.get("encoder_hidden_states") is not None:
            raise ValueError(
                "a converted GPT-2 layer is self-attention only (got encoder_hidden_states)"
            )
        q, k, v = self.c_attn(hidden_states).split(self.split_size, dim=2)
        d = self.site.head_dim
        o = self.mix(_heads(q, d), _heads(k, d), _heads(v, d), past_key_values)
        return self.resid_dropout(self.c_proj(o)), None


class MultiheadRetention(RetrofitRetention):
    """Converted ``nn.MultiheadAttention`` (self-attention, causal; packed in_proj weights)."""

    def __init__(self, original: nn.MultiheadAttention, site: AttentionSite, **kw) -> None:
        if not original._qkv_same_embed_dim:
            raise ValueError("nn.MultiheadAttention with kdim/vdim != embed_dim is not supported")
        super().__init__(site, **kw)
        self.in_proj_weight = original.in_proj_weight
        self.in_proj_bias = original.in_proj_bias
        self.out_proj = original.out_proj
        self.batch_first = original.batch_first

    def forward(
        self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None, *args, **kwargs
    ):
        for name, other in (("key", key), ("value", value)):
            if other is not None and other is not query and other.shape != query.shape:
                raise ValueError(
                    f"a converted MultiheadAttention is self-attention only: {name} has shape "
                    f"{tuple(other.shape)}, query {tuple(query.shape)}"
                )
        x = query if self.batch_first or query.dim() == 2 else query.transpose(0, 1)
        squeeze = x.dim() == 2
        x = x.unsqueeze(0) if squeeze else x
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        d = self.site.head_dim
        o = self.out_proj(self.mix(_heads(q, d), _heads(k, d), _heads(v, d), None))
        o = o.squeeze(0) if squeeze else o
        o = o if self.batch_first or squeeze else o.transpose(0, 1)
        return o, None


class GenericRetention(RetrofitRetention):
    """A predicate-picked module with q/k/v (or fused qkv) and an output Linear.

    Called as ``module(x, *ignored)`` with x [B, T, dim] (batch first); returns a tensor.
    """

    def __init__(self, original: nn.Module, site: AttentionSite, **kw) -> None:
        super().__init__(site, **kw)
        from .find import _fused_qkv, _out_proj

        self._fused = _fused_qkv(original) if not hasattr(original, "q_proj") else None
        names = [self._fused] if self._fused else ["q_proj", "k_proj", "v_proj"]
        self._out = _out_proj(original)
        for name in [*names, self._out]:
            setattr(self, name, getattr(original, name))

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self._fused:
            q, k, v = getattr(self, self._fused)(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        d = self.site.head_dim
        return getattr(self, self._out)(self.mix(_heads(q, d), _heads(k, d), _heads(v, d), None))


CONVERTERS = {
    "llama": LlamaStyleRetention,
    "gpt2": GPT2StyleRetention,
    "mha": MultiheadRetention,
    "generic": GenericRetention,
}
