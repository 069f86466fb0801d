"""Detection: find retention regions in a Dynamo FX graph and prove them (never mutates).

``find_regions(gm, example_inputs)`` returns one :class:`Region` per candidate, claimed or
declined with a reason. Every decision is counted in :data:`counters` and logged under the
``rtpcompile`` logger. rtp op calls already in the graph (retrofitted layers, direct
``rtpcompile.ops`` calls) are claimed as-is: native regions, counted also as ``regions_native``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

import torch
import torch.fx as fx
from torch._ops import HigherOrderOperator
from torch.utils._sympy.symbol import SymT, symbol_is_type

from . import subgraphs
from .fused_einsum import FUSED_REASON, split_fused
from .graph_view import (
    GraphView,
    assumed_equal_sizes,
    copy_graph_module,
    example,
    guard_equal,
    hint,
    is_tensor,
    kind_of,
    where,
)
from .mutation import written_between
from .patterns_chunk import merge_chunk_steps
from .patterns_native import find_native
from .patterns_parallel import find_parallel
from .patterns_recurrent import find_recurrent
from .region import Operand, Region
from .region_checks import grad_mode_inside, narrowing_cast, unplaceable

__all__ = ["Operand", "Region", "counters", "find_regions", "find_regions_split"]

log = logging.getLogger("rtpcompile")
counters: collections.Counter = collections.Counter()


def _with_example_call(region: Region, named: dict[str, fx.Node]) -> Region:
    """The region with its example call's batch, dtype and device (from q's example value)."""
    value = example(named[region.q.node]) if region.q and region.q.node in named else None
    if not is_tensor(value):
        return region
    batch = None
    if region.heads and region.seq_len and region.k_dim and region.heads > 0:
        rows = region.heads * region.seq_len * region.k_dim
        numel = hint(value.numel())
        batch = numel // rows if numel > 0 and numel % rows == 0 else None
    dtype = str(value.dtype).removeprefix("torch.")
    return dataclasses.replace(region, batch=batch, dtype=dtype, device=str(value.device))


def _unsearched_subgraphs(gm: fx.GraphModule) -> list[Region]:
    """A declined region for each higher-order op left in the graph (cond, while_loop, ...;
    ``subgraphs.flatten`` inlined the checkpoint and nested compile region bodies) whose body holds
    two matrix products or more: detection does not search inside them, and explain() should
    say so rather than show nothing."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, HigherOrderOperator):
            continue
        attrs = [getattr(gm, a.target, None) for a in node.args
                 if isinstance(a, fx.Node) and a.op == "get_attr"]  # fmt: skip
        subs = [sub for sub in attrs if isinstance(sub, fx.GraphModule)]
        products = sum(kind_of(n) == "matmul" for sub in subs for n in sub.graph.nodes)
        if products >= 2:
            found.append(
                Region(
                    written=f"{node.target.name()} subgraph",
                    where=where(node),
                    output=node.name,
                    reason=f"inside a {node.target.name()} subgraph: of the higher-order ops "
                    "only checkpoint and nested compile region bodies are searched; keep the "
                    "retention outside",
                )
            )
    return found


def find_regions_split(
    gm: fx.GraphModule, example_inputs: list
) -> tuple[fx.GraphModule, list[Region]]:
    """``find_regions``, with a retention written as one einsum of four operands split into its
    score and value einsums (``fused_einsum.py``) where that makes it a claimed region: returns
    (the graph the regions are of, the regions). The graph is ``gm`` itself unless a split was
    kept (then a copy, with only the claimed einsums split: a declined one stays as written).
    ``counters`` count the regions returned, not those of the passes tried."""
    start = collections.Counter(counters)
    regions = find_regions(gm, example_inputs)
    fused = {
        r.output
        for r in regions
        if not r.claimed and not r.scope and (r.reason or "").startswith(FUSED_REASON)
    }
    if not fused:
        return gm, regions
    trial = copy_graph_module(gm)
    outputs = split_fused(trial, fused)
    if not outputs:
        return gm, regions
    first = collections.Counter(counters)
    trial_regions = find_regions(trial, example_inputs)
    claimed = {r.output for r in trial_regions if r.claimed and not r.scope}
    keep = {name for name, out in outputs.items() if out in claimed}
    if keep == set(outputs):
        _count_only(start, first)  # NOTE: the trial's regions replace the first pass's
        return trial, trial_regions
    counters.clear()  # NOTE: the first pass's regions stand (or the final pass's, below)
    counters.update(first)
    base = gm
    if keep:
        base = copy_graph_module(gm)
        split_fused(base, keep)
        regions = find_regions(base, example_inputs)
        _count_only(start, first)
    # NOTE: a split that was declined says why: the split value einsum's reason
    why = {r.output: r.reason for r in trial_regions if not r.claimed and not r.scope}
    equations = {n.name: n.args[0] for n in gm.graph.nodes if n.name in outputs}
    return base, [_split_reason(r, outputs, why, equations) for r in regions]


def _count_only(start: collections.Counter, before: collections.Counter) -> None:
    """``counters`` as at ``start`` plus what the last pass added since ``before``."""
    added = {key: n - before.get(key, 0) for key, n in counters.items()}
    counters.clear()
    counters.update(start)
    counters.update({key: n for key, n in added.items() if n})


