"""Einsum equations read as subscripts: ``parse_einsum`` for the product patterns, with an
ellipsis spelt out in letters of its own."""

from __future__ import annotations

import torch.fx as fx

from .graph_view import example, is_tensor, kind_of, same_size


def parse_einsum(node: fx.Node) -> tuple[list[str], str, list[fx.Node]] | None:
    """(input subscripts, output subscript, operands) of an einsum with an explicit output; an
    ellipsis is spelt out in letters of its own (``_expand_ellipsis``)."""
    if kind_of(node) != "einsum" or not node.args or not isinstance(node.args[0], str):
        return None
    equation = node.args[0].replace(" ", "")
    operands = list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if "->" not in equation:
        return None
    lhs, out = equation.split("->")
    inputs = lhs.split(",")
    if len(inputs) != len(operands) or not all(isinstance(o, fx.Node) for o in operands):
        return None
    if "." in equation:
        expanded = _expand_ellipsis(inputs, out, operands)
        if expanded is None:
            return None
        inputs, out = expanded
    return inputs, out, operands


def _expand_ellipsis(inputs: list[str], out: str, operands) -> tuple[list[str], str] | None:
    """``...qd,...kd->...qk`` as ``ABqd,ABkd->ABqk`` for operands whose ellipsis dims have the
    same sizes (a broadcast one, size 1 against B, is left alone: None)."""
    if any(
        s.count("...") != ("..." in s) or s.replace("...", "").count(".") for s in [*inputs, out]
    ):
        return None
    spans = []
    for subscript, operand in zip(inputs, operands, strict=True):
        value = example(operand)
        if not is_tensor(value):
            return None
        n = value.dim() - len(subscript.replace("...", ""))
        if n < 0 or ("..." not in subscript and n):
            return None
        start = subscript.find("...")
        if start >= 0:
            spans.append(list(value.shape[start : start + n]))
    # NOTE: every ellipsis the same dims (an empty one beside a full one broadcasts too)
    if not spans or any(len(span) != len(spans[0]) for span in spans):
        return None
    if not all(all(map(same_size, span, spans[0])) for span in spans):
        return None
    width = len(spans[0])
    used = set("".join(inputs) + out)
    letters = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in used][:width]
    if len(letters) < width:
        return None
    fill = "".join(letters)
    return [s.replace("...", fill) for s in inputs], out.replace("...", fill)
