"""Positions under a dynamic T that the proof's lengths (up to 1024) could not see change (found
2026-11-25): a cut on sums of ``ones(T, T)``, float positions that stop being exact past
2**24 (float16: 2048), and an offset position the overflow check took for an exponential.

The end-to-end tests lower the proof's cap to 16 (as test_proof_budget does), so that a
length past it is a short one."""

from __future__ import annotations

import pytest
import torch
from test_detect import Fn, regions
from torch import nn

from rtpcompile.detect import mask_eval, mask_growth, mask_proof
from rtpcompile.rewrite import rtp_retention

GAMMA = (0.9, 0.8)


def _decay(s, t: int) -> torch.Tensor:
    i = torch.arange(t)
    d = i[:, None] - i[None, :]
    return torch.where(d >= 0, s.gamma[:, None, None] ** d.clamp(min=0), 0.0)


class Masked(nn.Module):
    """Scores times ``fn(self, T)`` (a [H, T, T] float64 mask), float64 throughout."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.register_buffer("gamma", torch.tensor(GAMMA, dtype=torch.float64))

    def forward(self, q, k, v):
        return (q @ k.mT * self.fn(self, q.shape[2]).to(q.dtype)) @ v


def _qkv(b: int, t: int, seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, len(GAMMA), t, 4, generator=gen, dtype=dtype) for _ in range(3)]


def _ops(seen) -> int:
    return sum(n.target is rtp_retention for gm in seen for n in gm.graph.nodes)


def _matches_eager(model, lengths, dynamic=True, batch=1, rtol=1e-9):
    """Compiled (rtp, Inductor stubbed by ``inductor_graphs``) equals eager at each length."""
    compiled = torch.compile(model, backend="rtp", dynamic=dynamic, fullgraph=True)
    for t in lengths:
        x = _qkv(batch, t, seed=t)
        with torch.no_grad():
            torch.testing.assert_close(compiled(*x), model(*x), rtol=rtol, atol=rtol)


@pytest.fixture
def short_cap(monkeypatch):
    """The proof sees T <= 16 under a dynamic T (``MAX_SYMBOLIC_T``)."""
    monkeypatch.setattr(mask_eval, "MAX_SYMBOLIC_T", 16)
    monkeypatch.setattr(mask_proof, "MAX_SYMBOLIC_T", 16)
    monkeypatch.setattr(mask_growth, "MAX_SYMBOLIC_T", 16)


# --- reductions of shaped constants are positions ---------------------------------------------

W = 1100


def _sum_window(s, t):
    ones = torch.ones(t, t, dtype=torch.float64)
    i, j = ones.tril().sum(-1), ones.triu().sum(0)  # i + 1, j + 1
    return _decay(s, t) * ((i[:, None] - j[None, :]) < W)


def _repeated_window(s, t):
    i = torch.repeat_interleave(torch.ones(t, dtype=torch.long), output_size=t)  # arange(t)
    return _decay(s, t) * ((i[:, None] - i[None, :]) < W)


def _log_window(s, t):
    i = torch.arange(t, dtype=torch.float64)
    return _decay(s, t) * (torch.log((i[:, None] - i[None, :]) / W) < 0)  # d < W


_CUTS = {
    "sum_window": _sum_window,
    "sum_is_the_length": lambda s, t: _decay(s, t) * (torch.ones(t, t).sum(-1) <= W)[:, None],
    "mean_of_a_tril": lambda s, t: _decay(s, t) * (torch.ones(t, t).tril().mean(-1, True) > 1 / W),
    "sum_of_ones_like": lambda s, t: (d := _decay(s, t)) * (torch.ones_like(d).sum(-1, True) <= W),
    "repeat_interleave": _repeated_window,
    "log_of_a_scaled_distance": _log_window,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(_CUTS))
def test_a_cut_on_a_count_of_shaped_constants_is_declined(name):
    """Each is gamma ** (i - j) up to T = 1100 and cut past it; all were claimed (a sum of
    ``ones(T, T)`` was a constant to the rules, as ``ones(T, T)`` is; a repeat by counts was
    layout; a log of a position kept it unshifted). The hunter's first two at T = 1200: errors
    38.3 (eager max 274) and 439 (eager 0)."""
    (region,) = regions(Masked(_CUTS[name]), *_qkv(1, 16))
    assert not region.claimed
    assert "dynamic T" in region.reason, region.reason


def test_a_window_on_sums_of_ones_equals_eager_past_the_proven_lengths(inductor_graphs, short_cap):
    """The proof sees T <= 16, the window is at 20: T = 24 ran the claimed op before (the cut
    lost); now the region is declined and equals eager."""

    def window(s, t):
        ones = torch.ones(t, t, dtype=torch.float64)
        i, j = ones.tril().sum(-1), ones.triu().sum(0)
        return _decay(s, t) * ((i[:, None] - j[None, :]) < 20)

    _matches_eager(Masked(window), (12, 24))
    assert _ops(inductor_graphs) == 0


def test_a_step_on_a_sum_of_ones_of_a_symbolic_batch_is_declined(inductor_graphs):
    """``ones(B).sum() <= 2`` with a static T: B = 1, 2, then 4 (automatic dynamic makes B a
    symbol at the second). Before: B = 4 ran the op proven at B = 2 (error 36.6, eager 0)."""

    def small_batch(s, q, k, v):
        keep = torch.ones(q.shape[0], dtype=q.dtype).sum() <= 2
        return (q @ k.mT * (_decay(s, q.shape[2]) * keep)) @ v

    model = Fn(small_batch, heads=len(GAMMA))
    compiled = torch.compile(model, backend="rtp")
    for b in (1, 2, 4):
        x = _qkv(b, 8, seed=b, dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(compiled(*x), model(*x), rtol=1e-5, atol=1e-5)


def test_a_row_normaliser_from_a_sum_of_ones_is_still_claimed(inductor_graphs):
    """Dividing by a count (``decay / ones(T, T).tril().sum(-1)``) is a row scale, no cut."""

    def mean_over_prefix(s, t):
        return _decay(s, t) / torch.ones(t, t, dtype=torch.float64).tril().sum(-1, keepdim=True)

    _matches_eager(Masked(mean_over_prefix), (11, 37))
    assert _ops(inductor_graphs) > 0


class Table(nn.Module):
    """A constant read at the sizes: a 65536-long position buffer sliced to T (too long for the
    proof to fit the mask at its length), or a table indexed by T."""

    def __init__(self, how: str, window: int = W):
        super().__init__()
        self.how, self.window = how, window
        self.register_buffer("gamma", torch.tensor(GAMMA, dtype=torch.float64))
        self.register_buffer("pos", torch.arange(65536.0, dtype=torch.float64))
        self.register_buffer("table", (torch.arange(65536) < window).double())

    def forward(self, q, k, v):
        t = q.shape[2]
        decay = _decay(self, t)
        if self.how == "slice":
            p = self.pos[:t]
            decay = decay * ((p[:, None] - p[None, :]) < self.window)
        elif self.how == "index":
            decay = decay * (self.table[t - 1] > 0.5)
        else:
            decay = decay * (self.table.narrow(0, 0, t)[:, None] > 0.5)
        return (q @ k.mT * decay) @ v


@pytest.mark.parametrize("how", ["slice", "index", "narrow"])
def test_a_cut_on_a_constant_read_at_the_sizes_is_declined(how):
    """``self.pos[:T]`` compared with a number was a constant to the rules: with a buffer too
    long to prove the mask at its length, nothing saw the cut past T = 1024."""
    (region,) = regions(Table(how), *_qkv(1, 16))
    assert not region.claimed
    assert "dynamic T" in region.reason, region.reason


def test_a_window_on_a_sliced_buffer_equals_eager_past_the_proven_lengths(
    inductor_graphs, short_cap
):
    """The proof sees T <= 16, the window is at 20: before, T = 40 ran the op without the
    window (max error 14.5)."""
    _matches_eager(Table("slice", window=20), (12, 40))
    assert _ops(inductor_graphs) == 0


def _distance(t: int) -> torch.Tensor:
    i = torch.arange(t, dtype=torch.float64)
    return i[:, None] - i[None, :]


_SOFT_STEPS = {
    "one_plus_exp": lambda d: 1 + torch.exp(d - W),
    "logistic": lambda d: 1 / (1 + torch.exp(d - W)),
    "double_exp": lambda d: torch.exp(-torch.exp(d - W)),
    "high_power": lambda d: torch.exp(-((d / W) ** 1000)),
    "plus_a_step": lambda d: torch.exp(d - W) + (d >= 0),
    "logistic_of_a_row_sum": lambda d: 1 / (1 + torch.exp(d - W).sum(-1, keepdim=True)),
    "of_a_total": lambda d: 1 / (1 + torch.exp(d - W).sum()),
}


@pytest.mark.parametrize("name", sorted(_SOFT_STEPS))
def test_a_soft_step_on_positions_is_declined(name):
    """Each factor is 1 to the float at every d the proof sees and not past d ~ 1100: a window
    made of smooth ops. ``logistic`` was claimed: error 36.9 (eager max 274) at T = 1200; so were
    the last three until 2026-11-25 (an exponential summed with other positions, a row sum or a
    total shifted: the rules took a sum for a normaliser)."""
    (region,) = regions(
        Masked(lambda s, t: _decay(s, t) * _SOFT_STEPS[name](_distance(t))), *_qkv(1, 16)
    )
    assert not region.claimed
    assert "dynamic T" in region.reason, region.reason


def test_a_soft_window_equals_eager_past_the_proven_lengths(inductor_graphs, short_cap):
    """The proof sees T <= 16, where 1 / (1 + exp(d - 60)) is 1 in float64; T = 100 is not."""

    def logistic(s, t):
        return _decay(s, t) / (1 + torch.exp(_distance(t) - 60))

    _matches_eager(Masked(logistic), (12, 100))
    assert _ops(inductor_graphs) == 0


_SHORT_STEPS = {
    "plus_a_step": lambda d: torch.exp(d - 60) + (d >= 0),
    "logistic_of_a_row_sum": lambda d: 1 / (1 + torch.exp(d - 60).sum(-1, keepdim=True)),
}


@pytest.mark.parametrize("name", sorted(_SHORT_STEPS))
def test_a_soft_step_through_a_sum_equals_eager_past_the_proven_lengths(
    inductor_graphs, short_cap, name
):
    """The proof sees T <= 16: before, T = 100 ran the op claimed there (``plus_a_step``: a
    gamma read at run time past 1, an error instead of a result; ``logistic_of_a_row_sum``: a
    wrong result)."""
    _matches_eager(Masked(lambda s, t: _decay(s, t) * _SHORT_STEPS[name](_distance(t))), (12, 100))
    assert _ops(inductor_graphs) == 0


# --- float positions that stop being exact ----------------------------------------------------

_C = float(2**24 - 1050)


def _positions(make):
    def fn(s, t):
        p = make(t)
        d = p[:, None] - p[None, :]
        return torch.where(d >= 0, s.gamma[:, None, None] ** d, 0.0)

    return fn


_LOSSY = {
    "float32_offset": lambda t: torch.arange(t).float() + _C,
    "float32_arange_start": lambda t: torch.arange(_C, _C + t, dtype=torch.float32),
    "float16": lambda t: torch.arange(t).half(),
    "int32_offset": lambda t: torch.arange(t, dtype=torch.int32) + (2**31 - 1050),
    "float32_offset_growing_with_t": lambda t: torch.arange(t).float() + 1000 * t,
    "float32_scaled_offset_growing_with_t": lambda t: 0.5 * torch.arange(t).float() + 1000 * t,
}
_EXACT = {
    "float32": lambda t: torch.arange(t).float(),
    "float32_offset_1000": lambda t: torch.arange(t).float() + 1000,
    "float32_offset_2_23": lambda t: torch.arange(t).float() + 2**23,
    "float32_large_negative_offset": lambda t: torch.arange(t).float() - _C,
    "float64_offset": lambda t: torch.arange(t).double() + _C,
    "int64_offset": lambda t: torch.arange(t) + (2**31 - 1050),
    "float32_offset_growing_slowly": lambda t: torch.arange(t).float() + 2 * t,  # past 2**20
}


@pytest.mark.parametrize("name", sorted(_LOSSY))
def test_positions_that_stop_being_exact_before_a_long_t_are_declined(name):
    """float32 holds the integers up to 2**24: ``arange(T).float() + 2**24 - 1050`` is exact up
    to T = 1051 and rounded past it, which the proof (T <= 1024) never saw. Was claimed: 0.505
    relative error at T = 1200 (Inductor: 0)."""
    (region,) = regions(Masked(_positions(_LOSSY[name])), *_qkv(1, 16))
    assert not region.claimed
    assert "holds positions in" in region.reason and "dynamic T" in region.reason, region.reason


@pytest.mark.parametrize("name", sorted(_EXACT))
def test_positions_that_stay_exact_are_claimed(name):
    (region,) = regions(Masked(_positions(_EXACT[name])), *_qkv(1, 16))
    assert region.claimed, region.reason


def test_rounded_positions_past_the_proven_lengths_equal_eager(inductor_graphs, short_cap):
    """The proof sees T <= 16, float32 rounds the positions past T = 21: T = 32 ran the op
    (exact distances) before, against eager's rounded ones; now the region is declined."""
    lossy = _positions(lambda t: torch.arange(t).float() + float(2**24 - 20))
    _matches_eager(Masked(lossy), (12, 32))
    assert _ops(inductor_graphs) == 0


