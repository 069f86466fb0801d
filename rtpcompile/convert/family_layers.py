"""Converted Phi-3, GPT-NeoX (Pythia), Phi and Falcon attention (see ``families``).

Each class keeps the original projections as children under their original names (state-dict
keys stay, tensors are shared), splits q/k/v exactly as the original's ``forward`` does, rotates
them with the family's own ``apply_rotary_pos_emb`` (partial rotary: the first channels of each
head, as wide as the cos/sin the model passes) when the original does (``rules.applies_rotary``)
and hands them to ``RetrofitRetention.mix`` (retention, cache, type-C softmax heads). They take
the cache as ``past_key_values`` (Phi-3, Phi) or ``layer_past`` (GPT-NeoX, Falcon) and return
``(output, None)`` like the attention they replace.
"""

from __future__ import annotations

import abc
import sys

from torch import Tensor, nn

from .cache import cache_argument, check_unpacked
from .decay import param_dtype
from .find import AttentionSite
from .layers import RetrofitRetention, _heads
from .rules import (
    CROSS_KWARGS,
    applies_rotary,
    attention_dropout,
    check_children,
    llama_rotary,
    rotate,
)

_QK_NORMS = ("q_layernorm", "k_layernorm")


class FusedRotaryRetention(RetrofitRetention, metaclass=abc.ABCMeta):
    """Shared part of the four families: children, rotary, forward. Subclasses split q/k/v."""

    PROJECTIONS: tuple[str, ...] = ()  # children applied by ``_project``
    OUT = "dense"  # the output projection
    NORMS: tuple[str, ...] = ()  # optional per-head q/k LayerNorms
    ASSUME: dict = {}  # forward arguments taken as known when reading the rotary guard

    def __init__(self, original: nn.Module, site: AttentionSite, **kw) -> None:
        used = (*self.PROJECTIONS, self.OUT, *self.NORMS)
        check_children(original, used)
        super().__init__(site, dtype=param_dtype(original), **kw)
        for name in used:
            if isinstance(getattr(original, name, None), nn.Module):
                setattr(self, name, getattr(original, name))
        self.head_dim = site.head_dim
        self.attn_scale = float(getattr(original, "scaling", self.attn_scale))
        self.attn_dropout = attention_dropout(original)
        self.config = getattr(original, "config", None)
        module = sys.modules.get(type(original).__module__)
        fn = getattr(module, "apply_rotary_pos_emb", None)
        # NOTE: a plain module-level function, so the layer stays picklable and compilable.
        self.rotary_fn = fn if callable(fn) else llama_rotary
        self.use_rotary = applies_rotary(original, self.ASSUME)

    @abc.abstractmethod
    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, dim] -> q [B, H, T, D], k and v [B, H_kv, T, D] (not yet rotated); each
        family's layout is its subclass's."""

    def _qk_norm(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Phi's and Persimmon's optional per-head LayerNorms (before the rotary)."""
        if isinstance(getattr(self, "q_layernorm", None), nn.Module):
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        return q, k

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings=None,
        attention_mask=None,
        past_key_values=None,
        layer_past=None,
        alibi=None,
        **kwargs,
    ):
        if alibi is not None:
            raise ValueError(
                f"{self.site.name} was converted to retention but is called with ALiBi biases; "
                "retention has no ALiBi (keep ALiBi layers as attention)"
            )
        for name in CROSS_KWARGS:
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"a converted retention layer is causal self-attention only, got {name}"
                )
        check_unpacked(attention_mask, kwargs, getattr(self.config, "_attn_implementation", None))
        cache = cache_argument(past_key_values, {**kwargs, "layer_past": layer_past})
        q, k, v = self._project(hidden_states)
        q, k = self._qk_norm(q, k)
        if position_embeddings is not None and self.use_rotary:
            q, k = rotate(self.rotary_fn, q, k, *position_embeddings)
        out = getattr(self, self.OUT)
        return out(self.mix(q, k, v, cache, attention_mask)), None


