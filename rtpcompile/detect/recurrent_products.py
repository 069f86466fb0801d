"""The two products of a recurrent step, in the spellings detection reads.

The outer product ``k (x) v`` of one token (``outer_product``): ``k^T @ v``, a 2-operand einsum,
or a broadcast product of a column and a row (``k.unsqueeze(-1) * v.unsqueeze(-2)``,
``k[:, :, n, :, None] * v[:, :, n, None, :]``); and the read-out ``contraction(q, S')``
(``read_out``): ``q @ S'``, ``S' @ q^T``, an einsum, or ``(q.unsqueeze(-1) * S').sum(-2)``.
Moved unchanged from ``patterns_recurrent.py``, which checks and proves the step.
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .einsum import parse_einsum
from .graph_view import (
    GraphView,
    example,
    is_scalar,
    is_tensor,
    ndim,
)
from .operands import Layout, layout


@dataclasses.dataclass(frozen=True)
class _Side:
    """One row-vector operand [.., 1, D] (or [.., D] when ``squeezed``) and the nodes used."""

    lay: Layout
    squeezed: bool
    nodes: tuple[fx.Node, ...] = ()


def _unsqueezed(node: fx.Node, dim: int) -> fx.Node | None:
    """``x`` when node is ``x.unsqueeze(dim)`` (dim counted from the end), else None."""
    if node.op in ("call_method", "call_function") and "unsqueeze" in str(node.target):
        d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        rank = ndim(node) or 0
        if isinstance(d, int) and d % rank == dim % rank:
            return node.args[0]
    return None


def outer_product(view: GraphView, node: fx.Node) -> tuple[_Side, _Side] | None:
    """(x, y) when ``node`` is the outer product x^T y of two row vectors."""
    kind = view.kind(node)
    if kind == "matmul" and len(node.args) == 2 and all(ndim(a) for a in node.args):
        a, b = node.args
        ea, eb = example(a), example(b)
        if ea.dim() == eb.dim() and ea.shape[-1] == 1 and eb.shape[-2] == 1:
            return _Side(layout(a).swapped(), False), _Side(layout(b), False)
    parsed = parse_einsum(node)
    if parsed is not None and len(parsed[0]) == 2:
        (sx, sy), out, (a, b) = parsed
        batch = out[:-2]
        if sx[:-1] == batch and sy[:-1] == batch and out == batch + sx[-1] + sy[-1]:
            return _Side(layout(a), True), _Side(layout(b), True)
        return _einsum_token_outer(sx, sy, out, a, b)
    if kind == "mul" and len(node.args) == 2 and not any(is_scalar(a) for a in node.args):
        a, b = node.args
        x, y = _unsqueezed(a, -1), _unsqueezed(b, -2)
        if x is None or y is None:
            x, y = _unsqueezed(b, -1), _unsqueezed(a, -2)
            a, b = b, a
        if x is not None and y is not None:
            return _Side(layout(x), True, (a,)), _Side(layout(y), True, (b,))
        return _column_times_row(*node.args)
    return None


def _one_token(operand: fx.Node, subscript: str, letter: str) -> bool:
    """Whether ``letter`` indexes a dim of ``operand`` that is statically 1 (Dynamo
    specialises a size-1 dim, dynamic=True too)."""
    value = example(operand)
    return is_tensor(value) and statically_known_true(value.shape[subscript.index(letter)] == 1)


def _token_einsum(sx: str, sy: str, out: str) -> str | None:
    """The token letter of ``einsum(sx, sy -> out)`` keeping a token axis: the one letter
    of both operands that the output drops (``bhtk,bhtv->bhkv``), else None."""
    if any(s.count(c) > 1 for s in (sx, sy, out) for c in s) or not set(out) <= set(sx + sy):
        return None
    dropped = [c for c in sx if c in sy and c not in out]
    return dropped[0] if len(dropped) == 1 else None


def _einsum_token_outer(sx: str, sy: str, out: str, a, b) -> tuple[_Side, _Side] | None:
    """(x, y) of ``einsum('bhtk,bhtv->bhkv', x, y)`` whose token letter t has size 1 in both
    operands: the outer product of two one-token rows [.., 1, D] (t > 1 is a sum of T outer
    products, not one step's update)."""
    t = _token_einsum(sx, sy, out)
    if t is None or len(out) < 2:
        return None
    batch, dx, dy = out[:-2], out[-2], out[-1]
    if sorted(sx) != sorted(batch + t + dx) or sorted(sy) != sorted(batch + t + dy):
        return None
    if not (_one_token(a, sx, t) and _one_token(b, sy, t)):
        return None
    x = layout(a).then(tuple(sx.index(c) for c in batch + t + dx))
    y = layout(b).then(tuple(sy.index(c) for c in batch + t + dy))
    return _Side(x, False), _Side(y, False)


def _einsum_token_read(sq: str, ss: str, out: str, q: fx.Node):
    """(q side, contracted state dim, out_perm) of ``einsum('bhtk,bhkv->bhtv', q, S')`` whose
    query token letter t has size 1 (the state's layout [.., K, V] or [.., V, K] fixes the batch
    order; the output may be any permutation of [*batch, t, V])."""
    batch, d = ss[:-2], _token_einsum(sq, ss, out)  # NOTE: here the dropped letter is K
    tokens = [c for c in sq if c in out and c not in ss]
    if d is None or d not in ss[-2:] or len(tokens) != 1:
        return None
    t, w = tokens[0], ss[-1] if ss[-2] == d else ss[-2]
    if sorted(sq) != sorted(batch + t + d) or sorted(out) != sorted(batch + t + w):
        return None
    if not _one_token(q, sq, t):
        return None
    lay = layout(q).then(tuple(sq.index(c) for c in batch + t + d))
    perm = tuple((batch + t + w).index(c) for c in out)
    out_perm = None if perm == tuple(range(len(out))) else perm
    return _Side(lay, False), -2 if ss[-2] == d else -1, out_perm


def _column_times_row(a: fx.Node, b: fx.Node) -> tuple[_Side, _Side] | None:
    """A broadcast product of a column [.., K, 1] and a row [.., 1, V] made some other way than
    ``unsqueeze`` (e.g. ``k[:, :, n, :, None] * v[:, :, n, None, :]``): as ``k^T @ v``."""
    for col, row in ((a, b), (b, a)):
        ec, er = example(col), example(row)
        if is_tensor(ec) and is_tensor(er) and ec.dim() == er.dim() >= 3:
            if ec.shape[-1] == 1 and er.shape[-2] == 1 and ec.shape[-2] != 1 != er.shape[-1]:
                return _Side(layout(col).swapped(), False), _Side(layout(row), False)
    return None


def read_out(view: GraphView, state: fx.Node, user: fx.Node):
    """(q side, contracted state dim -2|-1, output node, out_perm, nodes) or None."""
    kind = view.kind(user)
    if kind == "matmul" and len(user.args) == 2:
        a, b = user.args
        if b is state and isinstance(a, fx.Node) and ndim(a) == ndim(state):
            return _Side(layout(a), False), -2, user, None, (user,)
        if a is state and isinstance(b, fx.Node) and ndim(b) == ndim(state):
            rank = ndim(state)
            perm = tuple(range(rank - 2)) + (rank - 1, rank - 2)
            return _Side(layout(b).swapped(), False), -1, user, perm, (user,)
    parsed = parse_einsum(user)
    if parsed is not None and len(parsed[0]) == 2 and state in parsed[2]:
        subs, out, operands = parsed
        iq = 1 - operands.index(state)
        sq, ss = subs[iq], subs[1 - iq]
        batch = out[:-1]
        if sq[:-1] == batch and len(ss) == len(batch) + 2 and ss[:-2] == batch:
            contracted = -2 if ss[-2] == sq[-1] and ss[-1] == out[-1] else -1
            if contracted == -1 and not (ss[-1] == sq[-1] and ss[-2] == out[-1]):
                return None
            return _Side(layout(operands[iq]), True), contracted, user, None, (user,)
        found = _einsum_token_read(sq, ss, out, operands[iq])
        if found is not None:
            return *found[:2], user, found[2], (user,)
    if kind == "mul" and len(user.users) == 1:
        total = next(iter(user.users))
        other = user.args[0] if user.args[1] is state else user.args[1]
        dims = total.args[1:] or (total.kwargs.get("dim"),)
        dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
        # NOTE: keepdim would keep a token axis the op's squeezed output does not have
        plain = len(dims) == 1 and isinstance(dims[0], int) and not total.kwargs.get("keepdim")
        if view.kind(total) == "sum" and plain and isinstance(other, fx.Node):
            rank = ndim(state)
            for dim in (-2, -1):
                q = _unsqueezed(other, -1 if dim == -2 else -2)
                if q is not None and dims[0] % rank == dim % rank:
                    return _Side(layout(q), True), dim, total, None, (other, user, total)
    return None
