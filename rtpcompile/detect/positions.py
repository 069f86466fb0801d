"""With a symbolic T, what may be done to positions on the way to the mask.

The proof evaluates the mask at a few lengths (up to 1024); a cut-off past them (a window
``i - j < 1100``, a decay floor ``(g ** d).clamp(min=0.01)``, a period ``i % 2000``) would escape.
So every op on a *position-derived* value must be one that cannot introduce a length-dependent
cut-off (an allow-list, not a list of known windows):

- layout ops, casts (to an integer dtype only from integers), true products and divisions,
  negation, ``abs``, ``exp``/``exp2``/``pow`` (a decay), sums, roots and logs (a log shifts:
  ``log(d / 1100)``); ``repeat_interleave`` by a number only;
- additions and subtractions -- of two positions (``i - j``), or with a constant, which *shifts*
  the result (``i - j - 1100``); mixing scales shifts too (a sum with a decay, a product of two
  linear positions, a power of one: ``2048 i - i * i`` changes sign at i = 2048);
- ``tril``/``triu`` with a diagonal of 0 or +-1; ``where``/``masked_fill`` (values of 0 or +-inf
  keep a position unshifted, other constants shift it); boolean logic;
- a comparison, clamp, ``relu``, ``sign``, ``heaviside``, ``maximum``/``minimum`` of an unshifted
  position with 0 or of two linear ones (``i >= j``: causality; ``m != m`` finds NaNs).

Anything else on a position-derived value declines, with the op in the reason. Positions are
``arange``-like results (but an ``arange(H)`` of a fixed length only broadcast against the
positions, the heads of a multi-scale decay, is a constant, as a buffer of its values is:
``_constant_seeds``) and constants read at the sizes (``self.pos[:T]``, ``table[T]``: their
values past the lengths proven are unknown, so not linear ones); tensors whose shape depends on
the sizes (``ones(T, T)``, ``ones_like(d)``) are *shaped*: ops on them must be on the allow-list
too (``ones(T).cumsum(0)`` is positions), but they are constants, not positions, in a comparison
(``d < full((T, T), 1100)`` shifts nothing and still compares with 1100) until reduced: a sum or
mean of one counts (``ones(T, T).tril().sum(-1)`` is i + 1, ``ones(B).sum()`` is B) and is a
position.

Float positions lose integer precision at some length (2**24 in float32): that is measured, not
read from the ops (``affine_positions`` names what ``mask_proof._precision`` measures).
"""

from __future__ import annotations

import collections
import dataclasses

import torch
import torch.fx as fx
from torch.utils._sympy.symbol import SymT, symbol_is_type

from .graph_view import GraphView, example, is_tensor
from .mask_eval import subgraph
from .mutation import writes
from .position_ops import (
    _CASTS,
    _COMPARISONS,
    _CUMULATIVE,
    _CUTOFFS,
    _EXPS,
    _FILLS,
    _FLIPS,
    _IN_PLACE_OK,
    _LAYOUT,
    _LINEAR,
    _LOGS,
    _NUMBER_TENSORS,
    _PERIODS,
    _POWERS,
    _PRODUCTS,
    _REDUCTIONS,
    _SCALES,
    _SEEDS,
    _SELECTS,
    _SHIFTS,
    _SMOOTH,
    _VALUE_OPS,
    _constant_fill,
    _difference_of_one_origin,
    _name,
    _unit_shift_comparison,
)


@dataclasses.dataclass(frozen=True)
class _Taint:
    position: bool = False  # derived from an arange-like value
    shaped: bool = False  # a tensor whose shape depends on the sizes (or derived from one)
    shifted: bool = False  # a position with a constant added (``i - j - W``)
    # NOTE: linear: positively homogeneous in the positions (``i - j``, ``|i - j|``, ``2 * i``):
    # its sign pattern is the same at every scale, so comparing it with 0 or with another linear
    # one cuts nowhere that depends on T. A sum of a decay and anything, a product of two linear
    # values (``2048 i - i*i``), or a power of one mixes scales: that counts as shifted.
    linear: bool = False
    # NOTE: an exponential of positions overflows or underflows at some length; a product or
    # quotient of two (``exp(d / 10) * exp(-d / 10)``) is then inf * 0 = NaN there, and clearing
    # NaNs (nan_to_num, ``m[m != m] = 0``) would cut at that length
    extreme: bool = False
    nan_risk: bool = False
    # NOTE: a number computed from the sizes (``T``, ``T / 1100``, ``max(1, T / 1100)``): a
    # position once it reaches a tensor as a value; ``pending`` is why it may not (an op not on
    # the allow-list), reported only then -- a size used as a shape (``arange(max(T, 16))``,
    # ``view(T // 2, 2)``) is never a value of the mask
    size: bool = False
    pending: str | None = None


