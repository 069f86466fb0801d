"""What eager does inside a region that the op would not: a grad-mode switch, a functorch
grad or jvp level, a narrowing cast.

The op replaces the whole region with one call, placed where the region's output (or new
state) was, under the grad mode there, on the operands before their casts. So a region part of
which runs under ``torch.no_grad()`` (the scores of a frozen attention pattern) would give q and
k gradients eager leaves None, or drop the gradient of a read-out outside the no-grad span; and a
cast to a narrower float dtype inside the region (``(q @ kᵀ).half().float()``) rounds what eager
multiplies, where the op keeps the wider values (closer to exact, but not eager's result).
A region inside a ``torch.func`` grad or jvp transform written in the compiled function (grad,
vjp, jacrev, jvp, jacfwd, hessian, a ``forward_ad.dual_level``) reads tensors of that
transform's level: the op has no functorch rule, so AOTAutograd could not trace it there.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .graph_view import GraphView, example, is_tensor, kind_of, target_name
from .region import Region

# NOTE: matched by name: Dynamo records ``torch._C._functorch`` and ``torch._functorch.predispatch``
# spellings of these (grad's from the first, jvp's and the dual level's from the second in 2.13)
_ENTER_LEVEL = {"_grad_increment_nesting", "_jvp_increment_nesting", "_enter_dual_level"}
_EXIT_LEVEL = {"_grad_decrement_nesting", "_jvp_decrement_nesting", "_exit_dual_level"}
_LEVEL_WRAP = {"_wrap_for_grad", "_make_dual"}


def grad_mode_inside(view: GraphView, region: Region, named: dict) -> str | None:
    """Why the region is declined: its nodes (its output and new state included) run under
    different grad modes (a ``_set_grad_enabled`` switch between them), or inside a functorch
    grad or jvp level (:func:`in_transform`); None when neither. A switch around something else
    between them (a frozen layer making v) does not count."""
    members = {named[n] for n in region.nodes if n in named}
    members |= {named[n] for n in (region.output, region.state_output) if n in named}
    if in_transform(view, members):
        return (
            "inside a torch.func transform (grad/vjp/jacrev/jvp/jacfwd/hessian or a "
            "forward_ad dual level): the rtp op has no functorch rule"
        )
    at = grad_modes(view)
    if len({at[node] for node in members if node in at}) > 1:
        return (
            "part of it runs under another grad mode (torch.no_grad / set_grad_enabled / "
            "inference_mode switches inside the region): the op runs under one mode, so q, k or "
            "the decay would get gradients eager leaves None, or lose ones eager gives"
        )
    return None


def grad_modes(view: GraphView, entry: bool | None = None) -> dict[fx.Node, bool]:
    """Whether each node runs with gradients on (``_set_grad_enabled`` switches, inference
    mode spans), starting from the mode the graph was entered with (``entry``; by default the
    current one: Dynamo guards on it and compiles under it). An ``inference_mode`` span inside a
    region was not seen until 2026-11-25: its scores were claimed and got gradients eager does
    not give."""
    mode = torch.is_grad_enabled() if entry is None else entry
    stack, modes = [], {}
    for node in view.nodes:
        name = target_name(node) if node.op == "call_function" else ""
        if name == "_set_grad_enabled" and node.args:
            mode = bool(node.args[0])
        elif name == "_enter_inference_mode":
            stack.append(mode)
            mode = mode and not (node.args and node.args[0])
        elif name == "_exit_inference_mode" and stack:
            mode = stack.pop()
        modes[node] = mode
    return modes


def in_transform(view: GraphView, members: set[fx.Node]) -> bool:
    """Whether one of ``members`` runs between a functorch grad or jvp level's entry and exit,
    or reads a tensor wrapped for one. ``vmap``'s levels do not count: the op is claimed there."""
    depth = 0
    for node in view.nodes:
        name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
        if name in _ENTER_LEVEL:
            depth += 1
        elif name in _EXIT_LEVEL:
            depth = max(depth - 1, 0)
        elif node in members:
            if depth:
                return True
            for arg in node.all_input_nodes:
                if arg.op == "call_function" and getattr(arg.target, "__name__", "") in _LEVEL_WRAP:
                    return True
    return False


def narrowing_cast(region: Region, named: dict) -> str | None:
    """Why the region is declined: a cast inside it to a float dtype of lower precision. A
    value computed narrow and widened (``(q.bfloat16() @ k.bfloat16().mT).float()``, a bf16
    outer product ``.float()`` into a float32 state) is claimed: the op computes it wider,
    closer to exact than eager (docs/zoo.md). The mask's own casts are not region nodes: the
    proof reads the wider mask on purpose."""
    for name in region.nodes:
        node = named.get(name)
        if node is None or kind_of(node) != "cast" or not node.args:
            continue
        src = node.args[0]
        after, before = example(node), example(src) if isinstance(src, fx.Node) else None
        if not (is_tensor(after) and is_tensor(before)):
            continue
        if after.is_floating_point() and before.is_floating_point():
            if torch.finfo(after.dtype).eps > torch.finfo(before.dtype).eps:
                return (
                    f"a cast inside it ({name}) narrows {before.dtype} to {after.dtype}: eager "
                    "rounds there and the op would not (cast q, k and v before the region, or "
                    "compute it under autocast)"
                )
    return None


def unplaceable(view: GraphView, region: Region, named: dict) -> str | None:
    """Why the region is declined: no single place in the graph follows all its operands and
    precedes every use of its outputs (a chunk step whose new state is read before its mask is
    built), which is where the rewrite puts its one op call; None when there is one."""
    operands = [op.node for op in (region.q, region.k, region.v, region.state) if op is not None]
    operands += list(region.masks)
    operands += [v for _, v in (*region.pre, *region.post) if isinstance(v, str)]
    nodes = [named[n] for n in operands if n in named]
    outputs = [named[n] for n in (region.output, region.state_output) if n in named]
    if not nodes or not outputs:
        return None
    last = max(nodes, key=view.order.__getitem__)
    use = min((u for out in outputs for u in out.users), key=view.order.__getitem__, default=None)
    if use is None or view.order[last] < view.order[use]:
        return None
    return (
        f"its operand {last.name} is computed after {use.name} reads its output: one op call "
        "cannot come after the one and before the other"
    )
