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
    """o = scale * ((Q K^T) * D) V with D[h, i, j] = gamma_h^(i - j) for i >= j, plus the state."""
    q, k, v, gamma, scale, s0 = _prep(q, k, v, gamma, scale, initial_state)
    T = q.shape[2]
    pos = torch.arange(T, dtype=torch.float64, device=q.device)
    diff = pos[:, None] - pos[None, :]
    lg = torch.log(gamma)[:, None, None]
    decay = torch.where(diff >= 0, torch.exp(lg * diff.clamp(min=0)), torch.zeros_like(diff))
    o = scale * (q @ k.transpose(-1, -2) * decay) @ v
    # the incoming state sits at position -1
    o = o + scale * torch.exp(lg * (pos[:, None] + 1)) * (q @ s0)
    to_end = torch.exp(lg * (T - 1 - pos)[:, None])  # [H, T, 1]
    final = (k * to_end).transpose(-1, -2) @ v + torch.exp(torch.log(gamma) * T)[:, None, None] * s0
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
