"""d gamma of the aten backward: the forward-mode derivative of the chunkwise form.

Every product of a reader and a writer n positions apart enters d gamma weighted by
n gamma^(n-1): inside a chunk through the scores, across chunks through the incoming states
and their derivatives. Only lags enter, every weight is >= 0, and nothing is divided by gamma,
so float32 d gamma is as accurate as eager autograd's at any T and gamma in [0, 1]
(``tests/test_dgamma_precision.py``). The Triton kernels sum the same derivative in their dq
pass (``kernels/backward.py``).
"""

from __future__ import annotations

import torch

from .aten_impl import (
    _poison,
    _power,
    _powers,
    accumulation_dtype,
    chunk_layout,
    finite_values,
    to_chunks,
)

Tensor = torch.Tensor


def _lag_weights(log_gamma: Tensor, lags: Tensor) -> Tensor:
    """d(gamma^n)/d gamma = n gamma^(n-1) for n = ``lags``, 0 where n <= 0; shape [H, *lags].

    NOTE: gamma^(n-1), not n gamma^n / gamma: no division, so gamma = 0 (run as ``MIN_GAMMA``)
    gives the exact lag-1 weight 1. Exponents are clamped at 0 (a negative one overflows)."""
    return _powers(log_gamma, (lags - 1).clamp(min=0)) * lags.clamp(min=0).to(log_gamma.dtype)


