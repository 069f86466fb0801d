"""The verdict of the position rules (``positions.py``) on one op: whether an op on a
position-derived or shaped value is on the allow-list (``_check``), with the reason when not;
flips (``_check_flip``), indexing (``_check_index``) and comparisons/clamps
(``_check_cutoff``) in detail."""

from __future__ import annotations

import torch
import torch.fx as fx

from .graph_view import example, is_tensor
from .position_ops import (
    _CASTS,
    _CUTOFFS,
    _EXPS,
    _FLIPS,
    _IN_PLACE_OK,
    _LAYOUT,
    _NUMBER_TENSORS,
    _PERIODS,
    _SCALES,
    _SELECTS,
    _SHIFTS,
    _SMOOTH,
    _constant_fill,
    _unit_shift_comparison,
)
from .position_taint import _CLEAN, _symbolic_shape, _unshifted

# NOTE: ``operator.and_`` (``a & b``) and friends end in "_" but return a new tensor
_NOT_IN_PLACE = {"and_", "or_", "not_"}


def _check(node, name, data, ins, taint, position, shifted) -> str | None:
    """The reason an op on a position-derived or shaped value is not allowed, or None."""
    if node.kwargs.get("out") is not None:
        return f"the mask writes positions through out= ({name})"
    if name.endswith("_") and name not in _IN_PLACE_OK and name not in _NOT_IN_PLACE:
        return f"the mask changes positions in place ({name})"
    base = name.removesuffix("_") if name.endswith("_") and name not in _NOT_IN_PLACE else name
    if base in ("getitem", "__getitem__", "setitem"):
        return _check_index(node.args[1] if len(node.args) > 1 else None, name)
    if base in _CASTS:
        value, inner = example(node), example(node.args[0]) if node.args else None
        to_int = is_tensor(value) and not (value.is_floating_point() or value.is_complex())
        if to_int and value.dtype != torch.bool and is_tensor(inner) and inner.is_floating_point():
            return f"the mask rounds positions to integers ({name})"
        return None
    if base in ("cat", "concat", "concatenate"):
        value = example(node)
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        if is_tensor(value) and isinstance(dim, int) and isinstance(value.shape[dim], int):
            return None
        return f"the mask concatenates positions along a length ({name})"
    if base in _PERIODS or node.kwargs.get("rounding_mode") is not None:
        numbers = [a for a in node.args[1:] if isinstance(a, (int, float))]
        if numbers:
            return f"the mask compares positions with {numbers[0]} ({name})"
        return f"the mask rounds positions ({name})"
    if base in _SELECTS and base not in ("where", "masked_fill"):
        # NOTE: logic on conditions; on integers a bit operation (``d & 2048``) cuts
        values = [example(a) for a in data]
        if any(is_tensor(x) and x.dtype != torch.bool for x in values):
            return f"the mask applies {name} to integer positions (a bit operation)"
    if base == "repeat_interleave":
        # NOTE: counts in a tensor lay values out by data (``repeat_interleave(ones(T))`` is
        # arange(T)); a repeat by a number is layout
        first = node.args[0] if node.args else None
        repeats = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats", first)
        if isinstance(repeats, fx.Node) and is_tensor(example(repeats)):
            return f"the mask repeats positions by counts in a tensor ({name})"
    if base in _SHIFTS or base in _EXPS:
        # NOTE: flat to the float at every length proven, then not: ``1 + exp(d - 1100)`` is 1
        # up to d ~ 1080, ``exp(-exp(d - 1100))`` and ``exp(-(d / 1100) ** 1000)`` are windows
        step = _soft_step(node, base, taint)
        if step is not None:
            return f"the mask applies {name} to {step} (a soft step)"
    if base in _LAYOUT or base in _SCALES or base in _SHIFTS or base in _SELECTS:
        return None
    if base in _FLIPS:
        return None  # NOTE: which dims it flips: position_cutoff (_check_flip)
    if base in _NUMBER_TENSORS:
        return None  # NOTE: a tensor of one number (a size in it is a position: see _Taint)
    if base in ("tril", "triu"):
        diagonal = node.kwargs.get("diagonal", node.args[1] if len(node.args) > 1 else 0)
        if diagonal in (0, 1, -1):
            return None
        return f"the mask compares positions with {diagonal} ({name})"
    if base in _SMOOTH:
        if base == "nan_to_num" and any(t.nan_risk for t in ins):
            return f"the mask clears the NaNs of a product of exponentials of positions ({name})"
        if base in ("nan_to_num", "sum", "mean"):
            return None  # NOTE: no threshold of their own; a NaN-making op before them declines
        return f"the mask applies {name} to shifted positions" if shifted else None
    if base in _CUTOFFS:
        return _check_cutoff(node, name, data, ins, taint, position, shifted)
    return f"the mask applies {name} to positions (not an op that keeps a decay a decay)"


