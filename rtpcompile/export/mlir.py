"""Step 2 of the MLIR export: import the decomposed program with torch-mlir's FX importer.

torch-mlir is optional (``pip install rtpcompile[mlir]``); it is imported here only, on first
use, and its absence is reported with the install command.
"""

from __future__ import annotations

import functools
import warnings

import torch

DIALECTS = ("linalg-on-tensors", "torch", "tosa", "stablehlo", "raw")


@functools.lru_cache(maxsize=1)
def torch_mlir_fx():
    """The ``torch_mlir.fx`` module, or ImportError naming the missing extra."""
    try:
        from torch_mlir import fx
    except ImportError as exc:
        raise ImportError(
            "MLIR export needs torch-mlir: pip install --no-deps torch-mlir "
            "(or the rtpcompile[mlir] extra); it must not replace your torch"
        ) from exc
    return fx


def have_torch_mlir() -> bool:
    try:
        torch_mlir_fx()
    except ImportError:
        return False
    return True


def import_program(program: torch.export.ExportedProgram, dialect: str, func_name: str = "main"):
    """An ``mlir.ir.Module`` of ``program`` lowered to ``dialect`` (verified).

    A program with a symbolic dimension (``export_program(..., dynamic_shapes=...)``) first has
    its ``group_norm`` nodes written as reshapes and reductions (:func:`_group_norm`): torch-mlir's
    own decomposition goes through ``as_strided``, which it cannot import at a symbolic size.
    Any other op that torch-mlir cannot import at a symbolic size is a ValueError saying to export
    at a fixed sequence length.
    """
    if dialect not in DIALECTS:
        raise ValueError(f"dialect must be one of {list(DIALECTS)}, got {dialect!r}")
    fx = torch_mlir_fx()
    dynamic = _has_symbolic_shapes(program)
    with warnings.catch_warnings():
        # NOTE: torch-mlir's importer trips torch's pytree deprecation warnings; not ours to fix.
        warnings.simplefilter("ignore", FutureWarning)
        if dynamic:
            program = program.run_decompositions({torch.ops.aten.group_norm.default: _group_norm})
        try:
            module = fx.export_and_import(program, output_type=dialect, func_name=func_name)
        except Exception as exc:
            if not dynamic or "static" not in str(exc):
                raise
            raise ValueError(
                f"torch-mlir cannot import this dynamic-shape program ({exc}); export it at a "
                "fixed sequence length (export_program without dynamic_shapes, as export_mlir "
                "does)"
            ) from exc
    module.operation.verify()
    return module


def _has_symbolic_shapes(program: torch.export.ExportedProgram) -> bool:
    for node in program.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor):
            if any(isinstance(d, torch.SymInt) for d in val.shape):
                return True
    return False


def _group_norm(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5, cudnn=True):
    """``aten.group_norm`` from reshapes and means: imports at a symbolic batch size."""
    N, C = x.shape[0], x.shape[1]
    # NOTE: statistics in float32 (float64) for 16-bit inputs, as aten's kernel computes them
    g = x.reshape(N, num_groups, -1).to(torch.promote_types(x.dtype, torch.float32))
    mean = g.mean(-1, keepdim=True)
    centred = g - mean
    var = (centred * centred).mean(-1, keepdim=True)  # biased, as group_norm's
    y = (centred * torch.rsqrt(var + eps)).reshape(x.shape)
    shape = [1, C] + [1] * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y.to(x.dtype)
