"""Detection: find retention regions in a Dynamo FX graph and prove them (never mutates).

``find_regions(gm, example_inputs)`` returns one :class:`Region` per candidate, claimed or
declined with a reason. Every decision is counted in :data:`counters` and logged under the
``rtpcompile`` logger. rtp op calls already in the graph (retrofitted layers, direct
``rtpcompile.ops`` calls) are claimed as-is: native regions, counted also as ``regions_native``.
"""

from __future__ import annotations

import collections
import logging

import torch.fx as fx

from .graph_view import GraphView
from .patterns_chunk import merge_chunk_steps
from .patterns_native import find_native
from .patterns_parallel import find_parallel
from .patterns_recurrent import find_recurrent
from .region import Operand, Region

__all__ = ["Operand", "Region", "counters", "find_regions"]

log = logging.getLogger("rtpcompile")
counters: collections.Counter = collections.Counter()


def find_regions(gm: fx.GraphModule, example_inputs: list) -> list[Region]:
    """Every retention candidate of ``gm``: claimed regions first use no node twice."""
    view = GraphView(gm)
    parallel = merge_chunk_steps(view, find_parallel(view, example_inputs), example_inputs)
    found = find_native(view, example_inputs) + find_recurrent(view, example_inputs) + parallel
    named = {node.name: node for node in view.nodes}
    found.sort(key=lambda r: view.order.get(named.get(r.output or r.state_output or ""), 0))
    regions: list[Region] = []
    used: set[str] = set()
    for region in found:
        if region.claimed and used & set(region.nodes):
            region = region.declined("overlaps another claimed region")
        if region.claimed:
            used |= set(region.nodes)
        regions.append(region)
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
    return regions
