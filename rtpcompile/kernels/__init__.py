"""Generated Triton kernels for the three retention forms (parallel, chunkwise, recurrent).

The lowering calls ``triton_forward`` / ``triton_backward`` for CUDA tensors, and for CPU tensors
when ``RTP_KERNELS=triton`` (then under ``TRITON_INTERPRET=1``). ``kernels_for`` lists the
kernels (spec and module hash) a call would launch, its backward's for the gradients wanted,
without launching anything. Each takes an optional block ``config`` (``{"BV": 32,
"num_warps": 8, "num_stages": 3, "split": 1}``, see ``spec.check_config``), the planner's
``Plan.config``; None keeps the defaults. Importing this
package never fails when Triton is missing: ``available()`` is then False.

Pipeline: blocks.py (tile sizes, the fused/split rule) -> spec.py (decisions) ->
templates/*.jinja (Triton) -> codegen.py (hash-named, verified modules in a 0700 cache
directory) -> launch.py (one pass) -> backward.py (forward, backward).
"""

from __future__ import annotations

import functools
import os

import torch

from .blocks import MAX_DIM
from .codegen import KernelInfo, cache_dir
from .spec import CONFIG_KEYS, KernelSpec, check_config, render

__all__ = [
    "CONFIG_KEYS",
    "GRADIENTS",
    "MAX_DIM",
    "MIN_SCALE",
    "KernelInfo",
    "KernelSpec",
    "available",
    "check_config",
    "cache_dir",
    "kernels_for",
    "render",
    "triton_backward",
    "triton_forward",
]


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as missing
        return False
    return True


def available() -> bool:
    """Triton is importable and can run: a CUDA device, or the interpreter (TRITON_INTERPRET=1)."""
    if not _triton_importable():
        return False
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return interpret or torch.cuda.is_available()


def scale_fits(dtype: torch.dtype, scale: float) -> bool:
    """Whether the kernels take ``scale`` for ``dtype`` inputs: nonzero, and unless float64 in
    [2**-127, 3.4e38] ([2**-127, 2**16] for float16). The kernels' scale is a float32 argument
    but in float64 kernels; float16 kernels hold the state times scale (an inf state past
    3.4e38 / |S|: at scale 1e36 already) and divide it through 1 / scale, inf past 2**128 (an
    inf state at scale 1e-39 until 2026-11-25); a scale below 2**-149 reached the kernels as 0."""
    if dtype == torch.float64:
        return scale != 0
    return MIN_SCALE <= abs(scale) <= (MAX_FLOAT16_SCALE if dtype == torch.float16 else _F32_MAX)


MIN_SCALE = 2.0**-127  # NOTE: 1 / scale stays a float32 number; 22 significant bits left
MAX_FLOAT16_SCALE = 2.0**16  # NOTE: a float16 state times scale stays far inside float32
_F32_MAX = torch.finfo(torch.float32).max  # NOTE: once, not per call (dispatch asks every call)


def triton_forward(
    form, q, k, v, gamma, scale, initial_state, chunk_size, config=None, state_out=True
):
    """(o [B,H,T,V] in q's dtype, final state [B,H,K,V] float32/64, or None when not
    ``state_out``) of a resolved form."""
    from .backward import forward

    return forward(form, q, k, v, gamma, scale, initial_state, chunk_size, config, state_out)


def triton_backward(
    form, do, dsf, q, k, v, gamma, scale, s0, sf, chunk_size, config=None, needs=None
):
    """(dq, dk, dv, dgamma, ds0 | None); dsf and s0 may be None. ``needs``: five bools, which
    gradients are wanted (None: all); the passes only unwanted ones need are skipped."""
    from .backward import backward

    return backward(form, do, dsf, q, k, v, gamma, scale, s0, sf, chunk_size, config, needs=needs)


GRADIENTS = ("q", "k", "v", "gamma", "initial_state")


def kernels_for(
    form: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
    backward: bool = False,
    final_state_grad: bool = False,
    config: dict[str, int] | None = None,
    state_out: bool = True,
    needs: tuple[bool, ...] | list[bool] | None = None,
    *,
    scale: float = 1.0,
) -> list[KernelInfo]:
    """The kernels a call with these shapes would launch (forward, then backward if asked);
    ``state_out`` False: a call with ``output_final_state=False`` (no final-state gradient).

    ``needs``: five bools, which gradients the backward computes, in ``GRADIENTS`` order (dq,
    dk, dv, d gamma, d initial_state), as the op's backward gets them from
    ``ctx.needs_input_grad`` (None: all). The backward launches only the passes they need:
    dq's for dq or d gamma (it sums d gamma), dk's for dk, dv's for dv or (with an initial
    state) for d initial_state; so a frozen decay changes nothing while q, k and v all need
    gradients, only-v-needs-a-gradient is the dv pass alone, and only d gamma the dq pass.

    ``scale``: the call's score scale. Only its size matters, and only for a backward with a
    final-state gradient: below ``backward.TINY_SCALE`` (float32, bfloat16, float64) the dk and
    dv passes run rescaled as the three-pass kernels instead of the split path's four
    launches, so the list differs from scale 1.0's (the default). A scale the kernels do not
    take (``scale_fits``) is a ValueError, as at the call.

    Otherwise only shapes and dtypes matter: pass meta tensors (``device="meta"``) to avoid any
    work.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"kernels_for: scale must be a real number, got {scale!r}")
    if final_state_grad and not state_out:
        raise ValueError("kernels_for: final_state_grad needs state_out (a final state)")
    if needs is not None:
        needs = tuple(needs)
        if len(needs) != len(GRADIENTS) or not all(isinstance(n, bool) for n in needs):
            raise ValueError(
                f"kernels_for: needs must be {len(GRADIENTS)} bools (wanted gradients of "
                f"{', '.join(GRADIENTS)}), got {needs!r}"
            )
    from . import backward as bw
    from .launch import recording

    meta = [
        None
        if t is None
        else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        for t in (q, k, v, gamma, initial_state)
    ]
    q, k, v, gamma, s0 = meta
    with recording() as seen:
        o, sf = bw.forward(form, q, k, v, gamma, scale, s0, chunk_size, config, state_out)
        if backward and (needs is None or any(needs)):  # NOTE: no gradient: no backward runs
            dsf = torch.empty_like(sf) if final_state_grad else None
            do = torch.empty_like(o)
            bw.backward(form, do, dsf, q, k, v, gamma, scale, s0, sf, chunk_size, config, needs)
    return seen
