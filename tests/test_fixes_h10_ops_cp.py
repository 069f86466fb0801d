"""Fixes from tester F (h10): a float scale under dynamic shapes, and context parallelism.

* The public ops ran ``math.isfinite`` on the scale: under ``dynamic=True`` (or automatic dynamic
  once a second value is seen) Dynamo traces a float as a SymFloat, so that was a graph break
  ("torch.* op returned non-Tensor"), an error under ``fullgraph=True``.
* ``context_parallel_retention`` packed a SymFloat scale with ``struct.pack`` (Dynamo's polyfill
  recursed without end: InternalTorchDynamoError), even for the default scale (``K**-0.5`` of a
  symbolic K).
* A ``chunk_size`` bad on one rank was checked only after the agreement check: that rank raised
  and the others waited in the state all-gather until the group's timeout.
* ``context_parallel_forward``: an attention layer with another batch size per rank aborted the
  process in gloo (EnforceNotMet, SIGABRT); the sharded mixers dropped ``state`` /
  ``return_state`` / ``past`` / ``return_kv`` silently (``y, s = msr(x, return_state=True)``
  split the output along the batch).
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

from rtpcompile import ops
from rtpcompile.lowering import reference as ref

Q_SHAPE = (1, 2, 7, 4)  # NOTE: T = 7, not a power of two


def _qkv_gamma():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(*Q_SHAPE, generator=g, dtype=torch.float64) for _ in range(3))
    return q, k, v, torch.tensor([0.9, 0.7], dtype=torch.float64)


def _check_against_reference(o, q, k, v, gamma, scale) -> None:
    expected, _ = ref.reference_recurrent(q, k, v, gamma, scale)
    torch.testing.assert_close(o, expected, rtol=1e-12, atol=1e-12)


class _ScaleAttr(torch.nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, q, k, v, gamma):
        return ops.retention(q, k, v, gamma, scale=self.scale)


@pytest.mark.parametrize("backend", ["aot_eager", "rtp"])
@pytest.mark.parametrize("how", ["argument", "closure", "attribute", "chunkwise"])
def test_a_float_scale_traces_whole_under_dynamic_shapes(backend, how):
    """fullgraph=True, dynamic=True: compiles, no graph break, and two scale values give the
    float64 reference (one graph per value: the op's ``float`` argument specialises it)."""
    q, k, v, gamma = _qkv_gamma()
    torch._dynamo.reset()
    counters.clear()
    for scale in (0.5, 0.3):
        # NOTE: a new function per value: a closure reads this iteration's scale
        if how == "argument":
            fn = torch.compile(
                lambda q, k, v, g, s: ops.retention(q, k, v, g, scale=s),
                backend=backend, dynamic=True, fullgraph=True,
            )  # fmt: skip
            o = fn(q, k, v, gamma, scale)
        elif how == "closure":
            fn = torch.compile(
                lambda q, k, v, g: ops.retention(q, k, v, g, scale=scale),  # noqa: B023
                backend=backend, dynamic=True, fullgraph=True,
            )  # fmt: skip
            o = fn(q, k, v, gamma)
        elif how == "attribute":
            o = torch.compile(_ScaleAttr(scale), backend=backend, dynamic=True, fullgraph=True)(
                q, k, v, gamma
            )
        else:
            fn = torch.compile(
                lambda q, k, v, g, s: ops.retention_chunkwise(q, k, v, g, 3, scale=s)[0],
                backend=backend, dynamic=True, fullgraph=True,
            )  # fmt: skip
            o = fn(q, k, v, gamma, scale)
        _check_against_reference(o, q, k, v, gamma, scale)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] <= 2


