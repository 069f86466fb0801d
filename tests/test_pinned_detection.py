"""Detection and rewrite behaviours no other test pinned down (found by mutation testing): the
decay fit's exact acceptance rules, the proof's verdicts on masks just outside retention, and
the values a claimed region computes, each against an exact verdict or a float64 eager run."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rtpcompile import backend
from rtpcompile.backend import compile_options, detect_and_rewrite
from rtpcompile.detect.decay_fit import fit_decay, per_head
from rtpcompile.detect.region import Region


def _toeplitz(gamma, t: int) -> torch.Tensor:
    """[H, t, t] float64 causal decay gamma_h ** (i - j) [i >= j]."""
    gamma = torch.as_tensor(gamma, dtype=torch.float64)
    i = torch.arange(t, dtype=torch.float64)
    d = i[:, None] - i[None]
    return gamma[:, None, None] ** d.clamp(min=0) * (d >= 0)


# --- the decay fit ------------------------------------------------------------------------------


def test_a_diagonal_only_mask_is_a_decay_of_zero():
    """A mask that keeps only the diagonal (gamma = 0, an underflowed learned decay) is claimed."""
    reason, gamma, row_scale = fit_decay(torch.eye(6, dtype=torch.float64)[None], 6, 1e-9)
    assert reason is None and gamma.tolist() == [0.0] and not row_scale


def test_a_mask_with_no_diagonal_is_declined_for_its_diagonal():
    """A strictly lower decay (``tril(-1)``) is declined because its diagonal is not positive."""
    m = _toeplitz([0.9, 0.8], 7).tril(-1)
    reason, _, _ = fit_decay(m, 7, 1e-3)
    assert reason == "the mask's diagonal is not positive (not a decay)"


def test_small_entries_cut_off_far_from_the_diagonal_are_not_a_decay():
    """The fit's tolerance is relative to each expected entry: a decay zeroed past distance 12
    (entries of 0.5 ** 13 = 1.2e-4, below any absolute tolerance) is declined."""
    m = _toeplitz([0.5], 16)
    i = torch.arange(16)
    m[:, (i[:, None] - i[None]) > 12] = 0
    reason, _, _ = fit_decay(m, 16, 1e-3)
    assert reason == "the mask is not gamma**(i-j) below the diagonal"
    assert fit_decay(_toeplitz([0.5], 16), 16, 1e-3)[0] is None


def test_a_mask_varying_over_the_batch_is_not_read_as_more_heads():
    """A [B, H, T, T] mask whose batch entries differ is declined, not fitted as B * H heads."""
    m = torch.stack([_toeplitz([0.9, 0.8, 0.7], 5), _toeplitz([0.6, 0.5, 0.4], 5)])
    reason, _ = per_head(m, 5, 2)
    assert reason == "the mask varies over a batch dimension other than the heads"
    reason, heads = per_head(m[:1], 5, 2)
    assert reason is None and heads.shape == (3, 5, 5)


# --- claimed regions compute what eager computes (detection + rewrite, the op on aten) ----------


def _rewritten(model, *inputs, dynamic=False):
    """(model's output through detection + rewrite, run eagerly without Inductor, regions)."""
    found = []

    def backend(gm, example_inputs, **_):
        new_gm, regions = detect_and_rewrite(gm, example_inputs, compile_options(None))
        found.extend(regions)
        return new_gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=backend, dynamic=dynamic, fullgraph=True)(*inputs)
    return out, found


