"""The recurrent step ``S' = a * S + k (x) v ; o = contraction(q, S')`` (state in and out).

Recognised spellings: the outer product as ``k^T @ v`` (one token), a 2-operand einsum, or a
broadcast product of a column and a row (``k.unsqueeze(-1) * v.unsqueeze(-2)``,
``k[:, :, n, :, None] * v[:, :, n, None, :]``); the read-out as ``q @ S'``,
``S' @ q^T``, an einsum, or ``(q.unsqueeze(-1) * S').sum(-2)``; the state laid out (K, V) or
(V, K), decided by which state dim the read-out contracts with q. The state must be a graph
input (an argument, or an attribute of one such as a decode cache's, not the module's own
state) and S' a graph output; the decay ``a`` must come from constants/buffers (per head only).
Casts on the outer product (``(k^T @ v).float()``) are looked through when they keep or widen
its dtype (a narrowing one is declined), S' must keep the state's dtype, and an in-place update
of the state (``state.mul_(a).add_(...)``, ``state.copy_(S')``) is declined as such.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import mask_proof, mask_provenance
from .graph_view import (
    GraphView,
    example,
    hint,
    is_state_input,
    is_tensor,
    ndim,
    same_size,
    where,
)
from .recurrent_products import outer_product, read_out
from .region import Operand, Region


def _decay_side(view: GraphView, node: fx.Node) -> tuple[fx.Node | float, fx.Node] | None:
    """(a, S) when node is ``a * S`` with S a graph-input state; ``a`` a tensor node or a
    Python number written in the code (``0.9 * S``: Dynamo bakes it into the graph)."""
    if view.kind(node) != "mul" or len(node.args) != 2:
        return None
    for a, s in (node.args, node.args[::-1]):
        if is_state_input(s) and is_tensor(example(s)):
            if isinstance(a, fx.Node) and is_tensor(example(a)):
                return a, s
            if isinstance(a, (int, float)) and not isinstance(a, bool):
                return float(a), s
    return None


def find_recurrent(view: GraphView, inputs: list) -> list[Region]:
    """Every recurrent-step candidate of the graph, claimed or declined."""
    regions = []
    for node in view.nodes_of_kind("add"):
        if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
            continue
        for left, right in (node.args, node.args[::-1]):
            core, casts = _through_casts(view, right)
            decay, outer = _decay_side(view, left), outer_product(view, core)
            if decay is not None and outer is not None:
                regions.append(_check(view, node, left, decay, outer, inputs, casts))
                break
    return regions


def _through_casts(view: GraphView, node: fx.Node) -> tuple[fx.Node, tuple[fx.Node, ...]]:
    """``(core, casts)``: node with the dtype casts on it stripped (``(k^T @ v).float()``),
    outermost first. Whether each cast is exact to claim is ``_narrowing``'s question."""
    casts: list[fx.Node] = []
    while view.kind(node) == "cast" and node.args and isinstance(node.args[0], fx.Node):
        casts.append(node)
        node = node.args[0]
    return node, tuple(casts)


def _narrowing(casts: tuple[fx.Node, ...]) -> str | None:
    """Why a cast of the outer product cannot be claimed, or None: a cast to the same or a wider
    floating dtype keeps every value of the product (the op computes it in float32 or wider and
    adds it unrounded, as eager adds the widened one), a narrower one rounds it."""
    for cast in casts:
        src, dst = example(cast.args[0]), example(cast)
        if not (is_tensor(src) and is_tensor(dst)):
            return "the outer product is cast to an unknown dtype"
        if src.dtype == dst.dtype:
            continue
        wider = torch.promote_types(src.dtype, dst.dtype) == dst.dtype
        if not (src.dtype.is_floating_point and dst.dtype.is_floating_point and wider):
            return (
                f"the outer product is cast from {src.dtype} to {dst.dtype}, which rounds it "
                "(the op would add it unrounded); cast k and v instead, or keep the product's "
                "dtype"
            )
    return None


