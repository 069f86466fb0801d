"""The parallel form ``(Q K^T * M) V``: find every candidate chain and claim or decline it.

A candidate is a value product ``A @ V`` (matmul/bmm, 2- or 3-operand einsum) whose square
operand A leads back, through element-wise steps, to a score product ``Q K^T`` (both found by
:mod:`products`). Candidates are then checked step by step (normaliser, dropout, mask
application, score product); each check returns a reason instead of raising, and the mask is
proven by :mod:`mask_proof`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from . import mask_proof, subgraphs
from .einsum import (
    canonical_mask,
    parse_einsum,
    permuted_score_product,
    permuted_value_products,
)
from .graph_view import (
    GraphView,
    example,
    hint,
    is_scalar,
    is_tensor,
    kind_of,
    ndim,
    same_size,
    where,
)
from .operands import Layout, operand_views, peel
from .products import (
    masked_score_product,
    score_factors,
    score_product,
    softmax_attention,
    value_products,
)
from .region import Operand, Region


@dataclasses.dataclass
class _Chain:
    """What the walk from the value product down to the score product collected."""

    nodes: list[fx.Node] = dataclasses.field(default_factory=list)
    pre: list = dataclasses.field(default_factory=list)
    post: list = dataclasses.field(default_factory=list)
    masks: list[fx.Node] = dataclasses.field(default_factory=list)
    mask_axes: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    mask_kind: str = "mul"
    normaliser: str = "none"
    normaliser_min: float = 1.0
    scores: fx.Node | None = None
    q: Layout | None = None
    k: Layout | None = None
    # a 0/1 causal step beside a decay product (``s.masked_fill(~c, 0) * decay``): its condition
    # (None for tril) joins the proof, not the run time (the proven product equals tril x decay)
    causal: tuple[str, fx.Node | None] | None = None
    # the step zeroes the scores before the decay product multiplies them (``s.tril() * decay``)
    causal_first: bool = False
    # the scores' layout when an einsum writes them with Tq, Tk not last (``einsum.py``)
    score_perm: tuple[int, ...] | None = None

    def score_product(self, node: fx.Node) -> tuple[Layout, Layout] | None:
        """(Q, K) when ``node`` is a score product writing this chain's layout."""
        if self.score_perm is None:
            return score_product(node)
        return permuted_score_product(node, self.score_perm)

    def scores_shape(self) -> list:
        """The scores' sizes in the canonical layout [*batch, Tq, Tk]."""
        shape = list(example(self.scores).shape)
        return [shape[p] for p in self.score_perm] if self.score_perm else shape


def _denominator(view: GraphView, div: fx.Node) -> tuple[str, float, list] | str:
    """Classify ``numerator / den``: ("abs_sum" | "sum_abs", clamp min, nodes) or a reason."""
    numerator, den = div.args
    steps, nodes, detached = [], [], False
    node = den
    while isinstance(node, fx.Node):
        kind = view.kind(node)
        if kind in ("cast", "detach", "clamp", "abs", "sum") and node is not numerator:
            detached |= kind == "detach"
            if kind not in ("cast", "detach"):
                steps.append(node)
            nodes.append(node)
            node = node.args[0]
            continue
        break
    kinds = [view.kind(n) for n in steps]
    if node is not numerator or kinds not in (["clamp", "abs", "sum"], ["clamp", "sum", "abs"]):
        return "unknown normaliser between the masked scores and V"
    clamp, total = steps[0], steps[1] if kinds[1] == "sum" else steps[2]
    low = clamp.kwargs.get("min", clamp.args[1] if len(clamp.args) > 1 else None)
    high = clamp.kwargs.get("max", clamp.args[2] if len(clamp.args) > 2 else None)
    if high is not None:  # NOTE: positional clamp(1, 3) too; only a floor is reproducible
        return f"unknown normaliser (clamp with a maximum, {high})"
    if not isinstance(low, (int, float)) or isinstance(low, bool) or low <= 0:
        return "unknown normaliser (clamp without a positive minimum)"
    dim = total.kwargs.get("dim", total.args[1] if len(total.args) > 1 else None)
    dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    keep = total.kwargs.get("keepdim", total.args[2] if len(total.args) > 2 else False)
    if dim not in (-1, (ndim(numerator) or 0) - 1) or not keep:
        return "unknown normaliser (not a row sum over keys)"
    if not detached:
        return "the row normaliser is not detached"
    return ("abs_sum" if kinds[1] == "abs" else "sum_abs"), float(low), nodes


