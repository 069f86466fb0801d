"""What a value of a mask subgraph carries for the position rules (``positions.py``): the
``_Taint`` of a node (derived from positions, shaped by the sizes, shifted, linear, ...), and
the facts the rules read off a node or its inputs' taints (a size number, a symbolic shape, a
shift, a fill, a product that mixes scales or risks NaNs)."""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
from torch.utils._sympy.symbol import SymT, symbol_is_type

from .graph_view import example, is_tensor
from .position_ops import _FILLS, _POWERS, _PRODUCTS, _SHIFTS, _constant_fill, _name


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
    # NOTE: a sum or mean of an exponential of positions over a length (``exp(d - W).sum(-1)``):
    # no NaN risk of its own (a row normaliser), but as flat at every length proven as the
    # exponential, so shifting it is a soft step as shifting that is (``_soft_step``)
    extreme_sum: bool = False
    # NOTE: a number computed from the sizes (``T``, ``T / 1100``, ``max(1, T / 1100)``): a
    # position once it reaches a tensor as a value; ``pending`` is why it may not (an op not on
    # the allow-list), reported only then -- a size used as a shape (``arange(max(T, 16))``,
    # ``view(T // 2, 2)``) is never a value of the mask
    size: bool = False
    pending: str | None = None


_CLEAN = _Taint()


def _symbolic_shape(node: fx.Node) -> bool:
    value = example(node)
    return is_tensor(value) and any(isinstance(s, torch.SymInt) for s in value.shape)


def _static_shape(node: fx.Node) -> bool:
    value = example(node)
    return is_tensor(value) and not any(isinstance(s, torch.SymInt) for s in value.shape)


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


def _merge(a: _Taint, b: _Taint) -> _Taint:
    linear = (a.linear or not a.position) and (b.linear or not b.position)
    return _Taint(
        a.position or b.position,
        a.shaped or b.shaped,
        a.shifted or b.shifted,
        linear,
        a.extreme or b.extreme,
        a.nan_risk or b.nan_risk,
        a.extreme_sum or b.extreme_sum,
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
