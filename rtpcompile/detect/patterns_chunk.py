"""One chunk per call: a claimed parallel region plus a cross term and a state update.

    o  = (Q K^T * D) V + (Q * g^(i+1)) @ S          (the parallel region, then "+ cross")
    S' = g^C * S + (K * g^(C-1-i))^T @ V

becomes one chunkwise call of the rtp op with ``initial_state=S`` returning (o, S'). The three
decay tensors are evaluated like masks (constants and sizes only) at several chunk lengths and
must equal the powers of the region's proven gamma; otherwise the parallel claim stands alone.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from . import mask_proof
from .graph_view import GraphView, example, is_constant_source, layout, ndim
from .region import Operand, Region


def _split_mul(view: GraphView, node, base: Operand):
    """(decay node) when ``node`` is ``base * decay`` (either order), else None."""
    if not isinstance(node, fx.Node) or view.kind(node) != "mul" or len(node.args) != 2:
        return None
    for x, d in (node.args, node.args[::-1]):
        if isinstance(x, fx.Node) and isinstance(d, fx.Node):
            lay = layout(x)
            if lay.base.name == base.node and lay.perm == base.perm:
                return d
    return None


def _cross(view: GraphView, node: fx.Node, region: Region):
    """(q decay, state) when ``node`` is ``(q * q_decay) @ S`` with S a graph-input state."""
    if view.kind(node) != "matmul" or len(node.args) != 2:
        return None
    left, state = node.args
    if not isinstance(state, fx.Node) or state.op != "placeholder" or is_constant_source(state):
        return None
    decay = _split_mul(view, left, region.q)
    return None if decay is None else (decay, left, state)


def _update(view: GraphView, state: fx.Node, region: Region):
    """(chunk decay, k decay, nodes, S') for ``S' = cd * S + (k * kd)^T @ v``."""
    for scaled in state.users:
        if view.kind(scaled) != "mul" or len(scaled.users) != 1:
            continue
        new = next(iter(scaled.users))
        if view.kind(new) != "add" or new not in view.outputs or scaled not in new.args:
            continue
        outer = new.args[1] if new.args[0] is scaled else new.args[0]
        if view.kind(outer) != "matmul" or len(outer.args) != 2:
            continue
        chunk_decay = scaled.args[0] if scaled.args[1] is state else scaled.args[1]
        kt, v = outer.args
        lay_k, lay_v = layout(kt), layout(v)
        k_decay = _split_mul(view, lay_k.base, region.k)
        if k_decay is None or lay_v.base.name != region.v.node or lay_v.perm != region.v.perm:
            continue
        nodes = (scaled, new, outer, lay_k.base, *lay_k.chain)
        return chunk_decay, k_decay, nodes, new
    return None


def _expected(gamma: torch.Tensor, t: int):
    pos = torch.arange(t, dtype=torch.float64)
    lg = torch.log(gamma)[:, None]
    q = torch.exp(lg * (pos + 1))[:, :, None]
    k = torch.exp(lg * (t - 1 - pos))[:, :, None]
    return q, k, torch.exp(lg * t)[:, :, None]


def _matches(value: torch.Tensor, want: torch.Tensor) -> bool:
    value = value.double().cpu()
    while value.dim() > want.dim() and value.shape[0] == 1:
        value = value[0]
    if value.dim() != want.dim():
        return False
    try:
        a, b = torch.broadcast_tensors(value, want)
    except RuntimeError:
        return False
    return a.shape == want.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def _decays_match(view, nodes, region: Region, seq, inputs) -> bool:
    gamma = torch.tensor(region.decay, dtype=torch.float64)
    if mask_proof.check_provenance(view, list(nodes)) is not None:
        return False
    for t in mask_proof.lengths_for(seq):
        try:
            with unset_fake_temporarily(), torch.no_grad():
                values = mask_proof.evaluate(view, list(nodes), inputs, mask_proof._Sizes(seq, t))
        except Exception:  # noqa: BLE001 - not provable: keep the parallel claim
            return False
        wants = _expected(gamma, t)
        if not all(_matches(v, w) for v, w in zip(values, wants, strict=True)):
            return False
    return True


def merge_chunk_steps(view: GraphView, regions: list[Region], inputs: list) -> list[Region]:
    """Turn claimed parallel regions that form a chunk step into chunk-step regions."""
    named = {node.name: node for node in view.nodes}
    merged = []
    for region in regions:
        merged.append(_merge(view, named, region, inputs) or region)
    return merged


def _merge(view: GraphView, named, region: Region, inputs) -> Region | None:
    simple = region.pre == () and region.normaliser == "none" and region.out_perm is None
    if not (region.claimed and region.written == "parallel" and simple):
        return None
    if region.mask_kind != "mul" or region.row_scale or ndim(named[region.q.node]) != 4:
        return None
    out = named[region.output]
    if len(out.users) != 1 or view.kind(add := next(iter(out.users))) != "add":
        return None
    other = add.args[1] if add.args[0] is out else add.args[0]
    cross = _cross(view, other, region) if isinstance(other, fx.Node) else None
    if cross is None:
        return None
    q_decay, scaled_q, state = cross
    update = _update(view, state, region)
    if update is None:
        return None
    chunk_decay, k_decay, nodes, new_state = update
    seq = example(named[region.output]).shape[-2]
    if not _decays_match(view, (q_decay, k_decay, chunk_decay), region, seq, inputs):
        return None
    inside = set(nodes) | {add, other, scaled_q}
    return dataclasses.replace(
        region,
        written="chunk step",
        output=add.name,
        nodes=tuple(n.name for n in view.sorted({named[n] for n in region.nodes} | inside)),
        state=Operand(state.name),
        state_output=new_state.name,
    )
