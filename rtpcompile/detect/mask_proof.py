"""Prove that a mask is a causal decay: ``M[h, i, j] = c[h, i] * gamma_h ** (i - j) * [i >= j]``.

The proof has two halves:
1. *Provenance.* The mask's value ancestors may only be constants, module buffers/parameters/
   attributes (``is_constant_source``) and sizes; an activation read for its values (a data-
   dependent gate, a padding mask) or a random op declines the region. Activations read only
   for their shape/dtype/device (``x.size(1)``, ``type_as(x)``, ``ones_like(x)``) are fine.
2. *Values.* The mask subgraph is re-run on the real buffer values at several sequence lengths
   (1, 2, a prime, the example length -- capped at 1024 when T is symbolic: the symbol of T is
   substituted, every other size keeps its example value) and fitted: zeros above the diagonal,
   positive diagonal c[h, i], and
   ``M[h, i, j] / M[h, i, i] == gamma_h ** (i - j)`` below it.
Nothing is frozen from this evaluation: the rewritten graph recomputes gamma and c from the
same mask nodes at run time (see rewrite.py); the values here only feed explain().
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .decay_fit import fit_decay, per_head
from .graph_view import (
    GraphView,
    example,
    is_constant_source,
    is_input_attribute,
    is_random,
    is_tensor,
    target_name,
)
from .mask_eval import MAX_SYMBOLIC_T, Sizes, evaluate, lengths_for, proof_bytes, subgraph

__all__ = ["Proof", "check_provenance", "evaluate", "fit_decay", "lengths_for", "prove", "Sizes"]


@dataclasses.dataclass(frozen=True)
class Proof:
    """The verdict on one region's mask: ``reason`` None means proven."""

    reason: str | None
    gamma: tuple[float, ...] = ()
    row_scale: bool = False


def check_provenance(view: GraphView, masks: list[fx.Node]) -> str | None:
    """None when every mask depends only on constants, buffers and sizes; else the reason."""
    for mask in masks:
        values, _, written = subgraph(view, mask)
        if written is not None:
            return f"the mask or what it is built from is written in place: {written}"
        for node in view.sorted(values):
            if is_random(node):
                return f"the mask is random ({node.name})"
            if node.op == "placeholder" and is_tensor(example(node)):
                # NOTE: an attribute of a call argument (``batch.mask``) changes with the call
                if not is_constant_source(node) or is_input_attribute(node):
                    return f"the mask depends on activations (input {node.name!r})"
    return None


_CUTOFF_OPS = {
    "lt", "le", "gt", "ge", "eq", "ne", "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__",
    "clamp", "clamp_max", "clamp_min", "clip", "minimum", "maximum", "tril", "triu", "fmin", "fmax",
    "mod", "remainder", "fmod", "floordiv", "floor_divide", "__mod__", "__floordiv__",
}  # fmt: skip


# Ops that keep a position a position (``(i - j).float() * 2``); exp, pow, log, sums do not.
_POSITION_OPS = {
    "sub", "add", "neg", "mul", "abs", "to", "float", "double", "long", "int", "type_as",
    "getitem", "unsqueeze", "view", "reshape", "expand", "transpose", "permute", "__getitem__",
    "clamp", "clamp_min", "clamp_max", "__sub__", "__add__", "__rsub__", "__neg__",
}  # fmt: skip


def _reads_positions(node: fx.Node) -> bool:
    """A tensor argument of ``node`` is a position (``arange``, or integers, or a linear
    function of one): a comparison or clamp with a constant there is a window. A clamp of a
    decay, a normaliser or a temperature is not."""
    todo = [a for a in node.all_input_nodes if is_tensor(example(a))]
    seen: set[fx.Node] = set()
    while todo:
        arg = todo.pop()
        if arg in seen:
            continue
        seen.add(arg)
        value = example(arg)
        if target_name(arg) == "arange" or (
            is_tensor(value) and not (value.is_floating_point() or value.dtype == torch.bool)
        ):
            return True
        if arg.op in ("call_function", "call_method") and target_name(arg) in _POSITION_OPS:
            todo += [a for a in arg.all_input_nodes if is_tensor(example(a))]
    return False


