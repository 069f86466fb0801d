"""Aten implementations of the three retention forms (the CPU path, and the fallback).

Every forward takes ``(q, k, v, log_gamma, scale, initial_state)`` in layout [B, H, T, D]
(any strides), accumulates in float32 (float64 for float64 inputs) and returns
``(o, final_state)``. Decays are ``exp(log_gamma * n)`` with ``n >= 0`` only: nothing here
computes gamma**(-t), so gamma near 0 or 1 and long sequences stay finite.

The backward is the same forward run up to three times (for dq, and time-reversed for dk and
dv) plus d gamma as a forward-mode derivative of the chunkwise form (``dgamma.dgamma_chunked``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
# NOTE: gamma = 0 (0**0 = 1: o_t = scale q_t k_t^T v_t) runs as the smallest normal float32,
# 2**-126, so log(gamma) stays finite; gamma^n is then 0 for n >= 2 in every dtype and the
# difference from the exact 0 is ~1e-38 relative. Inside the op only: autograd sees gamma itself.
MIN_GAMMA = torch.finfo(torch.float32).tiny
# the chunk size of ``dgamma.dgamma_chunked`` for the parallel and recurrent forms
DGAMMA_CHUNK = 64
Forward = Callable[[Tensor, Tensor, Tensor, Tensor, float, "Tensor | None"], tuple[Tensor, Tensor]]


def clamped_log_gamma(gamma: Tensor) -> Tensor:
    """log gamma with gamma below ``MIN_GAMMA`` (0 included) run as ``MIN_GAMMA``, as in the op,
    for code that computes retention outside it (export's decomposition, context parallelism).

    Unclamped, gamma = 0 gives -inf, and every exponent 0 * (-inf) (gamma^0) is NaN.
    Straight-through: autograd differentiates as if gamma were ``MIN_GAMMA``, so d gamma stays
    finite and matches the op's (to ~1e-38).
    """
    clamped = gamma + (gamma.clamp(min=MIN_GAMMA) - gamma).detach()
    return torch.log(clamped)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _powers(log_gamma: Tensor, exponents: Tensor) -> Tensor:
    """gamma_h ** exponents for exponents >= 0, shape [H, *exponents.shape]."""
    lg = log_gamma.reshape(-1, *([1] * exponents.dim()))
    return torch.exp(lg * exponents.to(log_gamma.dtype))


def _power(log_gamma: Tensor, n: int) -> Tensor:
    """gamma_h ** n for one exponent n >= 0, shape [H] (a Python int: no host-to-device copy)."""
    return torch.exp(log_gamma.reshape(-1) * n)


def decay_matrix(log_gamma: Tensor, T: int) -> Tensor:
    """D[h, i, j] = gamma_h ** (i - j) for i >= j, else 0. Shape [H, T, T]."""
    pos = torch.arange(T, device=log_gamma.device)
    diff = pos[:, None] - pos[None, :]
    return _powers(log_gamma, diff.clamp(min=0)) * (diff >= 0)


def causal_scores(q: Tensor, k: Tensor, log_gamma: Tensor) -> Tensor:
    """(Q K^T) * D over the last two dims, with the part above the diagonal selected to 0.

    NOTE: a select (``tril_``), not a multiply by D's zeros: a NaN or inf in a later key
    (q_t . k_s, s > t) times 0 is NaN and would reach earlier rows; the recurrence never reads
    them. In place on the fresh product: ``tril_`` writes only the upper triangle, so this costs
    one pass less than ``where(causal, s * D, 0)`` (20% of a chunk's intra product on CPU).
    """
    T = q.shape[-2]
    pos = torch.arange(T, device=q.device)
    decay = _powers(log_gamma, (pos[:, None] - pos[None, :]).clamp(min=0))
    if q.dim() == 5:  # chunked [B, H, N, C, D]: one decay per head for every chunk
        decay = decay[:, None]
    return (q @ k.transpose(-1, -2)).tril_().mul_(decay)


def finite_values(v: Tensor) -> tuple[Tensor, Tensor | None]:
    """(v with its non-finite entries zeroed, the [B, H, T, V] mask of the outputs they reach),
    or (v, None) when a CPU v is finite.

    NOTE: a matmul of the causal scores with v multiplies the zeros above the diagonal by later
    values, and 0 * inf is NaN; so the product reads finite values only, and a non-finite v_s[j]
    marks column j of every row t >= s (what the recurrence gives: its state column turns
    inf/NaN for good), as NaN. O(T * V) extra, skipped on CPU when v is finite (free to test
    there; elsewhere the test would synchronise the host).
    """
    bad = ~torch.isfinite(v)
    if v.device.type == "cpu" and not bool(bad.any()):
        return v, None
    reach = bad.cumsum(dim=2) > 0
    return v.masked_fill(bad, 0), reach


def _poison(o: Tensor, reach: Tensor | None) -> Tensor:
    return o if reach is None else o.masked_fill(reach, float("nan"))


def parallel_forward(q, k, v, log_gamma, scale, initial_state, state_out: bool = True):
    """Whole-sequence form: scale * ((Q K^T) * D) V, plus the incoming state at position -1;
    the final state is None without ``state_out``."""
    acc = accumulation_dtype(q.dtype)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    T = q.shape[2]
    pos = torch.arange(T, device=q.device)
    v_ok, reach = finite_values(v)
    o = causal_scores(q, k, log_gamma) @ v_ok
    if initial_state is not None:
        o = o + _powers(log_gamma, pos + 1)[..., None] * (q @ initial_state.to(acc))
    o = _poison(o * scale, reach)
    if not state_out:
        return o, None
    to_end = _powers(log_gamma, T - 1 - pos)[..., None]  # [H, T, 1]
    final = (k * to_end).transpose(-1, -2) @ v
    if initial_state is not None:
        final = final + _power(log_gamma, T)[..., None, None] * initial_state.to(acc)
    return o, final


def recurrent_forward(q, k, v, log_gamma, scale, initial_state, state_out: bool = True):
    """Token by token: S = gamma * S + k^T v ; o = scale * q S. Meant for decoding (small T)."""
    acc = accumulation_dtype(q.dtype)
    B, H, T, K = q.shape
    V = v.shape[-1]
    if initial_state is None:
        state = q.new_zeros(B, H, K, V, dtype=acc)
    else:
        state = initial_state.to(acc)
    g = torch.exp(log_gamma)[:, None, None]
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    outs = []
    for t in range(T):
        state = g * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append((q[:, :, t, None, :] @ state).squeeze(2))
    o = torch.stack(outs, dim=2) if outs else q.new_zeros(B, H, 0, V, dtype=acc)
    return o * scale, state if state_out else None


def single_step(q, k, v, gamma, scale, initial_state, state_out: bool = True):
    """One token (T = 1) in plain pointwise ops and one small product, for a compiler to fuse:
    S = gamma S0 + k^T v, o = scale q S; (o in q's dtype, S in the accumulation dtype or None).
    gamma itself, not exp(log gamma): gamma = 0 needs no clamp here."""
    acc = accumulation_dtype(q.dtype)
    state = k.to(acc)[:, :, 0, :, None] * v.to(acc)[:, :, 0, None, :]  # [B, H, K, V]
    if initial_state is not None:
        state = gamma.to(acc)[:, None, None] * initial_state.to(acc) + state
    elif gamma.requires_grad:
        # NOTE: gamma^0: no value, but gamma stays in the autograd graph (a zero gradient, as the
        # op and the mask it replaces give; an unused input would be an error in autograd.grad)
        state = state + 0 * gamma.to(acc)[:, None, None]
    o = (q.to(acc) @ state) * scale
    return o.to(q.dtype), state if state_out else None


def chunk_layout(T: int, chunk_size: int) -> tuple[int, int, int]:
    """(C, N, pad): the chunk length (at most T, at least 1), the chunks, the padded tokens."""
    C = max(1, min(int(chunk_size), T))
    N = math.ceil(T / C)
    return C, N, N * C - T


def to_chunks(x: Tensor, acc: torch.dtype, N: int, C: int, pad: int) -> Tensor:
    """[B, H, T, D] -> [B, H, N, C, D] in ``acc``, zero-padded at the end.

    NOTE: reshape copies only what it must (a permuted [B,T,H,D] view); pad only when needed."""
    x = x.to(acc)
    return (F.pad(x, (0, 0, 0, pad)) if pad else x).reshape(*x.shape[:2], N, C, -1)


def chunkwise_forward(
    q, k, v, log_gamma, scale, initial_state, chunk_size: int = 64, state_out: bool = True
):
    """Parallel inside chunks of ``chunk_size``, recurrent across chunks. Memory is O(T * C);
    the final state is None without ``state_out``."""
    acc = accumulation_dtype(q.dtype)
    B, H, T, K = q.shape
    V = v.shape[-1]
    C, N, pad = chunk_layout(T, chunk_size)
    v_ok, reach = finite_values(v.to(acc))

    def chunked(x):
        return to_chunks(x, acc, N, C, pad)

    q, k, v = chunked(q), chunked(k), chunked(v)
    v_ok = v if reach is None else chunked(v_ok)
    pos = torch.arange(C, device=q.device)

    # [B, H, N, C, C] @ [B, H, N, C, V] -> [B, H, N, C, V]; finite values only (``finite_values``)
    intra = causal_scores(q, k, log_gamma) @ v_ok
    # each full chunk's contribution to the state at its end: [B, H, N, K, V]
    to_end = _powers(log_gamma, C - 1 - pos)[:, None, :, None]
    chunk_kv = (k * to_end).transpose(-1, -2) @ v
    whole_chunk = _power(log_gamma, C)[:, None, None]

    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    incoming = []
    for n in range(N):
        incoming.append(state)
        if n < N - 1:
            state = whole_chunk * state + chunk_kv[:, :, n]
    incoming = torch.stack(incoming, dim=2)  # [B, H, N, K, V]
    inter = (q * _powers(log_gamma, pos + 1)[:, None, :, None]) @ incoming
    o = _poison((intra + inter).reshape(B, H, N * C, V)[:, :, :T] * scale, reach)
    if not state_out:
        return o, None
    # the last chunk holds r real tokens; padded keys are zero, exponents are clamped at 0
    r = C - pad
    last_to_end = _powers(log_gamma, (r - 1 - pos).clamp(min=0))[..., None]
    last_kv = (k[:, :, -1] * last_to_end).transpose(-1, -2) @ v[:, :, -1]
    final = _power(log_gamma, r)[..., None, None] * state + last_kv
    return o, final


FORWARDS: dict[str, Forward] = {
    "parallel": parallel_forward,
    "recurrent": recurrent_forward,
}


def forward(
    form: str, q, k, v, log_gamma, scale, initial_state, chunk_size: int, state_out: bool = True
):
    """Run one concrete form. ``form`` is already resolved (no "auto"). Without ``state_out``
    the final state is None, and the parallel and chunkwise forms skip its products."""
    if q.shape[:3].numel() == 0:  # NOTE: T = 0 returns the incoming state; B = 0 or H = 0 too
        acc = accumulation_dtype(q.dtype)
        B, H, _, K = q.shape
        o = q.new_zeros(*q.shape[:3], v.shape[-1], dtype=acc)
        if not state_out:
            return o, None
        s = q.new_zeros(B, H, K, v.shape[-1], dtype=acc)
        return o, s if initial_state is None else initial_state.to(acc).clone()
    if form == "chunkwise":
        return chunkwise_forward(q, k, v, log_gamma, scale, initial_state, chunk_size, state_out)
    return FORWARDS[form](q, k, v, log_gamma, scale, initial_state, state_out)


def retention_backward(
    run: Forward, do, dsf, q, k, v, gamma, scale, s0, needs=None, chunk_size: int = DGAMMA_CHUNK
):
    """Gradients of retention via up to three forward passes and ``dgamma_chunked``.

    dq = retention(do, v, k) with state s0^T; dk and dv are time-reversed retentions
    (reader and writer swap roles) plus the final state's direct term. d gamma is the
    forward-mode derivative of the chunkwise form (chunks of ``chunk_size``), which also gives
    dq when both are wanted. Returns (dq, dk, dv, dgamma, ds0) in the accumulation dtype.
    ``needs``: five bools, which of them are wanted (None: all); only the passes the wanted
    ones need run, and the others come back None.
    """
    want_dq, want_dk, want_dv, want_dg, want_ds0 = (True,) * 5 if needs is None else needs
    acc = accumulation_dtype(q.dtype)
    q, k, v, do = q.to(acc), k.to(acc), v.to(acc), do.to(acc)
    T = q.shape[2]
    lg = torch.log(gamma.to(acc).clamp(min=MIN_GAMMA))
    pos = torch.arange(T, device=q.device)

    def flip(x):
        return x.flip(2)

    from .dgamma import dgamma_chunked  # NOTE: here: dgamma builds on this module's helpers

    dq = dk = dv = dgamma = ds0 = None
    if want_dg:
        dgamma, dq = dgamma_chunked(do, dsf, q, k, v, lg, scale, s0, chunk_size, want_dq)
    elif want_dq:
        dq, _ = run(do, v, k, lg, scale, None if s0 is None else s0.to(acc).transpose(-1, -2))
    if want_dk:
        dk = flip(run(flip(v), flip(do), flip(q), lg, scale, None)[0])
    if want_dv:
        dv = flip(run(flip(k), flip(q), flip(do), lg, scale, None)[0])
    if dsf is not None:
        dsf = dsf.to(acc)
        to_end = _powers(lg, T - 1 - pos)[..., None]
        dk = None if dk is None else dk + to_end * (v @ dsf.transpose(-1, -2))
        dv = None if dv is None else dv + to_end * (k @ dsf)
    if s0 is not None and want_ds0:
        ds0 = ((q * _powers(lg, pos + 1)[..., None]).transpose(-1, -2) @ do) * scale
        if dsf is not None:
            ds0 = ds0 + _power(lg, T)[..., None, None] * dsf
    return dq, dk, dv, dgamma, ds0
