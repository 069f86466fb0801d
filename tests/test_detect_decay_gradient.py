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


class FarCut(nn.Module):
    """Entries at distance >= ``cut`` detached (a buffer marks them, so a dynamic T keeps the
    proof's positions rules out of it); ``heads``: which heads are cut."""

    def __init__(self, cut: int, dtype=torch.float64, heads=(0, 1), gamma=(2.0, 3.0)):
        super().__init__()
        self.logit = nn.Parameter(torch.tensor(gamma, dtype=dtype))
        far = (_distances(64) >= cut)[None].repeat(H, 1, 1)
        far[[h for h in range(H) if h not in heads]] = False
        self.register_buffer("far", far)

    def forward(self, q, k, v):
        t = q.shape[-2]
        d = _distances(t)
        g = torch.sigmoid(self.logit)[:, None, None]
        dc = d.clamp(min=0)
        m = torch.where(self.far[:, :t, :t], g.detach() ** dc, g**dc) * (d >= 0)
        return (q @ k.mT * m.to(q.dtype)) @ v


@pytest.mark.parametrize(
    "cut,t,dynamic",
    [(8, 32, True), (20, 32, False)],
    ids=["past-the-prime-length", "past-16-rows"],
)
def test_a_cut_at_long_distances_declines(cut, t, dynamic):
    """Found by review: the first version checked T = 7 only (dynamic) and 16 rows (static)."""
    (region,) = regions(FarCut(cut), *qkv(t), dynamic=dynamic)
    assert not region.claimed and "gradient" in region.reason, region.reason


def test_one_head_cut_declines_beside_a_head_with_a_larger_gradient():
    """Per element: head 0 (gamma 0.3) off by 0.4 % was hidden by head 1's 40x larger gradient."""
    model = FarCut(7, heads=(0,), gamma=(-0.85, 3.5))
    (region,) = regions(model, *qkv(T + 4))
    assert not region.claimed and "gradient" in region.reason, region.reason


def test_a_graph_entered_without_grad_that_enables_it_is_checked():
    class Enabling(Learned):
        def forward(self, q, k, v):
            with torch.enable_grad():
                return super().forward(q, k, v)

    with torch.no_grad():
        (region,) = regions(Enabling("detach_distance_one"), *qkv(T))
    assert not region.claimed and "gradient" in region.reason, region.reason


def test_over_the_budget_a_mask_that_cuts_its_gradient_declines(monkeypatch):
    """The check needs 4x the value proof's memory; past the budget a cut declines unchecked."""
    from rtpcompile.detect import mask_gradient

    monkeypatch.setattr(mask_gradient, "proof_budget", lambda: 1)
    (region,) = regions(Learned("detach_far"), *qkv(T))
    assert not region.claimed and "too large" in region.reason, region.reason
    (region,) = regions(Learned("plain"), *qkv(T))
    assert region.claimed, region.reason


@pytest.mark.parametrize("kind", ["pow", "explog", "torchscale"])
def test_float32_learnable_decays_at_long_lengths_stay_claimed(kind):
    """Found by review of the fix: a tolerance from the mask's dtype alone (float64 here: the
    distances are float64) declined float32 parameters' decays at T = 512 for rounding."""

    class Float32Decay(nn.Module):
        def __init__(self):
            super().__init__()
            self.logit = nn.Parameter(torch.tensor([2.0, 3.0]))

        def forward(self, q, k, v):
            d = _distances(q.shape[-2]).double()
            g = torch.sigmoid(self.logit)[:, None, None]
            dc = d.clamp(min=0)
            m = torch.exp(dc * torch.log(g)) if kind == "explog" else g**dc
            m = m * (d >= 0)
            if kind == "torchscale":
                m = m / m.sum(-1, keepdim=True).sqrt()
            return (q @ k.mT * m.to(q.dtype)) @ v

    (region,) = regions(Float32Decay(), *qkv(512))
    assert region.claimed, region.reason
