"""A canonical, read-only view of a Dynamo FX graph in which equivalent spellings look alike.

Every FX node gets a *kind* ("matmul", "einsum", "mul", "div", "cast", "layout", ...) so that
``@``, ``torch.matmul``, ``Tensor.matmul`` and ``bmm`` are all "matmul", ``transpose``/``permute``/
``.mT`` are all "layout", and ``.float()``/``.to()``/``type_as``/``contiguous`` are all "cast".
The view keeps a networkx DiGraph of the FX graph (edges input -> user, flagged ``meta`` when
the user only reads the input's shape, dtype or device) that the patterns search and the mask
proof walks. Nothing here mutates the graph. Where graph inputs come from is ``graph_inputs.py``,
comparing symbolic sizes ``symbolic_sizes.py`` (both re-exported here).
"""

from __future__ import annotations

import builtins
import functools
import operator
import re
from collections.abc import Iterator

import networkx as nx
import torch
import torch.fx as fx

from .graph_inputs import (
    LEAVES_BODY,
    boundary,
    is_constant_source,
    is_input_attribute,
    is_state_input,
    through_boundaries,
)
from .symbolic_sizes import assumed_equal_sizes, guard_equal, hint, same_size

__all__ = [
    "LEAVES_BODY",
    "GraphView",
    "assumed_equal_sizes",
    "boundary",
    "example",
    "guard_equal",
    "hint",
    "is_constant_source",
    "is_identity_dropout",
    "is_input_attribute",
    "is_random",
    "is_scalar",
    "is_state_input",
    "is_tensor",
    "kind_of",
    "meta_only_args",
    "ndim",
    "node_inputs",
    "same_size",
    "target_name",
    "through_boundaries",
    "where",
]

_FUNCTION_KINDS = {
    operator.matmul: "matmul",
    torch.matmul: "matmul",
    torch.bmm: "matmul",
    torch.baddbmm: "baddbmm",
    torch.einsum: "einsum",
    torch.functional.einsum: "einsum",
    operator.mul: "mul",
    operator.imul: "mul",
    torch.mul: "mul",
    operator.truediv: "div",
    operator.itruediv: "div",
    torch.div: "div",
    torch.divide: "div",
    torch.true_divide: "div",
    torch.multiply: "mul",
    operator.add: "add",
    operator.iadd: "add",
    torch.add: "add",
    torch.tril: "tril",
    torch.where: "where",
    torch.masked_fill: "masked_fill",
    torch.transpose: "layout",
    torch.permute: "layout",
    torch.sum: "sum",
    torch.abs: "abs",
    operator.neg: "neg",
    torch.neg: "neg",
    torch.negative: "neg",
    torch.clamp: "clamp",
    torch.clamp_min: "clamp",
    torch.detach: "detach",
    torch.nn.functional.dropout: "dropout",
    torch.dropout: "dropout",
    torch.unsqueeze: "unsqueeze",
    torch.softmax: "softmax",
    torch.nn.functional.softmax: "softmax",
}
_METHOD_KINDS = {
    "matmul": "matmul",
    "bmm": "matmul",
    "baddbmm": "baddbmm",
    "mul": "mul",
    "mul_": "mul",
    "multiply": "mul",
    "div": "div",
    "div_": "div",
    "divide": "div",
    "true_divide": "div",
    "add": "add",
    "add_": "add",
    "tril": "tril",
    "masked_fill": "masked_fill",
    "transpose": "layout",
    "permute": "layout",
    "sum": "sum",
    "abs": "abs",
    "neg": "neg",
    "negative": "neg",
    "clamp": "clamp",
    "clamp_min": "clamp",
    "detach": "detach",
    "float": "cast",
    "to": "cast",
    "type_as": "cast",
    "half": "cast",
    "bfloat16": "cast",
    "double": "cast",
    "contiguous": "cast",
    "clone": "cast",
    "unsqueeze": "unsqueeze",
    "softmax": "softmax",
}
# Arguments a node reads only for their metadata (shape, dtype, device), never their values.
_META_METHODS = {"size", "dim", "new_ones", "new_zeros", "new_empty", "new_full", "new_tensor"}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
_LIKE_FUNCTIONS = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like}
# (input, p, training) dropouts: the identity with training=False or p=0 (see is_identity_dropout)
_DROPOUTS = {
    torch.nn.functional.dropout, torch.nn.functional.dropout1d, torch.nn.functional.dropout2d,
    torch.nn.functional.dropout3d, torch.nn.functional.alpha_dropout,
    torch.nn.functional.feature_alpha_dropout, torch.dropout, torch.alpha_dropout,
    torch.feature_alpha_dropout, torch.feature_dropout,
}  # fmt: skip
_RANDOM_NAMES = {
    "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "bernoulli",
    "bernoulli_", "dropout", "normal", "normal_", "uniform_", "multinomial", "randperm",
    "exponential_", "native_dropout", "alpha_dropout", "feature_alpha_dropout",
}  # fmt: skip


