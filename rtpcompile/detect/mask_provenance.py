"""What a mask reads: the provenance half of the mask proof (``mask_proof.py``).

A mask may read only constants, module buffers/parameters/attributes and sizes
(``check_provenance``). Trainable parameters (``trainable_inputs``) and other model state
(``_state_reach``) may later take other values: ``_state_moves_diagonal`` tells whether such
state moves the mask's diagonal, which the op then reads at run time.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .ddp_pieces import bucket_cut_reason
from .decay_fit import per_head
from .graph_view import (
    GraphView,
    example,
    is_constant_source,
    is_input_attribute,
    is_random,
    is_tensor,
)
from .mask_eval import Sizes, evaluate, lengths_for, subgraph, trainable
from .position_ops import _CUTOFFS, _PERIODS, _name


def check_provenance(view: GraphView, masks: list[fx.Node]) -> str | None:
    """None when every mask depends only on constants, buffers and sizes; else the reason."""
    for mask in masks:
        values, _, written = subgraph(view, mask)
        if written is not None:
            return f"the mask or what it is built from is written in place: {written}"
        for node in view.sorted(values):
            if is_random(node):
                return f"the mask is random ({node.name})"
            if node.op == "placeholder" and is_tensor(example(node)):
                # NOTE: an attribute of a call argument (``batch.mask``) changes with the call
                if not is_constant_source(node) or is_input_attribute(node):
                    # NOTE: a value another DDP graph piece computed (a bucket boundary cut the
                    # mask's subgraph) says so: the user can move the boundary
                    cut = bucket_cut_reason(view.gm, [node.name])
                    return cut or f"the mask depends on activations (input {node.name!r})"
    return None


def trainable_inputs(view: GraphView, masks: list[fx.Node], inputs: list) -> list[str]:
    """The mask's ancestors that are trainable parameters (graph inputs requiring grad)."""
    index = {node: i for i, node in enumerate(view.placeholders)}
    found = []
    for mask in masks:
        values, _, _ = subgraph(view, mask)
        for node in view.sorted(values | {mask}):
            value = inputs[index[node]] if node in index and index[node] < len(inputs) else None
            if trainable(value):
                found.append(node.name)
    return sorted(set(found))


# NOTE: the longest length at which _state_moves_diagonal re-fits the mask (see there)
MAX_STATE_FIT_T = 1024


# NOTE: ops whose output a small move of their input may leave unchanged (a threshold, a clamp
# at its bound, a rounding): a state reaching the mask through one is never "moved" enough
_STEPS = _CUTOFFS | _PERIODS | {"round", "floor", "ceil", "trunc", "frac"}


def _state_reach(
    view: GraphView, masks: list[fx.Node], inputs: list, trainable: bool = False
) -> str | None:
    """How model state that is not trainable (tensor inputs; ``trainable``: the trainable ones)
    reaches the masks: None (it does not), "smooth", or "step" (a bool/int state, or a path
    through a threshold, clamp or rounding, or a value that is not floating: a moved state may
    not show there)."""
    index = {node: i for i, node in enumerate(view.placeholders)}
    found = None
    for mask in masks:
        values, _, _ = subgraph(view, mask)
        reached: set[fx.Node] = set()
        for node in view.sorted(values | {mask}):
            i = index.get(node)
            if i is not None:
                value = inputs[i] if i < len(inputs) else None
                if is_tensor(value) and value.requires_grad == trainable:
                    if not value.is_floating_point():
                        return "step"
                    reached.add(node)
                    found = "smooth"
                continue
            if not any(arg in reached for arg in node.all_input_nodes):
                continue
            reached.add(node)
            value = example(node)
            if _name(node) in _STEPS or (is_tensor(value) and not value.is_floating_point()):
                return "step"
    return found


def _state_moves_diagonal(view, masks, transform, inputs, seq, batch_ndim, tolerance) -> bool:
    """Whether other values of the model state the mask reads (buffers, frozen parameters,
    tensor attributes: a later ``load_state_dict`` or ``copy_`` gives them) move its diagonal:
    then the op reads the diagonal at run time (a row scale).

    NOTE: a per-head temperature buffer of ones at compile time, changed later, was silently
    ignored (the output kept a row scale of 1). The mask is evaluated once with every such
    input moved (``_moved``) and its diagonal compared with the unmoved one; no fit, so a state
    that breaks the structure when moved (a precomputed full mask beside the temperature) still
    counts: reading the diagonal is always right, only not free (a gather and a multiply of the
    output per call). A mask that cannot be evaluated moved answers yes. Past
    ``MAX_STATE_FIT_T`` (a static T, evaluated at its own length only) any such state answers
    yes without evaluating, and so does a state that reaches the mask through a step
    (``_state_reach``: a head gate ``decay * (gate >= 0.5)`` or a bool/int buffer, which a small
    move leaves unchanged)."""
    # NOTE: a trainable input is moved by the fits instead, which a clamp at its bound hides
    # (``decay * p.clamp(max=1)`` with p = 2 at compile time): through a step, read the diagonal
    if _state_reach(view, masks, inputs, trainable=True) == "step":
        return True
    reach = _state_reach(view, masks, inputs)
    if reach != "smooth":
        return reach == "step"
    lengths = lengths_for(seq)
    t = next((t for t in lengths if t >= 2), lengths[-1])
    if t > MAX_STATE_FIT_T:
        # NOTE: at a static T = 4096 this check doubled the proof's time (4.9 -> 10 s for the
        # demo model); reading the diagonal costs ~2% of its forward there instead
        return True
    sizes = Sizes(seq, t)
    diagonals = []
    for generator in (None, torch.Generator().manual_seed(t + 1)):
        try:
            with unset_fake_temporarily(), torch.no_grad():
                values = evaluate(view, masks, inputs, sizes, generator, move_state=True)
                mask = transform(values)
        except Exception:  # noqa: BLE001 - cannot tell: read the diagonal
            return True
        reason, heads = per_head(mask, t, batch_ndim)
        if reason is not None or heads.is_complex():
            return True
        diagonals.append(heads.diagonal(dim1=-2, dim2=-1).double())
    rtol, atol = tolerance
    return not torch.allclose(*diagonals, rtol=rtol, atol=atol, equal_nan=True)
