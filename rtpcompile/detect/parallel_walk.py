"""The walk of the parallel form from a value product's A operand down to its score product.

``_walk`` reads, step by step, the normaliser, the mask application (a decay product, a 0/1
causal step, or both) and the score product ``Q K^T`` into a ``_Chain``; each step returns a
reason instead of raising. ``patterns_parallel`` checks and proves what the chain collected.
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from . import subgraphs
from .einsum import permuted_score_product
from .graph_view import GraphView, example, is_scalar, kind_of, ndim
from .operands import Layout, peel
from .products import masked_score_product, score_factors, score_product


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
    if kind in ("masked_fill", "where") and len(x.args) == 3 and x.args[2] == 0:
        # NOTE: masked_fill(scores, c, 0) and where(c, scores, 0): the same step, arguments swapped
        scores, mask = x.args[:2] if kind == "masked_fill" else x.args[1::-1]
        chain.nodes.append(x)
        chain.mask_kind, chain.scores = ("fill" if kind == "masked_fill" else "where"), scores
        chain.masks.append(mask)
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
