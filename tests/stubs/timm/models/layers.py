"""Test stub of timm.models.layers: stochastic depth, the one function torchscale imports."""

from __future__ import annotations

import torch


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Zero whole samples with probability ``drop_prob``, rescale the rest (training only)."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    return x * x.new_empty(shape).bernoulli_(keep) / keep
