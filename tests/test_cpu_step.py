"""A claimed one-token step on CPU runs as plain aten ops that Inductor fuses
(``rewrite.inline_step``), not as a call of the rtp op: same outputs and gradients as eager and
the float64 reference, a gamma out of range refused, and the op still runs for longer calls and
when the Triton kernels are forced."""

from __future__ import annotations

import pytest
import torch

import rtpcompile
from rtpcompile.lowering import dispatch
from rtpcompile.lowering.reference import reference_recurrent
from rtpcompile.nn import RTPHybridLM


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the rtp op's forward calls (every form and kernel goes through dispatch.forward)."""
    calls = []
    real = dispatch.forward

    def counted(form, q, *args, **kwargs):
        calls.append(q.shape[2])
        return real(form, q, *args, **kwargs)

    monkeypatch.setattr(dispatch, "forward", counted)
    torch._dynamo.reset()
    yield calls
    torch._dynamo.reset()


class Step(torch.nn.Module):
    """The recurrent step as the paper writes it: S = gamma S + k^T v, o = q S * scale."""

    def __init__(self, gamma):
        super().__init__()
        self.log_gamma = torch.nn.Parameter(gamma.log())

    def forward(self, q, k, v, state):
        gamma = self.log_gamma.exp().to(q.dtype)
        state = gamma[:, None, None] * state + k.transpose(-1, -2) @ v
        return (q @ state) * q.shape[-1] ** -0.5, state


def _inputs(B=2, H=3, K=48, V=80, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, 1, K, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, H, 1, V, generator=g, dtype=dtype)
    state = torch.randn(B, H, K, V, generator=g, dtype=dtype)
    return q, k, v, state


def test_a_claimed_cpu_step_runs_no_op_and_matches_the_reference(op_calls):
    gamma = torch.tensor([0.9, 0.5, 1.0])
    step = Step(gamma)
    compiled = torch.compile(step, backend="rtp")
    inputs = [x.requires_grad_() for x in _inputs()]
    o, s = compiled(*inputs)
    assert op_calls == []  # claimed (below), but no op call at run time
    assert len(rtpcompile.explain(step, *_inputs()).claimed) == 1
    q, k, v, s0 = (x.detach().double().requires_grad_() for x in inputs)
    lg = step.log_gamma.detach().double().requires_grad_()
    ro, rs = reference_recurrent(q, k, v, lg.exp(), 48**-0.5, s0)
    torch.testing.assert_close(o.double(), ro, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.double(), rs, rtol=1e-5, atol=1e-5)
    gen = torch.Generator().manual_seed(1)
    do, ds = (torch.randn(x.shape, generator=gen) for x in (o, s))
    grads = torch.autograd.grad((o * do).sum() + (s * ds).sum(), [*inputs, step.log_gamma])
    loss = (ro * do.double()).sum() + (rs * ds.double()).sum()
    want = torch.autograd.grad(loss, [q, k, v, s0, lg])
    # NOTE: d log_gamma sums B*K*V = 7,680 float32 terms: held to eager float32's own error
    eager_step, eager_inputs = Step(gamma), [x.detach().requires_grad_() for x in inputs]
    eo, es = eager_step(*eager_inputs)
    eager = torch.autograd.grad(
        (eo * do).sum() + (es * ds).sum(), [*eager_inputs, eager_step.log_gamma]
    )
    for got, ref, own in zip(grads, want, eager, strict=True):
        error, eager_error = ((x.double() - ref).abs().max().item() for x in (got, own))
        bound = max(1e-5 * (1 + ref.abs().max().item()), 4 * eager_error)
        assert error <= bound, (error, eager_error)


def test_a_longer_call_still_runs_the_op(op_calls):
    """T = 2 with the same code: the op (a recurrent step over two tokens is the op's job)."""

    class Two(torch.nn.Module):
        def forward(self, q, k, v):
            T = q.shape[2]
            idx = torch.arange(T)
            mask = (0.9 ** (idx[:, None] - idx[None, :]).clamp(min=0)) * (idx[:, None] >= idx)
            return ((q @ k.transpose(-1, -2)) * mask) @ v

    q, k, v, _ = _inputs()
    q, k, v = (torch.cat([x, x], dim=2) for x in (q, k, v))
    out = torch.compile(Two(), backend="rtp")(q, k, v)
    assert op_calls == [2]
    torch.testing.assert_close(out, Two()(q, k, v), rtol=1e-5, atol=1e-5)


def test_a_gamma_out_of_range_is_refused_in_the_inlined_step(op_calls):
    step = Step(torch.tensor([0.9, 0.5, 0.7]))
    compiled = torch.compile(step, backend="rtp")
    compiled(*_inputs())
    with torch.no_grad():
        step.log_gamma[1] = 0.5  # gamma = e^0.5 > 1
    with pytest.raises(RuntimeError, match=r"gamma values must lie in \[0, 1\]"):
        compiled(*_inputs())
    assert op_calls == []


def test_forced_triton_kernels_keep_the_op(op_calls, monkeypatch):
    """kernels="triton" (how CI runs the kernels on CPU) keeps the op, read at compile time."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    step = Step(torch.tensor([0.9, 0.5, 1.0]))
    compiled = torch.compile(step, backend="rtp", options={"kernels": "triton"})
    inputs = _inputs(K=16, V=16)
    o, s = compiled(*inputs)
    assert op_calls == [1]
    ro, rs = step(*inputs)
    torch.testing.assert_close(o, ro, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, rs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_step_matches_the_op(op_calls, dtype):
    """As the op: the products in float32, o and the state rounded to the input dtype."""
    step = Step(torch.tensor([0.9, 0.5, 1.0]))
    inputs = _inputs(dtype=dtype)
    o, s = torch.compile(step, backend="rtp")(*inputs)
    op_o, op_s = torch.ops.rtp.retention_fwd(
        *inputs[:3], step.log_gamma.exp().detach(), 48**-0.5, inputs[3], "recurrent", 0
    )
    assert op_calls == [1]  # the direct op call above, not the compiled step
    assert o.dtype == dtype
    q, k, v, s0 = (x.double() for x in inputs)
    ro, rs = reference_recurrent(q, k, v, step.log_gamma.detach().double().exp(), 48**-0.5, s0)
    tol = {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(o.double(), ro, **tol)
    torch.testing.assert_close(o.double(), op_o.double(), **tol)
    torch.testing.assert_close(s.double(), rs, **tol)


def test_the_compiled_decode_loop_equals_eager_without_op_calls(op_calls):
    torch.manual_seed(0)
    model = RTPHybridLM(vocab_size=64, dim=32, num_layers=2, num_heads=2, ratio=0.5).eval()
    compiled = torch.compile(model, backend="rtp")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        caches = [model.new_cache(2), model.new_cache(2)]
        outs = [model(ids, cache=caches[0]), compiled(ids, cache=caches[1])]
        prefill_calls = len(op_calls)
        assert prefill_calls >= 1 and all(t == 9 for t in op_calls)
        for _ in range(4):
            token = outs[0][:, -1:].argmax(-1)
            outs = [model(token, cache=caches[0]), compiled(token, cache=caches[1])]
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert len(op_calls) == prefill_calls  # the decode steps ran no op
