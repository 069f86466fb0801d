"""What detection hands to rewrite and explain: one frozen :class:`Region` per candidate.

A Region names FX nodes by their (unique) names, so it is hashable, printable and independent
of the graph object; ``rewrite`` looks the names up again. ``reason`` is None for a claimed
region and says why otherwise.
"""

from __future__ import annotations

import dataclasses

# A scalar factor folded into q (or applied to the output): ("mul" | "div", number or node name).
Factor = tuple[str, object]


@dataclasses.dataclass(frozen=True)
class Operand:
    """A tensor read by the region: ``node.permute(perm)``; ``token_axis`` inserts a length-1 T."""

    node: str
    perm: tuple[int, ...] | None = None
    token_axis: bool = False


@dataclasses.dataclass(frozen=True)
class Region:
    """One retention region (claimed when ``reason`` is None).

    written:    how the user wrote it: "parallel", "recurrent step" or "chunk step"
    output:     the node whose value the op replaces; ``state_output`` the new state (if any)
    q, k, v:    operands seen in the canonical layout [*batch, T, D]
    masks:      mask nodes multiplied into the scores; ``mask_kind`` "mul" (decay tensors),
                "tril"/"fill"/"where" (a 0/1 causal mask: gamma = 1) or "decay" (a state decay a)
    mask_axes:  per mask, the dims to unsqueeze so it broadcasts against [*batch, T, T]
    pre/post:   scalar factors inside the scores (folded into q) and on the output
    normaliser: "none" | "abs_sum" (clamp(|sum_j A|)) | "sum_abs" (clamp(sum_j |A|))
    out_perm:   the region's output is the canonical [*batch, T, V] permuted by this
    seq_len, heads, k_dim, v_dim, decay: example sizes and compile-time gammas (for explain)
    batch, dtype, device: the example call's sequences (B of [B, H, T, D]), q's dtype name
                ("float32") and device (for explain's planned lowering; None when unknown)
    scope:      the checkpoint / nested compile region calls (higher-order op node names,
                outermost first) whose body holds the region, which names its nodes in that
                body's terms; () for the graph itself (``detect/subgraphs.py``)
    native:     an rtp op call already in the graph: claimed as-is, never rewritten; ``form`` and
                ``chunk_size`` are what the call requests ("auto" and 0 for every other region)
    """

    written: str
    where: str
    reason: str | None = None
    output: str = ""
    nodes: tuple[str, ...] = ()
    q: Operand | None = None
    k: Operand | None = None
    v: Operand | None = None
    masks: tuple[str, ...] = ()
    mask_kind: str = "mul"
    mask_axes: tuple[tuple[int, ...], ...] = ()
    pre: tuple[Factor, ...] = ()
    post: tuple[Factor, ...] = ()
    normaliser: str = "none"
    normaliser_min: float = 1.0
    out_perm: tuple[int, ...] | None = None
    squeeze_token: bool = False
    state: Operand | None = None
    state_output: str | None = None
    state_vk: bool = False
    seq_len: int | None = None
    heads: int | None = None
    k_dim: int | None = None
    v_dim: int | None = None
    decay: tuple[float, ...] = ()
    row_scale: bool = False
    native: bool = False
    form: str = "auto"
    chunk_size: int = 0
    batch: int | None = None
    dtype: str | None = None
    device: str | None = None
    scope: tuple[str, ...] = ()

    @property
    def claimed(self) -> bool:
        return self.reason is None

    def declined(self, reason: str) -> Region:
        """A copy of this region that is declined for ``reason``."""
        return dataclasses.replace(self, reason=reason)

    def decay_text(self) -> str:
        """The per-head decays, short: "gamma=0.969..0.999" or "gamma=1 (causal linear)"."""
        if not self.decay:
            return "runtime" if self.native else "-"
        if self.seq_len == 1 and self.mask_kind == "mul" and not self.native:
            return "gamma unseen at T=1 (no effect there)"  # NOTE: a 1x1 mask holds no decay
        lo, hi = min(self.decay), max(self.decay)
        if abs(lo - 1.0) < 1e-9 and abs(hi - 1.0) < 1e-9:
            text = "gamma=1 (causal linear)"
        elif abs(hi - lo) < 1e-9:
            text = f"gamma={lo:.4g}"
        else:
            text = f"gamma={lo:.4g}..{hi:.4g}"
        return text + (" x row scale" if self.row_scale else "")
