"""rtp op calls already in the graph: ``torch.ops.rtp.retention_fwd`` written by the user.

Retrofitted layers (``rtpcompile.convert``) and code that calls ``rtpcompile.ops`` directly put
the op itself in the Dynamo graph. There is nothing to prove or rewrite: each call is claimed
as-is (``Region.native``), so ``explain()`` lists it and the backend counts it, and the op plans
its own lowering at run time. The region records the op's requested ``form`` and ``chunk_size``,
whether a state comes in or goes out, the example sizes, and the decay when it is computed from
model constants (a buffer or parameter, possibly through e.g. ``sigmoid``); otherwise the decay
is shown as "runtime".
"""

from __future__ import annotations

import operator
import types

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from . import mask_proof, mask_provenance
from .graph_view import GraphView, example, hint, is_tensor, where
from .region import Operand, Region

OP_NAME = "rtp::retention_fwd"
# NOTE: frames inside the public op wrappers say nothing about the user's code; the source line
# shown is the innermost frame outside them (e.g. the converted layer's ``ops.retention`` call).
_WRAPPER_FILES = ("rtpcompile/ops.py", "rtpcompile/lowering/eager.py")


def op_schema(target) -> torch.FunctionSchema | None:
    """The schema when ``target`` is the rtp retention op (packet or overload), else None."""
    if isinstance(target, torch._ops.OpOverloadPacket):
        if target._qualified_op_name != OP_NAME:
            return None
        return target.default._schema
    if isinstance(target, torch._ops.OpOverload) and target._schema.name == OP_NAME:
        return target._schema
    return None


def bound_args(node: fx.Node, schema: torch.FunctionSchema) -> dict[str, object]:
    """The call's arguments by schema name (positional and keyword alike)."""
    names = [a.name for a in schema.arguments]
    bound = dict(zip(names, node.args, strict=False))
    bound.update(node.kwargs)
    return bound


def find_native(view: GraphView, example_inputs: list) -> list[Region]:
    """One claimed, native Region per rtp retention op call in the graph."""
    regions = []
    for node in view.nodes:
        if node.op != "call_function":
            continue
        schema = op_schema(node.target)
        if schema is not None:
            regions.append(_region(view, node, bound_args(node, schema), example_inputs))
    return regions


def _user_where(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    kept = [
        line
        for line in trace.splitlines()
        if not (line.strip().startswith("File ") and any(f in line for f in _WRAPPER_FILES))
    ]
    shown = types.SimpleNamespace(
        name=node.name, meta={**node.meta, "stack_trace": "\n".join(kept)}
    )
    return where(shown)


def _result(node: fx.Node, index: int) -> fx.Node | None:
    """The ``getitem(node, index)`` user that reads one of the op's two results, if any."""
    for user in node.users:
        if user.target is operator.getitem and user.args[1] == index:
            return user
    return None


def _region(view: GraphView, node: fx.Node, args: dict, example_inputs: list) -> Region:
    q, k, v = (args.get(name) for name in ("q", "k", "v"))
    state = args.get("initial_state")
    output, state_out = _result(node, 0), _result(node, 1)
    if args.get("output_final_state", True) is False:
        state_out = None  # NOTE: its second result is then an empty tensor, not a state
    form, chunk = args.get("form"), args.get("chunk_size")
    eq, ev = (example(x) if isinstance(x, fx.Node) else None for x in (q, v))
    shaped = is_tensor(eq) and is_tensor(ev) and eq.dim() == 4 and ev.dim() == 4
    return Region(
        written=f"rtp op ({form})",
        where=_user_where(node),
        output=(output or node).name,
        nodes=tuple(n.name for n in (node, output, state_out) if n is not None),
        q=Operand(q.name) if isinstance(q, fx.Node) else None,
        k=Operand(k.name) if isinstance(k, fx.Node) else None,
        v=Operand(v.name) if isinstance(v, fx.Node) else None,
        state=Operand(state.name) if isinstance(state, fx.Node) else None,
        state_output=state_out.name if state_out is not None else None,
        seq_len=hint(eq.shape[2]) if shaped else None,
        heads=hint(eq.shape[1]) if shaped else None,
        k_dim=hint(eq.shape[3]) if shaped else None,
        v_dim=hint(ev.shape[3]) if shaped else None,
        decay=_constant_decay(view, args.get("gamma"), example_inputs),
        native=True,
        form=str(form),
        chunk_size=chunk if isinstance(chunk, int) else 0,
    )


def _constant_decay(view: GraphView, gamma, example_inputs: list) -> tuple[float, ...]:
    """The per-head gamma when it derives from model constants only; () when it is run-time."""
    if not isinstance(gamma, fx.Node) or not example_inputs:
        return ()
    if mask_provenance.check_provenance(view, [gamma]) is not None:
        return ()
    try:
        with unset_fake_temporarily(), torch.no_grad():
            (value,) = mask_proof.evaluate(view, [gamma], example_inputs, mask_proof.Sizes(0, 0))
    except Exception:  # noqa: BLE001 - only the decay column is at stake: shown as "runtime"
        return ()
    if not is_tensor(value) or value.is_complex():
        return ()
    return tuple(float(g) for g in value.detach().double().reshape(-1))
