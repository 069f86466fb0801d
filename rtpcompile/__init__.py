"""rtpcompile: a torch.compile backend for Retention-Transformer hybrid models.

compiled = torch.compile(model, backend="rtp")
report = rtpcompile.explain(model, *args)
"""

from __future__ import annotations

import importlib

from . import ops
from .explain import explain  # NOTE: bound eagerly: the submodule shares the function's name

__version__ = "0.1.0"

_LAZY = {
    "nn": ("rtpcompile.nn", None),
    "retrofit": ("rtpcompile.convert", "retrofit"),
    "memory_report": ("rtpcompile.convert", "memory_report"),
    "distill": ("rtpcompile.convert", "distill"),
    "export_mlir": ("rtpcompile.export", "export_mlir"),
    "export_program": ("rtpcompile.export", "export_program"),
    "export": ("rtpcompile.export", None),
    "distributed": ("rtpcompile.distributed", None),
}

__all__ = ["ops", "explain", "__version__", *_LAZY]


def __getattr__(name: str):
    # NOTE: heavy or optional parts load on first use, so `import rtpcompile` stays cheap.
    if name not in _LAZY:
        raise AttributeError(f"module 'rtpcompile' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attr is None else getattr(module, attr)