def test_an_offset_growing_with_t_past_the_proven_lengths_equals_eager(inductor_graphs, short_cap):
    """``arange(T) + 2**18 * T`` in float32: the largest position grows by 2**18 + 1 per
    position, its values stay 1 apart, so float32 rounds them past T = 64. The rule took the
    growth for the spacing (exact to ~2**42): T = 100 ran the op against eager's rounded
    distances before (found 2026-11-25)."""
    lossy = _positions(lambda t: torch.arange(t).float() + 2**18 * t)
    _matches_eager(Masked(lossy), (12, 100))
    assert _ops(inductor_graphs) == 0


def test_float16_positions_at_a_static_length_are_left_to_the_proof():
    """A static T is proven at its own length, rounding included: no rule of its own."""
    (region,) = regions(Masked(_positions(_EXACT["float32"])), *_qkv(1, 16), dynamic=False)
    assert region.claimed, region.reason
    (region,) = regions(Masked(_positions(_LOSSY["float16"])), *_qkv(1, 16), dynamic=False)
    assert region.claimed, region.reason


# --- an offset is linear growth, not an exponential -------------------------------------------


class Offset(nn.Module):
    """The hunter's F3: positions from ``off``, the decay clamped and multiplied by a step."""

    def __init__(self, off: float):
        super().__init__()
        self.off = off
        self.register_buffer("gamma", torch.tensor(GAMMA, dtype=torch.float32))

    def forward(self, q, k, v):
        p = torch.arange(q.shape[2], dtype=torch.float32) + self.off
        d = p[:, None] - p[None, :]
        mask = self.gamma[:, None, None] ** d.clamp(min=0) * (d >= 0)
        return (q @ k.mT * mask) @ v


