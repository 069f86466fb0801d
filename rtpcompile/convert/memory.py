"""memory_report(): what decoding keeps per layer, before and after retrofit.

An attention layer keeps K and V for every position: ``2 * kv_heads * head_dim * itemsize``
bytes per token per sequence (capped at the sliding window when the layer has one: a Hugging Face
dynamic cache keeps the last ``window - 1`` tokens). A retention layer keeps one float32 state per
head (float64 for a float64 model), ``heads * head_dim * head_dim * 4`` (or 8) bytes per
sequence, whatever the length. A type-C layer keeps both, for its own share of heads. The break-even
length of a converted layer is the number of tokens at which the K/V it replaced would have
taken as many bytes as its state; below it the state is the larger of the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .decay import param_dtype
from .find import AttentionSite, survey

STATE_ITEMSIZE = 4  # retention states are float32 (float64 for float64 models: state_itemsize)


def state_itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of the retention state kept for a model of ``dtype``."""
    # NOTE: the ops keep the state in float32 for every floating dtype but float64.
    return 8 if dtype == torch.float64 else STATE_ITEMSIZE


@dataclass(frozen=True)
class LayerMemory:
    """One attention layer. Bytes are per sequence (batch 1) unless named ``total``."""

    index: int
    name: str
    kind: str  # "attention", "retention" or "hybrid"
    kv_bytes_per_token: int  # K/V still kept per token (0 for a fully converted layer)
    state_bytes: int  # fixed retention state per sequence (0 for attention)
    original_kv_bytes_per_token: int  # what the unconverted layer kept per token
    window: int | None  # sliding window of the K/V, if any
    break_even: float | None  # tokens at which the replaced K/V equals the state
    total: int  # bytes at the report's seq_len and batch
    original_total: int


@dataclass
class MemoryReport:
    """Per-layer rows, totals at ``seq_len`` x ``batch``, and warnings."""

    seq_len: int
    batch: int
    layers: list[LayerMemory]
    warnings: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(row.total for row in self.layers)

    @property
    def original_total(self) -> int:
        return sum(row.original_total for row in self.layers)

    @property
    def saving(self) -> float:
        """Fraction of the original decoding memory saved (negative: the hybrid is larger)."""
        return 1.0 - self.total / self.original_total if self.original_total else 0.0

    def __str__(self) -> str:
        head = (
            f"{'layer':>5}  {'kind':<9} {'KV B/token':>11} {'state B/seq':>12} "
            f"{'break-even':>11} {'bytes':>14} {'original':>14}"
        )
        lines = [f"memory report at seq_len={self.seq_len}, batch={self.batch}", head]
        for r in self.layers:
            even = "-" if r.break_even is None else f"{r.break_even:,.0f} tok"
            lines.append(
                f"{r.index:>5}  {r.kind:<9} {r.kv_bytes_per_token:>11,} {r.state_bytes:>12,} "
                f"{even:>11} {r.total:>14,} {r.original_total:>14,}"
            )
        lines.append(
            f"total: {self.total:,} bytes vs {self.original_total:,} unconverted "
            f"({100 * self.saving:.1f}% saved)"
        )
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def memory_report(
    model: nn.Module, seq_len: int = 8192, batch: int = 1, dtype: torch.dtype | None = None
) -> MemoryReport:
    """Decoding memory per layer of a (retrofitted or plain) model at ``seq_len`` x ``batch``.

    ``dtype``: the K/V element type; default the dtype of the model's first floating parameter.
    The retention state is float32, float64 when ``dtype`` is float64.
    """
    for name, n in (("seq_len", seq_len), ("batch", batch)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype (the K/V's), got {dtype!r}")
    dtype = dtype or param_dtype(model)
    itemsize = torch.empty((), dtype=dtype).element_size()
    found, skipped = survey(model)
    sites = _sites(model, found)
    if not sites:
        raise ValueError(
            f"memory_report found no attention or retention layers in {type(model).__name__} "
            "that a retrofit converts or has converted (an rtpcompile.nn model's cache reports its "
            "own bytes: model.new_cache(batch).nbytes(), docs/modules.md)"
        )
    rows, warnings = [], []
    broadcast = _caches_every_head(model)
    for site, module in sites:
        row = _row(site, module, itemsize, state_itemsize(dtype), seq_len, batch, broadcast)
        rows.append(row)
        # NOTE: at the tokens the K/V really holds: a sliding window's never reach seq_len (a
        # state larger than its window's K/V went unwarned until 2026-11-25)
        if row.state_bytes and row.total > row.original_total:
            held = f"seq_len={seq_len}"
            if row.window is not None and row.window - 1 < seq_len:
                held = f"its sliding window's {max(row.window - 1, 1):,} tokens"
            warnings.append(
                f"layer {row.index} ({row.name}): its state ({row.state_bytes:,} B) is larger than "
                f"the K/V it replaces at {held} "
                f"({row.original_kv_bytes_per_token - row.kv_bytes_per_token:,} B/token; "
                f"break-even at {row.break_even:,.0f} tokens)"
            )
    if skipped:
        names = ", ".join(f"{s.name} ({s.reason})" for s in skipped[:3])
        warnings.append(
            f"{len(skipped)} attention module(s) not counted (kept as attention, their cache "
            f"is not in these totals): {names}" + (" ..." if len(skipped) > 3 else "")
        )
    return MemoryReport(seq_len, batch, rows, warnings)


def _caches_every_head(model: nn.Module) -> bool:
    """Falcon's new decoder architecture broadcasts its K/V groups to every query head before
    caching them (Hugging Face's ``_split_heads``): its attention layers cache num_heads K/V
    heads, not num_kv_heads (counted as the groups until 2026-11-25: 16x too few for
    Falcon-40B). A converted layer's softmax heads cache their groups only."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) == "falcon" and bool(
        getattr(config, "new_decoder_architecture", False)
    )


def _sites(
    model: nn.Module, found: list[AttentionSite]
) -> list[tuple[AttentionSite, nn.Module | None]]:
    """Attention sites in layer order: converted ones carry their module, kept ones None."""
    return [(s, model.get_submodule(s.name) if s.converted else None) for s in found]


def _row(
    site: AttentionSite,
    module,
    itemsize: int,
    state_item: int,
    seq_len: int,
    batch: int,
    broadcast: bool = False,
) -> LayerMemory:
    per_kv_head = 2 * site.head_dim * itemsize
    cached = site.num_heads if broadcast else site.num_kv_heads
    original = cached * per_kv_head
    r = 0 if module is None else module.retention_heads
    kv_heads_kept = cached if module is None else site.num_kv_heads - module.retention_kv_heads
    kv = kv_heads_kept * per_kv_head
    state = r * site.head_dim * site.head_dim * state_item
    tokens = seq_len
    if site.sliding_window is not None:
        # NOTE: a Hugging Face DynamicSlidingWindowLayer keeps window - 1 tokens between steps
        # (the new token completes the window).
        tokens = min(seq_len, max(site.sliding_window - 1, 1))
    replaced = original - kv
    kind = "attention" if r == 0 else ("retention" if kv == 0 else "hybrid")
    return LayerMemory(
        index=site.index,
        name=site.name,
        kind=kind,
        kv_bytes_per_token=kv,
        state_bytes=state,
        original_kv_bytes_per_token=original,
        window=site.sliding_window,
        break_even=state / replaced if r and replaced else None,
        total=batch * (kv * tokens + state),
        original_total=batch * original * tokens,
    )
