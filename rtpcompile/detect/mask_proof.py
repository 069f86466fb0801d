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
   longer T would overflow (underflow) it, and the mask must stay finite (``_overflow``:
   ``gamma ** (i - j) * causal``, ``g ** i / g ** j``).
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
)
from .mask_eval import MAX_SYMBOLIC_T, Sizes, evaluate, lengths_for, proof_bytes, subgraph
from .position_ops import _CUTOFFS, _PERIODS, _name
from .positions import affine_positions, position_cutoff, reads_sizes, reads_symbols

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
    return dataclasses.replace(proof, row_scale=row_scale) if proof.reason is None else proof


# NOTE: the longest length at which _state_moves_diagonal re-fits the mask (see there)
MAX_STATE_FIT_T = 1024


# NOTE: ops whose output a small move of their input may leave unchanged (a threshold, a clamp
# at its bound, a rounding): a state reaching the mask through one is never "moved" enough
_STEPS = _CUTOFFS | _PERIODS | {"round", "floor", "ceil", "trunc", "frac"}


def _state_reach(
    view: GraphView, masks: list[fx.Node], inputs: list, trainable: bool = False
) -> str | None:
    """How model state that is not trainable (tensor inputs; ``trainable``: the trainable ones)
    reaches the masks: None (it does not), "smooth", or "step" (a bool/int state, or a path
    through a threshold, clamp or rounding, or a value that is not floating: a moved state may
    not show there)."""
    index = {node: i for i, node in enumerate(view.placeholders)}
    found = None
    for mask in masks:
        values, _, _ = subgraph(view, mask)
        reached: set[fx.Node] = set()
        for node in view.sorted(values | {mask}):
            i = index.get(node)
            if i is not None:
                value = inputs[i] if i < len(inputs) else None
                if is_tensor(value) and value.requires_grad == trainable:
                    if not value.is_floating_point():
                        return "step"
                    reached.add(node)
                    found = "smooth"
                continue
            if not any(arg in reached for arg in node.all_input_nodes):
                continue
            reached.add(node)
            value = example(node)
            if _name(node) in _STEPS or (is_tensor(value) and not value.is_floating_point()):
                return "step"
    return found


def _state_moves_diagonal(view, masks, transform, inputs, seq, batch_ndim, tolerance) -> bool:
    """Whether other values of the model state the mask reads (buffers, frozen parameters,
    tensor attributes: a later ``load_state_dict`` or ``copy_`` gives them) move its diagonal:
    then the op reads the diagonal at run time (a row scale).

    NOTE: a per-head temperature buffer of ones at compile time, changed later, was silently
    ignored (the output kept a row scale of 1). The mask is evaluated once with every such
    input moved (``_moved``) and its diagonal compared with the unmoved one; no fit, so a state
    that breaks the structure when moved (a precomputed full mask beside the temperature) still
    counts: reading the diagonal is always right, only not free (a gather and a multiply of the
    output per call). A mask that cannot be evaluated moved answers yes. Past
    ``MAX_STATE_FIT_T`` (a static T, evaluated at its own length only) any such state answers
    yes without evaluating, and so does a state that reaches the mask through a step
    (``_state_reach``: a head gate ``decay * (gate >= 0.5)`` or a bool/int buffer, which a small
    move leaves unchanged)."""
    # NOTE: a trainable input is moved by the fits instead, which a clamp at its bound hides
    # (``decay * p.clamp(max=1)`` with p = 2 at compile time): through a step, read the diagonal
    if _state_reach(view, masks, inputs, trainable=True) == "step":
        return True
    reach = _state_reach(view, masks, inputs)
    if reach != "smooth":
        return reach == "step"
    lengths = lengths_for(seq)
    t = next((t for t in lengths if t >= 2), lengths[-1])
    if t > MAX_STATE_FIT_T:
        # NOTE: at a static T = 4096 this check doubled the proof's time (4.9 -> 10 s for the
        # demo model); reading the diagonal costs ~2% of its forward there instead
        return True
    sizes = Sizes(seq, t)
    diagonals = []
    for generator in (None, torch.Generator().manual_seed(t + 1)):
        try:
            with unset_fake_temporarily(), torch.no_grad():
                values = evaluate(view, masks, inputs, sizes, generator, move_state=True)
                mask = transform(values)
        except Exception:  # noqa: BLE001 - cannot tell: read the diagonal
            return True
        reason, heads = per_head(mask, t, batch_ndim)
        if reason is not None or heads.is_complex():
            return True
        diagonals.append(heads.diagonal(dim1=-2, dim2=-1).double())
    rtol, atol = tolerance
    return not torch.allclose(*diagonals, rtol=rtol, atol=atol, equal_nan=True)


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


