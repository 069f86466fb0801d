"""The op differentiates a learnable decay through its distance-1 entries (gamma = M[1, 0] /
M[1, 1]) and its row scale through the diagonal: it treats every mask entry as c_i * gamma^(i-j).
A mask with those values whose gradient is not that one (a detach or a ``no_grad`` span on some
entries only) is declined; a detach of the whole mask, or of a row normaliser, keeps the
structure of the gradient and stays claimed, with eager's gradients."""

from __future__ import annotations

import pytest
import torch
from test_detect_soundness_more import qkv, regions, rel
from torch import nn

H, T = 2, 8


def _distances(t: int) -> torch.Tensor:
    i = torch.arange(t)
    return i[:, None] - i[None, :]


class Learned(nn.Module):
    """A learnable per-head decay gamma = sigmoid(logit), its mask built as ``kind`` says."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.logit = nn.Parameter(torch.tensor([2.0, 3.0], dtype=torch.float64))

    def forward(self, q, k, v):
        d = _distances(q.shape[-2])
        g = torch.sigmoid(self.logit)[:, None, None]
        dc = d.clamp(min=0)
        if self.kind == "plain":
            m = g**dc
        elif self.kind == "detach_distance_one":  # same values as g ** d
            m = torch.where(d == 1, g.detach(), g**dc)
        elif self.kind == "detach_far":
            m = torch.where(d > 3, g.detach() ** dc, g**dc)
        elif self.kind == "no_grad_far":
            with torch.no_grad():
                far = g**dc
            m = torch.where(d > 3, far, g**dc)
        elif self.kind == "detach_whole":
            m = (g**dc).detach()
        elif self.kind == "detached_row_norm":
            m = g**dc * (d >= 0)
            m = m / m.sum(-1, keepdim=True).detach().sqrt()
        m = m * (d >= 0)
        return (q @ k.mT * m) @ v


@pytest.mark.parametrize("kind", ["detach_distance_one", "detach_far", "no_grad_far"])
def test_a_decay_detached_at_some_entries_declines(kind):
    (region,) = regions(Learned(kind), *qkv(T))
    assert not region.claimed
    assert "gradient" in region.reason, region.reason


@pytest.mark.parametrize("kind", ["plain", "detach_whole", "detached_row_norm"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_decays_whose_gradient_is_gammas_stay_claimed_with_eager_gradients(kind, dynamic):
    model = Learned(kind)
    (region,) = regions(model, *qkv(T), dynamic=dynamic)
    assert region.claimed, region.reason
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="rtp", dynamic=dynamic)
    inputs = qkv(T, grad=True)
    want = model(*inputs)
    want_grads = torch.autograd.grad(want.square().sum(), [model.logit, *inputs], allow_unused=True)
    got = compiled(*inputs)
    got_grads = torch.autograd.grad(got.square().sum(), [model.logit, *inputs], allow_unused=True)
    assert rel(got, want) < 1e-12
    for a, b in zip(got_grads, want_grads, strict=True):
        if b is None:
            assert a is None or not a.abs().max()
        else:
            assert rel(a, b) < 1e-10
