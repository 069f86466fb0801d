"""Context-parallel retention on 2 and 4 CPU processes (gloo) against one-process chunkwise.

One spawn per world size runs every scenario (spawning dominates the cost); each test then
checks one scenario's outputs, end states and gradients against the float64 single-process
result. Loss on rank r = <o_r, w_r> (+ <S_final, w_s> on the last rank), so the sum over ranks
is the single-process loss and gradients must match exactly (summed over ranks for gamma and
the initial state, which every rank holds).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from rtpcompile import ops

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed+gloo"
)

# name -> (B, H, K, V, chunk, lengths for world 2, lengths for world 4, initial state?)
CASES = {
    "even": (2, 2, 4, 4, 4, [12, 12], [6, 6, 6, 6], False),
    "uneven_k_ne_v": (1, 3, 3, 5, 4, [5, 14], [7, 1, 9, 3], False),
    "empty_shard": (1, 2, 4, 6, 8, [0, 13], [5, 0, 9, 0], False),
    "initial_state": (2, 2, 4, 2, 3, [9, 4], [2, 5, 0, 6], True),
    "float32": (1, 2, 8, 8, 16, [40, 33], [20, 20, 20, 13], False),
}


def _case_tensors(name: str, world: int) -> dict:
    B, H, K, V, chunk, l2, l4, with_state = CASES[name]
    dtype = torch.float32 if name == "float32" else torch.float64
    lengths = l2 if world == 2 else l4
    T = sum(lengths)
    g = torch.Generator().manual_seed(hash(name) % 1000)
    t = {
        "q": torch.randn(B, H, T, K, generator=g, dtype=dtype),
        "k": torch.randn(B, H, T, K, generator=g, dtype=dtype),
        "v": torch.randn(B, H, T, V, generator=g, dtype=dtype),
        # one head at gamma = 1 exactly, others well inside (0, 1)
        "gamma": torch.cat([torch.ones(1), torch.rand(H - 1, generator=g) * 0.4 + 0.55]).to(dtype),
        "w_o": torch.randn(B, H, T, V, generator=g, dtype=dtype),
        "w_s": torch.randn(B, H, K, V, generator=g, dtype=dtype),
        "s0": torch.randn(B, H, K, V, generator=g, dtype=dtype) if with_state else None,
    }
    t.update(lengths=lengths, chunk=chunk)
    return t


def _reference(t: dict) -> dict:
    leaves = {n: t[n].clone().requires_grad_() for n in ("q", "k", "v", "gamma")}
    s0 = None if t["s0"] is None else t["s0"].clone().requires_grad_()
    o, s = ops.retention_chunkwise(
        leaves["q"], leaves["k"], leaves["v"], leaves["gamma"], t["chunk"], initial_state=s0
    )
    ((o * t["w_o"]).sum() + (s * t["w_s"]).sum()).backward()
    out = {"o": o.detach(), "final": s.detach(), **{f"d{n}": x.grad for n, x in leaves.items()}}
    out["ds0"] = None if s0 is None else s0.grad
    return out


def _shard(x: torch.Tensor, rank: int, lengths: list[int]) -> torch.Tensor:
    return x.narrow(2, sum(lengths[:rank]), lengths[rank]).clone()


def _retention_worker(rank: int, world: int, t: dict) -> dict:
    from rtpcompile.distributed import context_parallel_retention

    lengths = t["lengths"]
    q, k, v = (_shard(t[n], rank, lengths).requires_grad_() for n in ("q", "k", "v"))
    gamma = t["gamma"].clone().requires_grad_()
    s0 = None if t["s0"] is None else t["s0"].clone().requires_grad_()
    o, end = context_parallel_retention(q, k, v, gamma, chunk_size=t["chunk"], initial_state=s0)
    loss = (o * _shard(t["w_o"], rank, lengths)).sum()
    if rank == world - 1:
        loss = loss + (end * t["w_s"]).sum()
    loss.backward()
    return {
        "o": o.detach(),
        "end": end.detach(),
        "dq": q.grad,
        "dk": k.grad,
        "dv": v.grad,
        "dgamma": gamma.grad,
        "ds0": None if s0 is None else s0.grad,
    }


def _model(layout: str):
    from rtpcompile.nn import RTPHybridLM

    torch.manual_seed(0)
    return RTPHybridLM(
        vocab_size=32, dim=16, num_layers=3, num_heads=2, layout=layout, ratio=2 / 3,
        learnable_decay=True,
    ).double()  # fmt: skip


def _model_worker(
    rank: int, world: int, layout: str, ids: torch.Tensor, lengths: list[int], compiled: bool
):
    from rtpcompile.distributed import context_parallel_forward, shard_sequence

    model = _model(layout)
    run = torch.compile(model, backend="aot_eager") if compiled else model
    logits = context_parallel_forward(run, shard_sequence(ids, rank, lengths))
    target = shard_sequence(ids.roll(-1, 1), rank, lengths)
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
    )
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"logits": logits.detach(), "grads": grads}


def _nonfinite_data(world: int):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3 * world, 3, generator=g) for _ in range(3))
    v[0, 0, -1, 1] = float("inf")  # the last rank's last position, head 0, value column 1
    return q, k, v, torch.tensor([0.9, 0.8])


def _nonfinite_worker(rank: int, world: int) -> tuple:
    from rtpcompile.distributed import context_parallel_retention

    q, k, v, gamma = _nonfinite_data(world)
    sl = slice(3 * rank, 3 * rank + 3)
    qs = q[:, :, sl].clone().requires_grad_()
    o, _ = context_parallel_retention(qs, k[:, :, sl], v[:, :, sl], gamma)
    o[..., 0].sum().backward()  # NOTE: value column 0 is finite everywhere
    return o.detach(), qs.grad


def _cancel_data(dtype):
    """One head of size 1, gamma = scale = 1: the state after token 0 is -1000, tokens 1 and 2
    add 1000 and 0.3, so o[2] = 0.3 exactly, every input representable in 16 bits."""
    q = k = torch.ones(1, 1, 3, 1, dtype=dtype)
    v = torch.tensor([-1000.0, 1000.0, 0.3]).reshape(1, 1, 3, 1).to(dtype)
    return q, k, v, torch.ones(1)


def _cancel_worker(rank: int, world: int) -> dict:
    from rtpcompile.distributed import context_parallel_retention

    out = {}
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v, gamma = _cancel_data(dtype)
        # NOTE: token 0 on rank 0, tokens 1 and 2 on the last rank, nothing in between
        sl = slice(0, 1) if rank == 0 else slice(1, 3) if rank == world - 1 else slice(1, 1)
        o, _ = context_parallel_retention(q[:, :, sl], k[:, :, sl], v[:, :, sl], gamma, scale=1.0)
        out[dtype] = o
    return out


def _autocast_worker(rank: int, world: int) -> tuple:
    """(plain, under a bfloat16 autocast) end states of float32 inputs."""
    from rtpcompile.distributed import context_parallel_retention

    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=g) for _ in range(3))
    gamma = torch.tensor([0.99, 0.9])
    plain = context_parallel_retention(q, k, v, gamma)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = context_parallel_retention(q, k, v, gamma)[1]
    return plain, cast


def _all_scenarios(rank: int, world: int, cases: dict, model_args: list) -> dict:
    out = {name: _retention_worker(rank, world, t) for name, t in cases.items()}
    out["nonfinite"] = _nonfinite_worker(rank, world)
    out["cancel"] = _cancel_worker(rank, world)
    out["autocast"] = _autocast_worker(rank, world)
    for layout, ids, lengths, compiled in model_args:
        name = f"model_{layout}" + ("_compiled" if compiled else "")
        out[name] = _model_worker(rank, world, layout, ids, lengths, compiled)
    return out


MODEL_LENGTHS = {2: [7, 10], 4: [3, 6, 0, 8]}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def spawned(request):
    from rtpcompile.distributed import run_local

    world = request.param
    cases = {name: _case_tensors(name, world) for name in CASES}
    ids = torch.randint(0, 32, (2, sum(MODEL_LENGTHS[world])), generator=torch.Generator())
    model_args = [(layout, ids, MODEL_LENGTHS[world], False) for layout in ("B", "C")]
    if world == 2:  # NOTE: a compiled hybrid: ranks compile different attention graphs
        model_args.append(("B", ids, MODEL_LENGTHS[world], True))
    results = run_local(_all_scenarios, world, args=(cases, model_args))
    return world, cases, model_args, results


def _close(actual, expected, name: str) -> None:
    tol = 1e-9 if actual.dtype == torch.float64 else 3e-4
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_retention_matches_single_process(spawned, case):
    world, cases, _, results = spawned
    t, ref = cases[case], _reference(cases[case])
    per_rank = [r[case] for r in results]
    _close(torch.cat([r["o"] for r in per_rank], dim=2), ref["o"], "output")
    _close(per_rank[-1]["end"], ref["final"], "final state")
    for n in ("dq", "dk", "dv"):
        _close(torch.cat([r[n] for r in per_rank], dim=2), ref[n], n)
    _close(sum(r["dgamma"] for r in per_rank), ref["dgamma"], "dgamma (summed over ranks)")
    if ref["ds0"] is not None:
        _close(sum(r["ds0"] for r in per_rank), ref["ds0"], "d initial_state (summed)")
    # every rank's end state is the state after its last position
    for rank, r in enumerate(per_rank):
        upto = sum(t["lengths"][: rank + 1])
        _, s = ops.retention_chunkwise(
            t["q"][:, :, :upto], t["k"][:, :, :upto], t["v"][:, :, :upto], t["gamma"],
            initial_state=t["s0"],
        )  # fmt: skip
        _close(r["end"], s, f"end state of rank {rank}")


@pytest.mark.parametrize("layout", ["B", "C", "B_compiled"])
def test_model_forward_matches_single_process(spawned, layout):
    """Logits and parameter gradients (summed over ranks) equal one process; compiled too (its
    collectives stay eager: compiled backwards ordered them differently per rank)."""
    world, _, model_args, results = spawned
    if layout.endswith("compiled") and world != 2:
        pytest.skip("the compiled hybrid runs with 2 ranks only (CI time)")
    (_, ids, lengths, _) = next(a for a in model_args if a[0] == layout[0])
    model = _model(layout[0])
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids.roll(-1, 1).reshape(-1), reduction="sum"
    )
    loss.backward()
    per_rank = [r[f"model_{layout}"] for r in results]
    _close(torch.cat([r["logits"] for r in per_rank], dim=1), logits.detach(), "logits")
    for name, p in model.named_parameters():
        total = sum(r["grads"][name] for r in per_rank if name in r["grads"])
        _close(total, p.grad, f"grad of {name} (summed over ranks)")


def test_mixers_it_cannot_shard_are_refused():
    """A sequence mixer that context_parallel_forward does not know would see only this rank's
    piece; a subclass keeping the stock forward and retention core is sharded like its base."""
    from torch import nn

    from rtpcompile.distributed.sequence_parallel import _CPRetention, _wrapper_for
    from rtpcompile.nn import MultiScaleRetention

    class Tweaked(MultiScaleRetention):
        pass

    class OwnForward(MultiScaleRetention):
        def forward(self, x, *args, **kwargs):
            return super().forward(x, *args, **kwargs) * 2

    class OwnMask(MultiScaleRetention):
        def parallel(self, q, k, v):
            return super().parallel(q, k, v).flip(2)

    class LinearAttention(nn.Module):
        pass

    assert _wrapper_for("a", Tweaked(8, 2)) is _CPRetention
    assert _wrapper_for("b", nn.Linear(2, 2)) is None
    with pytest.raises(ValueError, match=r"b \(OwnForward\) overrides MultiScaleRetention"):
        _wrapper_for("b", OwnForward(8, 2))
    # NOTE: the sharded forward replaces the parallel form too (it was sharded as the stock one)
    with pytest.raises(ValueError, match=r"d \(OwnMask\) overrides MultiScaleRetention's parallel"):
        _wrapper_for("d", OwnMask(8, 2))
    for bad in (LinearAttention(), nn.MultiheadAttention(8, 2)):
        with pytest.raises(ValueError, match="mixes the sequence"):
            _wrapper_for("c", bad)


def test_needs_process_group():
    from rtpcompile.distributed import context_parallel_retention

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(ValueError, match="init_process_group"):
        context_parallel_retention(q, q, q, torch.tensor([0.9]))


def test_bad_inputs_are_rejected_before_any_collective():
    from rtpcompile.distributed import context_parallel_retention, shard_lengths, shard_sequence

    q = torch.randn(1, 2, 4, 3)
    with pytest.raises(ValueError, match="gamma"):
        context_parallel_retention(q, q, q, torch.tensor([0.9, 1.5]))
    assert shard_lengths(10, 4) == [3, 3, 2, 2]
    with pytest.raises(ValueError, match="sum to"):
        shard_sequence(torch.zeros(1, 5), 0, [2, 2])
    from rtpcompile.distributed import context_parallel_forward
    from rtpcompile.nn import RTPHybridLM

    model = RTPHybridLM(vocab_size=32, dim=16, num_layers=2, num_heads=2)
    with pytest.raises(ValueError, match=r"\[B, T_r\] token ids, got \(5,\)"):
        context_parallel_forward(model, torch.randint(0, 32, (5,)))  # NOTE: was an IndexError


def test_a_tensor_scale_under_compile_is_a_named_graph_break():
    """Its value goes into the ranks' agreement check: traced, ``float()`` of it failed inside
    Dynamo ("sympy expression is NaN") until 2026-11-25. Now the call graph-breaks (before any
    collective) with a message saying so; ``fullgraph=True`` raises it."""
    from rtpcompile.distributed import context_parallel_retention

    def f(q, s):
        return context_parallel_retention(q, q, q, torch.tensor([0.9, 0.8]), scale=s)

    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(Exception, match="scale is a tensor .* pass a Python float"):
        torch.compile(f, backend="eager", fullgraph=True)(q, torch.tensor(0.3))


# Rank 1 deviates from rank 0 in one way; every rank must raise ValueError (no abort, no hang).
MISMATCHES = {
    "K": ("K=8", "K=4"),
    "H": ("H=3", "H=2"),
    "B": ("B=2", "B=1"),
    "V": ("V=3", "V=4"),
    "dtype": ("dtype=torch.float32", "dtype=torch.float64"),
    "scale": ("scale=0.25", "scale=0.5"),
    "initial_state": ("initial_state=True", "initial_state=False"),
    "needs_grad": ("needs_grad=True", "needs_grad=False"),
}


def _mismatch_call(rank: int, kind: str) -> None:
    from rtpcompile.distributed import context_parallel_retention

    dims = {"B": 1, "H": 2, "K": 4, "V": 4}
    odd = rank == 1
    if odd and kind in dims:
        dims[kind] = {"K": 8, "H": 3, "B": 2, "V": 3}[kind]
    B, H, K, V = dims["B"], dims["H"], dims["K"], dims["V"]
    dtype = torch.float32 if odd and kind == "dtype" else torch.float64
    q, k = torch.randn(B, H, 3, K, dtype=dtype), torch.randn(B, H, 3, K, dtype=dtype)
    v = torch.randn(B, H, 3, V, dtype=dtype)
    q.requires_grad_(odd and kind == "needs_grad")
    s0 = torch.zeros(B, H, K, V) if odd and kind == "initial_state" else None
    gamma = 1.5 if odd and kind == "invalid" else 0.9
    scale = 0.25 if odd and kind == "scale" else None
    context_parallel_retention(q, k, v, gamma, scale=scale, initial_state=s0)


def _mismatch_worker(rank: int, world: int, kinds: list[str], t: dict) -> dict:
    from rtpcompile.distributed import context_parallel_retention

    out = {}
    for kind in kinds:
        try:
            _mismatch_call(rank, kind)
            out[kind] = ("no error", "")
        except Exception as e:  # noqa: BLE001 -- reported back to the test
            out[kind] = (type(e).__name__, str(e))
    # the group is still usable, and a matching call afterwards is exact
    lengths = t["lengths"]
    q, k, v = (_shard(t[n], rank, lengths) for n in ("q", "k", "v"))
    out["after"] = context_parallel_retention(q, k, v, t["gamma"], chunk_size=t["chunk"])[0]
    return out


@pytest.fixture(scope="module")
def mismatch_results():
    from rtpcompile.distributed import run_local

    t = _case_tensors("uneven_k_ne_v", 2)
    return t, run_local(_mismatch_worker, 2, args=([*MISMATCHES, "invalid"], t))


@pytest.mark.parametrize("kind", list(MISMATCHES))
def test_mismatch_across_ranks_raises_on_every_rank(mismatch_results, kind):
    """A different K, H, B, V, dtype, scale, initial state or grad mode on one rank used to
    abort every worker inside gloo (collective size mismatch); now each rank raises the same
    ValueError naming the rank and the difference."""
    _, results = mismatch_results
    errors = [r[kind] for r in results]
    assert [e[0] for e in errors] == ["ValueError"] * 2, errors
    assert errors[0][1] == errors[1][1]
    rank1, rank0 = MISMATCHES[kind]
    assert f"rank 1 has {rank1}, rank 0 has {rank0}" in errors[0][1]


def test_invalid_input_on_one_rank_raises_on_every_rank(mismatch_results):
    t, results = mismatch_results
    (name0, msg0), (name1, msg1) = results[0]["invalid"], results[1]["invalid"]
    assert (name0, name1) == ("ValueError", "ValueError")
    assert "rank(s) [1] failed validation" in msg0
    assert "gamma" in msg1  # the rank with the bad input raises its own, precise error
    ref, _ = ops.retention_chunkwise(t["q"], t["k"], t["v"], t["gamma"], t["chunk"])
    _close(torch.cat([r["after"] for r in results], dim=2), ref, "output after the errors")


def test_a_non_finite_value_stays_where_causality_puts_it(spawned):
    """An inf on the last rank's last position: the single-process op makes that row non-finite
    only; the combine multiplied later ranks' states by a weight of 0 (0 * inf = NaN) and every
    row of every rank was NaN, outputs and dq, until 2026-11-25."""
    world, _, _, results = spawned
    q, k, v, gamma = _nonfinite_data(world)
    q.requires_grad_()
    single, _ = ops.retention_chunkwise(q, k, v, gamma)
    single[..., 0].sum().backward()
    o = torch.cat([r["nonfinite"][0] for r in results], dim=2)
    dq = torch.cat([r["nonfinite"][1] for r in results], dim=2)
    torch.testing.assert_close(o, single.detach(), rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(dq, q.grad, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert (~torch.isfinite(o[0, 0])).any(-1).nonzero().flatten().tolist() == [3 * world - 1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sixteen_bit_outputs_are_rounded_once(spawned, dtype):
    """A shard's output was its zero-state output, rounded to 16 bits, plus the entering
    state's part: 0.3 came out 0.5 (float16) and 0.0 (bfloat16) where the two cancel. Now the
    shard runs from the entering state, as the single-process op, and equals it."""
    _, _, _, results = spawned
    q, k, v, gamma = _cancel_data(dtype)
    single, _ = ops.retention_chunkwise(q, k, v, gamma, scale=1.0)
    o = torch.cat([r["cancel"][dtype] for r in results], dim=2)
    torch.testing.assert_close(o, single, rtol=0, atol=0)
    assert abs(o[0, 0, 2, 0].item() - 0.3) < 2e-3


def test_the_state_is_float32_under_autocast(spawned):
    """The local end state and the combine ran outside the op, under the caller's autocast:
    a bfloat16 state (error 3e-2) until 2026-11-25."""
    _, _, _, results = spawned
    for r in results:
        plain, cast = r["autocast"]
        assert cast.dtype == torch.float32
        torch.testing.assert_close(cast, plain, rtol=1e-6, atol=1e-6)
