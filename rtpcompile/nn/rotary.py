"""Rotary (xPos-style) relative positions shared by retention and attention.

RetNet multiplies q_n and k_m by e^{i n theta} and e^{-i m theta} so that q_n . k_m depends on
n - m only. Here the complex product is written in real arithmetic with the rotate-half
convention: channel j and channel j + D/2 are the real and imaginary part of one complex number.
The angles are rebuilt from ``arange`` on every call, so a traced graph carries the positions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotary_cos_sin(
    seq_len: int,
    head_dim: int,
    offset: int = 0,
    base: float = 10000.0,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """cos and sin of n * theta_j for positions n = offset .. offset + seq_len - 1.

    theta_j = base ** (-2j / head_dim); both outputs have shape [seq_len, head_dim] (the
    half-size angle table repeated twice, matching :func:`rotate_half`).
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim)
    pos = torch.arange(seq_len, device=device, dtype=dtype) + offset
    angles = pos[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] -> [-x2, x1] on the last dimension (multiplication by i)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * e^{i n theta} in real arithmetic: x [..., T, D], cos/sin [T, D]."""
    return x * cos + rotate_half(x) * sin


def rotate_qk(
    q: Tensor, k: Tensor, offset: int = 0, base: float = 10000.0
) -> tuple[Tensor, Tensor]:
    """Rotate q and k [B, H, T, D] by the angles of positions offset .. offset + T - 1."""
    # NOTE: angles are computed in at least float32 (positions times small frequencies lose
    # precision in half types) and cast back to the activation dtype; one table serves q and k.
    angle_dtype = torch.promote_types(q.dtype, torch.float32)
    cos, sin = rotary_cos_sin(q.shape[-2], q.shape[-1], offset, base, q.device, angle_dtype)
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
