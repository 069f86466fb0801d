"""The overflow rule's other direction: with a dynamic T, a mask value that shrinks exponentially
with T (``g ** i`` of a ratio ``g ** i / g ** j``) underflows to 0 at a length longer than the
proof sees, and 0 / 0 is NaN there in eager; such a mask is declined. Masks whose shrinking
values are only multiplied or selected (``g ** (i - j)`` under tril, a row-normalised decay)
stay claimed."""

from __future__ import annotations

import pytest
import torch
from test_detect import regions

import rtpcompile.backend as backend

B, H, K, V = 1, 2, 4, 6
_SLOW = torch.tensor([0.97, 0.99])  # float32: 0.97 ** 3392 underflows past the smallest subnormal


def _qkv(t, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, t, d, generator=gen) for d in (K, K, V)]


def _ratio(q, k, v):
    i = torch.arange(q.shape[2], dtype=q.dtype)
    gi = _SLOW.to(q.dtype)[:, None] ** i  # [H, T]
    return (q @ k.mT * torch.tril(gi[:, :, None] / gi[:, None, :])) @ v


def _difference(q, k, v):
    """The same decay from a cumulative sum of log-decays: exp of a difference, never 0 / 0."""
    t = q.shape[2]
    cs = torch.cumsum(_SLOW.log().to(q.dtype)[:, None].expand(H, t), dim=-1)
    return (q @ k.mT * torch.tril(torch.exp(cs[:, :, None] - cs[:, None, :]))) @ v


def _normalised(q, k, v):
    """torchscale's decay normalised by its row sums: the shrinking g ** (i - j) is summed."""
    i = torch.arange(q.shape[2], dtype=q.dtype)
    d = i[:, None] - i[None, :]
    mask = torch.tril(_SLOW.to(q.dtype)[:, None, None] ** d.clamp(min=0))
    return (q @ k.mT * (mask / mask.sum(-1, keepdim=True).sqrt())) @ v


class _LearnableRatio(torch.nn.Module):
    """exp(a * i) / exp(a * j) with a learnable log-decay initialised at 0 (gamma = 1): nothing
    shrinks until training moves it."""

    def __init__(self):
        super().__init__()
        self.log_gamma = torch.nn.Parameter(torch.zeros(H))

    def forward(self, q, k, v):
        i = torch.arange(q.shape[2], dtype=q.dtype)
        gi = torch.exp(self.log_gamma[:, None] * i)
        return (q @ k.mT * torch.tril(gi[:, :, None] / gi[:, None, :])) @ v


def test_eager_ratio_mask_is_nan_at_long_t():
    """Why the rule exists: both powers underflow to 0 past T ~ 3392 (gamma = 0.97, float32)."""
    i = torch.arange(3500, dtype=torch.float32)
    gi = torch.tensor(0.97) ** i
    mask = torch.tril(gi[:, None] / gi[None, :])
    assert mask.isnan().any() and not mask[:3000, :3000].isnan().any()


def test_dynamic_ratio_mask_is_declined():
    found = regions(_ratio, *_qkv(64), dynamic=True)
    assert len(found) == 1 and not found[0].claimed
    reason = found[0].reason
    assert "gi in the mask shrinks with T" in reason, reason
    assert "underflows to 0 at about T=339" in reason and "non-finite" in reason, reason
    torch._dynamo.reset()
    before = backend.counters["regions_claimed"]
    args = _qkv(33)
    out = torch.compile(_ratio, backend="rtp", dynamic=True)(*args)
    assert backend.counters["regions_claimed"] == before
    torch.testing.assert_close(out, _ratio(*args))


def test_static_ratio_mask_stays_claimed():
    """A static T is proven at the length it runs: no NaN there, nothing to extrapolate."""
    found = regions(_ratio, *_qkv(64), dynamic=False)
    assert len(found) == 1 and found[0].claimed, found[0].reason


def test_learnable_ratio_is_declined_once_moved():
    model = _LearnableRatio()
    found = regions(model, *_qkv(64), dynamic=True)
    assert len(found) == 1 and not found[0].claimed
    assert "shrinks with T" in found[0].reason and "trainable parameters moved" in found[0].reason


@pytest.mark.parametrize("f", [_difference, _normalised], ids=["difference", "normalised"])
def test_shrinking_values_that_stay_finite_are_claimed(f):
    """exp(cs_i - cs_j) and a row-normalised decay have values that shrink exponentially with T
    (far entries), but nothing divides by them: claimed at a dynamic T, equal to float64."""
    found = regions(f, *_qkv(64), dynamic=True)
    assert len(found) == 1 and found[0].claimed, found[0].reason
    torch._dynamo.reset()
    args = _qkv(65)
    with torch.no_grad():
        out = torch.compile(f, backend="rtp", dynamic=True)(*args)
        expected = f(*(a.double() for a in args))
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


class _BufferRatio(torch.nn.Module):
    """The ratio over a precomputed ``g ** arange(L)`` buffer sliced to T."""

    def __init__(self, length: int):
        super().__init__()
        self.register_buffer("powers", _SLOW[:, None] ** torch.arange(float(length)))

    def forward(self, q, k, v):
        t = q.shape[2]
        gi = self.powers[:, :t]
        return (q @ k.mT * torch.tril(gi[:, :, None] / gi[:, None, :])) @ v


def test_a_ratio_over_an_underflowed_buffer_is_declined():
    """A 32768-long buffer already holds 0s past T ~ 3392 (too long for the proof to fit the
    mask at its length): its slice is extrapolated, and the ratio declined. Was claimed: eager
    float32 NaN rows at T = 3500, rtp finite."""
    found = regions(_BufferRatio(32768), *_qkv(64), dynamic=True)
    assert len(found) == 1 and not found[0].claimed
    assert "underflows to 0" in found[0].reason, found[0].reason


def test_a_ratio_over_a_buffer_that_never_underflows_is_claimed():
    """A 2048-long buffer (0.97 ** 2047 ~ 8e-28) never reaches 0: T cannot pass its length."""
    found = regions(_BufferRatio(2048), *_qkv(64), dynamic=True)
    assert len(found) == 1 and found[0].claimed, found[0].reason
