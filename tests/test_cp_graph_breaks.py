"""context_parallel_retention inside torch.compile: no graph break, same results (2 gloo ranks).

The agreement check before the state exchange read the gathered integers with ``.tolist()``:
traced, that was three graph breaks per call ("Data dependent operator"). It is now one opaque
custom op while compiling; outputs, end states and every gradient must equal eager and the
float64 single-process reference, ``fullgraph=True`` must compile, and a mismatch or a bad
gamma on one rank must still raise on every rank (no hang).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from rtpcompile import ops

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed+gloo"
)

LENGTHS = [5, 8]  # NOTE: uneven, neither a multiple of the chunk
B, H, K, V, CHUNK = 1, 2, 3, 5, 4


def _tensors() -> dict:
    g = torch.Generator().manual_seed(7)
    T = sum(LENGTHS)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return {
        "q": randn(B, H, T, K),
        "k": randn(B, H, T, K),
        "v": randn(B, H, T, V),
        "gamma": torch.tensor([1.0, 0.8], dtype=torch.float64),  # NOTE: gamma = 1 exactly
        "s0": randn(B, H, K, V),
        "w_o": randn(B, H, T, V),
        "w_s": randn(B, H, K, V),
    }


def _loss_and_grads(fn, t: dict, rank: int, world: int) -> dict:
    a, n = sum(LENGTHS[:rank]), LENGTHS[rank]
    q, k, v = (t[name].narrow(2, a, n).clone().requires_grad_() for name in ("q", "k", "v"))
    gamma, s0 = t["gamma"].clone().requires_grad_(), t["s0"].clone().requires_grad_()
    o, end = fn(q, k, v, gamma, s0)
    loss = (o * t["w_o"].narrow(2, a, n)).sum()
    if rank == world - 1:
        loss = loss + (end * t["w_s"]).sum()
    loss.backward()
    grads = {
        name: x.grad
        for name, x in zip(("q", "k", "v", "gamma", "s0"), (q, k, v, gamma, s0), strict=True)
    }
    return {"o": o.detach(), "end": end.detach(), "grads": grads}


def _cp(q, k, v, gamma, s0):
    from rtpcompile.distributed import context_parallel_retention

    return context_parallel_retention(q, k, v, gamma, scale=0.5, chunk_size=CHUNK, initial_state=s0)


def _compiled_run(rank: int, world: int, t: dict, backend: str, dynamic: bool = False) -> dict:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(_cp, backend=backend, fullgraph=True, dynamic=dynamic)
    out = _loss_and_grads(fn, t, rank, world)
    out["graph_breaks"] = dict(counters["graph_break"])
    out["unique_graphs"] = counters["stats"]["unique_graphs"]
    return out


def _mismatched_call(rank: int, kind: str) -> str:
    """Compiled call where rank 1 deviates; returns the error raised here ('' for none)."""
    from rtpcompile.distributed import context_parallel_retention

    K_here = 4 if rank == 1 and kind == "K" else 3
    q = torch.randn(B, H, 3, K_here, dtype=torch.float64)
    v = torch.randn(B, H, 3, V, dtype=torch.float64)
    bad = rank == 1 and kind == "gamma"
    gamma = torch.tensor([0.9, 1.5 if bad else 0.7], dtype=torch.float64)
    torch._dynamo.reset()
    try:
        torch.compile(context_parallel_retention, backend="eager")(q, q, v, gamma, scale=0.5)
    except Exception as e:  # noqa: BLE001 -- reported back to the test
        return f"{type(e).__name__}: {e}"
    return ""


def _worker(rank: int, world: int, t: dict) -> dict:
    torch.set_num_threads(1)
    out = {"eager": _loss_and_grads(_cp, t, rank, world)}
    out["aot_eager"] = _compiled_run(rank, world, t, "aot_eager")
    out["errors"] = {kind: _mismatched_call(rank, kind) for kind in ("K", "gamma")}
    # the group is still usable; dynamic: B, H, K, V reach the agreement op as SymInts
    out["after_errors"] = _compiled_run(rank, world, t, "eager", dynamic=True)
    return out


def _reference(t: dict) -> dict:
    leaves = {n: t[n].clone().requires_grad_() for n in ("q", "k", "v", "gamma", "s0")}
    o, s = ops.retention_chunkwise(
        leaves["q"], leaves["k"], leaves["v"], leaves["gamma"], CHUNK, scale=0.5,
        initial_state=leaves["s0"],
    )  # fmt: skip
    ((o * t["w_o"]).sum() + (s * t["w_s"]).sum()).backward()
    return {"o": o.detach(), "end": s.detach(), "grads": {n: x.grad for n, x in leaves.items()}}


@pytest.fixture(scope="module")
def spawned():
    from rtpcompile.distributed import run_local

    t = _tensors()
    try:
        return t, run_local(_worker, 2, args=(t,))
    except torch.multiprocessing.ProcessExitedException as exc:
        # NOTE: once in four CI runs (2026-11-25) a rank died of SIGABRT ("terminate called
        # without an active exception") while the machine was loaded, not diagnosed; a signal
        # death gets one more spawn, an error raised by the worker does not
        if exc.exit_code is not None and exc.exit_code >= 0:
            raise
        return t, run_local(_worker, 2, args=(t,))


def _close(actual, expected, what: str) -> None:
    torch.testing.assert_close(
        actual, expected, rtol=1e-10, atol=1e-10, msg=lambda m: f"{what}: {m}"
    )


@pytest.mark.parametrize("run", ["eager", "aot_eager", "after_errors"])
def test_compiled_matches_eager_and_the_float64_reference(spawned, run):
    t, results = spawned
    ref = _reference(t)
    per_rank = [r[run] for r in results]
    _close(torch.cat([r["o"] for r in per_rank], 2), ref["o"], f"{run} output")
    _close(per_rank[-1]["end"], ref["end"], f"{run} final state")
    for name in ("q", "k", "v"):
        got = torch.cat([r["grads"][name] for r in per_rank], 2)
        _close(got, ref["grads"][name], f"{run} d{name}")
    for name in ("gamma", "s0"):  # replicated: the full gradient is the sum over ranks
        _close(sum(r["grads"][name] for r in per_rank), ref["grads"][name], f"{run} d{name}")
    for rank, r in enumerate(per_rank):  # bit-for-bit the eager computation
        _close(r["o"], results[rank]["eager"]["o"], f"{run} vs eager on rank {rank}")


@pytest.mark.parametrize("run", ["aot_eager", "after_errors"])
def test_no_graph_break(spawned, run):
    """Three "Data dependent operator" breaks per call before (one graph per piece)."""
    _, results = spawned
    for rank, r in enumerate(results):
        assert r[run]["graph_breaks"] == {}, (rank, r[run]["graph_breaks"])
        assert r[run]["unique_graphs"] == 1, (rank, r[run]["unique_graphs"])


def test_compiled_mismatch_and_bad_gamma_raise_on_every_rank(spawned):
    _, results = spawned
    k0, k1 = (r["errors"]["K"] for r in results)
    assert k0 == k1 and k0.startswith("ValueError"), (k0, k1)
    assert "rank 1 has K=4, rank 0 has K=3" in k0
    # the rank with the bad gamma raises its own error, the other one names it
    g0, g1 = (r["errors"]["gamma"] for r in results)
    assert g0.startswith("ValueError") and "rank(s) [1] failed validation" in g0, g0
    assert g1.startswith("ValueError") and "gamma values must lie in [0, 1]" in g1, g1


def _rtp_worker(rank: int, world: int, t: dict) -> dict:
    torch.set_num_threads(1)
    return _compiled_run(rank, world, t, "rtp")


@pytest.mark.slow  # NOTE: Inductor compiles forward and backward on each rank (~40 s on CPU)
def test_rtp_backend_compiles_it_whole_and_exact():
    from rtpcompile.distributed import run_local

    t = _tensors()
    ref, results = _reference(t), run_local(_rtp_worker, 2, args=(t,))
    assert [r["graph_breaks"] for r in results] == [{}, {}]
    _close(torch.cat([r["o"] for r in results], 2), ref["o"], "rtp output")
    for name in ("q", "k", "v"):
        got = torch.cat([r["grads"][name] for r in results], 2)
        _close(got, ref["grads"][name], f"rtp d{name}")
    for name in ("gamma", "s0"):
        _close(sum(r["grads"][name] for r in results), ref["grads"][name], f"rtp d{name}")