def _qkv(t: int, heads: int = 2, dim: int = 4, scale: float = 1.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    return [scale * torch.randn(1, heads, t, dim, generator=gen, dtype=dtype) for _ in range(3)]


def _distance(t: int) -> torch.Tensor:
    i = torch.arange(t)
    return i[:, None] - i[None]


class _Divided(nn.Module):
    """Scores divided by a constant, then a decay mask."""

    def __init__(self, t: int = 6):
        super().__init__()
        self.register_buffer("mask", _toeplitz([0.9, 0.7], t))

    def forward(self, q, k, v):
        return (q @ k.mT / 2.0 * self.mask) @ v


def test_a_constant_divisor_of_the_scores_divides_them(aten_env):
    """``q @ k^T / 2`` becomes the op's scale 0.5 and computes eager's values."""
    q, k, v = _qkv(6)
    out, (region,) = _rewritten(_Divided(), q, k, v)
    assert region.claimed and region.pre == (("div", 2.0),)
    torch.testing.assert_close(out, _Divided()(q, k, v), rtol=1e-12, atol=1e-12)


class _CausalStepNormalised(nn.Module):
    """A 0/1 causal step times a symmetric decay ``g ** |i - j|``, then a row normaliser."""

    def __init__(self, t: int = 9):
        super().__init__()
        d = _distance(t)
        self.register_buffer("decay", torch.tensor([0.9, 0.7]).double()[:, None, None] ** d.abs())
        self.register_buffer("causal", d >= 0)

    def forward(self, q, k, v):
        a = (q @ k.mT).masked_fill(~self.causal, 0) * self.decay
        return a / a.detach().abs().sum(-1, keepdim=True).clamp(min=1) @ v


def test_a_normaliser_over_a_causal_step_and_decay_is_not_claimed(aten_env):
    """A row normaliser over ``masked_fill(~causal, 0) * decay`` is declined with its reason (the
    op's normaliser would sum the decay above the diagonal), and runs as eager."""
    model = _CausalStepNormalised()
    q, k, v = _qkv(9)
    out, (region,) = _rewritten(model, q, k, v)
    assert region.reason == "normaliser combined with a 0/1 mask: not supported"
    torch.testing.assert_close(out, model(q, k, v), rtol=0, atol=0)


class _HalfMask(nn.Module):
    """float32 scores times a float16 mask buffer, one entry scaled by ``poke``."""

    def __init__(self, poke: float, t: int = 8):
        super().__init__()
        mask = _toeplitz([0.9, 0.8], t)
        mask[1, 5, 2] *= poke
        self.register_buffer("mask", mask.half())

    def forward(self, q, k, v):
        return (q @ k.mT * self.mask.float()) @ v


def test_a_float16_mask_off_by_three_percent_is_not_a_decay(aten_env):
    """A float16 mask is fitted to float16's tolerance (1e-2): one entry off by 3% declines."""
    q, k, v = _qkv(8, dtype=torch.float32)
    _, (region,) = _rewritten(_HalfMask(1.03), q, k, v)
    assert region.reason == "the mask is not gamma**(i-j) below the diagonal at T=8"
    _, (region,) = _rewritten(_HalfMask(1.0), q, k, v)
    assert region.claimed


def test_verify_reports_a_nan_from_the_op_as_a_mismatch():
    """``verify``'s comparison fails on a NaN where the original subgraph is finite."""
    region = Region(written="parallel", where="model.py:3", output="o")
    want = torch.ones(2, 3)
    got = want.clone()
    got[1, 2] = math.nan
    with pytest.raises(RuntimeError, match=r"rtp verify: region at model.py:3 .*differs"):
        backend._compare(region, "o", want, got)
    backend._compare(region, "o", want, want + 1e-4)


class _Masked(nn.Module):
    """``"fill -1"``: scores under ``masked_fill(~causal, -1)``; else a decay-masked retention
    normalised by ``sum_j |A_ij|`` and times 3 outside the division."""

    def __init__(self, spelling: str, t: int = 6):
        super().__init__()
        self.spelling = spelling
        self.register_buffer("mask", _toeplitz([0.9, 0.7], t))
        self.register_buffer("causal", _distance(t) >= 0)

    def forward(self, q, k, v):
        if self.spelling == "fill -1":
            return (q @ k.mT).masked_fill(~self.causal, -1.0) @ v
        a = q @ k.mT * self.mask
        return (a / a.detach().abs().sum(-1, keepdim=True).clamp(min=1) * 3.0) @ v


def test_a_causal_fill_with_a_value_other_than_zero_is_not_a_mask(aten_env):
    """``masked_fill(~causal, -1)`` keeps -1 above the diagonal: declined, and runs as eager."""
    q, k, v = _qkv(6)
    model = _Masked("fill -1")
    out, (region,) = _rewritten(model, q, k, v)
    assert region.reason == "'masked_fill' on the scores is not a multiplicative decay mask"
    torch.testing.assert_close(out, model(q, k, v), rtol=0, atol=0)


def test_a_factor_outside_a_normalised_division_scales_the_output(aten_env):
    """``(A / |A|-sum) * 3`` is three times the normalised retention, not cancelled by it."""
    q, k, v = _qkv(6)
    model = _Masked("normalised, times 3")
    out, (region,) = _rewritten(model, q, k, v)
    assert region.claimed and region.post == (("mul", 3.0),)
    torch.testing.assert_close(out, model(q, k, v), rtol=1e-12, atol=1e-12)


# --- recurrent steps ----------------------------------------------------------------------------


class _Step(nn.Module):
    """``S' = decay * S + k^T v``, read out by ``q @ S'``."""

    def __init__(self, decay: torch.Tensor):
        super().__init__()
        self.register_buffer("decay", decay)

    def forward(self, q, k, v, state):
        new = self.decay * state + k.mT @ v
        return q @ new, new


def _step_inputs(heads: int = 4, dim: int = 4):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, heads, 1, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, heads, 1, 3, generator=gen, dtype=torch.float64)
    return q, k, v, torch.randn(1, heads, dim, 3, generator=gen, dtype=torch.float64)


