"""float16's range in the generated Triton kernels, under the interpreter (tiny shapes).

float16 ends at 65504. The kernels multiply by ``scale`` before a tensor-core operand is cast to
float16 (``KernelSpec.scale_first``): the scores (q.k, and do.v in the backward) and the state
entering a chunk (with a final-state gradient dsf, dsf itself rather than dsf / scale) are then
the terms of a small output, not unscaled values past 65504. The parallel form takes an incoming
state times its state_scale before the cast. The state is held times scale in float32 (k^T v
added times scale after its dot: k rows times scale were subnormal in float16 for a small
scale), in the recurrent form too. And a tiny scale with dsf no longer overflows float32
(``backward.TINY_SCALE``; float16 holds dsf itself). References are float64.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton")

from rtpcompile import kernels  # noqa: E402
from rtpcompile.kernels import spec as specs  # noqa: E402
from rtpcompile.lowering import reference as ref  # noqa: E402

F64 = torch.float64
# NOTE: the parallel pass, the fused and the split chunkwise pass (the split backward is the
# four-kernel path with chunk_dqk)
from test_kernel_edges import IDS, PASSES  # noqa: E402


@pytest.fixture(autouse=True)
def _kernels(triton_on_cpu):
    yield


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max error relative to the reference's largest entry; inf when a is not finite."""
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a.double() - b).abs().max() / b.abs().max()).item()


def _half(*xs: torch.Tensor) -> list[torch.Tensor]:
    """float64 inputs rounded to float16 (the kernels' inputs exactly), still float64."""
    return [x.half().double() for x in xs]


def _grads(q, k, v, gamma, scale, s0, do, dsf):
    """float64 autograd of the reference: o, final state, dq, dk, dv, dgamma(, ds0)."""
    ins = [x.double().clone().requires_grad_() for x in (q, k, v, gamma)]
    if s0 is not None:
        ins.append(s0.double().clone().requires_grad_())
    o, s = ref.reference_parallel(*ins[:4], scale, ins[4] if s0 is not None else None)
    loss = (o * do.double()).sum() + (0 if dsf is None else (s * dsf.double()).sum())
    return o.detach(), s.detach(), torch.autograd.grad(loss, ins)


def test_scale_first_is_float16_only():
    """The 16-bit order is chosen in Python per dtype: bfloat16 keeps float32's range and its
    cheaper order (the output block scaled once after the dots)."""
    for dtype, on in (("float16", True), ("bfloat16", False), ("float32", False)):
        s = specs.KernelSpec("chunkwise", "fwd", 16, 16, 16, 16, 16, dtype, dtype)
        assert s.scale_first is on
        assert f"# SCALE_FIRST = {on}\n" in specs.render(s)


def _check_grads(got, expect):
    """dq, dk, dv to float16's rounding; d gamma, a sum with cancellation, to 1e-2 (measured in
    these tests, and with dsf of 1e3, well in range: 4e-3 and 1.2e-3 for the tl.dot forms)."""
    for name, a, b in zip(("dq", "dk", "dv", "dgamma"), got[:4], expect, strict=True):
        tol = 1e-2 if name == "dgamma" else 3e-3
        assert _err(a, b) < tol, f"{name}: rel err {_err(a, b):.2e}"


@pytest.mark.parametrize(("form", "config"), PASSES, ids=IDS)
def test_float16_scores_past_65504_with_a_small_output(form, config):
    """q.k up to ~9e4 (q, k in [30, 40], K = 64) with v ~ 1e-3: the output is ~70. The unscaled
    scores were rounded to float16 before the second tl.dot: every output inf/NaN."""
    g = torch.Generator().manual_seed(0)
    B, H, T, K, V = 1, 1, 40, 64, 16
    q, k = (30 + 10 * torch.rand(B, H, T, K, generator=g, dtype=F64) for _ in range(2))
    v = 1e-3 * torch.randn(B, H, T, V, generator=g, dtype=F64)
    q, k, v = _half(q, k, v)
    gamma = torch.tensor([0.9])
    assert (q @ k.transpose(-1, -2)).abs().max() > 65504
    expect, s_ref = ref.reference_parallel(q, k, v, gamma.double())
    o, s = kernels.triton_forward(
        form, q.half(), k.half(), v.half(), gamma, K**-0.5, None, 16, config
    )
    assert _err(o, expect) < 2e-3
    assert _err(s, s_ref) < 2e-3


