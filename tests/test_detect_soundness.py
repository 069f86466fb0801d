"""Soundness of detection: masks the proof must not claim (a copy written in place, a window past
the proven lengths in any spelling, a length that is an expression of the symbol), and verdicts
that must not depend on how the model's argument is named. Float64 throughout; compiled results
are compared with eager."""

from __future__ import annotations

import types

import pytest
import torch
from test_detect import regions as detected
from torch import nn

import rtpcompile

H, K = 2, 4


def geo(t: int, gammas=(0.9, 0.8)) -> torch.Tensor:
    idx = torch.arange(t)
    diff = idx[:, None] - idx[None, :]
    g = torch.tensor(gammas, dtype=torch.float64)[:, None, None]
    return torch.where(diff >= 0, g ** diff.clamp(min=0).double(), 0.0)


def qkv(t: int, seed: int = 0, heads: int = H):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, t, K, generator=gen, dtype=torch.float64) for _ in range(3)]


def regions(model, *inputs, dynamic=True):
    return detected(model, *inputs, dynamic=dynamic, fullgraph=False)


def rel_err(model, *inputs, dynamic=None) -> float:
    torch._dynamo.reset()
    with torch.no_grad():
        want = model(*inputs)
        got = torch.compile(model, backend="rtp", dynamic=dynamic)(*inputs)
    return ((got - want).abs().max() / want.abs().max()).item()


class Fn(nn.Module):
    def __init__(self, fn, t: int = 8):
        super().__init__()
        self.fn = fn
        self.register_buffer("mask", geo(t))
        self.register_buffer("g", torch.tensor([0.9, 0.8], dtype=torch.float64))

    def forward(self, *inputs):
        return self.fn(self, *inputs)


# --- a copy of a mask written in place --------------------------------------------------------

_WRITES = {
    "triu_window": (lambda m, x: m.triu_(-3), False),
    "setitem": (lambda m, x: m.__setitem__((slice(None), 5, 0), 0.5), False),
    "mul_by_activation": (lambda m, x: m.mul_(torch.sigmoid(x.mean())), False),
    "index_by_activation": (lambda m, x: m.__setitem__((slice(None), x[0] > 0), 0.0), False),
    "out_kwarg": (lambda m, x: torch.mul(m, x.sigmoid().tril(), out=m), False),
    "through_a_view": (lambda m, x: m.view(-1).mul_(x.abs().mean()), False),
    "halved": (lambda m, x: m.mul_(0.5), True),  # still retention (a row scale), replayed
}


@pytest.mark.parametrize("name", sorted(_WRITES))
def test_a_cloned_mask_written_in_place_is_proven_with_the_writes(name):
    """``m = self.mask.clone(); m.<write>``: the proof and the op read the copy after its writes
    (the clone is not a cast to look through to the buffer)."""
    write, claimed = _WRITES[name]

    def fn(s, q, k, v, x):
        m = s.mask.clone()
        write(m, x)
        return (q @ k.mT * m) @ v

    x = torch.randn(8, 8, dtype=torch.float64)
    (region,) = regions(Fn(fn), *qkv(8), x, dynamic=False)
    assert region.claimed is claimed, region.reason
    assert rel_err(Fn(fn), *qkv(8), x) < 1e-12


# --- a length that is an expression of the symbol ---------------------------------------------


def _shifted(window: bool, drop: str):
    def fn(s, q, k, v):
        if drop == "first":
            q, k, v = q[..., 1:, :], k[..., 1:, :], v[..., 1:, :]
        else:
            q, k, v = q[..., :-1, :], k[..., :-1, :], v[..., :-1, :]
        idx = torch.arange(q.shape[-2])
        d = idx[:, None] - idx[None, :]
        keep = (d >= 0) & (d < 10) if window else d >= 0
        return (q @ k.mT * torch.where(keep, s.g[:, None, None] ** d.clamp(min=0), 0.0)) @ v

    return fn


@pytest.mark.parametrize("drop", ["first", "last"])
def test_a_window_is_declined_when_the_length_is_an_expression_of_the_symbol(drop):
    """q[..., 1:, :] makes T = s0 - 1: still symbolic, so a window is declined as for T = s0."""
    (region,) = regions(Fn(_shifted(True, drop)), *qkv(9))
    assert not region.claimed and "compares positions with 10" in region.reason
    model = Fn(_shifted(True, drop))
    assert rel_err(model, *qkv(30, seed=1), dynamic=True) < 1e-12


