"""Masks the proof saw at one value of something that changes later without a recompile (found
2026-11-24): another symbolic size with a static T, a trainable parameter behind a clamp; and a
causal step on the scores before an overflowing decay product (NaN in eager)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rtpcompile.backend as backend

pytestmark = pytest.mark.usefixtures("fresh_compile")


def _qkv(b: int, t: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 2, t, d, generator=gen) for d in (4, 4, 3)]


def _positions(t: int) -> torch.Tensor:
    i = torch.arange(t)
    return (i[:, None] - i[None, :]).float()


class Window(nn.Module):
    """A sliding-window decay whose window is an int argument: Dynamo makes it a symbol at the
    second value, while T stays static."""

    def __init__(self):
        super().__init__()
        self.register_buffer("gamma", torch.tensor([0.9, 0.97]))

    def forward(self, q, k, v, window: int):
        d = _positions(q.shape[2])
        decay = self.gamma[:, None, None] ** d.clamp(min=0)
        mask = torch.where((d >= 0) & (d < window), decay, 0.0)
        return (q @ k.transpose(-1, -2) * mask) @ v


def test_a_window_argument_is_not_frozen_at_its_example_value():
    """Windows 16 and 32 cover T = 8 (a plain causal decay there); 4 and 2 do not. Before the
    fix, 4 and 2 ran the claimed region compiled at window 32 (max error 5.3 of 7.4)."""
    model = Window()
    compiled = torch.compile(model, backend="rtp")
    for window in (16, 32, 4, 2):
        q, k, v = _qkv(1, 8, seed=window)
        with torch.no_grad():
            want = model(q.double(), k.double(), v.double(), window)
            got = compiled(q, k, v, window)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert backend.counters["regions_declined"] >= 1  # NOTE: the symbolic window's graph


class BatchMask(nn.Module):
    """A mask built from the batch size: a diagonal offset, or a value scale."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.register_buffer("gamma", torch.tensor([0.9, 0.7]))

    def forward(self, q, k, v):
        b = q.shape[0]
        decay = self.gamma[:, None, None] ** _positions(q.shape[2]).clamp(min=0)
        if self.how == "offset":
            mask = torch.tril(decay, diagonal=b - 3)
        else:
            mask = torch.tril(decay) * (b / 3)
        return (q @ k.transpose(-1, -2) * mask) @ v


@pytest.mark.parametrize("how", ["offset", "scale"])
def test_a_mask_read_from_a_symbolic_batch_is_right_at_every_batch(how):
    """B = 2, then 3 (automatic dynamic: B becomes a symbol, T = 8 stays static), then 5: the
    offset declines, the scale makes the op read the diagonal (both ran at B = 3's values)."""
    model = BatchMask(how)
    compiled = torch.compile(model, backend="rtp")
    for b in (2, 3, 5):
        q, k, v = _qkv(b, 8, seed=b)
        with torch.no_grad():
            want = model(q.double(), k.double(), v.double())
            got = compiled(q, k, v)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


class ClampedTemperature(nn.Module):
    """A trainable per-head factor clamped at 1 and initialised above it: moving it by a few
    percent, as the proof does, changes nothing, so the diagonal must be read at run time."""

    def __init__(self):
        super().__init__()
        self.register_buffer("gamma", torch.tensor([0.9, 0.7]))
        self.p = nn.Parameter(torch.tensor([2.0, 2.0]))

    def forward(self, q, k, v):
        d = _positions(q.shape[2])
        decay = torch.where(d >= 0, self.gamma[:, None, None] ** d.clamp(min=0), 0.0)
        mask = decay * self.p.clamp(max=1.0)[:, None, None]
        return (q @ k.transpose(-1, -2) * mask) @ v


@pytest.mark.parametrize("dynamic", [False, True])
def test_a_trainable_factor_behind_a_clamp_is_read_when_it_changes(dynamic):
    model = ClampedTemperature()
    compiled = torch.compile(model, backend="rtp", dynamic=dynamic)
    q, k, v = _qkv(1, 8, seed=0)
    for p in (None, 0.5):
        if p is not None:
            with torch.no_grad():
                model.p.fill_(p)  # NOTE: as an optimizer step would; was ignored (output 2x)
        with torch.no_grad():
            torch.testing.assert_close(compiled(q, k, v), model(q, k, v), rtol=1e-5, atol=1e-5)
    assert backend.counters["regions_claimed"] == 1


class StepThenDecay(nn.Module):
    """A causal step on the scores, then the decay product, with an unclamped exponent that
    overflows above the diagonal (γ = 0.5, T = 200: 0.5 ** -199 is inf in float32)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.register_buffer("gamma", torch.tensor([0.5, 0.7]))

    def forward(self, q, k, v):
        t = q.shape[2]
        decay = self.gamma[:, None, None] ** _positions(t)
        s = q @ k.transpose(-1, -2)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        if self.how == "masked_fill":
            a = s.masked_fill(~causal, 0) * decay
        elif self.how == "tril":
            a = s.tril() * decay
        else:  # NOTE: the step after the product selects: finite, claimed
            a = (s * decay).tril()
        return a @ v


@pytest.mark.parametrize("how", ["masked_fill", "tril", "tril after"])
def test_a_causal_step_before_an_overflowing_decay_declines_as_eager_is_nan(how):
    model = StepThenDecay(how)
    q, k, v = _qkv(1, 200, seed=1)
    with torch.no_grad():
        want = model(q, k, v)
        got = torch.compile(model, backend="rtp", dynamic=False)(q, k, v)
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, equal_nan=True)
    after = how == "tril after"
    assert want.isnan().any() != after
    assert backend.counters["regions_claimed"] == (1 if after else 0)
