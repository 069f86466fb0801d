"""explain() and Dynamo's cache when a graph break comes before the retention: the rest of the
model's forward runs in a resume function Dynamo shares between compiles, so explain must not
leave cache entries on it (the 9th explain hit the recompile limit: 0 claimed, and a later
compile of the model claimed nothing either)."""

from __future__ import annotations

import contextlib
import gc
import sys
import weakref

import pytest
import torch
from test_backend import Retention
from test_backend import inputs as retention_inputs
from torch import nn

import rtpcompile.backend as backend
import rtpcompile.fresh_caller as fresh_caller
from rtpcompile.explain import explain

EXPLAINS = 12  # past Dynamo's recompile limit (8)


class BreakFirst(nn.Module):
    """A graph break (a print, an ``.item()``), then retention: the retention is traced in
    Dynamo's resume function of ``forward``."""

    def __init__(self):
        super().__init__()
        self.inner = Retention()

    def forward(self, q, k, v):
        x = q * 2
        torch._dynamo.graph_break()
        return self.inner(x, k, v) + 1


@pytest.fixture
def eager_inductor(monkeypatch):
    """Compiles go through the rtp backend but Inductor runs the graph eagerly (fast)."""
    import torch._inductor.compile_fx as cfx

    monkeypatch.setattr(cfx, "compile_fx", lambda gm, example_inputs, **kw: gm.forward)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _entries() -> dict[int, int]:
    """Cache entries per code object Dynamo has seen (by id), where there are any."""
    from torch._dynamo import convert_frame
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    codes = [ref() for ref in convert_frame.input_codes.seen]
    counts = {id(c): len(_debug_get_cache_entry_list(c)) for c in codes if c is not None}
    return {code: n for code, n in counts.items() if n}


def test_explaining_past_the_recompile_limit_claims_and_a_later_compile_claims(eager_inductor):
    model, args = BreakFirst(), retention_inputs(7)
    for _ in range(EXPLAINS):
        report = explain(model, *args)
        assert len(report.claimed) == 1 and len(report.graph_breaks) == 1
    backend.counters.clear()
    out = torch.compile(model, backend="rtp")(*args)
    assert backend.counters["regions_claimed"] == 1
    torch.testing.assert_close(out, model(*args))


def test_a_model_compiled_before_keeps_its_entries_and_explain_leaves_none(eager_inductor):
    model, args = BreakFirst(), retention_inputs(7)
    backend.counters.clear()
    compiled = torch.compile(model, backend="rtp")
    compiled(*args)
    graphs, before = backend.counters["graphs"], _entries()
    assert backend.counters["regions_claimed"] == 1 and sum(before.values()) == 2
    for _ in range(EXPLAINS):
        assert len(explain(model, *args).claimed) == 1
    assert _entries() == before  # the user's forward and resume function: no more, no fewer
    compiled(*args)
    assert backend.counters["graphs"] == graphs  # no recompile


def test_explain_leaves_dynamos_shape_memory_as_it_was(eager_inductor):
    """A resume function explain traced shares its (file, line, name) with the user's: the
    lengths explain saw must not make the user's first compile at another length dynamic."""
    model, symbolic = BreakFirst(), []

    def record(gm, example_inputs):
        symbolic.append(sum(isinstance(x, torch.SymInt) for x in example_inputs))
        return gm.forward

    assert len(explain(model, *retention_inputs(7)).claimed) == 1
    torch.compile(model, backend=record)(*retention_inputs(9))
    assert symbolic == [0, 0]  # static, as without the explain


def test_explain_frees_its_graphs(monkeypatch):
    """The trace's graphs (held by Dynamo's compiled code and installed globals) go with it."""
    explain_module = sys.modules["rtpcompile.explain"]  # NOTE: the attribute is the function
    traced = []
    find_regions = explain_module.find_regions_split

    def spy(gm, example_inputs):
        traced.append(weakref.ref(gm))
        return find_regions(gm, example_inputs)

    monkeypatch.setattr(explain_module, "find_regions_split", spy)
    model, args = BreakFirst(), retention_inputs(7)
    for _ in range(3):
        assert len(explain(model, *args).claimed) == 1
    gc.collect()
    assert len(traced) == 6 and [ref() for ref in traced] == [None] * 6


def test_without_own_resume_functions_isolated_entries_keep_the_limit_apart(
    eager_inductor, monkeypatch
):
    """The fallback for a torch without the private resume cache: isolate_recompiles."""
    if not fresh_caller.isolated():
        pytest.skip("torch.compile has no isolate_recompiles")
    monkeypatch.setattr(fresh_caller, "own_resume_functions", contextlib.nullcontext)
    model, args = BreakFirst(), retention_inputs(7)
    for _ in range(EXPLAINS):
        assert len(explain(model, *args).claimed) == 1
    backend.counters.clear()
    torch.compile(model, backend="rtp")(*args)
    assert backend.counters["regions_claimed"] == 1