@pytest.mark.parametrize(("form", "config"), PASSES, ids=IDS)
def test_float16_backward_scores_past_65504(form, config):
    """The backward's passes run the same templates with swapped roles: do.v (the dq pass, the
    dk pass and the split dq/dk kernel) past 65504 while every gradient is small."""
    g = torch.Generator().manual_seed(1)
    B, H, T, K, V = 1, 1, 40, 16, 64
    q, k = (1e-2 * torch.randn(B, H, T, K, generator=g, dtype=F64) for _ in range(2))
    v, do = (30 + 10 * torch.rand(B, H, T, V, generator=g, dtype=F64) for _ in range(2))
    q, k, v, do = _half(q, k, v, do)
    gamma = torch.tensor([0.9])
    assert (do @ v.transpose(-1, -2)).abs().max() > 65504
    _, _, expect = _grads(q, k, v, gamma, K**-0.5, None, do, None)
    halves = [x.half() for x in (q, k, v)]
    o, sf = kernels.triton_forward(form, *halves, gamma, K**-0.5, None, 16, config)
    got = kernels.triton_backward(
        form, do.half(), None, *halves, gamma, K**-0.5, None, sf, 16, config
    )
    _check_grads(got, expect)


@pytest.mark.parametrize(("form", "config"), PASSES, ids=IDS)
def test_float16_incoming_state_past_65504(form, config):
    """A float32 initial state with entries up to 1e5 (gamma = 1, q ~ 1e-2): the parallel form
    rounded it to float16 for tl.dot (docs said it was unaffected); it now enters times its
    scale, as do the chunkwise forms' states."""
    g = torch.Generator().manual_seed(2)
    B, H, T, K, V = 1, 1, 40, 16, 16
    q = 1e-2 * torch.randn(B, H, T, K, generator=g, dtype=F64)
    k, v = (torch.randn(B, H, T, d, generator=g, dtype=F64) for d in (K, V))
    s0 = 1e5 * torch.rand(B, H, K, V, generator=g, dtype=F64)
    q, k, v = _half(q, k, v)
    s0 = s0.float().double()
    gamma = torch.tensor([1.0])
    expect, s_ref = ref.reference_parallel(q, k, v, gamma.double(), None, s0)
    halves = [x.half() for x in (q, k, v)]
    o, s = kernels.triton_forward(form, *halves, gamma, K**-0.5, s0.float(), 16, config)
    assert _err(o, expect) < 2e-3
    assert _err(s, s_ref) < 1e-5


@pytest.mark.parametrize(("form", "config"), PASSES, ids=IDS)
def test_float16_final_state_gradient_over_scale_past_65504(form, config):
    """dsf up to 2e4 at scale 0.25 (K = 16): the dk and dv passes held dsf / scale = 8e4 and
    rounded it to float16 (fused: for tl.dot, split: in the chunk-state buffer): dk, dv
    non-finite and d gamma NaN, where the parallel and recurrent forms were right."""
    g = torch.Generator().manual_seed(3)
    B, H, T, K, V = 1, 1, 40, 16, 16
    q, do = (torch.randn(B, H, T, d, generator=g, dtype=F64) for d in (K, V))
    k, v = (1e-1 * torch.randn(B, H, T, d, generator=g, dtype=F64) for d in (K, V))
    dsf = 2e4 * torch.rand(B, H, K, V, generator=g, dtype=F64)
    q, k, v, do = _half(q, k, v, do)
    dsf = dsf.float().double()
    gamma = torch.tensor([0.9])
    o_ref, s_ref, expect = _grads(q, k, v, gamma, K**-0.5, None, do, dsf)
    assert (dsf / K**-0.5).max() > 65504 and max(x.abs().max() for x in expect[:3]) < 6e4
    halves = [x.half() for x in (q, k, v)]
    o, sf = kernels.triton_forward(form, *halves, gamma, K**-0.5, None, 16, config)
    got = kernels.triton_backward(
        form, do.half(), dsf.float(), *halves, gamma, K**-0.5, None, sf, 16, config
    )
    _check_grads(got, expect)


@pytest.mark.parametrize(
    ("form", "config"), [*PASSES, ("recurrent", None)], ids=[*IDS, "recurrent"]
)
def test_float32_tiny_scale_with_final_state_gradient(form, config):
    """scale 1e-38 with an initial state and dsf (float32): dsf / scale left float32's range in
    every form (dk, dv, d gamma, ds0 non-finite); below TINY_SCALE the dk and dv passes run in
    output units."""
    g = torch.Generator().manual_seed(4)
    B, H, T, K, V = 1, 2, 20, 8, 8
    q, k, v, do = (torch.randn(B, H, T, d, generator=g, dtype=F64) for d in (K, K, V, V))
    s0, dsf = (torch.randn(B, H, K, V, generator=g, dtype=F64) for _ in range(2))
    gamma = torch.tensor([0.9, 0.3])
    scale = 1e-38
    o_ref, s_ref, expect = _grads(q, k, v, gamma, scale, s0, do, dsf)
    f32 = [x.float() for x in (q, k, v)]
    o, sf = kernels.triton_forward(form, *f32, gamma, scale, s0.float(), 16, config)
    got = kernels.triton_backward(
        form, do.float(), dsf.float(), *f32, gamma, scale, s0.float(), sf, 16, config
    )
    assert _err(sf, s_ref) < 1e-5
    names = ("dq", "dk", "dv", "dgamma", "ds0")
    for name, a, b in zip(names, got, expect, strict=True):
        # dq is scale * (...) ~ 1e-38: float32 subnormals hold it to ~1e-3 relative
        tol = 2e-3 if name == "dq" else 1e-5
        assert _err(a, b) < tol, f"{name}: rel err {_err(a, b):.2e}"


