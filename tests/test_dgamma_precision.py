"""Precision of d gamma on the aten path (float32) against float64 autograd of the reference.

The yardstick is plain float32 eager autograd of the same function (a chunked loop, below):
the op's d gamma should be about as accurate, at every gamma in [0, 1] and long sequences, for
all three forms, with and without an initial state and a final-state gradient. The closed form
it replaced, sum_t (t - c) (<q_t, dq_t> - <k_t, dk_t>), lost ~T times float32's rounding of dq
and dk: 8e-2 relative at T = 4096, gamma = 0.02 (eager float32: 6e-7).
"""

from __future__ import annotations

import pytest
import torch

from rtpcompile import ops
from rtpcompile.lowering import aten_impl
from rtpcompile.lowering import reference as ref

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("aten_env")


def _inputs(B, H, T, K, V, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, T, d, generator=g) for d in (K, K, V, V))
    s0, dsf = (torch.randn(B, H, K, V, generator=g) for _ in range(2))
    return q, k, v, do, s0, dsf


def _reference_dgamma(q, k, v, do, gamma, s0, dsf):
    """float64 autograd through the reference's chunkwise form (O(T * 64) memory)."""
    g = gamma.double().clone().requires_grad_()
    o, sf = ref.reference_chunkwise(q, k, v, g, None, s0, chunk_size=64)
    loss = (o * do.double()).sum() + (0 if dsf is None else (sf * dsf.double()).sum())
    return torch.autograd.grad(loss, g)[0]


def _eager_dgamma(q, k, v, do, gamma, s0, dsf, C=64):
    """Plain float32 eager autograd, chunk by chunk: the yardstick."""
    g = gamma.float().clone().requires_grad_()
    B, H, T, K = q.shape
    scale = K**-0.5
    state = q.new_zeros(B, H, K, v.shape[-1]) if s0 is None else s0
    gh = g[:, None, None]
    loss = 0
    for start in range(0, T, C):
        qc, kc, vc, doc = (x[:, :, start : start + C] for x in (q, k, v, do))
        n = qc.shape[2]
        pos = torch.arange(n)
        lag = pos[:, None] - pos[None, :]
        decay = torch.where(lag >= 0, gh ** lag.clamp(min=0), 0)
        o = ((qc @ kc.transpose(-1, -2)) * decay) @ vc + gh ** (pos + 1)[:, None] * (qc @ state)
        loss = loss + (o * scale * doc).sum()
        state = gh**n * state + (kc * gh ** (n - 1 - pos)[:, None]).transpose(-1, -2) @ vc
    if dsf is not None:
        loss = loss + (state * dsf).sum()
    return torch.autograd.grad(loss, g)[0]


def _op_dgamma(form, q, k, v, do, gamma, s0, dsf, chunk_size=None):
    g = gamma.clone().requires_grad_()
    o, sf = ops.retention(
        q, k, v, g, form=form, initial_state=s0, output_final_state=True, chunk_size=chunk_size
    )
    loss = (o * do).sum() + (0 if dsf is None else (sf * dsf).sum())
    return torch.autograd.grad(loss, g)[0]


def _rel(a, b):
    return ((a.double() - b).abs() / b.abs()).tolist()


def _terms(q, k, v, do, gamma, s0, dsf):
    """Per head, the sum of the absolute values of d gamma's terms (float64, O(T^2)): a reader
    and a writer n apart contribute n gamma^(n-1) times their product. An error relative to
    this does not blow up when the terms happen to cancel."""
    q, k, v, do = (x.double() for x in (q, k, v, do))
    g = gamma.double()[:, None, None]
    T, K = q.shape[2], q.shape[3]
    pos = torch.arange(T, dtype=F64)

    def weight(n):  # n gamma^(n-1), 0 for n <= 0
        return n.clamp(min=0) * g ** (n - 1).clamp(min=0)

    total = 0
    R = 1024  # NOTE: row blocks: [T, T] in float64 is 2 GiB at T = 16384
    table = weight(torch.arange(-R, T, dtype=F64))[:, 0]  # [H, R + T]: the weight of lag n at n + R
    for a in range(0, T, R):
        rows, cols = slice(a, a + R), slice(0, min(T, a + R))  # keys past the block weigh 0
        lag = (pos[rows, None] - pos[None, cols]).long() + R
        pairs = (q[:, :, rows] @ k[:, :, cols].transpose(-1, -2)) * (
            do[:, :, rows] @ v[:, :, cols].transpose(-1, -2)
        )
        total = total + (pairs.abs() * table[:, lag]).sum(dim=(0, 2, 3)) * K**-0.5
    if s0 is not None:
        reads = ((q @ s0.double()) * do).sum(-1).abs() * K**-0.5  # [B, H, T]
        total = total + (reads * weight(pos + 1)[:, 0]).sum(dim=(0, 2))
    if dsf is not None:
        writes = ((k @ dsf.double()) * v).sum(-1).abs()
        total = total + (writes * weight(T - 1 - pos)[:, 0]).sum(dim=(0, 2))
        if s0 is not None:
            total = total + (dsf * s0).double().sum(dim=(0, 2, 3)).abs() * weight(
                torch.tensor(float(T))
            ).reshape(-1)
    return total


def _err(a, b, terms):
    return ((a.double() - b).abs() / terms).tolist()


