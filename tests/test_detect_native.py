"""rtp op calls already in the graph are claimed as-is; explain() lists them, rewrite keeps them.

Models here call ``rtpcompile.ops`` (or ``torch.ops.rtp.retention_fwd``) themselves, as
retrofitted layers do. Each call must be one claimed, native region with the call's form, and
the compiled model must equal eager (outputs and gradients) with the op node left unchanged.
"""

from __future__ import annotations

import pytest
import torch
from models import MHAModel, tiny_hf, token_ids
from torch import nn

import rtpcompile
from rtpcompile import backend, ops, options
from rtpcompile.detect import find_regions
from rtpcompile.rewrite import rtp_retention

B, H, T, K, V = 2, 3, 7, 8, 12
GAMMA = (0.75, 0.875, 0.9375)


def _inputs(seed=0, grad=False, t=T):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, t, K, generator=gen) for _ in range(2))
    v, s = torch.randn(B, H, t, V, generator=gen), torch.randn(B, H, K, V, generator=gen)
    return [x.requires_grad_(grad) for x in (q, k, v, s)]


class OpCalls(nn.Module):
    """One rtp op call in the form ``form``; decay from a buffer."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.register_buffer("gamma", torch.tensor(GAMMA))

    def forward(self, q, k, v, s):
        g = self.gamma
        if self.form == "auto":
            return ops.retention(q, k, v, g)
        if self.form == "parallel":
            return ops.retention_parallel(q, k, v, g, scale=0.5)
        if self.form == "chunkwise":
            return ops.retention_chunkwise(q, k, v, g, chunk_size=4, initial_state=s)
        if self.form == "recurrent":
            return ops.retention_recurrent(q, k, v, g, s)
        o, final = torch.ops.rtp.retention_fwd.default(
            q, k, v, g, scale=0.25, initial_state=None, form="chunkwise", chunk_size=0
        )
        return o, final  # the overload called directly, with keyword arguments


# form -> (written form, state in, state out, lowering column starts with)
CASES = {
    "auto": ("auto", False, False, "parallel at T=7, op call kept"),
    "parallel": ("parallel", False, False, "parallel at T=7, forced by the op call"),
    "chunkwise": ("chunkwise", True, True, "chunkwise (chunk 4) at T=7, forced"),
    "recurrent": ("recurrent", True, True, "recurrent at T=7, forced"),
    "overload": ("chunkwise", False, True, "chunkwise (chunk "),
}


@pytest.mark.parametrize("form", sorted(CASES))
def test_explain_reports_each_op_call_with_its_form(form):
    written, state_in, state_out, lowering = CASES[form]
    report = rtpcompile.explain(OpCalls(form), *_inputs())
    assert report.declined == []
    (region,) = report.claimed
    assert region.native and region.form == written and region.written == f"rtp op ({written})"
    assert (region.state is not None, region.state_output is not None) == (state_in, state_out)
    assert (region.seq_len, region.heads, region.k_dim, region.v_dim) == (T, H, K, V)
    assert region.decay == pytest.approx(GAMMA)
    (row,) = report.rows()
    assert row[1:2] + row[3:7] == (
        "claimed",
        f"rtp op ({written})",
        "3",
        "8 x 12",
        "gamma=0.75..0.9375",
    )
    assert row[-1].startswith(lowering)
    assert "test_detect_native.py" in region.where  # the user's line, not rtpcompile/ops.py


class Decays(nn.Module):
    """Three decays: a parameter through sigmoid (constant), one from an activation (runtime)."""

    def __init__(self):
        super().__init__()
        self.logit = nn.Parameter(torch.logit(torch.tensor(GAMMA)))

    def forward(self, q, k, v, s):
        a = ops.retention(q, k, v, torch.sigmoid(self.logit))
        b = ops.retention(q, k, v, torch.sigmoid(s.mean((0, 2, 3))))
        return a + b


def test_decay_is_shown_when_constant_and_runtime_otherwise():
    report = rtpcompile.explain(Decays(), *_inputs())
    constant, runtime = report.claimed
    assert constant.decay == pytest.approx(GAMMA, rel=1e-6)
    assert runtime.decay == () and runtime.decay_text() == "runtime"
    assert [row[6] for row in report.rows()] == ["gamma=0.75..0.9375", "runtime"]


class Mixed(nn.Module):
    """A retention written out in full beside an op call: one rewritten, one kept."""

    def __init__(self):
        super().__init__()
        self.register_buffer("gamma", torch.tensor(GAMMA))

    def forward(self, q, k, v, s):
        idx = torch.arange(q.shape[2])
        diff = idx[:, None] - idx[None, :]
        mask = torch.tril(self.gamma[:, None, None] ** diff.clamp(min=0))
        written = (q @ k.transpose(-1, -2) * K**-0.5 * mask) @ v
        o, final = ops.retention_recurrent(q, k, v, self.gamma, s)
        return written + o, final


def _calls(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def test_rewrite_keeps_the_op_node_and_rewrites_the_rest():
    op = torch.ops.rtp.retention_fwd
    seen = {}

    def capture(gm, example_inputs, **_):
        # NOTE: inside the backend call: Dynamo drops the placeholders' sources afterwards
        seen["regions"] = find_regions(gm, example_inputs)
        backend.counters.clear()
        new_gm, _ = backend.detect_and_rewrite(gm, example_inputs, options.resolve(None))
        seen["counters"] = dict(backend.counters)
        seen["graphs"] = gm, new_gm
        return new_gm.forward

    torch._dynamo.reset()
    got = torch.compile(Mixed(), backend=capture, dynamic=True, fullgraph=True)(*_inputs())
    torch._dynamo.reset()
    assert [(r.claimed, r.native) for r in seen["regions"]] == [(True, False), (True, True)]
    assert seen["counters"]["regions_claimed"] == 2 and seen["counters"]["regions_native"] == 1
    gm, new_gm = seen["graphs"]
    assert _calls(gm, op) == 1 and _calls(gm, rtp_retention) == 0
    assert _calls(new_gm, op) == 1 and _calls(new_gm, rtp_retention) == 1
    kept = next(n for n in new_gm.graph.nodes if n.target is op)
    original = next(n for n in gm.graph.nodes if n.target is op)
    assert kept.name == original.name and str(kept.args) == str(original.args)
    for a, b in zip(got, Mixed()(*_inputs()), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class UnreadStates(nn.Module):
    """Op calls whose final state nothing reads (positional and keyword), and one that is read."""

    def __init__(self):
        super().__init__()
        self.register_buffer("gamma", torch.tensor(GAMMA))

    def forward(self, q, k, v, s):
        a, _ = ops.retention_chunkwise(q, k, v, self.gamma, chunk_size=4, initial_state=s)
        b, _ = torch.ops.rtp.retention_fwd.default(
            q, k, v, self.gamma, scale=0.25, initial_state=None, form="parallel", chunk_size=0
        )
        c, sc = ops.retention_recurrent(q, k, v, self.gamma, s)
        return a + b + c, sc


def _state_out_args(gm) -> list:
    op = (torch.ops.rtp.retention_fwd, torch.ops.rtp.retention_fwd.default)
    return [
        n.args[8] if len(n.args) > 8 else n.kwargs.get("output_final_state", True)
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target in op
    ]


def test_an_unread_final_state_is_not_computed():
    """The rewrite asks op calls whose state nothing reads for none (output_final_state=False);
    Dynamo's graph is left as it was, and the compiled model still equals eager, gradients of
    the initial state included."""
    seen = {}

    def capture(gm, example_inputs, **_):
        new_gm, _ = backend.detect_and_rewrite(gm, example_inputs, options.resolve(None))
        seen["graphs"] = gm, new_gm
        return new_gm.forward

    torch._dynamo.reset()
    model = UnreadStates()
    x = _inputs(grad=True)
    got = torch.compile(model, backend=capture, fullgraph=True)(*x)
    torch._dynamo.reset()
    gm, new_gm = seen["graphs"]
    assert _state_out_args(gm) == [True, True, True]
    assert _state_out_args(new_gm) == [False, False, True]
    ref = model(*x)
    loss = [(o * o).sum() + st.sum() for o, st in (got, ref)]
    got_grads, ref_grads = (torch.autograd.grad(t, x) for t in loss)
    for a, b in zip((*got, *got_grads), (*ref, *ref_grads), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class AllForms(nn.Module):
    """Every public op in one graph, a learnable decay (gradients reach it through the ops)."""

    def __init__(self):
        super().__init__()
        self.logit = nn.Parameter(torch.logit(torch.tensor(GAMMA)))

    def forward(self, q, k, v, s):
        g = torch.sigmoid(self.logit)
        a = ops.retention(q, k, v, g)
        b, sb = ops.retention_chunkwise(q, k, v, g, chunk_size=4, initial_state=s)
        c, sc = ops.retention_recurrent(q, k, v, g, s)
        return a + b * 0.5 + c * 0.25, sb + sc


def test_compiled_equals_eager_forward_and_gradients_strict():
    torch._dynamo.reset()
    backend.counters.clear()
    model = AllForms()
    compiled = torch.compile(model, backend="rtp", options={"strict": True, "verify": True})
    x = _inputs(grad=True)
    got, ref = compiled(*x), model(*x)
    params = [*x, model.logit]
    loss = [(o * o).sum() + st.sum() for o, st in (got, ref)]
    got_grads = torch.autograd.grad(loss[0], params)
    ref_grads = torch.autograd.grad(loss[1], params)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert backend.counters["regions_claimed"] == 3 and backend.counters["regions_native"] == 3
    assert backend.counters["fallbacks"] == 0
    torch._dynamo.reset()


def test_retrofitted_multihead_attention_model_is_fully_claimed():
    torch.manual_seed(0)
    model = MHAModel(layers=3).eval()
    rtpcompile.retrofit(model, ratio=1.0)
    report = rtpcompile.explain(model, torch.randn(2, 5, 32))
    assert len(report.claimed) == 3 and report.declined == []


@pytest.mark.parametrize("use_cache, form", [(False, "auto"), (True, "chunkwise")])
def test_retrofitted_tiny_llama_is_fully_claimed(use_cache, form):
    pytest.importorskip("transformers", reason="Hugging Face models need the transformers extra")
    model = tiny_hf("llama", layers=3)
    handle = rtpcompile.retrofit(model, ratio=1.0)
    report = rtpcompile.explain(model, token_ids(), use_cache=use_cache)
    assert len(report.claimed) == len(handle.converted) == 3 and report.declined == []
    assert {r.form for r in report.claimed} == {form}
    wheres = [r.where.split()[0] for r in report.claimed]
    assert wheres == [f"model.layers.{i}.self_attn" for i in range(3)]
    assert all(r.heads == 4 and (r.k_dim, r.v_dim) == (16, 16) for r in report.claimed)
