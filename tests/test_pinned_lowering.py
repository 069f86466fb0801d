"""Behaviours of the op, its lowering and the planner that no other test pinned down (found by
mutation testing: each test here fails on a plausible one-line bug that the rest of the suite
let through)."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from rtpcompile import kernels, ops
from rtpcompile.kernels import cache, grid, spec
from rtpcompile.lowering import dispatch, plan, reference
from rtpcompile.lowering.plan import Problem


def _problem(**changes) -> Problem:
    p = Problem(1, 2, 200, 8, 8, "float32", "cpu", "aten", False)
    return dataclasses.replace(p, **changes)


def _store(p: Problem, form: str, chunk: int) -> None:
    value = {"form": form, "chunk_size": chunk, "config": {}, "time_ms": 1.0, "timings": {}}
    cache.store(plan.cache_key(p), value)


# ----------------------------------------------------------------------------- planner memo


@pytest.mark.parametrize(
    "first, second",
    [
        ({"dtype": "float32"}, {"dtype": "float64"}),
        ({"has_state": False}, {"has_state": True}),
    ],
    ids=["dtype", "state-in"],
)
def test_plan_memo_keeps_problems_that_differ_in_dtype_or_state_apart(fresh_plans, first, second):
    """A plan memoised for one dtype (or without a state) is not reused for another."""
    a, b = _problem(**first), _problem(**second)
    _store(b, "chunkwise", 32)  # only b has a tuned entry
    assert plan.plan_for(a).source == "model"
    found = plan.plan_for(b)
    assert (found.form, found.chunk_size, found.source) == ("chunkwise", 32, "cache")


@pytest.mark.parametrize("empty", [{"B": 0}, {"H": 0}])
def test_empty_batch_or_heads_is_a_rule_never_tuned_cached_or_memoised(fresh_plans, empty):
    """B = 0 or H = 0 gets a rule plan: no benchmark, no cache read or write, no memo entry."""
    p = _problem(T=300, **empty)
    found = plan.plan_for(p, tune=True)
    assert (found.form, found.source) == ("parallel", "rule")
    assert plan.stats() == dict.fromkeys(plan.stats(), 0)
    assert not plan._memo
    assert not cache.directory().is_dir() or not list(cache.directory().iterdir())


# ----------------------------------------------------------------------------- source hash


def test_aten_source_hash_follows_the_aten_implementation(tmp_path, monkeypatch):
    """Editing aten_impl.py changes the aten cache keys' source hash (old timings go stale)."""
    here = plan.Path(plan.__file__).resolve().parent
    copy = tmp_path / "lowering"
    copy.mkdir()
    shutil.copy(here / "aten_impl.py", copy / "aten_impl.py")
    monkeypatch.setattr(plan, "__file__", str(copy / "plan.py"))
    plan.source_hash.cache_clear()
    try:
        before = plan.source_hash("aten")
        with open(copy / "aten_impl.py", "a") as f:
            f.write("\n# a changed implementation\n")
        plan.source_hash.cache_clear()
        after = plan.source_hash("aten")
    finally:
        plan.source_hash.cache_clear()
    assert before != after


# ----------------------------------------------------------------------------- kernels' limits


@pytest.mark.parametrize("form", ["chunkwise", "recurrent", "parallel"])
@pytest.mark.parametrize("H", [1, 3, 32, 1000])
def test_batch_slices_fill_but_never_pass_the_grid_axis_limit(form, H):
    """A sliced batch launch takes the most sequences whose B*H fits the batch axis's limit."""
    s = spec.choose(form, "fwd", 16, 16, torch.float16, torch.float16, 64, fp32_precision="ieee")
    per = grid.batch_per_launch(s, H, T=64)
    axis = len(grid.grid(s, 1, H, 64)) - 1
    cap = grid.GRID_LIMITS[axis]
    assert grid.grid(s, per, H, 64)[axis] <= cap < grid.grid(s, per + 1, H, 64)[axis]


def test_kernels_on_auto_take_only_calls_within_their_limits():
    """With kernels="auto", scale 0 and head dims over MAX_DIM are left to aten."""

    def qv(K, V):
        return torch.empty(1, 1, 4, K, device="meta"), torch.empty(1, 1, 4, V, device="meta")

    assert dispatch._fits(kernels, *qv(16, kernels.MAX_DIM), 0.5)
    assert not dispatch._fits(kernels, *qv(16, 16), 0.0)
    assert not dispatch._fits(kernels, *qv(kernels.MAX_DIM + 1, 16), 0.5)
    assert not dispatch._fits(kernels, *qv(16, kernels.MAX_DIM + 1), 0.5)


# ----------------------------------------------------------------------------- the op


