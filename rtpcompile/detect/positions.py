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
read from the ops (``affine_positions`` names what ``mask_growth._precision`` measures).

The walk over each mask subgraph is here; what a value carries is ``position_taint.py``, the
verdict on each op ``position_checks.py``, the op vocabulary ``position_ops.py``.
"""

from __future__ import annotations

import collections
import dataclasses

import torch
import torch.fx as fx

from .graph_view import GraphView, example, is_tensor
from .mask_eval import subgraph
from .mutation import writes
from .position_checks import _check, _check_flip, _position_symbols
from .position_ops import (
    _CASTS,
    _COMPARISONS,
    _CUMULATIVE,
    _CUTOFFS,
    _EXPS,
    _FLIPS,
    _LINEAR,
    _LOGS,
    _NUMBER_TENSORS,
    _PERIODS,
    _POWERS,
    _REDUCTIONS,
    _SCALES,
    _SEEDS,
    _SELECTS,
    _SHIFTS,
    _SMOOTH,
    _VALUE_OPS,
    _difference_of_one_origin,
    _name,
)
from .position_taint import (
    _CLEAN,
    _fills,
    _merge,
    _mixes_scales,
    _risks_nan,
    _shifts,
    _size_number,
    _static_shape,
    _symbolic_shape,
    _Taint,
    _unshifted,
)

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
    precision rule measures (``mask_growth._precision``)."""
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
        extreme_sum=any(t.extreme_sum for t in ins),
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
        summed = any(taint.get(a, _CLEAN).extreme and _symbolic_shape(a) for a in data)
        result = dataclasses.replace(
            result,
            extreme=False,
            position=True,
            linear=False,
            extreme_sum=result.extreme_sum or summed,
        )
    if name.removesuffix("_") in _LOGS and position:
        # NOTE: a logarithm turns a scale into a shift: ``log(d / 1100) < 0`` is ``d < 1100``
        result = dataclasses.replace(result, shifted=True, linear=False)
    taint[node] = result
    if name.endswith("_") or name == "setitem":
        target = node.args[0]
        taint[target] = _merge(taint.get(target, _CLEAN), result)
    return None


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


# ops that read a tensor at an index or over a range (a size there reads it at the sizes)
_INDEXING = {"getitem", "__getitem__", "select", "narrow"}
