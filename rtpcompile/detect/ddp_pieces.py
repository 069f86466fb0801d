"""What a backend needs to know about graphs that Dynamo's DDPOptimizer split (torch 2.13).

Under ``torch.compile(DDP(model))`` the DDPOptimizer cuts the forward graph at gradient-bucket
boundaries and calls the backend once per piece with FAKE example inputs. Placeholders that
were inputs of the whole graph keep ``meta["grapharg"]`` (its ``.example`` is the real tensor);
placeholders that carry a value computed in another piece have none. This module only reads
graphs (no imports from the rest of rtpcompile), so the backend may use it freely.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx as fx

BUCKET_CUT = (
    "region cut by a DDP bucket boundary (DDPOptimizer graph split: {names} computed in another "
    "graph piece); raise DDP's bucket_cap_mb or set torch._dynamo.config.optimize_ddp=False"
)


def is_ddp_piece(gm: fx.GraphModule) -> bool:
    """True for a piece of a graph split by Dynamo's DDPOptimizer."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    return "DDPOptimizer" in str(getattr(reason, "reason", ""))


def _real_example(node: fx.Node):
    grapharg = node.meta.get("grapharg")
    if grapharg is None:
        return None
    try:
        return grapharg.example
    except Exception:  # noqa: BLE001 - a collected weakref or a non-tensor argument
        return None


def foreign_inputs(gm: fx.GraphModule) -> set[str]:
    """Names of placeholders whose values another graph piece computes (empty if not split)."""
    if not is_ddp_piece(gm):
        return set()
    return {n.name for n in gm.graph.find_nodes(op="placeholder") if "grapharg" not in n.meta}


def real_example_inputs(gm: fx.GraphModule, example_inputs: list) -> list:
    """``example_inputs`` with every fake tensor replaced by the real value Dynamo recorded.

    Inputs computed in another piece have no recorded value and stay as they are (fake).
    """
    fake = [isinstance(x, torch._subclasses.FakeTensor) for x in example_inputs]
    if not any(fake):
        return list(example_inputs)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    out = []
    for node, x, is_fake in zip(placeholders, example_inputs, fake, strict=True):
        real = _real_example(node) if is_fake else None
        out.append(real if isinstance(real, torch.Tensor) else x)
    return out


def bucket_cut_reason(gm: fx.GraphModule, region_inputs: Iterable[str]) -> str | None:
    """The decline reason when any of ``region_inputs`` (placeholder names a region's scores or
    mask depend on) comes from another DDP graph piece, else None."""
    cut = sorted(foreign_inputs(gm) & set(region_inputs))
    return BUCKET_CUT.format(names=", ".join(cut)) if cut else None
