"""Step 1 of the MLIR export: a torch.export program with every retention region decomposed.

Retention regions reach the exported program as ``torch.ops.rtp.retention_fwd`` nodes: models
that call :mod:`rtpcompile.ops` produce them directly, and the reference
``MultiScaleRetention`` modules (written in the paper's parallel form) are routed through the
op for the duration of the export. ``run_decompositions`` then replaces each op node by the
chosen form's plain-aten decomposition (:mod:`.decompose`), so no custom op is left.
"""

from __future__ import annotations

import contextlib
import re
import types
import warnings

import torch
from torch import Tensor, nn

from .. import ops
from ..detect.graph_view import hint
from ..nn.retention import MultiScaleRetention, overridden_core
from .decompose import DEFAULT_EXPORT_CHUNK, decomposition_table


def _forward_via_op(
    msr: MultiScaleRetention,
    x: Tensor,
    state: Tensor | None = None,
    offset: int = 0,
    return_state: bool = False,
):
    """MultiScaleRetention.forward with its parallel/recurrent core replaced by one rtp op call."""
    msr._check_input(x, state, offset)
    q, k, v = msr.project(x, offset)
    gamma = msr.log_decay().exp()
    want_state = state is not None or return_state
    y = ops.retention(
        q, k, v, gamma, scale=msr.scale, initial_state=state, output_final_state=want_state
    )
    y, new_state = y if want_state else (y, None)
    out = msr.output(y.to(x.dtype), x)
    return (out, new_state) if want_state else out


@contextlib.contextmanager
def retention_via_ops(model: nn.Module):
    """Temporarily route every ``MultiScaleRetention`` inside ``model`` through the rtp op.

    Only the module's ``forward`` is replaced (on the instance, for the duration of the block):
    the module stays where it is, so its hooks run and the parameter names are the model's own.
    A subclass that overrides ``forward`` or the retention core (``parallel``, ``recurrent``,
    ``chunk_step``, ``final_state``) is left as written, with a warning: its own code is
    exported (its parallel form keeps its T x T scores unless ``detect=True`` finds them).
    """
    routed, kept = [], []
    try:
        for name, module in model.named_modules():
            if isinstance(module, MultiScaleRetention):
                if not overridden_core(module):
                    module.forward = types.MethodType(_forward_via_op, module)
                    routed.append(module)
                else:
                    kept.append(f"{name or '<model>'} ({type(module).__name__})")
        if kept:
            warnings.warn(
                "retention_via_ops: " + ", ".join(kept) + " override(s) MultiScaleRetention's "
                "forward or retention core; exported as written, not through the rtp op (a "
                "parallel form keeps its T x T scores; export_program(detect=True) can find "
                "them)",
                stacklevel=3,
            )
        yield model
    finally:
        for module in routed:
            del module.forward


def rtp_op_count(program: torch.export.ExportedProgram) -> int:
    """How many rtp custom-op nodes the program still holds."""
    return sum(
        1
        for n in program.graph.nodes
        if n.op == "call_function" and str(getattr(n.target, "namespace", "")) == "rtp"
    )


