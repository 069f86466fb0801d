"""The parallel form ``(Q K^T * M) V``: find every candidate chain and claim or decline it.

A candidate is a value product ``A @ V`` (matmul/bmm, 2- or 3-operand einsum) whose square
operand A leads back, through element-wise steps, to a score product ``Q K^T`` (both found by
:mod:`products`). Candidates are then checked step by step (normaliser, dropout, mask
application, score product); each check returns a reason instead of raising, and the mask is
proven by :mod:`mask_proof`. The walk that collects a candidate's chain is ``parallel_walk.py``;
here are the shape and mask checks, the claim, and the einsums written as one.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from . import mask_proof
from .einsum import canonical_mask, parse_einsum, permuted_value_products
from .fused_einsum import FUSED_REASON
from .graph_view import GraphView, example, hint, is_tensor, kind_of, same_size, where
from .operands import Layout, operand_views
from .parallel_walk import _Chain, _walk
from .products import softmax_attention, value_products
from .region import Operand, Region


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
                f"{FUSED_REASON} ({node.args[0]!r}): split it into a score einsum (with the "
                "mask as its third operand) and a value einsum to have it claimed"
            ),
        )
        for node in view.nodes_of_kind("einsum")
        if _fused_einsum(node)
    ]
