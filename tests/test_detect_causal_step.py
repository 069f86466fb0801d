"""A 0/1 causal step and a decay applied as two steps on the scores (``s.masked_fill(~c, 0) *
decay``, ``(s * decay).tril()``, ...): claimed when the product of the two is a causal decay,
equal to eager in float64 outputs and gradients (learnable decay included); declined otherwise."""

from __future__ import annotations

import pytest
import torch
from test_detect import regions
from torch import nn

import rtpcompile.backend as backend
from rtpcompile.rewrite import rtp_retention

B, H, K, V = 2, 3, 5, 7


def _positions(t):
    i = torch.arange(t)
    return i[:, None], i[None, :]


def _fill_then_decay(s, c, d):
    return s.masked_fill(~c, 0) * d


def _where_then_decay(s, c, d):
    return torch.where(c, s, 0.0) * d


def _tril_then_decay(s, c, d):
    return d * s.tril()


def _decay_then_fill(s, c, d):
    return (s * d).masked_fill(~c, 0)


def _decay_then_where(s, c, d):
    return torch.where(c, d * s, 0.0)


def _decay_then_tril(s, c, d):
    return torch.tril(s * d)


SPELLINGS = {
    f.__name__.lstrip("_"): f
    for f in (_fill_then_decay, _where_then_decay, _tril_then_decay, _decay_then_fill,
              _decay_then_where, _decay_then_tril)
}  # fmt: skip


class TwoStep(nn.Module):
    """Scores masked by a causal indicator and by a decay that is symmetric (|i - j|) or
    clamped; the decay logit is a parameter, so its gradient is checked too."""

    def __init__(self, spelling, symmetric=True, indicator=None):
        super().__init__()
        self.spelling, self.symmetric = spelling, symmetric
        self.indicator = indicator or (lambda i, j: i >= j)
        gamma = 1 - 2.0 ** (-1.5 - torch.arange(H, dtype=torch.float64))
        self.logit = nn.Parameter(torch.logit(gamma))

    def forward(self, q, k, v):
        i, j = _positions(q.shape[-2])
        dist = (i - j).abs() if self.symmetric else (i - j).clamp(min=0)
        decay = torch.sigmoid(self.logit)[:, None, None] ** dist
        return self.spelling(q @ k.transpose(-1, -2), self.indicator(i, j), decay) @ v


def _inputs(t, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, H, t, K), (B, H, t, K), (B, H, t, V)]
    return [torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]


# NOTE: each spelling once (CI time), half of them with a symmetric decay |i - j|
@pytest.mark.parametrize(
    "name, symmetric", [(name, n % 2 == 0) for n, name in enumerate(sorted(SPELLINGS))]
)
def test_two_step_masks_are_claimed_and_equal_eager(inductor_graphs, name, symmetric):
    model = TwoStep(SPELLINGS[name], symmetric).double()
    compiled = torch.compile(model, backend="rtp", dynamic=True, fullgraph=True)
    for t in (9, 1, 20):
        x = _inputs(t, seed=t)
        out, ref = compiled(*x), model(*x)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        got = torch.autograd.grad(out.square().sum(), [*x, model.logit])
        want = torch.autograd.grad(ref.square().sum(), [*x, model.logit])
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
    ops = sum(n.target is rtp_retention for gm in inductor_graphs for n in gm.graph.nodes)
    assert ops >= 1 and backend.counters["regions_claimed"] >= 1


@pytest.mark.parametrize(
    "indicator, why",
    [
        (lambda i, j: i <= j, "anti-causal"),
        (lambda i, j: (i >= j) & (i - j < 3), "a window"),
        (lambda i, j: i > j, "the diagonal dropped"),
        (lambda i, j: i >= 0 * j, "no causal cut"),
    ],
)
def test_an_indicator_that_is_not_causal_is_declined(indicator, why):
    for name in ("fill_then_decay", "decay_then_where"):
        model = TwoStep(SPELLINGS[name], symmetric=True, indicator=indicator).double()
        found = regions(model, *_inputs(9))
        assert found and not any(r.claimed for r in found), (why, name)


def test_an_indicator_read_from_an_input_is_declined():
    class Padded(TwoStep):
        def forward(self, q, k, v, keep):
            i, j = _positions(q.shape[-2])
            decay = torch.sigmoid(self.logit)[:, None, None] ** (i - j).abs()
            s = (q @ k.transpose(-1, -2)).masked_fill(~((i >= j) & keep[:, None, None, :]), 0)
            return (s * decay) @ v

    keep = torch.ones(B, 9, dtype=torch.bool)
    (region,) = regions(Padded(_fill_then_decay).double(), *_inputs(9), keep)
    assert not region.claimed
