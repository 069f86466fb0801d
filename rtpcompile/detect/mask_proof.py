"""Prove that a mask is a causal decay: ``M[h, i, j] = c[h, i] * gamma_h ** (i - j) * [i >= j]``.

The proof has two halves:
1. *Provenance.* The mask's value ancestors may only be constants, module buffers/parameters/
   attributes (``is_constant_source``) and sizes; an activation read for its values (a data-
   dependent gate, a padding mask) or a random op declines the region. Activations read only
   for their shape/dtype/device (``x.size(1)``, ``type_as(x)``, ``ones_like(x)``) are fine.
2. *Values.* The mask subgraph is re-run on the real buffer values at several sequence lengths
   (1, 2, a prime, the example length -- capped at 1024 when T is symbolic: the symbol of T is
   substituted, every other size keeps its example value) and fitted: zeros above the diagonal,
   positive diagonal c[h, i], and
   ``M[h, i, j] / M[h, i, i] == gamma_h ** (i - j)`` below it.
Nothing is frozen from this evaluation: the rewritten graph recomputes gamma and c from the
same mask nodes at run time (see rewrite.py); the values here only feed explain().
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .graph_view import (
    GraphView,
    example,
    is_constant_source,
    is_input_attribute,
    is_random,
    is_tensor,
    target_name,
)
from .mutation import root_of, writers

_PRIME = 7
_MAX_SYMBOLIC_T = 1024


@dataclasses.dataclass(frozen=True)
class Proof:
    """The verdict on one region's mask: ``reason`` None means proven."""

    reason: str | None
    gamma: tuple[float, ...] = ()
    row_scale: bool = False


def subgraph(view: GraphView, mask: fx.Node) -> tuple[set[fx.Node], set[fx.Node], str | None]:
    """(value nodes, metadata-only nodes, reason) of what computes ``mask``, the in-place writes
    to it or its ancestors before the mask is used included (``D[D != D] = 0`` builds a mask
    too: the proof replays them in graph order). A write to a graph input (model state changed
    in place), or one after the mask is first used, is the reason to decline."""
    values, meta = view.data_ancestors(mask)
    values = values | {mask}
    written: list[tuple[fx.Node, fx.Node]] = []
    while new := [(w, a) for w, a in writers(values) if w not in values]:
        for writer, alias in new:
            if root_of(alias).op == "placeholder":
                return values, meta, f"{alias.name} ({target_name(writer)}) changes a graph input"
            more, reads = view.data_ancestors(writer)
            values |= more | {writer}
            meta |= reads
        written += new
    # NOTE: the mask's first use outside what builds it (``mask != mask`` feeding a write is not)
    limit = min((view.order[u] for u in mask.users if u not in values), default=len(view.order))
    for writer, alias in written:
        if view.order[writer] > limit:
            return values, meta, f"{alias.name} ({target_name(writer)}) after the mask's use"
    return values, meta - values, None


def check_provenance(view: GraphView, masks: list[fx.Node]) -> str | None:
    """None when every mask depends only on constants, buffers and sizes; else the reason."""
    for mask in masks:
        values, _, written = subgraph(view, mask)
        if written is not None:
            return f"the mask or what it is built from is written in place: {written}"
        for node in view.sorted(values):
            if is_random(node):
                return f"the mask is random ({node.name})"
            if node.op == "placeholder" and is_tensor(example(node)):
                # NOTE: an attribute of a call argument (``batch.mask``) changes with the call
                if not is_constant_source(node) or is_input_attribute(node):
                    return f"the mask depends on activations (input {node.name!r})"
    return None


_CUTOFF_OPS = {
    "lt", "le", "gt", "ge", "eq", "ne", "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__",
    "clamp", "clamp_max", "clamp_min", "clip", "minimum", "maximum", "tril", "triu", "fmin", "fmax",
    "mod", "remainder", "fmod", "floordiv", "floor_divide", "__mod__", "__floordiv__",
}  # fmt: skip


