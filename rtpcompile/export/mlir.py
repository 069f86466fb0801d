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
    """An ``mlir.ir.Module`` of ``program`` lowered to ``dialect`` (verified)."""
    if dialect not in DIALECTS:
        raise ValueError(f"dialect must be one of {list(DIALECTS)}, got {dialect!r}")
    fx = torch_mlir_fx()
    with warnings.catch_warnings():
        # NOTE: torch-mlir's importer trips torch's pytree deprecation warnings; not ours to fix.
        warnings.simplefilter("ignore", FutureWarning)
        module = fx.export_and_import(program, output_type=dialect, func_name=func_name)
    module.operation.verify()
    return module
