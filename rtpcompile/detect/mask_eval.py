"""Re-run a mask's subgraph with real constants at another sequence length.

A claimed region's mask is built from constants, buffers, parameters and sizes (provenance is
checked in mask_provenance.py). ``evaluate`` replays exactly the nodes that compute it -- in-place
writes before its first use included (``subgraph``) -- with the symbol of T replaced by a
chosen length and every other symbolic size at its example value, so the proof can fit the
decay at several lengths without the example inputs.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .graph_view import GraphView, example, is_tensor, target_name
from .mutation import root_of, writers
from .region_checks import grad_modes

_PRIME = 7
MAX_SYMBOLIC_T = 1024


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


def _hints(shape_env) -> dict:
    """The example value of every backed symbol (the attribute was renamed in torch 2.13)."""
    return getattr(shape_env, "backed_var_to_val", None) or shape_env.var_to_val


class Sizes:
    """Concrete values of symbolic sizes with the sequence length replaced by ``t``.

    T may be a symbol (``s0``) or an expression of one (``s0 - 1`` after ``q[..., 1:, :]``):
    ``symbol`` is then the symbol T varies with, set to the value that makes T equal ``t``
    (every other symbol keeps its example value). ``t`` must be attainable (``attainable``).
    """

    def __init__(self, seq, t: int):
        self.t = t
        self.symbol = None
        self.shape_env = None
        self._expr = None
        self._symbol_value: int | None = None
        if isinstance(seq, torch.SymInt):
            expr = seq.node.expr
            self.shape_env = seq.node.shape_env
            # NOTE: several symbols (``s0 + s1``): T varies with the first, the rest stay fixed
            free = sorted(expr.free_symbols, key=str)
            self.symbol = free[0] if free else None
            self._expr = expr

    def _length_at(self, value: int) -> int:
        """T when the symbol takes ``value`` (every other symbol at its example value)."""
        repl = {s: _hints(self.shape_env).get(s, s) for s in self._expr.free_symbols}
        repl[self.symbol] = value
        return int(self._expr.xreplace(repl))

    def _solve(self, t: int) -> int | None:
        """The smallest symbol value at which T >= t (T grows with its symbol), or None."""
        hi = 1
        try:
            while self._length_at(hi) < t:
                hi *= 2
                if hi > 2**40:
                    return None
            lo = 0
            while lo < hi:
                mid = (lo + hi) // 2
                if self._length_at(mid) >= t:
                    hi = mid
                else:
                    lo = mid + 1
        except (TypeError, ValueError, ZeroDivisionError):
            return None
        return lo

    def attainable(self, t: int) -> int | None:
        """The smallest length >= ``t`` that T takes for some value of its symbol (``t`` itself
        for a bare symbol), or None."""
        if self.symbol is None:
            return None
        value = self._solve(t)
        return None if value is None else self._length_at(value)

    def _value_of_symbol(self) -> int:
        if self._symbol_value is None:
            value = self._solve(self.t)
            if value is None or self._length_at(value) != self.t:
                raise ValueError(f"the sequence length {self._expr} never equals {self.t}")
            self._symbol_value = value
        return self._symbol_value

    def _substituted(self, sym):
        """A SymInt/SymFloat's expression with T's symbol at this length, the rest at examples."""
        expr = sym.node.expr
        repl = {s: _hints(sym.node.shape_env).get(s, s) for s in expr.free_symbols}
        if self.symbol is not None and self.symbol in repl:
            repl[self.symbol] = self._value_of_symbol()
        return expr.xreplace(repl)

    def value(self, size) -> int:
        if not isinstance(size, torch.SymInt):
            return int(size)
        return int(self._substituted(size))

    def example_length(self) -> int:
        """T at the example call (every symbol at its example value)."""
        repl = {s: _hints(self.shape_env).get(s, s) for s in self._expr.free_symbols}
        return int(self._expr.xreplace(repl))

    def scalar(self, value):
        if isinstance(value, torch.SymInt):
            return self.value(value)
        if isinstance(value, torch.SymFloat):
            return float(self._substituted(value))
        return value


def evaluate(
    view: GraphView,
    masks: list[fx.Node],
    inputs: list,
    sizes: Sizes,
    perturb: torch.Generator | None = None,
    move_state: bool = False,
    hook=None,
    leaves: dict | None = None,
    entry: bool = True,
) -> list:
    """Run the mask subgraphs with real constants, T := sizes.t; returns the mask values.

    ``perturb``: trainable parameters take other values (see ``_moved``), as training would
    give them; with ``move_state``, every floating tensor input does (model state a later
    ``load_state_dict`` or ``copy_`` may change). ``hook(node, value) -> value``: sees (and may
    replace) every computed value, graph inputs excepted. ``leaves``: a dict that receives the
    trainable inputs as fresh leaves requiring grad (by node name), and every node then runs in
    the grad mode the graph gives it (``region_checks.grad_modes`` from ``entry``, the mode the
    graph was entered with), so the masks carry eager's gradient (the caller enables grad)."""
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
    modes = grad_modes(view, entry) if leaves is not None else {}
    for step, node in enumerate(order):
        if node.op == "placeholder":
            value = inputs[index[node]]
            env[node] = value.detach().clone() if is_tensor(value) else sizes.scalar(value)
            movable = is_tensor(value) and (value.requires_grad or move_state)
            if perturb is not None and movable:
                env[node] = _moved(env[node], perturb)
            if isinstance(value, torch.SymInt) or isinstance(example(node), torch.SymInt):
                env[node] = sizes.value(example(node))
            elif leaves is not None and trainable(value):
                env[node] = leaves[node.name] = env[node].requires_grad_()
            continue
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if modes:  # NOTE: only for the gradient check; the value proof runs under no_grad
            with torch.set_grad_enabled(modes.get(node, True)):
                env[node] = _run(view.gm, node, args, kwargs)
        else:
            env[node] = _run(view.gm, node, args, kwargs)
        if hook is not None:
            env[node] = hook(node, env[node])
        del args, kwargs
        for arg in node.all_input_nodes:
            if last_read.get(arg) == step and arg not in outputs and arg in needed:
                del env[arg]
    return [env[mask] for mask in masks]


