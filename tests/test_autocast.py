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