def test_a_decay_is_proven_when_the_length_is_an_expression_of_the_symbol():
    model = Fn(_shifted(False, "first"))
    (region,) = regions(model, *qkv(9))
    assert region.claimed, region.reason
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="rtp", dynamic=True)
    for t in (9, 30):
        x = qkv(t, seed=t)
        with torch.no_grad():
            torch.testing.assert_close(compiled(*x), model(*x), rtol=1e-12, atol=1e-12)


def test_lengths_of_an_expression_are_ones_the_expression_takes():
    """T = 2 * s0 (a doubled sequence) is never odd: the proof's lengths are moved to even ones
    and the symbol is solved for each."""

    def fn(s, q, k, v):
        q, k, v = (torch.cat([x, x], dim=-2) for x in (q, k, v))
        idx = torch.arange(q.shape[-2])
        d = idx[:, None] - idx[None, :]
        return (q @ k.mT * torch.where(d >= 0, s.g[:, None, None] ** d.clamp(min=0), 0.0)) @ v

    (region,) = regions(Fn(fn), *qkv(5))
    assert region.claimed, region.reason


# --- windows and floors past the proven lengths, in any spelling ------------------------------

W = 1100


def _two_scales(d):
    """(i - j) (2048 - i - j) expanded: i >= j below i + j = 2048, i <= j above."""
    idx = torch.arange(d.shape[-1])
    i, j = idx[:, None], idx[None, :]
    return 2048 * i - 2048 * j - i * i + j * j


