"""What an original attention's ``forward`` does, read from its source: rotary and soft cap.

Some families rotate q/k on only some layers (Cohere2 and Exaone4 keep global layers position
free, SmolLM3 reads ``config.no_rope_layers``). The rule lives in the attention's ``forward``
as an ``if`` around the rotary call, so it is read from there: the guard is evaluated on the
original module when it only reads attributes of ``self``, else the layer is refused. Likewise
the attention logit soft cap is whatever ``forward`` passes as ``softcap=`` (Gemma2 does; Gemma3
keeps ``attn_logit_softcapping`` on the module but never passes it).
"""

from __future__ import annotations

import ast
import functools
import inspect
import operator
import textwrap
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # NOTE: find imports this module (through families)
    from .find import AttentionSite


def llama_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate-half RoPE (Llama's convention); the fallback when the model has no function."""

    def rotate_half(x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotate(fn, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Apply the family's rotary ``fn`` to q/k [B, H, T, D]; cos/sin narrower than D (partial
    rotary: GLM, StableLM, Phi, GPT-NeoX) rotate the first channels, the rest pass through."""
    rot, dim = cos.shape[-1], q.shape[-1]
    if rot > dim or rot % 2:
        raise ValueError(
            f"rotary cos/sin of width {rot} do not fit head_dim {dim} "
            "(expected an even width <= head_dim)"
        )
    if rot == dim:
        return fn(q, k, cos, sin)
    qr, kr = fn(q[..., :rot], k[..., :rot], cos, sin)
    return torch.cat([qr, q[..., rot:]], dim=-1), torch.cat([kr, k[..., rot:]], dim=-1)


@functools.cache
def _forward_tree(cls: type) -> ast.AST | None:
    """The parsed ``forward`` of an attention class, None when its source cannot be read."""
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return None


def applies_rotary(original: nn.Module, assume: dict | None = None) -> bool:
    """Whether ``original`` rotates q/k with the position embeddings it is given.

    True when its ``forward`` calls a rotary function unconditionally (or its source cannot be
    read, or it names no rotary function: the converted layer then rotates whenever it is given
    cos/sin, as before). A guarded call is decided by evaluating the guard on the module, with
    the ``forward`` arguments named in ``assume`` taken at the given value (Falcon's
    ``if alibi is None``: ALiBi layers are never converted, so ``alibi`` is None).
    """
    tree = _forward_tree(type(original))
    if tree is None:
        # NOTE: no source (a class built at run time): nothing says the layer skips rotary.
        return True
    guards = list(_rotary_guards(tree, []))
    if not guards:
        return True
    name = type(original).__name__
    names = assume or {}
    return any(all(_truth(test, want, original, name, names) for test, want in g) for g in guards)


def attention_dropout(original: nn.Module) -> float:
    """The dropout probability ``original`` applies to its attention weights while training:
    Llama-style ``attention_dropout`` (a float), GPT-2's ``attn_dropout`` and NeoX/Falcon's
    ``attention_dropout`` (``nn.Dropout`` modules); 0 when it has none."""
    for name in ("attention_dropout", "attn_dropout"):
        value = getattr(original, name, None)
        if isinstance(value, nn.Dropout):
            return float(value.p)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 0.0


def attention_softcap(original: nn.Module) -> float | None:
    """The attention logit soft cap ``original`` applies (``softcap=`` in its ``forward``), or
    None; without source, its ``attn_logit_softcapping`` attribute."""
    tree = _forward_tree(type(original))
    if tree is None:
        cap = getattr(original, "attn_logit_softcapping", None)
    else:
        found = [
            k.value for k in ast.walk(tree) if isinstance(k, ast.keyword) and k.arg == "softcap"
        ]
        if not found:
            return None
        try:
            cap = _value(found[0], original)
        except _Unreadable:
            raise ValueError(
                f"cannot convert {type(original).__name__}: it passes "
                f"softcap={ast.unparse(found[0])}, a value the converter cannot read"
            ) from None
    return float(cap) if isinstance(cap, (int, float)) and cap else None


def forward_parameters(module: nn.Module) -> list[str]:
    """The parameter names of ``module.forward`` (empty when they cannot be read)."""
    try:
        return list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return []


def returned_values(original: nn.Module) -> int | None:
    """How many values ``original.forward`` returns when every ``return`` in it is a tuple of
    the same length, else None (unknown: no source, or a return of another form)."""
    tree = _forward_tree(type(original))
    if tree is None:
        return None
    lengths = {
        len(node.value.elts) if isinstance(node.value, ast.Tuple) else None
        for node in ast.walk(tree)
        if isinstance(node, ast.Return)
    }
    return lengths.pop() if len(lengths) == 1 else None


def _rotary_guards(node: ast.AST, path: list[tuple[ast.expr, bool]]):
    """For each rotary call, the (if-test, branch taken) pairs that enclose it."""
    if isinstance(node, ast.Call) and "rotary" in _call_name(node.func):
        yield list(path)
    if isinstance(node, ast.If):
        yield from _rotary_guards(node.test, path)
        for child in node.body:
            yield from _rotary_guards(child, [*path, (node.test, True)])
        for child in node.orelse:
            yield from _rotary_guards(child, [*path, (node.test, False)])
        return
    for child in ast.iter_child_nodes(node):
        yield from _rotary_guards(child, path)


def _call_name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id.lower()
    if isinstance(func, ast.Attribute):
        return func.attr.lower()
    return ""


_COMPARE = {
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}


def _truth(test: ast.expr, want: bool, module: nn.Module, name: str, names: dict) -> bool:
    """Whether the branch (``want``) of ``if test`` is taken for ``module``."""
    try:
        return bool(_value(test, module, names)) == want
    except _Unreadable:
        raise ValueError(
            f"cannot convert {name}: it applies the rotary embedding only when "
            f"`{ast.unparse(test)}`, a condition the converter cannot read (it evaluates "
            "conditions on attributes of self only); keep this layer as attention"
        ) from None


class _Unreadable(Exception):
    pass


_GIVEN = object()  # stands for the cos/sin a call passes


def _value(node: ast.expr, module: nn.Module, names: dict | None = None):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and names and node.id in names:
        return names[node.id]
    if isinstance(node, ast.Name) and node.id == "self":
        return module
    if isinstance(node, ast.Name) and node.id == "position_embeddings":
        # NOTE: `if position_embeddings is not None` (OLMo-hybrid, Granite): the converted layer
        # makes the same check at run time, so here the embeddings count as given.
        return _GIVEN
    if isinstance(node, ast.Attribute):
        owner = _value(node.value, module, names)
        if not hasattr(owner, node.attr):
            raise _Unreadable
        return getattr(owner, node.attr)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not _value(node.operand, module, names)
    if isinstance(node, ast.BoolOp):
        values = [bool(_value(v, module, names)) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE:
        left = _value(node.left, module, names)
        right = _value(node.comparators[0], module, names)
        return _COMPARE[type(node.ops[0])](left, right)
    raise _Unreadable


# -- what a converted layer applies: refuse what it would skip ---------------------------------

CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}
CROSS_KWARGS = ("cross_attention_states", "key_value_states", "encoder_hidden_states")


def check_children(original: nn.Module, used=None) -> None:
    """Refuse a module with sub-layers a converted layer would silently skip (StableLM's
    ``q_layernorm``, ...); dropout, identities and rotary embeddings are fine. ``used``: the
    sub-layers the converted layer applies (default: the Llama-style ones, ``CHILDREN``)."""
    allowed = CHILDREN if used is None else set(used)
    ignored = [
        name
        for name, child in original.named_children()
        if name not in allowed
        and "rotary" not in name
        and not isinstance(child, (nn.Dropout, nn.Identity))
    ]
    if ignored:
        applied = "q_proj/k_proj/v_proj/o_proj, q_norm/k_norm" if used is None else "/".join(used)
        raise ValueError(
            f"cannot convert {type(original).__name__}: its sub-modules {ignored} would be "
            f"ignored by a converted layer (it applies {applied} and the rotary embedding only)"
        )
    check_own_parameters(original)


def check_own_parameters(original: nn.Module) -> None:
    """Refuse a module that owns parameters directly (GPT-OSS's attention ``sinks``): the
    converted layer applies only its projections, so they would be silently dropped."""
    own = [name for name, p in original.named_parameters(recurse=False) if p is not None]
    if own:
        raise ValueError(
            f"cannot convert {type(original).__name__}: it owns parameters {own} directly "
            "(outside its projections) that a converted layer would ignore (e.g. GPT-OSS's "
            "attention sinks); keep this layer as attention"
        )


def qk_norm_mode(original: nn.Module, site: AttentionSite) -> str | None:
    """None, "head" (norm over each head's D channels: Qwen3, Gemma3, Cohere) or "flat" (over
    the whole projection, before the head split: OLMo2)."""
    norm = getattr(original, "q_norm", None)
    if not isinstance(norm, nn.Module):
        return None
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, Tensor):
        raise ValueError(
            f"cannot convert {type(original).__name__}: its q_norm ({type(norm).__name__}) has "
            "no weight, so whether it normalises each head or the whole projection cannot be "
            "read; keep this layer as attention"
        )
    width = weight.shape[-1] if isinstance(weight, Tensor) and weight.dim() else None
    if width == site.head_dim:
        return "head"
    if width == site.num_heads * site.head_dim:
        return "flat"
    raise ValueError(
        f"cannot convert {type(original).__name__}: q_norm must normalise each head "
        f"({site.head_dim} channels) or the whole projection ({site.num_heads * site.head_dim}), "
        f"its weight has shape {tuple(weight.shape)}"
    )
