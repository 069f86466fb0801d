"""Detection fixes: a mask with non-finite entries (``gamma ** (i - j) * causal`` overflowing
above the diagonal: inf * 0 = NaN) is declined, statically at the length it overflows and with
a dynamic T at any length where it would; selects of the same decay stay claimed; a flip over
the heads of a mask is layout (over a position axis it stays declined); explain() names fused
softmax attention (``scaled_dot_product_attention``, ``nn.MultiheadAttention``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_detect import regions

import rtpcompile
import rtpcompile.backend as backend
from rtpcompile.detect.decay_fit import NONFINITE, fit_decay

B, H, K, V = 1, 2, 4, 6
# NOTE: model constants (a Python list in the closure is a graph input under dynamic=True)
_SMALL = torch.tensor([0.5, 0.9])  # float32: 0.5 ** -128 overflows (T > 129)
_SLOW = torch.tensor([0.97, 0.99])  # float32: 0.97 ** -2913 overflows (T > 2913)
_GAMMAS = {"small": _SMALL, "slow": _SLOW}


def _qkv(t, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, t, d, generator=gen, dtype=dtype) for d in (K, K, V)]


def _distance(t, dtype):
    i = torch.arange(t, dtype=dtype)
    return i[:, None] - i[None, :]


def _make(spelling: str, gammas: str):
    """``(q @ k^T * mask) @ v`` with the causal decay spelled as ``spelling``, gammas
    ``_GAMMAS[gammas]``."""

    def f(q, k, v):
        g = _GAMMAS[gammas].to(q.dtype)[:, None, None]
        d = _distance(q.shape[2], q.dtype)
        s = q @ k.mT
        if spelling == "mul":  # NOTE: g ** d overflows above the diagonal, * 0 is NaN there
            return (s * (g**d * (d >= 0).to(q.dtype))) @ v
        if spelling == "mul_bool":
            return (s * g**d * (d >= 0)) @ v
        if spelling == "tril":
            return (s * torch.tril(g**d)) @ v
        if spelling == "where_mask":
            return (s * torch.where(d >= 0, g**d, 0.0)) @ v
        if spelling == "fill_mask":
            return (s * (g**d).masked_fill(d < 0, 0)) @ v
        if spelling == "fill_scores":
            return (s * g**d).masked_fill(d < 0, 0) @ v
        if spelling == "where_scores":
            return torch.where(d >= 0, s * g**d, 0.0) @ v
        if spelling == "clamp":
            return (s * (g ** d.clamp(min=0) * (d >= 0).to(q.dtype))) @ v
        raise ValueError(spelling)

    return f


def _compiled_claims(f, args, dynamic=None):
    torch._dynamo.reset()
    before = backend.counters["regions_claimed"]
    with torch.no_grad():
        out = torch.compile(f, backend="rtp", dynamic=dynamic)(*args)
    return out, backend.counters["regions_claimed"] - before


# -- bug 1: NaN entries in the mask ----------------------------------------------------------------


def test_fit_decay_declines_nan_above_the_diagonal():
    """Every comparison with NaN is False: the tolerance checks passed a NaN entry."""
    t, gamma = 9, 0.8
    d = _distance(t, torch.float64)
    m = torch.where(d >= 0, gamma ** d.clamp(min=0), 0.0)[None]
    assert fit_decay(m, t, 1e-9)[0] is None
    for row, col, bad in ((2, 5, torch.nan), (0, t - 1, torch.inf), (5, 3, torch.nan)):
        broken = m.clone()
        broken[0, row, col] = bad
        assert fit_decay(broken, t, 1e-9)[0] == NONFINITE
    broken = m.clone()
    broken[0, 4, 4] = torch.inf  # NOTE: on the diagonal
    assert fit_decay(broken, t, 1e-9)[0] == NONFINITE


@pytest.mark.parametrize("spelling", ["mul", "mul_bool"])
def test_static_overflowing_product_mask_is_declined(spelling):
    """float32, gamma = 0.5: 0.5 ** -159 is inf above the diagonal at T = 160 and inf * 0 = NaN
    in eager; rtp claimed it and returned finite rows."""
    t = 160
    f = _make(spelling, "small")
    args = _qkv(t)
    out, claims = _compiled_claims(f, args)
    expected = f(*args)
    assert expected.isnan().any()
    assert claims == 0
    torch.testing.assert_close(out, expected, equal_nan=True)
    found = regions(f, *args, dynamic=False)
    assert [r.reason for r in found] == [f"{NONFINITE} at T={t}"]


@pytest.mark.parametrize(
    "spelling", ["tril", "where_mask", "fill_mask", "fill_scores", "where_scores"]
)
def test_static_overflowing_decay_under_a_select_stays_claimed(spelling):
    """The same overflowing g ** d zeroed by a select (tril, where, masked_fill, on the mask or
    on the scores) is 0 above the diagonal in eager: claimed, equal to float64 eager."""
    t = 160
    f = _make(spelling, "small")
    args = _qkv(t)
    out, claims = _compiled_claims(f, args)
    assert claims == 1
    expected = _make("clamp", "small")(*(a.double() for a in args))
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_dynamic_overflowing_product_mask_is_declined():
    """gamma = 0.97 (float32) overflows above the diagonal only past T ~ 2913, beyond the lengths
    a dynamic T is proven at (<= 1024): the growth of g ** d is extrapolated."""
    f = _make("mul", "slow")
    found = regions(f, *_qkv(64), dynamic=True)
    assert len(found) == 1 and not found[0].claimed
    reason = found[0].reason
    assert "overflows to inf at about T=291" in reason and "non-finite" in reason, reason
    out, claims = _compiled_claims(f, _qkv(33), dynamic=True)
    assert claims == 0
    torch.testing.assert_close(out, f(*_qkv(33)))


@pytest.mark.parametrize(
    "spelling", ["tril", "where_mask", "fill_mask", "fill_scores", "where_scores", "clamp"]
)
def test_dynamic_ordinary_masks_stay_claimed(spelling):
    """The exponent grows above the diagonal in all of these but a select zeroes it (or the
    exponent is clamped): claimed at a dynamic T, equal to float64 eager at T = 1, 7, 33."""
    f = _make(spelling, "slow")
    found = regions(f, *_qkv(64), dynamic=True)
    assert [r.reason for r in found] == [None]
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="rtp", dynamic=True)
    reference = _make("clamp", "slow")
    for t in (1, 7, 33):
        args = _qkv(t, seed=t)
        with torch.no_grad():
            out = compiled(*args)
        expected = reference(*(a.double() for a in args))
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


# -- bug 2: flip over the heads of a mask ----------------------------------------------------------

_LOG_GAMMA = torch.log(torch.tensor([0.9, 0.99]))


def _decay(t, dtype):
    i = torch.arange(t, dtype=dtype)
    d = i[:, None] - i[None, :]
    return torch.exp(_LOG_GAMMA.to(dtype)[:, None, None] * d).masked_fill(d < 0, 0)


def _heads_flipped(q, k, v):
    return (q @ k.mT * _decay(q.shape[2], q.dtype).flip(0)) @ v


def _positions_flipped(q, k, v):
    return (q @ k.mT * _decay(q.shape[2], q.dtype).flip(-1).flip(-2)) @ v


def test_flip_over_heads_is_layout_at_a_dynamic_t():
    found = regions(_heads_flipped, *_qkv(33), dynamic=True)
    assert [r.reason for r in found] == [None]
    assert found[0].decay == pytest.approx((0.99, 0.9), rel=1e-6)
    torch._dynamo.reset()
    compiled = torch.compile(_heads_flipped, backend="rtp", dynamic=True)
    for t in (1, 7, 33):
        args = [a.double().requires_grad_() for a in _qkv(t, seed=t)]
        out = compiled(*args)
        grads = torch.autograd.grad(out.square().sum(), args)
        ref_args = [a.detach().requires_grad_() for a in args]
        ref = _heads_flipped(*ref_args)
        ref_grads = torch.autograd.grad(ref.square().sum(), ref_args)
        torch.testing.assert_close(out, ref)
        for a, b in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(a, b)


def test_flip_over_a_position_axis_stays_declined():
    """Reversing both position axes makes the decay anti-causal (upper triangular)."""
    found = regions(_positions_flipped, *_qkv(33), dynamic=True)
    assert len(found) == 1 and not found[0].claimed
    assert "flip" in found[0].reason and "position axis" in found[0].reason
    found = regions(_positions_flipped, *_qkv(33), dynamic=False)
    assert len(found) == 1 and not found[0].claimed


# -- bug 3: explain names fused softmax attention --------------------------------------------------


def _sdpa_mask(q, k, v):
    t = q.shape[2]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.log(_decay(t, q.dtype)))


def _sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _hybrid(q, k, v):
    retention = (q @ k.mT * _decay(q.shape[2], q.dtype)) @ v
    return retention + F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("f", [_sdpa_mask, _sdpa_causal], ids=["attn_mask", "is_causal"])
def test_explain_names_scaled_dot_product_attention(f):
    report = rtpcompile.explain(f, *_qkv(9))
    assert report.claimed == []
    assert [(r.written, r.reason) for r in report.declined] == [
        (
            "softmax attention",
            "softmax attention (scaled_dot_product_attention), not retention: compiled by Inductor",
        )
    ]


def test_explain_names_multihead_attention():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    report = rtpcompile.explain(Model().eval(), torch.randn(2, 9, 8))
    assert report.claimed == []
    assert [r.written for r in report.declined] == ["softmax attention"]
    assert "multi_head_attention" in report.declined[0].reason


def test_softmax_attention_beside_retention_changes_no_claim():
    report = rtpcompile.explain(_hybrid, *_qkv(9, dtype=torch.float64))
    assert len(report.claimed) == 1
    assert [r.written for r in report.declined] == ["softmax attention"]
    args = _qkv(9, dtype=torch.float64)
    out, claims = _compiled_claims(_hybrid, args)
    assert claims == 1
    torch.testing.assert_close(out, _hybrid(*args))


class _SharedCausal(torch.nn.Module):
    """A retention layer ``s * (g**d * causal)`` beside a softmax layer that selects with the
    same bool ``causal``: the other layer's select must not make this one's product a select."""

    def forward(self, q, k, v):
        t = q.shape[2]
        i = torch.arange(t)
        d = (i[:, None] - i[None, :]).float()
        causal = d >= 0
        g = torch.tensor([0.97, 0.98])[:, None, None]
        attn = torch.where(causal, k @ k.mT, float("-inf")).softmax(-1) @ v
        return (q @ k.mT * (g**d * causal)) @ v + attn


def test_a_select_elsewhere_does_not_hide_an_overflowing_product():
    """Was claimed at a dynamic T (the proof took any where() user of the condition in the graph
    for a select): at T = 3000 eager gives 696 non-finite outputs, rtp gave none."""
    found = regions(_SharedCausal(), *_qkv(64), dynamic=True)
    retention = [r for r in found if r.written != "softmax attention"]
    assert len(retention) == 1 and not retention[0].claimed, found
    assert "overflows to inf" in retention[0].reason


class _BufferFactors(torch.nn.Module):
    """gamma^n and gamma^-n as finite buffers of 2048 entries, sliced to T: the mask cannot grow
    past its buffers (and eager cannot run past T = 2048)."""

    def __init__(self):
        super().__init__()
        n = torch.arange(2048, dtype=torch.float64)
        g = torch.tensor([0.97, 0.99], dtype=torch.float64)[:, None]
        self.register_buffer("down", (g**n).float())
        self.register_buffer("up", (g ** (-n)).float())

    def forward(self, q, k, v):
        t = q.shape[2]
        mask = (self.down[:, :t, None] * self.up[:, None, :t]).tril()
        return (q @ k.mT * mask) @ v


def test_a_slice_of_finite_buffers_is_not_extrapolated():
    """Was declined at a dynamic T ("getitem ... overflows"): a slice of a constant buffer is
    not extrapolated past its length."""
    found = regions(_BufferFactors(), *_qkv(64), dynamic=True)
    assert len(found) == 1 and found[0].claimed, found[0].reason


class _SanitisedPow(torch.nn.Module):
    """``(g ** d).nan_to_num() * causal``: the overflow is replaced by float32's max first, so the
    product stays finite at every T (eager: 0 non-finite at T = 4096)."""

    def forward(self, q, k, v):
        t = q.shape[2]
        i = torch.arange(t)
        d = (i[:, None] - i[None, :]).float()
        g = torch.tensor([0.97, 0.98])[:, None, None]
        return (q @ k.mT * ((g**d).nan_to_num() * (d >= 0))) @ v


def test_a_sanitised_overflow_stays_claimed():
    """Was declined at a dynamic T: the values after the growing one were set to inf too."""
    found = regions(_SanitisedPow(), *_qkv(64), dynamic=True)
    assert len(found) == 1 and found[0].claimed, found[0].reason


class _Chain(torch.nn.Module):
    """Region B reads region A's output itself as its q (``a @ k^T``) or its v."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.register_buffer("gamma", torch.tensor([0.97, 0.98]))

    def forward(self, q, k, v):
        t = q.shape[2]
        i = torch.arange(t)
        mask = torch.tril(self.gamma[:, None, None] ** (i[:, None] - i[None, :]))
        a = (q @ k.mT * mask) @ v
        if self.variant == "q":
            return (a @ k.mT * mask) @ v
        return (q @ k.mT * mask) @ a


