"""Converted layers: an attention module's own Q/K/V/O weights driving retention.

Each class keeps the original projections as children under their original names (state-dict
keys stay, the tensors are shared), applies the rotary embedding the model passes in with the
model family's own rotary function on the layers the original rotates (see ``rules``), and adds
two parameters in the attention's dtype: a per-head decay (``decay_logit``; gamma = sigmoid,
always computed in float32 or wider) and a per-head output RMS norm (``out_norm``). Retention
runs through ``rtpcompile.ops``: the chunkwise form for a prefill that fills the cache, "auto"
(the planner's choice) without a cache and once a state exists (recurrent for a decode step,
parallel or chunkwise for a longer continuation). ``head_mix``
keeps some heads as softmax attention (type C).

Padding: the key and value of a padded position are zeroed. For retention that is an exact key
mask (a pad adds nothing to the state, and decays depend only on distances), so a left-padded
row computes what its unpadded run computes when the model passes matching position ids.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .cache import cache_argument, check_unpacked, key_valid, layer_slot
from .decay import decay_dtype, param_dtype, resolve_logit
from .find import AttentionSite
from .placement import round_half_up
from .rules import (
    CHILDREN,
    CROSS_KWARGS,
    applies_rotary,
    attention_dropout,
    attention_softcap,
    check_children,
    check_own_parameters,
    llama_rotary,
    qk_norm_mode,
    rotate,
)


class RetrofitRetention(nn.Module):
    """Shared core of every converted layer: decay, output norm, cache, retention and mixing."""

    def __init__(
        self,
        site: AttentionSite,
        head_mix: float | None,
        decay,
        learn_decay: bool,
        eps: float,
        dtype: torch.dtype = torch.float32,
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
        heads = max(self.retention_heads, 1)
        # NOTE: the logit in float32 even for a 16-bit model: stored in bfloat16 it would move
        # 1 - gamma by up to ~1.4% (the output norm follows the model's dtype)
        logit = resolve_logit(decay, heads, head_mix, site.num_heads).to(decay_dtype(dtype))
        if learn_decay:
            self.decay_logit = nn.Parameter(logit)
        else:
            self.register_buffer("decay_logit", logit)
        self.out_norm = nn.Parameter(torch.ones(heads, site.head_dim, dtype=dtype))
        self.attn_scale = site.head_dim**-0.5
        self.softcap: float | None = None  # Gemma2's attn_logit_softcapping (softmax heads)
        self.attn_dropout = 0.0  # NOTE: the softmax heads' dropout while training (type C)

    def new_parameters(self) -> list[nn.Parameter]:
        """The parameters retrofit added (the ones distillation stage 1 trains)."""
        return [p for p in (self.decay_logit, self.out_norm) if isinstance(p, nn.Parameter)]

    def gamma(self) -> Tensor:
        """Per-head decays, float32 (float64 for a float64 logit) whatever the module dtype."""
        logit = self.decay_logit
        # NOTE: the sigmoid in float64: a float32 gamma of 1 - 2**-25 rounds to 1.0, and
        # sigmoid's float32 backward y * (1 - y) is then 0, so such heads (h >= 19 of RetNet's
        # decays) could never train; cast after it, the gradient survives
        return torch.sigmoid(logit.double()).to(decay_dtype(logit.dtype))

    def mix(self, q: Tensor, k: Tensor, v: Tensor, cache, attention_mask=None) -> Tensor:
        """q [B, H, T, D], k/v [B, H_kv, T, D] (rotated) -> mixed heads [B, T, H * D].

        ``attention_mask``: what the model passed its attention (see ``cache.key_valid``), or a
        bool [B, T] (True = real token); the K/V of padded positions are zeroed. A 4D mask that
        is not causal AND key padding (within the layer's sliding window), e.g. packed
        documents' block-diagonal mask, raises a ``ValueError``: zeroing keys cannot reproduce it.
        """
        B, H, T, D = q.shape
        q, k, v = _one_dtype(q, k, v)
        slot = layer_slot(cache, self.layer_idx)
        if slot is not None:
            slot.check_batch(B)
        valid = attention_mask
        if not (isinstance(valid, Tensor) and valid.dtype == torch.bool and valid.shape == (B, T)):
            seen = None if slot is None else slot.seen
            valid = key_valid(attention_mask, B, T, seen, window=self.site.sliding_window)
        if valid is not None:
            keep = valid[:, None, :, None].to(k.device)
            k, v = torch.where(keep, k, 0.0), torch.where(keep, v, 0.0)
        group = H // k.shape[1]
        r, rk = self.retention_heads, self.retention_kv_heads
        parts = []
        if r > 0:
            kr = k[:, :rk].repeat_interleave(group, dim=1)
            vr = v[:, :rk].repeat_interleave(group, dim=1)
            parts.append(self._norm(self._retain(q[:, :r], kr, vr, slot)))
        if r < H:
            parts.append(self._attend(q[:, r:], k[:, rk:], v[:, rk:], slot, group, valid))
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
            # NOTE: "auto" with the state: the planner runs the recurrent form for a decode step
            # (T = 1, or T <= 16 with a state) and parallel/chunkwise for a longer continuation
            # (the recurrent form is a loop over T: 2000 tokens after a 10-token prefill took
            # 6x the same tokens as a prefill)
            o, state = ops.retention(
                q, k, v, gamma, form="auto", initial_state=slot.state, output_final_state=True
            )
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

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, slot, group: int, valid: Tensor | None
    ) -> Tensor:
        """Softmax heads of a type-C layer, K/V (and which are padding) cached with the state.

        A sliding-window layer keeps its window: a query sees the last ``window`` positions, itself
        included (Hugging Face's convention), and the cache keeps only the last ``window - 1`` K/V.
        """
        T = q.shape[-2]
        window = self.site.sliding_window
        if slot is not None:
            k, v = slot.update(k, v)
            valid = slot.update_valid(valid, T)
            if window is not None:
                slot.keep_last(max(window - 1, 1))
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        L = k.shape[-2]
        p = self.attn_dropout if self.training else 0.0
        if T > 1 and L == T and valid is None and (window is None or T <= window):
            # NOTE: a plain causal prefill: SDPA's own causal flag keeps its fused kernels; a
            # [T, T] bool mask sent it down the math path (O(T^2) memory, 2-2.4x slower at
            # T = 4096-8192 on CPU)
            if self.softcap is None:
                return F.scaled_dot_product_attention(
                    q, k, v, dropout_p=p, is_causal=True, scale=self.attn_scale
                )
        mask = None
        if T > 1 or valid is not None or (window is not None and L > window):
            rows = torch.arange(L - T, L, device=q.device)[:, None]
            cols = torch.arange(L, device=q.device)[None, :]
            mask = cols <= rows
            if window is not None:
                mask = mask & (cols > rows - window)
            if valid is not None:
                # NOTE: a query always sees itself, so a padded query's row is never empty (NaN).
                mask = (mask & valid[:, None, None, :].to(q.device)) | (cols == rows)
        if self.softcap is None:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, scale=self.attn_scale
            )
        return _capped_attention(q, k, v, mask, self.attn_scale, self.softcap, p)

    def extra_repr(self) -> str:
        s = self.site
        kind = "retention" if self.retention_heads == s.num_heads else "hybrid (type C)"
        return (
            f"{kind}, layer={s.index}, heads={s.num_heads}, kv_heads={s.num_kv_heads}, "
            f"retention_heads={self.retention_heads}, head_dim={s.head_dim}, "
            f"converted_from={s.family}:{s.name}"
        )


def _one_dtype(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v in one dtype: autocast's when it is on (as the attention they replace would run;
    autocast leaves float64 alone), else their promoted type (the rotary promotes 16-bit q/k
    times float32 cos/sin)."""
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if dtype != torch.float64 and torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _capped_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, cap: float, p: float = 0.0
) -> Tensor:
    """Softmax attention with Gemma2's logit soft cap, ``cap * tanh(s / cap)`` before the mask
    (its eager path; SDPA has no soft cap)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / cap) * cap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(F.dropout(weights, p) if p else weights, v)


def _heads(x: Tensor, head_dim: int) -> Tensor:
    """[B, T, H * D] -> [B, H, T, D]."""
    return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)


class LlamaStyleRetention(RetrofitRetention):
    """Converted Llama-style attention (separate q/k/v/o projections, GQA, RoPE).

    Covers Llama, Mistral, Qwen2/3, Gemma, Cohere, GLM, StableLM, OLMo/OLMo2, ...: optional
    per-head or whole-width q/k norms, OLMo's ``clip_qkv``, partial rotary (cos/sin narrower
    than the head: the first channels rotate, the rest pass through) and the family's own
    rotary convention (``apply_rotary_pos_emb`` of the attention's module).
    """

    def __init__(self, original: nn.Module, site: AttentionSite, **kw) -> None:
        check_children(original)
        norm_mode = qk_norm_mode(original, site)
        super().__init__(site, dtype=param_dtype(original), **kw)
        for name in CHILDREN:
            if isinstance(getattr(original, name, None), nn.Module):
                setattr(self, name, getattr(original, name))
        self.qk_norm = norm_mode
        self.attn_scale = float(getattr(original, "scaling", self.attn_scale))
        self.softcap = attention_softcap(original)
        self.attn_dropout = attention_dropout(original)
        self.config = getattr(original, "config", None)
        clip = getattr(self.config, "clip_qkv", None)
        self.clip_qkv = float(clip) if isinstance(clip, (int, float)) and clip else None
        self.head_dim = site.head_dim
        module = sys.modules.get(type(original).__module__)
        fn = getattr(module, "apply_rotary_pos_emb", None)
        # NOTE: the family's function carries its convention (Cohere/GLM rotate adjacent pairs,
        # Llama rotates halves); a plain function, so the module stays picklable and compilable.
        self.rotary_fn = fn if callable(fn) else llama_rotary
        self.use_rotary = applies_rotary(original)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, dim] -> q [B, H, T, D], k and v [B, H_kv, T, D] (not yet rotated)."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.clip_qkv is not None:  # OLMo
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        if self.qk_norm == "flat":  # OLMo2: one norm over the whole projection
            q, k = self.q_norm(q), self.k_norm(k)
        shape = (*x.shape[:-1], -1, self.head_dim)
        q, k, v = q.view(shape), k.view(shape), v.view(shape)
        if self.qk_norm == "head":  # Qwen3, Gemma3, Cohere: per-head norms
            q, k = self.q_norm(q), self.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings=None,
        attention_mask=None,
        past_key_values=None,
        **kwargs,
    ):
        for name in CROSS_KWARGS:
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"a converted retention layer is causal self-attention only, got {name} "
                    f"({self.site.name} is cross-attention; keep it as attention)"
                )
        check_unpacked(attention_mask, kwargs, getattr(self.config, "_attn_implementation", None))
        if position_embeddings is not None and not _cos_sin(position_embeddings):
            # NOTE: a module whose own forward is (x, mask) called positionally: the mask would
            # be taken for the rotary embedding
            raise ValueError(
                f"{self.site.name}: position_embeddings must be the rotary (cos, sin) pair "
                f"Hugging Face passes, got {type(position_embeddings).__name__}; a converted "
                "Llama-style layer takes (hidden_states, position_embeddings, attention_mask, "
                "...): pass the mask as attention_mask="
            )
        q, k, v = self._project(hidden_states)
        if position_embeddings is not None and self.use_rotary:
            q, k = rotate(self.rotary_fn, q, k, *position_embeddings)
        cache = cache_argument(past_key_values, kwargs)
        return self.o_proj(self.mix(q, k, v, cache, attention_mask)), None


class GPT2StyleRetention(RetrofitRetention):
    """Converted GPT-2 attention: fused ``c_attn`` (Conv1D or Linear) and ``c_proj``; no rotary.

    Also GPTBigCode: with ``multi_query`` its c_attn is q | k | v with one K/V head, without it
    the q, k, v of each head sit side by side ([H, 3 * D]).
    """

    def __init__(self, original: nn.Module, site: AttentionSite, **kw) -> None:
        check_own_parameters(original)
        super().__init__(site, dtype=param_dtype(original), **kw)
        self.c_attn, self.c_proj = original.c_attn, original.c_proj
        self.resid_dropout = getattr(original, "resid_dropout", nn.Identity())
        # NOTE: GPTBigCode without multi_query interleaves q/k/v per head in c_attn
        self.per_head = getattr(original, "multi_query", None) is False
        self.attn_scale = float(getattr(original, "scaling", self.attn_scale))
        self.attn_dropout = attention_dropout(original)
        self.config = getattr(original, "config", None)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, dim] -> q [B, H, T, D], k and v [B, H_kv, T, D]."""
        s, d = self.site, self.site.head_dim
        qkv = self.c_attn(x)
        if self.per_head:
            q, k, v = qkv.view(*x.shape[:-1], s.num_heads, 3 * d).split(d, dim=-1)
            return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k, v = qkv.split([s.num_heads * d, s.num_kv_heads * d, s.num_kv_heads * d], dim=-1)
        return _heads(q, d), _heads(k, d), _heads(v, d)

    def forward(self, hidden_states: Tensor, past_key_values=None, attention_mask=None, **kwargs):
        if kwargs.get("encoder_hidden_states") is not None:
            raise ValueError(
                "a converted GPT-2 layer is self-attention only (got encoder_hidden_states)"
            )
        check_unpacked(attention_mask, kwargs, getattr(self.config, "_attn_implementation", None))
        cache = cache_argument(past_key_values, kwargs)
        q, k, v = self._project(hidden_states)
        o = self.mix(q, k, v, cache, attention_mask)
        return self.resid_dropout(self.c_proj(o)), None


def _cos_sin(position_embeddings) -> bool:
    return isinstance(position_embeddings, (tuple, list)) and len(position_embeddings) == 2


CONVERTERS = {
    "llama": LlamaStyleRetention,
    "gpt2": GPT2StyleRetention,
}

# NOTE: imported last: these layers subclass RetrofitRetention defined above.
from .family_layers import FAMILY_CONVERTERS  # noqa: E402
from .plain_layers import GenericRetention, MultiheadRetention  # noqa: E402

CONVERTERS.update(mha=MultiheadRetention, generic=GenericRetention)
CONVERTERS.update(FAMILY_CONVERTERS)