def export_program(
    model: nn.Module,
    *args,
    form: str = "chunkwise",
    chunk_size: int = DEFAULT_EXPORT_CHUNK,
    kwargs: dict | None = None,
    detect: bool | None = None,
    dynamic_shapes=None,
) -> torch.export.ExportedProgram:
    """torch.export ``model(*args, **kwargs)`` with retention decomposed into ``form``.

    ``form`` "chunkwise" (linear memory, no T x T tensor), "recurrent" (token by token: export a
    one-token step that takes and returns the state) or "parallel" (T x T scores).
    ``detect``: also find regions written in the parallel form with the rtp backend's detection
    (a Dynamo capture, see :mod:`.capture`); None (default) does so only when the model has
    neither reference retention modules nor rtp op calls, so a model mixing a reference module
    with a parallel-form layer (or a MultiScaleRetention subclass with its own forward, see
    :func:`retention_via_ops`) needs ``detect=True`` for that layer's T x T scores to go.
    ``dynamic_shapes``: passed to ``torch.export.export`` (e.g. a ``Dim`` on T). The chunkwise
    and parallel forms keep T symbolic; the recurrent form and detection need a fixed T
    (ValueError otherwise).
    """
    table = decomposition_table(form, chunk_size)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model)}")
    has_reference = any(isinstance(m, MultiScaleRetention) for m in model.modules())
    with retention_via_ops(model) as routed, torch.no_grad(), warnings.catch_warnings():
        # NOTE: torch.export trips its own pytree deprecation warnings (torch 2.13).
        warnings.simplefilter("ignore", FutureWarning)
        program = _export(routed, args, kwargs, dynamic_shapes)
        if detect or (detect is None and not has_reference and not rtp_op_count(program)):
            if dynamic_shapes is not None:
                raise ValueError(_DETECT_IS_STATIC)
            from .capture import rewrite_with_backend

            replay, _ = rewrite_with_backend(routed, tuple(args), kwargs)
            program = _export(replay, args, kwargs, None)
        program = program.run_decompositions(table)
    left = rtp_op_count(program)
    if left:
        raise RuntimeError(f"{left} rtp op node(s) survived the {form} decomposition")
    return program


_DETECT_IS_STATIC = (
    "dynamic_shapes cannot be used with detection: retention written in the parallel form is "
    "found by a Dynamo capture at the example inputs' fixed shapes (detection runs when "
    "detect=True, or by default when the model has no rtpcompile.nn retention modules and no "
    "rtpcompile.ops calls). Export at a fixed sequence length, or call rtpcompile.ops in the "
    "model so that no detection is needed"
)


def _export(module: nn.Module, args, kwargs, dynamic_shapes) -> torch.export.ExportedProgram:
    return torch.export.export(
        module, tuple(args), kwargs or {}, dynamic_shapes=dynamic_shapes, strict=False
    )


def quadratic_node_shapes(program: torch.export.ExportedProgram, seq_len: int) -> list[str]:
    """Nodes whose value has two dims equal to ``seq_len`` (a T x T intermediate): 'name: shape'.

    Weights, buffers and constants are not intermediates and are skipped (a 64 x 64 projection
    matched at T = 64); a [.., T, width] value still matches when T equals the width. A symbolic
    dim (a dynamic-T program) is compared at the export's example sizes, read without a guard:
    comparing the SymInt itself would specialise the program to ``seq_len``."""
    sig = program.graph_signature
    state = set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers)
    state |= set(getattr(sig, "inputs_to_lifted_tensor_constants", {}))
    found = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in state:
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            if [hint(d) for d in val.shape].count(seq_len) >= 2:
                found.append(f"{node.name}: {tuple(val.shape)}")
    return found


_TENSOR_TYPE = re.compile(r"tensor<([0-9?x]+)x[a-z]+[0-9]*>|vtensor<\[([0-9?,\-]+)\]")


def quadratic_tensor_types(mlir_text: str, seq_len: int) -> list[str]:
    """MLIR tensor types (builtin ``tensor<AxBxf32>`` or ``!torch.vtensor<[A,B],f32>``) with two
    dims equal to ``seq_len``; with a dynamic T, also the types with two dynamic dims (``?`` or
    ``-1``), marked "(dynamic: may be T x T)": the text does not say which symbol a ``?`` is (a
    chunkwise module's N x N chunk matrix reads the same; ``quadratic_node_shapes`` on the
    program knows)."""
    found = set()
    for match in _TENSOR_TYPE.finditer(mlir_text):
        dims = re.split(r"[x,]", match.group(1) or match.group(2))
        if dims.count(str(seq_len)) >= 2:
            found.add(match.group(0))
        elif sum(d.strip() in ("?", "-1", str(seq_len)) for d in dims) >= 2:
            found.add(f"{match.group(0)} (dynamic: may be T x T)")
    return sorted(found)
