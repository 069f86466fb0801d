"""In-place writes to what a region reads: the rewrite must not move a read across one.

The op that replaces a region runs where the region's output was computed; eager read q, k, v,
the masks and the state at the region's first node. A write between the two (``q.mul_(2)`` after
``q @ k^T``) would change what the op reads, so such a region is declined. Writes before the
first read or after the output are harmless. Aliases are followed through view-like ops (a
write to ``x`` changes ``x.view(...).transpose(1, 2)``) -- conservatively: a cast or
``contiguous`` may return its input itself, so they count as views too.
"""

from __future__ import annotations

import operator

import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

from .graph_view import GraphView, example, is_tensor, target_name
from .region import Region

_VIEWS = {
    "view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand", "expand_as",
    "flatten", "unflatten", "chunk", "split", "unbind", "narrow", "select", "as_strided",
    "getitem", "contiguous", "to", "float", "half", "bfloat16", "double", "type_as", "detach",
    "view_as", "movedim", "swapaxes", "t", "mT", "diagonal", "unfold", "getattr",
    "moveaxis", "swapdims", "adjoint", "tensor_split", "hsplit", "vsplit", "dsplit",
    "split_with_sizes", "unsafe_split", "unsafe_chunk", "ravel", "broadcast_to", "view_as_real",
    "view_as_complex", "real", "imag", "conj", "resolve_conj", "resolve_neg", "alias",
    "atleast_1d", "atleast_2d", "atleast_3d", "positive", "type", "cpu", "cuda",
}  # fmt: skip
_IN_PLACE_FUNCTIONS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.ipow, operator.imod, operator.iand, operator.ior, operator.ixor, operator.setitem,
}  # fmt: skip


def is_view(node: fx.Node) -> bool:
    """A node whose result may share its first argument's storage: a view-like op by name, or
    any op whose example value shares storage with its input (``reshape_as``, ``sum_to_size``,
    ``.data``, ``broadcast_tensors``, aten's ``alias``/``slice``: a write through one of those
    was missed, and the region claimed with the old values)."""
    if node.op not in ("call_method", "call_function"):
        return False
    if target_name(node) in _VIEWS:
        return True
    # NOTE: an in-place op's result is its input too, but it is a write, handled as one
    return not (node.args and writes(node, node.args[0])) and _shares_storage(node)


def _storages(value) -> list:
    values = value if isinstance(value, (tuple, list)) else [value]
    found = []
    for item in values:
        if is_tensor(item):
            try:
                found.append(StorageWeakRef(item.untyped_storage()))
            except (NotImplementedError, RuntimeError):  # NOTE: no storage (a sparse tensor)
                pass
    return found


def _shares_storage(node: fx.Node) -> bool:
    """Whether the node's example value (Dynamo's fake tensors keep views' storage) shares the
    storage of its first argument's."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    mine = _storages(example(node))
    return bool(mine) and any(s in mine for s in _storages(example(node.args[0])))


def writes(node: fx.Node, target: fx.Node) -> bool:
    """``node`` writes into ``target`` (its first argument) in place, or through ``out=``."""
    if node.op not in ("call_method", "call_function"):
        return False
    if node.kwargs.get("out") is target:
        return True
    if not node.args or node.args[0] is not target:
        return False
    if node.target in _IN_PLACE_FUNCTIONS:
        return True
    if getattr(node.target, "__module__", None) in ("operator", "_operator"):
        return False  # NOTE: operator.and_/or_/not_ are not in place (iand etc. are above)
    name = target_name(node)
    return name.endswith("_") and not name.startswith("_")


def _aliases(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node that may share its storage through view-like ops."""
    root = node
    while is_view(root) and root.args and isinstance(root.args[0], fx.Node):
        root = root.args[0]
    seen, todo = {root}, [root]
    while todo:
        for user in todo.pop().users:
            if user not in seen and is_view(user):
                seen.add(user)
                todo.append(user)
    return seen | {node}


