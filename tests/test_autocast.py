"""Under ``torch.autocast`` a claimed region runs in the dtype autocast gives its products, as
eager and ``backend="inductor"`` do (until 2026-11-24 the op ran on the float32 inputs and
returned float32): the op gets the autocast dtype, the output has it, gradients flow back to the
float32 inputs."""

from __future__ import annotations

import pytest
import torch

from rtpcompile.lowering import dispatch


class Paper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("gamma", torch.tensor([0.9, 0.7, 0.5]))

    def forward(self, q, k, v):
        T = q.shape[2]
        i = torch.arange(T, device=q.device)
        d = i[:, None] - i[None, :]
        mask = torch.where(d >= 0, self.gamma[:, None, None] ** d.clamp(min=0), 0.0)
        return ((q @ k.transpose(-1, -2)) * 0.25 * mask) @ v


class Inner(Paper):
    """The region under a nested autocast(enabled=False): eager runs it in float32."""

    def forward(self, q, k, v):
        with torch.autocast("cpu", enabled=False):
            return super().forward(q, k, v)


@pytest.fixture
def op_dtypes(monkeypatch):
    seen = []
    real = dispatch.forward

    def recorded(form, q, *args, **kwargs):
        seen.append(q.dtype)
        return real(form, q, *args, **kwargs)

    monkeypatch.setattr(dispatch, "forward", recorded)
    torch._dynamo.reset()
    yield seen
    torch._dynamo.reset()


def _inputs(dtype=torch.float32, T=24):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, T, 16, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_region_under_autocast_runs_in_the_autocast_dtype(op_dtypes, dtype):
    model = Paper()
    compiled = torch.compile(model, backend="rtp")
    inputs = _inputs()
    with torch.autocast("cpu", dtype=dtype):
        out = compiled(*inputs)
        want = model(*inputs)
    assert op_dtypes == [dtype]
    assert out.dtype == want.dtype == dtype
    ref = Paper().double()(*(x.double() for x in inputs))
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    got = torch.autograd.grad(out.float().square().sum(), inputs)
    exp = torch.autograd.grad(ref.square().sum(), [*inputs])
    for g, e in zip(got, exp, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), e.double(), rtol=5 * tol, atol=5 * tol)


def test_autocast_off_inside_the_model_keeps_float32(op_dtypes):
    model = Inner()
    inputs = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.compile(model, backend="rtp")(*inputs)
        want = model(*inputs)
    assert op_dtypes == [torch.float32] and out.dtype == want.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_float64_is_not_cast_by_autocast(op_dtypes):
    model = Paper().double()
    inputs = _inputs(torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.compile(model, backend="rtp")(*inputs)
        want = model(*inputs)
    assert op_dtypes == [torch.float64] and out.dtype == want.dtype == torch.float64
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


class ElementwiseStep(torch.nn.Module):
    """A recurrent step spelt without a product autocast casts: eager keeps float32."""

    def forward(self, q, k, v, state):
        state = 0.9 * state + k.unsqueeze(-1) * v.unsqueeze(-2)
        return (q.unsqueeze(-1) * state).sum(-2), state


def test_an_elementwise_spelling_under_autocast_keeps_eager_float32(op_dtypes):
    """The rewrite cast q, k, v to the autocast dtype whatever the region's spelling (until
    2026-11-24, same day): this one returned bfloat16 where eager returns float32."""
    model = ElementwiseStep()
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 3, 8, generator=g) for _ in range(2))
    v = torch.randn(2, 3, 6, generator=g)
    state = torch.randn(2, 3, 8, 6, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, new = torch.compile(model, backend="rtp")(q, k, v, state)
        want, want_state = model(q, k, v, state)
    assert out.dtype == want.dtype == torch.float32 and new.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new, want_state, rtol=1e-5, atol=1e-5)


def test_a_cpu_step_under_autocast_computes_its_product_in_float32():
    """The inlined one-token step is traced under the graph's autocast: its q @ S ran in
    bfloat16 (same day); as the op, it runs in float32 and rounds once."""
    from rtpcompile.rewrite import _step_in_aten

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 1, 16, generator=g).bfloat16() for _ in range(3))
    s0 = torch.randn(1, 2, 16, 16, generator=g)
    gamma = torch.tensor([0.9, 0.5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, s = _step_in_aten(q, k, v, gamma, 0.25, s0)
    want_s = gamma[:, None, None] * s0 + k.float().transpose(-1, -2) @ v.float()
    want = (q.float() @ want_s * 0.25).bfloat16()
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, want_s)
    torch.testing.assert_close(o, want, rtol=0, atol=0)
