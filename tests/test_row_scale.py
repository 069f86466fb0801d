"""The row scale of a row-normalised decay mask (torchscale / syncdoth RetNet: ``mask / sqrt(row
sum)``, so ``M[h,i,j] = c[h,i] gamma_h^(i-j)``) reaches the op's output in float32.

The rewrite used to fold c into q (``q * c`` in q's dtype) before the op. In bfloat16 that
rounds q * c first, and a row whose ``q_i . k_i`` nearly cancels then keeps no correct digit in
what depends on that score alone (dv of the last position), where eager's
``(q @ k^T) * mask`` rounds after the dot product. The scale now multiplies the op's output rows
(the state term and the normaliser's value column included), which is the same function: in
float64 outputs and every gradient (q, k, v and a learnable decay, through gamma and c) equal the
folded form's, in every lowering.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rtpcompile  # noqa: F401  (registers the backend)
from rtpcompile.lowering import reference
from rtpcompile.rewrite import rtp_retention

H, K, V = 2, 8, 12
FORMS = ("parallel", "chunkwise", "recurrent")


class RowNormalised(nn.Module):
    """torchscale's parallel retention on [B, H, T, D] inputs, with a learnable log-decay (so a
    gradient reaches gamma and the row scale)."""

    def __init__(self, normalised: bool = True, heads: int = H):
        super().__init__()
        self.log_decay = nn.Parameter(
            torch.log(1 - 2 ** (-2.0 - torch.arange(heads, dtype=torch.float64)))
        )
        self.normalised = normalised

    def mask(self, T: int, dtype) -> torch.Tensor:
        # NOTE: float64 inputs get a float64 mask (the equality tests), others a float32 one
        decay = self.log_decay if dtype == torch.float64 else self.log_decay.float()
        # NOTE: torchscale's masked_fill(.., inf) spelling has a nan gradient for a learnable decay
        index = torch.arange(T).to(decay)
        causal = torch.tril(torch.ones(T, T).to(decay))
        diff = (index[:, None] - index[None, :]).clamp(min=0)
        mask = torch.exp(diff * decay[:, None, None]) * causal
        return (mask / mask.sum(dim=-1, keepdim=True).sqrt()).to(dtype)

    def forward(self, q, k, v):
        scores = (q @ k.transpose(-1, -2)) * self.mask(q.shape[2], q.dtype)
        if self.normalised:
            scores = scores / scores.detach().sum(dim=-1, keepdim=True).abs().clamp(min=1)
        return scores @ v


def _inputs(T: int, dtype, seed: int = 0, B: int = 2, heads: int = H, k_dim=K, v_dim=V):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((B, heads, T, k_dim), (B, heads, T, k_dim), (B, heads, T, v_dim))
    return [torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def _weight(shape, seed: int) -> torch.Tensor:
    """float64 weights of the loss sum(out * weight)."""
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _grads(fn, model, inputs, weight):
    model.zero_grad(set_to_none=True)
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    (out.double() * weight).sum().backward()
    return (
        [out.detach().double()]
        + [x.grad.double() for x in leaves]
        + [model.log_decay.grad.double()]
    )


def _op_calls(graphs) -> int:
    return sum(1 for gm in graphs for n in gm.graph.nodes if n.target is rtp_retention)


def _row_scaled_op(q, k, v, log_decay, form, folded: bool):
    """The op on a row-normalised decay: c folded into q (the former rewrite) or on the output."""
    T = q.shape[2]
    gamma = log_decay.exp()
    powers = gamma[:, None] ** torch.arange(T, dtype=gamma.dtype)  # [H, T]
    c = powers.cumsum(-1).rsqrt()  # c[h, i] = 1 / sqrt(sum_{j<=i} gamma^(i-j))
    if folded:
        q = q * c[..., None].to(q.dtype)
    o, _ = torch.ops.rtp.retention_fwd(q, k, v, gamma.to(torch.float64), 1.0, None, form, 0, False)
    if not folded:
        o = (o.to(c.dtype) * c[..., None]).to(q.dtype)
    return o


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("T", [1, 63, 65])
def test_output_row_scale_equals_the_folded_one_in_float64(form, T):
    """The op alone: outputs and every gradient (q, k, v, the decay) agree to float64 rounding."""
    log_decay = torch.log(1 - 2 ** (-2.0 - torch.arange(H, dtype=torch.float64)))
    q, k, v = _inputs(T, torch.float64)
    weight = _weight((2, H, T, V), 1)
    runs = []
    for folded in (True, False):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, log_decay)]
        o = _row_scaled_op(*leaves, form, folded)
        (o * weight).sum().backward()
        runs.append([o.detach()] + [x.grad for x in leaves])
    for name, a, b in zip(("o", "dq", "dk", "dv", "dlog_decay"), *runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("normalised", [False, True], ids=["plain", "torchscale-normaliser"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("T", [1, 63, 65])
def test_compiled_row_normalised_mask_matches_eager(inductor_graphs, form, T, normalised):
    """End to end (K != V, a learnable decay): compiled equals eager -- the folded form's exact
    value -- in the output and every gradient, the decay's included."""
    model = RowNormalised(normalised)
    inputs = _inputs(T, torch.float64)
    weight = _weight((2, H, T, V), 2)
    compiled = torch.compile(model, backend="rtp", options={"form": form})
    got = _grads(compiled, model, inputs, weight)
    assert _op_calls(inductor_graphs) >= 1
    want = _grads(model, model, inputs, weight)
    for name, a, b in zip(("o", "dq", "dk", "dv", "dlog_decay"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("form", FORMS)
def test_compiled_row_normalised_mask_on_triton(inductor_graphs, triton_on_cpu, form, dtype):
    """The generated kernels (interpreter): the compiled model's error against the float64
    reference stays within a few times eager's own, per output and gradient."""
    T = 33
    model = RowNormalised(True)
    inputs = _inputs(T, dtype)
    weight = _weight((2, H, T, V), 3)
    compiled = torch.compile(model, backend="rtp", options={"form": form})
    got = _grads(compiled, model, inputs, weight)
    assert _op_calls(inductor_graphs) >= 1
    eager = _grads(model, model, inputs, weight)
    ref = RowNormalised(True).double()
    ref.load_state_dict(model.state_dict())
    want = _grads(ref, ref, [x.double() for x in inputs], weight)
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    for name, a, e, r in zip(("o", "dq", "dk", "dv", "dlog_decay"), got, eager, want, strict=True):
        error, eager_error = ((x - r).abs().max().item() / r.abs().max().item() for x in (a, e))
        assert error <= 3 * eager_error + floor, (name, error, eager_error)


def test_the_float64_reference_is_the_row_scaled_op():
    """reference_parallel (c folded into q, float64) equals the op with c on its output."""
    T = 65
    log_decay = torch.log(1 - 2 ** (-2.0 - torch.arange(H, dtype=torch.float64)))
    q, k, v = _inputs(T, torch.float64)
    gamma = log_decay.exp()
    c = (gamma[:, None] ** torch.arange(T, dtype=torch.float64)).cumsum(-1).rsqrt()
    want = reference.reference_parallel(q * c[..., None], k, v, gamma, 1.0)[0]
    for form in FORMS:
        got = _row_scaled_op(q, k, v, log_decay, form, folded=False)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _cancelling_last_row(T: int, k_dim: int = 64):
    """bfloat16 q, k, v where q_{T-1} . k_{T-1} nearly cancels (|q_i k_i| ~ 1 each)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, T, k_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(1, H, T, k_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(1, H, T, 16, generator=gen, dtype=torch.float64)
    last = (q[..., -1, :] * k[..., -1, :]).sum(-1)
    k[..., -1, -1] -= last / q[..., -1, -1]
    return [x.bfloat16() for x in (q, k, v)]


@pytest.mark.parametrize("T", [8, 65])
def test_bfloat16_row_with_a_cancelling_score_is_as_accurate_as_eager(inductor_graphs, T):
    """dv of the last position hangs on the one score q_{T-1}.k_{T-1} (times c[T-1]): rounding
    q * c to bfloat16 before the dot product lost it (80x eager's error at T = 8); eager rounds
    after it."""
    _check_cancelling_row(inductor_graphs, lambda: RowNormalised(True), T)


def _check_cancelling_row(graphs, make, T: int) -> None:
    """Compiled bf16 dv of the cancelling last row within 2x eager's error (vs float64)."""
    model = make()
    inputs = _cancelling_last_row(T)
    weight = _weight((1, H, T, 16), 4)
    got = _grads(torch.compile(model, backend="rtp"), model, inputs, weight)
    assert _op_calls(graphs) >= 1
    eager = _grads(model, model, inputs, weight)
    ref = make().double()
    ref.load_state_dict(model.state_dict())
    want = _grads(ref, ref, [x.double() for x in inputs], weight)

    def last_dv_error(x):
        a, r = x[3][..., -1, :], want[3][..., -1, :]
        return ((a - r).norm(dim=-1) / r.norm(dim=-1)).max().item()

    error, eager_error = last_dv_error(got), last_dv_error(eager)
    assert error <= 2 * eager_error + 1e-3, (error, eager_error)


class Tempered(nn.Module):
    """Scores times a learnable 0-dim temperature, then a plain (diagonal 1) decay mask."""

    def __init__(self, normalised: str | None = None):
        super().__init__()
        self.log_decay = nn.Parameter(torch.log(1 - 2 ** (-2.0 - torch.arange(H).double())))
        self.temp = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
        self.normalised = normalised

    def forward(self, q, k, v):
        T = q.shape[2]
        decay = self.log_decay if q.dtype == torch.float64 else self.log_decay.float()
        index = torch.arange(T).to(decay)
        diff = (index[:, None] - index[None, :]).clamp(min=0)
        mask = (torch.exp(diff * decay[:, None, None]) * torch.ones(T, T).to(decay).tril()).to(
            q.dtype
        )
        scores = (q @ k.transpose(-1, -2)) * self.temp.to(q.dtype) * mask
        if self.normalised == "sum_abs":
            scores = scores / scores.detach().abs().sum(dim=-1, keepdim=True).clamp(min=1)
        elif self.normalised == "abs_sum":
            scores = scores / scores.detach().sum(dim=-1, keepdim=True).abs().clamp(min=1)
        return scores @ v


@pytest.mark.parametrize("normalised", [None, "sum_abs", "abs_sum"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("T", [1, 65])
def test_a_tensor_temperature_on_the_output_equals_eager(inductor_graphs, form, T, normalised):
    """A 0-dim tensor factor of the scores scales the op's output (it used to be folded into q):
    the same function, gradients of q, k, v, the decay and the temperature included."""
    model = Tempered(normalised)
    inputs = _inputs(T, torch.float64)
    weight = _weight((2, H, T, V), 5)

    def grads(fn):
        model.zero_grad(set_to_none=True)
        out = _grads(fn, model, inputs, weight)
        return [*out, model.temp.grad.double()]

    got = grads(torch.compile(model, backend="rtp", options={"form": form}))
    assert _op_calls(inductor_graphs) >= 1
    want = grads(model)
    names = ("o", "dq", "dk", "dv", "dlog_decay", "dtemp")
    for name, a, b in zip(names, got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")


def test_bfloat16_tensor_temperature_with_a_cancelling_score_is_as_accurate_as_eager(
    inductor_graphs,
):
    """The cancelling-score row of the test above, with the factor a tensor: q * t rounded to
    bfloat16 before the dot product lost it as q * c did."""
    _check_cancelling_row(inductor_graphs, lambda: Tempered().bfloat16(), 8)


class TemperatureBuffer(nn.Module):
    """A per-head temperature buffer on the scores: ones when compiled, changed later."""

    def __init__(self, shape):
        super().__init__()
        self.register_buffer("gamma", torch.tensor([0.9, 0.7, 0.5]))
        self.register_buffer("temp", torch.ones(shape))

    def forward(self, q, k, v):
        T = q.shape[2]
        i = torch.arange(T)
        d = i[:, None] - i[None, :]
        mask = torch.where(d >= 0, self.gamma[:, None, None] ** d.clamp(min=0), 0.0)
        return ((q @ k.transpose(-1, -2)) * self.temp * mask) @ v


# NOTE: the 0-dim case passed before the fix too (a 0-dim factor was already read per call); a guard
@pytest.mark.parametrize(
    "shape, new", [((3, 1, 1), [2.0, 0.5, 3.0]), ((1,), [2.0]), ((), 2.0)], ids=str
)
def test_model_state_that_moves_the_diagonal_is_read_at_run_time(shape, new):
    """A temperature of ones at compile time kept a row scale of 1 after load_state_dict/copy_
    changed it (until 2026-11-24): a silent 0.5-0.6 relative error."""
    torch._dynamo.reset()
    model = TemperatureBuffer(shape)
    compiled = torch.compile(model, backend="rtp")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=g) for _ in range(3))
    compiled(q, k, v)
    assert rtpcompile.explain(model, q, k, v).claimed
    model.load_state_dict({**model.state_dict(), "temp": torch.tensor(new).reshape(shape)})
    want = TemperatureBuffer(shape).double()
    want.load_state_dict(model.state_dict())
    ref = want(q.double(), k.double(), v.double())
    torch.testing.assert_close(compiled(q, k, v).double(), ref, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


class MaskTimesTemperature(nn.Module):
    """A precomputed decay mask buffer times a temperature buffer of ones."""

    def __init__(self, T):
        super().__init__()
        i = torch.arange(T)
        d = i[:, None] - i[None, :]
        decay = torch.tensor([0.9, 0.7, 0.5])[:, None, None] ** d.clamp(min=0)
        self.register_buffer("mask", torch.where(d >= 0, decay, 0.0))
        self.register_buffer("temp", torch.ones(3, 1, 1))

    def forward(self, q, k, v):
        return ((q @ k.transpose(-1, -2)) * self.temp * self.mask) @ v


def test_a_temperature_beside_a_precomputed_mask_buffer_is_read_at_run_time():
    """The first check moved every state input together and re-fitted: the moved mask buffer
    is no decay, the fit failed, and the temperature's change was ignored again (same day)."""
    torch._dynamo.reset()
    model = MaskTimesTemperature(16)
    compiled = torch.compile(model, backend="rtp")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=g) for _ in range(3))
    compiled(q, k, v)
    model.temp.copy_(torch.tensor([2.0, 0.5, 3.0]).reshape(3, 1, 1))
    torch.testing.assert_close(compiled(q, k, v), model(q, k, v), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


class HeadGate(nn.Module):
    """Heads switched on and off by model state: a bool buffer, or a float gate thresholded."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.register_buffer("gamma", torch.tensor([0.9, 0.7, 0.5]))
        if kind == "bool":
            self.register_buffer("on", torch.ones(3, dtype=torch.bool))
        else:
            self.register_buffer("gate", torch.ones(3))

    def forward(self, q, k, v):
        T = q.shape[2]
        i = torch.arange(T)
        d = i[:, None] - i[None, :]
        mask = torch.where(d >= 0, self.gamma[:, None, None] ** d.clamp(min=0), 0.0)
        on = self.on if self.kind == "bool" else self.gate >= 0.5
        return ((q @ k.transpose(-1, -2)) * (mask * on[:, None, None])) @ v


@pytest.mark.parametrize("kind", ["bool", "threshold"])
def test_state_through_a_step_is_read_at_run_time(kind):
    """A small move of a bool buffer or across a threshold changes nothing, so the diagonal check
    saw no change and the heads switched off later stayed on (same day: 0.9 relative error)."""
    torch._dynamo.reset()
    model = HeadGate(kind)
    compiled = torch.compile(model, backend="rtp")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=g) for _ in range(3))
    compiled(q, k, v)
    with torch.no_grad():
        (model.on if kind == "bool" else model.gate)[1] = 0
    torch.testing.assert_close(compiled(q, k, v), model(q, k, v), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
