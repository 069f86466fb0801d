"""The rtp backend: rewrite, cache tag, fallback/strict/verify, dynamic shapes, training.

Most tests replace Inductor's ``compile_fx`` by a stub that runs the rewritten graph eagerly
(fast, and it lets the test inspect what Inductor would receive); one test compiles for real.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import rtpcompile.backend as backend
from rtpcompile.rewrite import rtp_retention

B, H, K, V = 2, 3, 8, 12


def gamma_of() -> torch.Tensor:
    return 1.0 - 2.0 ** (-2.0 - torch.arange(H, dtype=torch.float32))


class Retention(nn.Module):
    """Textbook retention with an optional torchscale-style normaliser and learnable decay."""

    def __init__(self, normalised: bool = False, learnable: bool = False):
        super().__init__()
        self.normalised = normalised
        logit = torch.logit(gamma_of())
        if learnable:
            self.decay_logit = nn.Parameter(logit)
        else:
            self.register_buffer("decay_logit", logit)

    def forward(self, q, k, v):
        T = q.shape[2]
        idx = torch.arange(T, device=q.device)
        diff = idx[:, None] - idx[None, :]
        log_gamma = torch.nn.functional.logsigmoid(self.decay_logit)[:, None, None]
        mask = torch.exp(log_gamma * diff.clamp(min=0)) * (diff >= 0)
        if self.normalised:
            mask = mask / mask.sum(-1, keepdim=True).sqrt()
        a = q @ k.transpose(-1, -2) * K**-0.5 * mask
        if self.normalised:
            a = a / a.detach().sum(-1, keepdim=True).abs().clamp(min=1)
        return a @ v


def inputs(T: int, seed: int = 0, grad: bool = False):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, K, generator=gen) for _ in range(2))
    v = torch.randn(B, H, T, V, generator=gen)
    return tuple(x.requires_grad_(grad) for x in (q, k, v))


@pytest.fixture
def inductor(monkeypatch):
    """Replace compile_fx by an eager stub; records (graph module, cache_key_tag) per call."""
    seen = []

    def fake_compile_fx(gm, example_inputs, **kwargs):
        seen.append((gm, torch.compiler.config.cache_key_tag))
        return gm.forward

    import torch._inductor.compile_fx as cfx

    monkeypatch.setattr(cfx, "compile_fx", fake_compile_fx)
    torch._dynamo.reset()
    backend.counters.clear()
    yield seen
    torch._dynamo.reset()


def op_calls(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is rtp_retention)


@pytest.mark.parametrize("normalised", [False, True])
def test_rewritten_graph_has_one_op_per_region_and_matches_eager(inductor, normalised):
    model = Retention(normalised)
    compiled = torch.compile(model, backend="rtp", dynamic=True, fullgraph=True)
    x = inputs(13)
    torch.testing.assert_close(compiled(*x), model(*x), rtol=1e-4, atol=1e-5)
    (gm, tag), *_ = inductor
    assert op_calls(gm) == 1
    assert not any("matmul" in str(n.target) for n in gm.graph.nodes)
    assert tag == backend.cache_tag() and tag.startswith(backend.source_hash() + "-kernels=")


def test_sum_of_absolutes_normaliser_matches_eager(inductor):
    class SumAbs(Retention):
        def forward(self, q, k, v):
            T = q.shape[2]
            idx = torch.arange(T)
            diff = idx[:, None] - idx[None, :]
            mask = torch.where(diff >= 0, gamma_of()[:, None, None] ** diff.clamp(min=0), 0.0)
            a = q @ k.mT * mask
            return a / a.detach().abs().sum(-1, keepdim=True).clamp(min=2) @ v

    model = SumAbs()
    compiled = torch.compile(model, backend="rtp", dynamic=True, options={"verify": True})
    x = inputs(9, grad=True)
    out, ref = compiled(*x), model(*x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    got = torch.autograd.grad(out.sum(), x)
    want = torch.autograd.grad(ref.sum(), x)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert op_calls(inductor[0][0]) == 1


def test_training_gradients_equal_eager(inductor):
    model = Retention(normalised=True, learnable=True)
    compiled = torch.compile(model, backend="rtp", dynamic=True, fullgraph=True)
    x = inputs(11, grad=True)
    out = compiled(*x)
    grads = torch.autograd.grad(out.square().sum(), [*x, model.decay_logit])
    ref = model(*x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [*x, model.decay_logit])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_changing_T_does_not_recompile_after_the_first_dynamic_recompile(inductor):
    model = Retention()
    compiled = torch.compile(model, backend="rtp", fullgraph=True)
    for T in (13, 9, 21, 5, 30):
        x = inputs(T)
        torch.testing.assert_close(compiled(*x), model(*x), rtol=1e-4, atol=1e-5)
    # the first call compiles static shapes, the second a dynamic graph that serves all others
    assert len(inductor) == 2 and backend.counters["graphs"] == 2
    assert all(op_calls(gm) == 1 for gm, _ in inductor)


def test_buffer_change_is_seen_without_recompiling(inductor):
    model = Retention()
    compiled = torch.compile(model, backend="rtp", dynamic=True)
    compiled(*inputs(9))
    model.decay_logit.sub_(1.0)  # not guarded by Dynamo: gamma must be read at run time
    x = inputs(9, seed=1)
    torch.testing.assert_close(compiled(*x), model(*x), rtol=1e-4, atol=1e-5)
    assert len(inductor) == 1


def test_exception_in_detection_falls_back_with_one_warning(inductor, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("detector exploded")

    monkeypatch.setattr(backend, "find_regions_split", boom)
    model = Retention()
    compiled = torch.compile(model, backend="rtp", dynamic=True)
    x = inputs(7)
    with pytest.warns(UserWarning, match="detector exploded") as record:
        out = compiled(*x)
    assert len([w for w in record if "rtpcompile" in str(w.message)]) == 1
    torch.testing.assert_close(out, model(*x))
    assert op_calls(inductor[0][0]) == 0 and backend.counters["fallbacks"] == 1


def test_strict_raises_instead_of_falling_back(inductor, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("detector exploded")

    monkeypatch.setattr(backend, "find_regions_split", boom)
    compiled = torch.compile(Retention(), backend="rtp", options={"strict": True})
    with pytest.raises(Exception, match="detector exploded"):
        compiled(*inputs(7))
    assert not inductor


def test_verify_passes_on_a_correct_rewrite(inductor):
    model = Retention(normalised=True)
    compiled = torch.compile(model, backend="rtp", dynamic=True, options={"verify": True})
    x = inputs(10)
    torch.testing.assert_close(compiled(*x), model(*x), rtol=1e-4, atol=1e-5)


def test_verify_raises_with_the_region_when_the_op_differs(inductor, monkeypatch):
    import rtpcompile.rewrite as rewrite

    real = rewrite._decay

    def wrong_decay(*args):
        gamma, row = real(*args)
        return gamma * 0.5, row

    monkeypatch.setattr(rewrite, "_decay", wrong_decay)
    compiled = torch.compile(Retention(), backend="rtp", dynamic=True, options={"verify": True})
    with pytest.raises(RuntimeError, match=r"rtp verify: region at .*test_backend.py:\d+"):
        compiled(*inputs(10))


class _Stateful(Retention):
    """Retention between two writes to model state: a position offset the forward advances
    and a training-mode batch norm (running statistics written inside ``batch_norm``)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("offset", torch.zeros(()))
        self.norm = nn.BatchNorm1d(V)

    def forward(self, q, k, v):
        self.offset += q.shape[2]
        o = super().forward(q, k, v)
        return self.norm(o.flatten(0, 2)) * self.offset