def _weighted(x: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """[x * first, x * second] along the last dim, for chunked x [B, H, N, C, D] and per-head,
    per-position weights [H, C]: two products in one matmul, without a ``cat`` copy."""
    D = x.shape[-1]
    out = x.new_empty(*x.shape[:-1], 2 * D)
    torch.mul(x, first[:, None, :, None], out=out[..., :D])
    torch.mul(x, second[:, None, :, None], out=out[..., D:])
    return out


def _states_and_tangents(k, v, log_gamma, s0) -> tuple[Tensor, Tensor, Tensor]:
    """For chunked k, v [B, H, N, C, *]: ([S_n; S'_n] [B, H, N, 2K, V], S_{N-1}, S'_{N-1}), the
    state each chunk reads and its derivative in gamma: S_0 = s0 (or 0), S'_0 = 0,
    S_{n+1} = gamma^C S_n + KV_n, S'_{n+1} = C gamma^(C-1) S_n + gamma^C S'_n + KV'_n."""
    B, H, N, C, K = k.shape
    to_end = torch.arange(C - 1, -1, -1, device=k.device)
    kv = _weighted(k, _powers(log_gamma, to_end), _lag_weights(log_gamma, to_end))
    kv = kv.transpose(-1, -2) @ v  # [B, H, N, 2K, V]: [KV_n; KV'_n]
    g_c = _power(log_gamma, C)[:, None, None]
    dg_c = (C * _power(log_gamma, C - 1))[:, None, None]
    incoming = k.new_empty(B, H, N, 2 * K, v.shape[-1])
    state = k.new_zeros(B, H, K, v.shape[-1]) if s0 is None else s0.to(k.dtype)
    tangent = torch.zeros_like(state)
    for n in range(N):
        incoming[:, :, n, :K], incoming[:, :, n, K:] = state, tangent
        if n < N - 1:
            state, tangent = (
                torch.addcmul(kv[:, :, n, :K], g_c, state),
                torch.addcmul(kv[:, :, n, K:], dg_c, state).addcmul_(g_c, tangent),
            )
    return incoming, state, tangent


def dgamma_chunked(do, dsf, q, k, v, log_gamma, scale, s0, chunk_size: int, want_dq: bool):
    """(d gamma [H], dq or None): d gamma as the forward-mode derivative of the chunkwise form.

    d gamma = <do, d o/d gamma> + <dsf, d sf/d gamma>, every product of a reader and a writer
    ``n`` positions apart weighted n gamma^(n-1) (``_lag_weights``): inside a chunk through the
    scores (Q K^T)(dO V^T); across chunks through the incoming states S_n and their derivatives
    S'_n = d S_n / d gamma (S_{n+1} = gamma^C S_n + KV_n, so S'_{n+1} = C gamma^(C-1) S_n +
    gamma^C S'_n + KV'_n). Every weight is >= 0 and only the lag enters.

    NOTE: the closed form this replaced (sum_t (t - c) (<q_t, dq_t> - <k_t, dk_t>)) weighted each
    product by its reader's and its writer's positions separately (~T) and cancelled them:
    float32 rounding of dq, dk grew ~T times (8e-2 relative at T = 4096, gamma = 0.02).
    dq (``want_dq``) shares the scores and states: it is what ``retention(do, v, k)`` with the
    transposed initial state gives. O(T * C * (K + V) + T * K * V), like one forward.
    """
    acc = accumulation_dtype(q.dtype)
    B, H, T, K = q.shape
    if q.shape[:3].numel() == 0:  # T = 0: sf = s0, no decay is applied anywhere
        dq = q.new_zeros(q.shape, dtype=acc) if want_dq else None
        return log_gamma.new_zeros(H), dq
    C, N, pad = chunk_layout(T, chunk_size)
    k_ok, reach = finite_values(k.to(acc))

    def chunked(x):
        return to_chunks(x, acc, N, C, pad)

    q, k, v, do = chunked(q), chunked(k), chunked(v), chunked(do)
    k_ok = k if reach is None else chunked(k_ok)
    pos = torch.arange(C, device=q.device)
    lag = pos[:, None] - pos[None, :]

    # inside chunks: sum_{i > j} scale (i - j) gamma^(i-j-1) (q_i . k_j)(do_i . v_j)
    dov = (do @ v.transpose(-1, -2)).tril_()  # [B, H, N, C, C]; a select, see causal_scores
    pairs = (q @ k.transpose(-1, -2)).tril_(-1).mul_(dov)
    dgamma = (pairs.mul_(_lag_weights(log_gamma, lag)[:, None]).sum(dim=(0, 2, 3, 4))) * scale

    # across chunks: [S_n; S'_n] and the last chunk's S_{N-1}, S'_{N-1}
    incoming, state, tangent = _states_and_tangents(k, v, log_gamma, s0)
    # o_i reads S_n at lag i + 1: <do_i, q_i ((i+1) gamma^i S_n + gamma^(i+1) S'_n)>; the second
    # summed over the chunk as <P_n, S'_n>, P_n = sum_i gamma^(i+1) q_i^T do_i
    reading = _powers(log_gamma, pos + 1)[:, None, :, None]
    read_w = _lag_weights(log_gamma, pos + 1)[:, None, :, None]
    if want_dq:  # the first from dq's own product do_i S_n^T (no second product for it)
        inter = do @ incoming[..., :K, :].transpose(-1, -2)  # [B, H, N, C, K]
        dgamma = dgamma + (inter * q).sum(-1, keepdim=True).mul_(read_w).sum((0, 2, 3, 4)) * scale
        p = (q * reading).transpose(-1, -2) @ do
        dgamma = dgamma + p.mul_(incoming[..., K:, :]).sum(dim=(0, 2, 3, 4)) * scale
    else:  # [P'_n; P_n], P'_n = sum_i (i+1) gamma^i q_i^T do_i, in one product
        p = _weighted(q, read_w[:, 0, :, 0], reading[:, 0, :, 0]).transpose(-1, -2) @ do
        dgamma = dgamma + p.mul_(incoming).sum(dim=(0, 2, 3, 4)) * scale
    if dsf is not None:  # sf = gamma^r S_{N-1} + the last chunk's r real tokens
        r = C - pad
        dsf = dsf.to(acc)
        last_to_end = r - 1 - pos  # negative (padding): weight 0
        last_k = k[:, :, -1] * _lag_weights(log_gamma, last_to_end)[..., None]
        d_final = (
            (r * _power(log_gamma, r - 1))[:, None, None] * state
            + _power(log_gamma, r)[:, None, None] * tangent
            + last_k.transpose(-1, -2) @ v[:, :, -1]
        )
        dgamma = dgamma + (dsf * d_final).sum(dim=(0, 2, 3))
    dq = None
    if want_dq:  # scale ((dO V^T) * D) K + scale gamma^(i+1) dO_i S_n^T
        dq = dov.mul_(_powers(log_gamma, lag.clamp(min=0))[:, None]) @ k_ok
        dq = dq.add_(inter.mul_(reading)).mul_(scale)
        dq = _poison(dq.reshape(B, H, N * C, K)[:, :, :T], reach)
    return dgamma, dq
