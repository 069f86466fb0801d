"""Einsum equations read as subscripts: ``parse_einsum`` for the product patterns, with an
ellipsis spelt out in letters of its own; and scores an einsum lays out with the query and key
axes not last (``einsum('bqhd,bkhd->bqhk')`` read back by ``einsum('bqhk,bkhv->bqhv')``).

A permuted score layout is a permutation ``perm`` with ``scores.permute(perm)`` the canonical
[*batch, Tq, Tk]: ``permuted_value_products`` finds the value einsums reading such scores,
``permuted_score_product`` the score einsum that writes them, and ``canonical_mask`` a mask
factor multiplied into them as a tensor the canonical scores are multiplied by.
"""

from __future__ import annotations

import torch.fx as fx

from .graph_view import GraphView, example, is_tensor, kind_of, same_size
from .operands import Layout, layout

_MAX_WALK = 12


def parse_einsum(node: fx.Node) -> tuple[list[str], str, list[fx.Node]] | None:
    """(input subscripts, output subscript, operands) of an einsum with an explicit output; an
    ellipsis is spelt out in letters of its own (``_expand_ellipsis``)."""
    if kind_of(node) != "einsum" or not node.args or not isinstance(node.args[0], str):
        return None
    equation = node.args[0].replace(" ", "")
    operands = list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if "->" not in equation:
        return None
    lhs, out = equation.split("->")
    inputs = lhs.split(",")
    if len(inputs) != len(operands) or not all(isinstance(o, fx.Node) for o in operands):
        return None
    if "." in equation:
        expanded = _expand_ellipsis(inputs, out, operands)
        if expanded is None:
            return None
        inputs, out = expanded
    return inputs, out, operands


def _expand_ellipsis(inputs: list[str], out: str, operands) -> tuple[list[str], str] | None:
    """``...qd,...kd->...qk`` as ``ABqd,ABkd->ABqk`` for operands whose ellipsis dims have the
    same sizes (a broadcast one, size 1 against B, is left alone: None)."""
    if any(
        s.count("...") != ("..." in s) or s.replace("...", "").count(".") for s in [*inputs, out]
    ):
        return None
    spans = []
    for subscript, operand in zip(inputs, operands, strict=True):
        value = example(operand)
        if not is_tensor(value):
            return None
        n = value.dim() - len(subscript.replace("...", ""))
        if n < 0 or ("..." not in subscript and n):
            return None
        start = subscript.find("...")
        if start >= 0:
            spans.append(list(value.shape[start : start + n]))
    # NOTE: every ellipsis the same dims (an empty one beside a full one broadcasts too)
    if not spans or any(len(span) != len(spans[0]) for span in spans):
        return None
    if not all(all(map(same_size, span, spans[0])) for span in spans):
        return None
    width = len(spans[0])
    used = set("".join(inputs) + out)
    letters = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in used][:width]
    if len(letters) < width:
        return None
    fill = "".join(letters)
    return [s.replace("...", fill) for s in inputs], out.replace("...", fill)


def _distinct(*subscripts: str) -> bool:
    return all(len(set(s)) == len(s) for s in subscripts)


def permuted_value_products(view: GraphView, seen: set[fx.Node]):
    """``(o, a, v, out_perm, perm)`` per 2-operand einsum ``o`` (not in ``seen``) reading scores
    ``a`` laid out ``perm`` (query and key axes not the last two) that lead back, through
    element-wise steps of a's shape, to a score einsum writing that layout."""
    for o in view.nodes_of_kind("einsum"):
        parsed = parse_einsum(o) if o not in seen else None
        if parsed is None or len(parsed[0]) != 2 or not _distinct(*parsed[0], parsed[1]):
            continue
        (s0, s1), out, operands = parsed
        for ia in (0, 1):
            found = _value_einsum((s0, s1)[ia], (s0, s1)[1 - ia], out, operands[1 - ia])
            if found is not None and _leads_to(operands[ia], found[2]):
                v, out_perm, perm = found
                yield o, operands[ia], v, out_perm, perm
                break


