"""rtpcompile.explain: the report's rows, with where/form/heads/dims/decay/lowering/reason."""

from __future__ import annotations

import pytest
import torch
from test_backend import Retention
from test_backend import inputs as retention_inputs
from torch import nn

import rtpcompile
from rtpcompile.explain import Report, explain

B, H, K, V = 2, 4, 8, 6


class TwoLayers(nn.Module):
    """One retention layer (claimed) and one look-alike with an input padding mask (declined)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("gamma", 1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float32)))

    def decay(self, T):
        idx = torch.arange(T)
        diff = idx[:, None] - idx[None, :]
        return torch.where(diff >= 0, self.gamma[:, None, None] ** diff.clamp(min=0), 0.0)

    def forward(self, q, k, v, pad):
        mask = self.decay(q.shape[2])
        out = (q @ k.transpose(-1, -2) * mask) @ v
        weird = (q @ k.transpose(-1, -2) * mask * pad[:, None, None, :]) @ out
        return weird


class Step(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("gamma", torch.full((H,), 0.9))

    def forward(self, q, k, v, state):
        state = self.gamma.view(1, -1, 1, 1) * state + torch.einsum("bhk,bhv->bhkv", k, v)
        return torch.einsum("bhk,bhkv->bhv", q, state), state


def _inputs(T=19):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, H, T, K, generator=gen) for _ in range(2))
    return q, k, torch.randn(B, H, T, V, generator=gen), torch.ones(B, T)


@pytest.fixture
def no_inductor(monkeypatch):
    """explain must never compile anything."""
    import torch._inductor.compile_fx as cfx

    def forbidden(*args, **kwargs):
        raise AssertionError("explain compiled a graph")

    monkeypatch.setattr(cfx, "compile_fx", forbidden)


def test_report_lists_claimed_and_declined_regions(no_inductor):
    report = explain(TwoLayers(), *_inputs())
    assert isinstance(report, Report)
    assert len(report.claimed) == 1 and len(report.declined) == 1
    claimed, declined = report.claimed[0], report.declined[0]
    assert claimed.heads == H and (claimed.k_dim, claimed.v_dim) == (K, V)
    assert "activations" in declined.reason
    text = str(report)
    assert "1 claimed, 1 declined" in text
    for words in ("claimed", "declined", "parallel", "8 x 6", "gamma=0.9688..0.9961"):
        assert words in text
    assert "parallel at T=19" in text
    assert "test_explain.py:" in text


def test_package_level_explain_and_lowering_follow_the_shapes(no_inductor):
    report = rtpcompile.explain(TwoLayers(), *_inputs(T=300))
    assert "chunkwise (chunk" in str(report) and "T=300" in str(report)


def test_recurrent_step_row(no_inductor):
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(B, H, K, generator=gen) for _ in range(2))
    v, s = torch.randn(B, H, V, generator=gen), torch.randn(B, H, K, V, generator=gen)
    report = explain(Step(), q, k, v, s)
    (region,) = report.claimed
    assert region.written == "recurrent step" and region.decay == pytest.approx((0.9,) * H)
    assert "recurrent at T=1" in str(report)


def test_nothing_to_report(no_inductor):
    report = explain(nn.Linear(4, 4), torch.randn(2, 4))
    assert report.regions == [] and "no retention candidates" in str(report)


def test_kernels_of_a_region_on_a_gpu(no_inductor):
    """Report.kernels: the generated kernels a claimed region would launch on a GPU (the
    Triton cost model's form and blocks; meta tensors, nothing compiled or launched)."""
    pytest.importorskip("triton", reason="the Triton kernels need triton")
    report = explain(TwoLayers(), *_inputs(T=300))
    index = report.regions.index(report.claimed[0])
    fwd = report.kernels(index, batch=4)
    train = report.kernels(index, batch=4, backward=True)
    assert train[: len(fwd)] == fwd and len(train) > len(fwd)
    assert all(i.module.startswith("rtp_") and i.spec.in_dtype == "bfloat16" for i in train)
    assert {i.spec.direction for i in train} == {"fwd", "bwd"}
    # the region has no state: no kernel stores one, and a parallel forward adds no state pass
    assert not any(i.spec.state_out for i in fwd)
    assert (fwd[0].spec.K, fwd[0].spec.V) == (K, V) and "K=8 V=6" in str(fwd[0])
    half = report.kernels(index, dtype=torch.float16)
    assert all(i.spec.in_dtype == "float16" for i in half)
    with pytest.raises(ValueError, match="not claimed"):
        report.kernels(report.regions.index(report.declined[0]))


def test_kernels_of_a_recurrent_step_keep_its_state(no_inductor):
    pytest.importorskip("triton", reason="the Triton kernels need triton")
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(B, H, K, generator=gen) for _ in range(2))
    v, s = torch.randn(B, H, V, generator=gen), torch.randn(B, H, K, V, generator=gen)
    report = explain(Step(), q, k, v, s)
    (info,) = report.kernels(0)
    assert info.spec.form == "recurrent" and info.spec.state_in and info.spec.state_out