# Ops that keep a position a position (``(i - j).float() * 2``); exp, pow, log, sums do not.
_POSITION_OPS = {
    "sub", "add", "neg", "mul", "abs", "to", "float", "double", "long", "int", "type_as",
    "getitem", "unsqueeze", "view", "reshape", "expand", "transpose", "permute", "__getitem__",
    "clamp", "clamp_min", "clamp_max", "__sub__", "__add__", "__rsub__", "__neg__",
}  # fmt: skip


def _reads_positions(node: fx.Node) -> bool:
    """A tensor argument of ``node`` is a position (``arange``, or integers, or a linear
    function of one): a comparison or clamp with a constant there is a window. A clamp of a
    decay, a normaliser or a temperature is not."""
    todo = [a for a in node.all_input_nodes if is_tensor(example(a))]
    seen: set[fx.Node] = set()
    while todo:
        arg = todo.pop()
        if arg in seen:
            continue
        seen.add(arg)
        value = example(arg)
        if target_name(arg) == "arange" or (
            is_tensor(value) and not (value.is_floating_point() or value.dtype == torch.bool)
        ):
            return True
        if arg.op in ("call_function", "call_method") and target_name(arg) in _POSITION_OPS:
            todo += [a for a in arg.all_input_nodes if is_tensor(example(a))]
    return False


def position_cutoff(view: GraphView, masks: list[fx.Node]) -> str | None:
    """Why a mask is not provable for every length of a symbolic T: it compares (or clamps) with a
    number other than 0 -- ``i - j < W``, ``clamp(max=W)``, ``triu(diagonal=-W)``: a window the
    proof, which evaluates a few lengths, would miss once T grows past it. None otherwise."""
    for mask in masks:
        values, _, _ = subgraph(view, mask)
        for node in view.sorted(values | {mask}):
            if node.op not in ("call_function", "call_method"):
                continue
            if target_name(node) not in _CUTOFF_OPS or not _reads_positions(node):
                continue
            # NOTE: triu(diagonal=1) is the complement of tril() (a causal mask); tril(-1) is
            # declined with its own reason
            allowed = (0, 1, -1) if target_name(node) in ("tril", "triu") else (0,)
            numbers = [
                a
                for a in (*node.args, *node.kwargs.values())
                if isinstance(a, (int, float)) and not isinstance(a, bool) and a not in allowed
            ]
            if numbers:
                return (
                    f"the mask compares positions with {numbers[0]} ({target_name(node)}): a "
                    "window the proof cannot check at every length of a dynamic T (compile "
                    "with a static sequence length to prove it at that length)"
                )
    return None


def trainable_inputs(view: GraphView, masks: list[fx.Node], inputs: list) -> list[str]:
    """The mask's ancestors that are trainable parameters (graph inputs requiring grad)."""
    index = {node: i for i, node in enumerate(view.placeholders)}
    found = []
    for mask in masks:
        values, _, _ = subgraph(view, mask)
        for node in view.sorted(values | {mask}):
            value = inputs[index[node]] if node in index and index[node] < len(inputs) else None
            if is_tensor(value) and value.requires_grad and value.is_floating_point():
                found.append(node.name)
    return sorted(set(found))


def _hints(shape_env) -> dict:
    """The example value of every backed symbol (the attribute was renamed in torch 2.13)."""
    return getattr(shape_env, "backed_var_to_val", None) or shape_env.var_to_val


