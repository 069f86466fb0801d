"""Forward and backward of the rtp op on the generated kernels.

The backward is three passes of the same kernel family (the math is in
``rtpcompile.lowering.aten_impl.retention_backward``):

    dq = retention(do, v, k) with state s0^T                          (forward in time)
    dk = retention(v, do, q) reversed, + gamma^(T-1-t) v_t dsf^T       (state dsf^T at position 0)
    dv = retention(k, q, do) reversed, + gamma^(T-1-t) k_t dsf         (state dsf at position 0)

The direct terms of the final-state gradient enter as an initial state placed at position 0,
so no tensor is built for them. The dq and dk passes also write the per-row dots <q_t, dq_t>
and <k_t, dk_t> that the closed form of d log(gamma) needs, and ds0 comes from the final state of
a reversed (q, do) pass: ds0 = scale * gamma * sum_t gamma^t q_t^T do_t + gamma^T dsf.
Every pass takes the call's block ``config`` (see ``launch.run``); a pass whose V is narrower
than the config's BV clamps it (``spec.choose``).
"""

from __future__ import annotations

import dataclasses

import torch

from .launch import Pass, acc_dtype, run

Tensor = torch.Tensor


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
    if scale == 0:
        raise ValueError("the Triton retention kernels need a nonzero scale, got 0")
    return gamma.reshape(-1).contiguous()


def forward(form, q, k, v, gamma, scale, initial_state, chunk_size, config=None):
    """(o, final_state) of one resolved form; o in q's dtype, the state in float32/64."""
    g = _check(q, k, v, gamma, scale)
    p = Pass(form, q, k, v, g, scale, s0=initial_state, state_out=True)
    o, sf, _ = run(p, chunk_size, config)
    if q.shape[2] == 0:
        acc = acc_dtype(q.dtype)
        sf = sf.zero_() if initial_state is None else initial_state.to(acc).clone()
    return o, sf


def _flip_t(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


def _three_passes(form, do, dsf, q, k, v, g, scale, s0, chunk_size, config):
    """dq, dk, dv, the row dots <q, dq> and <k, dk>, and the reversed (q, do) pass state."""
    dq_pass = Pass(form, do, v, k, g, scale, out_dtype=q.dtype, row_dot_with=q)
    if s0 is not None:
        dq_pass.s0 = _flip_t(s0)
    dq, _, dot_q = run(dq_pass, chunk_size, config)
    direct = {} if dsf is None else {"state_offset": 0, "state_scale": 1.0}
    dk_pass = Pass(form, v, do, q, g, scale, reverse=True, out_dtype=k.dtype, row_dot_with=k)
    if dsf is not None:
        dk_pass = dataclasses.replace(dk_pass, s0=_flip_t(dsf), **direct)
    dk, _, dot_k = run(dk_pass, chunk_size, config)
    # NOTE: without a final-state gradient the dv pass has no state of its own, so its final
    # state is exactly sum_t gamma^t q_t^T do_t, the part of ds0 that needs a pass.
    want_f = s0 is not None and dsf is None
    dv_pass = Pass(form, k, q, do, g, scale, reverse=True, out_dtype=v.dtype, state_out=want_f)
    if dsf is not None:
        dv_pass = dataclasses.replace(dv_pass, s0=dsf, **direct)
    dv, f, _ = run(dv_pass, chunk_size, config)
    if s0 is not None and f is None:
        state_only = Pass(form, k, q, do, g, scale, reverse=True, store_o=False, state_out=True)
        f = run(state_only, chunk_size, config)[1]
    return dq, dk, dv, dot_q, dot_k, f


def backward(form, do, dsf, q, k, v, gamma, scale, s0, sf, chunk_size, config=None):
    """(dq, dk, dv, dgamma, ds0 | None) by three kernel passes and the closed form for gamma."""
    g = _check(q, k, v, gamma, scale)
    acc = acc_dtype(q.dtype)
    T = q.shape[2]
    dq, dk, dv, dot_q, dot_k, f = _three_passes(
        form, do, dsf, q, k, v, g, scale, s0, chunk_size, config
    )
    lg = torch.log(g.to(acc))
    c = (T - 1) / 2
    centred = torch.arange(T, device=q.device, dtype=acc) - c
    dlg = ((dot_q - dot_k) * centred).sum(dim=(0, 2))
    ds0 = None
    if s0 is not None:
        ds0 = f * (scale * torch.exp(lg))[:, None, None]
        if dsf is not None:
            ds0 = ds0 + torch.exp(lg * T)[:, None, None] * dsf.to(acc)
        dlg = dlg + (c + 1) * (s0.to(acc) * ds0).sum(dim=(0, 2, 3))
    if dsf is not None:
        dlg = dlg + (T - 1 - c) * (dsf.to(acc) * sf.to(acc)).sum(dim=(0, 2, 3))
    return dq, dk, dv, dlg / g.to(acc), ds0