def kind_of(node: fx.Node) -> str:
    """The canonical kind of one FX node ("other" when it plays no role in the patterns)."""
    if is_identity_dropout(node):
        return "cast"  # NOTE: the identity (eval mode, p=0): looked through like a no-op cast
    if node.op == "call_function":
        if node.target is builtins.getattr and node.args[1] in ("mT", "T"):
            return "layout"
        if node.target is operator.getitem:
            return "getitem"
        kind = _FUNCTION_KINDS.get(node.target, "other")
    elif node.op == "call_method":
        kind = _METHOD_KINDS.get(node.target, "other")
    else:
        return node.op
    if kind == "cast" and _to_integers(node):
        return "other"  # NOTE: truncates values: not a cast the patterns may look through
    if kind == "cast" and _written_in_place(node):
        # NOTE: ``m = mask.clone(); m.mul_(0.5)``: the copy's values are not its input's, so
        # the patterns must not look through it to the tensor it was copied from
        return "other"
    if kind == "div" and node.kwargs.get("rounding_mode") is not None:
        return "other"  # NOTE: floor/trunc division rounds values: not a scale
    if kind == "add" and node.kwargs.get("alpha", 1) != 1:
        return "other"  # NOTE: add(x, y, alpha=a) is x + a*y, not a plain sum
    return kind


def _written_in_place(node: fx.Node) -> bool:
    """The node's result, or a view of it, is written in place by a later node."""
    from .mutation import is_view, writes  # NOTE: mutation imports this module

    seen, todo = {node}, [node]
    while todo:
        alias = todo.pop()
        for user in alias.users:
            if writes(user, alias):
                return True
            if user not in seen and is_view(user) and user.args and user.args[0] is alias:
                seen.add(user)
                todo.append(user)
    return False


def _to_integers(node: fx.Node) -> bool:
    """A cast whose result is an integer or bool tensor."""
    value = example(node)
    return is_tensor(value) and not (value.is_floating_point() or value.is_complex())


def target_name(node: fx.Node) -> str:
    """A short readable name of what the node calls (for reasons and the random-op check)."""
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def is_identity_dropout(node: fx.Node) -> bool:
    """A dropout whose ``training``/``train`` argument is a literal False, or whose p is a
    literal 0: it returns its input (``nn.Dropout`` in eval mode traces as one)."""
    if node.op != "call_function" or node.target not in _DROPOUTS:
        return False
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    default = node.args[2] if len(node.args) > 2 else True
    train = node.kwargs.get("training", node.kwargs.get("train", default))
    if isinstance(train, bool) and not train:
        return True
    return isinstance(p, (int, float)) and not isinstance(p, bool) and p == 0


def is_random(node: fx.Node) -> bool:
    """A node that draws random numbers: an aten op tagged ``nondeterministic_seeded`` (for a
    Python-level function or a method, the aten op of its name: ``Tensor.cauchy_``), or one of
    the known names. An identity dropout (eval mode) draws none."""
    if node.op not in ("call_function", "call_method") or is_identity_dropout(node):
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return torch.Tag.nondeterministic_seeded in target.tags
    if isinstance(target, torch._ops.OpOverloadPacket):
        return _seeded_packet(target)
    name = target_name(node)
    return name in _RANDOM_NAMES or _seeded_aten(name)


def _seeded_packet(packet) -> bool:
    tag = torch.Tag.nondeterministic_seeded
    return any(tag in getattr(packet, name).tags for name in packet.overloads())


@functools.cache
def _seeded_aten(name: str) -> bool:
    """Whether ``torch.ops.aten.<name>`` exists and draws random numbers."""
    try:
        packet = getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return False
    return isinstance(packet, torch._ops.OpOverloadPacket) and _seeded_packet(packet)


def example(node: fx.Node):
    """The fake value Dynamo recorded for the node (FakeTensor, SymInt, ...), or None."""
    return node.meta.get("example_value", node.meta.get("val"))


def is_tensor(value) -> bool:
    return isinstance(value, torch.Tensor)


def ndim(node: fx.Node) -> int | None:
    value = example(node) if isinstance(node, fx.Node) else None
    return value.dim() if is_tensor(value) else None