def _per_head(qkv: Tensor, heads: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """A projection laid out per head as [H, 3, D] -> q, k, v [B, H, T, D]."""
    q, k, v = qkv.view(*qkv.shape[:-1], heads, 3 * head_dim).transpose(1, 2).split(head_dim, -1)
    return q, k, v


class Phi3Retention(FusedRotaryRetention):
    """Converted Phi-3 attention: fused ``qkv_proj`` laid out [q | k | v] with GQA widths
    (H * D, H_kv * D, H_kv * D), ``o_proj``, (partial) rotary."""

    PROJECTIONS = ("qkv_proj",)
    OUT = "o_proj"

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s, d = self.site, self.head_dim
        widths = [s.num_heads * d, s.num_kv_heads * d, s.num_kv_heads * d]
        q, k, v = self.qkv_proj(x).split(widths, dim=-1)
        return _heads(q, d), _heads(k, d), _heads(v, d)


class NeoXRetention(FusedRotaryRetention):
    """Converted GPT-NeoX (Pythia) attention: ``query_key_value`` interleaved per head
    ([H, 3, D] along its output features), ``dense``, partial rotary (``rotary_pct``). Also
    Persimmon (same layout, optional per-head ``q_layernorm``/``k_layernorm``)."""

    PROJECTIONS = ("query_key_value",)
    NORMS = _QK_NORMS

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return _per_head(self.query_key_value(x), self.site.num_heads, self.head_dim)


class PhiRetention(FusedRotaryRetention):
    """Converted Phi (phi-1/1.5/2) attention: ``q_proj``/``k_proj``/``v_proj``, ``dense``,
    partial rotary, optional per-head ``q_layernorm``/``k_layernorm``."""

    PROJECTIONS = ("q_proj", "k_proj", "v_proj")
    NORMS = _QK_NORMS

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        d = self.head_dim
        return _heads(self.q_proj(x), d), _heads(self.k_proj(x), d), _heads(self.v_proj(x), d)


class FalconRetention(FusedRotaryRetention):
    """Converted Falcon attention (rotary; ALiBi layers are never converted). ``query_key_value``
    has three layouts: ``new_decoder_architecture`` groups it per K/V head as [q x H/H_kv, k, v],
    ``multi_query`` is [q | k | v] with one K/V head, otherwise it is per head [q, k, v]."""

    PROJECTIONS = ("query_key_value",)
    # NOTE: Falcon rotates under `if alibi is None:`; an ALiBi model is refused by discovery
    # and forward raises if biases arrive, so the converted layer always sees alibi None.
    ASSUME = {"alibi": None}

    def __init__(self, original: nn.Module, site: AttentionSite, **kw) -> None:
        super().__init__(original, site, **kw)
        # NOTE: the same reading of the switches as families._fused_kv (which checked the widths)
        if getattr(original, "new_decoder_architecture", False) is True:
            self.layout = "grouped"
        elif getattr(original, "multi_query", False) is True:
            self.layout = "multi_query"
        else:
            self.layout = "per_head"

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s, d = self.site, self.head_dim
        qkv = self.query_key_value(x)
        if self.layout == "per_head":
            return _per_head(qkv, s.num_heads, d)
        if self.layout == "multi_query":
            q, k, v = qkv.split([s.num_heads * d, d, d], dim=-1)
            return _heads(q, d), _heads(k, d), _heads(v, d)
        group = s.num_heads // s.num_kv_heads
        g = qkv.view(*x.shape[:-1], s.num_kv_heads, group + 2, d)
        q = g[..., :group, :].flatten(-3, -2)  # [B, T, H_kv * group, D]: query heads in order
        k, v = g[..., group, :], g[..., group + 1, :]  # [B, T, H_kv, D]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


FAMILY_CONVERTERS = {
    "phi3": Phi3Retention,
    "neox": NeoXRetention,
    "phi": PhiRetention,
    "falcon": FalconRetention,
}
