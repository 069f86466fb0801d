"""False claims found 2026-11-25 in the rewrite's assumptions rather than the mask proof: a
normaliser before an einsum's mask, writes between a step's output and its new state, a
written score factor, recurrent read-outs that keep a dim or broadcast q or the state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rtpcompile.backend as backend

B, H, C, K, V = 2, 3, 7, 4, 5


pytestmark = pytest.mark.usefixtures("fresh_compile")


def _gamma():
    return torch.tensor([0.9, 0.8, 0.7])


def _decay(t: int, g: torch.Tensor) -> torch.Tensor:
    i = torch.arange(t, dtype=torch.float32)
    d = i[:, None] - i[None, :]
    return torch.where(d >= 0, g.view(-1, 1, 1) ** d.clamp(min=0), torch.zeros(()))


def _inputs(*shapes, grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen).requires_grad_(grad) for s in shapes]


def _matches_float64(model, inputs, tol=2e-5):
    """Every output and input gradient of the compiled model against float64 eager."""
    ref = copy.deepcopy(model).double()
    inputs64 = [x.detach().double().requires_grad_(x.requires_grad) for x in inputs]
    want, got = ref(*inputs64), torch.compile(model, backend="rtp", dynamic=False)(*inputs)
    want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol)
    if any(x.requires_grad for x in inputs):
        sum((w * torch.linspace(0.5, 1.5, w.numel()).view_as(w)).sum() for w in want).backward()
        sum((g * torch.linspace(0.5, 1.5, g.numel()).view_as(g)).sum() for g in got).backward()
        for x, x64 in zip(inputs, inputs64, strict=True):
            torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol)


class NormaliseThenMask(nn.Module):
    """torchscale's normaliser on the raw scores, the decay applied afterwards as the value
    einsum's third operand: the op would normalise the masked scores instead."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.register_buffer("g", _gamma())

    def forward(self, q, k, v):
        s = q @ k.transpose(-1, -2)
        if self.kind == "abs_sum":
            a = s / s.detach().sum(-1, keepdim=True).abs().clamp(min=1)
        else:
            a = s / s.detach().abs().sum(-1, keepdim=True).clamp(min=1)
        return torch.einsum("bhqk,bhkv,hqk->bhqv", a, v, _decay(q.shape[-2], self.g))


@pytest.mark.parametrize("kind", ["abs_sum", "sum_abs"])
def test_a_normaliser_before_the_einsum_mask_is_declined(kind):
    """Claimed until the fix: output error 5.7 on outputs of 12."""
    _matches_float64(NormaliseThenMask(kind), _inputs((B, H, C, K), (B, H, C, K), (B, H, C, V)))
    assert backend.counters["regions_claimed"] == 0


class ChunkStep(nn.Module):
    """One chunk per call, with something written in place between the output and the state
    update: the state itself (``state.mul_(cd).add_(...)``), or k."""

    def __init__(self, write: str):
        super().__init__()
        self.write = write
        self.register_buffer("gamma", _gamma())

    def forward(self, q, k, v, state):
        c = q.shape[2]
        log_g = torch.log(self.gamma)[:, None]
        idx = torch.arange(c)
        diff = idx[:, None] - idx[None, :]
        inner = torch.exp(log_g[..., None] * diff.clamp(min=0)) * (diff >= 0)
        q_decay = torch.exp(log_g * (idx + 1))[..., None]
        k_decay = torch.exp(log_g * (c - 1 - idx))[..., None]
        chunk_decay = torch.exp(log_g * c)[..., None]
        o = (q @ k.transpose(-1, -2) * inner) @ v + (q * q_decay) @ state
        if self.write == "state":
            new = state.mul_(chunk_decay).add_((k * k_decay).transpose(-1, -2) @ v)
        elif self.write == "k":
            k.mul_(0.5)
            new = chunk_decay * state + (k * k_decay).transpose(-1, -2) @ v
        else:
            new = chunk_decay * state + (k * k_decay).transpose(-1, -2) @ v
        return o, new