def _apply_mask(view: GraphView, chain: _Chain, x: fx.Node) -> str | None:
    """Read the mask application at ``x`` into ``chain``; leaves chain.scores set."""
    kind = view.kind(x)
    if kind == "dropout":
        # NOTE: an identity dropout (eval mode, p=0) is a "cast", peeled with the scores
        return "dropout on the scores"
    if _is_product(x):
        return _decay_product(view, chain, x)
    if kind in _CAUSAL_STEPS:
        reason = _causal_step(view, chain, x)
        inner = peel(chain.scores) if reason is None else None
        if inner is None or chain.causal is not None or not _is_product(inner.core):
            return reason
        # NOTE: the causal step is applied to a decay product: (s * decay).masked_fill(~c, 0)
        _as_causal(chain)
        chain.nodes += inner.chain
        chain.pre += inner.factors
        return _decay_product(view, chain, inner.core)
    name = getattr(x.target, "__name__", str(x.target))
    return f"{name!r} on the scores is not a multiplicative decay mask"


_CAUSAL_STEPS = ("tril", "masked_fill", "where")


def _is_product(x: fx.Node) -> bool:
    return kind_of(x) == "mul" and len(x.args) == 2 and not any(is_scalar(a) for a in x.args)


def _decay_product(view: GraphView, chain: _Chain, x: fx.Node) -> str | None:
    """The scores times decay tensors; the scores may sit under one 0/1 causal step."""
    leaves = _mul_leaves(view, x, chain)
    scores = [leaf for leaf in leaves if chain.score_product(peel(leaf).core) is not None]
    steps = [leaf for leaf in leaves if _masks_scores(view, chain, peel(leaf).core)]
    if not scores and len(steps) == 1 and chain.causal is None:
        step = peel(steps[0])
        chain.masks += [leaf for leaf in leaves if leaf is not steps[0]]
        chain.mask_axes += [()] * (len(leaves) - 1)
        chain.nodes += step.chain
        chain.pre += step.factors
        reason = _causal_step(view, chain, step.core)
        if reason is None:
            _as_causal(chain)
            chain.causal_first = True
        return reason
    if len(scores) != 1:
        if any(_scores_through_boundary(chain, peel(leaf).core) for leaf in leaves):
            return (
                "the scores are computed on the other side of a checkpoint's (or nested "
                "compile region's) boundary: put the whole retention inside the function, or "
                "all of it outside"
            )
        return "no single score product under the mask product"
    chain.masks += [leaf for leaf in leaves if leaf is not scores[0]]
    chain.mask_axes += [()] * (len(leaves) - 1)
    chain.scores = scores[0]
    return None


def _scores_through_boundary(chain: _Chain, x: fx.Node) -> bool:
    """Whether ``x`` passes a score product into or out of a checkpoint's (or compile
    region's) body."""
    if x.target is not subgraphs.boundary or not isinstance(x.args[0], fx.Node):
        return False
    return chain.score_product(peel(x.args[0]).core) is not None


def _masks_scores(view: GraphView, chain: _Chain, x: fx.Node) -> bool:
    """Whether ``x`` is a 0/1 causal step (tril, masked_fill, where) applied to the scores."""
    kind = view.kind(x)
    if kind not in _CAUSAL_STEPS or len(x.args) < (2 if kind == "where" else 1):
        return False
    inner = x.args[1] if kind == "where" else x.args[0]
    return isinstance(inner, fx.Node) and chain.score_product(peel(inner).core) is not None


def _as_causal(chain: _Chain) -> None:
    """The 0/1 step just read becomes ``chain.causal`` beside the decay masks."""
    kind = chain.mask_kind
    cond = chain.masks.pop() if kind in ("fill", "where") else None
    if cond is not None:
        chain.mask_axes.pop()
    chain.causal, chain.mask_kind = (kind, cond), "mul"


