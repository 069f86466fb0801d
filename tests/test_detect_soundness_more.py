"""More soundness of detection: a trainable mask table that starts at zero, a chunk step whose
state update does not transpose k, a number computed from the sizes folded into the mask, random
ops known only by their aten tag, and dropouts that are the identity (eval mode). Float64
throughout; compiled results are compared with eager."""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from test_detect import regions as detected
from torch import nn

import rtpcompile
from rtpcompile.detect.graph_view import is_random

H, K = 2, 4


def geo(t: int, g: torch.Tensor) -> torch.Tensor:
    i = torch.arange(t)
    d = i[:, None] - i[None, :]
    return torch.where(d >= 0, g[:, None, None] ** d.clamp(min=0), 0.0)


def qkv(t: int, seed: int = 0, grad: bool = False):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(1, H, t, K, generator=gen, dtype=torch.float64, requires_grad=grad)
        for _ in range(3)
    ]


def regions(model, *inputs, dynamic=False):
    return detected(model, *inputs, dynamic=dynamic, fullgraph=False)


def rel(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


# --- a trainable tensor in the mask that starts at zero ---------------------------------------

T = 8


class Table(nn.Module):
    """A decay mask and a trainable [H, T, T] table (or [H, 1, 1] correction) at ``init``."""

    def __init__(self, kind: str, init: float = 0.0, shape=(H, T, T)):
        super().__init__()
        self.kind = kind
        self.register_buffer("g", torch.tensor([0.9, 0.8], dtype=torch.float64))
        self.bias = nn.Parameter(torch.full(shape, init, dtype=torch.float64))

    def forward(self, q, k, v):
        decay = geo(q.shape[-2], self.g)
        if self.kind == "add_tril":
            m = (decay + self.bias).tril()
        elif self.kind == "exp_gate":
            m = decay * torch.exp(self.bias)
        elif self.kind == "one_plus":
            m = decay * (1 + self.bias)
        elif self.kind == "log_gamma":  # a zero-initialised correction of the log decay
            i = torch.arange(q.shape[-2])
            d = i[:, None] - i[None, :]
            log_g = torch.log(self.g)[:, None, None] + self.bias
            m = torch.where(d >= 0, torch.exp(log_g * d.clamp(min=0)), 0.0)
        elif self.kind == "temperature":  # a zero-initialised per-head log temperature
            m = decay * torch.exp(self.bias)
        return (q @ k.mT * m) @ v


@pytest.mark.parametrize("kind", ["add_tril", "exp_gate", "one_plus"])
@pytest.mark.parametrize("init", [0.0, 1e-13])
def test_a_zero_initialised_trainable_table_in_the_mask_declines(kind, init):
    """At 0 (or too small for a relative move to show) the table looks constant; training moves
    it, and neither the gradient of the table nor the output after a step would be right."""
    (region,) = regions(Table(kind, init), *qkv(T))
    assert not region.claimed
    assert "once the trainable" in region.reason


@pytest.mark.parametrize("kind", ["log_gamma", "temperature"])
def test_zero_initialised_learnable_decays_stay_claimed_with_gradients(kind):
    """A zero-initialised correction that keeps the structure for every value (a log-decay
    offset per head, a per-head temperature) is still claimed; its gradient matches eager."""
    model = Table(kind, shape=(H, 1, 1))
    (region,) = regions(model, *qkv(T))
    assert region.claimed, region.reason
    assert region.row_scale == (kind == "temperature")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="rtp")
    inputs = qkv(T, grad=True)
    want = model(*inputs)
    (want_grad,) = torch.autograd.grad(want.square().sum(), [model.bias])
    got = compiled(*inputs)
    (got_grad,) = torch.autograd.grad(got.square().sum(), [model.bias])
    assert rel(got, want) < 1e-12
    assert rel(got_grad, want_grad) < 1e-10


def test_a_learnable_gamma_parameter_near_one_stays_claimed():
    """The move lowers what it offsets, so a gamma held directly as a parameter stays <= 1."""

    class Direct(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.tensor([0.9999, 0.0], dtype=torch.float64))

        def forward(self, q, k, v):
            return (q @ k.mT * geo(q.shape[-2], self.g.clamp(0.0, 1.0) * 0.5 + 0.5)) @ v

    (region,) = regions(Direct(), *qkv(T))
    assert region.claimed, region.reason


