"""One chunk per call: a claimed parallel region plus a cross term and a state update.

    o  = (Q K^T * D) V + (Q * g^(i+1)) @ S          (the parallel region, then "+ cross")
    S' = g^C * S + (K * g^(C-1-i))^T @ V

becomes one chunkwise call of the rtp op with ``initial_state=S`` returning (o, S'). The three
decay tensors are evaluated like masks (constants and sizes only) at several chunk lengths and
must equal the powers of the region's proven gamma, also with the model state and trainable
parameters they and the mask read moved; a trainable parameter must reach the mask and the
decays with its gradient (no detach, no no_grad span): the op reads gamma from the mask alone
and differentiates all four through it. Otherwise the parallel claim stands alone.
A number scaling the scores (``scale``, on the product or on q) must scale the cross term by the
same number, and casts to the dtype a tensor already has (``k.to(torch.float32)`` of a float32
k) are passed.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from . import mask_proof, mask_provenance
from .graph_view import (
    GraphView,
    example,
    is_state_input,
    is_tensor,
    kind_of,
    ndim,
    target_name,
)
from .mask_eval import subgraph
from .mask_provenance import _state_reach
from .mutation import writers
from .operands import layout, peel
from .patterns_recurrent import state_batch_mismatch
from .region import Operand, Region
from .region_checks import grad_modes


def _same_dtype_cast(node) -> bool:
    """``node`` casts a tensor to the dtype it already has (a no-op on its value)."""
    if not isinstance(node, fx.Node) or kind_of(node) != "cast" or not node.args:
        return False
    src = node.args[0]
    a, b = example(node), example(src) if isinstance(src, fx.Node) else None
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype


def _reads(node: fx.Node, base: Operand) -> bool:
    """``node`` is ``base`` (in its layout), through no-op casts."""
    lay = layout(node)
    if lay.perm != base.perm:
        return False
    core = lay.base
    while core.name != base.node and _same_dtype_cast(core):
        core = core.args[0]
    return core.name == base.node


def _split_mul(view: GraphView, node, base: Operand):
    """(decay node) when ``node`` is ``base * decay`` (either order), else None."""
    if not isinstance(node, fx.Node) or view.kind(node) != "mul" or len(node.args) != 2:
        return None
    for x, d in (node.args, node.args[::-1]):
        if isinstance(x, fx.Node) and isinstance(d, fx.Node) and _reads(x, base):
            return d
    return None


def _product(factors) -> tuple[float, tuple] | None:
    """``("mul" | "div", x)`` factors as (product of the numbers, sorted (op, node name) of the
    rest): two factor lists scale alike when these agree. None for a division by zero."""
    total, named = 1.0, []
    for op, x in factors:
        if isinstance(x, fx.Node):
            named.append((op, x.name))
        elif isinstance(x, str):  # a Region factor names its node
            named.append((op, x))
        elif op == "div" and x == 0:
            return None
        else:
            total = total * x if op == "mul" else total / x
    return total, tuple(sorted(named))


def _cross(view: GraphView, node: fx.Node, region: Region, q: fx.Node):
    """(q decay, nodes, state) when ``node`` is ``(q * q_decay) @ S`` with S a graph-input state,
    times the number that scales the region's scores (its ``pre`` factors), if any; with q the
    region's q (``q`` its node), or q before the numbers that scale it (``(q * scale) @ k^T``
    beside ``(q * q_decay) @ S * scale``: the op scales both terms with the q it is given)."""
    # NOTE: only casts to the dtype a tensor has: a real cast would change the cross term
    peeled = peel(node, _same_dtype_cast)
    core, chain = peeled.core, peeled.chain
    if view.kind(core) != "matmul" or len(core.args) != 2:
        return None
    left, state = core.args
    if not is_state_input(state):
        return None
    reads = [(region.q, ())]
    scaled = peel(q, _same_dtype_cast)
    named = [x for _, x in scaled.factors if isinstance(x, fx.Node)]
    # NOTE: the op reads q as the scores scaled it: a write to q (or to a scale) after that
    # would reach eager's cross term alone
    if scaled.factors and not writers([scaled.core, *named]):
        reads.append((Operand(scaled.core.name, region.q.perm), scaled.factors))
    for base, factors in reads:
        decay = _split_mul(view, left, base)
        if decay is not None and _same_scale([*region.pre, *factors], peeled.factors):
            return decay, (left, core, *chain), state
    return None


def _same_scale(scores, cross) -> bool:
    """Whether two lists of ``("mul" | "div", x)`` factors scale alike."""
    a, b = _product(scores), _product(cross)
    return (
        a is not None and b is not None and a[1] == b[1] and math.isclose(a[0], b[0], rel_tol=1e-12)
    )


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
        lay_k = layout(kt)
        # NOTE: k^T: (k * kd) in k's canonical [.., T, K] layout with its last two dims swapped
        # (``(k * kd) @ v`` runs too when K equals the chunk length, and is another product)
        if not lay_k.swaps_last_two:
            continue
        k_decay = _split_mul(view, lay_k.base, region.k)
        if k_decay is None or not _reads(v, region.v):
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


def _decays_match(view, nodes, region: Region, seq, inputs, out: fx.Node) -> bool:
    gamma = torch.tensor(region.decay, dtype=torch.float64)
    if mask_provenance.check_provenance(view, list(nodes)) is not None:
        return False
    for t in mask_proof.lengths_for(seq):
        try:
            with unset_fake_temporarily(), torch.no_grad():
                values = mask_proof.evaluate(view, list(nodes), inputs, mask_proof.Sizes(seq, t))
        except Exception:  # noqa: BLE001 - not provable: keep the parallel claim
            return False
        wants = _expected(gamma, t)
        if not all(_matches(v, w) for v, w in zip(values, wants, strict=True)):
            return False
    return _match_when_moved(view, nodes, region, seq, inputs, out)


def _match_when_moved(view, nodes, region: Region, seq, inputs, out: fx.Node) -> bool:
    """The three decays must still be the powers of the mask's gamma once what they and the mask
    read moves: trainable parameters (as training moves them; a cross decay from another
    parameter than the mask's equals it only at its initial values) and other model state
    (buffers, frozen parameters, tensor attributes: a later ``load_state_dict`` or ``copy_``).
    The op reads gamma from the mask alone, at run time, and differentiates all three decays
    through it.

    NOTE: a decay that reads a buffer the mask does not (``q_decay * self.temp``, temp = 1 at
    compile time) was trusted at its compile-time values; one that reads state through a step
    (a clamp, a threshold, a bool or int buffer), which a small move may not show, is not
    merged."""
    named = {node.name: node for node in view.nodes}
    masks = [named[m] for m in region.masks]
    roots = masks + list(nodes)
    for trained in (False, True):
        if _state_reach(view, list(nodes), inputs, trained) == "step":
            return False
    trainable = bool(mask_provenance.trainable_inputs(view, roots, inputs))
    state = _state_reach(view, roots, inputs) is not None
    if trainable and _gradient_cut(view, roots, inputs, out):
        return False
    if not (trainable or state):
        return True
    t = max(2, max(mask_proof.lengths_for(seq)))
    gen = torch.Generator().manual_seed(0)
    try:
        with unset_fake_temporarily(), torch.no_grad():
            sizes = mask_proof.Sizes(seq, t)
            values = mask_proof.evaluate(view, roots, inputs, sizes, gen, move_state=state)
    except Exception:  # noqa: BLE001 - not provable: keep the parallel claim
        return False
    mask = _mask_product(values[: len(masks)], region.mask_axes)
    if mask is None or mask.shape[-1] != t or mask.shape[-2] != t:
        return False
    rows = mask.double().reshape(-1, t, t)
    gamma = rows[:, 1, 0] / rows[:, 1, 1]
    wants = _expected(gamma, t)
    return all(_matches(v, w) for v, w in zip(values[len(masks) :], wants, strict=True))


# NOTE: ops after which a value carries no gradient (``.data`` is ``_get_data_attr``)
_DETACHES = {"detach", "detach_", "_get_data_attr", "requires_grad_"}


def _gradient_cut(view: GraphView, roots: list[fx.Node], inputs, out: fx.Node) -> bool:
    """Whether a trainable input reaches the mask or a decay through a node that stops its
    gradient (a detach, ``.data``, or a node under ``torch.no_grad``), when the output carries
    gradients.

    NOTE: the op differentiates the cross decays through the mask's gamma: with the q decay
    detached (or the mask), eager's d/d log(gamma) was [-0.30, -207, -0.31] and the op's
    [-40.9, -336, 91.6]."""
    modes = grad_modes(view)
    if not modes.get(out, True):
        return False
    index = {node: i for i, node in enumerate(view.placeholders)}
    for root in roots:
        values, _, _ = subgraph(view, root)
        reached: set[fx.Node] = set()
        for node in view.sorted(values | {root}):
            i = index.get(node)
            if i is not None:
                value = inputs[i] if i < len(inputs) else None
                if is_tensor(value) and value.requires_grad:
                    reached.add(node)
                continue
            if not any(arg in reached for arg in node.all_input_nodes):
                continue
            if target_name(node) in _DETACHES or not modes.get(node, True):
                return True
            reached.add(node)
    return False


def _mask_product(values, axes) -> torch.Tensor | None:
    """The decay masks multiplied as the scores see them (None when there are none)."""
    total = None
    for value, dims in zip(values, axes, strict=True):
        for dim in dims:
            value = value.unsqueeze(dim)
        total = value if total is None else total * value
    return total


def merge_chunk_steps(view: GraphView, regions: list[Region], inputs: list) -> list[Region]:
    """Turn claimed parallel regions that form a chunk step into chunk-step regions."""
    named = {node.name: node for node in view.nodes}
    merged = []
    for region in regions:
        merged.append(_merge(view, named, region, inputs) or region)
    return merged


def _merge(view: GraphView, named, region: Region, inputs) -> Region | None:
    simple = region.post == () and region.normaliser == "none" and region.out_perm is None
    if not (region.claimed and region.written == "parallel" and simple):
        return None
    if region.mask_kind != "mul" or region.row_scale or ndim(named[region.q.node]) != 4:
        return None
    out = named[region.output]
    if len(out.users) != 1 or view.kind(add := next(iter(out.users))) != "add":
        return None
    other = add.args[1] if add.args[0] is out else add.args[0]
    q = named[region.q.node]
    cross = _cross(view, other, region, q) if isinstance(other, fx.Node) else None
    if cross is None:
        return None
    q_decay, cross_nodes, state = cross
    if state_batch_mismatch(state, q, region.q.perm, False) is not None:
        return None  # NOTE: a state broadcast over the batch: the parallel part alone
    update = _update(view, state, region)
    if update is None:
        return None
    chunk_decay, k_decay, nodes, new_state = update
    seq = example(named[region.output]).shape[-2]
    if not _decays_match(view, (q_decay, k_decay, chunk_decay), region, seq, inputs, add):
        return None
    inside = set(nodes) | {add, *cross_nodes}
    # NOTE: an intermediate written in place (``cross.mul_(0.5)``, ``(k * kd).mul_(2)``) changes
    # what eager computes from it: the op would compute the unwritten step (claimed until
    # 2026-11-25, outputs off by 1.9). The outputs may be written afterwards, as any op's.
    if writers([n for n in inside if n not in (add, new_state)]):
        return None
    return dataclasses.replace(
        region,
        written="chunk step",
        output=add.name,
        nodes=tuple(n.name for n in view.sorted({named[n] for n in region.nodes} | inside)),
        state=Operand(state.name),
        state_output=new_state.name,
    )