def _causal_step(view: GraphView, chain: _Chain, x: fx.Node) -> str | None:
    """Read a 0/1 causal step (tril, masked_fill(c, 0), where(c, s, 0)) at ``x``."""
    kind = view.kind(x)
    if kind == "tril":
        diagonal = x.kwargs.get("diagonal", x.args[1] if len(x.args) > 1 else 0)
        if diagonal != 0:
            return f"tril with diagonal={diagonal} is not a causal mask"
        chain.nodes.append(x)
        chain.mask_kind, chain.scores = "tril", x.args[0]
        return None
    if kind == "masked_fill" and len(x.args) == 3 and x.args[2] == 0:
        chain.nodes.append(x)
        chain.mask_kind, chain.scores = "fill", x.args[0]
        chain.masks.append(x.args[1])
        chain.mask_axes.append(())
        return None
    if kind == "where" and len(x.args) == 3 and x.args[2] == 0:
        chain.nodes.append(x)
        chain.mask_kind, chain.scores = "where", x.args[1]
        chain.masks.append(x.args[0])
        chain.mask_axes.append(())
        return None
    name = getattr(x.target, "__name__", str(x.target))
    return f"{name!r} on the scores is not a multiplicative decay mask"


def _mul_leaves(view: GraphView, x: fx.Node, chain: _Chain) -> list[fx.Node]:
    """The tensor factors of a tree of element-wise products (single-use inner products)."""
    leaves = []
    stack = [x]
    while stack:
        node = stack.pop()
        is_product = view.kind(node) == "mul" and len(node.args) == 2
        if is_product and not any(is_scalar(a) for a in node.args):
            if node is x or len(node.users) == 1:
                chain.nodes.append(node)
                stack += reversed(node.args)
                continue
        leaves.append(node)
    return leaves


def _walk(view: GraphView, a: fx.Node, einsum_masks: list, perm) -> tuple[_Chain, str | None]:
    """From the value product's A operand (laid out ``perm``, None: canonical) down to the score
    product."""
    chain = _Chain(score_perm=perm)
    outer = peel(a)
    chain.nodes += outer.chain
    x = outer.core
    if view.kind(x) == "div" and len(x.args) == 2 and not is_scalar(x.args[1]):
        verdict = _denominator(view, x)
        if isinstance(verdict, str):
            return chain, verdict
        if einsum_masks:
            # NOTE: the op normalises the masked scores; here the mask comes after the division
            return chain, (
                "the row normaliser divides the scores before the decay mask is applied (the "
                "mask is the value einsum's operand): the op normalises the masked scores"
            )
        chain.normaliser, chain.normaliser_min, nodes = verdict
        chain.post += outer.factors
        chain.nodes += [x, *nodes]
        inner = peel(x.args[0])
        chain.nodes += inner.chain
        chain.pre += inner.factors
        x = inner.core
    else:
        chain.pre += outer.factors
    masked = None if einsum_masks or perm else masked_score_product(x)
    if masked is not None:  # NOTE: the mask is the score einsum's third operand
        chain.q, chain.k, mask, axes = masked
        chain.masks.append(mask)
        chain.mask_axes.append(axes)
        chain.scores = x
        chain.nodes += [x, *chain.q.chain, *chain.k.chain]
        return chain, None
    if einsum_masks:
        chain.masks += [m for m, _ in einsum_masks]
        chain.mask_axes += [axes for _, axes in einsum_masks]
        chain.scores = x
    else:
        reason = _apply_mask(view, chain, x)
        if reason is not None:
            return chain, reason
    scores = peel(chain.scores)
    chain.nodes += scores.chain
    chain.pre += scores.factors
    found = chain.score_product(scores.core)
    if found is None:
        return chain, "the masked matrix is not a Q K^T product"
    chain.scores = scores.core
    chain.pre += score_factors(scores.core)
    chain.q, chain.k = found
    chain.nodes += [scores.core, *chain.q.chain, *chain.k.chain]
    return chain, None


def _operand(lay: Layout) -> Operand:
    return Operand(lay.base.name, lay.perm)


def _canonical_shape(lay: Layout) -> list:
    shape = list(example(lay.base).shape)
    return [shape[p] for p in lay.perm] if lay.perm else shape