def test_a_state_decay_per_key_is_not_read_as_per_head(aten_env):
    """A state decay [K, 1] (one per key row, H == K here) is declined, not run per head."""
    decay = torch.tensor([0.9, 0.5, 0.3, 0.1], dtype=torch.float64)
    inputs = _step_inputs()
    model = _Step(decay[:, None])
    out, (region,) = _rewritten(model, *inputs)
    assert region.reason == "the state decay has shape [4, 1]: it must vary over the heads only"
    for got, want in zip(out, model(*inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    model = _Step(decay[:, None, None])
    out, (region,) = _rewritten(model, *inputs)
    assert region.claimed and region.decay == pytest.approx(decay.tolist(), rel=1e-15)
    for got, want in zip(out, model(*inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_state_decay_just_above_one_is_declined_and_runs_as_eager(aten_env):
    """A state decay of 1.005 is declined at compile time (the op would refuse it at run time)."""
    inputs = _step_inputs()
    model = _Step(torch.tensor([0.9, 1.005, 0.3, 0.1], dtype=torch.float64)[:, None, None])
    out, (region,) = _rewritten(model, *inputs)
    assert not region.claimed and region.reason.startswith("state decay outside (0, 1]")
    for got, want in zip(out, model(*inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_bfloat16_state_widened_by_a_float32_decay_is_not_claimed(aten_env):
    """A bfloat16 state times a float32 decay is float32 in eager: declined (the op would keep
    bfloat16), so the new state keeps eager's dtype and values."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 1, 4, generator=gen) for _ in range(2))
    v = torch.randn(1, 2, 1, 3, generator=gen)
    state = torch.randn(1, 2, 4, 3, generator=gen).bfloat16()
    model = _Step(torch.tensor([0.9, 0.5])[:, None, None])
    out, (region,) = _rewritten(model, q, k, v, state)
    assert not region.claimed and region.reason.startswith(
        "the new state is torch.float32 but the state passed in is torch.bfloat16"
    )
    for got, want in zip(out, model(q, k, v, state), strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- one-chunk steps ----------------------------------------------------------------------------


class _ChunkStep(nn.Module):
    """Parallel term + cross term + state update of one chunk; ``row`` (None: none) scales head
    0's mask rows by a buffer, ``cross`` scales the cross term's decay."""

    def __init__(self, row: float | None = None, cross: float = 1.0):
        super().__init__()
        self.register_buffer("gamma", torch.tensor([0.9, 0.8], dtype=torch.float64))
        self.register_buffer("row", None if row is None else torch.tensor([row, 1.0]).double())
        self.cross = cross

    def forward(self, q, k, v, state):
        c = q.shape[2]
        log_g = torch.log(self.gamma)[:, None]
        idx = torch.arange(c)
        d = idx[:, None] - idx[None, :]
        inner = torch.exp(log_g[..., None] * d.clamp(min=0)) * (d >= 0)
        if self.row is not None:
            inner = inner * self.row[:, None, None]
        cross = (q * (self.cross * torch.exp(log_g * (idx + 1)))[..., None]) @ state
        o = (q @ k.transpose(-1, -2) * inner) @ v + cross
        k_decay = torch.exp(log_g * (c - 1 - idx))[..., None]
        new_state = torch.exp(log_g * c)[..., None] * state + (k * k_decay).transpose(-1, -2) @ v
        return o, new_state


@pytest.mark.parametrize(
    "row, cross, written",
    [(None, 1.0, "chunk step"), (0.5, 1.0, "parallel"), (None, 1.005, "parallel")],
)
def test_a_chunk_step_merges_only_when_its_cross_term_is_the_masks_decay(
    aten_env, row, cross, written
):
    """A chunk step becomes one op with a state only when the cross term is exactly what the
    op computes: not with a row-scaled mask (the op would scale the cross term too) nor with a
    cross decay 0.5% off; either way the outputs are eager's."""
    model = _ChunkStep(row, cross)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    state = torch.randn(1, 2, 4, 4, generator=gen, dtype=torch.float64)
    out, regions = _rewritten(model, q, k, v, state)
    assert [r.written for r in regions if r.claimed] == [written]
    for got, want in zip(out, model(q, k, v, state), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# --- a dynamic length: what the mask does to positions ------------------------------------------


class _Banded(nn.Module):
    """A decay times ``ones(T, T).triu(diagonal=-1500)``: retention up to T = 1501 only."""

    def __init__(self):
        super().__init__()
        self.register_buffer("g", torch.tensor([0.9, 0.8], dtype=torch.float64))

    def forward(self, q, k, v):
        t = q.shape[-2]
        i = torch.arange(t)
        d = i[:, None] - i[None, :]
        decay = torch.where(d >= 0, self.g[:, None, None] ** d.clamp(min=0), 0.0)
        band = torch.ones(t, t, dtype=torch.float64).triu(diagonal=-1500)
        return (q @ k.mT * (decay * band)) @ v


def test_a_band_wider_than_the_proven_lengths_is_declined_for_a_dynamic_length(aten_env):
    """``triu(diagonal=-1500)`` cuts the decay past every length the proof evaluates: declined
    with a dynamic T, naming the diagonal."""
    q, k, v = _qkv(16)
    out, (region,) = _rewritten(_Banded(), q, k, v, dynamic=True)
    assert not region.claimed
    assert region.reason.startswith("the mask compares positions with -1500 (triu)")
    torch.testing.assert_close(out, _Banded()(q, k, v), rtol=0, atol=0)


class _CastMask(nn.Module):
    """A float32 decay mask cast to the scores' 16-bit dtype before the product."""

    def __init__(self, gamma: torch.Tensor, t: int):
        super().__init__()
        self.register_buffer("mask", _toeplitz(gamma, t).float())

    def forward(self, q, k, v):
        return (q @ k.mT * self.mask.to(q.dtype)) @ v


def test_a_mask_cast_to_bfloat16_gives_the_op_its_float32_decay(aten_env):
    """gamma comes from the mask before its cast: 1 - 2**-9 rounds to 1.0 in bfloat16, and the
    op gets the float32 value (read from the rounded mask it would be off at long distances)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    gamma = torch.tensor([1 - 2.0**-5, 1 - 2.0**-9])
    seen = []

    class _Gammas(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.rtp.retention_fwd.default:
                seen.append(args[3].clone())
            return func(*args, **(kwargs or {}))

    t = 40
    model = _CastMask(gamma.double(), t)
    q, k, v = (x.bfloat16() for x in _qkv(t))
    graphs = []

    def keep(gm, example_inputs, **_):
        new_gm, regions = detect_and_rewrite(gm, example_inputs, compile_options(None))
        graphs.append((new_gm, example_inputs, regions))
        return new_gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=keep, fullgraph=True)(q, k, v)
    ((new_gm, inputs, (region,)),) = graphs
    assert region.claimed, region.reason
    with torch.no_grad(), _Gammas():
        new_gm(*inputs)
    assert seen, "the op was not called"
    torch.testing.assert_close(seen[-1].float().flatten(), gamma, rtol=2e-7, atol=0)