_CLEAN = _Taint()


_DYNAMIC_T = (
    "a window the proof cannot check at every length of a dynamic T (compile with a static "
    "sequence length to prove it at that length)"
)
_OTHER_SIZE = (
    "a size Dynamo made symbolic, which may change between calls without a recompile: the "
    "proof sees only its example value (torch._dynamo.mark_static on it, or dynamic=False, "
    "proves the mask at each value)"
)


def reads_symbols(view: GraphView, masks: list[fx.Node]) -> bool:
    """Whether any node of the masks' subgraphs holds a symbolic size (a symbolic batch or an
    int argument Dynamo made a symbol, with a static T)."""
    for mask in masks:
        values, _, _ = subgraph(view, mask)
        for node in values | {mask}:
            value = example(node)
            if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                return True
            if _symbolic_shape(node):
                return True
    return False


def position_cutoff(view: GraphView, masks: list[fx.Node], dynamic_t: bool = True) -> str | None:
    """Why the masks may hold a cut-off past the lengths the proof evaluates (see the module
    docstring), or None. ``dynamic_t`` False: T is static, and the masks read another symbolic
    size (``reads_symbols``), which the same rules check."""
    for mask in masks:
        _, reason = _walk(view, masks, mask, dynamic_t)
        if reason is not None:
            return f"{reason}: {_DYNAMIC_T if dynamic_t else _OTHER_SIZE}"
    return None


def affine_positions(view: GraphView, masks: list[fx.Node]) -> set[fx.Node]:
    """The tensors of the masks' subgraphs that hold positions affinely under a dynamic T
    (``arange(T).float() + C``, ``i - j``, ``0.5 * d``; not a decay of them): what the proof's
    precision rule measures (``mask_proof._precision``)."""
    found = set()
    for mask in masks:
        taint, _ = _walk(view, masks, mask, True)
        found |= {
            node
            for node, t in taint.items()
            if t.position and t.linear and not t.size and is_tensor(example(node))
        }
    return found


def _walk(view: GraphView, masks: list[fx.Node], mask: fx.Node, dynamic_t: bool):
    """(taint of each node, the first reason an op is not allowed or None) of one mask."""
    values, _, _ = subgraph(view, mask)
    taint: dict[fx.Node, _Taint] = {}
    # NOTE: with a static T the positions are aranges of a fixed length themselves
    constants = _constant_seeds(values | {mask}) if dynamic_t else set()
    for node in view.sorted(values | {mask}):
        if node in constants:
            taint[node] = _CLEAN
            continue
        reason = _visit(view, node, taint)
        if reason is None and _name(node) in _FLIPS and node.args:
            source = taint.get(node.args[0], _CLEAN)
            if source.position or source.shaped:
                reason = _check_flip(node, _name(node), _position_symbols(masks))
        if reason is not None:
            return taint, reason
    return taint, None


def reads_sizes(view: GraphView, masks: list[fx.Node]) -> bool:
    """Whether a number computed from the sizes reaches a mask as a value (``decay * T**-0.5``):
    the mask's diagonal may then change with T where the proof saw 1 (``max(1, T / 1100)`` is 1
    up to T = 1100; that one declines, but a product that is 1 at the lengths proven is no
    less possible), so the op reads the diagonal at run time (a row scale)."""
    for mask in masks:
        values, _, _ = subgraph(view, mask)
        for node in values | {mask}:
            if node.op not in ("call_function", "call_method") or _size_number(node):
                continue
            data = [
                a
                for a in node.all_input_nodes
                if view.g.has_edge(a, node) and not view.g.edges[a, node]["meta"]
            ]
            if any(_size_number(a) for a in _value_reads(node, _name(node), data)):
                return True
    return False


def _symbolic_shape(node: fx.Node) -> bool:
    value = example(node)
    return is_tensor(value) and any(isinstance(s, torch.SymInt) for s in value.shape)


def _static_shape(node: fx.Node) -> bool:
    value = example(node)
    return is_tensor(value) and not any(isinstance(s, torch.SymInt) for s in value.shape)


# NOTE: ops that cannot lay the values of a fixed-size axis along a position axis: elementwise
# ops (broadcasting a fixed axis against the positions keeps it that axis) and views that only
# add, drop or reorder axes
_KEEPS_AXES = (
    _SCALES | _SHIFTS | _SELECTS | _CUTOFFS | _SMOOTH | _POWERS | _CASTS | _PERIODS | _FLIPS
    | {"where", "tril", "triu", "setitem", "clone", "contiguous", "detach", "unsqueeze",
       "squeeze", "expand", "expand_as", "broadcast_to", "transpose", "permute", "movedim",
       "moveaxis", "swapaxes", "swapdims", "t", "mT", "getattr", "masked_fill"}
)  # fmt: skip


