"""The matrix products a parallel region is made of, and the candidates they give.

A score product ``Q K^T`` (matmul/bmm, a 2-operand einsum, ``baddbmm(.., beta=0)``, the
transpose of a ``K Q^T`` product, or a 3-operand einsum with the mask as its third operand) and a
value product ``A @ V`` whose square operand A leads back to scores through element-wise steps
make a candidate; ``patterns_parallel`` then walks and checks it. Softmax attention and scores
that leave the graph at a graph break are named here as declined regions, for explain().
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from .einsum import parse_einsum
from .graph_view import (
    GraphView,
    example,
    is_scalar,
    is_tensor,
    kind_of,
    ndim,
    same_size,
    where,
)
from .operands import Layout, layout
from .region import Region

_MAX_WALK = 12


def score_product(node: fx.Node) -> tuple[Layout, Layout] | None:
    """(Q, K) in the canonical layout [*batch, T, D] when ``node`` is a Q K^T product."""
    kind = kind_of(node)
    if kind == "layout":
        return _transposed_product(node)
    if kind == "baddbmm":
        return _matrix_product(node, *node.args[1:]) if _drops_input(node) else None
    if node.op in ("call_function", "call_method") and len(node.args) == 2:
        return _matrix_product(node, *node.args) if kind == "matmul" else None
    parsed = parse_einsum(node)
    if parsed is None or len(parsed[0]) != 2:
        return None
    (sq, sk), out, (a, b) = parsed
    return _einsum_qk(sq, sk, out, a, b)


def _matrix_product(node: fx.Node, a, b) -> tuple[Layout, Layout] | None:
    """(Q, K) of ``a @ b`` (``node`` computes it, possibly scaled: see score_factors)."""
    if not all(isinstance(x, fx.Node) and is_tensor(example(x)) for x in (a, b)):
        return None
    if ndim(a) != ndim(b) or ndim(a) < 2:
        return None
    return layout(a), layout(b).swapped()


def _drops_input(node: fx.Node) -> bool:
    """``baddbmm(input, a, b, beta=0, alpha=s)``: ``s * a @ b``, the input unread (HF style)."""
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    return len(node.args) == 3 and beta == 0 and not isinstance(beta, bool) and is_scalar(alpha)


def score_factors(node: fx.Node) -> list[tuple[str, object]]:
    """The scalar factors a score product applies itself (``baddbmm``'s alpha)."""
    alpha = node.kwargs.get("alpha", 1) if kind_of(node) == "baddbmm" else 1
    return [] if isinstance(alpha, (int, float)) and alpha == 1 else [("mul", alpha)]


def _transposed_product(node: fx.Node) -> tuple[Layout, Layout] | None:
    """(Q, K) when ``node`` is ``(K Q^T)^T`` (a transpose of the last two dims of a product).

    NOTE: the product itself rides in Q's chain, so the region owns it (its other users decline
    the region) and the rewrite erases it."""
    lay = layout(node)
    inner = lay.base
    if not lay.swaps_last_two:
        return None
    if kind_of(inner) != "matmul" or len(inner.args) != 2:
        return None
    found = _matrix_product(inner, *inner.args)
    if found is None:
        return None
    k, q = found  # inner = K Q^T, so inner^T = Q K^T
    return dataclasses.replace(q, chain=(*q.chain, *lay.chain, inner)), k


def masked_score_product(node: fx.Node):
    """(Q, K, mask, mask axes) when ``node`` is ``einsum('bhqd,bhkd,hqk->bhqk', q, k, mask)``:
    a score product with the mask as a third operand (flash-linear-attention's naive form)."""
    parsed = parse_einsum(node)
    if parsed is None or len(parsed[0]) != 3 or len(parsed[1]) < 2:
        return None
    inputs, out, operands = parsed
    batch, ts = out[:-2], out[-2:]
    for im, sm in enumerate(inputs):
        order = [batch.find(c) for c in sm[:-2]]
        if sm[-2:] != ts or -1 in order or order != sorted(order):
            continue
        (sq, sk), (a, b) = ([inputs[i] for i in range(3) if i != im],
                            [operands[i] for i in range(3) if i != im])  # fmt: skip
        found = _einsum_qk(sq, sk, out, a, b)
        if found is not None:
            axes = tuple(i for i, c in enumerate(batch) if c not in sm[:-2])
            return (*found, operands[im], axes)
    return None


def _einsum_qk(sq: str, sk: str, out: str, a: fx.Node, b: fx.Node):
    """(Q, K) layouts when ``einsum(sq, sk -> out)`` of ``a``, ``b`` is a Q K^T product."""
    if len(out) < 2:
        return None
    batch, t, s = out[:-2], out[-2], out[-1]
    shared = [c for c in sq if c in sk and c not in out]
    if len(shared) != 1 or t not in sq or s not in sk or t in sk or s in sq:
        return None
    d = shared[0]
    if sorted(sq) != sorted(batch + t + d) or sorted(sk) != sorted(batch + s + d):
        return None
    q_perm = tuple(sq.index(c) for c in batch + t + d)
    k_perm = tuple(sk.index(c) for c in batch + s + d)
    return layout(a).then(q_perm), layout(b).then(k_perm)


def _square(node: fx.Node) -> bool:
    value = example(node)
    return is_tensor(value) and value.dim() >= 2 and same_size(value.shape[-1], value.shape[-2])


def _leads_to_scores(node: fx.Node) -> str | None:
    """The kind of the first product the element-wise steps over [.., T, T] tensors lead back
    to: "scores" (a score product), "softmax" (attention, not retention), or None."""
    frontier, seen = [node], set()
    for _ in range(_MAX_WALK):
        nxt = []
        for current in frontier:
            if current in seen or not _square(current):
                continue
            seen.add(current)
            if "softmax" in str(current.target):
                return "softmax"
            if score_product(current) is not None or masked_score_product(current) is not None:
                return "scores"
            nxt += [a for a in current.all_input_nodes if _square(a)]
        frontier = nxt
    return None


def value_products(view: GraphView) -> list[tuple[fx.Node, fx.Node, Layout, tuple | None, list]]:
    """Every ``A @ V`` whose A leads back to scores: (O, A, V, out_perm, einsum masks)."""
    found = []
    for o in view.nodes_of_kind("matmul", "einsum"):
        for cand in _value_product(o):
            if cand is not None and _leads_to_scores(cand[1]) == "scores":
                found.append(cand)
                break
    return found


# NOTE: fused softmax attention: F.scaled_dot_product_attention (the torch function or the
# aten ops it lowers to) and nn.MultiheadAttention (Dynamo keeps F.multi_head_attention_forward
# as one call; the native fast path is _native_multi_head_attention)
_SDPA = ("scaled_dot_product", "multi_head_attention")


def _sdpa_name(node: fx.Node) -> str | None:
    """The fused softmax attention function the node calls, or None."""
    if node.op not in ("call_function", "call_method"):
        return None
    name = getattr(node.target, "__name__", None) or str(node.target)
    name = name.split(".")[0]  # NOTE: aten overloads: "_scaled_dot_product_flash_attention.default"
    return name if any(key in name for key in _SDPA) else None


def softmax_attention(view: GraphView) -> list[Region]:
    """A declined region per ``softmax(scores) @ V`` and per fused softmax attention call
    (``scaled_dot_product_attention``): explain() names them instead of nothing."""
    found = [
        Region(
            written="softmax attention",
            where=where(node),
            output=node.name,
            reason=f"softmax attention ({name}), not retention: compiled by Inductor",
        )
        for node in view.nodes
        if (name := _sdpa_name(node)) is not None
    ]
    for o in view.nodes_of_kind("matmul", "einsum"):
        if any(c is not None and _leads_to_scores(c[1]) == "softmax" for c in _value_product(o)):
            found.append(
                Region(
                    written="softmax attention",
                    where=where(o),
                    output=o.name,
                    reason="softmax attention, not retention: compiled by Inductor",
                )
            )
    return found


def scores_leaving_graph(view: GraphView) -> list[Region]:
    """A declined region per graph output that holds retention-like scores (a Q K^T product,
    possibly masked) with no product against V after it in this graph. After a graph break
    (explain() asks only then), Dynamo ended the graph inside a region, so its two halves are
    never seen together."""
    found = []
    for out in view.sorted(view.outputs):
        if _leads_to_scores(out) != "scores" or _reaches_product(view, out):
            continue
        found.append(
            Region(
                written="scores at a graph break",
                where=where(out),
                output=out.name,
                reason="the scores leave the graph before their product with V: a graph break "
                "splits the region (see the report's graph breaks; fullgraph=True names it); "
                "move what breaks the graph out of the retention",
            )
        )
    return found


def _reaches_product(view: GraphView, node: fx.Node) -> bool:
    """Whether a matrix product in this graph reads ``node``'s value, directly or not."""
    stack, seen = [node], {node}
    while stack:
        current = stack.pop()
        for user in view.g.successors(current):
            if user in seen or view.g.edges[current, user]["meta"]:
                continue
            if view.kind(user) in ("matmul", "einsum"):
                return True
            seen.add(user)
            stack.append(user)
    return False


def _value_product(o: fx.Node):
    if parse_einsum(o) is None:
        if len(o.args) == 2 and all(isinstance(x, fx.Node) for x in o.args):
            a, b = o.args
            if ndim(a) == ndim(b) and (ndim(a) or 0) >= 2:
                yield o, a, layout(b), None, []
        return
    inputs, out, operands = parse_einsum(o)
    for ia in range(len(inputs)):
        yield _einsum_value(o, inputs, out, operands, ia)


def _einsum_value(o, inputs, out, operands, ia):
    """Read ``A @ V`` (and an optional third, mask operand) out of an einsum."""
    sa = inputs[ia]
    if len(sa) < 2 or len(inputs) not in (2, 3):
        return None
    batch, t, s = sa[:-2], sa[-2], sa[-1]
    rest = [i for i in range(len(inputs)) if i != ia]
    iv = [i for i in rest if s in inputs[i] and any(c not in sa for c in inputs[i])]
    if len(iv) != 1:
        return None
    sv = inputs[iv[0]]
    d = [c for c in sv if c not in sa]
    if len(d) != 1 or s in out or sorted(sv) != sorted(batch + s + d[0]):
        return None
    canon = batch + t + d[0]
    if sorted(out) != sorted(canon):
        return None
    v = layout(operands[iv[0]]).then(tuple(sv.index(c) for c in batch + s + d[0]))
    out_perm = tuple(canon.index(c) for c in out)
    masks = []
    for im in rest:
        if im == iv[0]:
            continue
        sm = inputs[im]
        if sm[-2:] != t + s or any(c not in batch for c in sm[:-2]):
            return None
        order = [batch.index(c) for c in sm[:-2]]
        if order != sorted(order):
            return None
        axes = tuple(i for i, c in enumerate(batch) if c not in sm[:-2])
        masks.append((operands[im], axes))
    perm = None if out_perm == tuple(range(len(out))) else out_perm
    return o, operands[ia], v, perm, masks
