"""Numerical edges of the ops on the aten path (CPU), against the float64 reference.

Causality with non-finite values (a NaN or inf at position s reaches rows t >= s only, as in
the recurrence), gamma = 0 and tiny gammas (outputs and every gradient, d gamma included), and
the argument checks that came with them (raw-op gamma dtype, numpy chunk sizes, the layout hint).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtpcompile import ops
from rtpcompile.lowering import reference as ref

FORMS = ("parallel", "chunkwise", "recurrent")
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("aten_env")


def _inputs(B, H, T, K, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, T, d, generator=g, dtype=F64) for d in (K, K, V, V))
    s0, dsf = (torch.randn(B, H, K, V, generator=g, dtype=F64) for _ in range(2))
    return q, k, v, do, s0, dsf


def _run(form, q, k, v, gamma, s0=None, chunk_size=None):
    """(o, final state) of one form through the public ops."""
    if form == "recurrent":
        return ops.retention_recurrent(q, k, v, gamma, s0)
    if form == "chunkwise":
        return ops.retention_chunkwise(q, k, v, gamma, chunk_size=chunk_size, initial_state=s0)
    return ops.retention(q, k, v, gamma, form=form, initial_state=s0, output_final_state=True)


def _bad_rows(x):
    return (~x[0, 0].isfinite().all(-1)).nonzero().flatten().tolist()


# ---------------------------------------------------------------------------------------------
# causality with non-finite values


@pytest.mark.parametrize("what", ["k", "v", "q"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_reference_nonfinite_value_reaches_later_rows_only(what, bad):
    q, k, v, _, _, _ = _inputs(1, 1, 12, 4, 3)
    dict(q=q, k=k, v=v)[what][0, 0, 7, 1] = bad
    clean = [x[:, :, :7] for x in (q, k, v)]
    gamma = torch.tensor([0.9], dtype=F64)
    expect, _ = ref.reference_recurrent(*clean, gamma)
    for fn in (ref.reference_parallel, ref.reference_chunkwise, ref.reference_recurrent):
        o, _ = fn(q, k, v, gamma)
        torch.testing.assert_close(o[:, :, :7], expect)
        assert _bad_rows(o) == ([7] if what == "q" else list(range(7, 12)))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("what", ["k", "v"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_nonfinite_future_value_leaves_earlier_rows_exact(form, what, dtype):
    """A NaN/inf at position 19 of T=24 (chunks of 8): rows 0..18 equal the outputs of the
    sequence cut before it, rows 19.. are non-finite (as the recurrence gives)."""
    q, k, v, _, s0, _ = _inputs(1, 2, 24, 5, 3)
    for bad in (float("nan"), float("inf")):
        x = dict(q=q, k=k, v=v)
        x[what] = x[what].clone()
        x[what][0, 1, 19, 2] = bad
        gamma = torch.tensor([0.8, 0.95], dtype=F64)
        cut = [t[:, :, :19].to(dtype) for t in (x["q"], x["k"], x["v"])]
        args = [t.to(dtype) for t in (x["q"], x["k"], x["v"])]
        o, _ = _run(form, *args, gamma.to(dtype), s0.to(dtype), chunk_size=8)
        expect, _ = ref.reference_recurrent(*cut, gamma, None, s0)
        tol = 1e-10 if dtype == F64 else 2e-5
        torch.testing.assert_close(o[:, :, :19].double(), expect, rtol=tol, atol=tol)
        assert not o[0, 1, 19:].isfinite().all(-1).any()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("row", [0, 11])
def test_nonfinite_output_gradient_reaches_earlier_keys_only(form, row):
    """A NaN in d o at row r poisons dq row r and dk, dv rows <= r only; the other rows equal
    the reference's gradients with that row of d o zeroed."""
    q, k, v, do, _, _ = _inputs(1, 1, 12, 4, 3, seed=1)
    gamma = torch.tensor([0.9], dtype=F64)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o, _ = _run(form, *leaves, gamma, chunk_size=4)
    bad = do.clone()
    bad[0, 0, row, 0] = float("nan")
    dq, dk, dv = torch.autograd.grad(o, leaves, bad)
    assert _bad_rows(dq) == [row]
    assert _bad_rows(dk) == list(range(row + 1)) and _bad_rows(dv) == list(range(row + 1))
    zeroed = do.clone()
    zeroed[0, 0, row] = 0
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    ro, _ = ref.reference_recurrent(*ref_in, gamma)
    rq, rk, rv = torch.autograd.grad(ro, ref_in, zeroed)
    keep = torch.ones(12, dtype=torch.bool)
    keep[row] = False
    torch.testing.assert_close(dq[0, 0, keep], rq[0, 0, keep])
    torch.testing.assert_close(dk[0, 0, row + 1 :], rk[0, 0, row + 1 :])
    torch.testing.assert_close(dv[0, 0, row + 1 :], rv[0, 0, row + 1 :])


# ---------------------------------------------------------------------------------------------
# gamma = 0 and tiny gammas: outputs and every gradient