def test_a_changing_scale_under_automatic_dynamic_compiles_with_fullgraph():
    """Default ``dynamic``: the second value makes the scale symbolic; that trace failed."""
    q, k, v, gamma = _qkv_gamma()
    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(
        lambda q, k, v, g, s: ops.retention(q, k, v, g, scale=s), backend="aot_eager",
        fullgraph=True,
    )  # fmt: skip
    for scale in (0.5, 0.25, 0.125):
        _check_against_reference(fn(q, k, v, gamma, scale), q, k, v, gamma, scale)
    assert dict(counters["graph_break"]) == {}


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_scale_still_raises_the_same_error(bad):
    q, k, v, gamma = _qkv_gamma()
    message = "scale must be a finite number or None, got"
    with pytest.raises(ValueError, match=message):
        ops.retention(q, k, v, gamma, scale=bad)
    torch._dynamo.reset()
    fn = torch.compile(
        lambda q, k, v, g, s: ops.retention(q, k, v, g, scale=s), backend="aot_eager",
        dynamic=True,
    )  # fmt: skip
    fn(q, k, v, gamma, 0.5)
    with pytest.raises(ValueError, match=message):
        fn(q, k, v, gamma, bad)
    # NOTE: the raw op checks the real value too
    with pytest.raises(ValueError, match="scale must be finite"):
        torch.ops.rtp.retention_fwd(q, k, v, gamma, bad, None, "parallel", 0, False)


# --- context parallelism (2 gloo ranks, one spawn for all checks) ---------------------------

LENGTHS = [3, 5]
CHUNK = 2


def _cp_tensors() -> dict:
    g = torch.Generator().manual_seed(5)
    T = sum(LENGTHS)
    q, k = (torch.randn(1, 2, T, 4, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, 2, T, 3, generator=g, dtype=torch.float64)
    return {"q": q, "k": k, "v": v, "gamma": torch.tensor([0.9, 0.6], dtype=torch.float64)}


def _cp_call(q, k, v, gamma, scale):
    from rtpcompile.distributed import context_parallel_retention

    return context_parallel_retention(q, k, v, gamma, scale=scale, chunk_size=CHUNK)


def _error(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 -- reported back to the test
        return f"{type(e).__name__}: {e}"
    return ""


class _StateLM(torch.nn.Module):
    """A model of one's own that asks a mixer for its state (or cache)."""

    def __init__(self, kind: str) -> None:
        from rtpcompile.nn import CausalSelfAttention, MultiScaleRetention

        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.embed = torch.nn.Embedding(32, 16)
        retention = kind in ("return_state", "state")
        self.mixer = MultiScaleRetention(16, 2) if retention else CausalSelfAttention(16, 2)

    def forward(self, ids):
        x = self.embed(ids)
        if self.kind == "return_state":
            y, _ = self.mixer(x, return_state=True)
        elif self.kind == "state":
            y, _ = self.mixer(x, self.mixer.init_state(x.shape[0]))
        elif self.kind == "return_kv":
            y, _ = self.mixer(x, return_kv=True)
        else:
            y = self.mixer(x, offset=0)  # NOTE: the supported call
        return y


def _compiled_worker(rank: int, world: int, t: dict, scales: tuple) -> dict:
    """A float scale (None: the default one, K**-0.5 of a symbolic K) under dynamic=True,
    fullgraph=True."""
    torch.set_num_threads(1)
    a, n = sum(LENGTHS[:rank]), LENGTHS[rank]
    q, k, v = (t[name].narrow(2, a, n) for name in ("q", "k", "v"))
    out: dict = {}
    for scale in scales:
        torch._dynamo.reset()
        counters.clear()
        # NOTE: the eager backend: Dynamo's trace is what failed, and it is the cheapest
        fn = torch.compile(_cp_call, backend="eager", dynamic=True, fullgraph=True)
        try:
            o, end = fn(q, k, v, t["gamma"], scale)
            out[scale] = {"o": o, "end": end, "breaks": dict(counters["graph_break"])}
        except Exception as e:  # noqa: BLE001
            out[scale] = f"{type(e).__name__}: {str(e)[:300]}"
    return out


def _cp_worker(rank: int, world: int) -> dict:
    from rtpcompile.distributed import context_parallel_forward, shard_sequence
    from rtpcompile.nn import RTPHybridLM

    torch.set_num_threads(1)
    t = _cp_tensors()
    a, n = sum(LENGTHS[:rank]), LENGTHS[rank]
    q, k, v = (t[name].narrow(2, a, n) for name in ("q", "k", "v"))
    out: dict = {}
    # a bad chunk_size on rank 1 only; a short timeout turns the old hang into an error
    group = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=30))
    chunk = 0 if rank == 1 else CHUNK
    out["chunk"] = _error(lambda: _cp_call_chunk(q, k, v, t["gamma"], group, chunk))
    # another batch size per rank, attention first (layout A)
    ids = torch.randint(0, 32, (2 + rank, n), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    lm = RTPHybridLM(32, 16, 2, 2, layout="A", ratio=0.5)
    out["batch"] = _error(lambda: context_parallel_forward(lm, ids, group))
    # the sharded mixers refuse what asks for a state or a cache
    ids = torch.randint(0, 32, (2, sum(LENGTHS)), generator=torch.Generator().manual_seed(1))
    mine = shard_sequence(ids, rank, LENGTHS)
    for kind in ("return_state", "state", "return_kv", "plain"):
        out[kind] = _error(lambda kind=kind: context_parallel_forward(_StateLM(kind), mine, group))
    out["plain_out"] = context_parallel_forward(_StateLM("plain"), mine, group).detach()
    return out


def _cp_call_chunk(q, k, v, gamma, group, chunk):
    from rtpcompile.distributed import context_parallel_retention

    return context_parallel_retention(q, k, v, gamma, group, chunk_size=chunk)


pytestmark_dist = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed+gloo"
)