def _soft_step(node: fx.Node, base: str, taint: dict) -> str | None:
    """What the op makes a soft step of, or None: an exponential of positions whose shape
    depends on the sizes (with a static T, ``1 - 2 ** (-5 - arange(H))`` is the heads' decay,
    not a step), or a sum of one over a length, summed with anything but 0 (a constant, another
    one, other positions: ``exp(d - W) + (d >= 0)`` is causal at every length proven), or taken
    an exponential or power of. NOTE: a decay with a leak above the diagonal (``decay + leak *
    (d < 0)``) declines here too, before the fit would see it."""
    args = [a for a in (*node.args[:2], *node.kwargs.values()) if a is not None]
    marks = {a: taint.get(a, _CLEAN) for a in args if isinstance(a, fx.Node)}
    extreme = [a for a, t in marks.items() if t.extreme or t.extreme_sum]
    if not any(_symbolic_shape(a) or marks[a].extreme_sum for a in extreme):
        return None
    summed = any(marks[a].extreme_sum for a in extreme)
    what = "a sum of exponentials of positions" if summed else "an exponential of positions"
    if base in _EXPS or len(extreme) > 1:
        return what
    for arg in args:
        if isinstance(arg, fx.Node) and arg not in extreme and not _constant_fill(arg):
            return f"{what} and other positions" if taint.get(arg, _CLEAN).position else what
        if isinstance(arg, (int, float)) and arg != 0:
            return what
    return None


def _position_symbols(masks: list[fx.Node]) -> set:
    """The symbols in the sizes of the masks' last two dims (the query and key positions)."""
    symbols = set()
    for mask in masks:
        value = example(mask)
        for size in value.shape[-2:] if is_tensor(value) else ():
            if isinstance(size, torch.SymInt):
                symbols |= size.node.expr.free_symbols
    return symbols


def _check_flip(node: fx.Node, name: str, symbols: set) -> str | None:
    """A flip over dims whose sizes do not vary with the positions' symbols (the heads of an
    [H, T, T] mask) is layout; over a position axis it reverses positions (anti-causal).

    NOTE: with dynamic=True the heads of a constant decay can be symbolic too (``s33``); a dim
    whose size shares a symbol with the mask's last two dims counts as a position axis (so does
    the heads dim when Dynamo gives H and T one symbol: declined, the safe side)."""
    value = example(node.args[0]) if node.args else None
    if name == "fliplr":
        dims = [1]
    elif name == "flipud":
        dims = [0]
    else:
        dims = node.kwargs.get("dims", list(node.args[1:]))
        dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = list(dims[0])
    if not is_tensor(value) or not dims or not all(isinstance(d, int) for d in dims):
        return f"the mask applies {name} to positions (which dims it flips is unknown)"
    rank = value.dim()
    if not all(-rank <= d < rank for d in dims):
        return f"the mask applies {name} to positions (dims {dims} out of range)"
    for d in dims:
        size = value.shape[d]
        if isinstance(size, torch.SymInt) and size.node.expr.free_symbols & symbols:
            return f"the mask applies {name} to positions (it reverses a position axis)"
    return None


def _check_index(index, name: str) -> str | None:
    """Indexing by sizes, tensors, None and whole slices is layout; a literal bound cuts."""
    items = index if isinstance(index, tuple) else (index,)
    for item in items:
        if isinstance(item, slice):
            bounds = ((item.start, 0), (item.stop, None), (item.step, 1))
            for bound, plain in bounds:
                if bound is not None and not isinstance(bound, fx.Node) and bound != plain:
                    return f"the mask slices positions at {bound} ({name})"
    return None


def _check_cutoff(node, name, data, ins, taint, position, shifted) -> str | None:
    """A comparison/clamp: of unshifted positions with 0 or with each other only."""
    if not position:
        return None  # NOTE: shaped constants (``ones(T, T).tril() == 0``): no position to cut
    if shifted and not _unit_shift_comparison(node, name, _unshifted(taint)):
        return f"the mask compares positions shifted by a constant ({name})"
    tensors = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
    if any(taint.get(a, _CLEAN).nan_risk for a in tensors):
        return f"the mask compares a product of exponentials of positions ({name})"
    if name != "heaviside" and len(set(tensors)) >= 2:  # NOTE: ``m != m`` finds NaNs
        bent = [a for a in tensors if not taint.get(a, _CLEAN).linear]
        if bent and all(taint.get(a, _CLEAN).position for a in tensors):
            return f"the mask compares a decay of positions with another ({name})"
    others = [a for a in (*node.args, *node.kwargs.values()) if a is not None]
    if name == "heaviside":
        others = node.args[:1]  # NOTE: the second argument is the value at 0
    for arg in others:
        if isinstance(arg, fx.Node):
            t = taint.get(arg, _CLEAN)
            if is_tensor(example(arg)) and not t.position:
                return f"the mask compares positions with a tensor {arg.name!r} ({name})"
            if not is_tensor(example(arg)):
                return f"the mask compares positions with a size {arg.name!r} ({name})"
        elif isinstance(arg, (int, float)) and not isinstance(arg, bool):
            if arg != 0:
                return f"the mask compares positions with {arg} ({name})"
        elif isinstance(arg, (list, tuple)):
            return f"the mask compares positions with {arg} ({name})"
    return None
