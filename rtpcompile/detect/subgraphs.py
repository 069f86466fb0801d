"""Retention inside a checkpoint or a nested compile region: detection searches their bodies.

Dynamo traces ``torch.utils.checkpoint.checkpoint(fn, *args)`` to a ``tag_activation_checkpoint``
higher-order op, and a call of a ``torch.compiler.nested_compile_region`` function to an
``invoke_subgraph`` one; the first argument is ``fn``'s graph (a GraphModule attribute), and the
op's operands feed its placeholders. Detection runs on a *flat* copy of the graph in which each
such body is inlined at each call (placeholders replaced by the operands, outputs read where
the op's were), so a mask built outside the body, a gamma buffer and the symbolic sizes are the
graph's own inputs there, exactly as without the op. A region found in the flat graph is then
named in its body's own terms (``Region.scope``: the op calls leading to the body, outermost
first) and rewritten inside that body, so a checkpoint still recomputes it in the backward. A
region whose nodes lie on both sides of a body's boundary is declined; so is one of a body that
several calls share (a nested compile region) unless every call claims it alike (``agree``).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
from torch._ops import HigherOrderOperator

from .graph_view import LEAVES_BODY, boundary
from .region import Operand, Region

__all__ = [
    "Flat", "RunBodies", "SEARCHED", "agree", "boundary", "flatten", "graph_at", "has_bodies",
    "localize",
]  # fmt: skip

# NOTE: the ops whose body runs once per call on the op's operands (from this argument on);
# cond/while_loop run theirs conditionally or repeatedly and are not searched
SEARCHED = {"tag_activation_checkpoint": 1, "invoke_subgraph": 2}

Scope = tuple[str, ...]


@dataclasses.dataclass
class Flat:
    """The flat graph and, per node name, its scope and its name in the graph of that scope
    (a :func:`boundary` node: the body's placeholder, or the getitem reading a body's output)."""

    gm: fx.GraphModule
    origin: dict[str, tuple[Scope, str]]
    attrs: int = 0
    # NOTE: scope -> the attribute names leading to its body from the top graph: calls of a
    # nested compile region share one body, so their scopes differ and these do not
    bodies: dict[Scope, tuple[str, ...]] = dataclasses.field(default_factory=dict)


def _body(gm: fx.GraphModule, node: fx.Node) -> fx.GraphModule | None:
    """The body of a searched higher-order op call whose results are only read by index."""
    if node.op != "call_function" or not isinstance(node.target, HigherOrderOperator):
        return None
    offset = SEARCHED.get(node.target.name())
    if offset is None or len(node.args) < offset:
        return None
    attr = node.args[0]
    if not isinstance(attr, fx.Node) or attr.op != "get_attr":
        return None
    body = getattr(gm, attr.target, None)
    if not isinstance(body, fx.GraphModule):
        return None
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(node.args) - offset:
        return None
    readers = list(node.users)
    if not all(u.target is operator.getitem and isinstance(u.args[1], int) for u in readers):
        return None
    return body


class RunBodies(fx.Interpreter):
    """Runs a graph eagerly, and the body of each checkpoint or nested compile region call as a
    graph of its own (neither op changes a value: a checkpoint changes what is saved, a compile
    region how it compiles); ``at_call(node, body, operands)`` first, if given.

    NOTE: not the op itself: torch 2.13's eager ``invoke_subgraph`` traces its body (on
    uninitialised tensors, and fails on a symbolic float such as an RMSNorm's eps)."""

    def __init__(self, gm: fx.GraphModule, at_call=None):
        super().__init__(gm)
        self.at_call = at_call

    def run_node(self, node):
        if _body(self.module, node) is None:
            return super().run_node(node)
        operands, _ = self.fetch_args_kwargs_from_env(node)
        body = getattr(self.module, node.args[0].target)
        operands = list(operands[SEARCHED[node.target.name()] :])
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        operands = [_as_traced(p, x) for p, x in zip(placeholders, operands, strict=True)]
        if self.at_call is not None:
            self.at_call(node, body, operands)
        return RunBodies(body).run(*operands)


def _as_traced(placeholder: fx.Node, value):
    """``value`` as the body's placeholder was traced: Dynamo may pass a float (``eps.item()``)
    to a body that it traced, at its first call, with that float wrapped in a 0-d tensor."""
    example = placeholder.meta.get("example_value")
    if isinstance(example, torch.Tensor) and isinstance(value, (int, float)):
        return torch.tensor(value, dtype=example.dtype, device=example.device)
    return value


def graph_at(gm: fx.GraphModule, scope: Scope) -> fx.GraphModule:
    """The graph a region of ``scope`` lives in: ``gm`` itself, or a (nested) body of it."""
    for name in scope:
        node = next(n for n in gm.graph.nodes if n.name == name)
        gm = getattr(gm, node.args[0].target)
    return gm