@pytest.mark.parametrize("write", ["state", "k"])
def test_a_write_between_a_chunk_step_s_output_and_its_new_state_declines(write):
    """The op computes the output and the new state at once, where the output was: it missed
    the write (the caller's state was left unchanged; the new state was off by 3.6 of 3.6)."""
    q, k, v, state = _inputs((B, H, C, K), (B, H, C, K), (B, H, C, V), (B, H, K, V), grad=False)
    want = ChunkStep(write)(q, k.clone(), v, state.clone())
    k_in, state_in = k.clone(), state.clone()
    got = torch.compile(ChunkStep(write), backend="rtp", dynamic=False)(q, k_in, v, state_in)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    if write == "state":
        torch.testing.assert_close(state_in, want[1])  # NOTE: updated in place, as in eager
    # NOTE: the merged step is declined; its parallel part stays claimed (since 2026-11-25)
    assert backend.counters["regions_claimed"] == 1


def test_a_chunk_step_with_a_state_broadcast_over_the_batch_compiles():
    """The op takes one state per batch row: a [1, H, K, V] state keeps the chunk step apart
    (its parallel part is claimed); the merged step crashed the compile."""
    inputs = _inputs((B, H, C, K), (B, H, C, K), (B, H, C, V), (1, H, K, V))
    _matches_float64(ChunkStep("none"), inputs)
    assert backend.counters["regions_claimed"] == 1


class ScaledThenWritten(nn.Module):
    """A 0-d factor of the scores written in place inside the region."""

    def __init__(self):
        super().__init__()
        self.register_buffer("g", _gamma())

    def forward(self, q, k, v, t):
        a = q @ k.transpose(-1, -2) * t * _decay(q.shape[-2], self.g)
        t.mul_(2)
        return a @ v


def test_a_score_factor_written_inside_the_region_declines():
    q, k, v = _inputs((B, H, C, K), (B, H, C, K), (B, H, C, V), grad=False)
    want = ScaledThenWritten()(q, k, v, torch.tensor(1.5))
    got = torch.compile(ScaledThenWritten(), backend="rtp")(q, k, v, torch.tensor(1.5))
    torch.testing.assert_close(got, want)  # NOTE: was exactly twice eager
    assert backend.counters["regions_claimed"] == 0


class RecurrentStep(nn.Module):
    """S' = g S + k ⊗ v; o = Σ_k q S' (the broadcast spelling), with a read-out variant."""

    def __init__(self, read: str):
        super().__init__()
        self.read = read
        self.register_buffer("g", _gamma().view(H, 1, 1))

    def forward(self, q, k, v, state):
        new = self.g * state + k.unsqueeze(-1) * v.unsqueeze(-2)
        if self.read == "keepdim":
            o = (q.unsqueeze(-1) * new).sum(dim=-2, keepdim=True)  # [B, H, 1, V]
            return o.transpose(1, 2).reshape(q.shape[0], -1), new
        if self.read == "no dim":
            return (q.unsqueeze(-1) * new).sum(), new
        return (q.unsqueeze(-1) * new).sum(-2), new


@pytest.mark.parametrize(
    "read, q_shape",
    [("keepdim", (B, H, K)), ("no dim", (B, H, K)), ("sum", (H, K)), ("sum", (2, B, H, K))],
)
def test_recurrent_read_outs_the_op_cannot_express_decline(read, q_shape, recwarn):
    """keepdim lost its dim (values then permuted by the head merge, error 7.6 of 7.0); a q
    shared over the batch kept batch row 0 only; a q with an extra dim crashed the compile;
    a sum without dims made detection raise (a fallback warning)."""
    inputs = _inputs(q_shape, (B, H, K), (B, H, V), (B, H, K, V))
    _matches_float64(RecurrentStep(read), inputs)
    assert backend.counters["regions_claimed"] == 0
    assert backend.counters["fallbacks"] == 0
    assert not [w for w in recwarn if "rtpcompile" in str(w.message)]


def test_the_usual_recurrent_read_out_is_still_claimed():
    _matches_float64(RecurrentStep("sum"), _inputs((B, H, K), (B, H, K), (B, H, V), (B, H, K, V)))
    assert backend.counters["regions_claimed"] == 1