# --- the chunk step ---------------------------------------------------------------------------


class ChunkStep(nn.Module):
    """One chunk: intra-chunk term + cross term from the state + state update."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.register_buffer("gamma", torch.tensor([0.9, 0.8], dtype=torch.float64))
        self.delta = nn.Parameter(torch.zeros(H, 1, 1, dtype=torch.float64))

    def forward(self, q, k, v, state):
        c = q.shape[2]
        log_g = torch.log(self.gamma)[:, None]
        idx = torch.arange(c)
        diff = idx[:, None] - idx[None, :]
        inner = torch.exp(log_g[..., None] * diff.clamp(min=0)) * (diff >= 0)
        cross = (q * torch.exp(log_g * (idx + 1))[..., None]) @ state
        o = (q @ k.transpose(-1, -2) * inner) @ v + cross
        k_decay = torch.exp(log_g * (c - 1 - idx))[..., None]
        state_decay = torch.exp(log_g * c)[..., None]
        if self.variant == "trained_correction":  # zero-initialised, trainable
            state_decay = state_decay * (1 + self.delta)
        if self.variant == "k_not_transposed":  # runs only because K == the chunk length
            update = (k * k_decay) @ v
        else:
            update = (k * k_decay).transpose(-1, -2) @ v
        return o, state_decay * state + update


def _chunk_inputs(chunk: int, dim: int):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, H, chunk, dim, generator=gen, dtype=torch.float64) for _ in "qkv")
    return q, k, v, torch.randn(2, H, dim, dim, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize(
    ("variant", "merged"),
    [("reference", True), ("trained_correction", False), ("k_not_transposed", False)],
)
@pytest.mark.parametrize("dynamic", [False, True])
def test_chunk_step_merges_only_the_chunk_recurrence(variant, merged, dynamic):
    inputs = _chunk_inputs(8, 8)  # K == the chunk length: (k * kd) @ v runs
    model = ChunkStep(variant)
    (region,) = regions(model, *inputs, dynamic=dynamic)
    assert region.claimed, region.reason
    assert (region.written == "chunk step") == merged
    torch._dynamo.reset()
    with torch.no_grad():
        want = torch.cat([x.flatten() for x in model(*inputs)])
        got = torch.compile(model, backend="rtp", dynamic=dynamic)(*inputs)
    assert rel(torch.cat([x.flatten() for x in got]), want) < 1e-12


# --- a number computed from the sizes in the mask ---------------------------------------------


class SizeScaled(nn.Module):
    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.register_buffer("g", torch.tensor([0.9, 0.8], dtype=torch.float64))

    def forward(self, q, k, v):
        t = q.shape[-2]
        decay = geo(t, self.g)
        if self.style == "sym_max":  # 1 at every length up to 1100
            m = decay * max(1.0, t / 1100)
        elif self.style == "tensor_clamp":
            m = decay * torch.tensor(t / 1100, dtype=torch.float64).clamp(min=1.0)
        elif self.style == "sym_min":
            m = decay * min(1.0, 1100 / t)
        elif self.style == "rsqrt":
            m = decay * t**-0.5
        elif self.style == "tensor_rsqrt":
            m = decay * torch.tensor(t, dtype=torch.float64).rsqrt()
        elif self.style == "float_sqrt":  # sym_float and _sym_sqrt nodes
            m = decay * float(t) / math.sqrt(t)
        elif self.style == "shape_only":  # sizes as shapes only
            m = decay * torch.ones(t * t, dtype=torch.float64).view(t, t)
        return (q @ k.mT * m) @ v


@pytest.mark.parametrize("style", ["sym_max", "tensor_clamp", "sym_min"])
def test_a_size_number_with_a_cutoff_in_the_mask_declines_with_a_dynamic_t(style):
    (region,) = regions(SizeScaled(style), *qkv(T), dynamic=True)
    assert not region.claimed
    assert "the proof cannot check at every length" in region.reason


@pytest.mark.parametrize(
    ("style", "row_scale"),
    [("rsqrt", True), ("tensor_rsqrt", True), ("float_sqrt", True), ("shape_only", False)],
)
def test_sizes_as_scales_and_shapes_stay_claimed(style, row_scale):
    """A size read as a value makes the op read the diagonal at run time (a row scale)."""
    (region,) = regions(SizeScaled(style), *qkv(T), dynamic=True)
    assert region.claimed, region.reason
    assert region.row_scale == row_scale


def test_a_size_scale_is_right_past_the_proven_lengths():
    model = SizeScaled("rsqrt")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="rtp", dynamic=True)
    with torch.no_grad():
        for t in (8, 1100):
            inputs = qkv(t)
            assert rel(compiled(*inputs), model(*inputs)) < 1e-12


# --- random ops -------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["geometric_", "log_normal_", "cauchy_", "exponential_"])
def test_a_mask_drawn_with_any_seeded_random_op_declines(op):
    draws = {
        "geometric_": lambda e: e.geometric_(0.95) == 1,
        "log_normal_": lambda e: e.log_normal_(0.0, 0.5) < 2.3,
        "cauchy_": lambda e: e.cauchy_().abs() < 12.7,
        "exponential_": lambda e: e.exponential_() < 3.0,
    }

    class Random(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("g", torch.tensor([0.9, 0.8], dtype=torch.float64))

        def forward(self, q, k, v):
            keep = draws[op](torch.empty(H, T, T, dtype=torch.float64))
            return (q @ k.mT * (geo(T, self.g) * keep)) @ v

    (region,) = regions(Random(), *qkv(T))
    assert not region.claimed
    assert region.reason.startswith("the mask is random")


def test_is_random_reads_the_aten_tag_of_op_overloads():
    graph = fx.Graph()
    x = graph.placeholder("x")
    aten = torch.ops.aten
    seeded = [aten.cauchy_.default, aten.log_normal_, aten.poisson.default, aten.rrelu.default]
    plain = [aten.mul.Tensor, aten.add, aten.tril.default]
    for target in seeded + plain:
        node = graph.call_function(target, (x,))
        assert is_random(node) == (target in seeded), target
    node = graph.call_method("geometric_", (x, 0.5))
    assert is_random(node)


# --- dropouts that are the identity ------------------------------------------------------------


class Dropped(nn.Module):
    def __init__(self, style: str, p: float = 0.5):
        super().__init__()
        self.style = style
        self.p = p
        self.drop = nn.Dropout(p)
        self.register_buffer("g", torch.tensor([0.9, 0.8], dtype=torch.float64))

    def forward(self, q, k, v):
        decay = geo(q.shape[-2], self.g)
        a = q @ k.mT * decay
        if self.style == "module":
            a = self.drop(a)
        elif self.style == "functional":
            a = F.dropout(a, self.p, training=self.training)
        elif self.style == "torch.dropout":
            a = torch.dropout(a, self.p, self.training)
        elif self.style == "on_the_mask":
            a = q @ k.mT * self.drop(decay)
        elif self.style == "after_normaliser":
            a = self.drop(a / a.detach().sum(-1, keepdim=True).abs().clamp(min=1))
        return a @ v


_STYLES = ["module", "functional", "torch.dropout", "on_the_mask", "after_normaliser"]


@pytest.mark.parametrize("style", _STYLES)
@pytest.mark.parametrize("dynamic", [False, True])
def test_an_eval_mode_dropout_is_the_identity(style, dynamic):
    model = Dropped(style).eval()
    (region,) = regions(model, *qkv(T), dynamic=dynamic)
    assert region.claimed, region.reason
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend="rtp", dynamic=dynamic)(*qkv(T))
        assert rel(got, model(*qkv(T))) < 1e-12


@pytest.mark.parametrize("style", _STYLES)
def test_a_training_mode_dropout_still_declines(style):
    (region,) = regions(Dropped(style).train(), *qkv(T))
    assert not region.claimed
    assert "dropout" in region.reason


def test_a_dropout_with_p_zero_is_the_identity_in_training_mode():
    (region,) = regions(Dropped("functional", p=0.0).train(), *qkv(T))
    assert region.claimed, region.reason


def test_explain_lists_eval_dropout_regions_as_claimed():
    report = rtpcompile.explain(Dropped("module").eval(), *qkv(T))
    assert [r.claimed for r in report.regions] == [True]