@pytest.mark.parametrize("variant", ["q", "v"])
def test_chained_regions_are_both_rewritten(variant):
    """The second region's operand was the first region's erased output: KeyError in the
    rewrite, and the whole graph fell back to Inductor (strict: an error)."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=gen) * 0.3 for _ in range(3))
    model = _Chain(variant)
    torch._dynamo.reset()
    before = backend.counters["regions_claimed"]
    compiled = torch.compile(model, backend="rtp", options={"strict": True})
    with torch.no_grad():
        out = compiled(q, k, v)
    assert backend.counters["regions_claimed"] - before == 2
    torch.testing.assert_close(out, model(q, k, v), rtol=1e-5, atol=1e-6)


class _LearnableAtOne(torch.nn.Module):
    """``exp(log_gamma * d) * (d >= 0)`` with log_gamma a parameter initialised to 0 (gamma = 1):
    nothing grows at those values, but training moves gamma below 1 and the product then
    overflows at long T (eager: 696 non-finite outputs at T = 3000 for gamma 0.97..0.99)."""

    def __init__(self):
        super().__init__()
        self.log_gamma = torch.nn.Parameter(torch.zeros(2))

    def forward(self, q, k, v):
        t = q.shape[2]
        i = torch.arange(t)
        d = (i[:, None] - i[None, :]).float()
        mask = torch.exp(self.log_gamma[:, None, None] * d) * (d >= 0)
        return (q @ k.mT * mask) @ v


def test_a_learnable_decay_is_checked_with_its_parameters_moved():
    """Was claimed at a dynamic T (the overflow rule measured the current values only)."""
    found = regions(_LearnableAtOne(), *_qkv(64), dynamic=True)
    assert len(found) == 1 and not found[0].claimed
    assert "trainable parameters moved" in found[0].reason