def root_of(node: fx.Node) -> fx.Node:
    """The tensor ``node`` is a view of (through view-like ops), itself if none."""
    while is_view(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def writers(nodes) -> list[tuple[fx.Node, fx.Node]]:
    """(writer, written alias) for every in-place write to any of ``nodes`` or their views."""
    found = []
    for node in nodes:
        for alias in _aliases(node):
            found += [(user, alias) for user in alias.users if writes(user, alias)]
    return found


# NOTE: the view-like ops (``_VIEWS``) that may copy their input (a cast, ``contiguous``,
# ``reshape``, indexing by a tensor: ``getitem`` is decided by its index), so read it where they
# run; the others always share its storage
_MAY_COPY = {
    "reshape", "flatten", "unflatten", "ravel", "contiguous", "to", "float", "half", "bfloat16",
    "double", "type", "type_as", "cpu", "cuda", "conj", "resolve_conj", "resolve_neg",
    "positive", "getattr",
}  # fmt: skip
_STRICT_VIEWS = _VIEWS - _MAY_COPY - {"getitem"}


def _may_copy(node: fx.Node) -> bool:
    """A view-like node that may copy its input (so reads it where it runs)."""
    name = target_name(node)
    if name == "getitem":
        index = node.args[1] if len(node.args) > 1 else None
        items = index if isinstance(index, (tuple, list)) else (index,)
        source = node.args[0] if node.args else None
        if isinstance(source, fx.Node) and isinstance(example(source), (tuple, list)):
            return False  # NOTE: an item of a split/unbind: the view itself
        return any(isinstance(i, fx.Node) and is_tensor(example(i)) for i in items) or any(
            isinstance(i, (list, tuple)) for i in items
        )
    return name not in _STRICT_VIEWS


def _first_read(view: GraphView, node: fx.Node, inside: set[fx.Node]) -> int | None:
    """Where the region first reads ``node`` (a mask, the state): its first region node reading
    it (or a view of it), or an earlier node that may copy it (a cast the region reads),
    whichever comes first; None when no region node reads it."""
    users = [user for alias in _aliases(node) for user in alias.users]
    if not any(user in inside for user in users):
        return None
    reads = [u for u in users if u in inside or (is_view(u) and _may_copy(u))]
    return min(view.order.get(u, -1) for u in reads)


def written_between(view: GraphView, region: Region, named: dict[str, fx.Node]) -> str | None:
    """Why the region is declined: an operand written in place between the region's first node
    and its output (an in-place scaling the region itself looks through included: the op would
    apply it twice); None when there is no such write.

    A mask's or the state's window starts at its first read by the region (see
    ``_first_read``), not at the region's first node: a mask finished in place (``m.tril_()``,
    ``D[D != D] = 0``) after ``q @ k^T`` but before the scores read it is what eager multiplied
    in, and a chunk step's state rescaled (``state.mul_(0.5)``) before its cross term is what
    eager's cross term and update read; the op reads both after those writes too."""
    inside = [named[n] for n in region.nodes if n in named]
    out = named.get(region.output)
    if not inside or out is None:
        return None
    first = min(view.order.get(n, 0) for n in inside)
    # NOTE: a step's new state may come after its output (a chunk step's update): the op
    # computes both where the output was, so a write before the state counts as well
    ends = [out, named.get(region.state_output or "")]
    last = max(view.order.get(n, 0) for n in ends if n is not None)
    operands = [("q", region.q), ("k", region.k), ("v", region.v)]
    reads = [(role, named.get(op.node), first) for role, op in operands if op is not None]
    members = set(inside)
    later = [("the state", region.state.node)] if region.state is not None else []
    for role, name in later + [("a mask", m) for m in region.masks]:
        node = named.get(name)
        start = None if node is None else _first_read(view, node, members)
        reads.append((role, node, first if start is None else start))
    factors = [v for _, v in (*region.pre, *region.post) if isinstance(v, str)]
    reads += [("a factor of the scores", named.get(f), first) for f in factors]
    for role, node, start in reads:
        if node is None:
            continue
        for alias in _aliases(node):
            for user in alias.users:
                if start <= view.order.get(user, -1) <= last and writes(user, alias):
                    return (
                        f"{role} is written in place ({target_name(user)}) inside the region, "
                        "after its first read: the op would read the new values"
                    )
    return None