class FrozenPattern(nn.Module):
    """The scores (an attention pattern) computed under no_grad, the value product with grad."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.register_buffer("g", _gamma())

    def forward(self, q, k, v):
        if self.how == "no_grad":
            with torch.no_grad():
                a = q @ k.transpose(-1, -2) * _decay(q.shape[-2], self.g)
        else:
            torch.set_grad_enabled(False)
            s = q @ k.transpose(-1, -2)
            torch.set_grad_enabled(True)
            a = s * _decay(q.shape[-2], self.g)
        return a @ v


@pytest.mark.parametrize("how", ["no_grad", "set_grad_enabled"])
def test_a_region_partly_under_no_grad_declines(how):
    """The op ran at the value product under grad mode: q and k got gradients eager leaves
    None (a frozen pattern trained silently)."""
    inputs = _inputs((B, H, C, K), (B, H, C, K), (B, H, C, V))
    out = torch.compile(FrozenPattern(how), backend="rtp", dynamic=False)(*inputs)
    out.sum().backward()
    q, k, v = inputs
    assert q.grad is None and k.grad is None and v.grad is not None
    assert backend.counters["regions_claimed"] == 0


class StepWithFrozenUpdate(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("g", _gamma().view(H, 1, 1))

    def forward(self, q, k, v, state):
        with torch.no_grad():
            new = self.g * state + k.unsqueeze(-1) * v.unsqueeze(-2)
        return (q.unsqueeze(-1) * new).sum(-2), new


def test_a_recurrent_step_with_its_update_under_no_grad_declines():
    """The op sat at the new state, inside the no-grad span, and its read-out lost q's
    gradient (eager gives one)."""
    inputs = _inputs((B, H, K), (B, H, K), (B, H, V), (B, H, K, V))
    o, _ = torch.compile(StepWithFrozenUpdate(), backend="rtp", dynamic=False)(*inputs)
    assert o.requires_grad
    o.sum().backward()
    assert inputs[0].grad is not None and inputs[1].grad is None
    assert backend.counters["regions_claimed"] == 0


class NarrowScores(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.register_buffer("g", _gamma())

    def forward(self, q, k, v):
        if self.how == "half scores":
            s = (q @ k.transpose(-1, -2)).half().float()
        else:
            s = (q.bfloat16() @ k.bfloat16().transpose(-1, -2)).float()
        return (s * _decay(q.shape[-2], self.g)) @ v


@pytest.mark.parametrize("how", ["half scores", "bfloat16 product"])
def test_scores_cast_to_a_narrower_dtype_decline(how):
    """A narrowing cast inside the region: eager rounds there, the op kept float32 (3.5e-4
    relative off). A product computed in bfloat16 and widened is claimed, as a recurrent step's
    is (docs/zoo.md): the op computes it in float32, closer to float64 than eager."""
    inputs = _inputs((B, H, C, K), (B, H, C, K), (B, H, C, V), grad=False)
    model = NarrowScores(how)
    with torch.no_grad():
        got = torch.compile(model, backend="rtp", dynamic=False)(*inputs)
        exact = copy.deepcopy(model).double()(*[x.double() for x in inputs])
    if how == "half scores":
        assert backend.counters["regions_claimed"] == 0
    else:
        assert backend.counters["regions_claimed"] == 1
        q, k, v = (x.double() for x in inputs)  # NOTE: no bfloat16 rounding at all
        want = (q @ k.transpose(-1, -2) * _decay(C, _gamma()).double()) @ v
        assert (got.double() - want).abs().max() < (exact - want).abs().max() + 1e-6


class Vmapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("g", _gamma())

    def forward(self, q, k, v):
        def one(q, k, v):  # NOTE: one example, [H, T, D]
            return (q @ k.transpose(-1, -2) * _decay(q.shape[1], self.g)) @ v

        return torch.vmap(one)(q, k, v)


def test_retention_inside_vmap_is_claimed_and_trains():
    """The glue's autograd.Function had no setup_context, which functorch needs: Inductor's
    compile failed (BackendCompilerFailed), with or without grad."""
    _matches_float64(Vmapped(), _inputs((B, H, C, K), (B, H, C, K), (B, H, C, V)))
    assert backend.counters["regions_claimed"] == 1


class FrozenValues(nn.Module):
    """v from a frozen layer under no_grad, between the scores and the value product: no node
    of the region runs under another mode, so it is claimed."""

    def __init__(self):
        super().__init__()
        self.register_buffer("g", _gamma())
        self.lin = nn.Linear(V, V)

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) * _decay(q.shape[-2], self.g)
        with torch.no_grad():
            v = self.lin(v)
        return scores @ v


def test_a_no_grad_span_outside_the_region_s_nodes_does_not_decline():
    q, k, v = _inputs((B, H, C, K), (B, H, C, K), (B, H, C, V))
    model = FrozenValues()
    want = model(q, k, v)
    got = torch.compile(model, backend="rtp", dynamic=False)(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert q.grad is not None and v.grad is None
    assert backend.counters["regions_claimed"] == 1