def _extremes(value) -> tuple[float, float] | None:
    """(largest, smallest nonzero) finite magnitude of a real floating tensor (0 for none),
    else None."""
    if not is_tensor(value) or not value.is_floating_point() or value.numel() == 0:
        return None
    magnitude = value.detach().abs()
    finite = torch.isfinite(magnitude)
    largest = float(magnitude.masked_fill(~finite, 0).amax())
    nonzero = finite & (magnitude > 0)
    smallest = float(magnitude.masked_fill(~nonzero, math.inf).amin()) if nonzero.any() else 0.0
    return largest, smallest


def _overflow(view: GraphView, masks: list[fx.Node], transform, inputs, seq) -> str | None:
    """With a symbolic T: why the mask turns non-finite at a longer T than the proof saw, or
    None.

    NOTE: ``gamma ** (i - j) * causal`` is exact up to the T where gamma ** (i - j) overflows
    above the diagonal (float32, gamma = 0.97: T ~ 2900), then inf * 0 is NaN there, as eager
    and Inductor compute it; the op would return finite rows. The largest finite magnitude of
    each value of the mask subgraph is measured at T/4, T/2 and T (T = 512); one that grows
    exponentially (the same log-slope over both halves: a polynomial's halves, its bounded
    sums' even more) is set to inf where it exceeds its T/2 maximum, as a longer T would give,
    and the mask is recomputed: a select (tril, where, masked_fill) keeps it finite, a product
    with 0 does not. Only a growing value none of whose inputs grows is set to inf (what comes
    after it sees the inf: a ``nan_to_num`` of it stays finite), and a slice of a constant
    tensor (a precomputed buffer) is extrapolated only when the constant itself holds the inf
    (or, shrinking, an exact 0) a longer slice would reach: otherwise it cannot. Likewise
    a value whose smallest nonzero magnitude shrinks exponentially (``g ** i`` of a ratio
    ``g ** i / g ** j``: 0 / 0 is NaN in eager once both underflow) is set to 0 where it falls
    below its T/2 minimum, in a second evaluation. A mask too large to evaluate at T = 512 is
    not checked. Worked out once per set of mask nodes of the graph (layers sharing one
    mask)."""
    memo = view.__dict__.setdefault("_overflow_memo", {})
    # NOTE: trainable parameters moved too (as ``prove`` fits them): a learnable decay that
    # starts at gamma = 1 grows nothing until training moves it below 1
    moved = (None, _OVERFLOW_SEED) if trainable_inputs(view, masks, inputs) else (None,)
    for seed in moved:
        if (tuple(masks), seed) not in memo:
            memo[tuple(masks), seed] = _overflowed(view, masks, inputs, seq, seed)
        for grows, values, node, magnitude, at, t3 in memo[tuple(masks), seed]:
            try:
                with unset_fake_temporarily(), torch.no_grad():
                    mask = transform(values)
            except Exception:  # noqa: BLE001 - the proof evaluated it; nothing more to tell here
                continue
            if torch.isfinite(mask).all():
                continue
            moved_note = " (with its trainable parameters moved, as training would)"
            when = "" if seed is None else moved_note
            if grows:
                return (
                    f"{node.name} in the mask grows with T ({magnitude:.3g} at T={t3}){when} and "
                    f"overflows to inf at about T={at:.0f}, where the mask turns non-finite "
                    "(inf * 0, or inf below the diagonal): a proof for every T cannot hold; "
                    "select the decay with torch.where, masked_fill or tril before anything "
                    "multiplies it, or clamp the exponent (a dynamic T)"
                )
            return (
                f"{node.name} in the mask shrinks with T ({magnitude:.3g} at T={t3}){when} and "
                f"underflows to 0 at about T={at:.0f}, where the mask turns non-finite (0 / 0, "
                "or x / 0): a proof for every T cannot hold; write the decay as one power of the "
                "distance (gamma ** (i - j)) rather than a ratio of powers of the positions "
                "(a dynamic T)"
            )
    return None


_OVERFLOW_SEED = 17

# NOTE: the longest T the precision rule looks ahead to: a [T, T] float32 mask at 2**20 would
# take 4 TiB, so eager never gets there
MAX_RUNTIME_T = 2**20


