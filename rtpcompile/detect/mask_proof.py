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
   ``M[h, i, j] / M[h, i, i] == gamma_h ** (i - j)`` below it; every entry finite. With a
   symbolic T, a value that grows (shrinks) exponentially with T is set to inf (0) where a
   longer T would overflow (underflow) it, and the mask must stay finite (``mask_growth._overflow``:
   ``gamma ** (i - j) * causal``, ``g ** i / g ** j``).
Nothing is frozen from this evaluation: the rewritten graph recomputes gamma and c from the
same mask nodes at run time (see rewrite.py); the values here only feed explain().
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .decay_fit import fit_decay, per_head
from .graph_view import GraphView, example, is_tensor
from .mask_eval import MAX_SYMBOLIC_T, Sizes, evaluate, lengths_for, proof_bytes, subgraph
from .mask_gradient import gradient_reason
from .mask_growth import _overflow, _precision
from .mask_provenance import _state_moves_diagonal, check_provenance, trainable_inputs
from .memory_budget import proof_budget
from .positions import position_cutoff, reads_sizes, reads_symbols

__all__ = ["Proof", "check_provenance", "evaluate", "fit_decay", "lengths_for", "prove", "Sizes"]


@dataclasses.dataclass(frozen=True)
class Proof:
    """The verdict on one region's mask: ``reason`` None means proven."""

    reason: str | None
    gamma: tuple[float, ...] = ()
    row_scale: bool = False


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
    dynamic_t = Sizes(seq, 0).symbol is not None
    # NOTE: with a static T, another symbolic size (a batch, an int argument) keeps its example
    # value in the evaluation, as with a dynamic T: the same rules decline a cut-off at it
    # (``i - j < window``) and read the diagonal when it scales the values (``decay * B / 3``)
    other_sizes = not dynamic_t and reads_symbols(view, masks)
    if reason is None and (dynamic_t or other_sizes):
        reason = position_cutoff(view, masks, dynamic_t)
    if reason is not None:
        return Proof(reason)
    # NOTE: a trainable parameter in the mask will change: the structure must hold for other
    # values too (a learnable decay keeps it; a learned per-distance table does not). The
    # rewrite reads gamma and the diagonal from the mask at run time, so a diagonal that other
    # values move off 1 (a per-head temperature) is folded as a row scale.
    trainable = trainable_inputs(view, masks, inputs)
    tolerance = _tolerance(view, masks)
    proof = Proof("the mask could not be evaluated")
    row_scale = False
    for t in lengths_for(seq):
        sizes = Sizes(seq, t)
        need, budget = proof_bytes(view, masks, sizes), proof_budget()
        if need > budget:
            return Proof(_over_budget(view, masks, sizes, need, budget))
        for perturb in (None, torch.Generator().manual_seed(t)) if trainable else (None,):
            reason, gamma, scaled = _fit_at(
                view, masks, transform, inputs, sizes, batch_ndim, perturb, tolerance
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
    if proof.reason is None and not row_scale:
        args = (view, masks, transform, inputs, seq, batch_ndim, tolerance)
        row_scale = _state_moves_diagonal(*args) or (other_sizes and reads_sizes(view, masks))
    if proof.reason is None and Sizes(seq, 0).symbol is not None:
        reason, scaled = _prove_long(view, masks, transform, inputs, seq, batch_ndim, tolerance)
        if reason is not None:
            return Proof(reason)
        row_scale = row_scale or scaled or reads_sizes(view, masks)
        reason = _overflow(view, masks, transform, inputs, seq) or _precision(
            view, masks, inputs, seq
        )
        if reason is not None:
            return Proof(reason)
    if proof.reason is None and trainable:
        reason = gradient_reason(view, masks, transform, inputs, seq, row_scale, tolerance[0])
        if reason is not None:
            return Proof(reason)
    return dataclasses.replace(proof, row_scale=row_scale) if proof.reason is None else proof


def _over_budget(view, masks, sizes: Sizes, need: int, budget: int) -> str:
    """Why the proof is over its budget, with the way out that helps."""
    gib = f"{need / 2**30:.2g} GiB (budget {budget / 2**30:.2g} GiB, RTP_PROOF_MAX_GB)"
    if proof_bytes(view, masks, sizes, constants_only=True) > budget:
        # NOTE: a large constant (a precomputed [Tmax, Tmax] mask) costs the same at every T
        return (
            f"proving the mask needs about {gib} at any length: the constants it reads are that "
            "large; raise the budget"
        )
    if sizes.symbol is not None:
        return f"proving the mask at T={sizes.t} needs about {gib}; raise the budget"
    return (
        f"proving the mask at T={sizes.t} needs about {gib}; raise the budget, or compile with "
        "dynamic=True (or torch._dynamo.mark_dynamic on the sequence dim): it is then "
        f"proven at T <= {MAX_SYMBOLIC_T}"
    )


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
    # NOTE: T = 2 * s0 is never odd: each length moves up to the nearest one T can take
    probe = Sizes(seq, 0)
    found = [probe.attainable(t) for t in longer + cap]
    return list(dict.fromkeys(t for t in found if t is not None and t > t_example))


def _prove_long(
    view, masks, transform, inputs, seq, batch_ndim, tolerance
) -> tuple[str | None, bool]:
    """(reason, row_scale) at the longest length past the example one where the mask can be
    evaluated: with a symbolic T a window (``i - j < 40`` baked into a buffer, a period) past
    the lengths proven so far would otherwise escape. No such length (or none in the budget):
    nothing more is proven."""
    for t in _long_lengths(view, masks, seq):
        sizes = Sizes(seq, t)
        if proof_bytes(view, masks, sizes) > proof_budget():
            continue
        reason, _, scaled = _fit_at(
            view, masks, transform, inputs, sizes, batch_ndim, None, tolerance
        )
        if reason is not None and ("could not be evaluated" in reason or "shape" in reason):
            continue  # NOTE: the mask does not exist at this length; try a shorter one
        if reason is not None:
            return f"{reason} (a dynamic T: the mask changes past the example length)", False
        return None, scaled
    return None, False


def _tolerance(view: GraphView, masks: list[fx.Node]) -> tuple[float, float]:
    """(rtol, atol) of the fit, from the least precise float the mask is computed in.

    NOTE: a mask computed in float64 throughout is fitted to float64 precision (an element off
    by 5e-4 is not rounding there); one float32 step anywhere (a float32 buffer's powers) makes
    it a float32 mask."""
    dtypes = set()
    for mask in masks:
        values, _, _ = subgraph(view, mask)
        for node in values | {mask}:
            value = example(node)
            if is_tensor(value) and value.is_floating_point():
                dtypes.add(value.dtype)
    if dtypes & {torch.float16, torch.bfloat16}:
        return 1e-2, _ATOL
    if dtypes == {torch.float64}:
        return 1e-9, 1e-12
    return 1e-3, _ATOL


_ATOL = 1e-6


def _fit_at(view, masks, transform, inputs, sizes: Sizes, batch_ndim: int, perturb, tolerance):
    """(reason, gamma, row_scale) of the mask evaluated at length ``sizes.t``; ``tolerance``:
    ``_tolerance``'s (rtol, atol), worked out once per region."""
    t = sizes.t
    try:
        with unset_fake_temporarily(), torch.no_grad():
            values = evaluate(view, masks, inputs, sizes, perturb)
            mask = transform(values)
            del values
    except Exception as exc:  # noqa: BLE001 - a mask we cannot evaluate is declined
        reason = f"the mask could not be evaluated at T={t} ({type(exc).__name__}: {exc})"
        return reason, None, False
    if mask.is_complex():
        return "complex-valued mask", None, False
    reason, heads = per_head(mask, t, batch_ndim)
    if reason is not None:
        return reason, None, False
    rtol, atol = tolerance
    extra = {} if atol == _ATOL else {"atol": atol}  # NOTE: fit_decay's default atol otherwise
    reason, gamma, row_scale = fit_decay(heads, t, rtol, **extra)
    return (None if reason is None else f"{reason} at T={t}"), gamma, row_scale
