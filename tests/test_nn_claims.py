"""Reference modules the backend must claim (found by a tester on rtpcompile.nn)."""

from __future__ import annotations

import warnings

import pytest
import torch

import rtpcompile
from rtpcompile.nn import MultiScaleRetention


@pytest.mark.parametrize("gate", [True, False])
def test_no_rotary_prefill_that_returns_its_state_is_claimed(gate):
    """Was declined ("the score matrix is used elsewhere"): final_state reads k's transpose, a
    view of the input the score chain also reads, so every cached prefill built T x T scores."""
    torch.manual_seed(0)
    m = MultiScaleRetention(32, 4, rotary=False, gate=gate, learnable_decay=True).double()
    x = torch.randn(2, 37, 32, dtype=torch.float64, requires_grad=True)
    (region,) = rtpcompile.explain(m, x, return_state=True).regions
    assert region.claimed, region.reason
    torch._dynamo.reset()
    y, s = torch.compile(m, backend="rtp")(x, return_state=True)
    y_ref, s_ref = m(x, return_state=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)
    params = [x, m.decay_logit, m.k_proj.weight]
    got = torch.autograd.grad((y.square().sum() + s.sum()), params)
    want = torch.autograd.grad((y_ref.square().sum() + s_ref.sum()), params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_an_empty_sequence_is_declined_with_a_reason_not_a_failure():
    """Was a 'detection/rewrite failed' warning (a reshape of the 0-length mask)."""
    m = MultiScaleRetention(32, 4)
    x = torch.randn(2, 0, 32)
    (region,) = rtpcompile.explain(m, x, return_state=True).regions
    assert not region.claimed and "T = 0" in region.reason
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, s = torch.compile(m, backend="rtp")(x, return_state=True)
    assert y.shape == (2, 0, 32) and not s.any()


def test_a_learned_decay_that_underflowed_to_zero_is_still_claimed():
    """gamma = exp(logsigmoid(-200)) is 0 in float32: the op runs it (as 2**-126); the proof
    declined it as outside (0, 1], so a long-trained model lost its kernels on a fresh compile."""
    torch.manual_seed(0)
    m = MultiScaleRetention(32, 4, rotary=False, learnable_decay=True)
    with torch.no_grad():
        m.decay_logit.copy_(torch.tensor([-200.0, -90.0, 0.5, 100.0]))
    x = torch.randn(2, 40, 32)
    (region,) = rtpcompile.explain(m, x).regions
    assert region.claimed, region.reason
    torch._dynamo.reset()
    y = torch.compile(m, backend="rtp")(x)
    want = m.double()(x.double())
    assert ((y.double() - want).abs().max() / want.abs().max()) < 1e-5
