"""The planner: rules, shape buckets, cost model, autotuning, counters, failing candidates."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rtpcompile import ops
from rtpcompile.kernels import cache
from rtpcompile.lowering import plan, reference, tune
from rtpcompile.lowering.plan import Plan, Problem


@pytest.fixture(autouse=True)
def fresh(fresh_plans):
    yield


def problem(T=512, B=1, H=8, K=64, V=64, **changes) -> Problem:
    p = Problem(B, H, T, K, V, "float32", "cpu", "aten", False)
    return dataclasses.replace(p, **changes)


def tensors(B=1, H=2, T=40, K=8, V=8):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, T, K, generator=g)
    return q, torch.randn(B, H, T, K, generator=g), torch.randn(B, H, T, V, generator=g)


# ----------------------------------------------------------------------------- rules


@pytest.mark.parametrize(
    "form, T, has_state, chunk, expected",
    [
        ("auto", 1, False, 0, ("recurrent", "rule")),
        ("auto", 16, True, 0, ("recurrent", "rule")),
        ("parallel", 4096, False, 0, ("parallel", "forced")),
        ("recurrent", 300, True, 0, ("recurrent", "forced")),
        ("chunkwise", 300, False, 32, ("chunkwise", "forced")),
    ],
)
def test_rules_and_forced_forms(form, T, has_state, chunk, expected):
    q, _, v = tensors(T=T)
    got = plan.choose(form, T=T, has_state=has_state, chunk_size=chunk, q=q, v=v)
    assert (got.form, got.source) == expected
    if chunk:
        assert got.chunk_size == chunk
    assert plan.stats()["cache_misses"] == 0  # decided without touching the cache


def test_chunk_size_option_is_honoured(monkeypatch):
    monkeypatch.setenv("RTP_CHUNK_SIZE", "48")
    q, _, v = tensors(T=300)
    got = plan.choose("chunkwise", T=300, has_state=False, q=q, v=v)
    assert (got.form, got.chunk_size, got.source) == ("chunkwise", 48, "forced")


def test_choose_without_tensors_uses_the_model():
    got = plan.choose("auto", T=4096, has_state=False)
    assert got.form == "chunkwise" and got.source == "model"


def test_describe_and_label():
    p = Plan("chunkwise", 64, "cache", (("BT", 64), ("num_warps", 4)))
    assert p.label == "chunkwise(C=64)[BT=64,num_warps=4]"
    assert plan.describe(p) == "chunkwise(C=64)[BT=64,num_warps=4] (autotune cache)"
    assert plan.describe(Plan("parallel", 64, "model")) == "parallel (cost model)"
    hash(p)  # plans are hashable (memo keys, sets)


# ----------------------------------------------------------------------------- buckets


@pytest.mark.parametrize(
    "T, bucket", [(2, 2), (3, 4), (64, 64), (65, 128), (256, 256), (257, 512), (1000, 1024)]
)
def test_sequence_bucket_is_next_power_of_two(T, bucket):
    assert problem(T=T).bucket()["T"] == bucket


def test_bucket_boundaries_in_cache_keys():
    key = plan.cache_key
    assert key(problem(T=129)) == key(problem(T=256))
    assert key(problem(T=256)) != key(problem(T=257))
    assert key(problem(B=2, H=3)) == key(problem(B=1, H=5))  # B*H 6 and 5 -> 8
    assert key(problem(B=3, H=3)) != key(problem(B=1, H=8))  # 9 -> 16
    assert key(problem(K=64)) != key(problem(K=65))  # K and V exact
    assert key(problem(V=64)) != key(problem(V=32))
    assert key(problem(phase="bwd")) != key(problem())
    assert key(problem(has_state=True)) != key(problem())
    assert key(problem(dtype="bfloat16")) != key(problem())
    assert cache.check_key(key(problem())) is None


def test_one_tuning_per_bucket(monkeypatch):
    monkeypatch.setenv("RTP_AUTOTUNE", "1")
    for T in (33, 40, 64):  # one bucket
        q, _, v = tensors(T=T)
        assert plan.choose("auto", T=T, has_state=False, q=q, v=v).source == "tuned"
    assert plan.counters["tunings"] == 1
    q, _, v = tensors(T=65)  # the next bucket
    plan.choose("auto", T=65, has_state=False, q=q, v=v)
    assert plan.counters["tunings"] == 2


def test_memo_reads_the_disk_once_per_bucket(monkeypatch):
    reads = []
    real = cache.load
    monkeypatch.setattr(cache, "load", lambda key: reads.append(key) or real(key))
    q, _, v = tensors(T=100)
    for _ in range(5):
        plan.choose("auto", T=100, has_state=False, q=q, v=v)
    assert len(reads) == 1
    assert plan.stats() == {
        "benchmarks": 0, "tunings": 0, "cache_hits": 0, "cache_misses": 1, "model": 1
    }  # fmt: skip


# ----------------------------------------------------------------------------- autotuning


def test_autotune_stores_and_reuses_the_winner(monkeypatch):
    monkeypatch.setenv("RTP_AUTOTUNE", "1")
    p = problem(T=200, H=2, K=16, V=16)
    tuned = plan.plan_for(p, tune=True)
    assert tuned.source == "tuned"
    assert plan.counters["benchmarks"] == len(tune.candidates(p))
    stored = cache.load(plan.cache_key(p))
    assert (stored["form"], stored["chunk_size"]) == (tuned.form, tuned.chunk_size)
    assert set(stored["timings"]) == {c.label for c in tune.candidates(p)}
    plan.reset()
    again = plan.plan_for(p, tune=True)
    assert (again.form, again.chunk_size, again.source) == (tuned.form, tuned.chunk_size, "cache")
    assert plan.counters["benchmarks"] == 0


def test_cache_is_read_even_without_autotune():
    p = problem(T=300, H=2, K=16, V=16)
    plan.plan_for(p, tune=True)
    plan.reset()
    assert plan.plan_for(p, tune=False).source == "cache"


def test_autotune_with_cache_off_benchmarks_once_per_process(monkeypatch):
    monkeypatch.setenv("RTP_CACHE", "off")
    p = problem(T=100, H=2, K=8, V=8)
    assert plan.plan_for(p, tune=True).source == "tuned"
    assert plan.plan_for(p, tune=True).source == "tuned"
    assert plan.counters["tunings"] == 1
    assert not cache.directory().exists()


def test_backward_phase_benchmarks_the_backward():
    p = problem(T=80, H=2, K=8, V=4, phase="bwd", has_state=True)
    assert plan.plan_for(p, tune=True).source == "tuned"


def test_autotuning_does_not_touch_the_global_rng(monkeypatch):
    monkeypatch.setenv("RTP_AUTOTUNE", "1")
    q, k, v = tensors(T=70)
    before = torch.get_rng_state()
    ops.retention(q, k, v, ops.retention_init_decay(2))
    assert torch.equal(before, torch.get_rng_state())
    assert plan.counters["tunings"] == 1


def test_autotuned_op_matches_the_reference(monkeypatch):
    monkeypatch.setenv("RTP_AUTOTUNE", "1")
    q, k, v = (x.double().requires_grad_() for x in tensors(T=150, K=8, V=6))
    gamma = ops.retention_init_decay(2, dtype=torch.float64).requires_grad_()
    o = ops.retention(q, k, v, gamma)
    expected, _ = reference.reference_parallel(q, k, v, gamma)
    torch.testing.assert_close(o, expected)
    grads = torch.autograd.grad(o.sum(), (q, k, v, gamma))
    want = torch.autograd.grad(expected.sum(), (q, k, v, gamma))
    for got, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(got, ref)
    assert plan.counters["tunings"] >= 1


# ----------------------------------------------------------------------------- failures


def _failing_runner(exc_for):
    real = tune._runner

    def runner(p, candidate, x):
        exc = exc_for(candidate)
        if exc is None:
            return real(p, candidate, x)

        def boom():
            raise exc

        return boom

    return runner


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
        type("CompilationError", (Exception,), {})("at 3:4: bad"),
        type("OutOfResources", (Exception,), {})("shared memory, required: 262144"),
    ],
    ids=["oom", "compile-error", "out-of-resources"],
)
def test_failing_candidates_score_infinite_and_are_skipped(monkeypatch, exc):
    monkeypatch.setattr(
        tune, "_runner", _failing_runner(lambda c: exc if c.form == "parallel" else None)
    )
    p = problem(T=40, H=2, K=8, V=8)
    won = plan.plan_for(p, tune=True)
    assert won.form == "chunkwise"
    assert cache.load(plan.cache_key(p))["timings"]["parallel"] is None


def test_other_errors_reraise_with_shapes_and_strides(monkeypatch):
    monkeypatch.setattr(tune, "_runner", _failing_runner(lambda c: ValueError("kernel bug")))
    with pytest.raises(ValueError, match="kernel bug") as info:
        plan.plan_for(problem(T=40, H=2, K=8, V=8), tune=True)
    notes = "\n".join(getattr(info.value, "__notes__", [])) or str(info.value)
    assert "shape (1, 2, 40, 8)" in notes and "stride (640, 320, 8, 1)" in notes


def test_all_candidates_failing_falls_back_to_the_model(monkeypatch):
    monkeypatch.setattr(tune, "_runner", _failing_runner(lambda c: MemoryError()))
    p = problem(T=40, H=2, K=8, V=8)
    assert plan.plan_for(p, tune=True).source == "model"
    assert cache.load(plan.cache_key(p)) is None


def test_parallel_too_big_for_memory_is_not_run():
    p = problem(T=1 << 16, H=8)
    assert tune.estimate(p, Plan("parallel", 64)) == float("inf")
    assert plan.plan_for(p).form == "chunkwise"


# ----------------------------------------------------------------------------- cost model


@pytest.mark.parametrize("phase", ["fwd", "bwd"])
@pytest.mark.parametrize("BH", [8, 32, 128])
def test_cost_model_matches_the_measured_cpu_crossover(phase, BH):
    """docs/autotune.md: on the CI CPU, K=V=64, parallel wins up to T=128, chunkwise(C~64) after."""
    for T in (16, 64, 128):
        assert tune.model_choice(problem(T=T, H=BH, phase=phase)).form == "parallel"
    for T in (256, 512, 2048, 16384):
        chosen = tune.model_choice(problem(T=T, H=BH, phase=phase))
        assert chosen.form == "chunkwise" and chosen.chunk_size in (32, 64, 128)


def test_cost_model_estimates_are_positive_and_grow_with_T():
    for backend in ("aten", "triton"):
        for c in tune.candidates(problem(T=1024, backend=backend)):
            short = tune.estimate(problem(T=512, backend=backend), c)
            long = tune.estimate(problem(T=1024, backend=backend), c)
            assert 0 < short < long


def test_triton_model_prefers_chunkwise_for_long_sequences():
    assert tune.model_choice(problem(T=32768, backend="triton")).form == "chunkwise"


def test_choose_without_tensors_never_benchmarks(monkeypatch):
    monkeypatch.setenv("RTP_AUTOTUNE", "1")
    assert plan.choose("auto", T=300, has_state=False).source == "model"
    assert plan.counters["benchmarks"] == 0


def test_triton_candidates_stop_at_the_kernels_largest_chunk():
    sizes = {c.chunk_size for c in tune.candidates(problem(T=4096, backend="triton"))}
    assert max(sizes) == 64


def test_corrupt_entry_is_retuned_and_rewritten():
    p = problem(T=60, H=2, K=8, V=8)
    path = cache.directory() / f"{cache.key_id(plan.cache_key(p))}.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"key": {}, "value": ')
    assert plan.plan_for(p, tune=True).source == "tuned"
    assert cache.read_file(path) is not None


def test_version_bump_makes_the_planner_miss(monkeypatch):
    p = problem(T=60, H=2, K=8, V=8)
    plan.plan_for(p, tune=True)
    plan.reset()
    monkeypatch.setattr(cache, "FORMAT_VERSION", cache.FORMAT_VERSION + 1)
    assert plan.plan_for(p).source == "model"
    assert plan.stats()["cache_misses"] == 1


def test_choose_with_tune_false_never_benchmarks(monkeypatch):
    monkeypatch.setenv("RTP_AUTOTUNE", "1")
    q, _, v = tensors(T=300)
    assert plan.choose("auto", T=300, has_state=False, q=q, v=v, tune=False).source == "model"
    assert plan.counters["benchmarks"] == 0


def _stored(p: Problem, form: str, chunk: int, config: dict) -> None:
    value = {"form": form, "chunk_size": chunk, "config": config, "time_ms": 1.0, "timings": {}}
    cache.store(plan.cache_key(p), value)


def test_cached_form_other_than_the_forced_one_is_a_miss():
    p = problem(T=200, H=2, K=8, V=8, request="chunkwise")
    _stored(p, "parallel", 64, {})
    found = plan.plan_for(p)
    assert (found.form, found.source) == ("chunkwise", "model")
    assert plan.stats()["cache_misses"] == 1


def test_cached_triton_config_must_fit_the_resource_rule():
    p = problem(T=512, H=8, K=128, V=128, backend="triton")
    big = {"BV": 256, "num_warps": 32, "num_stages": 8}
    assert tune.why_not_fits(p, "chunkwise", 64, big) is not None  # the tuner prunes it
    _stored(p, "chunkwise", 64, big)
    assert plan.plan_for(p).source == "model" and plan.stats()["cache_misses"] == 1
    plan.reset()
    _stored(p, "chunkwise", 64, {"BV": 32, "split": 1})
    found = plan.plan_for(p)
    assert found.source == "cache" and found.config == (("BV", 32), ("split", 1))


def test_memo_follows_the_cpu_thread_count():
    """The cache key's device part holds the thread count; the in-process memo does too."""
    p = problem(T=60, H=2, K=8, V=8)
    threads = torch.get_num_threads()
    plan.plan_for(p)
    try:
        torch.set_num_threads(threads + 1)
        plan.plan_for(p)
    finally:
        torch.set_num_threads(threads)
    plan.plan_for(p)
    assert plan.stats()["model"] == 2