def is_scalar(arg) -> bool:
    """A Python/symbolic number or a 0-d tensor: something that scales without broadcasting."""
    if isinstance(arg, bool):
        return False
    if isinstance(arg, (int, float)):
        return True
    if not isinstance(arg, fx.Node):
        return False
    value = example(arg)
    if isinstance(value, (torch.SymInt, torch.SymFloat, int, float)):
        return True
    return is_tensor(value) and value.dim() == 0 and not value.is_complex()


def meta_only_args(node: fx.Node) -> set[int]:
    """Positions of the node's arguments that it reads only for shape/dtype/device."""
    if node.op == "call_method" and node.target in _META_METHODS:
        return {0}
    if node.op == "call_method" and node.target == "type_as":
        return {1}
    if node.op == "call_method" and node.target == "to":
        return set(range(1, len(node.args)))
    if node.op == "call_function" and node.target in _LIKE_FUNCTIONS:
        return {0}
    if node.op == "call_function" and node.target is builtins.getattr:
        return {0} if node.args[1] in _META_ATTRS else set()
    if node.op == "call_function" and "sym_size" in str(node.target):
        return {0}
    return set()


def node_inputs(node: fx.Node) -> Iterator[tuple[fx.Node, bool]]:
    """(input, meta_only) for every node the given node reads, positional and keyword."""
    meta = meta_only_args(node)
    for i, arg in enumerate(node.args):
        for inp in _nodes_in(arg):
            yield inp, i in meta
    for key, arg in node.kwargs.items():
        for inp in _nodes_in(arg):
            yield inp, node.op == "call_method" and node.target == "to" and key == "other"


def _nodes_in(arg) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(arg, found.append)
    return found


class GraphView:
    """The networkx view of one FX graph: data/meta edges and kinds, plus lookup helpers."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.order = {node: i for i, node in enumerate(self.nodes)}
        self.g = nx.DiGraph()
        for node in self.nodes:
            self.g.add_node(node, kind=kind_of(node))
        for node in self.nodes:
            for inp, meta in node_inputs(node):
                previous = self.g.get_edge_data(inp, node)
                data_edge = not meta or (previous is not None and not previous["meta"])
                self.g.add_edge(inp, node, meta=not data_edge)
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.outputs = set(_nodes_in(self.nodes[-1].args)) if self.nodes else set()
        # NOTE: what a checkpoint's or compile region's body returns is its graph's output
        self.outputs |= {n.args[0] for n in self.nodes if n.meta.get(LEAVES_BODY) and n.args}

    def kind(self, node: fx.Node) -> str:
        return self.g.nodes[node]["kind"]

    def nodes_of_kind(self, *kinds: str) -> list[fx.Node]:
        return [n for n in self.nodes if self.g.nodes[n]["kind"] in kinds]

    def data_ancestors(self, node: fx.Node) -> tuple[set[fx.Node], set[fx.Node]]:
        """(nodes whose values ``node`` depends on, nodes it reads only for metadata)."""
        values: set[fx.Node] = set()
        meta: set[fx.Node] = set()
        stack = [node]
        while stack:
            current = stack.pop()
            for inp in self.g.predecessors(current):
                if self.g.edges[inp, current]["meta"]:
                    meta.add(inp)
                elif inp not in values:
                    values.add(inp)
                    stack.append(inp)
        return values, meta - values

    def users(self, node: fx.Node) -> list[fx.Node]:
        return list(node.users)

    def sorted(self, nodes) -> list[fx.Node]:
        return sorted(nodes, key=self.order.__getitem__)


def where(node: fx.Node) -> str:
    """Where the node is in the user's code: module path and source line, when known."""
    parts = []
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1]
        path = str(path[0] if isinstance(path, tuple) else path)
        path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
        path = re.sub(r"^L\['[^']+'\]\.?", "", path)
        # NOTE: explain() of an already compiled model traces through its OptimizedModule
        path = re.sub(r"^_orig_mod(\.|$)", "", path)
        if path:
            parts.append(path)
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
    if lines:
        frame = lines[-1].replace("File ", "").replace('"', "")
        file, _, rest = frame.partition(", line ")
        parts.append(f"{file.rsplit('/', 1)[-1]}:{rest.split(',')[0]}")
    return " ".join(parts) or node.name


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with its own graph (node names and meta kept) for rewriting; its
    attributes (a checkpoint's body among them) are still ``gm``'s objects."""
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, value_map)
    graph.output(out)
    for old, new in value_map.items():
        if new.name != old.name:
            raise RuntimeError(f"graph copy renamed {old.name} to {new.name}")
    return fx.GraphModule(gm, graph)
