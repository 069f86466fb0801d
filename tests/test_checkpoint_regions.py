"""Retention inside torch.utils.checkpoint: claimed in the body, recomputed in the backward.

Most tests run the rewritten graph eagerly (the ``inductor`` stub of test_backend); one runs
AOTAutograd with Inductor's partitioner to see the backward recompute the op.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_backend import inductor, op_calls  # noqa: F401  (fixture)
from torch import nn
from torch.utils.checkpoint import checkpoint

import rtpcompile.backend as backend
from rtpcompile.explain import explain
from rtpcompile.rewrite import rtp_decay

H = 3


def decay_mask(gamma: torch.Tensor, T: int) -> torch.Tensor:
    idx = torch.arange(T, device=gamma.device)
    diff = idx[:, None] - idx[None, :]
    return torch.where(diff >= 0, gamma[:, None, None] ** diff.clamp(min=0), 0.0)


class Layer(nn.Module):
    """One retention layer written as the paper writes it: projections, D, (QKᵀ ⊙ D)V."""

    def __init__(self, d: int = 12, k: int = 5, v: int = 7):
        super().__init__()
        self.k, self.v = k, v
        self.qk = nn.Linear(d, 2 * H * k, bias=False)
        self.vp = nn.Linear(d, H * v, bias=False)
        self.out = nn.Linear(H * v, d, bias=False)
        self.register_buffer("gamma", 1 - 2.0 ** (-3 - torch.arange(H, dtype=torch.float32)))

    def forward(self, x, mask=None):
        b, t, _ = x.shape
        q, k = self.qk(x).view(b, t, 2, H, self.k).permute(2, 0, 3, 1, 4)
        v = self.vp(x).view(b, t, H, self.v).transpose(1, 2)
        mask = decay_mask(self.gamma, t) if mask is None else mask
        o = (q @ k.transpose(-1, -2) * self.k**-0.5 * mask) @ v
        return self.out(o.transpose(1, 2).reshape(b, t, H * self.v))


class Stack(nn.Module):
    """Residual layers, each checkpointed as gradient checkpointing in training does."""

    def __init__(self, layers: int = 2, reentrant: bool = False, **dims):
        super().__init__()
        self.layers = nn.ModuleList(Layer(**dims) for _ in range(layers))
        self.reentrant = reentrant

    def forward(self, x):
        for layer in self.layers:
            x = x + checkpoint(layer, x, use_reentrant=self.reentrant)
        return x


def _x(T: int, d: int = 12, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, T, d, generator=gen).requires_grad_()


def _bodies(gm) -> list:
    return [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]


def _check_against_float64(model, compiled, x, tol=2e-4):
    """Output and every gradient (input and weights) against the float64 eager model."""
    ref = copy.deepcopy(model).double()
    x64 = x.detach().double().requires_grad_()
    want = ref(x64)
    want.sum().backward()
    got = compiled(x)
    got.sum().backward()
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol)
    for (name, p), (_, p64) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_layers_are_claimed_inside_their_bodies(inductor, reentrant):  # noqa: F811
    model = Stack(reentrant=reentrant)
    compiled = torch.compile(model, backend="rtp", dynamic=False)
    _check_against_float64(model, compiled, _x(9))
    ((gm, _),) = inductor
    assert op_calls(gm) == 0  # NOTE: the op sits in the bodies, so the checkpoint recomputes it
    assert [op_calls(body) for body in _bodies(gm)] == [1, 1]
    assert backend.counters["regions_claimed"] == 2 and backend.counters["regions_declined"] == 0
    # NOTE: gamma is read before each checkpoint call and passed in (rewrite._hoisted)
    assert sum(n.target is rtp_decay for n in gm.graph.nodes) == 2


def test_rewriting_a_body_leaves_dynamo_s_graph_alone(inductor):  # noqa: F811
    """verify and the fallback run the original graph: its bodies must keep their matmuls."""
    seen = []

    def keep(gm, example_inputs):
        seen.append(copy.deepcopy(gm))
        return backend.rtp_backend(gm, example_inputs)

    torch.compile(Stack(), backend=keep, dynamic=False)(_x(9))
    (original,) = seen
    assert all(op_calls(body) == 0 for body in _bodies(original))
    ((rewritten, _),) = inductor
    assert all(op_calls(body) == 1 for body in _bodies(rewritten))


class LearnableLayer(Layer):
    """The decay a trainable parameter (gamma = sigmoid(logit)), and a per-head factor on the
    mask that is not 1 on the diagonal (a row scale)."""

    def __init__(self):
        super().__init__()
        self.logit = nn.Parameter(torch.logit(self.gamma.clone()))
        self.register_buffer("temperature", torch.tensor([0.5, 1.5, 2.0]))

    def forward(self, x, mask=None):
        gamma = torch.sigmoid(self.logit)
        mask = decay_mask(gamma, x.shape[1]) * self.temperature[:, None, None]
        return super().forward(x, mask)


def test_a_learnable_decay_and_a_row_scale_in_checkpoints(inductor):  # noqa: F811
    """Both read inside the body: a mask that takes a gradient is not built before the call,
    where autograd would save its [H, T, T] intermediates outside the checkpoint."""
    model = Stack()
    model.layers = nn.ModuleList(LearnableLayer() for _ in range(2))
    _check_against_float64(model, torch.compile(model, backend="rtp", dynamic=False), _x(11))
    assert model.layers[0].logit.grad.abs().sum() > 0
    ((gm, _),) = inductor
    assert [op_calls(body) for body in _bodies(gm)] == [1, 1]
    assert not any(n.target is rtp_decay for n in gm.graph.nodes)


def test_the_backward_recomputes_the_op_instead_of_saving_it(monkeypatch):
    """Through AOTAutograd with Inductor's min-cut partitioner: the retention's forward op is
    run again in the backward graph, as the checkpoint asks."""
    import torch._inductor.compile_fx as cfx
    from functorch.compile import min_cut_rematerialization_partition
    from torch._functorch.aot_autograd import aot_module_simplified

    graphs = {}

    def record(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = gm
            return gm.forward

        return compiler

    def aot(gm, example_inputs, **kwargs):
        return aot_module_simplified(
            gm,
            example_inputs,
            fw_compiler=record("forward"),
            bw_compiler=record("backward"),
            partition_fn=min_cut_rematerialization_partition,
        )

    monkeypatch.setattr(cfx, "compile_fx", aot)
    torch._dynamo.reset()
    model = Stack(layers=1)
    compiled = torch.compile(model, backend="rtp", dynamic=False)
    _check_against_float64(model, compiled, _x(11))

    def count(kind, name):
        return sum(1 for n in graphs[kind].graph.nodes if name in str(n.target))

    assert count("forward", "rtp.retention_fwd") == 1
    assert count("backward", "rtp.retention_fwd") == 1  # recomputed
    assert count("backward", "rtp.retention_bwd") == 1
    torch._dynamo.reset()


def test_a_mask_built_outside_and_passed_in_is_proven(inductor):  # noqa: F811
    class Outside(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = Layer()

        def forward(self, x):
            mask = decay_mask(self.layer.gamma, x.shape[1])
            return checkpoint(self.layer, x, mask, use_reentrant=False)

    model = Outside()
    _check_against_float64(model, torch.compile(model, backend="rtp", dynamic=False), _x(10))
    ((gm, _),) = inductor
    assert [op_calls(body) for body in _bodies(gm)] == [1]


def test_retention_reading_a_checkpointed_projection_is_claimed_outside(inductor):  # noqa: F811
    class ProjectionInside(Layer):
        def forward(self, x):
            b, t, _ = x.shape

            def project(x):
                q, k = self.qk(x).view(b, t, 2, H, self.k).permute(2, 0, 3, 1, 4)
                return q, k, self.vp(x).view(b, t, H, self.v).transpose(1, 2)

            q, k, v = checkpoint(project, x, use_reentrant=False)
            o = (q @ k.transpose(-1, -2) * decay_mask(self.gamma, t)) @ v
            return self.out(o.transpose(1, 2).reshape(b, t, H * self.v))

    model = ProjectionInside()
    _check_against_float64(model, torch.compile(model, backend="rtp", dynamic=False), _x(7))
    ((gm, _),) = inductor
    assert op_calls(gm) == 1 and [op_calls(body) for body in _bodies(gm)] == [0]


def test_nested_checkpoints(inductor):  # noqa: F811
    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = Stack(layers=1)

        def forward(self, x):
            return checkpoint(self.stack, x, use_reentrant=False) * 2

    model = Nested()
    _check_against_float64(model, torch.compile(model, backend="rtp", dynamic=False), _x(9))
    ((gm, _),) = inductor
    (outer,) = _bodies(gm)
    assert op_calls(outer) == 0 and [op_calls(b) for b in _bodies(outer)] == [1]
    (region,) = explain(model, _x(9)).claimed
    assert len(region.scope) == 2  # the two checkpoint calls leading to it


def test_a_region_across_the_boundary_is_declined_and_still_right(inductor):  # noqa: F811
    class Across(Layer):
        def forward(self, x):
            b, t, _ = x.shape
            q, k = self.qk(x).view(b, t, 2, H, self.k).permute(2, 0, 3, 1, 4)
            v = self.vp(x).view(b, t, H, self.v).transpose(1, 2)
            scores = q @ k.transpose(-1, -2)

            def finish(scores, v):
                return (scores * decay_mask(self.gamma, t)) @ v

            o = checkpoint(finish, scores, v, use_reentrant=False)
            return self.out(o.transpose(1, 2).reshape(b, t, H * self.v))

    model = Across()
    _check_against_float64(model, torch.compile(model, backend="rtp", dynamic=False), _x(8))
    ((gm, _),) = inductor
    assert op_calls(gm) == 0 and all(op_calls(b) == 0 for b in _bodies(gm))
    report = explain(model, _x(8))
    (region,) = report.regions
    assert not region.claimed
    assert "the scores are computed on the other side of a checkpoint's" in region.reason


def test_softmax_attention_in_a_checkpoint_is_not_claimed(inductor):  # noqa: F811
    class Softmax(nn.Module):
        def forward(self, q, k, v):
            attend = lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), -1) @ v  # noqa: E731
            return checkpoint(attend, q, k, v, use_reentrant=False)

    q, k, v = (torch.randn(2, H, 6, 4) for _ in range(3))
    torch.testing.assert_close(torch.compile(Softmax(), backend="rtp")(q, k, v), Softmax()(q, k, v))
    assert backend.counters["regions_claimed"] == 0


def _verify_passes_then_catches_a_wrong_gamma(model, monkeypatch):
    """verify passes on the model, then raises once the glue halves every gamma."""
    x = _x(9)
    verified = torch.compile(model, backend="rtp", options={"verify": True}, dynamic=False)
    torch.testing.assert_close(verified(x), model(x), rtol=1e-4, atol=1e-5)

    import rtpcompile.rewrite as rewrite

    real = rewrite._decay
    monkeypatch.setattr(rewrite, "_decay", lambda *a: (real(*a)[0] * 0.5, real(*a)[1]))
    torch._dynamo.reset()
    wrong = torch.compile(model, backend="rtp", options={"verify": True}, dynamic=False)
    with pytest.raises(RuntimeError, match=r"rtp verify: region at .*test_checkpoint_regions"):
        wrong(x)


def test_verify_checks_the_regions_inside_bodies(inductor, monkeypatch):  # noqa: F811
    _verify_passes_then_catches_a_wrong_gamma(Stack(), monkeypatch)


def test_dynamic_lengths_do_not_recompile(inductor):  # noqa: F811
    model = Stack()
    compiled = torch.compile(model, backend="rtp", dynamic=True)
    for T in (9, 17, 2, 64):  # NOTE: T = 1 would specialise (Dynamo), as without checkpoints
        x = _x(T, seed=T)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    assert backend.counters["graphs"] == 1 and backend.counters["regions_claimed"] == 2


def test_explain_marks_checkpointed_regions(inductor):  # noqa: F811
    report = explain(Stack(), _x(9))
    assert len(report.claimed) == 2 and all(r.scope for r in report.claimed)
    assert str(report).count("parallel (in checkpoint)") == 2
    assert report.grads(0) == ("q", "k", "v")


def test_a_native_op_in_a_checkpoint_is_claimed_with_the_run_time_options(inductor):  # noqa: F811
    from rtpcompile import ops

    class Native(nn.Module):
        def forward(self, q, k, v, gamma):
            run = functools.partial(ops.retention_parallel, scale=0.5)
            return checkpoint(run, q, k, v, gamma, use_reentrant=False)

    q, k, v = (torch.randn(1, H, 5, 4) for _ in range(3))
    gamma = torch.full((H,), 0.9)
    out = torch.compile(Native(), backend="rtp", options={"kernels": "aten"})(q, k, v, gamma)
    torch.testing.assert_close(out, Native()(q, k, v, gamma))
    ((gm, _),) = inductor
    (body,) = _bodies(gm)
    (call,) = [n for n in body.graph.nodes if "rtp.retention" in str(n.target)]
    assert "aten" in str(call.kwargs.get("runtime_options", call.args[-1]))
    assert backend.counters["regions_native"] == 1


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    T=st.integers(1, 40),
    k=st.integers(1, 9),
    v=st.integers(1, 9),
    reentrant=st.booleans(),
)
def test_compiled_checkpointed_model_equals_float64_eager(T, k, v, reentrant):
    """Property: whatever the sizes, a checkpointed stack compiled by rtp matches float64 eager
    (outputs and gradients), with its regions claimed in the bodies."""
    import torch._inductor.compile_fx as cfx

    real = cfx.compile_fx
    cfx.compile_fx = lambda gm, example_inputs, **kwargs: gm.forward
    try:
        torch._dynamo.reset()
        backend.counters.clear()
        model = Stack(reentrant=reentrant, k=k, v=v)
        _check_against_float64(model, torch.compile(model, backend="rtp", dynamic=False), _x(T))
        if T > 1:  # NOTE: at T = 1 a 1x1 mask shows no decay, and the region is declined
            assert backend.counters["regions_claimed"] == 2
    finally:
        cfx.compile_fx = real
        torch._dynamo.reset()


def test_inductor_compiles_and_trains_a_checkpointed_stack():
    """The real pipeline (AOTAutograd and Inductor, dynamic lengths): outputs and gradients."""
    torch._dynamo.reset()
    backend.counters.clear()
    model = Stack()
    compiled = torch.compile(model, backend="rtp", dynamic=True)
    for T in (13, 23):  # NOTE: not 12 = d, which duck sizing would tie to d
        for p in model.parameters():
            p.grad = None
        _check_against_float64(model, compiled, _x(T, seed=T))
    assert backend.counters["regions_claimed"] == 2 and backend.counters["graphs"] == 1
    torch._dynamo.reset()


class RegionLayer(Layer):
    """A layer compiled once for all its calls (``torch.compiler.nested_compile_region``)."""

    @torch.compiler.nested_compile_region
    def forward(self, x, mask=None):
        return super().forward(x, mask)


class Regional(Stack):
    def __init__(self, layers: int = 2):
        super().__init__(layers=layers)
        self.layers = nn.ModuleList(RegionLayer() for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


@pytest.fixture
def aot_eager_graphs(monkeypatch):
    """Inductor replaced by AOTAutograd with eager compilers (Inductor's own backward of a
    reused region is wrong in torch 2.13, see the xfail below; an eager run of the graph
    Dynamo made cannot take a gradient through invoke_subgraph, which first runs its body on
    uninitialised tensors, where the op's gamma check fails); records the graphs it gets."""
    import torch._inductor.compile_fx as cfx
    from torch._dynamo.backends.debugging import aot_eager

    seen = []

    def compile_fx(gm, example_inputs, **kwargs):
        seen.append(gm)
        return aot_eager(gm, example_inputs)

    monkeypatch.setattr(cfx, "compile_fx", compile_fx)
    torch._dynamo.reset()
    backend.counters.clear()
    yield seen
    torch._dynamo.reset()


def test_a_nested_compile_region_body_is_rewritten_once_for_all_calls(aot_eager_graphs):
    model = Regional()
    x = _x(9)
    _check_against_float64(model, torch.compile(model, backend="rtp", dynamic=False), x)
    (gm,) = aot_eager_graphs
    calls = [n for n in gm.graph.nodes if n.name.startswith("invoke_subgraph")]
    assert len(calls) == 2 and len({n.args[0].target for n in calls}) == 1  # one shared body
    assert [op_calls(body) for body in _bodies(gm)] == [1, 1]
    assert backend.counters["regions_claimed"] == 2
    # NOTE: torch 2.13's Dynamo fails on these regions under dynamic=True; explain then
    # traces them static and says so
    report = explain(model, x)
    assert [len(r.scope) for r in report.claimed] == [1, 1]
    assert str(report).count("parallel (in compile region)") == 2
    assert all(note.startswith("traced with static shapes") for note in report.notes)


def test_verify_checks_every_call_of_a_shared_body(aot_eager_graphs, monkeypatch):
    _verify_passes_then_catches_a_wrong_gamma(Regional(), monkeypatch)


def test_a_shared_body_is_claimed_only_when_every_call_claims_it(aot_eager_graphs):
    model = Regional()
    with torch.no_grad():
        model.layers[1].gamma.fill_(1.5)  # NOTE: a growing "decay": the second call declines
    x = _x(9)
    torch.testing.assert_close(torch.compile(model, backend="rtp")(x), model(x))
    (gm,) = aot_eager_graphs
    assert all(op_calls(body) == 0 for body in _bodies(gm))
    first, second = explain(model, x).regions
    assert not first.claimed and "shared by 2 calls" in first.reason
    assert not second.claimed and "shared by 2 calls" not in second.reason


def test_nested_compile_regions_train_at_a_second_length(aot_eager_graphs):
    """Automatic dynamic: a static compile, then one dynamic recompile, as for any model."""
    model = Regional()
    compiled = torch.compile(model, backend="rtp")
    for T in (13, 23):
        for p in model.parameters():
            p.grad = None
        _check_against_float64(model, compiled, _x(T, seed=T))
    assert backend.counters["regions_claimed"] == 4 and len(aot_eager_graphs) == 2


def test_inductor_runs_nested_compile_regions():
    torch._dynamo.reset()
    backend.counters.clear()
    model = Regional()
    compiled = torch.compile(model, backend="rtp")
    with torch.no_grad():
        for T in (13, 23):
            x = _x(T, seed=T)
            want = copy.deepcopy(model).double()(x.double())
            torch.testing.assert_close(compiled(x).double(), want, rtol=2e-4, atol=2e-4)
    assert backend.counters["regions_claimed"] == 4
    torch._dynamo.reset()


@pytest.mark.xfail(
    strict=True,
    reason="torch 2.13 Inductor (CPU): the second call of a reused nested compile region gets "
    "wrong weight gradients with backend='inductor' alone (aot_eager is right); docs/backend.md",
)
def test_upstream_inductor_gradients_of_a_reused_region():
    """Not rtpcompile: plain Inductor. When this passes, torch fixed it; drop the docs' note."""
    torch._dynamo.reset()
    model = Regional()
    try:
        _check_against_float64(model, torch.compile(model, backend="inductor"), _x(13))
    finally:
        torch._dynamo.reset()


def test_hugging_face_gradient_checkpointing_of_a_retrofitted_model(inductor):  # noqa: F811
    """transformers' gradient checkpointing around retrofitted layers: their rtp op calls are
    found (native) inside the checkpoint bodies, and the loss and gradients match eager."""
    pytest.importorskip("transformers")
    from models import tiny_hf, token_ids

    from rtpcompile.convert import retrofit

    model = tiny_hf("llama", layers=2)
    retrofit(model, ratio=1.0)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = token_ids(length=9)
    ref = copy.deepcopy(model)
    want = ref(ids, labels=ids).loss
    want.backward()
    got = torch.compile(model, backend="rtp")(ids, labels=ids).loss
    got.backward()
    torch.testing.assert_close(got, want)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert backend.counters["regions_native"] == 2
    bodies = [body for gm, _ in inductor for body in _bodies(gm)]
    calls = [n for b in bodies for n in b.graph.nodes if "rtp.retention" in str(n.target)]
    assert len(calls) == 2


def test_no_square_buffer_when_two_checkpointed_layers_build_the_same_mask():
    """AOTAutograd's CSE merges two bodies' identical T-only mask nodes, and its partitioner
    saves what a later body's recompute reads from an earlier one ([T, T] bool and int64 here,
    until gamma and the row scale were read before the checkpoint call: rewrite._hoisted)."""
    import re

    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    T = 300
    model = Stack()
    x = _x(T)

    def step():
        out = torch.compile(model, backend="rtp")(x)
        out.sum().backward()
        return out

    _, codes = run_and_get_code(step)
    torch._dynamo.reset()
    square = [s for c in codes for s in re.findall(r"empty_strided_\w+\(\((\d+, \d+)\)", c)]
    assert f"{T}, {T}" not in square


@pytest.mark.parametrize("drop", [False, True])
def test_verify_runs_each_check_from_the_same_state(inductor, drop):  # noqa: F811
    """verify ran the graph eagerly three times on one copy of the inputs (the bodies' check,
    then the graph and the rewritten graph): a buffer's += piled up between the compared runs
    and a dropout drew new numbers, so a correct checkpointed region failed (until 2026-11-25);
    the compiled call after the checks sees the model as one call leaves it."""

    class Counted(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = Layer()
            self.register_buffer("offset", torch.zeros(()))

        def forward(self, x):
            self.offset += x.shape[1]
            if drop:
                x = torch.nn.functional.dropout(x, 0.5, training=True)
            return checkpoint(self.layer, x, use_reentrant=False) * self.offset

    torch.manual_seed(0)
    model = Counted()
    reference = copy.deepcopy(model)
    x = _x(9)
    torch.manual_seed(1)
    got = torch.compile(model, backend="rtp", options={"verify": True}, dynamic=False)(x)
    torch.manual_seed(1)
    want = reference(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert model.offset.item() == reference.offset.item() == 9
    assert backend.counters["regions_claimed"] >= 1
