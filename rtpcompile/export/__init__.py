"""MLIR export of retention models: decompose retention into one form, import with torch-mlir.

module = rtpcompile.export_mlir(model, input_ids, form="chunkwise", dialect="linalg-on-tensors")
print(module)                      # an mlir.ir.Module (torch-mlir), already verified

program = export_program(model, input_ids, form="chunkwise")   # step 1 alone, no torch-mlir
"""

from __future__ import annotations

from torch import nn

from .decompose import DEFAULT_EXPORT_CHUNK, EXPORT_FORMS, decomposition_table
from .mlir import DIALECTS, have_torch_mlir, import_program
from .program import (
    export_program,
    quadratic_node_shapes,
    quadratic_tensor_types,
    retention_via_ops,
    rtp_op_count,
)


def export_mlir(
    model: nn.Module,
    *args,
    form: str = "chunkwise",
    dialect: str = "linalg-on-tensors",
    chunk_size: int = DEFAULT_EXPORT_CHUNK,
    kwargs: dict | None = None,
    func_name: str = "main",
):
    """Export ``model(*args, **kwargs)`` to MLIR with retention lowered to ``form``.

    Args:
        form: "chunkwise" (O(T) memory: no T x T tensor anywhere in the module), "recurrent"
            (token by token; export a one-token step whose arguments and results include the
            state) or "parallel".
        dialect: "linalg-on-tensors" or "torch" (also "tosa", "stablehlo", "raw").
        chunk_size: chunk length of the chunkwise form.
    Returns the verified ``torch_mlir.ir.Module``; ``str(module)`` is its text. Parameters are
    frozen into the module as constants. Needs torch-mlir (ImportError otherwise).
    """
    if dialect not in DIALECTS:
        raise ValueError(f"dialect must be one of {list(DIALECTS)}, got {dialect!r}")
    program = export_program(model, *args, form=form, chunk_size=chunk_size, kwargs=kwargs)
    return import_program(program, dialect, func_name)


__all__ = [
    "DIALECTS",
    "EXPORT_FORMS",
    "decomposition_table",
    "export_mlir",
    "export_program",
    "have_torch_mlir",
    "import_program",
    "quadratic_node_shapes",
    "quadratic_tensor_types",
    "retention_via_ops",
    "rtp_op_count",
]