def _check_shapes(chain: _Chain, v: Layout) -> str | None:
    """Shapes the rtp op can express: same batch dims for q, k, v and square scores."""
    scores = example(chain.scores)
    if scores.is_complex() or any(example(x.base).is_complex() for x in (chain.q, chain.k, v)):
        return "complex dtype"
    if not scores.is_floating_point():
        return f"scores of dtype {scores.dtype} (floating point expected)"
    if not same_size(*chain.scores_shape()[-2:]):
        return "query and key lengths differ (scores are not square)"
    q, k, vv = (_canonical_shape(x) for x in (chain.q, chain.k, v))
    if not (len(q) == len(k) == len(vv) == scores.dim()):
        return "q, k, v and the scores have different ranks"
    for name, shape in (("k", k), ("v", vv)):
        if not all(same_size(a, b) for a, b in zip(q[:-1], shape[:-1], strict=True)):
            return f"{name} does not have q's batch/head/length dims (broadcast heads)"
    if not same_size(q[-1], k[-1]):
        return "q and k have different head dims"
    return None


def _mask_transform(chain: _Chain):
    """values of ``_proof_masks(chain)`` -> the mask the scores are multiplied by."""
    kind, axes = chain.mask_kind, list(chain.mask_axes)
    causal = chain.causal[0] if chain.causal is not None else None
    first = chain.causal_first

    def indicator(kind, value):
        return (~value.bool() if kind == "fill" else value.bool()).double()

    def transform(values):
        if kind in ("fill", "where"):
            return indicator(kind, values[0])
        total = None
        # NOTE: a causal step's condition comes after the decay masks
        for value, dims in zip(values[: len(axes)], axes, strict=True):
            value = value.double() if value.dtype == torch.bool else value
            for dim in dims:
                value = value.unsqueeze(dim)
            total = value if total is None else total * value
        # NOTE: a step after the decay product selects, as the model's where / masked_fill /
        # tril does: a decay factor that overflows to inf where it puts 0 reads 0. A step on
        # the scores before the product zeroes them, and eager multiplies that 0 by the
        # decay: inf * 0 = NaN there, which declines the region as in eager
        if causal in ("fill", "where"):
            keep = indicator(causal, values[-1]).bool()
            if first:
                return keep.to(total.dtype) * total
            return torch.where(keep, total, torch.zeros((), dtype=total.dtype))
        if causal == "tril":
            return torch.ones_like(total).tril() * total if first else total.tril()
        return total

    return transform


def _proof_masks(chain: _Chain) -> list[fx.Node]:
    cond = chain.causal[1] if chain.causal is not None else None
    return chain.masks + ([cond] if cond is not None else [])


def _before_casts(mask: fx.Node) -> fx.Node:
    """The mask before dtype casts.

    NOTE: a decay mask rounded to bfloat16 holds gamma = 1 - 2**-9 as 1.0; gamma read from it
    would be wrong at long distances, so the proof and the run-time gamma use the wider value.
    """
    while kind_of(mask) == "cast" and isinstance(mask.args[0], fx.Node):
        inner = example(mask.args[0])
        if not (is_tensor(inner) and inner.is_floating_point()):
            break
        mask = mask.args[0]
    return mask


def _permuted_masks(chain: _Chain) -> str | None:
    """Read the masks of scores laid out ``chain.score_perm`` as factors of the canonical ones."""
    perm = chain.score_perm
    if chain.mask_kind != "mul" or chain.causal is not None:
        return "a 0/1 causal step on scores laid out with Tq, Tk not last (multiply by a mask)"
    if chain.normaliser != "none" and perm[-1] != len(perm) - 1:
        return "a row normaliser on scores laid out with the key axis not last"
    found = [canonical_mask(_before_casts(m), perm) for m in chain.masks]
    if None in found:
        return "a mask factor's dims are not in the order of the scores' (permute it like them)"
    chain.masks = [_before_casts(m) for m, _ in found]
    chain.mask_axes = [axes for _, axes in found]
    return None