def _split_reason(region: Region, outputs: dict, why: dict, equations: dict) -> Region:
    if region.claimed or region.scope or region.output not in outputs:
        return region
    # NOTE: no row at all: the split einsums are not a score and a value product detection
    # reads (the mask's axes, or operand sizes, not those of a retention)
    reason = why.get(outputs[region.output]) or (
        "no retention candidate in them (the mask's axes or the operands' sizes are not a "
        "causal retention's)"
    )
    return dataclasses.replace(
        region,
        reason=f"{FUSED_REASON} ({equations[region.output]!r}); split into its score and value "
        f"einsums, it is declined: {reason}",
    )


def find_regions(gm: fx.GraphModule, example_inputs: list) -> list[Region]:
    """Every retention candidate of ``gm``: claimed regions first use no node twice.

    Two size symbols with the same example value count as one size (q's and k's lengths of a
    function taking both); when a region is claimed they are guarded equal (``guard_equal``).
    A Python number Dynamo lifted to a graph input that a claimed region's mask reads is guarded
    to its value (``_lifted_numbers``)."""
    with assumed_equal_sizes() as pairs:
        regions, numbers = _find_regions(gm, example_inputs)
    if any(region.claimed for region in regions):
        guard_equal(pairs)
    for region, read in zip(regions, numbers, strict=True):
        for number in read if region.claimed else ():
            float(number)  # NOTE: a guard that it keeps its example value
    return regions


def _lifted_numbers(region: Region, named: dict[str, fx.Node]) -> list:
    """The symbolic floats (with an example value) the region's mask and score factors read.

    NOTE: under ``dynamic=True`` (or at a recompile) Dynamo passes a float attribute of the
    model as a 0-d tensor input read by ``.item()``, and the graph runs with whatever value it
    has at the call: the proof read it at its example value, where it may decide the mask's
    structure (``leak * (d < 0)`` is causal only at leak = 0), so it is guarded to that value
    (changing it recompiles), as Dynamo does for a float it does not lift."""
    todo = [named[m] for m in region.masks if m in named]
    factors = (v for _, v in (*region.pre, *region.post) if isinstance(v, str))
    todo += [named[f] for f in factors if f in named]
    seen, found = set(), []
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        value = example(node)
        if _lifted(value):
            found.append(value)
        todo += node.all_input_nodes
    return found


def _lifted(value) -> bool:
    """A symbolic float of float symbols only, with an example value: a lifted Python number.
    Never one that reads a size (``T ** 0.5``): guarding it would fix the length."""
    if not isinstance(value, torch.SymFloat) or value.node.hint is None:
        return False
    symbols = value.node.expr.free_symbols
    return bool(symbols) and all(symbol_is_type(s, SymT.FLOAT) for s in symbols)


def _checked(view: GraphView, region: Region, named: dict, used: set[str]) -> Region:
    """The region, declined when it overlaps a claimed one (``used``: their nodes) or eager does
    something inside it that the op would not (an in-place write, a grad-mode switch, a
    narrowing cast), or the op call has no place (``unplaceable``)."""
    if region.claimed and used & set(region.nodes):
        return region.declined("overlaps another claimed region")
    if region.claimed and not region.native:
        why = (
            written_between(view, region, named)
            or grad_mode_inside(view, region, named)
            or narrowing_cast(region, named)
            or unplaceable(view, region, named)
        )
        return region if why is None else region.declined(why)
    return region


def _find_regions(gm: fx.GraphModule, example_inputs: list) -> tuple[list[Region], list[list]]:
    flat = subgraphs.flatten(gm)
    view = GraphView(flat.gm if flat is not None else gm)
    parallel = find_parallel(view, example_inputs)
    merged = merge_chunk_steps(view, parallel, example_inputs)
    # NOTE: a chunk step declined below (a write to its state after the cross term) keeps its
    # parallel part, as one never merged does
    unmerged = {m.output: p for m, p in zip(merged, parallel, strict=True) if m is not p}
    found = find_native(view, example_inputs) + find_recurrent(view, example_inputs) + merged
    found += _unsearched_subgraphs(view.gm)
    named = {node.name: node for node in view.nodes}
    found.sort(key=lambda r: view.order.get(named.get(r.output or r.state_output or ""), 0))
    regions: list[Region] = []
    numbers: list[list] = []
    used: set[str] = set()
    for region in (_with_example_call(r, named) for r in found):
        checked = _checked(view, region, named, used)
        if not checked.claimed and region.claimed and region.output in unmerged:
            checked = _checked(
                view, _with_example_call(unmerged[region.output], named), named, used
            )
        region = checked
        if region.claimed:
            used |= set(region.nodes)
        numbers.append(_lifted_numbers(region, named) if region.claimed else [])
        regions.append(subgraphs.localize(flat, region))
    regions = subgraphs.agree(flat, regions)
    for region in regions:
        verdict = "claimed" if region.claimed else "declined"
        counters[f"regions_{verdict}"] += 1
        if region.native:
            counters["regions_native"] += 1
        log.debug(
            "rtp %s %s region at %s%s",
            verdict,
            region.written,
            region.where,
            "" if region.claimed else f": {region.reason}",
        )
    return regions, numbers
