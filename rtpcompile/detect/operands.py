"""How an operand of a product is spelled: its layout and its scalar factors.

``layout`` follows transposes/permutes (``.mT``, ``.T``, ``transpose``, ``permute``) to the tensor
they rearrange, composing them into one permutation; ``peel`` strips dtype casts and
multiplications/divisions by scalars. The patterns use both to see ``(q * s) @ k.transpose(-1, -2)``
and ``q @ (k.mT.float() / t)`` as the same product. Nothing here mutates the graph.
"""

from __future__ import annotations

import builtins
import dataclasses

import torch.fx as fx

from .graph_view import example, is_scalar, is_tensor, kind_of, ndim


@dataclasses.dataclass(frozen=True)
class Layout:
    """``node`` seen as ``base.permute(perm)`` (perm None: the identity)."""

    base: fx.Node
    perm: tuple[int, ...] | None
    chain: tuple[fx.Node, ...] = ()

    def swapped(self) -> Layout:
        """The same base seen with its last two dimensions exchanged."""
        n = ndim(self.base)
        perm = list(self.perm or range(n))
        perm[-1], perm[-2] = perm[-2], perm[-1]
        return Layout(self.base, _normalise(tuple(perm)), self.chain)

    @property
    def swaps_last_two(self) -> bool:
        """Whether this is ``base`` with only its last two dimensions exchanged (False when the
        base's rank is unknown)."""
        n = ndim(self.base)
        return n is not None and n >= 2 and self.perm == _swap(n, -2, -1)

    def then(self, perm: tuple[int, ...]) -> Layout:
        """This layout followed by a further ``permute(perm)``."""
        inner = self.perm or tuple(range(len(perm)))
        return Layout(self.base, _normalise(tuple(inner[p] for p in perm)), self.chain)


def _normalise(perm: tuple[int, ...]) -> tuple[int, ...] | None:
    return None if perm == tuple(range(len(perm))) else perm


def _layout_perm(node: fx.Node, rank: int) -> tuple[int, ...] | None:
    """The permutation a transpose/permute/.mT node applies, or None if it is not static."""
    if node.op == "call_function" and node.target is builtins.getattr:
        dims = (-2, -1) if node.args[1] == "mT" else (0, 1)
        if node.args[1] == "T" and rank != 2:
            return None
        return _swap(rank, *dims)
    target = node.target if node.op == "call_method" else node.target.__name__
    rest = list(node.args[1:])
    if target == "transpose":
        dims = rest or [node.kwargs.get("dim0"), node.kwargs.get("dim1")]
        if len(dims) != 2 or not all(isinstance(d, int) for d in dims):
            return None
        return _swap(rank, *dims)
    if target == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        dims = dims or node.kwargs.get("dims", [])
        if len(dims) != rank or not all(isinstance(d, int) for d in dims):
            return None
        return tuple(d % rank for d in dims)
    return None


def _swap(rank: int, d0: int, d1: int) -> tuple[int, ...]:
    perm = list(range(rank))
    a, b = d0 % rank, d1 % rank
    perm[a], perm[b] = perm[b], perm[a]
    return tuple(perm)


def layout(node: fx.Node) -> Layout:
    """Follow transposes/permutes up to the tensor they rearrange (casts stay in the operand)."""
    perms: list[tuple[int, ...]] = []
    chain: list[fx.Node] = []
    while kind_of(node) == "layout":
        perm = _layout_perm(node, ndim(node) or 0)
        if perm is None or not isinstance(node.args[0], fx.Node):
            break
        perms.append(perm)
        chain.append(node)
        node = node.args[0]
    result = Layout(node, None, tuple(chain))
    for perm in reversed(perms):
        result = result.then(perm)
    return result


@dataclasses.dataclass(frozen=True)
class Peeled:
    """A node with its scalar factors and dtype casts peeled off."""

    core: fx.Node
    factors: tuple[tuple[str, object], ...]  # ("mul" | "div", number or fx.Node)
    chain: tuple[fx.Node, ...]  # the wrapper nodes passed through, outermost first


def peel(node: fx.Node, passes_cast=None) -> Peeled:
    """Strip casts, negations and multiplications/divisions by scalars: ``(core, factors,
    wrappers)``.

    ``passes_cast(node)``: which casts to strip (default: every non-complex one)."""
    passes_cast = passes_cast or (lambda n: not _complex(n))
    factors: list[tuple[str, object]] = []
    chain: list[fx.Node] = []
    while True:
        kind = kind_of(node)
        if kind == "cast" and isinstance(node.args[0], fx.Node) and passes_cast(node):
            chain.append(node)
            node = node.args[0]
            continue
        if kind == "neg" and len(node.args) == 1 and isinstance(node.args[0], fx.Node):
            factors.append(("mul", -1))  # NOTE: -(q @ k^T) is a constant factor -1
            chain.append(node)
            node = node.args[0]
            continue
        if kind in ("mul", "div") and len(node.args) == 2:
            a, b = node.args
            if kind == "mul" and is_scalar(a) and isinstance(b, fx.Node) and not is_scalar(b):
                a, b = b, a
            if isinstance(a, fx.Node) and not is_scalar(a) and is_scalar(b):
                factors.append((kind, b))
                chain.append(node)
                node = a
                continue
        return Peeled(node, tuple(factors), tuple(chain))


def _complex(node: fx.Node) -> bool:
    value = example(node)
    return is_tensor(value) and value.is_complex()


_PRODUCTS = ("matmul", "einsum", "baddbmm")


def operand_views(*layouts: Layout | None) -> set[fx.Node]:
    """The nodes of the operands' layout chains that view an input, not the scores: in
    ``(K Q^T)^T`` the product and its transpose ride in Q's chain and stay the region's own."""
    found: set[fx.Node] = set()
    for lay in layouts:
        if lay is None:
            continue
        nodes = set(lay.chain)
        for node in lay.chain:
            x, of_scores = node, False
            while x in nodes and not of_scores:
                of_scores = kind_of(x) in _PRODUCTS
                x = x.args[0] if x.args and isinstance(x.args[0], fx.Node) else None
            if not of_scores:
                found.add(node)
    return found
