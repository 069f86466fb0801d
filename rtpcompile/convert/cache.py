"""Hybrid decoding cache for retrofitted Hugging Face models.

Attention layers keep their usual growing K/V (a ``DynamicLayer``); a converted layer keeps a
fixed-size float32 retention state ``[B, H, K, V]`` (plus K/V for its attention heads when
``head_mix`` keeps some). ``RetentionCacheLayer`` subclasses the transformers cache-layer base
class and reports the number of tokens it has seen, so position ids, causal masks and
``generate()`` work unchanged, even when every layer was converted.

Supported transformers: the ``Cache``/``CacheLayerMixin`` layer API (transformers >= 4.56,
tested with 5.23). The import is optional: without transformers only plain models work.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

try:  # NOTE: the one place the optional dependency is imported.
    from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
except ImportError:  # pragma: no cover - exercised only without transformers
    Cache = CacheLayerMixin = DynamicCache = None


def _require_transformers() -> None:
    if Cache is None:
        raise ImportError(
            "the hybrid cache needs transformers >= 4.56 (pip install 'rtpcompile[hf]')"
        )


CROP_REFUSED = (
    "a retention state cannot be cropped (it has no per-token entries); "
    "assisted/speculative decoding is not supported on retrofitted models"
)


def _no_kv() -> Tensor:
    return torch.empty(0)


if CacheLayerMixin is not None:

    class RetentionCacheLayer(CacheLayerMixin):
        """One converted layer: retention ``state`` [B, H_ret, K, V] and, for type-C layers, the
        attention heads' ``keys``/``values`` [B, H_kv_att, T, D]. ``seen`` counts positions."""

        is_sliding = False
        is_croppable = False
        is_compileable = False
        supports_early_init = False

        def __init__(self, max_cache_len: int | None = None, **kwargs) -> None:
            super().__init__()
            # NOTE: empty, not None: models ask every layer ``is_initialized and keys.numel()``
            # (Mllama's cross-attention check); only type-C layers ever hold K/V here.
            self.keys, self.values = _no_kv(), _no_kv()
            self.state: Tensor | None = None
            self.valid: Tensor | None = None  # [B, L] bool: which cached K/V are real tokens
            self.seen = 0
            # NOTE: set when this slot replaced a StaticLayer: the kept static attention layers
            # hold max_cache_len slots, so the model's masks must have that many columns, and
            # the cache must stay "compileable" or the model skips the decode mask and those
            # layers attend to their empty slots.
            self.max_cache_len = max_cache_len
            self.is_compileable = max_cache_len is not None
            self.is_initialized = True

        def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
            return None

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
            """Append attention-head K/V (type-C layers); returns the full K/V."""
            if not self.keys.numel():
                self.keys, self.values = key_states, value_states
            else:
                self.keys = torch.cat([self.keys, key_states], dim=-2)
                self.values = torch.cat([self.values, value_states], dim=-2)
            return self.keys, self.values

        def update_valid(self, valid: Tensor | None, new: int) -> Tensor | None:
            """Append which of the ``new`` K/V just cached are real tokens (None: all of them);
            returns the [B, L] mask over every cached K/V, or None while none was padding."""
            if valid is None and self.valid is None:
                return None
            batch, total = self.keys.shape[0], self.keys.shape[-2]
            device = self.keys.device
            if valid is None:
                valid = torch.ones(batch, new, dtype=torch.bool, device=device)
            if self.valid is None:
                self.valid = torch.ones(batch, total - new, dtype=torch.bool, device=device)
            self.valid = torch.cat([self.valid, valid.to(device)], dim=-1)
            return self.valid

        def keep_last(self, tokens: int) -> None:
            """Drop all but the last ``tokens`` cached K/V (a sliding-window layer's softmax heads
            never see older ones again); the retention state and ``seen`` are unchanged."""
            if not self.keys.numel() or self.keys.shape[-2] <= tokens:
                return
            self.keys, self.values = self.keys[..., -tokens:, :], self.values[..., -tokens:, :]
            self.valid = None if self.valid is None else self.valid[:, -tokens:]

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            if self.max_cache_len is None:
                return self.seen + query_length, 0
            return max(self.max_cache_len, self.seen + query_length), 0

        def get_seq_length(self) -> int:
            return self.seen

        def get_max_length(self) -> int:
            return -1 if self.max_cache_len is None else self.max_cache_len

        def check_batch(self, batch: int) -> None:
            """Refuse an input whose batch differs from the one the cached state was built for."""
            held = self.state.shape[0] if self.state is not None else batch
            held = self.keys.shape[0] if self.keys.numel() else held
            if held != batch:
                raise ValueError(
                    f"the cache holds batch {held} but the input has batch {batch}; a cache "
                    "cannot change batch size: build a new one (handle.new_cache()) for this input"
                )

        def offload(self) -> None:
            return None

        def prefetch(self) -> None:
            return None

        def reset(self) -> None:
            self.state = self.valid = None
            self.keys, self.values = _no_kv(), _no_kv()
            self.seen = 0

        def _map(self, fn) -> None:
            self.state = None if self.state is None else fn(self.state)
            if self.keys.numel():
                self.keys, self.values = fn(self.keys), fn(self.values)
            self.valid = None if self.valid is None else fn(self.valid)

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

        def batch_repeat_interleave(self, repeats: int) -> None:
            self._map(lambda t: t.repeat_interleave(repeats, dim=0))

        def batch_select_indices(self, indices: Tensor) -> None:
            self._map(lambda t: t[indices, ...])

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError(CROP_REFUSED)

        def nbytes(self) -> int:
            return sum(
                t.numel() * t.element_size()
                for t in (self.state, self.keys, self.values)
                if t is not None
            )

    class RetrofitCache(DynamicCache):
        """A ``DynamicCache`` whose converted layers hold a retention state instead of K/V.

        Build it with ``handle.new_cache()`` or ``RetrofitCache(model.config, [layer ids])`` and
        pass it as ``past_key_values=`` to ``forward`` or ``generate``. A plain ``DynamicCache``
        also works: converted layers swap their own slot for a ``RetentionCacheLayer`` on first use.
        """

        def __init__(self, config=None, retention_layers=()) -> None:
            super().__init__(config=config)
            for idx in retention_layers:
                layer_slot(self, idx)

        def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kw):
            """A kept attention layer's K/V: refused with the converted layers' message when its
            batch differs from the cache's (``torch.cat`` failed first when attention layers
            come before the converted ones, ``placement="back"``). A plain ``DynamicCache``
            still fails in ``torch.cat`` there."""
            for layer in self.layers:
                if isinstance(layer, RetentionCacheLayer):
                    layer.check_batch(key_states.shape[0])
            return super().update(key_states, value_states, layer_idx, *args, **kw)

        def crop(self, tokens_to_remove: int) -> None:
            """Refused, before any layer is cropped (``Cache.crop`` walks the layers in order,
            so the attention layers before the first retention one were cut first)."""
            if any(isinstance(layer, RetentionCacheLayer) for layer in self.layers):
                raise NotImplementedError(CROP_REFUSED)
            super().crop(tokens_to_remove)

        def nbytes(self) -> dict[str, int]:
            """Bytes held: {"state": retention states + type-C K/V, "kv": attention K/V, ...}."""
            state = kv = 0
            for layer in self.layers:
                if isinstance(layer, RetentionCacheLayer):
                    state += layer.nbytes()
                elif getattr(layer, "keys", None) is not None and layer.keys.numel():
                    kv += layer.keys.numel() * layer.keys.element_size() * 2
            return {"state": state, "kv": kv, "total": state + kv}