def position_cutoff(view: GraphView, masks: list[fx.Node]) -> str | None:
    """Why a mask is not provable for every length of a symbolic T: it compares (or clamps) with a
    number other than 0 -- ``i - j < W``, ``clamp(max=W)``, ``triu(diagonal=-W)``: a window the
    proof, which evaluates a few lengths, would miss once T grows past it. None otherwise."""
    for mask in masks:
        values, _, _ = subgraph(view, mask)
        for node in view.sorted(values | {mask}):
            if node.op not in ("call_function", "call_method"):
                continue
            if target_name(node) not in _CUTOFF_OPS or not _reads_positions(node):
                continue
            # NOTE: triu(diagonal=1) is the complement of tril() (a causal mask); tril(-1) is
            # declined with its own reason
            allowed = (0, 1, -1) if target_name(node) in ("tril", "triu") else (0,)
            numbers = [
                a
                for a in (*node.args, *node.kwargs.values())
                if isinstance(a, (int, float)) and not isinstance(a, bool) and a not in allowed
            ]
            if numbers:
                return (
                    f"the mask compares positions with {numbers[0]} ({target_name(node)}): a "
                    "window the proof cannot check at every length of a dynamic T (compile "
                    "with a static sequence length to prove it at that length)"
                )
    return None


def trainable_inputs(view: GraphView, masks: list[fx.Node], inputs: list) -> list[str]:
    """The mask's ancestors that are trainable parameters (graph inputs requiring grad)."""
    index = {node: i for i, node in enumerate(view.placeholders)}
    found = []
    for mask in masks:
        values, _, _ = subgraph(view, mask)
        for node in view.sorted(values | {mask}):
            value = inputs[index[node]] if node in index and index[node] < len(inputs) else None
            if is_tensor(value) and value.requires_grad and value.is_floating_point():
                found.append(node.name)
    return sorted(set(found))


def prove(
    view: GraphView,
    masks: list[fx.Node],
    transform,
    inputs: list,
    seq,
    batch_ndim: int,
) -> Proof:
    """Provenance and value proof for the masks of one region.

    ``transform(values) -> tensor`` combines the evaluated mask nodes into the [.., t, t] mask
    multiplied into the scores (unsqueezes, products, ``~cond`` for masked_fill ...).
    """
    reason = check_provenance(view, masks)
    if reason is None and Sizes(seq, 0).symbol is not None:
        reason = position_cutoff(view, masks)
    if reason is not None:
        return Proof(reason)
    # NOTE: a trainable parameter in the mask will change: the structure must hold for other
    # values too (a learnable decay keeps it; a learned per-distance table does not). The
    # rewrite reads gamma and the diagonal from the mask at run time, so a diagonal that other
    # values move off 1 (a per-head temperature) is folded as a row scale.
    trainable = trainable_inputs(view, masks, inputs)
    proof = Proof("the mask could not be evaluated")
    row_scale = False
    for t in lengths_for(seq):
        sizes = Sizes(seq, t)
        need, budget = proof_bytes(view, masks, sizes), proof_budget()
        if need > budget:
            gib = f"{need / 2**30:.2g} GiB (budget {budget / 2**30:.2g} GiB, RTP_PROOF_MAX_GB)"
            return Proof(
                f"proving the mask at T={t} needs about {gib}; raise the budget, or compile with "
                "dynamic=True (or torch._dynamo.mark_dynamic on the sequence dim): it is then "
                f"proven at T <= {MAX_SYMBOLIC_T}"
            )
        for perturb in (None, torch.Generator().manual_seed(t)) if trainable else (None,):
            reason, gamma, scaled = _fit_at(
                view, masks, transform, inputs, sizes, batch_ndim, perturb
            )
            if reason is not None and perturb is not None:
                reason = (
                    f"{reason} once the trainable {', '.join(trainable)} change (the mask must be "
                    "a decay for any of their values)"
                )
            if reason is not None:
                return Proof(reason)
            row_scale = row_scale or scaled
            if perturb is None:
                proof = Proof(None, tuple(float(g) for g in gamma), row_scale)
    if proof.reason is None and Sizes(seq, 0).symbol is not None:
        reason, scaled = _prove_long(view, masks, transform, inputs, seq, batch_ndim)
        if reason is not None:
            return Proof(reason)
        row_scale = row_scale or scaled
    return dataclasses.replace(proof, row_scale=row_scale) if proof.reason is None else proof


