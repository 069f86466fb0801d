"""A whole retention written as one einsum of four operands, split so detection can read it.

``einsum('bhqd,bhkd,hqk,bhkv->bhqv', q, k, L, v)`` (Mamba2's ``ssd_minimal`` style) computes the
scores, masks them and takes the value product in one call, while the op needs the score and
value products apart. ``split_fused`` rewrites such an einsum, in a graph it is given, as the
two einsums torch itself contracts it into (left to right: ``q k`` over the shared head dim,
the mask multiplied in, then ``v`` over the keys)::

    s = einsum('bhqd,bhkd,hqk->bhqk', q, k, L)    # the mask as the score einsum's third operand
    o = einsum('bhqk,bhkv->bhqv', s, v)

which the parallel pattern claims when the mask proves out. The caller (``find_regions_split``
in ``detect/__init__.py``) splits a copy, keeps the split only for the einsums then claimed,
and leaves a declined one as the user wrote it.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from .einsum import parse_einsum
from .graph_view import example

# the start of the declined row's reason (``patterns_parallel.fused_einsums``)
FUSED_REASON = "one einsum computes both the scores and the values"


def roles(node: fx.Node) -> tuple[str, str, list[fx.Node], list[fx.Node]] | None:
    """(score equation, value equation, its operands (q, k, mask), (v,)) of a four-operand
    retention einsum, or None when the roles are not each taken by exactly one operand: q and
    k share exactly one contracted letter that no other operand or the output has, v alone has
    a letter that only the output shares, and the mask's letters are all the scores'."""
    parsed = parse_einsum(node)
    if parsed is None or len(parsed[0]) != 4:
        return None
    ins, out, operands = parsed
    if any(len(set(s)) != len(s) for s in (*ins, out)):
        return None  # NOTE: a repeated letter (a diagonal) is not a product this splits
    counts = {c: sum(c in s for s in ins) for c in set("".join(ins))}
    own = [i for i, s in enumerate(ins) if any(counts[c] == 1 and c in out for c in s)]
    pairs = [
        (i, j)
        for i in range(4)
        for j in range(i + 1, 4)
        if [c for c in ins[i] if c in ins[j] and counts[c] == 2 and c not in out]
    ]
    if len(own) != 1 or len(pairs) != 1 or own[0] in pairs[0]:
        return None
    (qi, ki), vi = pairs[0], own[0]
    # NOTE: q is the one of the pair whose own letters (the queries) the output keeps
    if not (set(ins[qi]) - set(ins[ki]) <= set(out) and set(ins[ki]) - set(ins[qi]) - set(out)):
        qi, ki = ki, qi
    (mi,) = set(range(4)) - {qi, ki, vi}
    contracted = [c for c in ins[qi] if c in ins[ki] and counts[c] == 2 and c not in out]
    if len(contracted) != 1:
        return None
    scores = "".join(c for c in ins[qi] if c not in contracted)
    scores += "".join(c for c in ins[ki] if c not in contracted and c not in scores)
    value_only = [c for c in ins[vi] if c not in scores]
    if not set(ins[mi]) <= set(scores) or not set(out) <= set(scores) | set(ins[vi]):
        return None
    keys = [c for c in scores if c not in ins[qi]]
    if not value_only or not keys or any(c in out or c not in ins[vi] for c in keys):
        return None  # NOTE: the value einsum must sum over the keys (kept: no retention)
    score_eq = f"{ins[qi]},{ins[ki]},{ins[mi]}->{scores}"
    value_eq = f"{scores},{ins[vi]}->{out}"
    return score_eq, value_eq, [operands[qi], operands[ki], operands[mi]], [operands[vi]]


def split_fused(gm: fx.GraphModule, names: set[str]) -> dict[str, str]:
    """Split each four-operand retention einsum of ``gm`` named in ``names`` (in place); returns
    {the einsum's name: the name of the value einsum that now computes its result}."""
    done = {}
    for node in list(gm.graph.nodes):
        if node.name not in names or node.op != "call_function":
            continue
        found = roles(node)
        values = [example(n) for n in node.all_input_nodes]
        if found is None or not all(isinstance(v, torch.Tensor) for v in values):
            continue
        score_eq, value_eq, score_args, value_args = found
        with gm.graph.inserting_before(node):
            scores = gm.graph.call_function(node.target, (score_eq, *score_args))
            result = gm.graph.call_function(node.target, (value_eq, scores, *value_args))
        # NOTE: the mode of the example values themselves (the tracing context's may differ)
        fake = next((v.fake_mode for v in values if isinstance(v, FakeTensor)), None)
        with fake if fake is not None else torch.no_grad():
            s = torch.einsum(score_eq, *(example(n) for n in score_args))
            o = torch.einsum(value_eq, s, *(example(n) for n in value_args))
        for new, value in ((scores, s), (result, o)):
            new.meta = {**node.meta, "example_value": value}
            new.meta.pop("val", None)
        node.replace_all_uses_with(result)
        gm.graph.erase_node(node)
        done[node.name] = result.name
    if done:
        gm.recompile()
    return done
