"""Pick the implementation of a planned retention call: generated Triton kernels or aten.

CUDA tensors use the Triton kernels when they are importable; CPU tensors use aten unless the
``kernels`` option (``RTP_KERNELS=triton``) forces Triton, which then runs under
``TRITON_INTERPRET=1`` (forced without it, or without a usable Triton, the call raises rather
than run aten silently). A missing or broken Triton install falls back to aten with one warning
on ``kernels="auto"``.
With ``kernels="auto"`` a call the kernels cannot run (a head dim K or V over 256, scale 0) runs
on aten too; forced (``kernels="triton"``), the kernels' own error names the limit.
``config`` is the plan's kernel block configuration (``Plan.config``: (name, value) pairs or a
mapping); the Triton path launches every pass with it, the aten path has no blocks and ignores it.
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch

from .. import options as _options
from . import aten_impl

log = logging.getLogger("rtpcompile")


@functools.lru_cache(maxsize=1)
def _kernels_package():
    try:
        from .. import kernels
    except Exception as exc:  # noqa: BLE001 - any import failure means "no kernels"
        warnings.warn(f"rtpcompile: Triton kernels unavailable ({exc}); using aten", stacklevel=4)
        return None
    return kernels


def _triton_module():
    """The kernels package when it can run now, else None.

    NOTE: the import is cached, whether the kernels can run is asked on every call: on CPU it
    is TRITON_INTERPRET, which a user may set after a forced call told them to (that call's
    answer was cached before, and the same error kept coming with the variable set)."""
    kernels = _kernels_package()
    if kernels is None:
        return None
    return kernels if kernels._triton_importable() and kernels.available() else None


@functools.cache
def _warn_unavailable() -> None:
    """The one warning of a CUDA call on ``kernels="auto"`` without usable kernels (Triton
    missing or broken: ``rtpcompile.kernels`` itself imports without it)."""
    warnings.warn(
        "rtpcompile: Triton kernels unavailable (triton is missing or cannot be imported: "
        "import triton to see why); using aten",
        stacklevel=4,
    )


def use_triton(t: torch.Tensor, v: torch.Tensor | None = None, scale: float = 1.0) -> bool:
    """Whether a call with queries ``t`` (and values ``v``, ``scale``) runs the Triton kernels."""
    choice = _options.current().kernels
    if choice == "aten" or (choice == "auto" and not t.is_cuda):
        return False
    # NOTE: asked only now: the import's answer is cached, and on CPU it depends on
    # TRITON_INTERPRET, which a CPU call with kernels="auto" must not freeze
    kernels = _triton_module()
    if choice == "auto" and kernels is None:
        _warn_unavailable()  # NOTE: a CUDA tensor (a CPU one on auto never asks)
    if choice == "auto" and not _fits(kernels, t, v, scale):
        return False
    if kernels is None and choice == "triton":
        raise RuntimeError(_forced_but_unavailable(t))
    return kernels is not None


def _forced_but_unavailable(t: torch.Tensor) -> str:
    """Why forced kernels (``kernels="triton"``) cannot run: said, never a silent aten run."""
    import importlib.util

    package = _kernels_package()
    if importlib.util.find_spec("triton") is None:
        why = "Triton is not installed"
    elif package is None or not package._triton_importable():
        why = "Triton is installed but could not be imported (import triton to see why)"
    elif t.is_cuda:
        why = "Triton could not be imported (see the warning above)"
    else:
        why = (
            f"a {t.device.type} tensor needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "(before the call that runs the kernels)"
        )
    return f"kernels='triton' (RTP_KERNELS or the backend option) forces the Triton kernels: {why}"


def _fits(kernels, q: torch.Tensor, v: torch.Tensor | None, scale: float) -> bool:
    """The kernels' limits: head dims up to ``MAX_DIM`` and a scale they take
    (``kernels.scale_fits``: nonzero, in [2**-127, 3.4e38] unless float64, at most
    2**16 for float16)."""
    if kernels is None:
        return False
    dims = (q.shape[-1],) if v is None else (q.shape[-1], v.shape[-1])
    return max(dims) <= kernels.MAX_DIM and kernels.scale_fits(q.dtype, scale)


def _config(config) -> dict[str, int] | None:
    return dict(config) if config else None


def forward(form, q, k, v, gamma, scale, initial_state, chunk_size, config=None, state_out=True):
    """(o, final state); with ``state_out`` False no state is computed (None)."""
    if use_triton(q, v, scale):
        return _triton_module().triton_forward(
            form, q, k, v, gamma, scale, initial_state, chunk_size, _config(config),
            state_out=state_out,
        )  # fmt: skip
    # NOTE: gamma = 0 runs as MIN_GAMMA (inside the op: the gradient is still for gamma itself)
    g = gamma.to(aten_impl.accumulation_dtype(q.dtype)).clamp(min=aten_impl.MIN_GAMMA)
    return aten_impl.forward(
        form, q, k, v, torch.log(g), scale, initial_state, chunk_size, state_out
    )


def backward(form, do, dsf, q, k, v, gamma, scale, s0, sf, chunk_size, config=None, needs=None):
    """(dq, dk, dv, dgamma, ds0 | None); d gamma is a forward-mode derivative on both paths
    (``dgamma.dgamma_chunked``, ``kernels/backward.py``). ``needs``: five bools, which gradients
    are wanted (None: all); an unwanted one may come back None, and the passes only it needs
    are skipped."""
    if not use_triton(q, v, scale):

        def run(q_, k_, v_, lg, scale_, state):
            return aten_impl.forward(form, q_, k_, v_, lg, scale_, state, chunk_size)

        chunk = chunk_size if form == "chunkwise" else aten_impl.DGAMMA_CHUNK
        return aten_impl.retention_backward(
            run, do, dsf, q, k, v, gamma, scale, s0, needs=needs, chunk_size=chunk
        )
    return _triton_module().triton_backward(
        form, do, dsf, q, k, v, gamma, scale, s0, sf, chunk_size, _config(config), needs
    )