def _long_lengths(view: GraphView, masks: list[fx.Node], seq) -> list[int]:
    """Lengths past the example one where a symbolic T's mask is checked once more: the sizes
    of the constant tensors the mask reads (a precomputed mask sliced to T runs only up to its
    own length), longest first, then the cap."""
    t_example = lengths_for(seq)[-1]
    sizes = set()
    for mask in masks:
        values, _, _ = subgraph(view, mask)
        for node in values:
            value = example(node)
            if node.op == "placeholder" and is_tensor(value):
                sizes |= {int(d) for d in value.shape if isinstance(d, int)}
    # NOTE: a sliced constant first (the model runs only up to its length), longest first
    longer = sorted((d for d in sizes if d > t_example and d != MAX_SYMBOLIC_T), reverse=True)
    cap = [MAX_SYMBOLIC_T] if t_example < MAX_SYMBOLIC_T else []
    return longer + cap


def _prove_long(view, masks, transform, inputs, seq, batch_ndim) -> tuple[str | None, bool]:
    """(reason, row_scale) at the longest length past the example one where the mask can be
    evaluated: with a symbolic T a window (``i - j < 40`` baked into a buffer, a period) past
    the lengths proven so far would otherwise escape. No such length (or none in the budget):
    nothing more is proven."""
    for t in _long_lengths(view, masks, seq):
        sizes = Sizes(seq, t)
        if proof_bytes(view, masks, sizes) > proof_budget():
            continue
        reason, _, scaled = _fit_at(view, masks, transform, inputs, sizes, batch_ndim, None)
        if reason is not None and ("could not be evaluated" in reason or "shape" in reason):
            continue  # NOTE: the mask does not exist at this length; try a shorter one
        if reason is not None:
            return f"{reason} (a dynamic T: the mask changes past the example length)", False
        return None, scaled
    return None, False


def _fit_at(view, masks, transform, inputs, sizes: Sizes, batch_ndim: int, perturb):
    """(reason, gamma, row_scale) of the mask evaluated at length ``sizes.t``."""
    t = sizes.t
    try:
        with unset_fake_temporarily(), torch.no_grad():
            mask = transform(evaluate(view, masks, inputs, sizes, perturb))
    except Exception as exc:  # noqa: BLE001 - a mask we cannot evaluate is declined
        reason = f"the mask could not be evaluated at T={t} ({type(exc).__name__}: {exc})"
        return reason, None, False
    if mask.is_complex():
        return "complex-valued mask", None, False
    reason, heads = per_head(mask, t, batch_ndim)
    if reason is not None:
        return reason, None, False
    rtol = 1e-2 if mask.dtype in (torch.float16, torch.bfloat16) else 1e-3
    reason, gamma, row_scale = fit_decay(heads, t, rtol)
    return (None if reason is None else f"{reason} at T={t}"), gamma, row_scale


def proof_budget() -> int:
    """Bytes the proof may use: RTP_PROOF_MAX_GB, else half the RAM capped at 16 GiB."""
    env = os.environ.get("RTP_PROOF_MAX_GB")
    if env:
        try:
            gib = float(env)
        except ValueError:
            gib = math.nan
        if not (math.isfinite(gib) and gib > 0):
            raise ValueError(f"RTP_PROOF_MAX_GB must be a positive number of GiB, got {env!r}")
        return int(gib * 2**30)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # NOTE: not POSIX: assume 32 GiB
        ram = 32 * 2**30
    return min(16 * 2**30, ram // 2)