def _precision(view: GraphView, masks: list[fx.Node], inputs, seq) -> str | None:
    """With a symbolic T: why the positions the mask is computed from lose precision at a
    longer T than the proof saw, or None.

    NOTE: float32 holds the integers up to 2**24 exactly (float16 2048, bfloat16 256):
    ``arange(T).float() + (2**24 - 1050)`` is exact up to T = 1050, and past it eager rounds the
    distances (0.5 relative error at T = 1200) where the op computes gamma ** (i - j). Each
    affine position (``affine_positions``) is measured at T = 256 and 512: its largest
    magnitude M grows by s per position, and it stays exact while M / s (M in steps of s) is
    below 2 / eps of its dtype (an integer dtype: M below its max), up to ``MAX_RUNTIME_T``."""
    nodes = affine_positions(view, masks)
    probe = Sizes(seq, 0)
    t2, t3 = probe.attainable(MAX_SYMBOLIC_T // 4), probe.attainable(MAX_SYMBOLIC_T // 2)
    if not nodes or not (t2 and t3 and t2 < t3):
        return None
    largest: dict[fx.Node, list[float]] = {}

    def measure(node, value):
        if node in nodes and is_tensor(value) and value.numel() and value.dtype != torch.bool:
            largest.setdefault(node, []).append(float(value.detach().abs().amax()))
        return value

    try:
        with unset_fake_temporarily(), torch.no_grad():
            for t in (t2, t3):
                evaluate(view, masks, inputs, Sizes(seq, t), hook=measure)
    except Exception:  # noqa: BLE001 - the proof evaluated it; nothing more to tell here
        return None
    for node in view.sorted(set(largest)):
        if len(largest[node]) != 2:
            continue
        (m2, m3), dtype = largest[node], example(node).dtype
        step = (m3 - m2) / (t3 - t2)
        if not step > 0:
            continue  # NOTE: no growth with T (or NaN): what the proof saw
        exact = 2 * step / torch.finfo(dtype).eps if dtype.is_floating_point else None
        limit = exact if exact is not None else float(torch.iinfo(dtype).max)
        lost = t3 + (limit - m3) / step
        if lost <= MAX_RUNTIME_T:
            kind, what = str(dtype).removeprefix("torch."), "rounds" if exact else "overflows"
            return (
                f"{node.name} holds positions in {kind} that grow with T ({m3:.6g} at T={t3}, "
                f"{step:.3g} per position): past T={max(lost, 0):.0f} {kind} {what} them, where "
                "eager's distances are off and the op's would not be: compute the positions as "
                "int64 or float64 (a dynamic T)"
            )
    return None


def _constant_root(node: fx.Node) -> fx.Node | None:
    """The graph constant (a buffer, a parameter) that ``node`` only reshapes or slices, or
    None."""
    while node.op in ("call_function", "call_method") and node.args:
        if _name(node) not in _SLICES:
            return None
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return None
    return node if node.op in ("get_attr", "placeholder") else None


def _reaches_edge(view: GraphView, root: fx.Node, inputs, grows: bool) -> bool:
    """Whether the constant ``root`` already holds what a value sliced from it would reach at a
    longer T: an inf (grows) or an exact 0 (shrinks; a precomputed ``g ** arange(32768)``
    underflowed past 3392 in float32). A constant that holds neither cannot get there, whatever
    length the slice takes: the slice is not extrapolated."""
    if root.op == "placeholder":
        value = inputs[view.placeholders.index(root)]
    else:
        value = view.gm
        for part in root.target.split("."):
            value = getattr(value, part, None)
    if not is_tensor(value) or not value.is_floating_point():
        return False
    with unset_fake_temporarily(), torch.no_grad():
        return bool(value.isinf().any() if grows else (value == 0).any())


# NOTE: what a slice of a precomputed buffer goes through (``buf[:, :T, None]``)
_SLICES = frozenset(
    {"getitem", "narrow", "slice", "unsqueeze", "view", "reshape", "expand", "permute"}
    | {"transpose", "contiguous", "to", "float", "double", "type_as"}
)


def _overflowed(view: GraphView, masks: list[fx.Node], inputs, seq, seed: int | None) -> list:
    """``_overflow``'s measurement (once per set of mask nodes): a list of (grows, the mask
    values at T = 512 with every value growing (shrinking) exponentially set to inf (0) where it
    outgrows (falls below) its T = 256 range, the earliest node to overflow (underflow), its
    magnitude at 512, the T where it does, 512), at most one per direction; empty when nothing
    grows or shrinks. ``seed``: trainable parameters moved (``mask_eval._moved``) by a
    generator of that seed, the same at every T."""
    probe = Sizes(seq, 0)
    # NOTE: T = 512, not 1024: a quarter of the cost (~0.1 s for an 8-head mask); a value that
    # overflows by T = 1024 already left NaNs in the fit there
    t3 = probe.attainable(MAX_SYMBOLIC_T // 2)
    t2 = probe.attainable(t3 // 2) if t3 else None
    t1 = probe.attainable(t3 // 4) if t3 else None
    if not (t1 and t2 and t3) or not 8 <= t1 < t2 < t3:
        return []
    if proof_bytes(view, masks, Sizes(seq, t3)) > proof_budget():
        return []
    extremes: dict[fx.Node, list[tuple[float, float]]] = {}
    dtypes: dict[fx.Node, torch.dtype] = {}

    def measure(node, value):
        found = _extremes(value)
        if found is not None:
            extremes.setdefault(node, []).append(found)
            dtypes[node] = value.dtype
        return value

    try:
        with unset_fake_temporarily(), torch.no_grad():
            for t in (t1, t2, t3):
                evaluate(view, masks, inputs, Sizes(seq, t), _generator(seed), hook=measure)
    except Exception:  # noqa: BLE001 - the proof evaluated it; nothing more to tell here
        return []
    found = []
    for grows in (True, False):
        roots = {n: _constant_root(n) for n in extremes}
        sliced = {n for n, root in roots.items() if root is not None}
        sliced -= {n for n in sliced if _reaches_edge(view, roots[n], inputs, grows)}
        limits = _exponential(extremes, dtypes, (t1, t2, t3), grows, sliced)
        if not limits:
            continue

        def extrapolate(node, value, limits=limits, grows=grows):
            if node not in limits:
                return value
            bound = extremes[node][1][0 if grows else 1]
            if grows:
                return torch.where(value.abs() > bound, value.sign() * math.inf, value)
            return torch.where(value.abs() < bound, value * 0, value)

        try:
            with unset_fake_temporarily(), torch.no_grad():
                values = evaluate(
                    view, masks, inputs, Sizes(seq, t3), _generator(seed), hook=extrapolate
                )
        except Exception:  # noqa: BLE001
            continue
        node = min(limits, key=limits.get)
        found.append((grows, values, node, extremes[node][2][0 if grows else 1], limits[node], t3))
    return found


def _exponential(extremes, dtypes, lengths, grows: bool, fixed) -> dict[fx.Node, float]:
    """{node: the T where it leaves the dtype's range} of the values whose largest (smallest
    nonzero) magnitude grows (shrinks) exponentially over ``lengths`` (the same log-slope over
    both halves: a polynomial's halves, its bounded sums' even more, do not), keeping only where
    the change starts (a later value changes because its input does). ``fixed``: nodes not
    extrapolated (slices of a constant that never leaves the range, ``_reaches_edge``)."""
    t1, t2, t3 = lengths
    changing: dict[fx.Node, float] = {}
    for node, found in extremes.items():
        if len(found) != 3 or node in fixed:
            continue
        m1, m2, m3 = (f[0] if grows else f[1] for f in found)
        if min(m1, m2, m3) <= 0:
            continue
        sign = 1.0 if grows else -1.0
        rise = sign * (math.log(m3) - math.log(m2))
        if rise < 1e-5:
            continue
        slope1 = sign * (math.log(m2) - math.log(m1)) / (t2 - t1)
        slope2 = rise / (t3 - t2)
        if slope2 < 0.75 * slope1:
            continue
        info = torch.finfo(dtypes[node])
        if _affine(m1, m2, m3, lengths):
            # NOTE: ``arange(T) + 1000``: its log-slope only looks exponential; a linear value
            # overflows where the line reaches the dtype's max (and crosses 0, never underflows)
            at = t3 + (info.max - m3) * (t3 - t2) / (m3 - m2)
            if grows and at <= MAX_RUNTIME_T:
                changing[node] = at
            continue
        # NOTE: the smallest subnormal: eager (CPU and CUDA) keeps subnormals by default
        edge = math.log(info.max) if grows else -math.log(info.smallest_normal * info.eps)
        changing[node] = t3 + max(0.0, edge - sign * math.log(m3)) / slope2
    return {n: t for n, t in changing.items() if not any(a in changing for a in n.all_input_nodes)}


def _affine(m1: float, m2: float, m3: float, lengths) -> bool:
    """Whether m changes by the same amount per position over both halves (within 1e-3)."""
    t1, t2, t3 = lengths
    first, second = (m2 - m1) / (t2 - t1), (m3 - m2) / (t3 - t2)
    return abs(second - first) <= 1e-3 * max(abs(first), abs(second))


def _generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed)


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
