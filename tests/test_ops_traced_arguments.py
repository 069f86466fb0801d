"""The ops' scalar arguments under torch.compile and torch.export (found 2026-11-25): a tensor
scale, a chunk size computed from T or given as a tensor; and cache entries the planner must
not obey blindly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from rtpcompile import ops
from rtpcompile.lowering.reference import reference_recurrent

GAMMA = torch.tensor([0.9, 0.5])


def _qkv(t: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, t, 4, generator=gen) for _ in range(3)]


pytestmark = pytest.mark.usefixtures("fresh_compile")


class ScaledByBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(0.3))

    def forward(self, q, k, v):
        return ops.retention(q, k, v, GAMMA, scale=self.scale)


def test_a_tensor_scale_compiles_with_fullgraph_and_exports():
    """float(tensor) is data a trace cannot read: an internal Dynamo error under fullgraph and a
    data-dependent guard in torch.export until the scale was folded into q there."""
    q, k, v = _qkv(5)
    want, _ = reference_recurrent(q, k, v, GAMMA, 0.3)
    model = ScaledByBuffer()
    got = torch.compile(model, fullgraph=True)(q, k, v)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    exported = torch.export.export(model, (q, k, v))
    torch.testing.assert_close(exported.module()(q, k, v).double(), want, rtol=1e-5, atol=1e-5)
    model.scale = torch.tensor(0.6)  # NOTE: the buffer's value is read at each call
    want, _ = reference_recurrent(q, k, v, GAMMA, 0.6)
    torch.testing.assert_close(torch.compile(model)(q, k, v).double(), want, rtol=1e-5, atol=1e-5)


def test_a_chunk_size_computed_from_t_does_not_recompile_per_length():
    """``chunk_size=max(16, T // 4)`` specialised T (one graph per length, then the recompile
    limit); it is checked without a guard now."""

    def f(q, k, v):
        return ops.retention_chunkwise(q, k, v, GAMMA, chunk_size=max(16, q.shape[2] // 4))[0]

    compiled = torch.compile(f, fullgraph=True)
    for t in (64, 80, 96, 112, 130):
        q, k, v = _qkv(t, seed=t)
        want, _ = reference_recurrent(q, k, v, GAMMA, 0.5)
        torch.testing.assert_close(compiled(q, k, v).double(), want, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2  # NOTE: static, then dynamic


def test_a_tensor_chunk_size_under_compile_is_a_named_graph_break():
    """A tensor's value is not known while tracing: the call graph-breaks with a message naming
    the cause (fullgraph=True raises it) and otherwise runs eagerly, as an eager call reads it.
    Until 2026-11-25 a ValueError was raised that Dynamo swallowed ("Observed exception")."""
    q, k, v = _qkv(40)
    eager = ops.retention_chunkwise(q, k, v, GAMMA, chunk_size=torch.tensor(16))[0]
    assert eager.shape == (1, 2, 40, 4)  # NOTE: eagerly a torch integer is read as an int

    def f(q, k, v, c):
        return ops.retention_chunkwise(q, k, v, GAMMA, chunk_size=c)[0]

    with pytest.raises(Exception, match="chunk_size is a tensor .* pass a Python int"):
        torch.compile(f, fullgraph=True)(q, k, v, torch.tensor(16))
    torch._dynamo.reset()
    got = torch.compile(f)(q, k, v, torch.tensor(16))
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    assert any("chunk_size is a tensor" in reason for reason in counters["graph_break"])


def test_a_cached_parallel_plan_too_big_for_this_call_is_ignored(tmp_path, monkeypatch, caplog):
    """An entry serves a whole bucket and may be imported: the parallel form's T x T memory rule
    holds at each call (40 GiB of temporaries here against the 2 GiB CPU budget)."""
    from rtpcompile.kernels import cache
    from rtpcompile.lowering import plan

    monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path))
    plan.reset()
    q, v = torch.empty(1, 8, 16384, 64), torch.empty(1, 8, 16384, 64)
    problem = plan.problem_of(q, v, False, phase="fwd", request="auto", chunk=0, backend="aten")
    entry = {"form": "parallel", "chunk_size": 64, "config": {}, "time_ms": 1.0}
    assert cache.store(plan.cache_key(problem), entry | {"timings": {"parallel": 1.0}})
    plan.reset()
    with caplog.at_level("WARNING", logger="rtpcompile"):
        chosen = plan.choose("auto", 16384, False, 0, q=q, v=v, tune=False)
    assert chosen.form == "chunkwise" and chosen.source == "model"
    assert "ignoring a cached parallel plan" in caplog.text
    plan.reset()


def test_cache_clear_leaves_a_directory_in_an_entry_s_place(tmp_path, monkeypatch, caplog):
    from rtpcompile.kernels import cache

    monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("RTP_CACHE", "on")
    cache.directory().mkdir(parents=True, exist_ok=True)
    (cache.directory() / f"{'a' * 24}.json").mkdir()  # named like an entry
    (cache.directory() / f"{'b' * 24}.json").write_text("{}")  # a corrupt entry: removed
    (cache.directory() / "notes.json").write_text("{}")  # not an entry: left alone
    with caplog.at_level("WARNING", logger="rtpcompile"):
        assert cache.clear() == 1
    assert (cache.directory() / f"{'a' * 24}.json").is_dir()
    assert (cache.directory() / "notes.json").is_file()
    assert "is a directory, not an entry" in caplog.text


def test_a_memoised_parallel_plan_is_checked_at_each_call_s_shape(monkeypatch):
    """The plan memo is per bucket: a parallel plan a smaller call (T = 33) took from the cache
    was reused for T = 64 of the same bucket, where its temporaries exceed the budget."""
    import dataclasses

    from rtpcompile.kernels import cache
    from rtpcompile.lowering import cost, plan

    def bytes_at(t):
        return 4.0 * t * t * 5  # NOTE: B = H = 1: the aten parallel form's temporaries

    budget = dataclasses.replace(cost.MACHINES["aten"], memory=int(bytes_at(40)))
    monkeypatch.setitem(cost.MACHINES, "aten", budget)
    monkeypatch.setattr(
        cache, "load", lambda key: {"form": "parallel", "chunk_size": 64, "config": {}}
    )
    plan.reset()

    def problem(t):
        return plan.Problem(1, 1, t, 16, 16, "float32", "cpu", "aten", False)

    assert plan.plan_for(problem(33)).form == "parallel"
    assert plan.plan_for(problem(64)).form == "chunkwise"
    plan.reset()


def test_a_non_finite_tensor_scale_raises_when_compiled():
    """Folded into q when traced, the scale skipped check_scale's finiteness test (NaN outputs)."""
    q, k, v = _qkv(5)

    def f(q, k, v, s):
        return ops.retention(q, k, v, GAMMA, scale=s)

    with pytest.raises(RuntimeError, match="scale must be a finite number"):
        torch.compile(f, fullgraph=True)(q, k, v, torch.tensor(float("nan")))