def test_verify_leaves_model_state_as_one_call_does(inductor):
    """The checks run the graph eagerly before the compiled call: its in-place writes ran
    twice (offset 26 after one call of 13 tokens, outputs off by 238; batch norm statistics
    updated twice) until 2026-11-25."""
    torch.manual_seed(0)
    model, reference = _Stateful(), _Stateful()
    compiled = torch.compile(model, backend="rtp", options={"verify": True})
    x = inputs(13)
    torch.testing.assert_close(compiled(*x), reference(*x), rtol=1e-4, atol=1e-4)
    assert model.offset.item() == reference.offset.item() == 13
    assert model.norm.num_batches_tracked.item() == 1
    torch.testing.assert_close(model.norm.running_mean, reference.norm.running_mean)
    assert backend.counters["regions_claimed"] >= 1


def test_verify_compares_the_region_output_as_the_region_left_it(inductor):
    """A write into the region's output after it (``o.mul_(2)``) and a NaN input (NaN where
    the original has it) failed a correct region until 2026-11-25."""

    class Scaled(Retention):
        def forward(self, q, k, v):
            o = super().forward(q, k, v)
            o.mul_(2.0)
            return o

    model = Scaled()
    compiled = torch.compile(model, backend="rtp", options={"verify": True})
    x = inputs(10)
    torch.testing.assert_close(compiled(*x), model(*x), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
    q, k, v = inputs(10)
    q[0, 0, 4, 1] = float("nan")
    compiled = torch.compile(Retention(), backend="rtp", options={"verify": True})
    got, want = compiled(q, k, v), Retention()(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert got.isnan().any()


def test_timing_counters_are_exposed(inductor):
    torch.compile(Retention(), backend="rtp", dynamic=True)(*inputs(8))
    for key in ("detect_seconds", "rewrite_seconds", "compile_seconds"):
        assert backend.counters[key] > 0
    assert backend.counters["detect_seconds"] < backend.counters["compile_seconds"]
    assert backend.counters["regions_claimed"] == 1


def test_recurrent_step_is_rewritten(inductor):
    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("gamma", gamma_of())

        def forward(self, q, k, v, state):
            state = self.gamma[:, None, None] * state + k.transpose(-1, -2) @ v
            return q @ state * K**-0.5, state

    model = Step()
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(B, H, 1, K, generator=gen) for _ in range(2))
    v, s = torch.randn(B, H, 1, V, generator=gen), torch.randn(B, H, K, V, generator=gen)
    compiled = torch.compile(model, backend="rtp", dynamic=True, fullgraph=True)
    for got, want in zip(compiled(q, k, v, s), model(q, k, v, s), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert op_calls(inductor[0][0]) == 1


def test_a_region_returns_a_state_only_when_one_came_in(inductor, monkeypatch):
    """A region without a state has no reader for a final state: its op call asks for none
    (``output_final_state=False``), so no kernel computes one."""
    from test_detect import ChunkStep

    from rtpcompile.lowering import dispatch

    asked = []
    real = dispatch.forward
    monkeypatch.setattr(
        dispatch, "forward", lambda *a, **kw: asked.append(kw["state_out"]) or real(*a, **kw)
    )
    torch.compile(Retention(), backend="rtp", dynamic=True, fullgraph=True)(*inputs(9))
    assert asked == [False]
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(B, H, 6, K, generator=gen) for _ in range(2))
    v, s = torch.randn(B, H, 6, V, generator=gen), torch.randn(B, H, K, V, generator=gen)
    torch.compile(ChunkStep(), backend="rtp", dynamic=True, fullgraph=True)(q, k, v, s)
    assert asked == [False, True]


def test_chunk_step_output_and_state_match_eager(inductor):
    from test_detect import ChunkStep

    model = ChunkStep()
    compiled = torch.compile(model, backend="rtp", dynamic=True, fullgraph=True)
    for T in (7, 5):
        gen = torch.Generator().manual_seed(T)
        q, k = (torch.randn(B, H, T, K, generator=gen) for _ in range(2))
        v, s = torch.randn(B, H, T, V, generator=gen), torch.randn(B, H, K, V, generator=gen)
        for got, want in zip(compiled(q, k, v, s), model(q, k, v, s), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    (gm, _), *_ = inductor
    assert op_calls(gm) == 1 and backend.counters["regions_claimed"] == 1


@pytest.mark.parametrize("cross_scale", [None, 0.5])
def test_scaled_chunk_step_equals_eager_with_gradients(cross_scale):
    """Merged (same scale) or not (the cross term scaled differently), float64 outputs, state
    and gradients equal eager."""
    from test_detect import ScaledChunkStep

    torch._dynamo.reset()
    model = ScaledChunkStep(0.25, cross_scale).double()
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(B, H, 7, K, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, 7, V, generator=gen, dtype=torch.float64)
    s = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    leaves = [x.requires_grad_() for x in (q, k, v, s)]
    got = torch.compile(model, backend="rtp", fullgraph=True)(*leaves)
    want = model(*leaves)
    g1 = torch.autograd.grad(sum(x.sin().sum() for x in got), leaves)
    g2 = torch.autograd.grad(sum(x.sin().sum() for x in want), leaves)
    for a, b in zip((*got, *g1), (*want, *g2), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_with_inductor_dynamic_fullgraph_training():
    """The real pipeline: Inductor, dynamic shapes, full graph, gradients, several T."""
    torch._dynamo.reset()
    backend.counters.clear()
    model = Retention(normalised=True, learnable=True)
    compiled = torch.compile(model, backend="rtp", dynamic=True, fullgraph=True)
    for T in (13, 7):  # NOTE: not 12 = V, or duck sizing ties T to V and recompiles
        x = inputs(T, grad=True)
        out = compiled(*x)
        grads = torch.autograd.grad(out.sum(), [*x, model.decay_logit])
        ref = model(*x)
        ref_grads = torch.autograd.grad(ref.sum(), [*x, model.decay_logit])
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert backend.counters["graphs"] == 1 and backend.counters["regions_claimed"] == 1
    torch._dynamo.reset()


class MethodAfterRegion(Retention):
    """The region's output feeds a tensor method, as a block's ``o.transpose(1, 2)`` does."""

    def forward(self, q, k, v):
        return super().forward(q, k, v).transpose(1, 2).contiguous()


_CACHE_SWITCHES = ("TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE")


@pytest.mark.parametrize("model_class", [Retention, MethodAfterRegion])
def test_aot_autograd_cache_serves_a_rewritten_graph(monkeypatch, tmp_path, model_class):
    """A graph holding the rtp glue is stored by AOTAutograd's cache and served to a fresh
    compile (the glue was an unknown function, so every compile bypassed it; and a method call
    on the op's output, whose node had no example value, bypassed it too)."""
    from torch._dynamo.utils import counters as dynamo_counters

    # NOTE: these variables force the caches' configs (env_name_force): config.patch cannot undo
    forced_off = [n for n in _CACHE_SWITCHES if os.environ.get(n, "1") == "0"]
    if forced_off:
        pytest.skip(f"{', '.join(forced_off)}=0 in the environment turns the caches off")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = model_class(learnable=True)
    dynamo_counters.clear()
    outs = []
    # NOTE: config.patch, not monkeypatch: a monkeypatched torch config attribute is not restored
    with torch._inductor.config.patch(fx_graph_cache=True):
        for _ in range(2):
            torch._dynamo.reset()
            x = inputs(13, seed=1, grad=True)
            out = torch.compile(model, backend="rtp", dynamic=True)(*x)
            outs.append((out, torch.autograd.grad(out.sum(), [*x, model.decay_logit])))
    aot = dict(dynamo_counters["aot_autograd"])
    assert aot.get("autograd_cache_hit") == 1 and not aot.get("autograd_cache_bypass"), aot
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    torch._dynamo.reset()


def test_the_caches_do_not_serve_a_step_traced_under_another_rtp_kernels(monkeypatch, tmp_path):
    """The glue decides a one-token CPU step's lowering from ``RTP_KERNELS`` when AOTAutograd
    traces it: the op under "triton", Inductor's own ops otherwise. A graph cached under one was
    served under the other (the variable was in neither cache's key), so a CI job forcing the
    kernels ran aten without knowing it."""
    pytest.importorskip("triton", reason="the Triton kernels need triton")
    from torch._dynamo.utils import counters as dynamo_counters

    from rtpcompile.lowering import custom_ops, dispatch, plan

    forced_off = [n for n in _CACHE_SWITCHES if os.environ.get(n, "1") == "0"]
    if forced_off:
        pytest.skip(f"{', '.join(forced_off)}=0 in the environment turns the caches off")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("RTP_KERNELS", raising=False)
    calls = []
    real = custom_ops._forward
    monkeypatch.setattr(custom_ops, "_forward", lambda *a: calls.append(1) or real(*a))
    model, x = Retention(), inputs(1, seed=1)
    outs = []
    with torch._inductor.config.patch(fx_graph_cache=True), torch.no_grad():
        for kernels in (None, "triton", None):
            if kernels:
                monkeypatch.setenv("RTP_KERNELS", kernels)
            else:
                monkeypatch.delenv("RTP_KERNELS", raising=False)
            dispatch._kernels_package.cache_clear()
            plan.reset()
            torch._dynamo.reset()
            dynamo_counters.clear()
            calls.clear()
            outs.append(torch.compile(model, backend="rtp")(*x))
            assert len(calls) == (kernels == "triton"), (kernels, calls)
    aot = dict(dynamo_counters["aot_autograd"])
    assert aot.get("autograd_cache_hit") == 1, aot  # the third compile reuses the first's graph
    want = model(*(t.double() for t in x))
    for out in outs:
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_a_constant_score_scale_is_applied_after_the_product_in_16_bit(inductor):
    """``(q @ k^T) * s`` rounds after the dot product; folding s into a bfloat16 q first loses
    the digits that cancel in a small q.k (the scale now goes to the op, in float32)."""

    class Scaled(nn.Module):
        def forward(self, q, k, v):
            T = q.shape[2]
            idx = torch.arange(T)
            diff = idx[:, None] - idx[None, :]
            mask = torch.where(diff >= 0, 0.9 ** diff.clamp(min=0).float(), 0.0)
            return ((q @ k.mT) * 0.35355339 * mask.to(q.dtype)) @ v

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 64, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 64, generator=gen, dtype=torch.float64)
    k[..., -1] -= (q * k).sum() / q[..., -1]  # q . k = 0 up to rounding, |q_i k_i| ~ 1
    v = torch.randn(1, 1, 1, 8, generator=gen, dtype=torch.float64)
    q, k, v = (x.bfloat16() for x in (q, k, v))
    want = Scaled()(*(x.double() for x in (q, k, v)))
    got = torch.compile(Scaled(), backend="rtp", dynamic=False)(q, k, v)
    eager = Scaled()(q, k, v)
    assert op_calls(inductor[0][0]) == 1
    error, eager_error = ((x.double() - want).abs().max().item() for x in (got, eager))
    assert error <= 2 * eager_error + 1e-6, (error, eager_error)