def _in_place(new_state: fx.Node, scaled: fx.Node, state: fx.Node) -> str | None:
    """How the state input is updated in place, or None: ``state.mul_(a).add_(k^T @ v)``
    (Dynamo then returns the mutated input, not S') or ``state.copy_(S')`` (a static cache's
    spelling). An in-place add on the fresh ``a * S`` mutates no input and stays claimable."""
    name = _target_name(scaled)
    if (name.endswith("_") or name == "imul") and scaled.args and scaled.args[0] is state:
        return f"{name} and {_target_name(new_state)} on the state"
    for user in new_state.users:
        if _target_name(user) == "copy_" and user.args and user.args[0] is not new_state:
            return "copy_ of the new state into the state"
    return None


def _target_name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _check(view, new_state, scaled, decay, outer, inputs, casts=()) -> Region:
    a, state = decay
    x, y = outer
    base = Region(written="recurrent step", where=where(new_state), state_output=new_state.name)
    readouts = [read_out(view, new_state, u) for u in new_state.users]
    readouts = [r for r in readouts if r is not None]
    in_place = _in_place(new_state, scaled, state)
    if in_place is not None:
        # NOTE: Dynamo returns the mutated input itself, so S' is no graph output; saying "not
        # returned" sent users looking for a missing return
        return base.declined(
            f"the state is updated in place ({in_place}); the backend claims a step that "
            "computes a new state, S' = a * S + k^T v, and returns it (or assigns it, "
            "cache.state = S')"
        )
    if new_state not in view.outputs:
        return base.declined("the new state is not returned (state must be a graph output)")
    if len(readouts) != 1:
        return base.declined(f"{len(readouts)} read-outs of the new state (expected one)")
    q, contracted, out, out_perm, out_nodes = readouts[0]
    if not (q.squeezed == x.squeezed == y.squeezed):
        return base.declined("read-out and outer product disagree on the token axis")
    if not q.squeezed and not _same_tokens(q, x, y):
        # NOTE: T queries reading one token's update is no recurrence over T tokens
        return base.declined("the read-out and the state update cover different token counts")
    k, v = (x, y) if contracted == -2 else (y, x)
    mismatch = state_batch_mismatch(state, q.lay.base, q.lay.perm, q.squeezed)
    if mismatch is not None:
        return base.declined(mismatch)
    # NOTE: the op takes one k and v row per batch row and head; a k shared over the heads
    # ([B, 1, 1, K] beside q's [B, H, 1, K]) was claimed and failed to compile where the op runs
    qs = _batch_dims(q.lay.base, q.lay.perm, q.squeezed)
    for name, side in (("k", k), ("v", v)):
        mine = _batch_dims(side.lay.base, side.lay.perm, q.squeezed)
        if len(mine) != len(qs) or not all(map(same_size, mine, qs)):
            return base.declined(
                f"{name} does not have q's batch/head dims ({name} {[hint(d) for d in mine]}, "
                f"q {[hint(d) for d in qs]}: broadcast over the batch or heads); expand it to them"
            )
    inside = {scaled, outer_node := new_state.args[1 - new_state.args.index(scaled)]}
    inside |= set(x.nodes + y.nodes + x.lay.chain + y.lay.chain + casts)
    if casts:
        inside.add(casts[-1].args[0])  # NOTE: the product itself, inside its casts
    for n in inside:
        if any(u not in inside and u is not new_state for u in n.users):
            return base.declined("an intermediate of the state update is used elsewhere")
    if any(example(n.base).is_complex() for n in (q.lay, k.lay, v.lay)):
        return base.declined("complex dtype")
    narrowing = _narrowing(casts)
    if narrowing is not None:
        return base.declined(narrowing)
    before, after = example(state), example(new_state)
    if is_tensor(before) and is_tensor(after) and before.dtype != after.dtype:
        # NOTE: the op returns the new state in the state's dtype (a bfloat16 state times a
        # float32 decay, or plus a product cast to float32, is float32 in eager)
        return base.declined(
            f"the new state is {after.dtype} but the state passed in is {before.dtype} (the op "
            "keeps the state's dtype); pass the state in the dtype the step produces"
        )
    reason, gamma = _prove_decay(view, a, state, inputs)
    nodes = view.sorted(inside | {new_state, outer_node, *out_nodes})
    region = dataclasses.replace(
        base,
        output=out.name,
        nodes=tuple(n.name for n in nodes),
        q=Operand(q.lay.base.name, q.lay.perm, q.squeezed),
        k=Operand(k.lay.base.name, k.lay.perm, q.squeezed),
        v=Operand(v.lay.base.name, v.lay.perm, q.squeezed),
        masks=(a.name,) if isinstance(a, fx.Node) else (),
        mask_kind="decay",
        out_perm=out_perm,
        state=Operand(state.name),
        state_vk=contracted == -1,
        seq_len=1
        if q.squeezed
        else hint(example(q.lay.base).shape[q.lay.perm[-2] if q.lay.perm else -2]),
        heads=_heads(state),
        k_dim=hint(example(state).shape[-2 if contracted == -2 else -1]),
        v_dim=hint(example(state).shape[-1 if contracted == -2 else -2]),
        decay=gamma,
    )
    return region if reason is None else region.declined(reason)