def check_candidate(view: GraphView, cand, inputs: list, perm=None) -> Region:
    """Claim or decline one value-product candidate (A laid out ``perm``; None: canonical)."""
    o, a, v, out_perm, einsum_masks = cand
    chain, reason = _walk(view, a, einsum_masks, perm)
    base = Region(written="parallel", where=where(o), output=o.name, out_perm=out_perm)
    if reason is None:
        reason = _check_shapes(chain, v)
    if reason is None and perm is not None:
        reason = _permuted_masks(chain)
    if reason is None:
        inside = set(chain.nodes) | {o}
        # NOTE: q's and k's transposes are views of the inputs, not of the scores: another reader
        # (a final state computed from the same k) keeps them alive after the rewrite, harmlessly
        operands = operand_views(chain.q, chain.k)
        for node in chain.nodes:
            if node in operands:
                continue
            readers = [u for u in node.users if not view.g.edges[node, u]["meta"]]
            if any(user not in inside for user in readers):
                reason = "the score matrix is used elsewhere (e.g. returned as attention weights)"
                break
    zero_one = chain.mask_kind != "mul" or chain.causal is not None
    if reason is None and chain.normaliser != "none" and zero_one:
        reason = "normaliser combined with a 0/1 mask: not supported"
    if reason is not None:
        return base.declined(reason)
    scores = example(chain.scores)
    if chain.mask_kind == "mul":
        chain.masks = [_before_casts(m) for m in chain.masks]
    if chain.mask_kind == "tril":
        proof = mask_proof.Proof(None, (1.0,))
    else:
        proof = mask_proof.prove(
            view,
            _proof_masks(chain),
            _mask_transform(chain),
            inputs,
            chain.scores_shape()[-1],
            scores.dim() - 2,
        )
    q_shape = _canonical_shape(chain.q)
    heads = len(proof.gamma)
    if heads <= 1 and scores.dim() > 3:
        heads = hint(q_shape[-3])
    # NOTE: [B, T, d] with the mask declined: no gamma says how many heads the batch holds
    heads = heads or None
    region = dataclasses.replace(
        base,
        nodes=tuple(n.name for n in view.sorted(set(chain.nodes) | {o})),
        q=_operand(chain.q),
        k=_operand(chain.k),
        v=_operand(v),
        masks=tuple(m.name for m in chain.masks),
        mask_kind=chain.mask_kind,
        mask_axes=tuple(chain.mask_axes),
        pre=tuple(_factor(f) for f in chain.pre),
        post=tuple(_factor(f) for f in chain.post),
        normaliser=chain.normaliser,
        normaliser_min=chain.normaliser_min,
        seq_len=hint(chain.scores_shape()[-1]),
        heads=heads,
        k_dim=hint(q_shape[-1]),
        v_dim=hint(_canonical_shape(v)[-1]),
        decay=proof.gamma,
        row_scale=proof.row_scale,
    )
    return region if proof.reason is None else region.declined(proof.reason)


def _factor(factor) -> tuple[str, object]:
    op, value = factor
    return op, value.name if isinstance(value, fx.Node) else value


def find_parallel(view: GraphView, inputs: list) -> list[Region]:
    """Every parallel-form candidate of the graph, claimed or declined."""
    cands = value_products(view)
    found = [check_candidate(view, cand, inputs) for cand in cands]
    seen = {cand[0] for cand in cands}
    for o, a, v, out_perm, perm in permuted_value_products(view, seen):
        found.append(check_candidate(view, (o, a, v, out_perm, []), inputs, perm))
    return found + fused_einsums(view) + softmax_attention(view)


def _fused_einsum(node: fx.Node) -> bool:
    """One einsum of 4+ operands that contracts both the head dim of two of them (q, k) and
    the key axis with an operand giving the output a dim of its own (v):
    ``einsum('bhqd,bhkd,hqk,bhkv->bhqv', q, k, L, v)``."""
    parsed = parse_einsum(node)
    if parsed is None or len(parsed[0]) < 4:
        return False
    ins, out, _ = parsed
    counts = {c: sum(c in s for s in ins) for c in set("".join(ins))}
    heads_dim = [c for c, n in counts.items() if n == 2 and c not in out]
    own = [i for i, s in enumerate(ins) if any(counts[c] == 1 and c in out for c in s)]
    keys = [c for c, n in counts.items() if n >= 2 and c not in out]
    return bool(heads_dim) and bool(own) and any(c in ins[i] for i in own for c in keys)


def fused_einsums(view: GraphView) -> list[Region]:
    """A declined region per retention written as one einsum of scores and values (``_fused_
    einsum``): the op needs the score product and the value product apart, so explain()
    names it instead of showing nothing."""
    return [
        Region(
            written="parallel",
            where=where(node),
            output=node.name,
            reason=(
                f"one einsum computes both the scores and the values ({node.args[0]!r}): "
                "split it into a score einsum (with the mask as its third operand) and a "
                "value einsum to have it claimed"
            ),
        )
        for node in view.nodes_of_kind("einsum")
        if _fused_einsum(node)
    ]