@pytest.mark.parametrize("form", ["parallel", "chunkwise"])
def test_long_sequence_dgamma_is_as_accurate_as_eager_float32(form):
    """T = 4096, gamma = (0.02, 0.9), with both states: the closed form gave 8.1e-2 (parallel)
    and 6.9e-2 (chunkwise) relative error for the small head; float32 eager gives 6.2e-7."""
    q, k, v, do, s0, dsf = _inputs(1, 2, 4096, 16, 16, seed=0)
    gamma = torch.tensor([0.02, 0.9])
    want = _reference_dgamma(q, k, v, do, gamma, s0, dsf)
    got = _rel(_op_dgamma(form, q, k, v, do, gamma, s0, dsf), want)
    eager = _rel(_eager_dgamma(q, k, v, do, gamma, s0, dsf), want)
    for h in range(2):
        assert got[h] < max(10 * eager[h], 2e-6), (form, h, got, eager)


GAMMAS = (0.0, 1e-30, 1e-3, 0.0099, 0.0101, 0.02, 0.3, 0.9, 0.999, 1.0)


@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent"])
@pytest.mark.parametrize("states", [False, True], ids=["no-state", "states"])
def test_dgamma_over_the_whole_range(form, states):
    """Every gamma in [0, 1] at once (one head each), T = 203 (chunks of 64 and a ragged last
    one; recurrent: T = 41), with and without an initial state and a final-state gradient."""
    T = 41 if form == "recurrent" else 203
    q, k, v, do, s0, dsf = _inputs(2, len(GAMMAS), T, 12, 20, seed=3)
    s0, dsf = (s0, dsf) if states else (None, None)
    gamma = torch.tensor(GAMMAS)
    want = _reference_dgamma(q, k, v, do, gamma, s0, dsf)
    terms = _terms(q, k, v, do, gamma, s0, dsf)
    got = _err(_op_dgamma(form, q, k, v, do, gamma, s0, dsf), want, terms)
    eager = _err(_eager_dgamma(q, k, v, do, gamma, s0, dsf), want, terms)
    for h, g in enumerate(GAMMAS):
        assert got[h] < max(10 * eager[h], 2e-7), (form, g, got[h], eager[h])


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_chunk_sizes_give_the_same_dgamma(chunk_size):
    """The chunkwise form's own chunk size (1, 7: ragged, 64) carries the inter-chunk terms;
    float64 against the float64 reference."""
    q, k, v, do, s0, dsf = (x.double() for x in _inputs(1, 3, 50, 5, 6, seed=4))
    gamma = torch.tensor([0.0, 0.5, 0.97], dtype=F64)
    want = _reference_dgamma(q, k, v, do, gamma, s0, dsf)
    got = _op_dgamma("chunkwise", q, k, v, do, gamma, s0, dsf, chunk_size=chunk_size)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent"])
def test_dq_from_the_dgamma_pass_equals_the_dq_pass(form):
    """With d gamma wanted, dq comes from ``dgamma_chunked`` (it shares the scores and states);
    without, from its own pass: the same values, NaN rows included (a NaN key at row 9 reaches
    rows >= 9, as the recurrence gives), and the same d gamma with or without dq."""
    q, k, v, do, s0, dsf = (x.double() for x in _inputs(1, 2, 23, 4, 3, seed=5))
    gamma = torch.tensor([0.6, 0.95], dtype=F64)

    def run(q_, k_, v_, lg, scale, state):
        return aten_impl.forward(form, q_, k_, v_, lg, scale, state, 8)

    def grads(k_, needs):
        return aten_impl.retention_backward(
            run, do, dsf, q, k_, v, gamma, 0.5, s0, needs=needs, chunk_size=8
        )

    bad = k.clone()
    bad[0, 1, 9, 2] = float("nan")
    for keys in (k, bad):
        alone = grads(keys, (True, False, False, False, False))[0]
        dq, _, _, dgamma, _ = grads(keys, (True, False, False, True, False))
        assert torch.equal(alone.isnan(), dq.isnan())
        torch.testing.assert_close(dq, alone, rtol=1e-12, atol=1e-12, equal_nan=True)
    only = grads(k, (False, False, False, True, False))[3]
    torch.testing.assert_close(only, grads(k, None)[3], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("gamma", [0.0101, 0.9999])
def test_dgamma_at_t_16384(gamma):
    """T = 16384, chunkwise, with both states, a small head and one near 1 (float32).

    Errors relative to the sum of |terms|: near gamma = 1 the terms cancel to ~1e-5 of their
    sum (seed 6: |terms| / |d gamma| = 9.0e4), and then the error relative to d gamma itself is
    chance, for eager float32 as for the op (four seeds: eager 3.0e-7 to 2.6e-5 relative, the op
    5.5e-6 to 3.8e-5 on one machine; 10x eager at seed 6 failed on an AVX512 CPU and passed on
    the earlier machines). 1e-9 of the terms is ~60 float32 roundings of the largest ones;
    the closed form this replaced erred ~T times float32's epsilon of d gamma itself."""
    q, k, v, do, s0, dsf = _inputs(1, 2, 16384, 8, 8, seed=6)
    g = torch.tensor([gamma, 0.5])
    want = _reference_dgamma(q, k, v, do, g, s0, dsf)
    terms = _terms(q, k, v, do, g, s0, dsf)
    got = _err(_op_dgamma("chunkwise", q, k, v, do, g, s0, dsf), want, terms)
    eager = _err(_eager_dgamma(q, k, v, do, g, s0, dsf), want, terms)
    for h in range(2):
        assert got[h] < max(10 * eager[h], 1e-9), (h, got, eager)