def state_batch_mismatch(state: fx.Node, q: fx.Node, perm, squeezed: bool) -> str | None:
    """Why the state's leading dims are not q's batch and head dims (q read through ``perm``;
    the op takes one state per batch row and head, [B, H, K, V]), or None."""
    batch = _batch_dims(q, perm, squeezed)
    lead = list(example(state).shape)[:-2]
    if len(lead) == len(batch) and all(same_size(a, b) for a, b in zip(lead, batch, strict=True)):
        return None
    return (
        f"the state's batch/head dims {[hint(d) for d in lead]} are not q's "
        f"{[hint(d) for d in batch]} (the op takes one state per batch row and head)"
    )


def _batch_dims(node: fx.Node, perm, squeezed: bool) -> list:
    """The batch and head dims of a row operand [.., T, D] ([.., D] when ``squeezed``) read
    through ``perm``."""
    shape = list(example(node).shape)
    shape = [shape[p] for p in perm] if perm else shape
    return shape[:-1] if squeezed else shape[:-2]


def _tokens(row) -> object:
    """The token count of a row operand [.., T, D] (seen in its layout)."""
    shape = example(row.lay.base).shape
    return shape[row.lay.perm[-2] if row.lay.perm else -2]


def _same_tokens(*rows) -> bool:
    first = _tokens(rows[0])
    return all(statically_known_true(first == _tokens(r)) for r in rows[1:])


def _heads(state: fx.Node) -> int:
    """The heads the op sees: the state's dim -3 ([.., H, K, V]; 1 for a 2-D state), whatever
    the decay's shape (a 0-dim or per-head decay both apply to every head)."""
    shape = example(state).shape
    return hint(shape[-3]) if len(shape) >= 3 else 1


def _prove_decay(view, a, state: fx.Node, inputs) -> tuple[str | None, tuple]:
    """The state decay must be constant-derived, per head only, and in (0, 1]."""
    if not isinstance(a, fx.Node):
        if not 0 < a <= 1:
            return f"state decay outside (0, 1]: {a}", ()
        return None, (a,)
    reason = mask_provenance.check_provenance(view, [a])
    if reason is not None:
        return reason.replace("mask", "state decay"), ()
    rank = ndim(state)
    shape = list(example(a).shape)
    if len(shape) > rank or any(s != 1 for i, s in enumerate(shape[::-1]) if i != 2):
        sizes = [hint(s) for s in shape]  # NOTE: example sizes, not symbols (s47)
        return f"the state decay has shape {sizes}: it must vary over the heads only", ()
    try:
        with unset_fake_temporarily(), torch.no_grad():
            (value,) = mask_proof.evaluate(view, [a], inputs, mask_proof.Sizes(0, 0))
    except Exception as exc:  # noqa: BLE001 - declined, with the reason
        return f"the state decay could not be evaluated ({exc})", ()
    gamma = value.double().reshape(-1)
    if not ((gamma > 0) & (gamma <= 1 + 1e-6)).all():
        return f"state decay outside (0, 1]: {gamma.tolist()}", ()
    return None, tuple(float(g) for g in gamma.clamp(max=1.0))
