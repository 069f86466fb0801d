"""Decays and dtypes of converted layers: the initial per-head gamma and the precision it
is kept in (float32 at least: 1 - gamma is as small as 2**-20, below bfloat16's resolution)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import ops


def resolve_logit(decay, num_heads: int, head_mix: float | None = None, total: int = 0) -> Tensor:
    """Per-head logit(gamma), float64 [num_heads], from "retnet", a sequence/tensor or a
    callable (its values checked by ``resolve_decay``).

    NOTE: RetNet's gamma_h = 1 - 2**(-5 - h) is 1.0 in float32 from h = 19 on (in float64 from
    h = 48): its logit log(2**(5 + h) - 1) is computed in closed form, finite for every head, so
    such heads still train (a logit of inf has no gradient)."""
    if isinstance(decay, str) and decay == "retnet":
        a = 5.0 + torch.arange(num_heads, dtype=torch.float64)
        return a * math.log(2.0) + torch.log1p(-torch.exp2(-a))
    return torch.logit(resolve_decay(decay, num_heads, head_mix, total))


def resolve_decay(decay, num_heads: int, head_mix: float | None = None, total: int = 0) -> Tensor:
    """Per-head gamma, float64 [num_heads], from "retnet", a sequence/tensor or a callable."""
    if isinstance(decay, str):
        if decay != "retnet":
            raise ValueError(
                f"decay must be 'retnet', a sequence, a tensor or a callable, got {decay!r}"
            )
        return ops.retention_init_decay(num_heads).double()
    values = decay(num_heads) if callable(decay) else decay
    # NOTE: float64: a float32 cast made a given 1 - 1e-8 read 1.0 (and then refused it)
    gamma = torch.as_tensor(values, dtype=torch.float64).flatten().cpu()
    if gamma.numel() == 1:
        gamma = gamma.expand(num_heads).clone()
    if gamma.shape != (num_heads,):
        which = "one per head"
        if head_mix is not None:
            which = (
                f"one per retention head: head_mix={head_mix} makes {num_heads} of the "
                f"{total} heads retention"
            )
        raise ValueError(f"decay must give {num_heads} values ({which}), got {gamma.numel()}")
    if not bool(((gamma > 0) & (gamma < 1)).all()):  # NOTE: NaN fails both comparisons
        raise ValueError(f"decay values must lie in (0, 1), got {gamma.tolist()}")
    return gamma


def param_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's first floating parameter (float32 when it has none), a converted
    layer's ``decay_logit`` (float32 in a 16-bit model, by design) not counted: a bfloat16 model
    whose first parameter is one read as float32 until 2026-11-25."""
    found = (
        p
        for name, p in module.named_parameters()
        if p.is_floating_point() and name.rpartition(".")[2] != "decay_logit"
    )
    p = next(found, None)
    return torch.float32 if p is None else p.dtype


def decay_dtype(dtype: torch.dtype) -> torch.dtype:
    """The decay is computed in float32 (float64 for float64): 1 - gamma is as small as 2**-20."""
    return torch.float64 if dtype == torch.float64 else torch.float32
