"""Forward and backward of the rtp op on the generated kernels.

The backward is three passes of the same kernel family (the aten backward,
``rtpcompile.lowering.aten_impl.retention_backward``, runs the same passes for dk and dv):

    dq = retention(do, v, k) with state s0^T                          (forward in time)
    dk = retention(v, do, q) reversed, + gamma^(T-1-t) v_t dsf^T       (state dsf^T at position 0)
    dv = retention(k, q, do) reversed, + gamma^(T-1-t) k_t dsf         (state dsf at position 0)

The direct terms of the final-state gradient enter as an initial state placed at position 0,
so no tensor is built for them. d gamma is a forward-mode derivative, as on the aten path
(``lowering.dgamma``):

    d gamma = <do, d o / d gamma> + <dsf, d sf / d gamma>
            = sum_t <q_t, d dq_t / d gamma> + <dsf, d sf / d gamma>

(o is linear in q, so <do_t, d o_t / d gamma> is <q_t, d dq_t / d gamma>). The dq pass sums
the first inside the kernel (``row_dot_with=q``: its scores weighted by n gamma^(n-1), and a
carried derivative of its state, the initial state's terms included), one partial sum per
program; the second is one aten product here (``_final_state_dgamma``). Every weight is >= 0
and nothing is divided by gamma, so float32 d gamma does not lose digits with T (the closed
form ``sum_t (t - c) (<q_t, dq_t> - <k_t, dk_t>)`` this replaced cancelled ~T-weighted terms)
and gamma = 0, which runs as the smallest normal float32 (``_log2_gamma`` in the templates,
``MIN_GAMMA`` here), gives the exact one-sided derivative. ds0 comes from the final state of
the dv pass: ds0 = scale * gamma * sum_t gamma^t q_t^T do_t + gamma^T dsf (the second term from
the dsf state that pass starts from), so an initial state costs no extra pass.
Every pass takes the call's block ``config`` (see ``launch.run``); a pass whose V is narrower
than the config's BV clamps it (``spec.choose``).

When the chunkwise dq and dv passes both run split (``launch.runs_split``), the backward is
four launches instead of six (``_split_passes``): the dk pass's state is the transpose of the
dv pass's (both are sums of gamma-decayed q_t^T do_t from the end; reversed passes pad their
timeline so their chunks are the forward chunks, ``_pad`` in the templates), and dq and dk
share the scores do v^T. So: the dq pass's states (with their derivatives in gamma when d gamma
is wanted), the whole dv pass (keeping its states), then one kernel computing dq, dk and the
d gamma partials (``launch.run_dqk``).

With a final-state gradient and |scale| < ``TINY_SCALE`` (float32, bfloat16, float64), the dk
and dv passes run with their values times 2**e (scale = m * 2**e) at scale m, so their state
holds dsf, not dsf / scale, which left float32's range (``_units``); they then run as the
three-pass kernels.

A backward that wants only some gradients (``needs``, the backward op's ``output_mask``) runs
only their passes, on the three-pass path unless all three are needed.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from . import scale_fits
from .blocks import MAX_DIM
from .launch import (
    Pass,
    acc_dtype,
    chunk_states,
    run,
    run_dqk,
    run_split,
    runs_split,
    states_bytes,
)

Tensor = torch.Tensor
# NOTE: gamma = 0 runs as the smallest normal float32 (the templates' ``_log2_gamma``; the aten
# path's ``lowering.aten_impl.MIN_GAMMA``, not imported: kernels do not depend on lowering)
MIN_GAMMA = torch.finfo(torch.float32).tiny
# NOTE: with a final-state gradient the dk and dv passes start from dsf at state_scale 1, which
# the float32, bfloat16 and float64 kernels hold as dsf / scale (their state is held over the
# kernel's scale): that leaves float32's range once |dsf| / |scale| > 3.4e38. Below this |scale|
# they run at a scale of m in [0.5, 1) instead (``_units``); float16 holds its state times scale,
# i.e. dsf itself (``KernelSpec.scale_first``), and needs no such step.
TINY_SCALE = 2.0**-32
# rows per slice of d gamma's final-state term (``_final_state_dgamma``)
FINAL_TERM_ROWS = 4096


def _check(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, scale: float) -> Tensor:
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"expected q, k [B, H, T, K] and v [B, H, T, V], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if gamma.numel() != q.shape[1]:
        raise ValueError(
            f"expected gamma with {q.shape[1]} entries (one per head), got {gamma.numel()}"
        )
    K, V = q.shape[-1], v.shape[-1]
    if K > MAX_DIM or V > MAX_DIM:
        # NOTE: checked here, on the user's dims: the backward's passes swap K and V
        raise ValueError(
            f"the Triton retention kernels support head dims K, V <= {MAX_DIM}, got K={K}, "
            f"V={V} (kernels='auto' runs wider heads on aten)"
        )
    if not scale_fits(q.dtype, scale):
        raise ValueError(
            "the Triton retention kernels need a nonzero scale, with |scale| in [2**-127, "
            "3.4e38] ([2**-127, 2**16] for float16) unless the inputs are float64, got "
            f"{scale!r} for {q.dtype} inputs (kernels='auto' runs it on aten)"
        )
    return gamma.reshape(-1).contiguous()


def forward(form, q, k, v, gamma, scale, initial_state, chunk_size, config=None, state_out=True):
    """(o, final_state) of one resolved form; o in q's dtype, the state in float32/64 (None
    without ``state_out``: no kernel stores it, and the parallel form runs no state pass)."""
    g = _check(q, k, v, gamma, scale)
    p = Pass(form, q, k, v, g, scale, s0=initial_state, state_out=state_out)
    o, sf, _ = run(p, chunk_size, config)
    if q.shape[2] == 0 and state_out:
        acc = acc_dtype(q.dtype)
        sf = sf.zero_() if initial_state is None else initial_state.to(acc).clone()
    return o, sf


def _flip_t(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


def _dq_pass(form, do, q, k, v, g, scale, s0, dgamma: bool) -> Pass:
    p = Pass(
        form, do, v, k, g, scale, out_dtype=q.dtype, row_dot_with=q if dgamma else None,
        phase="bwd",
    )  # fmt: skip
    if s0 is not None:
        p.s0 = _flip_t(s0)
    return p


def _dv_pass(form, do, dsf, q, k, v, g, scale, s0) -> Pass:
    # NOTE: the dv pass's final state is ds0 / (scale * gamma): sum_t gamma^t q_t^T do_t, plus,
    # with a final-state gradient (its state, at position 0 with state_scale 1, decayed T - 1
    # times), gamma^(T-1) dsf / scale; so no pass of its own. The kernel holds that state over
    # scale (dsf / scale), or in float16 times scale (dsf); the stored final state is the same.
    p = Pass(
        form, k, q, do, g, scale, reverse=True, out_dtype=v.dtype, state_out=s0 is not None,
        phase="bwd",
    )  # fmt: skip
    if dsf is not None:
        p = dataclasses.replace(p, s0=dsf, state_offset=0, state_scale=1.0)
    return p


def _units(q: Tensor, dsf, scale: float) -> float:
    """The factor the dk and dv passes' values (q, do) are multiplied by, their scale divided
    by: 1, or with a final-state gradient and |scale| < TINY_SCALE, the power of two 2**e of
    scale = m * 2**e (exact; the passes then run at scale m, in [0.5, 1), and hold dsf, not
    dsf / scale: retention is linear in its values and initial state together). Not for float16
    values, which 2**e (< 2**-31) would flush to 0, and which need none: their kernels hold the
    state times scale, dsf itself (``KernelSpec.scale_first``). The dv pass's final state comes
    out times it."""
    if dsf is None or abs(scale) >= TINY_SCALE or q.dtype == torch.float16:
        return 1.0
    return 2.0 ** math.frexp(scale)[1]


def _three_passes(
    form, do, dsf, q, k, v, g, scale, s0, chunk_size, config, dgamma, runs=(True,) * 3, unit=1.0
):
    """dq, dk, dv, the dq pass's d gamma partial sums (with ``dgamma``), and the reversed (q, do)
    pass state (times ``unit``, from ``_units``); ``runs``: which of the dq, dk and dv passes to
    launch (the others' results are None)."""
    dq = part = dk = dv = f = None
    if runs[0]:
        dq_pass = _dq_pass(form, do, q, k, v, g, scale, s0, dgamma)
        dq, _, part = run(dq_pass, chunk_size, config)
    # NOTE: each pass's values times unit (q of the dk pass, do of the dv pass), its scale over it
    qu, du = (q, do) if unit == 1.0 else (q * unit, do * unit)
    if runs[1]:
        dk_pass = Pass(
            form, v, do, qu, g, scale / unit, reverse=True, out_dtype=k.dtype, phase="bwd"
        )
        if dsf is not None:
            dk_pass = dataclasses.replace(dk_pass, s0=_flip_t(dsf), state_offset=0, state_scale=1.0)
        dk, _, _ = run(dk_pass, chunk_size, config)
    if runs[2]:
        dv, f, _ = run(_dv_pass(form, du, dsf, q, k, v, g, scale / unit, s0), chunk_size, config)
    return dq, dk, dv, part, f


def _split_passes(form, do, dsf, q, k, v, g, scale, s0, chunk_size, config, dgamma):
    """``_three_passes``' results from four launches, or None when a pass would not run split:
    the states of the dq pass and the whole (split) dv pass, whose states the dk pass shares
    transposed, then one kernel for dq and dk (``launch.run_dqk``)."""
    # NOTE: the three kernels share one chunk length, which follows the dtype (blocks.py)
    if form != "chunkwise" or not q.dtype == k.dtype == v.dtype == do.dtype:
        return None
    dq_pass = _dq_pass(form, do, q, k, v, g, scale, s0, dgamma)
    if not runs_split(dq_pass, chunk_size, config, quiet=True):
        return None
    # NOTE: the dq states (and their derivatives) wait beside the dv pass's; only CUDA checks
    held = states_bytes(dq_pass, chunk_size) if q.device.type == "cuda" else 0
    dv_pass = _dv_pass(form, do, dsf, q, k, v, g, scale, s0)
    if not runs_split(dv_pass, chunk_size, config, extra_bytes=held, quiet=True):
        return None
    hq, _ = chunk_states(dq_pass, chunk_size, config)
    dv, f, _, hk = run_split(dv_pass, chunk_size, config, keep_states=True)
    offset = dv_pass.state_offset
    dq, dk, part = run_dqk(q, k, v, do, g, scale, hq, hk, offset, chunk_size, config, dgamma)
    return dq, dk, dv, part, f


def backward(form, do, dsf, q, k, v, gamma, scale, s0, sf, chunk_size, config=None, needs=None):
    """(dq, dk, dv, dgamma, ds0 | None) by three kernel passes (or four split kernels), d gamma
    summed by the dq pass (module doc). ``needs``: five bools, which of them are wanted (None:
    all); only the passes they need run (dq's for dq or d gamma, dk's for dk, dv's for dv or, with
    an initial state, ds0) and the unwanted come back None. ``sf`` is not read (kept for the
    callers' signature)."""
    g = _check(q, k, v, gamma, scale)
    acc = acc_dtype(q.dtype)
    T = q.shape[2]
    want_dq, want_dk, want_dv, want_dg, want_ds0 = (True,) * 5 if needs is None else needs
    args = (form, do, dsf, q, k, v, g, scale, s0, chunk_size, config, want_dg)
    runs = (want_dq or want_dg, want_dk, want_dv or (s0 is not None and want_ds0))
    # NOTE: the four-kernel path shares the dv pass's states with the dk side at the call's scale
    unit = _units(q, dsf, scale)
    found = _split_passes(*args) if all(runs) and unit == 1.0 else None
    dq, dk, dv, part, f = found or _three_passes(*args, runs=runs, unit=unit)
    # gamma = 0 runs as MIN_GAMMA (as in the kernels); only d gamma and ds0 read it
    need_ga = (want_dg and dsf is not None) or (s0 is not None and want_ds0)
    ga = g.to(acc).clamp(min=MIN_GAMMA) if need_ga else None
    dg = ds0 = None
    if want_dg:
        dg = part.sum(dim=(0, 1, 3))
        if dsf is not None:
            dg += _final_state_dgamma(dsf, k, v, ga, s0, acc)
    if s0 is not None and want_ds0:
        ds0 = _ds0(f, ga, scale / unit) if T else _ds0_empty(f, dsf, acc)
    # NOTE: a pass may run for another gradient (dq's for d gamma, dv's for ds0): drop its output
    return (dq if want_dq else None), (dk if want_dk else None), (dv if want_dv else None), dg, ds0


def _final_state_dgamma(dsf: Tensor, k: Tensor, v: Tensor, ga: Tensor, s0, acc) -> Tensor:
    """<dsf, d sf / d gamma> per head, sf = gamma^T s0 + sum_t gamma^(T-1-t) k_t^T v_t: each
    term weighted by its lag's n gamma^(n-1) (>= 0, no division; ``ga`` is gamma in ``acc``,
    clamped to ``MIN_GAMMA`` as in the kernels). One [K, V] product per sequence and head."""
    T = k.shape[2]
    lags = torch.arange(T - 1, -1, -1, device=k.device, dtype=acc)
    w = lags * ga[:, None] ** (lags - 1).clamp(min=0)  # [H, T]
    kv = None
    # NOTE: in slices of rows, so the acc-dtype copies of k and v stay bounded at long T
    for t0 in range(0, T, FINAL_TERM_ROWS):
        rows = slice(t0, t0 + FINAL_TERM_ROWS)
        part = (k[:, :, rows].to(acc) * w[:, rows, None]).transpose(-1, -2) @ v[:, :, rows].to(acc)
        kv = part if kv is None else kv.add_(part)  # [B, H, K, V]
    dg = (dsf.to(acc) * kv).sum(dim=(0, 2, 3)) if T else ga * 0
    if s0 is not None:
        dg += T * ga ** max(T - 1, 0) * (dsf.to(acc) * s0.to(acc)).sum(dim=(0, 2, 3))
    return dg


def _ds0(f: Tensor, ga: Tensor, scale: float) -> Tensor:
    """ds0 = scale * gamma * f, f the dv pass's final state (T >= 1; dsf's term included), ga
    gamma in the accumulation dtype, clamped to ``MIN_GAMMA``."""
    return f * (ga * scale).view(-1, 1, 1)


def _ds0_empty(f: Tensor, dsf, acc) -> Tensor:
    """ds0 of a call with T = 0: the final state is s0 itself."""
    return torch.zeros_like(f) if dsf is None else dsf.to(acc).clone()
