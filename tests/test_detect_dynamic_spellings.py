"""Real-world mask spellings the position allow-list (detect/positions.py) must keep claiming
under a dynamic T: each was claimed, and right, before the allow-list, which first declined them
(a shift by 1 that cancels, a zero tensor as a fill, a row normaliser, Mamba2's segsum)."""

from __future__ import annotations

import pytest
import torch
from test_detect import regions
from torch import nn

H, K = 2, 8


def llama_causal(s, T, q):
    """Hugging Face's ``_make_causal_mask`` (i < j + 1) as an additive mask inside exp."""
    mask = torch.full((T, T), torch.finfo(q.dtype).min, dtype=q.dtype)
    cond = torch.arange(T)
    mask.masked_fill_(cond < (cond + 1).view(T, 1), 0)
    i = torch.arange(T, dtype=q.dtype)
    return torch.exp((i[:, None] - i[None, :]) * s.log_gamma[:, None, None] + mask)


def arange_from_one(s, T, q):
    i = torch.arange(1, T + 1)
    d = i[:, None] - i[None, :]
    return torch.where(d >= 0, s.gamma[:, None, None] ** d, 0.0)


def segsum(s, T, q):
    """Mamba2's segsum with a constant per-head log decay."""
    x = s.log_gamma[:, None].expand(H, T)[..., None].repeat(1, 1, T)
    x = x.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool), diagonal=-1), 0)
    x = torch.cumsum(x, dim=-2)
    return torch.exp(x.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), -torch.inf))


def cumsum_of_ones(s, T, q):
    i = torch.ones(T, dtype=q.dtype).cumsum(0) - 1
    d = i[:, None] - i[None, :]
    return torch.where(d >= 0, s.gamma[:, None, None] ** d, 0.0)


def zeros_like_fill_normalised(s, T, q):
    i = torch.arange(T)
    d = i[:, None] - i[None, :]
    g = s.gamma[:, None, None] ** d.clamp(min=0)
    m = torch.where(d >= 0, g, torch.zeros_like(g))
    return m / m.sum(-1, keepdim=True).sqrt()


def syncdoth(s, T, q):
    """syncdoth/RetNet's decay mask."""
    index = torch.arange(T).to(s.log_gamma)
    mask = torch.tril(torch.ones(T, T)).to(s.log_gamma)
    mask = torch.masked_fill(index[:, None] - index[None, :], ~mask.bool(), torch.inf)
    mask = torch.nan_to_num(torch.exp(mask * s.log_gamma[:, None, None]))
    mask = mask / mask.sum(dim=-1, keepdim=True).sqrt()
    return torch.nan_to_num(mask, nan=0.0)


class Masked(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.log_gamma = nn.Parameter(torch.log(torch.tensor([0.9, 0.75], dtype=torch.float64)))
        self.register_buffer("gamma", torch.tensor([0.9, 0.75], dtype=torch.float64))

    def forward(self, q, k, v):
        return ((q @ k.transpose(-1, -2)) * self.fn(self, q.shape[2], q)) @ v


SPELLINGS = [
    llama_causal,
    arange_from_one,
    segsum,
    cumsum_of_ones,
    zeros_like_fill_normalised,
    syncdoth,
]


@pytest.mark.parametrize("fn", SPELLINGS, ids=lambda f: f.__name__)
def test_spelling_is_claimed_under_a_dynamic_length_and_equals_eager(fn):
    model = Masked(fn)
    q, k, v = (torch.randn(1, H, 11, K, dtype=torch.float64) for _ in range(3))
    (region,) = regions(model, q, k, v, dynamic=True)
    assert region.claimed, region.reason
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="rtp", dynamic=True)
    for T in (11, 37):
        q, k, v = (torch.randn(1, H, T, K, dtype=torch.float64) for _ in range(3))
        torch.testing.assert_close(compiled(q, k, v), model(q, k, v), rtol=1e-10, atol=1e-10)


def test_a_shift_by_more_than_one_is_still_a_window():
    """``i < j + 2`` keeps one superdiagonal: not causal, and declined."""

    def shifted_two(s, T, q):
        cond = torch.arange(T)
        i = torch.arange(T, dtype=q.dtype)
        keep = (cond < (cond + 2).view(T, 1)).to(q.dtype)
        return torch.exp((i[:, None] - i[None, :]).clamp(min=0) * s.log_gamma[:, None, None]) * keep

    q, k, v = (torch.randn(1, H, 11, K, dtype=torch.float64) for _ in range(3))
    (region,) = regions(Masked(shifted_two), q, k, v, dynamic=True)
    assert not region.claimed
