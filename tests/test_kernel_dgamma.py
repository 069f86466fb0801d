"""Precision of the Triton kernels' d gamma (under the interpreter) against float64 autograd.

The kernels' d gamma is a forward-mode derivative (``kernels/backward.py``): the dq pass sums
<q_t, d dq_t / d gamma> with its scores weighted by n gamma^(n-1) and a carried derivative of
its state; the final-state gradient's term is one aten product. The yardstick is plain float32
eager autograd (``test_dgamma_precision._eager_dgamma``). The closed form it replaced,
sum_t (t - c) (<q_t, dq_t> - <k_t, dk_t>) / gamma, cancelled terms: 9.5e-3 relative error at
T = 2048, gamma = 0.02 (eager: 2.5e-7), and 3.1 (wrong by 310%) in float16 at gamma = 0.0101.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton")

from conftest import clean_rtp_env  # noqa: E402
from test_dgamma_precision import (  # noqa: E402
    GAMMAS,
    _eager_dgamma,
    _err,
    _inputs,
    _reference_dgamma,
    _rel,
    _terms,
)

from rtpcompile import kernels  # noqa: E402

# the parallel pass, the fused and the split chunkwise pass (split: the four-kernel backward,
# whose dq/dk kernel sums d gamma from the split dq pass's states and their derivatives), and
# the recurrent pass
PASSES = [
    ("parallel", None),
    ("chunkwise", {"split": 0}),
    ("chunkwise", {"split": 1}),
    ("recurrent", None),
]
IDS = ["parallel", "fused", "split", "recurrent"]


@pytest.fixture(autouse=True)
def _kernels(request, tmp_path, monkeypatch):
    """The interpreter on CPU; compiled kernels for the ``gpu`` tests."""
    if "gpu" in request.keywords:
        clean_rtp_env(monkeypatch, tmp_path / "cache")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        yield
    else:
        request.getfixturevalue("triton_on_cpu")
        yield


def _kernel_dgamma(
    form, cfg, q, k, v, do, gamma, s0, dsf, dtype=torch.float32, needs=None, device="cpu"
):
    """The kernels' d gamma at the reference's scale, K**-0.5, in chunks of 64."""
    scale = q.shape[-1] ** -0.5
    q, k, v, do = (x.to(device, dtype) for x in (q, k, v, do))
    gamma = gamma.to(device)
    s0, dsf = (None if x is None else x.to(device) for x in (s0, dsf))
    _, sf = kernels.triton_forward(form, q, k, v, gamma, scale, s0, 64, cfg)
    grads = kernels.triton_backward(form, do, dsf, q, k, v, gamma, scale, s0, sf, 64, cfg, needs)
    return grads[3]


@pytest.mark.parametrize("form,cfg", PASSES, ids=IDS)
@pytest.mark.parametrize("states", [False, True], ids=["no-state", "states"])
def test_kernel_dgamma_over_the_whole_range(form, cfg, states):
    """Every gamma in [0, 1] at once (one head each; 0 and 1e-30 run as 2**-126), T = 83 (a
    ragged last chunk; recurrent: 17), K = 12, V = 20, with and without an initial state and a
    final-state gradient. The closed form lost eps / gamma: 9e-5 of the terms at 0.0101."""
    T = 17 if form == "recurrent" else 83
    q, k, v, do, s0, dsf = _inputs(2, len(GAMMAS), T, 12, 20, seed=3)
    s0, dsf = (s0, dsf) if states else (None, None)
    gamma = torch.tensor(GAMMAS)
    want = _reference_dgamma(q, k, v, do, gamma, s0, dsf)
    terms = _terms(q, k, v, do, gamma, s0, dsf)
    got = _err(_kernel_dgamma(form, cfg, q, k, v, do, gamma, s0, dsf), want, terms)
    eager = _err(_eager_dgamma(q, k, v, do, gamma, s0, dsf), want, terms)
    for h, g in enumerate(GAMMAS):
        assert got[h] < max(10 * eager[h], 2e-7), (form, cfg, g, got[h], eager[h])


@pytest.mark.parametrize("split", [0, 1], ids=["fused", "split"])
def test_kernel_dgamma_does_not_lose_digits_with_t(split):
    """T = 1024 (16 chunks), both states, a small head and a usual one: as accurate as eager
    float32 (the closed form: 9.5e-3 fused, 7.3e-3 split at T = 2048 for gamma = 0.02)."""
    q, k, v, do, s0, dsf = _inputs(1, 2, 1024, 8, 8, seed=0)
    gamma = torch.tensor([0.02, 0.9])
    want = _reference_dgamma(q, k, v, do, gamma, s0, dsf)
    got = _rel(_kernel_dgamma("chunkwise", {"split": split}, q, k, v, do, gamma, s0, dsf), want)
    eager = _rel(_eager_dgamma(q, k, v, do, gamma, s0, dsf), want)
    for h in range(2):
        assert got[h] < max(10 * eager[h], 2e-6), (h, got, eager)


@pytest.mark.parametrize("form,cfg", PASSES, ids=IDS)
def test_float16_kernel_dgamma(form, cfg):
    """float16 inputs (the float64 reference gets the same rounded values), T = 64, both
    states: within 1e-4 of d gamma's terms for a small head and one near 1 (the closed form:
    3.6e-2 of the terms, 3.1 relative, at gamma = 0.0101; now 1.2e-6 and 1.0e-4)."""
    q, k, v, do, s0, dsf = _inputs(1, 2, 64, 16, 16, seed=1)
    q, k, v, do = (x.half().float() for x in (q, k, v, do))
    gamma = torch.tensor([0.0101, 0.99])
    want = _reference_dgamma(q, k, v, do, gamma, s0, dsf)
    terms = _terms(q, k, v, do, gamma, s0, dsf)
    got = _kernel_dgamma(form, cfg, q, k, v, do, gamma, s0, dsf, dtype=torch.float16)
    assert max(_err(got, want, terms)) < 1e-4


@pytest.mark.parametrize("form,cfg", PASSES, ids=IDS)
def test_dgamma_alone_runs_the_dq_pass_only(form, cfg, monkeypatch):
    """d gamma needs the dq pass only (and the final-state term): wanted alone, that pass runs
    (split: its states stage and its rows, two launches) and gives what the full backward
    gives."""
    from rtpcompile.kernels import launch

    q, k, v, do, s0, dsf = _inputs(1, 2, 40, 8, 12, seed=2)
    gamma = torch.tensor([0.3, 0.95])
    _, sf = kernels.triton_forward(form, q, k, v, gamma, 0.5, s0, 64, cfg)
    args = (form, do, dsf, q, k, v, gamma, 0.5, s0, sf, 64, cfg)
    full = kernels.triton_backward(*args)[3]
    launched = []
    real = launch._launch
    monkeypatch.setattr(
        launch, "_launch", lambda spec, *a, **kw: launched.append(spec) or real(spec, *a, **kw)
    )
    only = kernels.triton_backward(*args, (False,) * 3 + (True, False))
    assert len(launched) == (2 if cfg == {"split": 1} else 1), launched
    assert all(s.row_dot and s.direction == "fwd" for s in launched), launched
    assert only[1] is None and only[2] is None and only[4] is None  # dq: the pass's own rows
    torch.testing.assert_close(only[3], full, rtol=1e-6, atol=0)


def test_final_state_term_in_row_slices(monkeypatch):
    """d gamma's final-state term sums its rows in slices (bounded copies at long T): slices of
    16 rows over T = 50 (the last partial) give the one-slice value."""
    from rtpcompile.kernels import backward

    q, k, v, do, s0, dsf = _inputs(2, 2, 50, 8, 12, seed=4)
    gamma = torch.tensor([0.05, 0.97])
    whole = _kernel_dgamma("chunkwise", None, q, k, v, do, gamma, s0, dsf)
    monkeypatch.setattr(backward, "FINAL_TERM_ROWS", 16)
    sliced = _kernel_dgamma("chunkwise", None, q, k, v, do, gamma, s0, dsf)
    torch.testing.assert_close(sliced, whole, rtol=1e-6, atol=0)
    want = _reference_dgamma(q, k, v, do, gamma, s0, dsf)
    assert max(_rel(sliced, want)) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("split", [0, 1], ids=["fused", "split"])
def test_gpu_kernel_dgamma_at_t_4096(dtype, split):
    """Compiled for the GPU (bfloat16 included, which the interpreter cannot run), T = 4096,
    K = V = 64, both states, a small head, a usual one and one near 1: within 2% of d gamma's
    terms in bfloat16, 0.2% in float16 and 1e-5 in float32 (the inputs rounded to the dtype for
    the float64 reference)."""
    q, k, v, do, s0, dsf = _inputs(1, 3, 4096, 64, 64, seed=7)
    q, k, v, do = (x.to(dtype).float() for x in (q, k, v, do))
    gamma = torch.tensor([0.02, 0.9, 0.999])
    want = _reference_dgamma(q, k, v, do, gamma, s0, dsf)
    terms = _terms(q, k, v, do, gamma, s0, dsf)
    got = _kernel_dgamma(
        "chunkwise", {"split": split}, q, k, v, do, gamma, s0, dsf, dtype=dtype, device="cuda"
    ).cpu()
    bound = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    assert max(_err(got, want, terms)) < bound, _err(got, want, terms)
