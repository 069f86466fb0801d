"""Converted layers outside the Hugging Face families: ``nn.MultiheadAttention`` and a module
picked by a user predicate (q/k/v or a fused qkv, and an output Linear). See layers.py for what
every converted layer shares.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .cache import mha_valid
from .decay import param_dtype
from .find import AttentionSite
from .layers import RetrofitRetention, _heads


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    return a is b or (
        a.shape == b.shape
        and a.dtype == b.dtype
        and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


class MultiheadRetention(RetrofitRetention):
    """Converted ``nn.MultiheadAttention`` (self-attention, causal; packed in_proj weights).

    ``key``/``value`` must be the query tensor itself (self-attention); ``key_padding_mask`` and
    padding columns of ``attn_mask`` zero the padded keys; the layer is causal whatever
    ``is_causal`` says.
    """

    def __init__(self, original: nn.MultiheadAttention, site: AttentionSite, **kw) -> None:
        if not original._qkv_same_embed_dim:
            raise ValueError("nn.MultiheadAttention with kdim/vdim != embed_dim is not supported")
        if original.bias_k is not None or original.add_zero_attn:
            # NOTE: a learned (or zero) key/value appended to every sequence: no retention
            # equivalent, and bias_k/bias_v would drop out of the state dict
            raise ValueError(
                "nn.MultiheadAttention with add_bias_kv=True or add_zero_attn=True is not "
                "supported: the extra key/value it attends to has no retention equivalent"
            )
        super().__init__(site, dtype=param_dtype(original), **kw)
        self.in_proj_weight = original.in_proj_weight
        self.in_proj_bias = original.in_proj_bias
        self.out_proj = original.out_proj
        self.batch_first = original.batch_first
        self.num_heads, self.embed_dim = original.num_heads, original.embed_dim
        # NOTE: nn.TransformerEncoderLayer reads this to pick its fused fast path, which would
        # bypass this module and run softmax attention on in_proj_weight; False turns it off.
        self._qkv_same_embed_dim = False

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        *args,
        **kwargs,
    ):
        for name, other in (("key", key), ("value", value)):
            if other is not None and not _same_tensor(other, query):
                raise ValueError(
                    f"a converted MultiheadAttention is self-attention only: {name} must be the "
                    f"query tensor itself (got a different tensor of shape {tuple(other.shape)}, "
                    f"query {tuple(query.shape)}); cross-attention cannot become retention"
                )
        x = query if self.batch_first or query.dim() == 2 else query.transpose(0, 1)
        squeeze = x.dim() == 2
        x = x.unsqueeze(0) if squeeze else x
        if squeeze and key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        valid = mha_valid(key_padding_mask, attn_mask, x.shape[0], x.shape[1])
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        d = self.site.head_dim
        o = self.out_proj(self.mix(_heads(q, d), _heads(k, d), _heads(v, d), None, valid))
        o = o.squeeze(0) if squeeze else o
        o = o if self.batch_first or squeeze else o.transpose(0, 1)
        return o, None


class GenericRetention(RetrofitRetention):
    """A predicate-picked module with q/k/v (or fused qkv) and an output Linear.

    Called as ``module(x, ...)`` with x [B, T, dim] (batch first); returns a tensor. Other
    arguments that are not tensors are ignored; a tensor (a padding or attention mask) is
    refused, since this layer would not apply it.
    """

    def __init__(self, original: nn.Module, site: AttentionSite, **kw) -> None:
        super().__init__(site, dtype=param_dtype(original), **kw)
        from .find import _fused_qkv, _out_proj

        self._fused = _fused_qkv(original) if not hasattr(original, "q_proj") else None
        names = [self._fused] if self._fused else ["q_proj", "k_proj", "v_proj"]
        self._out = _out_proj(original)
        for name in [*names, self._out]:
            setattr(self, name, getattr(original, name))

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        extra = [(f"argument {i + 1}", a) for i, a in enumerate(args)] + list(kwargs.items())
        for name, value in extra:
            if isinstance(value, Tensor):
                raise ValueError(
                    f"a generic converted layer applies no mask, but its call passed a tensor as "
                    f"{name!r} (shape {tuple(value.shape)}): it would be ignored. Pass None there, "
                    "or convert the module with a family that reads masks (see docs/retrofit.md)"
                )
        if self._fused:
            q, k, v = getattr(self, self._fused)(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        d = self.site.head_dim
        return getattr(self, self._out)(self.mix(_heads(q, d), _heads(k, d), _heads(v, d), None))