def test_the_lowering_is_planned_for_the_example_call(no_inductor, monkeypatch):
    """The lowering column is what the op plans for the region's own batch, heads, dims, dtype
    and device (the planner's memo key), not a default shape."""
    from rtpcompile.lowering import plan

    monkeypatch.setenv("RTP_CACHE", "off")
    region = explain(TwoLayers(), *_inputs(T=96)).claimed[0]
    assert (region.batch, region.dtype, region.device) == (B, "float32", "cpu")
    asked = []
    real = plan.plan_for
    monkeypatch.setattr(plan, "plan_for", lambda p, **kw: asked.append(p) or real(p, **kw))
    text = str(explain(TwoLayers(), *_inputs(T=96)))
    problem = asked[-1]
    assert (problem.B, problem.H, problem.T, problem.K, problem.V) == (B, H, 96, K, V)
    assert (problem.dtype, problem.backend) == ("float32", "aten")
    q, k, v, _ = _inputs(T=96)
    chosen = plan.choose("auto", 96, False, q=q, v=v, tune=False)
    assert f"{chosen.form}" in text.split("T=96")[0].split("claimed")[-1]


def test_a_one_token_example_does_not_claim_gamma_1(no_inductor):
    report = explain(TwoLayers(), *_inputs(T=1))
    assert "gamma unseen at T=1" in str(report) and "causal linear" not in str(report)


def test_checkpointed_retention_is_searched(no_inductor):
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(TwoLayers):
        def forward(self, q, k, v, pad):
            return checkpoint(super().forward, q, k, v, pad, use_reentrant=False)

    q, k, v, pad = (x.requires_grad_() for x in _inputs(T=9))
    claimed, weird = explain(Checkpointed(), q, k, v, pad).regions
    assert claimed.claimed and claimed.scope and claimed.decay_text().startswith("gamma=0.96")
    assert not weird.claimed and "depends on activations (input 'l_pad_')" in weird.reason


def test_a_plain_functions_inputs_are_named_by_its_parameters(no_inductor):
    """explain(fn, ...) read the parameter names of ``fn.forward``, which a function has not:
    its reasons said ``input 'l_args_3_'`` until 2026-11-25."""

    def fn(q, k, v, gate):
        T = q.shape[-2]
        i = torch.arange(T)
        d = i[:, None] - i[None, :]
        return ((q @ k.mT) * torch.where(d >= 0, gate[:, None, None] ** d.clamp(min=0), 0.0)) @ v

    q, k, v, _ = _inputs(T=9)
    (region,) = explain(fn, q, k, v, torch.rand(q.shape[1])).regions
    assert not region.claimed and "depends on activations (input 'l_gate_')" in region.reason


def test_retention_in_another_higher_order_op_is_reported_not_silently_skipped(no_inductor):
    class Branch(TwoLayers):
        def retention(self, q, k, v):
            return (q @ k.transpose(-1, -2) * self.decay(q.shape[2])) @ v

        def forward(self, q, k, v, pad):
            return torch.cond(pad.sum() > 0, self.retention, lambda q, k, v: v.clone(), (q, k, v))

    (region,) = explain(Branch(), *_inputs(T=9)).regions
    assert not region.claimed and "cond subgraph" in region.reason
    assert "only checkpoint and nested compile region bodies are searched" in region.reason


def test_softmax_attention_is_named_as_declined(no_inductor):
    class Softmax(nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2), -1) @ v

    q, k, v, _ = _inputs(T=7)
    (region,) = explain(Softmax(), q, k, v).regions
    assert region.written == "softmax attention" and "not retention" in region.reason


class BrokenInside(TwoLayers):
    """Retention with a graph break between its scores and their product with V."""

    def forward(self, q, k, v, pad):
        scores = q @ k.transpose(-1, -2) * self.decay(q.shape[2])
        torch._dynamo.graph_break()
        return scores @ v


def test_a_region_split_by_a_graph_break_is_named_with_the_break(no_inductor):
    q, k, v, pad = _inputs(T=9)
    report = explain(BrokenInside(), q, k, v, pad)
    (region,) = report.regions
    assert not region.claimed and region.written == "scores at a graph break"
    assert "graph break splits the region" in region.reason
    assert "test_explain.py" in region.where
    assert len(report.graph_breaks) == 1 and "graph breaks (1):" in str(report)


def test_scores_returned_without_a_graph_break_are_not_a_split_region(no_inductor):
    class Similarity(nn.Module):
        def forward(self, q, k):
            return q @ k.transpose(-1, -2)

    q, k, _, _ = _inputs(T=9)
    report = explain(Similarity(), q, k)
    assert report.regions == [] and report.graph_breaks == []