def _check_grads(form, gamma_values, dtype, T=13, chunk_size=4, rtol=None):
    """Outputs, final state and the gradients of q, k, v, gamma and the initial state against
    float64 autograd through the reference (gamma exactly as given, 0 included)."""
    q, k, v, do, s0, dsf = _inputs(2, len(gamma_values), T, 5, 3, seed=2)
    gamma = torch.tensor(gamma_values, dtype=F64)
    ref_in = [x.clone().requires_grad_() for x in (q, k, v, gamma, s0)]
    ro, rs = ref.reference_parallel(*ref_in[:4], None, ref_in[4])
    expect = torch.autograd.grad((ro * do).sum() + (rs * dsf).sum(), ref_in)
    wide = F64 if dtype == F64 else torch.float32
    ins = [x.to(dtype) for x in (q, k, v)] + [gamma.to(wide), s0.to(wide)]
    ins = [x.clone().requires_grad_() for x in ins]
    o, s = _run(form, *ins[:4], ins[4], chunk_size=chunk_size)
    got = torch.autograd.grad((o.double() * do).sum() + (s.double() * dsf).sum(), ins)
    tol = rtol or (1e-9 if dtype == F64 else 2e-4)
    names = ("o", "state", "dq", "dk", "dv", "dgamma", "ds0")
    for name, a, b in zip(names, (o, s, *got), (ro, rs, *expect), strict=True):
        scale = b.abs().max().clamp(min=1e-30)
        err = ((a.double() - b).abs().max() / scale).item()
        assert err < tol, f"{form} {dtype} gamma={gamma_values}: {name} rel err {err:.2e}"


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_gamma_zero_outputs_and_gradients(form, dtype):
    """gamma = 0 is accepted (0**0 = 1: o_t = scale q_t k_t^T v_t); d gamma there is the exact
    one-sided derivative (the lag-1 products)."""
    _check_grads(form, [0.0, 0.9], dtype)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("small", [1e-38, 1e-30, 1e-12, 1e-6, 1e-3, 9e-3, 2e-2])
def test_tiny_gamma_gradients_match_the_reference(form, dtype, small):
    """d gamma stays accurate however small gamma is (the closed form lost eps / gamma:
    float32 gave 7e24 for 6.2 at gamma = 1e-30, float64 -3.9e5 for -17.3 at 1e-20)."""
    if dtype == torch.float32 and small < 1e-37:
        small = 2e-38  # a float32 normal
    _check_grads(form, [small, 0.5], dtype, rtol=1e-8 if dtype == F64 else 5e-4)


def test_sigmoid_decay_underflowing_to_zero_trains():
    """gamma = sigmoid(logit) is exactly 0 in float32 for logit < -88.7 (float16: < -17): the op
    accepts it and the logit's gradient is finite (0: sigmoid's own derivative underflows)."""
    q, k, v, do, _, _ = _inputs(1, 2, 9, 4, 4)
    for dtype, logit in ((torch.float32, -100.0), (torch.float16, -18.0)):
        lg = torch.tensor([logit, 3.0], dtype=dtype, requires_grad=True)
        gamma = torch.sigmoid(lg)
        assert gamma[0].item() == 0.0
        o = ops.retention(q.to(dtype), k.to(dtype), v.to(dtype), gamma)
        (d,) = torch.autograd.grad((o.double() * do).sum(), lg)
        assert torch.isfinite(d).all() and d[0].item() == 0.0


def test_gamma_range_is_zero_to_one():
    q = torch.randn(1, 2, 5, 4)
    ops.retention(q, q, q, 0.0)
    ops.retention(q, q, q, torch.zeros(2))
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"gamma values must lie in \[0, 1\]"):
            ops.retention(q, q, q, torch.full((2,), bad))
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            ops.retention(q, q, q, bad)


# ---------------------------------------------------------------------------------------------
# argument checks


def test_raw_op_refuses_an_integer_gamma_like_the_public_ops():
    q = torch.randn(1, 2, 5, 4)
    g = torch.ones(2, dtype=torch.int64)
    for call in (
        lambda: ops.retention(q, q, q, g),
        lambda: torch.ops.rtp.retention_fwd(q, q, q, g, 0.5, None, "auto", 0),
    ):
        with pytest.raises(ValueError, match="gamma must be a floating tensor, got torch.int64"):
            call()


@pytest.mark.parametrize("chunk", [np.int64(4), np.int32(4), torch.tensor(4)])
def test_integer_scalars_are_chunk_sizes(chunk):
    q, k, v, _, _, _ = _inputs(1, 2, 9, 4, 4)
    gamma = torch.tensor([0.9, 0.5], dtype=F64)
    o, s = ops.retention_chunkwise(q, k, v, gamma, chunk_size=chunk)
    ro, rs = ref.reference_recurrent(q, k, v, gamma)
    torch.testing.assert_close(o, ro)
    torch.testing.assert_close(s, rs)


@pytest.mark.parametrize("chunk", [np.float64(4.0), 4.0, True, 0, np.int64(-2), "4"])
def test_non_integer_chunk_sizes_are_refused(chunk):
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="chunk_size must be a positive int or None"):
        ops.retention_chunkwise(q, q, q, 0.9, chunk_size=chunk)


def test_btHd_layout_gets_a_transpose_hint():
    B, T, H, D = 2, 10, 4, 8
    x = torch.randn(B, T, H, D)
    gamma = ops.retention_init_decay(H)
    with pytest.raises(ValueError, match=r"transpose\(1, 2\) a \[B, T, H, D\] tensor"):
        ops.retention(x, x, x, gamma)
    with pytest.raises(ValueError, match=r"transpose\(1, 2\)"):
        torch.ops.rtp.retention_fwd(x, x, x, gamma, 0.5, None, "auto", 0)
    # no hint when the lengths do not suggest it
    y = torch.randn(B, 10, 3, D)  # H = 10, T = 3: gamma's 4 entries match neither
    with pytest.raises(ValueError, match=r"shape \[10\]") as err:
        ops.retention(y, y, y, gamma)
    assert "transpose" not in str(err.value)