class _Sizes:
    """Concrete values of symbolic sizes with the sequence length replaced by ``t``."""

    def __init__(self, seq, t: int):
        self.t = t
        self.symbol = None
        self.shape_env = None
        if isinstance(seq, torch.SymInt):
            expr = seq.node.expr
            self.shape_env = seq.node.shape_env
            self.symbol = expr if expr.is_Symbol else None

    def value(self, size) -> int:
        if not isinstance(size, torch.SymInt):
            return int(size)
        expr = size.node.expr
        env = size.node.shape_env
        repl = {s: _hints(env).get(s, s) for s in expr.free_symbols}
        if self.symbol is not None and self.symbol in repl:
            repl[self.symbol] = self.t
        return int(expr.xreplace(repl))

    def scalar(self, value):
        if isinstance(value, torch.SymInt):
            return self.value(value)
        if isinstance(value, torch.SymFloat):
            expr = value.node.expr
            env = value.node.shape_env
            return float(expr.xreplace({s: _hints(env).get(s, s) for s in expr.free_symbols}))
        return value


def evaluate(
    view: GraphView,
    masks: list[fx.Node],
    inputs: list,
    sizes: _Sizes,
    perturb: torch.Generator | None = None,
) -> list:
    """Run the mask subgraphs with real constants, T := sizes.t; returns the mask values.

    ``perturb``: trainable parameters take other values (each element times a random factor in
    [0.9, 0.99)), as training would give them."""
    needed: set[fx.Node] = set(masks)
    meta: set[fx.Node] = set()
    for mask in masks:
        values, reads, _ = subgraph(view, mask)
        needed |= values
        meta |= reads
    env: dict[fx.Node, object] = {}
    index = {node: i for i, node in enumerate(view.placeholders)}
    for leaf in meta - needed:
        env[leaf] = _stand_in(leaf, sizes)
    order = view.sorted(needed)
    # NOTE: drop each intermediate after its last reader, so a mask built at the example length
    # (T x T per op) holds a couple of T x T tensors at once, not one per node of its subgraph
    last_read: dict[fx.Node, int] = {}
    for step, node in enumerate(order):
        for arg in node.all_input_nodes:
            last_read[arg] = step
    outputs = set(masks)
    for step, node in enumerate(order):
        if node.op == "placeholder":
            value = inputs[index[node]]
            env[node] = value.detach().clone() if is_tensor(value) else sizes.scalar(value)
            if perturb is not None and is_tensor(value) and value.requires_grad:
                env[node] = _moved(env[node], perturb)
            if isinstance(value, torch.SymInt) or isinstance(example(node), torch.SymInt):
                env[node] = sizes.value(example(node))
            continue
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        env[node] = _run(view.gm, node, args, kwargs)
        del args, kwargs
        for arg in node.all_input_nodes:
            if last_read.get(arg) == step and arg not in outputs and arg in needed:
                del env[arg]
    return [env[mask] for mask in masks]


def _moved(value: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if not value.is_floating_point():
        return value
    factor = torch.rand(value.shape, generator=gen, dtype=torch.float64) * 0.09 + 0.9
    return (value.double() * factor.to(value.device)).to(value.dtype)


def _stand_in(node: fx.Node, sizes: _Sizes):
    """A zero tensor with the node's dtype/device and its shape at length t (metadata reads)."""
    value = example(node)
    if is_tensor(value):
        shape = [sizes.value(s) for s in value.shape]
        return torch.zeros(shape, dtype=value.dtype, device=value.device)
    return sizes.scalar(value)


def _run(gm: fx.GraphModule, node: fx.Node, args, kwargs):
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "get_attr":
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part)
        return value
    raise ValueError(f"cannot evaluate node {node.name} ({node.op})")


def lengths_for(seq) -> list[int]:
    """The sequence lengths the proof evaluates at (only the example one for a static T)."""
    hint = _Sizes(seq, 0)
    t_example = hint.value(seq) if hint.symbol is None else int(_hints(hint.shape_env)[hint.symbol])
    if hint.symbol is None:
        return [t_example]
    # NOTE: with a symbolic T every length runs the same program, so a long example length is
    # capped: proving at T = 65536 would build several 16 GiB masks for no extra certainty
    return sorted({1, 2, min(_PRIME, t_example), min(t_example, _MAX_SYMBOLIC_T)})