def test_a_graph_break_elsewhere_keeps_the_region_claimed(no_inductor):
    class BreakAfter(TwoLayers):
        def forward(self, q, k, v, pad):
            out = (q @ k.transpose(-1, -2) * self.decay(q.shape[2])) @ v
            torch._dynamo.graph_break()
            return out * 2

    q, k, v, pad = _inputs(T=9)
    report = explain(BreakAfter(), q, k, v, pad)
    assert [r.claimed for r in report.regions] == [True] and len(report.graph_breaks) == 1


def test_kernels_index_out_of_range_names_the_valid_range(no_inductor):
    report = explain(TwoLayers(), *_inputs())
    for bad in (len(report.regions), 3, -1):
        with pytest.raises(ValueError, match=rf"index {bad} is out of range \(valid: 0\.\.1"):
            report.kernels(bad)
    declined = report.regions.index(report.declined[0])
    with pytest.raises(ValueError, match=f"region {declined} is not claimed"):
        report.kernels(declined)


class Breaking(nn.Module):
    """Retention, then a graph break."""

    def __init__(self):
        super().__init__()
        self.inner = Retention()

    def forward(self, q, k, v):
        out = self.inner(q, k, v)
        torch._dynamo.graph_break()
        return out + 1


@pytest.mark.parametrize("model_type", [Retention, Breaking])
def test_explain_keeps_the_users_compiled_model_and_the_recompile_limit(monkeypatch, model_type):
    """explain drops only its own Dynamo cache entries: a model compiled before keeps its
    compiled code (no recompile), and explaining more often than the recompile limit (set to 1
    here: each explain would otherwise be a recompile) still traces every time, graph break or
    not."""
    import torch._inductor.compile_fx as cfx

    import rtpcompile.backend as backend

    monkeypatch.setattr(cfx, "compile_fx", lambda gm, example_inputs, **kw: gm.forward)
    torch._dynamo.reset()
    model, args = model_type(), retention_inputs(5)
    with torch._dynamo.config.patch(recompile_limit=1):
        compiled = torch.compile(model, backend="rtp")
        compiled(*args)
        graphs = backend.counters["graphs"]
        for _ in range(2):
            assert len(explain(model, *args).claimed) == 1
        compiled(*args)
        # the compiled wrapper explained: its location reads as the model's own
        (region,) = explain(compiled, *args).claimed
        assert region.where == explain(model, *args).claimed[0].where
    assert backend.counters["graphs"] == graphs
    torch._dynamo.reset()


def test_a_dynamo_failure_under_dynamic_shapes_falls_back_to_a_static_trace(
    no_inductor, monkeypatch
):
    """torch 2.13's Dynamo fails tracing some nested compile regions with dynamic=True: explain
    retries with static shapes, shows every region and says how it traced."""
    import sys

    explain_mod = sys.modules["rtpcompile.explain"]  # NOTE: rtpcompile.explain is the function

    real = explain_mod._trace
    tried = []

    def flaky(collect, dynamic, *rest):
        tried.append(dynamic)
        if dynamic:  # NOTE: after a whole trace, so explain must drop what it collected
            real(collect, dynamic, *rest)
            raise torch._dynamo.exc.InternalTorchDynamoError("KeyError: 12")
        return real(collect, dynamic, *rest)

    monkeypatch.setattr(explain_mod, "_trace", flaky)
    report = explain(TwoLayers(), *_inputs(T=9))
    assert tried == [True, False]
    assert [r.claimed for r in report.regions] == [True, False] and report.graphs == 1
    assert report.notes == [
        "traced with static shapes: Dynamo failed under dynamic=True "
        "(InternalTorchDynamoError: KeyError: 12)"
    ]
    assert str(report).endswith("note: " + report.notes[0])


class ScaledScores(TwoLayers):
    def forward(self, q, k, v, pad):
        return (q @ k.transpose(-1, -2) * 2.0**-40 * self.decay(q.shape[2])) @ v


def test_kernels_are_listed_for_the_regions_scale(no_inductor, monkeypatch):
    """The backward's passes depend on the scale (a tiny one takes the three-pass path): the
    listing gets the region's constant score factor, not 1."""
    pytest.importorskip("triton", reason="the Triton kernels need triton")
    from rtpcompile import kernels

    scales = []
    real = kernels.kernels_for
    monkeypatch.setattr(
        kernels, "kernels_for", lambda *a, **kw: scales.append(kw.get("scale")) or real(*a, **kw)
    )
    for model, want in ((TwoLayers(), 1.0), (ScaledScores(), 2.0**-40)):
        report = explain(model, *_inputs())
        scales.clear()
        report.kernels(report.regions.index(report.claimed[0]), backward=True)
        assert scales and set(scales) == {want}, (type(model).__name__, scales)