_WINDOWS = {
    "torch.less": lambda s, d: torch.less(d, W),
    "a buffer": lambda s, d: d < s.w,
    "a tensor": lambda s, d: d < torch.tensor(W),
    "sign_relu": lambda s, d: 1 - torch.sign(torch.relu(d - W + 1)),
    "heaviside": lambda s, d: torch.heaviside((W - 1 - d).double(), torch.ones(()).double()),
    "shifted_compare_with_0": lambda s, d: (d - W) < 0,
    "a full tensor": lambda s, d: d < torch.full(d.shape, W),
    "where_fill": lambda s, d: torch.where(d > 0, d, W) > 0,
    "floordiv": lambda s, d: 1 - torch.div(d, 2 * W, rounding_mode="floor"),
    "cumsum_positions": lambda s, d: torch.ones_like(d).cumsum(-1) < W,
    "mixed_degrees": lambda s, d: _two_scales(d) >= 0,
    "decay_against_decay": lambda s, d: (
        torch.tensor(0.999) ** d.clamp(min=0) >= 1100 * torch.tensor(0.99) ** d.clamp(min=0)
    ),
    "overflow_nan_cleared": lambda s, d: torch.nan_to_num(torch.exp(d / 20) * torch.exp(-d / 20)),
    "sliced_at_a_constant": lambda s, d: torch.nn.functional.pad(d[:, :W] >= 0, (0, 0)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(_WINDOWS))
def test_a_window_past_the_proven_lengths_is_declined_in_any_spelling(name):
    """With a dynamic T only ops that cannot cut at a length-dependent point may touch positions."""

    def fn(s, q, k, v):
        idx = torch.arange(q.shape[-2])
        d = idx[:, None] - idx[None, :]
        decay = torch.where(d >= 0, s.g[:, None, None] ** d.clamp(min=0), 0.0)
        return (q @ k.mT * (decay * _WINDOWS[name](s, d).double())) @ v

    model = Fn(fn)
    model.register_buffer("w", torch.tensor(W))
    (region,) = regions(model, *qkv(16))
    assert not region.claimed
    assert "dynamic T" in region.reason, region.reason


def test_a_decay_floor_past_the_proven_lengths_is_declined():
    """``(g ** d).clamp(min=0.01)`` only bites past d = 1352 for g = 0.9966."""

    def fn(s, q, k, v):
        i = torch.arange(q.shape[-2]).double()
        d = i[:, None] - i[None, :]
        floor = (torch.tensor([0.9966]) ** d.clamp(min=0)).clamp(min=0.01)
        return (q @ k.mT * (floor * torch.ones_like(d).tril())) @ v

    (region,) = regions(Fn(fn), *qkv(16, heads=1))
    assert not region.claimed and "compares positions with 0.01 (clamp)" in region.reason


# --- in-place writes through view ops ---------------------------------------------------------


@pytest.mark.parametrize("view", ["moveaxis", "swapdims", "swapaxes", "transpose"])
def test_a_write_to_q_through_any_view_op_inside_the_region_is_declined(view):
    def fn(s, x, k, v):
        q = getattr(x, view)(1, 2)
        scores = q @ k.mT
        x.mul_(2.0)
        return (scores * geo(q.shape[-2])) @ v

    x = torch.randn(1, 8, H, K, dtype=torch.float64)
    (region,) = regions(Fn(fn), x, *qkv(8)[1:], dynamic=False)
    assert not region.claimed and "written in place" in region.reason


# --- the model's attributes are model state, whatever its argument is called ------------------


class PlainGamma(nn.Module):
    """Per-head decays as a plain (unregistered) tensor attribute."""

    def __init__(self):
        super().__init__()
        self.g = torch.tensor([0.9, 0.8], dtype=torch.float64)

    def forward(me, q, k, v):  # noqa: N805 - the point: not named self
        idx = torch.arange(q.shape[-2])
        d = idx[:, None] - idx[None, :]
        return (q @ k.mT * torch.where(d >= 0, me.g[:, None, None] ** d.clamp(min=0), 0.0)) @ v


def test_a_plain_attribute_is_model_state_in_explain_and_compile():
    x = qkv(8)
    (region,) = regions(PlainGamma(), *x)
    assert region.claimed, region.reason
    (row,) = rtpcompile.explain(PlainGamma(), *x).regions
    assert row.claimed, row.reason


def test_an_attribute_of_an_argument_is_an_activation():
    def fn(s, q, k, v, batch):
        return (q @ k.mT * batch.mask) @ v

    batch = types.SimpleNamespace(mask=geo(8))
    (region,) = regions(Fn(fn), *qkv(8), batch, dynamic=False)
    assert not region.claimed and "activations" in region.reason


def test_explain_names_inputs_as_the_model_does():
    """Reasons name an activation by the model's own argument, not explain's caller's."""

    def fn(s, q, k, v, x):
        return (q @ k.mT * (geo(8) * x.sigmoid())) @ v

    class Gated(nn.Module):
        def forward(self, q, k, v, gate):
            return fn(self, q, k, v, gate)

    (row,) = rtpcompile.explain(Gated(), *qkv(8), torch.randn(8, 8, dtype=torch.float64)).regions
    assert not row.claimed and "input 'l_gate_'" in row.reason


# --- the fit's tolerance and the budget's advice ----------------------------------------------


def test_a_float64_mask_is_fitted_to_float64_precision():
    """One element off by 0.05% is not rounding in a float64 mask (it is in a float32 one)."""
    mask = geo(8)
    mask[:, 5, 2] *= 1 + 5e-4
    model = Fn(lambda s, q, k, v: (q @ k.mT * s.mask) @ v)
    model.mask = mask
    (region,) = regions(model, *qkv(8), dynamic=False)
    assert not region.claimed and "gamma**(i-j)" in region.reason
    model.mask = mask.float()
    (region,) = regions(model, *[x.float() for x in qkv(8)], dynamic=False)
    assert region.claimed, region.reason
    model.mask = geo(8)  # exact powers still pass
    (region,) = regions(model, *qkv(8), dynamic=False)
    assert region.claimed, region.reason


def test_a_float64_model_with_a_float32_decay_keeps_the_float32_tolerance():
    def fn(s, q, k, v):
        idx = torch.arange(q.shape[-2])
        d = idx[:, None] - idx[None, :]
        mask = torch.where(d >= 0, s.g.float()[:, None, None] ** d.clamp(min=0).float(), 0.0)
        return (q @ k.mT * mask.double()) @ v

    (region,) = regions(Fn(fn), *qkv(200))
    assert region.claimed, region.reason


def test_a_constant_over_the_proof_budget_is_not_blamed_on_the_length(monkeypatch):
    """A precomputed [H, 256, 256] mask costs the same at every T: the advice is the budget,
    not dynamic=True (which the model already uses)."""
    monkeypatch.setenv("RTP_PROOF_MAX_GB", str(2**-20))  # 1 KiB
    model = Fn(lambda s, q, k, v: (q @ k.mT * s.mask[:, : q.shape[-2], : q.shape[-2]]) @ v, 256)
    (region,) = regions(model, *qkv(8))
    assert not region.claimed
    assert "at any length" in region.reason and "dynamic=True" not in region.reason


def test_a_negated_score_is_a_constant_factor():
    model = Fn(lambda s, q, k, v: (-(q @ k.mT) * s.mask) @ v)
    (region,) = regions(model, *qkv(8))
    assert region.claimed, region.reason
    assert rel_err(model, *qkv(8)) < 1e-12
