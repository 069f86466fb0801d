"""Replace each claimed region by one call of the rtp op (``torch.ops.rtp.retention_fwd``).

Rewrite never analyses: it reads the :class:`Region` detection produced and inserts one
``call_function`` node per region that calls :func:`rtp_retention`, a small traceable glue
function. AOTAutograd traces through the glue, so the compiled graph holds one rtp op per
region plus the permutes/views to [B, H, T, D] and back (a one-token step on CPU: plain aten
ops instead of the op, ``inline_step``).

# NOTE: the decay gamma and the row scale c are computed at run time from the region's own mask
# nodes (gamma_h = M[h,1,0] / M[h,1,1], c[h,i] = M[h,i,i]; gamma = 1 when T = 1, where it has
# no effect). Buffer values are not guarded by Dynamo, so freezing the compile-time values would
# serve a stale decay after ``model.decay.copy_(...)``; reading the diagonals of a mask the graph
# already builds costs O(T) once Inductor fuses it, syncs nothing and keeps gamma learnable.
# The row scale multiplies the op's output rows (in float32) only when the proof found a diagonal
# other than 1 (decay masks built from gamma have M[h,i,i] = gamma^0 = 1 whatever the buffer
# holds); skipping the identity scale also keeps Inductor's backward free of a stride guard that
# recompiled per T.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx as fx

from . import options
from .detect.decay_fit import distances, gamma_at_distances, smallest_normal
from .detect.graph_view import copy_graph_module
from .detect.mutation import writers
from .detect.patterns_native import op_schema
from .detect.region import Region
from .kernels.blocks import next_pow2
from .lowering import aten_impl, validate
from .lowering.aten_impl import accumulation_dtype

_SCALAR_OPS = {"mul": torch.mul, "div": torch.div}


def _scaled(x: torch.Tensor, factors) -> torch.Tensor:
    for op, value in factors:
        x = x * value if op == "mul" else x / value
    return x


def _broadcast(mask: torch.Tensor, dims, t) -> torch.Tensor:
    """One mask factor as a [.., T, T] view of what it contributes to the scores' product.

    NOTE: a factor may broadcast along a row or a column (``g**i[:, :, None]``, a per-row scale
    [H, T, 1]): its entries (i, j) are read from the expanded view. expand() is a view, so the
    O(1) / O(T) reads below stay O(1) / O(T); no T x T tensor is made."""
    for dim in dims:
        mask = mask.unsqueeze(dim)
    while mask.dim() < 2:
        mask = mask[None]
    return mask.expand(*mask.shape[:-2], t, t)


def split_scale(factors) -> tuple[float, tuple]:
    """(product of the constant factors as one number, the tensor factors left to apply)."""
    scale, rest = 1.0, []
    for op, value in factors:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 0:
            scale = scale * value if op == "mul" else scale / value
        else:
            rest.append((op, value))
    if not math.isfinite(scale) or scale == 0:  # NOTE: degenerate: left on q, as before
        return 1.0, tuple(factors)
    return scale, tuple(rest)


def _decay(masks, kind: str, axes, like: torch.Tensor, want_row_scale: bool = True):
    """(gamma over the mask's batch dims, row scale [.., T] or None) from the mask tensors.

    The mask is the product of its factors, so gamma = M[.., 1, 0] / M[.., 1, 1] and the
    diagonal are products of the factors' own entries there."""
    if kind == "given":  # NOTE: read outside a checkpoint's body (``rtp_decay``)
        return masks[0], (masks[1] if len(masks) > 1 else None)
    dtype = accumulation_dtype(like.dtype)
    if kind == "decay" and not isinstance(masks[0], torch.Tensor):  # a literal (0.9 * S)
        return torch.full((1,), masks[0], dtype=dtype, device=like.device), None
    if kind == "decay":
        return masks[0].to(dtype), None
    if kind != "mul":
        return torch.ones(1, dtype=dtype, device=like.device), None
    t = like.shape[-2]
    n = distances(t, like.device)  # n[0] is 1 (0 when T = 1)
    k = n.shape[0]
    # the entries read: M[n, 0] and M[n, n] at the distances, then the diagonal (the row scale)
    idx = torch.arange(t, device=like.device) if want_row_scale else n[:0]
    rows, cols = torch.cat([n, n, idx]), torch.cat([torch.zeros_like(n), n, idx])
    entries = None
    for mask, dims in zip(masks, axes, strict=True):
        read = _MaskEntries.apply(_broadcast(mask.to(dtype), dims, t), rows, cols, k)
        entries = read if entries is None else entries * read
    far = entries[..., : 2 * k].detach()
    diag = entries[..., 2 * k :] if want_row_scale else None
    tiny = smallest_normal(*(m.dtype for m in masks))
    gamma = gamma_at_distances(far[..., :k], far[..., k:], n, tiny)
    # NOTE: gamma's gradient is that of the distance-1 ratio M[1, 0] / M[1, 1] (1 when T = 1)
    num, den = entries[..., 0], entries[..., k]
    near = num / torch.where(den != 0, den, torch.ones_like(den))
    return gamma + (near - near.detach()), diag


class _MaskEntries(torch.autograd.Function):
    """``mask[.., rows, cols]`` with a pointwise backward, for ``_decay``'s reads: M[n, 0] for
    the ``k`` distances n, M[n, n], then the diagonal if read. Only the distance-1 pair (entries 0
    and ``k``) and the diagonal take a gradient: the other entries are read detached.

    NOTE: one read per mask: a mask read twice (a slice and a gather) is realised whole by
    Inductor, an [H, T, T] buffer filled on every call, where a gather alone is computed lazily
    (O(T)). The backward is a ``where`` over the mask's positions, not the gather's scatter:
    Inductor's vectorised CPU scatter for this gather wrote out of bounds.
    """

    # NOTE: torch.vmap (a region inside a vmapped function) needs the setup_context form
    generate_vmap_rule = True

    @staticmethod
    def forward(mask, rows, cols, k: int):
        return mask[..., rows, cols]

    @staticmethod
    def setup_context(ctx, inputs, output):
        mask, rows, cols, k = inputs
        ctx.save_for_backward(rows[[0, k]], cols[[0, k]])
        ctx.shape, ctx.k = mask.shape, k
        ctx.diagonal = rows.shape[0] > 2 * k

    @staticmethod
    def backward(ctx, grad):
        rows, cols = ctx.saved_tensors
        t, k = ctx.shape[-1], ctx.k
        i = torch.arange(t, device=grad.device)
        row, col = i[:, None], i[None, :]
        out = torch.zeros((), dtype=grad.dtype, device=grad.device)
        for e, at in enumerate((0, k)):  # NOTE: summed: T = 1 reads M[0, 0] for both
            hit = (row == rows[e]) & (col == cols[e])
            out = out + torch.where(hit, grad[..., at, None, None], 0.0)
        if ctx.diagonal:
            out = out + torch.where(row == col, grad[..., 2 * k :, None], 0.0)
        return out.expand(ctx.shape), None, None, None


def _to4(x: torch.Tensor) -> torch.Tensor:
    n = x.dim() - 2
    if n == 0:
        return x[None, None]
    if n == 1:
        return x[None]
    return x if n == 2 else x.flatten(0, n - 2)


def _from4(x: torch.Tensor, batch) -> torch.Tensor:
    n = len(batch)
    if n == 0:
        return x[0, 0]
    if n == 1:
        return x[0]
    return x if n == 2 else x.unflatten(0, tuple(batch[:-1]))


def _full_mask(masks, kind: str, axes, like: torch.Tensor) -> torch.Tensor:
    """The region's whole [.., T, T] mask (the product of its factors), in ``like``'s dtype."""
    if kind != "mul":
        t = like.shape[-2]
        return torch.ones(t, t, dtype=like.dtype, device=like.device).tril()
    total = None
    for mask, dims in zip(masks, axes, strict=True):
        for dim in dims:
            mask = mask.unsqueeze(dim)
        total = mask if total is None else total * mask
    return total.to(like.dtype)


def rtp_retention(q, k, v, masks, pre, post, state, spec):
    """The region's value computed by the rtp op; returns ``(output, new_state or None)``.

    ``spec`` (constants only): (q_perm, k_perm, v_perm, token_axis, mask_kind, mask_axes,
    normaliser, normaliser_min, out_perm, state_vk, form, chunk_size, row_scale,
    runtime_options, out_dtype: the dtype eager computed the region's output in, or None).
    """
    (q_perm, k_perm, v_perm, token_axis, kind, axes, normaliser, low, out_perm, state_vk, form,
     chunk, use_row_scale, runtime, out_dtype) = spec  # fmt: skip
    q, k, v = (x if p is None else x.permute(p) for x, p in ((q, q_perm), (k, k_perm), (v, v_perm)))
    if out_dtype is not None and out_dtype != q.dtype:
        # NOTE: the dtype eager computed the region's output in: autocast's for products it
        # casts (``q @ k^T``, ``@ v``; not an elementwise spelling, not under a nested
        # ``autocast(enabled=False)``, never float64), or a cast written in the region
        q, k, v = (x.to(out_dtype) for x in (q, k, v))
    if token_axis:
        q, k, v = (x.unsqueeze(-2) for x in (q, k, v))
    # NOTE: constant score factors (1/sqrt(K)) become the op's scale, applied in float32 after
    # the q.k reductions: q * c rounded to bf16/fp16 first loses the digits that cancel in a
    # small q.k (rows a GroupNorm after the retention then amplifies), which eager's
    # (q @ k^T) * c keeps. A 0-dim tensor factor (a learnable temperature) scales every score of
    # the region, so it scales the op's output, in float32 below, for the same reason.
    op_scale, pre = split_scale(pre)
    on_o = tuple(f for f in pre if isinstance(f[1], torch.Tensor))
    q = _scaled(q, tuple(f for f in pre if not isinstance(f[1], torch.Tensor)))
    k, v = k.to(q.dtype), v.to(q.dtype)
    den = None
    if normaliser == "sum_abs":
        # NOTE: the full mask already holds the row scale (the op's output gets it below)
        scores = torch.matmul(q, k.transpose(-1, -2)) * _full_mask(masks, kind, axes, q)
        scores = _scaled(scores * op_scale, on_o)
        den = scores.detach().abs().sum(-1, keepdim=True).clamp(min=low)
    gamma, row_scale = _decay(masks, kind, axes, q, bool(use_row_scale))
    batch = q.shape[:-2]
    apart = normaliser == "abs_sum" and state is None and normaliser_apart(q, v, runtime)
    if normaliser == "abs_sum" and not apart:
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    q4, k4, v4 = _to4(q), _to4(k), _to4(v)
    gamma = gamma.reshape(-1).expand(q4.shape[1])
    s4 = None
    if state is not None:
        s4 = _to4(state.transpose(-1, -2) if state_vk else state).to(gamma.dtype)
    # NOTE: a region without a state returns none (its final state would have no reader)
    if inline_step(q4, runtime):
        o, final = _step_in_aten(q4, k4, v4, gamma, op_scale, s4)
    else:
        o, final = torch.ops.rtp.retention_fwd(
            q4, k4, v4, gamma, op_scale, s4, form, chunk, state is not None, runtime
        )
    o = _row_scaled(_from4(o, batch), row_scale, on_o)
    if apart:
        # NOTE: the normaliser sum_j A_ij is the retention of a column of ones; it takes no
        # gradient, so a forward call on detached inputs is all it costs
        ones = torch.ones_like(v4[..., :1])
        n, _ = torch.ops.rtp.retention_fwd(
            q4.detach(), k4.detach(), ones, gamma.detach(), op_scale, None, form, chunk, False,
            runtime,
        )  # fmt: skip
        # NOTE: detached whole, as the column's sum is: the row scale and a learnable score
        # factor (on_o) would otherwise take a gradient through the denominator
        den = _row_scaled(_from4(n, batch), row_scale, on_o).detach().abs().clamp(min=low)
    elif normaliser == "abs_sum":
        o, den = o[..., :-1], o[..., -1:].detach().abs().clamp(min=low)
    if den is not None:
        o = o / den
    o = _scaled(o, post)
    if token_axis:
        o = o.squeeze(-2)
    if out_perm is not None:
        o = o.permute(out_perm)
    new_state = None
    if state is not None:
        new_state = _from4(final, state.shape[:-2])
        new_state = (new_state.transpose(-1, -2) if state_vk else new_state).to(state.dtype)
    return o, new_state


def _row_scaled(o: torch.Tensor, row_scale, on_o) -> torch.Tensor:
    """The op's output ([.., T, V], the region's batch dims) times the row scale c[h, i] and the
    tensor factors of the scores, in float32.

    NOTE: c[h, i] scales query row i, so it scales output row i (the state term and the
    normaliser's value column included): applied here, in float32, not folded into a 16-bit q,
    where q * c rounded first loses the digits that cancel in a small q.k (a row whose q_i.k_i
    nearly cancels kept no correct digit in dv_i). Its gradient flows as before."""
    if row_scale is None and not on_o:
        return o
    wide = accumulation_dtype(o.dtype)
    acc = o.to(wide)
    if row_scale is not None:
        acc = acc * row_scale[..., None].to(wide)
    return _scaled(acc, tuple((op, f.to(wide)) for op, f in on_o)).to(o.dtype)


def normaliser_apart(q: torch.Tensor, v: torch.Tensor, runtime_options: str) -> bool:
    """Whether a normaliser ``|sum_j A_ij|`` runs as its own forward call on a column of ones
    instead of as v's extra column: on the Triton kernels, when that column would cost a block of
    value columns (the kernels pad V to a power of two >= 16: V = 64 becomes 128, and V = 256
    would pass their limit and run on aten). Apart it costs one forward of a 16-wide block; as a
    column, a wider V in the forward and in every backward pass, though it takes no gradient."""
    with options.scoped(runtime_options):
        return normaliser_apart_on(q.device.type, v.shape[-1], options.current().kernels)


def normaliser_apart_on(device_type: str | None, V, kernels: str) -> bool:
    """``normaliser_apart``'s rule for a device type, a value head dim and a ``kernels``
    option (``explain`` reports it)."""
    if isinstance(V, torch.SymInt):
        # NOTE: decided on the example's head dim without a guard (a comparison would add one):
        # both ways compute the same values, only the cost differs
        V = V.node.hint
    if not isinstance(V, int):
        return False  # NOTE: an unbacked head dim (no example value)
    if kernels == "aten" or (kernels == "auto" and device_type != "cuda"):
        return False
    return next_pow2(max(V + 1, 16)) > next_pow2(max(V, 16))


def inline_step(q: torch.Tensor, runtime_options: str) -> bool:
    """Whether a region's call is left to Inductor as plain ops instead of the rtp op: a
    one-token step (T = 1, a static size: Dynamo specialises it) on CPU tensors, unless the
    Triton kernels are forced (``kernels="triton"``, read when the graph is compiled).

    NOTE: on CPU the op is a call boundary (~50 us of dispatch, planning and checks) around a
    step of a few small ops, which Inductor fuses with the projections around it when it sees
    them: a compiled CPU decode loop ran 20-40% slower per token with the op than with
    ``backend="inductor"``. On CUDA the op's fused kernel is the point (and a CUDA-graph replay
    removes its host cost), so it stays."""
    return steps_inline(q.device.type, q.shape[2], runtime_options)


def steps_inline(device_type: str, T, runtime_options: str = "") -> bool:
    """``inline_step``'s rule on a device type and a length (``explain`` reports it)."""
    if device_type != "cpu" or type(T) is not int or T != 1:
        return False
    with options.scoped(runtime_options):
        return options.current().kernels != "triton"


def _step_in_aten(q, k, v, gamma, scale, s0):
    """The op's (o, final state) of a one-token step, in aten ops; gamma's range is checked as
    the op checks it on CPU (an error naming the values' range), by an assertion in the graph."""
    validate.assert_gamma_range(gamma, "values outside it in a compiled one-token CPU step")
    # NOTE: the glue is traced under the graph's autocast state: the step's product must stay
    # in float32 as the op's does (the inputs already have the region's dtype, see above)
    with torch.autocast(q.device.type, enabled=False):
        return aten_impl.single_step(q, k, v, gamma, scale, s0, state_out=s0 is not None)


def _spec(region: Region, form: str, chunk_size: int, runtime_options: str, out_dtype) -> tuple:
    return (
        region.q.perm,
        region.k.perm,
        region.v.perm,
        region.q.token_axis,
        region.mask_kind,
        region.mask_axes,
        region.normaliser,
        region.normaliser_min,
        region.out_perm,
        region.state_vk,
        form,
        chunk_size,
        region.row_scale,
        runtime_options,
        out_dtype,
    )


def _eager_dtype(node: fx.Node) -> torch.dtype | None:
    """The floating dtype eager computed ``node`` in (Dynamo's example value), or None."""
    value = node.meta.get("example_value")
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.dtype
    return None


def _factors(factors, named) -> tuple:
    return tuple((op, named[v] if isinstance(v, str) else v) for op, v in factors)


def rewrite_region(
    gm: fx.GraphModule,
    region: Region,
    form: str,
    chunk_size: int,
    keep: bool = False,
    runtime_options: str = "",
) -> list[fx.Node]:
    """Insert the op call for one claimed region and reroute the region's outputs to it.

    Returns the new output nodes (output, then new state). With ``keep`` the original region
    stays in place and nothing is rerouted (``verify`` compares the two). A native region (an rtp
    op call already in the graph) is left as it is: its own output nodes are returned.
    """
    graph = gm.graph
    named = {node.name: node for node in graph.nodes}
    # NOTE: an earlier region's output, read by this one (its q or v), was replaced by that
    # region's op result and erased: its name leads to the result
    renamed = gm.meta.setdefault("rtp_renamed", {})
    alive = set(named.values())
    for old, new in renamed.items():
        if new in alive:
            named.setdefault(old, new)
    if region.native:
        return [named[n] for n in (region.output, region.state_output) if n is not None]
    masks = [named[m] for m in region.masks]
    if region.mask_kind == "decay" and not region.masks:
        masks = [float(region.decay[0])]  # NOTE: a literal state decay (0.9 * S): the number
    args = (
        named[region.q.node],
        named[region.k.node],
        named[region.v.node],
        masks,
        _factors(region.pre, named),
        _factors(region.post, named),
        named[region.state.node] if region.state is not None else None,
        _spec(region, form, chunk_size, runtime_options, _eager_dtype(named[region.output])),
    )
    inputs: list[fx.Node] = []
    fx.node.map_arg(args, inputs.append)
    order = {node: i for i, node in enumerate(graph.nodes)}
    last = max(inputs, key=order.__getitem__)
    outputs = [named[region.output]]
    if region.state_output is not None:
        outputs.append(named[region.state_output])
    first_use = min((order[u] for out in outputs for u in out.users), default=len(order))
    if order[last] >= first_use:
        raise RuntimeError(f"cannot place the rtp op for {region.where}: inputs follow a use")
    # NOTE: where the region computed its first output, not right after the last input: an
    # in-place write to an input between the two (a mask fixed with ``m.mul_``, ``D[...] = 0``)
    # happened before eager read it, so the op must read it after too
    anchor = min(outputs, key=order.__getitem__)
    place = graph.inserting_before(anchor) if order[last] < order[anchor] else None
    with place or graph.inserting_after(last):
        call = graph.call_function(rtp_retention, args)
    with graph.inserting_after(call):
        results = [graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
    # NOTE: no fake propagation here: AOTAutograd retraces the graph with its own fake inputs,
    # and propagating symbolic shapes through the glue cost ~1 s per region for nothing.
    if keep:
        return results
    for out, result in zip(outputs, results, strict=True):
        # NOTE: example_value too: AOTAutograd's cache treats a method call on a node without
        # one as a call on a non-tensor and bypasses the cache (every warm start recompiled)
        result.meta.update(
            {k: v for k, v in out.meta.items() if k in ("stack_trace", "example_value")}
        )
        out.replace_all_uses_with(result)
        renamed[out.name] = result
    _erase_unused(graph, [named[n] for n in region.nodes])
    return results


def _erase_unused(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    for node in reversed(nodes):
        if not node.users and node.op != "placeholder":
            graph.erase_node(node)


def _op_node(graph: fx.Graph, region: Region) -> fx.Node:
    return next(n for n in graph.nodes if n.name == region.nodes[0])


def _set_op_arg(node: fx.Node, name: str, value) -> bool:
    """Set argument ``name`` of an rtp op call node, found by the op's schema (positional or
    keyword, as the call was written); returns whether it changed."""
    at = [a.name for a in op_schema(node.target).arguments].index(name)
    if len(node.args) > at:
        if node.args[at] is value or node.args[at] == value:
            return False
        node.args = (*node.args[:at], value, *node.args[at + 1 :])
    elif name in node.kwargs and node.kwargs[name] == value:
        return False
    else:
        node.kwargs = {**node.kwargs, name: value}
    return True


def drop_unread_state(graph: fx.Graph, region: Region) -> bool:
    """An rtp op call already in the graph whose final state nothing reads (e.g.
    ``o, _ = ops.retention_chunkwise(...)``) is asked for none: the state is then neither
    computed nor saved (``output_final_state=False``). Returns whether the call changed. Only
    calls whose every user is a ``getitem`` qualify (a user of the whole tuple might read it)."""
    node = _op_node(graph, region)
    users = list(node.users)
    if not all(u.target is operator.getitem for u in users):
        return False
    if any(u.args[1] != 0 and u.users for u in users):  # NOTE: != 0: also -1 or a slice
        return False
    return _set_op_arg(node, "output_final_state", False)


def set_runtime_options(graph: fx.Graph, region: Region, text: str) -> None:
    """An rtp op call already in the graph runs with the backend's run-time options (``text``,
    ``options.runtime_text``): its ``runtime_options`` argument, which its backward inherits."""
    _set_op_arg(_op_node(graph, region), "runtime_options", text)


def rtp_decay(masks, axes, q_dtype: torch.dtype, want_row_scale: bool, detached=()):
    """``_decay`` of a region inside a checkpoint's body, computed before the checkpoint call:
    (gamma, row scale or None). T is the masks' broadcast length. ``detached``: per mask, True
    when the body built it without gradient (under ``torch.no_grad()``)."""
    cuts = detached or [False] * len(masks)
    masks = [m.detach() if cut else m for m, cut in zip(masks, cuts, strict=True)]
    t = 1
    for mask, dims in zip(masks, axes, strict=True):
        shape = _broadcast_shape(mask, dims)
        t = torch.sym_max(t, torch.sym_max(shape[-1], shape[-2]))  # NOTE: no guard on T
    like = masks[0].new_empty((t, 0), dtype=q_dtype)
    return _decay(masks, "mul", axes, like, want_row_scale)


def _broadcast_shape(mask: torch.Tensor, dims) -> list:
    shape = list(mask.shape)
    for dim in dims:
        shape.insert(dim if dim >= 0 else len(shape) + dim + 1, 1)
    return [1] * (2 - len(shape)) + shape


def _hoisted(gm: fx.GraphModule, call: fx.Node, body: fx.GraphModule, region: Region) -> Region:
    """The region with its gamma and row scale read before the checkpoint ``call`` and passed
    into ``body`` (new operands), when its masks can be built there; else as it is.

    NOTE: read inside the body, they are recomputed in the backward from the mask's nodes, and
    AOTAutograd's CSE merges two bodies' identical T-only mask nodes (``arange``, ``i - j``),
    which its partitioner then saves whole ([T, T]) for the later body's recompute. Read
    before the call, only gamma [H] and the row scale [H, T] cross into the body."""
    if region.native or region.mask_kind != "mul" or region.normaliser == "sum_abs":
        return region
    named = {node.name: node for node in body.graph.nodes}
    masks = [named[m] for m in region.masks]
    q_value = named[region.q.node].meta.get("example_value")
    if not masks or not isinstance(q_value, torch.Tensor):
        return region
    needed: set[fx.Node] = set()
    stack = list(masks)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    if any(n.op not in ("placeholder", "call_function", "call_method") for n in needed):
        return region
    if any(isinstance(n.target, torch._ops.HigherOrderOperator) for n in needed):
        return region
    if writers(needed):  # NOTE: the copy would miss them (``m.mul_(t)`` after ``m = ...``)
        return region
    # NOTE: a mask that takes a gradient (a learnable decay) would be built outside the
    # checkpoint, and autograd would save its [H, T, T] intermediates there for the backward
    if any(getattr(m.meta.get("example_value"), "requires_grad", False) for m in masks):
        return region
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    operands = call.args[1:]
    env = {p: operands[i] for i, p in enumerate(placeholders)}
    graph = gm.graph
    with graph.inserting_before(call):
        for node in body.graph.nodes:
            if node in needed and node.op != "placeholder":
                env[node] = graph.node_copy(node, env.__getitem__)
        # NOTE: the copy runs outside the body's grad-mode switches: a mask built without
        # gradient (its example value needs none) gives none to what it was built from
        detached = tuple(
            not getattr(m.meta.get("example_value"), "requires_grad", True) for m in masks
        )
        args = (
            [env[m] for m in masks], region.mask_axes, q_value.dtype, bool(region.row_scale),
            detached,
        )  # fmt: skip
        read = graph.call_function(rtp_decay, args)
        wanted = ("gamma", "row")[: 1 + bool(region.row_scale)]
        values = [graph.call_function(operator.getitem, (read, i)) for i in range(len(wanted))]
    call.args = (*call.args, *values)
    names = []
    for what in wanted:
        with body.graph.inserting_after(placeholders[-1]):
            placeholders.append(body.graph.placeholder(f"rtp_{what}_{region.output}"))
        names.append(placeholders[-1].name)
    return dataclasses.replace(region, masks=tuple(names), mask_kind="given", mask_axes=())


def _body_of(node: fx.Node, hop: str) -> str | None:
    """The body attribute a call of the higher-order op named ``hop`` runs, or None."""
    name = getattr(node.target, "name", None)
    if node.op != "call_function" or not callable(name) or not node.args or name() != hop:
        return None
    return getattr(node.args[0], "target", None)


def own_body(gm: fx.GraphModule, attr: str) -> fx.GraphModule:
    """The body ``gm.<attr>`` of a higher-order op as a copy that ``gm`` now holds instead, so
    rewriting it leaves the graph ``gm`` was copied from as it was."""
    original = getattr(gm, attr)
    body = copy_graph_module(original)
    body.meta.update(original.meta)  # NOTE: a nested compile region's options may live here
    setattr(gm, attr, body)
    return body


def _rename_subgraph(gm: fx.GraphModule, attr: str, path: str) -> None:
    """Give the nested compile region calls of the rewritten body ``gm.<attr>`` an identifier of
    its own (``path``: the attributes leading to it from the top graph).

    NOTE: AOTAutograd traces each ``invoke_subgraph`` identifier once and reuses the trace for
    every call with that identifier. Dynamo gives one function one identifier wherever it is
    called (at the top level and inside a checkpoint's body, say), so a body rewritten in one
    place would otherwise run in the others too, where its regions may have been declined."""
    for node in gm.graph.nodes:
        if _body_of(node, "invoke_subgraph") == attr and len(node.args) > 1:
            node.args = (node.args[0], f"{node.args[1]}_rtp_{path}", *node.args[2:])


def one_step_in(regions: list[Region]) -> dict[str, list[Region]]:
    """The claimed regions inside bodies, per higher-order op call they sit under (the first
    name of their ``scope``), with that name taken off their scope."""
    inner: dict[str, list[Region]] = {}
    for region in regions:
        if region.claimed and region.scope:
            rest = dataclasses.replace(region, scope=region.scope[1:])
            inner.setdefault(region.scope[0], []).append(rest)
    return inner


def _by_body(gm: fx.GraphModule, regions: list[Region]) -> dict[str, list[Region]]:
    """``one_step_in`` per body attribute instead of per call: the calls of a nested compile
    region share one body, which is rewritten once (with the row scale if any call needs it)."""
    named = {node.name: node for node in gm.graph.nodes}
    inner: dict[str, dict[tuple, Region]] = {}
    for call, found in one_step_in(regions).items():
        merged = inner.setdefault(named[call].args[0].target, {})
        for rest in found:
            key = (rest.scope, rest.output)
            if key in merged:
                row_scale = merged[key].row_scale or rest.row_scale
                rest = dataclasses.replace(merged[key], row_scale=row_scale)
            merged[key] = rest
    return {name: list(merged.values()) for name, merged in inner.items()}


def rewrite(
    gm: fx.GraphModule,
    regions: list[Region],
    form: str = "auto",
    chunk_size: int = 0,
    runtime_options: str = "",
    _path: str = "",
):
    """Rewrite every claimed region of ``gm`` in place; returns ``gm``. ``runtime_options``
    (``options.runtime_text``): the run-time options every rtp op call of the graph carries.
    A region inside a checkpoint's or nested compile region's body (``Region.scope``) is
    rewritten in a copy of the body that replaces it in ``gm``."""
    for attr, found in _by_body(gm, regions).items():
        body = own_body(gm, attr)
        _rename_subgraph(gm, attr, f"{_path}{attr}")
        calls = [n for n in gm.graph.nodes if _body_of(n, "tag_activation_checkpoint") == attr]
        if len(calls) == 1:  # NOTE: one call (a shared body would need every call's operands)
            found = [r if r.scope else _hoisted(gm, calls[0], body, r) for r in found]
        # NOTE: "_", not ".": AOTAutograd registers the identifier as a module name
        rewrite(body, found, form, chunk_size, runtime_options, f"{_path}{attr}_")
    for region in regions:
        if region.scope:
            continue
        if region.claimed and region.native:
            drop_unread_state(gm.graph, region)
            if runtime_options:
                set_runtime_options(gm.graph, region, runtime_options)
        elif region.claimed:
            rewrite_region(gm, region, form, chunk_size, runtime_options=runtime_options)
    # NOTE: nodes in a graph's meta make it cyclic, which Inductor's cache key cannot pickle
    gm.meta.pop("rtp_renamed", None)
    gm.graph.lint()
    gm.recompile()
    return gm
