"""Kernel block configurations: validated, used by every pass, searched, cached and reused.

Runs the generated kernels under the Triton interpreter on CPU (RTP_KERNELS=triton,
TRITON_INTERPRET=1, set per test like tests/test_kernels.py). Shapes are tiny and the
interpreter's "quick" search space (BV only) keeps every tuning to a handful of candidates.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton")

from rtpcompile import kernels, ops  # noqa: E402
from rtpcompile.kernels import cache, codegen, launch  # noqa: E402
from rtpcompile.kernels.spec import check_config, choose, default_blocks, render  # noqa: E402
from rtpcompile.lowering import plan, tune  # noqa: E402
from rtpcompile.lowering import reference as ref  # noqa: E402
from rtpcompile.lowering.plan import Problem  # noqa: E402

TOL = {torch.float32: 2e-4, torch.float16: 2e-2}


@pytest.fixture(autouse=True)
def _triton_on_cpu(triton_on_cpu):  # conftest.py
    yield


def close(actual, expected, dtype, what):
    err = (actual.double() - expected).abs().max().item()
    size = expected.abs().max().item() + 1e-6
    assert err <= TOL[dtype] * size, f"{what}: max error {err:.3e} vs max |ref| {size:.3e}"


def inputs(B, H, T, K, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=torch.float64) for d in (K, K, V))
    s0 = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)
    gamma = torch.linspace(0.3, 0.98, H, dtype=torch.float64)
    return q, k, v, gamma, s0


CASES = [
    # form, T, K, V, dtype, config
    ("chunkwise", 65, 16, 80, torch.float32, {"BV": 32, "num_warps": 8, "num_stages": 3}),
    ("chunkwise", 1, 12, 80, torch.float32, {"BV": 16}),
    ("chunkwise", 40, 48, 20, torch.float16, {"BV": 16, "num_stages": 1}),
    ("parallel", 65, 12, 80, torch.float32, {"BV": 32, "num_warps": 2}),
    ("recurrent", 3, 16, 40, torch.float32, {"BV": 16, "num_warps": 1}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-T{c[1]}-K{c[2]}-V{c[3]}-{c[4]}")
def test_configs_match_the_float64_reference(case):
    """Outputs, final state and every gradient with a non-default config (BV tiles V)."""
    form, T, K, V, dtype, config = case
    q, k, v, gamma, s0 = (x.requires_grad_() for x in inputs(1, 2, T, K, V))
    low = [x.detach().to(dtype) for x in (q, k, v)]
    lg, ls0 = gamma.detach().float(), s0.detach().float()
    scale = K**-0.5
    ro, rs = ref.reference_parallel(q, k, v, gamma, scale, s0)
    o, sf = kernels.triton_forward(form, *low, lg, scale, ls0, 16, config)
    close(o, ro, dtype, "o")
    close(sf, rs, dtype, "final state")
    gen = torch.Generator().manual_seed(1)
    do, dsf = (torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in (ro, rs))
    grads = torch.autograd.grad((ro * do).sum() + (rs * dsf).sum(), (q, k, v, gamma, s0))
    out = kernels.triton_backward(
        form, do.to(dtype), dsf.float(), *low, lg, scale, ls0, sf, 16, config
    )
    for name, a, e in zip(("dq", "dk", "dv", "dgamma", "ds0"), out, grads, strict=True):
        close(a, e, dtype, name)


def test_config_reaches_every_pass_and_names_its_module():
    q = torch.empty(1, 2, 300, 48, device="meta")
    v = torch.empty(1, 2, 300, 80, device="meta")
    g = torch.empty(2, device="meta")
    default = kernels.kernels_for("chunkwise", q, q, v, g, backward=True)
    tuned = kernels.kernels_for(
        "chunkwise", q, q, v, g, backward=True, config={"BV": 32, "num_warps": 16}
    )
    assert all(i.spec.num_warps == 16 for i in tuned)
    # NOTE: the split backward's dq/dk kernel reduces over V in steps of its own (dqk_blocks;
    # with d gamma wanted, as here, 16: blocks.row_dot_blocks)
    assert all(i.spec.BV == 32 for i in tuned if i.spec.stage != "dqk")
    assert [i.spec.BV for i in tuned if i.spec.stage == "dqk"] == [16]
    assert all(a.module != b.module for a, b in zip(default, tuned, strict=True))


def test_default_config_renders_as_before():
    base = choose("chunkwise", "fwd", 48, 80, torch.float16, torch.float16, 64)
    assert choose("chunkwise", "fwd", 48, 80, torch.float16, torch.float16, 64, {}) == base
    same = {"BV": base.BV, "num_warps": base.num_warps, "num_stages": base.num_stages}
    assert choose("chunkwise", "fwd", 48, 80, torch.float16, torch.float16, 64, same) == base
    staged = choose("parallel", "fwd", 48, 80, torch.float16, torch.float16, 64, {"num_stages": 3})
    assert staged.num_stages == 3 and staged != dataclasses.replace(staged, num_stages=2)
    # NOTE: num_stages is a launch option: the source (and module) stay those of the default
    assert render(staged) == render(choose("parallel", "fwd", 48, 80, torch.float16,
                                           torch.float16, 64))  # fmt: skip
    assert codegen.info(base).module == codegen.module_name(render(base))


def test_a_config_does_not_undo_the_row_dot_blocks():
    """A tuned config was measured without d gamma's sum: the d gamma pass keeps its 8 warps and
    (fused) its V block of at most 32, the dq/dk kernel its V step of 16 (blocks.row_dot_blocks:
    fewer warps or wider blocks spilled)."""
    cfg = {"BV": 64, "num_warps": 4}
    for stage, split in (("fused", 0), ("states", 1), ("output", 1)):
        spec = choose("chunkwise", "fwd", 64, 64, torch.bfloat16, torch.bfloat16, 64,
                      {**cfg, "split": split}, stage=stage, row_dot=True)  # fmt: skip
        plain = choose("chunkwise", "fwd", 64, 64, torch.bfloat16, torch.bfloat16, 64,
                       {**cfg, "split": split}, stage=stage)  # fmt: skip
        assert spec.num_warps == 8 and plain.num_warps == 4, stage
        assert spec.BV == (32 if stage == "fused" else 64) and plain.BV == 64, stage
    dqk = choose("chunkwise", "bwd", 64, 64, torch.bfloat16, torch.bfloat16, 64,
                 {**cfg, "split": 1}, stage="dqk", row_dot=True)  # fmt: skip
    assert (dqk.BV, dqk.num_warps) == (16, 8)


def test_bv_wider_than_the_pass_is_clamped():
    spec = choose("chunkwise", "bwd", 80, 20, torch.float32, torch.float32, 16, {"BV": 128})
    assert spec.BV == 32  # the smallest power-of-two block covering V=20


@pytest.mark.parametrize(
    "config, message",
    [
        ({"BV": 24}, "BV must be a power of two in \\[16, 256\\], got 24"),
        ({"BV": 8}, "BV must be a power of two in \\[16, 256\\], got 8"),
        ({"BV": 512}, "got 512"),
        ({"BV": True}, "must be an integer, got bool"),
        ({"num_warps": 3}, "num_warps must be a power of two in \\[1, 32\\], got 3"),
        ({"num_stages": 0}, "num_stages must be in \\[1, 8\\], got 0"),
        ({"BK": 32}, "among \\['BV', 'num_warps', 'num_stages', 'split'\\].*got \\['BK'\\]"),
    ],
)
def test_bad_config_is_a_clear_value_error(config, message):
    with pytest.raises(ValueError, match=message):
        check_config(config)
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match=message):
        kernels.triton_forward("chunkwise", q, q, q, torch.tensor([0.9]), 1.0, None, 16, config)


def test_memoised_specs_equal_fresh_ones_and_bad_configs_raise_every_time():
    q = torch.randn(1, 2, 20, 48)
    p = launch.Pass("chunkwise", q, q, torch.randn(1, 2, 20, 80), torch.full((2,), 0.9), 0.5)
    for config in (None, {"BV": 32, "num_warps": 2}):
        fresh = choose("chunkwise", "fwd", 48, 80, q.dtype, q.dtype, 16, config,
                       state_out=False, store_o=True)  # fmt: skip
        assert launch._spec(p, 16, config) == fresh
        assert launch._spec(p, 16, config) is launch._spec(p, 16, config)
    for _ in range(2):  # a ValueError is not memoised away
        with pytest.raises(ValueError, match="BV must be a power of two"):
            launch._spec(p, 16, {"BV": 24})
    launch._spec(p, 16, {"num_warps": 1})
    with pytest.raises(ValueError, match="must be an integer, got bool"):
        launch._spec(p, 16, {"num_warps": True})  # equal to a cached 1 as a key, still refused
    assert launch._spec(p, 16, (("BV", 32),)) == launch._spec(p, 16, {"BV": 32})  # pairs


# ----------------------------------------------------------------------------- the search


def triton_problem(T=20, K=16, V=40, phase="fwd") -> Problem:
    return Problem(1, 1, T, K, V, "float32", "cpu", "triton", False, phase)


def test_search_space_and_pruning(monkeypatch):
    p = triton_problem()
    quick = tune.candidates(p, configs=True)
    for form_chunk in {(c.form, c.chunk_size) for c in quick}:  # interpreter: BV only
        assert len({c.config[1:] for c in quick if (c.form, c.chunk_size) == form_chunk}) == 1
    assert {dict(c.config)["BV"] for c in quick} == {32, 64}
    assert all(not c.config for c in tune.candidates(p))  # what the cost model compares
    monkeypatch.setenv("RTP_TUNE_CONFIGS", "full")
    mid = tune.candidates(triton_problem(T=4096, K=64, V=64), configs=True)
    # NOTE: float32's split runs min(C, 32)-row chunks and its fused pass 16-row chunks
    # (blocks._wide_blocks), so C = 64 launches what C = 32 does and is deduplicated
    assert {(c.form, c.chunk_size) for c in mid} == {
        ("parallel", 64), ("chunkwise", 16), ("chunkwise", 32)
    }  # fmt: skip
    assert {c.config for c in mid if len(c.config) == 3} == {
        (("BV", bv), ("num_stages", st), ("num_warps", w))
        for bv in (32, 64) for st in (1, 2, 3) for w in (4, 8)
    }  # fmt: skip
    # chunkwise also tries each BV the other way from the split rule, which splits float32 at
    # every chunk size, with the fused pass's default warps (float32: 8); the fused pass's 16-row
    # chunks are the same for every C, so only C = 16 keeps them; see test_kernel_split
    fused_warps = default_blocks("chunkwise", 64, 64, 64, dtype="float32")["num_warps"]
    assert {(c.chunk_size, c.config) for c in mid if len(c.config) == 4} == {
        (16, (("BV", bv), ("num_stages", 2), ("num_warps", fused_warps), ("split", 0)))
        for bv in (32, 64)
    }  # fmt: skip
    big = triton_problem(T=4096, K=256, V=256, phase="bwd")
    full = tune.candidates(big, configs=True)
    assert len(full) < 3 * 2 * 3 * 2 * 3  # pruned: e.g. no 3-stage pipeline of float32 K=256
    # float32 runs at most 32-row chunks (C = 64 is C = 32); in 16-bit, K=256 clamps a fused BT
    # to 32, but split passes (the rule at K=256) keep 64-row chunks
    assert {c.chunk_size for c in full if c.form == "chunkwise"} == {16, 32}
    assert default_blocks("chunkwise", 256, 256, 64)["BT"] == 32
    assert default_blocks("chunkwise", 256, 256, 64, split=True)["BT"] == 64
    firsts = {(c.form, c.chunk_size): c for c in reversed(full)}.values()  # the defaults
    for c in full:
        assert c in firsts or tune.why_not_fits(big, c.form, c.chunk_size, dict(c.config)) is None
    reason = tune.why_not_fits(big, "chunkwise", 32, {"BV": 256, "num_warps": 4, "num_stages": 3})
    assert "per thread" in reason
    monkeypatch.setenv("RTP_TUNE_CONFIGS", "sometimes")
    with pytest.raises(ValueError, match="RTP_TUNE_CONFIGS must be one of"):
        tune.candidates(p, configs=True)


def test_autotune_stores_the_winning_config_and_reuses_it():
    p = triton_problem()
    tuned = plan.plan_for(p, tune=True)
    assert tuned.source == "tuned" and dict(tuned.config)["BV"] in (32, 64)
    assert plan.counters["benchmarks"] == len(tune.candidates(p, configs=True)) > 1
    stored = cache.load(plan.cache_key(p))
    assert stored["config"] == dict(tuned.config)
    assert len(stored["timings"]) == plan.counters["benchmarks"]
    plan.reset()
    again = plan.plan_for(p, tune=True)
    assert (again.source, again.form, again.chunk_size) == ("cache", tuned.form, tuned.chunk_size)
    assert again.config == tuned.config
    assert plan.counters["benchmarks"] == 0


def _prefer(monkeypatch, label_part: str):
    """Fake timings: each candidate runs once; those whose label has ``label_part`` win."""
    real = tune._runner

    def runner(p, candidate, x):
        fn = real(p, candidate, x)
        return lambda: (fn(), candidate.label)[1]

    monkeypatch.setattr(tune, "_runner", runner)
    monkeypatch.setattr(tune, "_time", lambda fn, device: 1.0 if label_part in fn() else 2.0)


def test_warm_cache_config_is_used_by_the_op_forward_and_backward(monkeypatch):
    q, k, v, gamma, _ = inputs(1, 1, 20, 16, 40)
    _prefer(monkeypatch, "chunkwise(C=16)[BV=32")
    for phase in ("fwd", "bwd"):
        # NOTE: the forward of ops.retention(...) returns no state (a problem of its own)
        problem = plan.problem_of(q.float(), v.float(), False, phase=phase, state_out=False)
        won = plan.plan_for(problem, tune=True)
        warps = default_blocks("chunkwise", 16, 40, 16, split=True, dtype="float32")["num_warps"]
        assert won.config == (("BV", 32), ("num_stages", 2), ("num_warps", warps))
    plan.reset()  # a fresh process: the plans now come from the cache
    launch._choose.cache_clear()  # and no spec memoised by the tuning runs
    seen = []
    real = launch.choose
    monkeypatch.setattr(launch, "choose", lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v, gamma)]
    o = ops.retention(*leaves)
    w = torch.linspace(-1, 1, 40, dtype=torch.float64)
    (o * w.float()).sum().backward()
    assert plan.stats()["cache_hits"] == 2 and plan.stats()["benchmarks"] == 0
    assert seen and all(s.form == "chunkwise" and s.BT == 16 for s in seen)
    # 32 for V=40, clamped to 16 when the pass has V=16 (the dq pass's states stage)
    assert {s.BV for s in seen} == {16, 32}
    r_in = [x.requires_grad_() for x in (q, k, v, gamma)]
    expected = ref.reference_parallel(*r_in)[0]
    close(o.detach(), expected.detach(), torch.float32, "o through the op")
    grads = torch.autograd.grad((expected * w).sum(), r_in)
    for name, a, e in zip(("dq", "dk", "dv", "dgamma"), leaves, grads, strict=True):
        close(a.grad, e, torch.float32, f"{name} through the op")


def test_failing_candidates_are_skipped_and_others_reraise(monkeypatch):
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(tune, "_time", lambda fn, device: (fn(), 1.0)[1])
    real = tune._runner

    def runner(exc):
        def make(p, candidate, x):
            if "BV=32" not in candidate.label:
                return real(p, candidate, x)
            return lambda: (_ for _ in ()).throw(exc)

        return make

    monkeypatch.setattr(tune, "_runner", runner(OutOfResources(262144, 232448, "shared memory")))
    p = triton_problem()
    won = plan.plan_for(p, tune=True)
    assert dict(won.config)["BV"] == 64
    timings = cache.load(plan.cache_key(p))["timings"]
    assert all((t is None) == ("BV=32" in label) for label, t in timings.items())
    plan.reset()
    monkeypatch.setattr(tune, "_runner", runner(RuntimeError("kernel bug")))
    with pytest.raises(RuntimeError, match="kernel bug") as info:
        plan.plan_for(triton_problem(T=24), tune=True, force=True)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "BV=32" in notes and "shape (1, 1, 24, 16)" in notes
    assert "stride (384, 384, 16, 1)" in notes


def test_invalid_cached_config_is_a_miss():
    p = triton_problem()
    value = {"form": "chunkwise", "chunk_size": 16, "config": {"BK": 32}, "time_ms": 1.0,
             "timings": {}}  # fmt: skip
    assert cache.store(plan.cache_key(p), value)
    assert plan.plan_for(p).source == "model"
    assert plan.stats()["cache_misses"] == 1


def test_tune_command_reports_the_config(monkeypatch, capsys):
    from rtpcompile.commands import tune as command

    monkeypatch.setattr(tune, "_time", lambda fn, device: (fn(), 1.0)[1])
    args = argparse.Namespace(
        shape=[(1, 1, 20, 16, 40)], dtype="float32", device="cpu", phase="fwd", state=False,
        force=False,
    )  # fmt: skip
    assert command.run(args) == 0
    out = capsys.readouterr().out
    assert "[BV=" in out and "num_warps=" in out and "(autotuned)" in out and "triton" in out