def trainable(value) -> bool:
    """A graph input that training changes: a floating tensor requiring grad."""
    return is_tensor(value) and value.requires_grad and value.is_floating_point()


def _moved(value: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each element times a random factor in [0.9, 0.99); an element that this barely moves
    (below 1e-3 s in magnitude, zero included, with s the tensor's largest magnitude or 1,
    whichever is larger) is also lowered by a random 0.02 s to 0.05 s.

    NOTE: a product alone leaves a zero-initialised table (``decay + self.bias``, ``decay *
    (1 + self.delta)``) at 0, where it looks constant: the offset moves it as training would.
    It is a decrease, so a learnable decay (a direct gamma, a log-decay correction) stays a
    decay and is not refused for gamma > 1."""
    if not value.is_floating_point():
        return value
    x = value.double().cpu()
    factor = torch.rand(x.shape, generator=gen, dtype=torch.float64) * 0.09 + 0.9
    scale = max(1.0, float(x.abs().amax())) if x.numel() else 1.0
    offset = (torch.rand(x.shape, generator=gen, dtype=torch.float64) * 0.03 + 0.02) * scale
    moved = x * factor - torch.where(x.abs() < 1e-3 * scale, offset, 0.0)
    return moved.to(device=value.device, dtype=value.dtype)


def _stand_in(node: fx.Node, sizes: Sizes):
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
    """The sequence lengths the proof evaluates at (only the example one for a static T).

    With a symbolic T: 1, 2, a prime and the example length (capped), each moved up to the
    nearest length T can take (``2 * s0`` is never odd)."""
    hint = Sizes(seq, 0)
    if hint.symbol is None:
        return [hint.value(seq)]
    t_example = hint.example_length()
    # NOTE: with a symbolic T every length runs the same program, so a long example length is
    # capped: proving at T = 65536 would build several 16 GiB masks for no extra certainty
    wanted = {1, 2, min(_PRIME, t_example), min(t_example, MAX_SYMBOLIC_T)}
    found = {hint.attainable(t) for t in wanted}
    return sorted(t for t in found if t is not None and t <= max(t_example, MAX_SYMBOLIC_T))


def proof_bytes(
    view: GraphView, masks: list[fx.Node], sizes: Sizes, constants_only: bool = False
) -> int:
    """Estimated peak bytes of evaluating and fitting the masks at length ``sizes.t``
    (``constants_only``: of the graph inputs the mask reads alone, whatever the length).

    NOTE: evaluate() frees each intermediate after its last reader, so about three of the
    largest tensors of the subgraph (an op's inputs and output, then the mask and a fit block)
    are alive at once.
    """
    largest = 0
    for mask in masks:
        values, _, _ = subgraph(view, mask)
        for node in values | {mask}:
            value = example(node)
            if is_tensor(value) and (node.op == "placeholder" or not constants_only):
                numel = 1
                for size in value.shape:
                    numel *= sizes.value(size)
                largest = max(largest, numel * max(value.element_size(), 4))
    return 3 * largest