else:  # pragma: no cover
    RetentionCacheLayer = RetrofitCache = None


def cache_argument(past_key_values, kwargs) -> object:
    """The cache an attention layer was called with: ``cache=`` (transformers >= 5.24),
    ``past_key_values=`` (earlier), ``layer_past=`` (GPT-NeoX, Falcon, GPTBigCode) or
    ``past_key_value=`` (older still); None when it got none."""
    if past_key_values is not None:
        return past_key_values
    for name in ("cache", "layer_past", "past_key_value"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def layer_slot(cache, index: int):
    """The ``RetentionCacheLayer`` for layer ``index`` of a transformers cache, or None.

    Grows a lazily built cache and replaces an empty attention slot in place, so an ordinary
    ``DynamicCache`` created by ``generate()`` works, and so does a ``StaticCache``: the new slot
    then keeps the cache's ``max_cache_len`` and sizes the model's masks to it, as the kept
    static attention layers need. A slot that already holds K/V is an error.
    """
    if cache is None or Cache is None:
        return None
    cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache (GPT-2)
    if not isinstance(cache, Cache):
        raise ValueError(
            f"past_key_values must be a transformers Cache, got {type(cache).__name__}"
        )
    while len(cache.layers) <= index:
        if cache.layer_class_to_replicate is None:
            raise ValueError(
                f"the cache has {len(cache.layers)} layers, a converted layer needs slot {index}"
            )
        cache.layers.append(cache.layer_class_to_replicate())
    slot = cache.layers[index]
    if isinstance(slot, RetentionCacheLayer):
        return slot
    if int(slot.get_seq_length()) > 0:
        raise ValueError(
            f"cache layer {index} already holds attention keys/values, but layer {index} is a "
            "converted retention layer; build the cache after retrofit (handle.new_cache())"
        )
    static = None
    # NOTE: by type, not by a positive get_max_length(): a dynamic sliding-window layer returns
    # its window there, and a slot sized to it made the new layer (not sliding, so the one
    # transformers sizes the full-attention mask by) claim `window` columns while the kept
    # full layers held fewer keys
    if getattr(slot, "is_compileable", False):  # a static layer (full or sliding)
        static = max(layer.get_max_length() for layer in cache.layers)
    cache.layers[index] = RetentionCacheLayer(max_cache_len=static)
    return cache.layers[index]


# -- padding: which keys are real tokens (the converted layers zero the others) --------------------


def key_valid(
    mask, batch: int, length: int, seen: int | None = None, *, window=False
) -> Tensor | None:
    """Which of the ``length`` new tokens are real (not padding): bool [batch, length], or None.

    Reads the mask a Hugging Face model hands its attention layers: 2D ``[B, L]`` (1/True =
    token, 0 = padding; what flash attention gets) or 4D ``[B, 1, T, L]`` (bool: True = may
    attend, as for sdpa; float: 0 = may attend, a large negative = masked, as for eager). In a
    4D mask a key column masked for every query is padding: causal and sliding-window masks
    leave every real key visible at least to its own query. Anything else is refused.

    Columns are cache positions. ``seen`` (tokens the cache held before these) places the new
    tokens at columns ``[seen, seen + length)`` when the mask has room for them (a static
    cache's mask has ``max_cache_len`` columns, the empty slots last); otherwise, and without
    ``seen``, they are the last ``length`` columns (dynamic and sliding-window caches).

    ``window`` (an int, or None for full causal attention; False, the default, checks nothing):
    the converted layer's sliding window. A 4D mask must then be what zeroing keys reproduces,
    causal (within the window) AND key padding, on every query row that sees itself (a padded
    query's row is free); anything else (packed documents' block-diagonal mask, a prefix-LM or
    bidirectional mask) raises a ``ValueError`` (see ``check_key_padding``).
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise ValueError(
            f"a converted retention layer cannot read an attention mask of type "
            f"{type(mask).__name__} (a flex-attention BlockMask?); load the model with "
            "attn_implementation='sdpa' or 'eager'"
        )
    if mask.dim() == 2:
        keep = mask != 0
    elif mask.dim() == 4:
        if mask.shape[-2] not in (1, length):
            raise ValueError(
                f"4D attention mask has {mask.shape[-2]} query rows, expected {length} "
                f"(got shape {tuple(mask.shape)})"
            )
        visible = _hf_visible(mask)
        if window is not False:
            keep = _checked(mask, visible, length, _first_column(visible, length, seen), window)
        else:
            keep = visible.flatten(1, 2).any(dim=1)
    else:
        raise ValueError(
            "expected a 2D [batch, keys] or 4D [batch, heads, queries, keys] attention mask, "
            f"got shape {tuple(mask.shape)}"
        )
    if keep.shape[-1] < length or keep.shape[0] not in (1, batch):
        raise ValueError(
            f"attention mask of shape {tuple(mask.shape)} does not cover batch {batch} and "
            f"{length} new tokens"
        )
    start = _first_column(keep, length, seen)
    return keep[:, start : start + length].expand(batch, length)


_LAST_CHECK: list = []  # [(weakref to the mask, its version, start, length, window), keep]


def _checked(mask: Tensor, visible: Tensor, length: int, start: int, window) -> Tensor:
    """``check_key_padding`` of a Hugging Face mask, remembered for the mask last checked: the
    model hands every layer the same mask tensor, so a forward checks it once per distinct
    (mask, window), not once per converted layer (eager only: a compiled graph checks in it)."""
    if torch.compiler.is_compiling() or mask.is_inference():  # NOTE: no version counter
        return check_key_padding(visible, length, start, window)
    key = (mask._version, start, length, window)
    if _LAST_CHECK and _LAST_CHECK[0][0]() is mask and _LAST_CHECK[0][1:] == key:
        return _LAST_CHECK[1]
    keep = check_key_padding(visible, length, start, window)
    _LAST_CHECK[:] = [(weakref.ref(mask), *key), keep]
    return keep


def _hf_visible(mask: Tensor) -> Tensor:
    """A Hugging Face 4D mask as bool, True = may attend."""
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        # NOTE: additive masks hold finfo.min or -inf where a key is hidden, 0 (or a small
        # bias) where it is visible.
        return mask > torch.finfo(mask.dtype).min / 2
    raise ValueError(f"4D attention mask must be bool or floating, got {mask.dtype}")


def _first_column(mask: Tensor, length: int, seen: int | None) -> int:
    """The mask column of the first new token (see ``key_valid``)."""
    columns = mask.shape[-1]
    if seen is not None and seen + length <= columns:
        return seen
    return max(columns - length, 0)


NOT_KEY_PADDING = (
    "a converted retention layer can only apply a causal mask with key padding{win} (it zeroes "
    "the keys of padded positions; its state carries every earlier real token into every later "
    "one), but the attention mask it got is not one: {what}. A block-diagonal mask of packed "
    "documents (or position ids restarting per document), a prefix-LM or a bidirectional mask "
    "cannot be reproduced; run the documents as separate rows or separate calls (left padding "
    "is fine), or keep this layer as attention"
)


def check_key_padding(
    visible: Tensor, length: int, start: int, window: int | None, causal_only: bool = False
) -> Tensor:
    """Check that a bool mask ``visible`` [B', H', T' in (1, length), L] (True = may attend) is
    ``causal(i, j) & window(i, j) & real[b, j]`` on every query row that sees itself, the new
    tokens at columns ``[start, start + length)``; returns ``real`` [B', L] (the key columns
    some such row sees). ``causal_only``: what a row sees outside the causal window is not
    checked (a converted ``nn.MultiheadAttention`` is causal whatever its mask says).

    Cost: a few passes over the mask (the one Hugging Face built for the layer), no host sync
    on an accelerator or in a compiled graph, where the failure is a ``torch._assert_async``
    (RuntimeError); on CPU outside compilation a ``ValueError``.
    """
    device, columns = visible.device, visible.shape[-1]
    batch, heads = visible.shape[:2]
    visible = visible.expand(batch, heads, length, columns)
    if causal_only:
        visible = _band(visible, start, window)
    # NOTE: a padded query's row is empty in Hugging Face's masks (all visible in older ones):
    # its output is never read, so only rows that see their own token are checked
    rows = torch.arange(start, start + length, device=device)  # each new token's column
    if start + length <= columns:
        real_row = visible.gather(-1, rows.expand(batch, heads, length)[..., None])[..., 0]
    else:  # NOTE: too few columns (refused by the caller); no clamp otherwise (see below)
        own = rows.clamp(max=columns - 1).expand(batch, heads, length)[..., None]
        real_row = visible.gather(-1, own)[..., 0] & (rows < columns)  # [B', H', T]
    # NOTE: xor, not !=, below: on a mask built from constants inside a compiled graph (an
    # nn.MultiheadAttention's triu(ones) mask) Inductor folds both sides into index expressions
    # and a != of two of them broke its codegen (torch 2.13: "A Boolean argument can only be
    # used in Eq and Ne")
    # NOTE: the key columns real queries see, not read from the whole mask: a new token's from
    # its own row (it sees itself), a cached one's from the real rows' cached columns (none in
    # a prefill, one row in a decode step); the comparison below checks every row against them
    cached = (visible[..., :start] & real_row[..., None]).any(dim=-2)  # [B', H', start]
    new = min(length, columns - start)
    parts = [cached, real_row[..., :new]]
    if start + new < columns:  # a static cache's empty slots
        parts.append(real_row.new_zeros(batch, heads, columns - start - new))
    real = torch.cat(parts, dim=-1)  # [B', H', L]
    expected = _band(real[:, :, None, :].expand(batch, heads, length, columns), start, window)
    wrong_rows = (visible ^ expected).any(dim=-1) & real_row  # [B', H', T]
    wrong = wrong_rows.any() | (real ^ real[:, :1]).any()  # NOTE: one padding for all heads
    win = f" (sliding window {window})" if window is not None else ""
    refuse_if(
        wrong,
        lambda: NOT_KEY_PADDING.format(win=win, what=_describe(visible, expected, wrong_rows)),
        NOT_KEY_PADDING.format(
            win=win,
            what="a query row differs from causal AND key padding (checked on the device or in "
            "a compiled graph; run eagerly on CPU to see which row)",
        ),
    )
    return real.any(dim=1)


def _band(x: Tensor, start: int, window: int | None) -> Tensor:
    """``x`` [.., T, L] where query i (at column start + i) may attend: causal, within the
    window; False elsewhere."""
    x = x.tril(start)
    return x if window is None else x.triu(start - window + 1)


def refuse_if(wrong: Tensor, message, device_message: str) -> None:
    """Raise when the 0-dim bool ``wrong`` is True: a ``ValueError(message())`` on CPU outside
    compilation (the host reads one bool), else a ``torch._assert_async`` that never syncs the
    host (a RuntimeError with ``device_message``; on a GPU at the next synchronising call)."""
    if wrong.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(wrong):
            raise ValueError(message())
    else:
        torch._assert_async(~wrong, device_message)


PACKED_POSITIONS = (
    "a converted retention layer got a packed row ({what}): its state carries every earlier "
    "token into every later one, so documents packed in one row leak into each other; run the "
    "documents as separate rows (left padding is fine) or separate calls"
)


def check_unpacked(attention_mask, kwargs: dict, attn_implementation) -> None:
    """Refuse flash attention's packed rows, which come without a mask: ``cu_seq_lens_q``/
    ``cu_seq_lens_k`` in the layer's arguments, or (flash attention, batch 1, no mask)
    ``position_ids`` that restart (the rule Hugging Face's flash path packs by). Other
    implementations get a block-diagonal mask instead, which ``key_valid`` refuses."""
    if attention_mask is not None:
        return
    for name in ("cu_seq_lens_q", "cu_seq_lens_k"):
        if kwargs.get(name) is not None:
            raise ValueError(PACKED_POSITIONS.format(what=f"{name} was passed"))
    pos = kwargs.get("position_ids")
    flash = isinstance(attn_implementation, str) and "flash" in attn_implementation
    if not (flash and isinstance(pos, Tensor) and pos.dim() == 2 and pos.shape == (1, pos.numel())):
        return
    if pos.shape[-1] > 1:
        what = "position_ids restart inside the row"
        wrong = (pos.diff(dim=-1) != 1).any()
        refuse_if(
            wrong, lambda: PACKED_POSITIONS.format(what=what), PACKED_POSITIONS.format(what=what)
        )


def _describe(visible: Tensor, expected: Tensor, wrong_rows: Tensor) -> str:
    """Where the first offending row of a mask differs from causal AND key padding."""
    if not wrong_rows.any():
        return "the heads of a batch row disagree on which keys are padding"
    b, h, i = wrong_rows.nonzero()[0].tolist()
    row = visible[b, h, i]
    seen = row.nonzero().flatten().tolist()
    shown = f"{seen}" if len(seen) <= 12 else f"{seen[:6]} ... {seen[-6:]} ({len(seen)} keys)"
    extra = (visible[b, h, i] & ~expected[b, h, i]).nonzero().flatten().tolist()
    missing = (expected[b, h, i] & ~visible[b, h, i]).nonzero().flatten().tolist()
    parts = [f"query row {i} of batch row {b} (head {h}) sees key columns {shown}"]
    if missing:
        parts.append(
            f"it hides columns {missing[:8]}{' ...' if len(missing) > 8 else ''} that other "
            "queries see and causality allows"
        )
    if extra:
        parts.append(
            f"it sees columns {extra[:8]}{' ...' if len(extra) > 8 else ''} that are in its "
            "future or outside the window"
        )
    return "; ".join(parts)


# -- torch.nn.MultiheadAttention masks (for the converted ``nn.MultiheadAttention``) -------------


def _torch_visible(mask: Tensor) -> Tensor:
    """torch.nn.MultiheadAttention masks: bool True = masked out, float = added to the scores."""
    if mask.dtype == torch.bool:
        return ~mask
    if mask.is_floating_point():
        return mask > torch.finfo(mask.dtype).min / 2
    raise ValueError(f"attention masks must be bool or floating, got {mask.dtype}")


def mha_valid(key_padding_mask, attn_mask, batch: int, length: int) -> Tensor | None:
    """Real keys [B, T] from nn.MultiheadAttention's key_padding_mask [B, T] and attn_mask
    ([T, T] or [B * heads, T, T]; a key column masked for every query is padding)."""
    valid = None
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (batch, length):
            raise ValueError(
                f"key_padding_mask must have shape {(batch, length)}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        valid = _torch_visible(key_padding_mask)
    if attn_mask is not None:
        if attn_mask.dim() not in (2, 3) or tuple(attn_mask.shape[-2:]) != (length, length):
            raise ValueError(
                f"attn_mask must have shape [{length}, {length}] or [batch * heads, {length}, "
                f"{length}], got {tuple(attn_mask.shape)}"
            )
        visible = _torch_visible(attn_mask)
        if visible.dim() == 3:
            if visible.shape[0] % batch:
                raise ValueError(
                    f"a 3D attn_mask needs batch * heads rows, got {visible.shape[0]} rows for "
                    f"batch {batch}"
                )
            visible = visible.view(batch, -1, *visible.shape[-2:])
        else:
            visible = visible[None, None]
        # NOTE: the layer is causal whatever the mask says past the diagonal; what it must not
        # get is a causal part that zeroing keys cannot reproduce (packed documents)
        cols = check_key_padding(visible, length, 0, None, causal_only=True)
        cols = cols.expand(batch, -1)  # real if any head may see it
        valid = cols if valid is None else valid & cols
    return valid