def _value_einsum(sa: str, sv: str, out: str, v: fx.Node):
    """(V layout, out_perm, perm) of ``einsum(sa, sv -> out)`` as ``A @ V`` with A laid out
    ``perm`` (not the canonical one: ``products`` reads that)."""
    keys = [c for c in sa if c in sv and c not in out]
    rows = [c for c in sa if c in out and c not in sv]
    values = [c for c in sv if c not in sa]
    if len(keys) != 1 or len(rows) != 1 or len(values) != 1:
        return None
    t, s, d = rows[0], keys[0], values[0]
    batch = "".join(c for c in sa if c not in (t, s))
    if sa[-2:] == t + s or sorted(sv) != sorted(batch + s + d):
        return None
    canon = batch + t + d
    if sorted(out) != sorted(canon):
        return None
    lay = layout(v).then(tuple(sv.index(c) for c in batch + s + d))
    out_perm = tuple(canon.index(c) for c in out)
    perm = tuple(sa.index(c) for c in batch + t + s)
    return lay, None if out_perm == tuple(range(len(out))) else out_perm, perm


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    ea, eb = example(a), example(b)
    if not (is_tensor(ea) and is_tensor(eb)) or ea.dim() != eb.dim():
        return False
    return all(map(same_size, ea.shape, eb.shape))


def _leads_to(a: fx.Node, perm: tuple[int, ...]) -> bool:
    """Whether element-wise steps over tensors of a's shape lead back from ``a`` to a score
    einsum writing the layout ``perm`` (square in the query and key axes)."""
    value = example(a)
    if not is_tensor(value) or not same_size(value.shape[perm[-1]], value.shape[perm[-2]]):
        return False
    frontier, seen = [a], set()
    for _ in range(_MAX_WALK):
        nxt = []
        for current in frontier:
            if current in seen or not _same_shape(current, a):
                continue
            seen.add(current)
            if "softmax" in str(current.target):
                return False
            if permuted_score_product(current, perm) is not None:
                return True
            nxt += current.all_input_nodes
        frontier = nxt
    return False


def permuted_score_product(node: fx.Node, perm: tuple[int, ...]) -> tuple[Layout, Layout] | None:
    """(Q, K) in the canonical layout [*batch, T, D] when ``node`` is a 2-operand einsum
    ``Q K^T`` whose output is laid out ``perm`` (``node.permute(perm)`` is [*batch, Tq, Tk]);
    either operand may be Q: the query letter is the one at ``perm[-2]``."""
    parsed = parse_einsum(node)
    if parsed is None or len(parsed[0]) != 2 or len(parsed[1]) != len(perm):
        return None
    (s0, s1), out, (a, b) = parsed
    canon = "".join(out[p] for p in perm)
    batch, t, s = canon[:-2], canon[-2], canon[-1]
    if not _distinct(s0, s1, out):
        return None
    for sq, sk, q, k in ((s0, s1, a, b), (s1, s0, b, a)):
        shared = [c for c in sq if c in sk and c not in out]
        if len(shared) != 1 or t not in sq or s not in sk or t in sk or s in sq:
            continue
        q_canon, k_canon = batch + t + shared[0], batch + s + shared[0]
        if sorted(sq) != sorted(q_canon) or sorted(sk) != sorted(k_canon):
            continue
        q_perm, k_perm = (tuple(x.index(c) for c in y) for x, y in ((sq, q_canon), (sk, k_canon)))
        return layout(q).then(q_perm), layout(k).then(k_perm)
    return None


def canonical_mask(mask: fx.Node, perm: tuple[int, ...]) -> tuple[fx.Node, tuple[int, ...]] | None:
    """(node, axes) with ``node`` unsqueezed at ``axes`` the factor the canonical scores are
    multiplied by, when ``mask`` multiplies scores laid out ``perm``; None when its dims are
    not in the canonical order once its own transposes/permutes are undone (a factor [T, H, T]
    computed as such, not as a permute of [H, T, T]).

    NOTE: the mask broadcasts against the scores from the right: its dim i is the scores' dim
    n - r + i, canonical dim perm^-1(n - r + i); the node unpermuted must meet those dims in
    increasing order, so unsqueezes alone place it (no size-1 dim is squeezed)."""
    lay = layout(mask)
    value = example(lay.base)
    if not is_tensor(value):
        return None
    n, r = len(perm), value.dim()
    if r > n:
        return None
    inverse = {p: c for c, p in enumerate(perm)}
    order = lay.perm or tuple(range(r))  # mask dim i is the base's dim order[i]
    dims = [inverse[n - r + order.index(j)] for j in range(r)]
    if dims != sorted(dims):
        return None
    start = dims[0] if dims else n
    return lay.base, tuple(c - start for c in range(start, n) if c not in dims)
