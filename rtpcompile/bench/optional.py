"""Optional parts, imported in one place: each probe returns what it found or a one-line note.

The rtp backend, ``rtpcompile.explain``, flash-linear-attention and matplotlib may be missing
(or, while the project grows, not written yet); the benchmarks and the demo then leave the
corresponding column out and say so in one line instead of failing.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:120]


@functools.cache
def rtp_backend_note() -> str | None:
    """None when ``torch.compile(..., backend="rtp")`` can be looked up, else why not."""
    try:
        from torch._dynamo.backends.registry import lookup_backend

        lookup_backend("rtp")
    except Exception as exc:  # noqa: BLE001 - any failure means "not available"
        return f"backend 'rtp' not available yet ({_short(exc)})"
    return None


def explain_fn() -> tuple[Callable | None, str | None]:
    """(rtpcompile.explain, None) or (None, why it is unavailable)."""
    try:
        module = importlib.import_module("rtpcompile.explain")
        return module.explain, None
    except Exception as exc:  # noqa: BLE001
        return None, f"explain: not available yet ({_short(exc)})"


@functools.cache
def fla_retention() -> tuple[dict[str, Callable], str | None]:
    """flash-linear-attention's retention ops by form, and a note when it is not installed."""
    try:
        module = importlib.import_module("fla.ops.retention")
    except Exception as exc:  # noqa: BLE001
        return {}, f"fla: flash-linear-attention not importable ({_short(exc)})"
    names = {
        "chunk": "chunk_retention",
        "parallel": "parallel_retention",
        "recurrent": "fused_recurrent_retention",
    }
    found = {form: getattr(module, n) for form, n in names.items() if hasattr(module, n)}
    return found, None if found else "fla: no retention ops found in fla.ops.retention"


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return None
    return plt
