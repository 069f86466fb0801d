"""Numerical edges of the generated Triton kernels, under the interpreter (tiny shapes).

Causality of the score select (a NaN or inf in a later key stays out of earlier rows, fused and
split chunkwise and parallel), d gamma at tiny and zero gamma (the per-program partial sums
are divided by gamma once, after the sum), gamma = 0 through the op, and the documented
float16 limit of the chunkwise kernels' inter-chunk state.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton")

from rtpcompile import kernels, ops  # noqa: E402
from rtpcompile.lowering import reference as ref  # noqa: E402

# NOTE: non-finite values are the point of several tests here (the interpreter's numpy warns)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
F64 = torch.float64
# (form, config): the fused and the split chunkwise pass, and the parallel one
PASSES = [("parallel", None), ("chunkwise", {"split": 0}), ("chunkwise", {"split": 1})]
IDS = ["parallel", "chunkwise-fused", "chunkwise-split"]


@pytest.fixture(autouse=True)
def _kernels(triton_on_cpu):
    yield


def _inputs(B, H, T, K, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, d, generator=g, dtype=F64) for d in (K, K, V, V)]


def _bad_rows(x):
    return (~x[0, 0].isfinite().all(-1)).nonzero().flatten().tolist()


@pytest.mark.parametrize(("form", "config"), PASSES, ids=IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_later_key_stays_out_of_earlier_rows(form, config, bad):
    q, k, v, _ = _inputs(1, 1, 40, 8, 8)
    k[0, 0, 35, 3] = bad
    g = torch.tensor([0.9])
    o, _ = kernels.triton_forward(form, q.float(), k.float(), v.float(), g, 0.5, None, 16, config)
    expect, _ = ref.reference_recurrent(q[:, :, :35], k[:, :, :35], v[:, :, :35], g, 0.5)
    torch.testing.assert_close(o[:, :, :35].double(), expect, rtol=2e-5, atol=2e-5)
    assert _bad_rows(o) == list(range(35, 40))


@pytest.mark.parametrize(("form", "config"), PASSES, ids=IDS)
def test_nonfinite_output_gradient_stays_in_its_rows_of_dq_and_dk(form, config):
    """A NaN in d o at row 0 reaches dq row 0 and dk row 0 only (dk's pass reads d o as keys)."""
    q, k, v, do = (x.float() for x in _inputs(1, 1, 40, 8, 8, seed=1))
    do[0, 0, 0, 0] = float("nan")
    g = torch.tensor([0.9])
    dq, dk, _, _, _ = kernels.triton_backward(
        form, do, None, q, k, v, g, 0.5, None, None, 16, config
    )
    assert _bad_rows(dq) == [0] and _bad_rows(dk) == [0]


@pytest.mark.parametrize(
    ("form", "config"), [*PASSES, ("recurrent", None)], ids=[*IDS, "recurrent"]
)
@pytest.mark.parametrize("small", [0.0, 1e-37])
def test_dgamma_partials_stay_finite_at_tiny_gamma(form, config, small):
    """The kernels' d gamma is finite at a tiny gamma (the closed form's partial sums divided by
    a tiny gamma each were +-inf, and their sum NaN); gamma = 0 runs as 2**-126."""
    q, k, v, do = (4 * x.float() for x in _inputs(1, 2, 20, 8, 6, seed=2))
    g = torch.tensor([small, 0.9])
    o, sf = kernels.triton_forward(form, q, k, v, g, 0.5, None, 16, config)
    expect, _ = ref.reference_parallel(q, k, v, g.double(), 0.5)
    torch.testing.assert_close(o.double(), expect, rtol=2e-5, atol=1e-3)
    grads = kernels.triton_backward(form, do, None, q, k, v, g, 0.5, None, sf, 16, config)
    assert all(torch.isfinite(x).all() for x in grads[:4])


@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent"])
@pytest.mark.parametrize("gammas", [[0.0, 0.9], [1e-30, 0.5], [5e-3, 0.99]], ids=str)
def test_small_and_zero_gamma_gradients_through_the_op(form, gammas):
    """Outputs, final state and every gradient (d gamma included) against float64 autograd."""
    q, k, v, do = _inputs(1, 2, 20, 8, 6, seed=3)
    g = torch.Generator().manual_seed(4)
    s0, dsf = (torch.randn(1, 2, 8, 6, generator=g, dtype=F64) for _ in range(2))
    gamma = torch.tensor(gammas, dtype=F64)
    ref_in = [x.clone().requires_grad_() for x in (q, k, v, gamma, s0)]
    ro, rs = ref.reference_parallel(*ref_in[:4], None, ref_in[4])
    expect = torch.autograd.grad((ro * do).sum() + (rs * dsf).sum(), ref_in)
    ins = [x.float().requires_grad_() for x in (q, k, v, gamma, s0)]
    o, s = ops.retention(*ins[:4], form=form, initial_state=ins[4], output_final_state=True)
    got = torch.autograd.grad((o.double() * do).sum() + (s.double() * dsf).sum(), ins)
    names = ("o", "state", "dq", "dk", "dv", "dgamma", "ds0")
    for name, a, b in zip(names, (o, s, *got), (ro, rs, *expect), strict=True):
        err = ((a.double() - b).abs().max() / b.abs().max()).item()
        assert err < 5e-4, f"{form} gamma={gammas}: {name} rel err {err:.2e}"


def test_float16_chunk_state_past_65504_is_not_finite_in_the_outputs():
    """The documented float16 limit (docs/kernels.md): the chunkwise kernels round scale times
    the state entering a chunk to float16 for tl.dot, so rows after a chunk where it exceeds
    65504 are inf/NaN; the final state (float32) and the aten path stay finite."""
    T, K = 96, 16
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 1, T, K, generator=g, dtype=F64) * 1e-3
    k, v = (30 + torch.rand(1, 1, T, K, generator=g, dtype=F64) for _ in range(2))
    gamma = torch.tensor([1.0])
    # scale 1: the float16 kernels cast scale * state (KernelSpec.scale_first), so a smaller
    # scale moves the limit further out (at 0.25: row 288, docs/ops.md)
    expect, s_ref = ref.reference_parallel(q, k, v, gamma, 1.0)
    assert s_ref.abs().max() > 65504  # ~930 per token and entry: past float16's range at T ~ 70
    halves = [x.half() for x in (q, k, v)]
    o, s = kernels.triton_forward("chunkwise", *halves, gamma, 1.0, None, 16, {"split": 0})
    torch.testing.assert_close(s.double(), s_ref, rtol=2e-3, atol=0)
    # the state entering row 64 peaks at 5.98e4, the one entering row 80 at 7.47e4
    first = _bad_rows(o)[0]
    assert first == 80
    torch.testing.assert_close(o[:, :, :first].double(), expect[:, :, :first], rtol=2e-2, atol=0.1)
