"""Float64 reference implementations of retention: short and obviously correct.

Layout [B, H, T, D]. These are the oracle every fast path is tested against; they are not
meant to be fast. All three return ``(o, final_state)`` with ``final_state`` of shape
[B, H, K, V] and compute in float64.
"""

from __future__ import annotations

import torch


def _prep(q, k, v, gamma, scale, initial_state):
    B, H, T, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else float(scale)
    q, k, v = (x.double() for x in (q, k, v))
    gamma = gamma.double().reshape(H)
    if initial_state is None:
        s0 = q.new_zeros(B, H, K, V)
    else:
        s0 = initial_state.double()
    return q, k, v, gamma, scale, s0


def reference_recurrent(q, k, v, gamma, scale=None, initial_state=None):
    """S_t = gamma * S_{t-1} + k_t^T v_t ; o_t = scale * q_t S_t, token by token."""
    q, k, v, gamma, scale, state = _prep(q, k, v, gamma, scale, initial_state)
    g = gamma[None, :, None, None]
    outs = []
    for t in range(q.shape[2]):
        state = g * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, :, t], state))
    o = torch.stack(outs, dim=2) if outs else v.new_zeros(v.shape)
    return o, state


def reference_parallel(q, k, v, gamma, scale=None, initial_state=None):
    """o = scale * ((Q K^T) * D) V with D[h, i, j] = gamma_h^(i - j) for i >= j, plus the state.

    NOTE: causal for non-finite values too, like the recurrence: the scores above the diagonal
    are selected to 0 (not multiplied by 0: 0 * NaN = NaN), and the product with V reads finite
    values only, a non-finite v_s[j] setting column j of the rows t >= s to NaN (the recurrent
    state's column is inf/NaN from s on). Gamma may be 0 (0**0 = 1: the diagonal keeps weight 1).
    """
    q, k, v, gamma, scale, s0 = _prep(q, k, v, gamma, scale, initial_state)
    T = q.shape[2]
    pos = torch.arange(T, dtype=torch.float64, device=q.device)
    diff = pos[:, None] - pos[None, :]
    g = gamma[:, None, None]
    causal = diff >= 0
    scores = torch.where(causal, (q @ k.transpose(-1, -2)) * g ** diff.clamp(min=0), 0)
    bad = ~torch.isfinite(v)
    o = scores @ v.masked_fill(bad, 0)
    # the incoming state sits at position -1
    o = scale * (o + g ** (pos + 1)[:, None] * (q @ s0))
    o = o.masked_fill(bad.cumsum(dim=2) > 0, float("nan"))
    to_end = g ** (T - 1 - pos)[:, None]  # [H, T, 1]
    final = (k * to_end).transpose(-1, -2) @ v + (gamma**T)[:, None, None] * s0
    return o, final


def reference_chunkwise(q, k, v, gamma, scale=None, initial_state=None, chunk_size=64):
    """The parallel form applied chunk by chunk, carrying the state between chunks."""
    T = q.shape[2]
    state = initial_state
    outs = []
    for start in range(0, T, chunk_size):
        sl = slice(start, min(T, start + chunk_size))
        o, state = reference_parallel(q[:, :, sl], k[:, :, sl], v[:, :, sl], gamma, scale, state)
        outs.append(o)
    if not outs:
        return reference_parallel(q, k, v, gamma, scale, initial_state)
    return torch.cat(outs, dim=2), state
