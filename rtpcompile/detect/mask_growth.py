"""With a symbolic T: what happens to the mask past the lengths the proof evaluates.

Two rules of ``mask_proof.prove``, run after the fit: a value that grows (shrinks)
exponentially with T overflows (underflows) at a longer T and may leave the mask non-finite
(``_overflow``), and positions held in a float lose integer precision at a longer T
(``_precision``, on the positions ``positions.affine_positions`` names).
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .graph_view import GraphView, example, is_tensor
from .mask_eval import MAX_SYMBOLIC_T, Sizes, evaluate, proof_bytes
from .mask_provenance import trainable_inputs
from .memory_budget import proof_budget
from .position_ops import _name
from .positions import affine_positions


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
    affine position (``affine_positions``) is measured at T = 256 and 512. A float one: R, the
    largest magnitude of a value in steps of its neighbour along a position axis (``arange(T) +
    C``: C + T; ``d * log2(gamma_h)`` of [H, T, T]: T, each head in its own steps), grows by r
    per position, and it stays exact while R is below 2 / eps of its dtype, up to
    ``MAX_RUNTIME_T``. Not the largest magnitude over its growth: ``arange(T) + 1000 * T``
    grows by 1001 per position with its values 1 apart. An integer one: its largest magnitude
    below the dtype's max."""
    nodes = affine_positions(view, masks)
    probe = Sizes(seq, 0)
    t2, t3 = probe.attainable(MAX_SYMBOLIC_T // 4), probe.attainable(MAX_SYMBOLIC_T // 2)
    if not nodes or not (t2 and t3 and t2 < t3):
        return None
    measured: dict[fx.Node, list[float]] = {}

    def measure(node, value):
        if node in nodes and is_tensor(value) and value.numel() and value.dtype != torch.bool:
            value = value.detach()
            if value.is_floating_point():
                size = _in_steps(value, example(node))
            else:
                size = float(value.abs().amax())
            measured.setdefault(node, []).append(size)
        return value

    try:
        with unset_fake_temporarily(), torch.no_grad():
            for t in (t2, t3):
                evaluate(view, masks, inputs, Sizes(seq, t), hook=measure)
    except Exception:  # noqa: BLE001 - the proof evaluated it; nothing more to tell here
        return None
    for node in view.sorted(set(measured)):
        if len(measured[node]) != 2:
            continue
        (m2, m3), dtype = measured[node], example(node).dtype
        step = (m3 - m2) / (t3 - t2)
        if not step > 0:
            continue  # NOTE: no growth with T (or NaN): what the proof saw
        floating = dtype.is_floating_point
        limit = 2 / torch.finfo(dtype).eps if floating else float(torch.iinfo(dtype).max)
        lost = t3 + (limit - m3) / step
        if lost <= MAX_RUNTIME_T:
            kind = str(dtype).removeprefix("torch.")
            what = "steps between neighbours" if floating else "in magnitude"
            return (
                f"{node.name} holds positions in {kind} that grow with T ({m3:.6g} {what} at "
                f"T={t3}, {step:.3g} more per position): past T={max(lost, 0):.0f} {kind} "
                f"{'rounds' if floating else 'overflows'} them, where eager's distances are off "
                "and the op's would not be: compute the positions as int64 or float64 (a "
                "dynamic T)"
            )
    return None


def _in_steps(value: torch.Tensor, like) -> float:
    """The largest magnitude of a value in steps of its neighbour along the dims whose sizes
    vary with T (the positions' axes; 0 if none)."""
    largest, x = 0.0, value.double()
    for dim, size in enumerate(like.shape if is_tensor(like) else ()):
        if isinstance(size, torch.SymInt) and x.shape[dim] > 1:
            ends = torch.maximum(
                x.narrow(dim, 0, x.shape[dim] - 1).abs(), x.narrow(dim, 1, x.shape[dim] - 1).abs()
            )
            steps = x.diff(dim=dim).abs()
            keep = torch.isfinite(steps) & torch.isfinite(ends) & (steps > 0)
            if keep.any():
                largest = max(largest, float((ends[keep] / steps[keep]).amax()))
    return largest


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