def _row_blocks(heads: int, t: int):
    """Row ranges of [heads, rows, t] slices of about 64 Ki elements (temporaries stay in L2)."""
    rows = max(1, (1 << 16) // max(1, heads * t))
    return [(r, min(t, r + rows)) for r in range(0, t, rows)]


def fit_decay(m: torch.Tensor, t: int, rtol: float) -> tuple[str | None, torch.Tensor, bool]:
    """Fit [heads, t, t] to c[h,i] gamma_h^(i-j) [i>=j]: (reason, gamma, has_row_scale).

    NOTE: one pass over blocks of rows in the mask's own precision (float32 at least), so a long
    example length (T = 16384) needs a few MiB, not T x T float64 copies. The expected values
    are never exponentiated per element: gamma^(i-j) [i>=j] is a Toeplitz matrix, read as a
    strided view of one row of 2t-1 powers (see ``_toeplitz_rows``).
    """
    m = m.detach().cpu()
    dtype = torch.float64 if m.dtype == torch.float64 else torch.float32
    heads = m.shape[0]
    gamma = torch.ones(heads, dtype=torch.float64)
    diag = m.diagonal(dim1=-2, dim2=-1).double()
    if not (diag > 0).all():
        if (m.abs().amax() > 0) and (torch.triu(m[:, : min(t, 64)], diagonal=1) != 0).any():
            return "the mask is not causal (non-zero above the diagonal)", gamma, False
        return "the mask's diagonal is not positive (not a decay)", gamma, False
    if t >= 2:
        gamma = m[:, 1, 0].double() / m[:, 1, 1].double()
    # NOTE: strictly <= 1, as the op checks at run time (a proof that let 1 + 1e-6 through would
    # compile a model the op then refuses)
    if (gamma > 1).any() or not (gamma > 0).all():
        if bool((torch.triu(m[:, : min(t, 64)], diagonal=1) == 0).all()):
            return f"decay outside (0, 1]: gamma={gamma.tolist()}", gamma, False
        return "the mask is not causal (non-zero above the diagonal)", gamma, False
    c = diag.to(dtype)
    table = _power_table(torch.log(gamma).to(dtype), t)
    for r0, r1 in _row_blocks(heads, t):
        # |m - c E| <= rtol c E + 1e-6 c, divided by c > 0; E = gamma^(i-j) [i >= j]
        expected = _toeplitz_rows(table, t, r0, r1)
        err = (m[:, r0:r1].to(dtype) / c[:, r0:r1, None]).sub_(expected).abs_()
        if (err > expected.mul_(rtol).add_(1e-6)).any():
            above = torch.triu(m[:, r0:r1], diagonal=r0 + 1)
            if (above.abs() > 1e-6 * c[:, r0:r1, None]).any():
                return "the mask is not causal (non-zero above the diagonal)", gamma, False
            return "the mask is not gamma**(i-j) below the diagonal", gamma, False
    row_scale = bool(((diag - 1).abs() > 1e-6).any())
    return None, gamma.clamp(max=1.0), row_scale


def _power_table(log_gamma: torch.Tensor, t: int) -> torch.Tensor:
    """[heads, 2t-1]: entry s is gamma^(t-1-s) for s < t, else 0 (the region above the diagonal)."""
    exponents = torch.arange(t - 1, -1, -1, dtype=log_gamma.dtype)
    powers = torch.exp(log_gamma[:, None] * exponents)
    return torch.cat([powers, powers.new_zeros(powers.shape[0], t - 1)], dim=1)


def _toeplitz_rows(table: torch.Tensor, t: int, r0: int, r1: int) -> torch.Tensor:
    """Rows r0..r1 of E[h, i, j] = gamma_h^(i-j) [i >= j], as a fresh tensor.

    With rows counted from the bottom (i' = t-1-i), E[h, i, j] = table[h, i' + j]: a view with
    strides (2t-1, 1, 1) holds every row; flipping the block back copies it once.
    """
    heads = table.shape[0]
    bottom_up = table.as_strided((heads, r1 - r0, t), (2 * t - 1, 1, 1), t - r1)
    return bottom_up.flip(1)


def prove(
    view: GraphView,
    masks: list[fx.Node],
    transform,
    inputs: list,
    seq,
    batch_ndim: int,
) -> Proof:
    """Provenance and value proof for the masks of one region.

    ``transform(values) -> tensor`` combines the evaluated mask nodes into the [.., t, t] mask
    multiplied into the scores (unsqueezes, products, ``~cond`` for masked_fill ...).
    """
    reason = check_provenance(view, masks)
    if reason is None and _Sizes(seq, 0).symbol is not None:
        reason = position_cutoff(view, masks)
    if reason is not None:
        return Proof(reason)
    # NOTE: a trainable parameter in the mask will change: the structure must hold for other
    # values too (a learnable decay keeps it; a learned per-distance table does not). The
    # rewrite reads gamma and the diagonal from the mask at run time, so a diagonal that other
    # values move off 1 (a per-head temperature) is folded as a row scale.
    trainable = trainable_inputs(view, masks, inputs)
    proof = Proof("the mask could not be evaluated")
    row_scale = False
    for t in lengths_for(seq):
        sizes = _Sizes(seq, t)
        need, budget = proof_bytes(view, masks, sizes), proof_budget()
        if need > budget:
            gib = f"{need / 2**30:.2g} GiB (budget {budget / 2**30:.2g} GiB, RTP_PROOF_MAX_GB)"
            return Proof(
                f"proving the mask at T={t} needs about {gib}; raise the budget, or compile with "
                "dynamic=True (or torch._dynamo.mark_dynamic on the sequence dim): it is then "
                f"proven at T <= {_MAX_SYMBOLIC_T}"
            )
        for perturb in (None, torch.Generator().manual_seed(t)) if trainable else (None,):
            reason, gamma, scaled = _fit_at(
                view, masks, transform, inputs, sizes, batch_ndim, perturb
            )
            if reason is not None and perturb is not None:
                reason = (
                    f"{reason} once the trainable {', '.join(trainable)} change (the mask must be "
                    "a decay for any of their values)"
                )
            if reason is not None:
                return Proof(reason)
            row_scale = row_scale or scaled
            if perturb is None:
                proof = Proof(None, tuple(float(g) for g in gamma), row_scale)
    if proof.reason is None and _Sizes(seq, 0).symbol is not None:
        reason, scaled = _prove_long(view, masks, transform, inputs, seq, batch_ndim)
        if reason is not None:
            return Proof(reason)
        row_scale = row_scale or scaled
    return dataclasses.replace(proof, row_scale=row_scale) if proof.reason is None else proof


def _long_lengths(view: GraphView, masks: list[fx.Node], seq) -> list[int]:
    """Lengths past the example one where a symbolic T's mask is checked once more: the sizes
    of the constant tensors the mask reads (a precomputed mask sliced to T runs only up to its
    own length), longest first, then the cap."""
    t_example = lengths_for(seq)[-1]
    sizes = set()
    for mask in masks:
        values, _, _ = subgraph(view, mask)
        for node in values:
            value = example(node)
            if node.op == "placeholder" and is_tensor(value):
                sizes |= {int(d) for d in value.shape if isinstance(d, int)}
    # NOTE: a sliced constant first (the model runs only up to its length), longest first
    longer = sorted((d for d in sizes if d > t_example and d != _MAX_SYMBOLIC_T), reverse=True)
    cap = [_MAX_SYMBOLIC_T] if t_example < _MAX_SYMBOLIC_T else []
    return longer + cap


def _prove_long(view, masks, transform, inputs, seq, batch_ndim) -> tuple[str | None, bool]:
    """(reason, row_scale) at the longest length past the example one where the mask can be
    evaluated: with a symbolic T a window (``i - j < 40`` baked into a buffer, a period) past
    the lengths proven so far would otherwise escape. No such length (or none in the budget):
    nothing more is proven."""
    for t in _long_lengths(view, masks, seq):
        sizes = _Sizes(seq, t)
        if proof_bytes(view, masks, sizes) > proof_budget():
            continue
        reason, _, scaled = _fit_at(view, masks, transform, inputs, sizes, batch_ndim, None)
        if reason is not None and ("could not be evaluated" in reason or "shape" in reason):
            continue  # NOTE: the mask does not exist at this length; try a shorter one
        if reason is not None:
            return f"{reason} (a dynamic T: the mask changes past the example length)", False
        return None, scaled
    return None, False


def _fit_at(view, masks, transform, inputs, sizes: _Sizes, batch_ndim: int, perturb):
    """(reason, gamma, row_scale) of the mask evaluated at length ``sizes.t``."""
    t = sizes.t
    try:
        with unset_fake_temporarily(), torch.no_grad():
            mask = transform(evaluate(view, masks, inputs, sizes, perturb))
    except Exception as exc:  # noqa: BLE001 - a mask we cannot evaluate is declined
        reason = f"the mask could not be evaluated at T={t} ({type(exc).__name__}: {exc})"
        return reason, None, False
    if mask.is_complex():
        return "complex-valued mask", None, False
    reason, heads = _heads(mask, t, batch_ndim)
    if reason is not None:
        return reason, None, False
    rtol = 1e-2 if mask.dtype in (torch.float16, torch.bfloat16) else 1e-3
    reason, gamma, row_scale = fit_decay(heads, t, rtol)
    return (None if reason is None else f"{reason} at T={t}"), gamma, row_scale


def proof_bytes(view: GraphView, masks: list[fx.Node], sizes: _Sizes) -> int:
    """Estimated peak bytes of evaluating and fitting the masks at length ``sizes.t``.

    NOTE: evaluate() frees each intermediate after its last reader, so about three of the
    largest tensors of the subgraph (an op's inputs and output, then the mask and a fit block)
    are alive at once.
    """
    largest = 0
    for mask in masks:
        values, _, _ = subgraph(view, mask)
        for node in values | {mask}:
            value = example(node)
            if is_tensor(value):
                numel = 1
                for size in value.shape:
                    numel *= sizes.value(size)
                largest = max(largest, numel * max(value.element_size(), 4))
    return 3 * largest


def proof_budget() -> int:
    """Bytes the proof may use: RTP_PROOF_MAX_GB, else half the RAM capped at 16 GiB."""
    env = os.environ.get("RTP_PROOF_MAX_GB")
    if env:
        try:
            gib = float(env)
        except ValueError:
            gib = math.nan
        if not (math.isfinite(gib) and gib > 0):
            raise ValueError(f"RTP_PROOF_MAX_GB must be a positive number of GiB, got {env!r}")
        return int(gib * 2**30)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # NOTE: not POSIX: assume 32 GiB
        ram = 32 * 2**30
    return min(16 * 2**30, ram // 2)


def _heads(mask: torch.Tensor, t: int, batch_ndim: int) -> tuple[str | None, torch.Tensor]:
    """Check the mask's shape [.., t, t] varies over at most the last batch dim; -> [heads,t,t]."""
    if mask.dim() < 2 or tuple(mask.shape[-2:]) != (t, t):
        return f"the mask has shape {tuple(mask.shape)}, expected [..., {t}, {t}]", mask
    batch = mask.shape[:-2]
    if len(batch) > batch_ndim:
        return "the mask has more dimensions than the scores", mask
    if any(size != 1 for size in batch[:-1]):
        return "the mask varies over a batch dimension other than the heads", mask
    return None, mask.reshape(-1, t, t)