def test_a_state_on_another_device_is_refused_by_name(aten_env):
    """An initial state on another device than q is a ValueError naming both devices."""
    q = torch.randn(1, 2, 5, 4)
    state = torch.zeros(1, 2, 4, 4, device="meta")
    for form in ("parallel", "chunkwise", "recurrent"):
        with pytest.raises(ValueError, match="initial_state must be on cpu like q, got meta"):
            ops.retention(q, q, q, 0.9, form=form, initial_state=state)
    with pytest.raises(ValueError, match="initial_state must be on cpu like q, got meta"):
        torch.ops.rtp.retention_fwd(q, q, q, torch.full((2,), 0.9), 0.5, state, "chunkwise", 0)


def test_the_raw_op_refuses_an_integer_state(aten_env):
    """A raw op call with an integer initial state is a ValueError, not a silent cast."""
    q = torch.randn(1, 2, 5, 4)
    state = torch.zeros(1, 2, 4, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"initial_state must be floating .* got torch.int64"):
        torch.ops.rtp.retention_fwd(q, q, q, torch.full((2,), 0.9), 0.5, state, "chunkwise", 0)


# which inputs need a gradient: (q, k, v, gamma, initial_state)
WANTS = {
    "q+s0": (True, False, False, False, True),
    "gamma+s0": (False, False, False, True, True),
    "k+v+gamma": (False, True, True, True, False),
    "q+k": (True, True, False, False, False),
}


@pytest.mark.parametrize("KV", [(4, 4), (3, 5)], ids=["K=V", "K!=V"])
@pytest.mark.parametrize("wants", list(WANTS.values()), ids=list(WANTS))
@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent"])
def test_gradients_of_a_subset_of_inputs_match_the_reference(aten_env, form, wants, KV):
    """Each gradient is right when only some inputs need one (the backward skips passes)."""
    K, V = KV
    g = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    base = (rand(1, 2, 7, K), rand(1, 2, 7, K), rand(1, 2, 7, V))
    base += (torch.tensor([0.9, 0.6], dtype=torch.float64), rand(1, 2, K, V))
    do, dsf = rand(1, 2, 7, V), rand(1, 2, K, V)

    def grads(fn):
        ins = [x.clone().requires_grad_(w) for x, w in zip(base, wants, strict=True)]
        o, s = fn(*ins)
        ((o * do).sum() + (s * dsf).sum()).backward()
        return [x.grad for x in ins]

    got = grads(
        lambda q, k, v, gm, s0: ops.retention(
            q, k, v, gm, form=form, initial_state=s0, output_final_state=True, chunk_size=3
        )
    )
    want = grads(lambda q, k, v, gm, s0: reference.reference_recurrent(q, k, v, gm, None, s0))
    for name, a, b, w in zip(("q", "k", "v", "gamma", "s0"), got, want, wants, strict=True):
        assert (a is not None) == w, name
        if w:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("gamma", [1.5, -0.25, float("inf")])
def test_a_number_gamma_out_of_range_is_refused_before_it_becomes_a_tensor(aten_env, gamma):
    """A Python-number gamma outside [0, 1] is refused as that one number (not as H copies:
    off the CPU, H copies would only meet a device-side assertion)."""
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match=rf"gamma values must lie in \[0, 1\]; got \[{gamma}\] "):
        ops.retention(q, q, q, gamma)


def test_a_value_head_dim_of_zero_is_refused(aten_env):
    """V = 0 is a ValueError naming K and V, from the public ops and from a raw op call."""
    q, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 0)
    message = "head dims K and V must be >= 1; got K=4, V=0"
    with pytest.raises(ValueError, match=message):
        ops.retention(q, q, v, 0.9)
    with pytest.raises(ValueError, match=message):
        torch.ops.rtp.retention_fwd(q, q, v, torch.full((2,), 0.9), 0.5, None, "chunkwise", 0)


@pytest.mark.parametrize("form", ["chunkwise", "auto"])
def test_the_raw_op_refuses_a_chunk_size_of_minus_one(aten_env, form):
    """The raw op's chunk_size is >= 0 (0: the planner decides); -1 is refused, not planned."""
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="chunk_size must be >= 0 .* got -1"):
        torch.ops.rtp.retention_fwd(q, q, q, torch.full((2,), 0.9), 0.5, None, form, -1)


def test_the_raw_op_refuses_a_gamma_on_another_device(aten_env):
    """A raw op call with gamma on another device than q is a ValueError naming both."""
    q = torch.randn(1, 2, 5, 4)
    gamma = torch.full((2,), 0.9, device="meta")
    with pytest.raises(ValueError, match="gamma must be on cpu like q, got meta"):
        torch.ops.rtp.retention_fwd(q, q, q, gamma, 0.5, None, "chunkwise", 0)


def test_cpu_cache_key_follows_the_thread_count(fresh_plans):
    """A plan tuned at one CPU thread count is not read back at another (its key differs)."""
    p = _problem()
    threads = torch.get_num_threads()
    key = plan.cache_key(p)
    try:
        torch.set_num_threads(threads + 1)
        other = plan.cache_key(p)
    finally:
        torch.set_num_threads(threads)
    assert key != other and cache.key_id(key) != cache.key_id(other)
    assert plan.cache_key(p) == key