@pytest.fixture(scope="module")
def cp_results():
    from rtpcompile.distributed import run_local

    return run_local(_cp_worker, 2)


def _check_compiled(t: dict, results: list, scales: tuple) -> None:
    for scale in scales:
        got = [r[scale] for r in results]
        assert all(isinstance(g, dict) for g in got), got
        assert [g["breaks"] for g in got] == [{}, {}]
        expected, final = ref.reference_recurrent(t["q"], t["k"], t["v"], t["gamma"], scale)
        o = torch.cat([g["o"] for g in got], 2)
        torch.testing.assert_close(o, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[-1]["end"], final, rtol=1e-12, atol=1e-12)


@pytestmark_dist
def test_context_parallel_traces_a_symbolic_scale():
    """The default scale (K**-0.5 of a symbolic K) and two explicit ones, each a SymFloat under
    dynamic=True: InternalTorchDynamoError before."""
    from rtpcompile.distributed import run_local

    t = _cp_tensors()
    scales = (None, 0.5, 0.3)
    _check_compiled(t, run_local(_compiled_worker, 2, args=(t, scales)), scales)


@pytestmark_dist
def test_a_bad_chunk_size_on_one_rank_raises_on_every_rank(cp_results):
    results = cp_results
    r0, r1 = (r["chunk"] for r in results)
    assert r0.startswith("ValueError") and "rank(s) [1] failed validation" in r0, r0
    assert r1.startswith("ValueError") and "chunk_size must be a positive int" in r1, r1


@pytestmark_dist
def test_attention_with_another_batch_size_per_rank_raises_on_every_rank(cp_results):
    results = cp_results
    r0, r1 = (r["batch"] for r in results)
    assert r0 == r1 and r0.startswith("ValueError"), (r0, r1)
    assert "rank 1 has B=3, rank 0 has B=2" in r0


@pytestmark_dist
@pytest.mark.parametrize("kind", ["return_state", "state", "return_kv"])
def test_sharded_mixers_refuse_a_state_or_cache(cp_results, kind):
    results = cp_results
    for r in results:
        assert r[kind].startswith("ValueError"), r[kind]
        assert "context_parallel_forward" in r[kind] and "not supported" in r[kind]
        assert ("return_state=True" if kind == "return_state" else kind) in r[kind]


@pytestmark_dist
def test_sharded_mixers_still_take_offset_by_keyword(cp_results):
    results = cp_results
    assert [r["plain"] for r in results] == ["", ""]
    ids = torch.randint(0, 32, (2, sum(LENGTHS)), generator=torch.Generator().manual_seed(1))
    expected = _StateLM("plain")(ids).detach()
    torch.testing.assert_close(torch.cat([r["plain_out"] for r in results], 1), expected)