@pytest.mark.parametrize("off", [400.0, 1000.0, 1e5])
def test_positions_from_an_offset_are_not_read_as_an_exponential(off):
    """Was declined as "p ... overflows to inf at about T=64071" (off = 400): the log-slope of
    400 + T at T = 128, 256, 512 looked exponential. Eager is finite at T = 4096."""
    (region,) = regions(Offset(off), *_qkv(1, 16, dtype=torch.float32))
    assert region.claimed, region.reason


def test_an_offset_model_equals_eager_at_longer_lengths(inductor_graphs):
    _matches_eager(Offset(1000.0), (16, 40), rtol=1e-5)
    assert _ops(inductor_graphs) > 0


def test_a_slow_exponential_is_still_read_as_one():
    """``g ** -i`` with g = 0.97 overflows float32 at T ~ 2900: declined, as before."""

    def rising(s, q, k, v):
        i = torch.arange(q.shape[2], dtype=torch.float32)
        g = torch.tensor([0.97, 0.98])[:, None]
        up, down = g**-i, g**i
        return (q @ k.mT * (down[:, :, None] * up[:, None, :] * (i[:, None] >= i))) @ v

    (region,) = regions(Fn(rising, heads=2), *_qkv(1, 16, dtype=torch.float32))
    assert not region.claimed and "overflows to inf" in region.reason, region.reason