@pytest.mark.parametrize("backend, T", [("aten", 64), ("aten", 65), ("triton", 32)])
def test_chunk_candidates_are_shorter_than_the_sequence(backend, T):
    """The planner compares chunkwise only with C < T (docs/autotune.md): C = T is parallel."""
    from rtpcompile.lowering import tune

    p = _problem(T=T, backend=backend)
    sizes = tune.TRITON_CHUNKS if backend == "triton" else tune.CHUNKS
    found = [(c.form, c.chunk_size) for c in tune.candidates(p)]
    assert found == [("parallel", 64)] + [("chunkwise", c) for c in sizes if c < T]


@pytest.mark.parametrize(
    "raw, mode", [("1", "on"), ("yes", "on"), ("0", "off"), ("no", "off"), ("ro", "readonly")]
)
def test_cache_mode_aliases(monkeypatch, raw, mode):
    """RTP_CACHE takes 1/0 style aliases, and "ro" for readonly."""
    monkeypatch.setenv("RTP_CACHE", raw)
    assert cache.mode() == mode


@pytest.mark.parametrize("mode", ["readonly", "off"])
def test_cache_import_is_refused_unless_the_cache_is_on(fresh_plans, tmp_path, monkeypatch, mode):
    """Importing writes the cache, so RTP_CACHE=readonly (or off) refuses it with a ValueError."""
    _store(_problem(), "chunkwise", 32)
    export = tmp_path / "export.json"
    assert cache.export_entries(export) == 1
    cache.clear()
    monkeypatch.setenv("RTP_CACHE", mode)
    with pytest.raises(ValueError, match=f"cannot import with RTP_CACHE='{mode}'"):
        cache.import_entries(export)
    monkeypatch.setenv("RTP_CACHE", "on")
    assert not cache.entries()


def test_leftover_temporary_files_are_not_entries(fresh_plans, tmp_path):
    """A writer's leftover temporary file is neither listed, exported nor counted as an entry."""
    _store(_problem(), "chunkwise", 32)
    (only,) = cache.entries()
    leftover = cache.directory() / f"{cache._TMP_PREFIX}abc.json"
    leftover.write_text(only[1].read_text())
    assert [e[0] for e in cache.entries()] == [only[0]]
    assert cache.export_entries(tmp_path / "export.json") == 1


def test_gamma_shape_error_hints_at_the_layout_only_when_t_is_not_h(aten_env):
    """The [B, T, H, D] layout hint appears when gamma has T entries and T != H, not when T = H."""
    q = torch.randn(1, 2, 2, 4)
    with pytest.raises(ValueError) as err:
        ops.retention(q, q, q, torch.full((2, 1), 0.9))
    assert str(err.value) == "gamma must have shape [2] (one decay per head), got [2, 1]"
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"q has T=3 where H is expected"):
        ops.retention(q, q, q, torch.full((3,), 0.9))


def test_chunkwise_without_a_chunk_size_lets_the_planner_pick_the_chunk(fresh_plans):
    """form="chunkwise" alone forces the form only: the chunk comes from the tuned plans."""
    q, v = torch.randn(1, 2, 200, 8), torch.randn(1, 2, 200, 8)
    _store(plan.problem_of(q, v, False, request="chunkwise", backend="aten"), "chunkwise", 32)
    found = plan.choose("chunkwise", T=200, has_state=False, q=q, v=v)
    assert (found.form, found.chunk_size, found.source) == ("chunkwise", 32, "cache")
    forced = plan.choose("chunkwise", T=200, has_state=False, chunk_size=16, q=q, v=v)
    assert (forced.chunk_size, forced.source) == (16, "forced")


def test_a_zero_dim_gamma_tensor_is_one_decay_for_every_head(aten_env):
    """A 0-dim gamma tensor is broadcast to every head, like a Python number."""
    q = torch.randn(1, 3, 6, 4, dtype=torch.float64)
    got = ops.retention(q, q, q, torch.tensor(0.8, dtype=torch.float64))
    want, _ = reference.reference_recurrent(q, q, q, torch.full((3,), 0.8, dtype=torch.float64))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["parallel", "chunkwise"])
def test_a_non_finite_key_leaves_earlier_query_gradients_exact(aten_env, form):
    """An inf in a later key never reaches dq of earlier rows (with d gamma wanted too)."""
    g = torch.Generator().manual_seed(5)
    q, k, v, do = (torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64) for _ in range(4))
    k[:, :, 7, 1] = float("inf")
    gamma = torch.tensor([0.9, 0.5], dtype=torch.float64)

    def dq(fn):
        qq, gg = q.clone().requires_grad_(), gamma.clone().requires_grad_()
        (fn(qq, gg) * do).sum().backward()
        return qq.grad

    got = dq(lambda qq, gg: ops.retention(qq, k, v, gg, form=form, chunk_size=4))
    want = dq(lambda qq, gg: reference.reference_recurrent(qq, k, v, gg)[0])
    torch.testing.assert_close(got[:, :, :7], want[:, :, :7], rtol=1e-10, atol=1e-10)
