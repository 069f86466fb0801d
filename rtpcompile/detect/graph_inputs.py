"""Where a graph input comes from, and the boundaries of the bodies inlined into the graph.

Dynamo names each graph input's origin: model state (a module's buffer, parameter or
attribute), a caller's object (a decode cache), or an activation. ``boundary`` marks where a
value enters or leaves a checkpoint's or nested compile region's body in the flat graph.
"""

from __future__ import annotations

import torch.fx as fx


def is_constant_source(node: fx.Node) -> bool:
    """True for a placeholder that holds a module buffer/parameter/attribute (not an input).

    Dynamo names the origin of each graph input in ``meta["grapharg"].source``; anything reached
    through an attribute access (``L['self']._buffers['decay']``, ``G['table']``) is model state,
    a bare local (``L['x']``, ``L['args'][0]``) is an activation. A value read through a module
    (``NNModuleSource``, ``UnspecializedNNModuleSource``) is model state however it is reached:
    a float set in the class body comes through the module's type
    (``type(L['self']).__dict__['gamma']``, lifted to a graph input under ``dynamic=True``).
    """
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    while source is not None:
        name = type(source).__name__
        if name in ("AttrSource", "GlobalSource", "GlobalWeakRefSource") or (
            name.endswith("NNModuleSource")
        ):
            return True
        if "._buffers[" in source.name or "._parameters[" in source.name:
            return True
        source = getattr(source, "base", None)
    return False


def is_input_attribute(node: fx.Node) -> bool:
    """True for a placeholder read from an attribute of a call argument that is not an
    ``nn.Module`` (``L['cache'].layers[0].state``, ``batch.mask``): caller-owned state, not model
    state. Dynamo marks a module in the source chain (``UnspecializedNNModuleSource``), whatever
    the argument is called (``self``, ``me``, explain's throwaway caller's ``model``)."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    if source is None or "._buffers[" in source.name or "._parameters[" in source.name:
        return False
    attribute = False
    while getattr(source, "base", None) is not None:
        if "NNModuleSource" in type(source).__name__:
            return False
        attribute |= type(source).__name__ == "AttrSource"
        source = source.base
    return attribute and type(source).__name__ == "LocalSource"


def boundary(x):
    """Where a value enters or leaves a checkpoint's or nested compile region's body in the flat
    graph ``detect.subgraphs`` builds (returns ``x``): detection reads an operand from here
    rather than across the boundary, and the mask proof evaluates it."""
    return x


# meta key of a boundary node through which a value leaves a body (a body's output)
LEAVES_BODY = "rtp_leaves_body"


def through_boundaries(node):
    """The value a chain of :func:`boundary` nodes passes on (``node`` itself if none)."""
    while isinstance(node, fx.Node) and node.target is boundary and node.args:
        node = node.args[0]
    return node


def is_state_input(node) -> bool:
    """A graph input that can carry a retention state: an activation argument, or an attribute
    of a caller's object (a decode cache), never the model's own buffers or parameters. A body's
    input (a :func:`boundary` node) is the value its call passes in."""
    node = through_boundaries(node)
    return (
        isinstance(node, fx.Node)
        and node.op == "placeholder"
        and (not is_constant_source(node) or is_input_attribute(node))
    )