@pytest.mark.parametrize(("form", "config"), PASSES, ids=IDS)
@pytest.mark.parametrize("scale", [-0.7, 3.0])
def test_float16_negative_and_large_scale_with_states(form, config, scale):
    """The float16 order's bookkeeping: the parallel form puts |scale| in the decay's exponent
    and the sign on the sum; the chunkwise forms hold the state times scale and divide the
    final state by it. Outputs, final state and every gradient against float64."""
    g = torch.Generator().manual_seed(5)
    B, H, T, K, V = 1, 2, 40, 16, 16
    q, k, v, do = (torch.randn(B, H, T, d, generator=g, dtype=F64) for d in (K, K, V, V))
    s0, dsf = (torch.randn(B, H, K, V, generator=g, dtype=F64) for _ in range(2))
    q, k, v, do = _half(q, k, v, do)
    s0, dsf = s0.float().double(), dsf.float().double()
    gamma = torch.tensor([0.9, 0.6])
    o_ref, s_ref, expect = _grads(q, k, v, gamma, scale, s0, do, dsf)
    halves = [x.half() for x in (q, k, v)]
    o, sf = kernels.triton_forward(form, *halves, gamma, scale, s0.float(), 16, config)
    assert _err(o, o_ref) < 2e-3
    # k rows times their decays (not times scale) are cast to float16 for the state's tl.dot:
    # 1.4e-4 (1.7e-4 and 2.0e-4 while the k rows were cast times scale)
    assert _err(sf, s_ref) < 5e-4
    got = kernels.triton_backward(
        form, do.half(), dsf.float(), *halves, gamma, scale, s0.float(), sf, 16, config
    )
    _check_grads(got[:4], expect[:4])
    assert _err(got[4], expect[4]) < 3e-3


@pytest.mark.parametrize(("form", "config"), PASSES, ids=IDS)
def test_float16_final_state_keeps_its_precision_at_a_small_scale(form, config):
    """k ~ 1e-2 at scale 1e-3 and 1e-5: the chunkwise state kernels multiplied k's decays by
    scale before their float16 cast, and k gamma^n scale below 6.1e-5 is subnormal there (final
    state 3.1e-3 and 0.26 relative error, 2.5e-4 before the float16 order). k^T v is now added
    times scale in float32; the final state (float32) is as precise at every scale. The parallel
    form's final state comes from the same state kernel."""
    g = torch.Generator().manual_seed(6)
    B, H, T, K, V = 1, 1, 40, 16, 16
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=F64) for d in (K, K, V))
    q, k, v = _half(q, 1e-2 * k, v)
    gamma = torch.tensor([0.9])
    halves = [x.half() for x in (q, k, v)]
    for scale in (0.25, 1e-3, 1e-5):
        _, s_ref = ref.reference_parallel(q, k, v, gamma.double(), scale)
        _, s = kernels.triton_forward(form, *halves, gamma, scale, None, 16, config)
        assert _err(s, s_ref) < 1e-3, f"scale {scale}: rel err {_err(s, s_ref):.2e}"


@pytest.mark.parametrize(
    ("form", "config"), [*PASSES, ("recurrent", None)], ids=[*IDS, "recurrent"]
)
def test_float16_tiny_scale_with_final_state_gradient(form, config):
    """float16 at scale 1e-38 with an initial state and dsf: the float16 kernels hold the state
    times scale (dsf itself, no ``_units`` step); the recurrent form held dsf / scale (dk, dv and
    d gamma non-finite). dq ~ 1e-38 flushes to 0 in float16: not compared."""
    g = torch.Generator().manual_seed(4)
    B, H, T, K, V = 1, 2, 20, 8, 8
    q, k, v, do = (torch.randn(B, H, T, d, generator=g, dtype=F64) for d in (K, K, V, V))
    s0, dsf = (torch.randn(B, H, K, V, generator=g, dtype=F64) for _ in range(2))
    q, k, v, do = _half(q, k, v, do)
    s0, dsf = s0.float().double(), dsf.float().double()
    gamma = torch.tensor([0.9, 0.3])
    scale = 1e-38
    o_ref, s_ref, expect = _grads(q, k, v, gamma, scale, s0, do, dsf)
    halves = [x.half() for x in (q, k, v)]
    o, sf = kernels.triton_forward(form, *halves, gamma, scale, s0.float(), 16, config)
    assert _err(sf, s_ref) < 1e-3
    got = kernels.triton_backward(
        form, do.half(), dsf.float(), *halves, gamma, scale, s0.float(), sf, 16, config
    )
    assert torch.isfinite(got[0]).all()
    for name, a, b in zip(("dk", "dv", "dgamma", "ds0"), got[1:], expect[1:], strict=True):
        tol = 1e-2 if name == "dgamma" else 3e-3
        assert _err(a, b) < tol, f"{name}: rel err {_err(a, b):.2e}"