def has_bodies(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` calls a checkpoint or nested compile region whose body is searched."""
    return any(_body(gm, node) is not None for node in gm.graph.nodes)


def flatten(gm: fx.GraphModule) -> Flat | None:
    """``gm`` with every searched body inlined, or None when it calls none."""
    if not has_bodies(gm):
        return None
    graph = fx.Graph()
    root = torch.nn.Module()
    flat = Flat(gm, {})  # NOTE: gm replaced below, once the graph is built
    _copy(graph, root, gm, (), {}, flat)
    flat.gm = fx.GraphModule(root, graph)
    return flat


def _boundary(graph, value, like: fx.Node, flat: Flat, scope: Scope, name: str, leaves: bool):
    """``value`` (a flat node) through a :func:`boundary` node named ``name`` in ``scope``
    (``leaves``: a body's output read by the caller); values that are not tensors pass as they
    are."""
    example = like.meta.get("example_value")
    if not isinstance(value, fx.Node) or not isinstance(example, torch.Tensor):
        return value
    node = graph.call_function(boundary, (value,))
    node.meta["example_value"] = example
    node.meta[LEAVES_BODY] = leaves
    flat.origin[node.name] = (scope, name)
    return node


def _copy(graph: fx.Graph, root, src: fx.GraphModule, scope: Scope, env: dict, flat: Flat):
    """Copy ``src``'s nodes into ``graph`` (its placeholders already in ``env`` unless ``src``
    is the top graph); returns what ``src`` outputs, as flat values."""
    top = not scope
    for node in src.graph.nodes:
        if node.op == "placeholder" and not top:
            continue
        if node.op == "output":
            result = fx.node.map_arg(node.args[0], env.__getitem__)
            if top:
                graph.output(result)
            return result
        body = _body(src, node)
        if body is not None:
            inner = (*scope, node.name)
            flat.bodies[inner] = (*flat.bodies.get(scope, ()), node.args[0].target)
            operands = node.args[SEARCHED[node.target.name()] :]
            values = [fx.node.map_arg(a, env.__getitem__) for a in operands]
            placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
            inner_env = {
                p: _boundary(graph, value, p, flat, inner, p.name, False)
                for p, value in zip(placeholders, values, strict=True)
            }
            outputs = _copy(graph, root, body, inner, inner_env, flat)
            env[node] = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
            continue
        if node.target is operator.getitem and isinstance(env.get(node.args[0]), (tuple, list)):
            value = env[node.args[0]][node.args[1]]
            env[node] = _boundary(graph, value, node, flat, scope, node.name, True)
            continue
        if node.op == "get_attr":
            # NOTE: every attribute under a name of its own: bodies reuse names (wrap_body_0)
            flat.attrs += 1
            name = f"_rtp_attr{flat.attrs}_{node.target.replace('.', '_')}"
            setattr(root, name, getattr(src, node.target))
            new = graph.get_attr(name)
            new.meta = dict(node.meta)
        else:
            new = graph.node_copy(node, env.__getitem__)
        env[node] = new
        flat.origin[new.name] = (scope, node.name)
    raise RuntimeError(f"graph of {scope or 'the top level'} has no output node")


def localize(flat: Flat | None, region: Region) -> Region:
    """A claimed region found in the flat graph, named in the graph its nodes come from (its
    ``scope``); declined when its nodes lie in more than one graph. Declined regions keep the
    flat graph's names (only their reasons and locations are read)."""
    if flat is None or not region.claimed:
        return region
    scopes = {flat.origin[name][0] for name in region.nodes}
    scopes.add(flat.origin[region.output][0])
    if len(scopes) != 1:
        inner = max(scopes, key=len)
        return region.declined(
            f"it crosses the boundary of the body of {inner[-1]} (a checkpoint or nested "
            "compile region): put the whole retention inside the function, or all of it outside"
        )
    (scope,) = scopes

    def name(flat_name: str) -> str:
        where, local = flat.origin[flat_name]
        if where != scope:
            raise KeyError(local)
        return local

    def operand(op: Operand | None) -> Operand | None:
        return None if op is None else dataclasses.replace(op, node=name(op.node))

    def factors(items) -> tuple:
        return tuple((op, name(v) if isinstance(v, str) else v) for op, v in items)

    try:
        return dataclasses.replace(
            region,
            scope=scope,
            output=name(region.output),
            nodes=tuple(name(n) for n in region.nodes),
            q=operand(region.q),
            k=operand(region.k),
            v=operand(region.v),
            state=operand(region.state),
            masks=tuple(name(m) for m in region.masks),
            pre=factors(region.pre),
            post=factors(region.post),
            state_output=None if region.state_output is None else name(region.state_output),
        )
    except KeyError as missing:
        return region.declined(
            f"it reads {missing.args[0]!r} from the other side of the boundary of a checkpoint's "
            "(or nested compile region's) body"
        )


def rewrite_key(region: Region) -> Region:
    """The region without what differs between two calls of one body but changes nothing that
    rewrite writes into the body (location, compile-time gammas and sizes, the row scale, which
    ``rewrite`` applies whenever any call needs it)."""
    return dataclasses.replace(
        region, where="", decay=(), row_scale=False, batch=None, dtype=None, device=None,
        scope=(), seq_len=None, heads=None, k_dim=None, v_dim=None,
    )  # fmt: skip


def agree(flat: Flat | None, regions: list[Region]) -> list[Region]:
    """Keep a region of a shared body (a nested compile region called more than once) claimed
    only if every call claims it alike: the body is rewritten once, for all of them."""
    if flat is None:
        return regions
    sites: dict[tuple[str, ...], list[Scope]] = {}
    for scope, body in flat.bodies.items():
        sites.setdefault(body, []).append(scope)
    claimed: dict[Scope, set[Region]] = {}
    for region in regions:
        if region.claimed and region.scope:
            claimed.setdefault(region.scope, set()).add(rewrite_key(region))
    common = {
        body: set.intersection(*(claimed.get(scope, set()) for scope in scopes))
        for body, scopes in sites.items()
        if len(scopes) > 1
    }
    out = []
    for region in regions:
        body = flat.bodies.get(region.scope) if region.claimed and region.scope else None
        if body in common and rewrite_key(region) not in common[body]:
            region = region.declined(
                f"its nested compile region body ({body[-1]}) is shared by {len(sites[body])} "
                "calls and not every call claims this region alike (the body is rewritten once "
                "for all of them)"
            )
        out.append(region)
    return out