def _basic_index(node: fx.Node) -> bool:
    """A getitem by ints, None, ``...`` and whole slices only (no slice bound, no tensor)."""
    index = node.args[1] if len(node.args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    whole = slice(None, None, None)
    return all(i is None or i is Ellipsis or type(i) is int or i == whole for i in items)


def _constant_seeds(nodes: set) -> set:
    """The ``arange``-like nodes of a fixed length (``arange(H)``: the heads of a multi-scale
    decay, ``1 - 2 ** (-5 - arange(H))``) whose values never reach a position axis: no node
    they feed gets a symbolic shape but through broadcasting or axis-reordering views
    (``_KEEPS_AXES``). Such a seed is a constant, as a buffer of its values is. One sliced or
    reshaped to the sizes (``arange(4096)[:T]``) is a position: the proof's longer lengths
    know a buffer's length (``_long_lengths``), not this one's. With a dynamic T only: with a
    static T (another size symbolic) the positions are fixed-length aranges themselves, and
    ``tril(decay, diagonal=B - 3)`` must stay a cut at a size."""
    found = set()
    for seed in nodes:
        if _name(seed) not in _SEEDS or not _static_shape(seed):
            continue
        todo, seen, ok = [seed], {seed}, True
        while todo and ok:
            for user in todo.pop().users:
                if user in seen or user not in nodes:
                    continue
                seen.add(user)
                todo.append(user)
                # NOTE: a write of its values into another tensor (``x[:] = arange(4096)``,
                # ``x.copy_(...)``) is not followed: that tensor may be sliced to T
                targets = [*user.args[:1], user.kwargs.get("out")]
                if any(t not in seen and writes(user, t) for t in targets if t is not None):
                    ok = False
                elif _symbolic_shape(user) or not is_tensor(example(user)):
                    name = _name(user)
                    if name == "getitem" or name == "__getitem__":
                        ok = ok and _basic_index(user)
                    else:
                        ok = ok and name.removesuffix("_") in _KEEPS_AXES
        if ok:
            found.add(seed)
    return found


def _visit(view: GraphView, node: fx.Node, taint: dict) -> str | None:
    """Record the node's taint; the reason when it is an op not allowed on its inputs."""
    name = _name(node)
    data = [
        a
        for a in node.all_input_nodes
        if view.g.has_edge(a, node) and not view.g.edges[a, node]["meta"]
    ]
    if _size_number(node):
        return _visit_size(view, node, name, data, taint)
    data = _value_reads(node, name, data)
    for a in data:
        if taint.get(a, _CLEAN).pending is not None:
            return taint[a].pending
    return _visit_values(view, node, name, data, taint)


def _visit_values(view: GraphView, node: fx.Node, name: str, data: list, taint: dict):
    """``_visit`` of a node whose data inputs ``data`` are all read as values."""
    ins = [taint.get(a, _CLEAN) for a in data]
    if node.op == "call_module" and any(t.position or t.shaped for t in ins):
        return f"the mask applies module {node.target!r} to positions"
    if node.op not in ("call_function", "call_method"):
        taint[node] = _Taint(shaped=node.op != "placeholder" and _symbolic_shape(node))
        return None
    if not any(t.position or t.shaped for t in ins):
        if name in _SEEDS:
            starts = [a for a in node.args[:1] if len(node.args) > 1 or "end" in node.kwargs]
            shifted = any(not (isinstance(a, (int, float)) and a == 0) for a in starts)
            taint[node] = _Taint(position=True, shifted=shifted, linear=True)
        elif name in _INDEXING and any(_size_number(a) for a in node.all_input_nodes):
            # NOTE: a constant read at the sizes (``self.pos[:T]``, ``self.table[T]``) holds
            # whatever it holds there, past the lengths proven too: positions of no known form
            taint[node] = _Taint(position=True, shaped=_symbolic_shape(node))
        else:
            taint[node] = _Taint(shaped=_symbolic_shape(node))
        return None
    position = any(t.position for t in ins)
    shifted = any(t.shifted for t in ins)
    if name in _CUMULATIVE and not position:
        # NOTE: a running sum of a shaped constant (``ones(T).cumsum(0)``, a constant log decay
        # ``log_g * ones(T)`` summed along T as Mamba2's segsum does) is positions times it
        taint[node] = _Taint(position=True, shaped=True, linear=True)
        return None
    linear = all(t.linear for t in ins if t.position) and name.removesuffix("_") in _LINEAR
    result = _Taint(
        position=position,
        shaped=True,
        shifted=shifted,
        linear=position and linear,
        extreme=any(t.extreme for t in ins) or (position and name.removesuffix("_") in _EXPS),
        nan_risk=any(t.nan_risk for t in ins) or _risks_nan(node, name, taint),
    )
    reason = _check(node, name, data, ins, taint, position, shifted)
    if reason is not None:
        return reason
    if name in _SHIFTS:
        result = dataclasses.replace(result, shifted=shifted or _shifts(node, taint))
        if _difference_of_one_origin(node, name, _unshifted(taint)):
            # NOTE: ``i - j`` of ``i = arange(1, T + 1)``: the shifts cancel
            result = dataclasses.replace(result, shifted=False)
    if _mixes_scales(node, name, taint):
        result = dataclasses.replace(result, shifted=True, linear=False)
    if name in ("where", "masked_fill", "masked_fill_", "setitem"):
        result = dataclasses.replace(result, shifted=shifted or _fills(node, taint))
    if name in _COMPARISONS and shifted:
        # NOTE: allowed by _check_cutoff only as ``i < j + 1`` of one origin: a causal mask
        result = dataclasses.replace(result, shifted=False, linear=False)
    if name.removesuffix("_") in _REDUCTIONS:
        # NOTE: a row sum (a normaliser) is no exponential of positions for the NaN rule; a sum
        # of a shaped constant counts (``ones(T, T).sum(-1)`` is T, ``ones(T, T).tril().sum(-1)``
        # is i + 1, ``ones(B).sum()`` is B): positions, not linear ones (a count, a mean)
        result = dataclasses.replace(result, extreme=False, position=True, linear=False)
    if name.removesuffix("_") in _LOGS and position:
        # NOTE: a logarithm turns a scale into a shift: ``log(d / 1100) < 0`` is ``d < 1100``
        result = dataclasses.replace(result, shifted=True, linear=False)
    taint[node] = result
    if name.endswith("_") or name == "setitem":
        target = node.args[0]
        taint[target] = _merge(taint.get(target, _CLEAN), result)
    return None


def _size_number(node: fx.Node) -> bool:
    """The node is a number that depends on the sizes (a SymInt/SymFloat/SymBool with a symbol
    other than a float's).

    NOTE: with dynamic=True Dynamo lifts a python-float attribute (``self.gamma = 0.96875``) to
    a graph input read by ``.item()``, a SymFloat of a float symbol (``zf0``): a constant of
    the model like a buffer, not a size; ``float(T)``, ``T ** 0.5`` keep T's symbol."""
    value = example(node)
    if not isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return False
    return any(not _float_symbol(s) for s in value.node.expr.free_symbols)


def _float_symbol(symbol) -> bool:
    """A symbol Dynamo made for a float value (``zf0``), never a size."""
    return symbol_is_type(symbol, (SymT.FLOAT, SymT.UNBACKED_FLOAT))


def _visit_size(view: GraphView, node: fx.Node, name: str, data, taint: dict) -> None:
    """A number computed from the sizes: a linear position (T itself, or a size read off a
    tensor), then what the arithmetic on it makes it; an op not allowed on positions is kept as
    ``pending``, the reason if the number reaches the mask as a value."""
    sizes = [a for a in data if taint.get(a, _CLEAN).size]
    pending = next((taint[a].pending for a in sizes if taint[a].pending is not None), None)
    if node.op not in ("call_function", "call_method") or not sizes:
        taint[node] = _Taint(position=True, linear=True, size=True)
        return None
    if pending is None:
        # NOTE: run the tensor rules on the number, its inputs counted as values; writes go to a
        # layer of its own (a ChainMap, not a copy of the whole map per size number)
        scratch = collections.ChainMap({}, taint)
        pending = _visit_values(view, node, name, data, scratch)
        result = scratch.get(node, _Taint(position=True))
    else:
        result = _Taint(position=True)
    taint[node] = dataclasses.replace(result, position=True, size=True, pending=pending)
    return None


def _value_reads(node: fx.Node, name: str, data: list) -> list:
    """The data inputs the node reads as values: a size read as a shape, an index or a bound
    (``ones(T, T)``, ``arange(T)``, ``view(T, 1)``, ``buf[:T]``) is no value of the mask."""
    if not any(_size_number(a) for a in data):
        return data
    base = name if name in _NUMBER_TENSORS or name in _VALUE_OPS else name.removesuffix("_")
    if base in _NUMBER_TENSORS:
        slots = _NUMBER_TENSORS[base]
        if slots is None:
            return data
        keys = ("fill_value", "value")
        read = [node.args[i] for i in slots if i < len(node.args)]
        read += [v for k, v in node.kwargs.items() if k in keys]
        values = {a for a in read if isinstance(a, fx.Node)}
        return [a for a in data if not _size_number(a) or a in values]
    if base in _VALUE_OPS:
        return data
    return [a for a in data if not _size_number(a)]


def _merge(a: _Taint, b: _Taint) -> _Taint:
    linear = (a.linear or not a.position) and (b.linear or not b.position)
    return _Taint(
        a.position or b.position,
        a.shaped or b.shaped,
        a.shifted or b.shifted,
        linear,
        a.extreme or b.extreme,
        a.nan_risk or b.nan_risk,
    )


def _risks_nan(node: fx.Node, name: str, taint: dict) -> bool:
    """A product/quotient of two exponentials of positions (see ``_Taint.extreme``)."""
    if name.removesuffix("_") not in _PRODUCTS:
        return False
    operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    return len(operands) == 2 and all(taint.get(a, _CLEAN).extreme for a in operands)


def _mixes_scales(node: fx.Node, name: str, taint: dict) -> bool:
    """A product/quotient of two linear positions, a power of one, or a sum with a position that
    is not linear (a decay): no longer the same sign pattern at every scale."""
    operands = [taint.get(a, _CLEAN) for a in node.args[:2] if isinstance(a, fx.Node)]
    positions = [t for t in operands if t.position]
    base = name.removesuffix("_")
    if base in _PRODUCTS:
        return sum(t.linear for t in positions) >= 2
    if base in _POWERS:
        first = node.args[0] if node.args else None
        return isinstance(first, fx.Node) and taint.get(first, _CLEAN).linear
    if base in _SHIFTS:
        return any(not t.linear for t in positions)
    return False


# ops that read a tensor at an index or over a range (a size there reads it at the sizes)
_INDEXING = {"getitem", "__getitem__", "select", "narrow"}

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
    if (base in _SHIFTS or base in _EXPS) and _soft_step(node, base, taint):
        # NOTE: flat to the float at every length proven, then not: ``1 + exp(d - 1100)`` is 1
        # up to d ~ 1080, ``exp(-exp(d - 1100))`` and ``exp(-(d / 1100) ** 1000)`` are windows
        return f"the mask applies {name} to an exponential of positions (a soft step)"
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


def _soft_step(node: fx.Node, base: str, taint: dict) -> bool:
    """An exponential of positions whose shape depends on the sizes (with a static T,
    ``1 - 2 ** (-5 - arange(H))`` is the heads' decay, not a step) summed with a constant other
    than 0 or with another one, or taken an exponential or power of. NOTE: a sum with other
    positions (``decay + leak * (d < 0)``) is not taken for a step: the fit sees it."""
    args = [a for a in (*node.args[:2], *node.kwargs.values()) if a is not None]
    extreme = [a for a in args if isinstance(a, fx.Node) and taint.get(a, _CLEAN).extreme]
    if not any(_symbolic_shape(a) for a in extreme):
        return False
    if base in _EXPS or len(extreme) > 1:
        return True
    for arg in args:
        if isinstance(arg, fx.Node):
            if arg not in extreme and not taint.get(arg, _CLEAN).position:
                if not _constant_fill(arg):
                    return True
        elif isinstance(arg, (int, float)) and arg != 0:
            return True
    return False


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


def _unshifted(taint: dict):
    """Whether a node holds positions with no shift (``_uniform``)."""
    return lambda node: taint.get(node, _CLEAN).position and not taint[node].shifted


def _shifts(node: fx.Node, taint: dict) -> bool:
    """An addition/subtraction with something that is not a position (a constant, a size)."""
    for arg in node.args[:2]:
        if isinstance(arg, fx.Node):
            if not taint.get(arg, _CLEAN).position:
                return True
        elif isinstance(arg, (int, float)) and arg != 0:
            return True
    return node.kwargs.get("alpha", 1) != 1


def _fills(node: fx.Node, taint: dict) -> bool:
    """A where/masked_fill/setitem whose values include a constant other than 0 or +-inf."""
    values = node.args[1:] if _name(node) == "where" else node.args[2:3]
    values = list(values) + [node.kwargs.get("value")] if "value" in node.kwargs else list(values)
    for arg in values:
        if isinstance(arg, fx.Node):
            if not taint.get(arg, _CLEAN).position and not _constant_fill(arg):
                return True
        elif isinstance(arg, (int, float)) and arg not in _FILLS:
            return True
    return False
