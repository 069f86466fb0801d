"""The split chunkwise pass (a states kernel, then a parallel output kernel) of every pass.

Runs under the Triton interpreter on CPU like tests/test_kernels.py. The split pass must equal
the float64 reference (outputs, final state, every gradient) on awkward sizes, equal the fused
pass (bit for bit under the interpreter when K and V fit one block of both: the same
operations in the same order; to float32 rounding when the split walks K in several blocks or
the two use different V blocks, and for dq and dk, which the split backward computes in one
kernel, tests/test_kernel_dqk.py), be chosen by its
rule or a config, and be searched and cached by the autotuner.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="the Triton kernels need triton")

from test_kernels import check, close, make  # noqa: E402

from rtpcompile import kernels  # noqa: E402
from rtpcompile.kernels import blocks, launch  # noqa: E402
from rtpcompile.kernels import grid as grids  # noqa: E402
from rtpcompile.kernels.spec import (  # noqa: E402
    SPLIT_MIN_CHUNKS,
    KernelSpec,
    check_config,
    render,
    use_split,
)
from rtpcompile.lowering import plan, tune  # noqa: E402
from rtpcompile.lowering import reference as ref  # noqa: E402
from rtpcompile.lowering.plan import Problem  # noqa: E402

SPLIT = {"split": 1}


@pytest.fixture(autouse=True)
def _interpreter(request, tmp_path, monkeypatch):
    if "gpu" in request.keywords:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("RTP_AUTOTUNE", "RTP_TUNE_CONFIGS", "RTP_CHUNK_SIZE", "RTP_FORM", "RTP_CACHE"):
        monkeypatch.delenv(name, raising=False)
    plan.reset()
    yield
    plan.reset()


CASES = [
    # B, H, T, K, V, chunk, dtype
    (1, 2, 1, 8, 8, 16, torch.float32),
    (1, 2, 63, 48, 80, 16, torch.float32),
    (2, 1, 65, 16, 16, 32, torch.float32),
    (1, 2, 130, 12, 20, 16, torch.float32),
    (1, 2, 65, 48, 80, 16, torch.float16),
    (1, 1, 70, 256, 40, 64, torch.float32),  # K = 256: split stages keep 64-row chunks
    (1, 2, 50, 100, 24, 16, torch.float32),  # K in two 64-wide blocks, the second partial
    (1, 2, 40, 100, 72, 16, torch.float32),  # K and V both in two blocks, both orientations
    (1, 2, 64, 16, 16, 16, torch.float32),  # T a multiple of the chunk
    (1, 1, 16, 8, 8, 16, torch.float32),  # T == the chunk
    (1, 2, 40, 12, 20, 16, torch.float64),  # float64: h and the accumulators in float64
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("state,dsf", [(False, False), (True, True), (True, False), (False, True)])
def test_split_matches_the_float64_reference(case, state, dsf, monkeypatch):
    B, H, T, K, V, chunk, dtype = case
    _force_split(monkeypatch)
    check("chunkwise", B, H, T, K, V, dtype, state, dsf, btHd=dtype == torch.float16, chunk=chunk)


def _force_split(monkeypatch):
    """Run every chunkwise pass of ``check`` (which passes no config) split."""
    real = launch.use_split
    monkeypatch.setattr(
        launch, "use_split", lambda form, T, K, c, cfg, **grid: real(form, T, K, c, SPLIT)
    )


@pytest.mark.parametrize(
    "dtype, scale",
    [(torch.float32, 0.3), (torch.float16, 0.25), (torch.float16, 0.3)],
    ids=["float32", "float16", "float16-scale-0.3"],
)
def test_split_equals_fused_bit_for_bit_under_the_interpreter(dtype, scale):
    """Bit for bit, except float16 at a scale that is no power of two: float16 scales the scores
    before their cast, fused as s * (gamma^n * scale), split as (s * gamma^n) * scale; a few
    entries then differ by a float16 ulp (K = 20, V = 12, T = 65: 1 of 4680 outputs)."""
    # NOTE: K and V within one block of both passes (float32 splits K in 32-wide blocks)
    _, (q, k, v, g, s0) = make(1, 2, 70, 32, 24, dtype, state=True, btHd=True)
    fused = kernels.triton_forward("chunkwise", q, k, v, g, scale, s0, 16, {"split": 0})
    split = kernels.triton_forward("chunkwise", q, k, v, g, scale, s0, 16, SPLIT)
    do = torch.randn_like(fused[0])
    dsf = torch.randn_like(fused[1])
    grads = [
        list(kernels.triton_backward("chunkwise", do, dsf, q, k, v, g, scale, s0, fused[1], 16, c))
        for c in ({"split": 0}, SPLIT)
    ]
    names = ("o", "final state", "dq", "dk", "dv", "d gamma", "ds0")
    rounded = dtype == torch.float16 and scale != 0.25
    for a, b, name in zip((*fused, *grads[0]), (*split, *grads[1]), names, strict=True):
        if name in ("dq", "dk", "d gamma") or rounded:
            # NOTE: split, dq and dk come from one kernel (test_kernel_dqk.py) that sums the
            # shared scores over V blocks and reads dk's state as the dv pass's transpose; d
            # gamma sums per-program partials, one per fused program or per chunk and K block
            eps = 1e-3 if dtype == torch.float16 else 1e-5  # an ulp of the stored rows
            tol = eps * b.abs().max().item()
            torch.testing.assert_close(a, b, rtol=eps, atol=tol)
        else:
            assert torch.equal(a, b), name


def test_split_with_ones_column_row_scale_and_row_dots():
    """Every optional feature of a pass (the backward's row dots included) on the split path."""
    (q, k, v, gamma, _), (lq, lk, lv, lg, _) = make(1, 2, 37, 12, 20, torch.float32)
    rng = torch.Generator().manual_seed(3)  # NOTE: not the global RNG: xdist orders files freely
    rs = torch.rand(1, 2, 37, generator=rng) + 0.5
    r = torch.randn(1, 2, 37, 21, generator=rng)
    results = []
    for cfg in ({"split": 0}, SPLIT):
        p = launch.Pass(
            "chunkwise", lq, lk, lv, lg, 0.3, row_scale=rs, extra_value_column=True,
            row_dot_with=r, state_out=True,
        )  # fmt: skip
        results.append(launch.run(p, 16, cfg))
    (o, sf, part), (o_split, sf_split, part_split) = results
    assert torch.equal(o, o_split) and torch.equal(sf, sf_split)
    # d gamma's partial sums: one per fused program, one per chunk split; summed, the same
    assert part.shape == (1, 1, 2, 1) and part_split.shape == (1, 1, 2, 3)  # 37 rows: 3 chunks
    torch.testing.assert_close(part_split.sum((0, 1, 3)), part.sum((0, 1, 3)), rtol=1e-5, atol=0)
    assert o_split.shape[-1] == 21


def _reversed_pass_fused_and_split(T: int, K: int, V: int) -> list:
    """The backward's dk/dv shape of pass -- time-reversed, the state at position 0 with its own
    scale, a ones column, row scales and row dots, V in blocks of 16 -- run fused and split."""
    _, (q, k, v, g, _) = make(1, 2, T, K, V, torch.float32)
    rng = torch.Generator().manual_seed(T * 1000 + K * 10 + V)
    s0 = torch.randn(1, 2, K, V + 1, generator=rng)
    rs, r = torch.rand(1, 2, T, generator=rng) + 0.5, torch.randn(1, 2, T, V + 1, generator=rng)
    results = []
    for split in (0, 1):
        p = launch.Pass(
            "chunkwise", q, k, v, g, 0.3, reverse=True, s0=s0, state_offset=0, state_scale=1.0,
            row_scale=rs, extra_value_column=True, row_dot_with=r, state_out=True,
        )  # fmt: skip
        results.append(launch.run(p, 16, {"BV": 16, "split": split}))
    return results


def test_split_equals_fused_on_a_reversed_pass_with_every_feature():
    """One K block (K = 12), V = 20 in two blocks: the same operations, bit for bit (d gamma's
    partial sums are per program, so they agree once summed, to float32 rounding)."""
    (o, sf, part), (o_split, sf_split, part_split) = _reversed_pass_fused_and_split(48, 12, 20)
    assert torch.equal(o, o_split) and torch.equal(sf, sf_split)
    torch.testing.assert_close(part_split.sum((0, 1, 3)), part.sum((0, 1, 3)), rtol=1e-5, atol=0)


def test_split_close_to_fused_with_several_k_blocks_and_every_feature():
    """K = 100 (two K blocks: row scales applied per block): the K reduction is summed in
    another order, so equal to float32 rounding."""
    (o, sf, part), (o_split, sf_split, part_split) = _reversed_pass_fused_and_split(40, 100, 40)
    for a, b in ((o, o_split), (sf, sf_split), (part.sum((0, 1, 3)), part_split.sum((0, 1, 3)))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4 * b.abs().max().item())


def test_grid_limits_are_a_clear_error(monkeypatch):
    monkeypatch.setattr(grids, "GRID_LIMITS", (2, 65535, 65535))
    _, (q, k, v, g, _) = make(1, 2, 40, 8, 8, torch.float32)
    with pytest.raises(ValueError, match=r"grid \(3, 2\) for one sequence exceeds the launch"):
        kernels.triton_forward("chunkwise", q, k, v, g, 0.3, None, 16, SPLIT)


@pytest.mark.parametrize(
    "form,cfg",
    [("chunkwise", {"split": 0}), ("chunkwise", SPLIT), ("parallel", None), ("recurrent", None)],
    ids=["fused", "split", "parallel", "recurrent"],
)
def test_batch_past_the_grid_limit_launches_in_slices(monkeypatch, form, cfg):
    """B*H over the batch*head axis's limit runs as several launches over slices of the batch,
    with the same results as one launch: forward, final state and every gradient (the d gamma
    partials are batch-first, so a slice writes its own rows)."""
    T = 3 if form == "recurrent" else 20  # the interpreter runs the recurrent form per token
    _, (q, k, v, g, s0) = make(3, 2, T, 12, 20, torch.float32, state=True, btHd=True)

    def both():
        o, sf = kernels.triton_forward(form, q, k, v, g, 0.3, s0, 16, cfg)
        do, dsf = torch.ones_like(o), torch.ones_like(sf)
        return (o, sf, *kernels.triton_backward(form, do, dsf, q, k, v, g, 0.3, s0, sf, 16, cfg))

    whole = both()
    calls, dqk_calls = [], []
    real = launch._call

    def spy(*a):
        (dqk_calls if a[2].stage == "dqk" else calls).append(a[-3])  # B of the launch
        return real(*a)

    monkeypatch.setattr(launch, "_call", spy)
    monkeypatch.setattr(grids, "GRID_LIMITS", (2**31 - 1, 5, 5))  # 2 sequences x 2 heads each
    sliced = both()
    assert max(calls) == 2 and 1 in calls  # 3 sequences: 2 + 1
    assert dqk_calls == ([2, 1] if cfg == SPLIT else [])  # the split backward's dq/dk kernel
    for a, b in zip(whole, sliced, strict=True):
        assert torch.equal(a, b)


def test_resource_rule_knows_the_split_kernels(monkeypatch):
    """At K = 256 a wide V block fits split (no resident state beside the scores) but not fused,
    on a device with Hopper's 227 KiB of shared memory per block."""
    monkeypatch.setattr(tune, "_shared_memory", lambda device: 232448)
    p = Problem(4, 16, 4096, 256, 256, "bfloat16", "cpu", "triton", False)
    cfg = {"BV": 128, "num_warps": 8, "num_stages": 1}
    assert "per thread" in tune.why_not_fits(p, "chunkwise", 64, {**cfg, "split": 0})
    assert tune.why_not_fits(p, "chunkwise", 64, {**cfg, "split": 1}) is None


@pytest.mark.parametrize("state", [False, True])
def test_split_forward_without_a_state_out(state, monkeypatch):
    """``state_out=False`` on the split pass: the states stage stores no final state, o is
    unchanged."""
    _force_split(monkeypatch)
    launched = []
    real = launch._launch
    monkeypatch.setattr(launch, "_launch", lambda spec, *a: launched.append(spec) or real(spec, *a))
    (q, k, v, gamma, s0), (lq, lk, lv, lg, ls0) = make(1, 2, 45, 24, 40, torch.float32, state=state)
    ro, _ = ref.reference_parallel(q, k, v, gamma, 0.5, s0)
    o, sf = kernels.triton_forward("chunkwise", lq, lk, lv, lg, 0.5, ls0, 16, state_out=False)
    assert sf is None
    close(o, ro, torch.float32, "o")
    assert [(x.stage, x.state_out) for x in launched] == [("states", False), ("output", False)]


@settings(max_examples=12, deadline=None)
@given(
    T=st.integers(1, 90),
    K=st.sampled_from([5, 16, 24, 48]),
    V=st.sampled_from([3, 16, 33, 80]),
    state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_split_shapes(T, K, V, state, seed):
    with pytest.MonkeyPatch.context() as mp:
        _force_split(mp)
        check("chunkwise", 1, 2, T, K, V, torch.float32, state, state, chunk=16, seed=seed)


def test_backward_splits_past_split_min_chunks_and_forward_stays_fused():
    """The measured rule (H200, K = V = 128, bfloat16, a full grid): a forward pass stays fused
    at every length, a backward pass splits past SPLIT_MIN_CHUNKS chunks; results stay exact."""
    T = SPLIT_MIN_CHUNKS * 16 + 5

    def stages(T: int, backward: bool = False) -> list[str]:
        # B*H = 64 programs (a full grid), bfloat16 (float32 always splits)
        q = torch.empty(4, 16, T, 8, device="meta", dtype=torch.bfloat16)
        found = kernels.kernels_for(
            "chunkwise", q, q, q, q[0, :, 0, 0], chunk_size=16, backward=backward, state_out=False
        )
        return [i.spec.stage for i in found]

    assert stages(T) == stages(100_000) == stages(SPLIT_MIN_CHUNKS * 16) == ["fused"]
    assert stages(T, backward=True) == ["fused", "states", "states", "output", "dqk"]
    assert stages(SPLIT_MIN_CHUNKS * 16, backward=True) == ["fused"] * 4
    # the runs below are exact with both thresholds at 2 chunks (the interpreter ran 32 programs
    # of 17 chunks for ~30 s of CI; the rule at the real thresholds is the meta check above)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(blocks, "SPLIT_MIN_CHUNKS", 2)
        mp.setattr(blocks, "FEW_PROGRAMS_MIN_CHUNKS", 2)
        blocks._default_rule.cache_clear()
        try:
            _exact_at_patched_thresholds()
        finally:  # NOTE: no decision memoised at the patched thresholds outlives the test
            blocks._default_rule.cache_clear()


def _exact_at_patched_thresholds() -> None:
    T = 2 * 16 + 5
    # B*H = 1: every pass splits (a small grid), the backward by both rules; exact all the same
    one = torch.empty(1, 1, T, 8, device="meta", dtype=torch.float16)
    ran = kernels.kernels_for(
        "chunkwise", one, one, one, one[0, :, 0, 0], chunk_size=16, backward=True
    )
    split = ["states", "output", "states", "states", "output", "dqk"]
    assert [i.spec.stage for i in ran] == split
    check("chunkwise", 1, 1, T, 8, 8, torch.float16, False, False, chunk=16)
    # B*H = 32, V = 8: 32 programs, a full grid: the measured rule itself, fused forward and
    # split backward, in one call (float16 counts as bfloat16 here)
    q = torch.empty(2, 16, T, 8, device="meta", dtype=torch.float16)
    ran = kernels.kernels_for("chunkwise", q, q, q, q[0, :, 0, 0], chunk_size=16, backward=True)
    assert [i.spec.stage for i in ran] == ["fused", "states", "states", "output", "dqk"]
    check("chunkwise", 2, 16, T, 8, 8, torch.float16, False, False, chunk=16)


def test_the_rule():
    # a forward pass counts no chunks; a backward pass splits past SPLIT_MIN_CHUNKS of them
    assert not use_split("chunkwise", 10**6, 128)
    assert not use_split("chunkwise", 16 * 64, 128, phase="bwd")  # 16 chunks of 64
    assert use_split("chunkwise", 16 * 64 + 1, 128, phase="bwd")
    with pytest.raises(ValueError, match="phase must be 'fwd' or 'bwd', got 'train'"):
        use_split("chunkwise", 64, 128, phase="train")
    # K = 256: fused chunks are 32 rows, split chunks 64; a single split chunk stays fused
    assert use_split("chunkwise", 65, 256) and not use_split("chunkwise", 64, 256)
    assert use_split("chunkwise", 17 * 16, 64, chunk_size=16, phase="bwd")
    assert not use_split("chunkwise", 17 * 16, 64, chunk_size=16)
    assert not use_split("parallel", 10**6, 128) and not use_split("recurrent", 10**6, 256)
    assert not use_split("chunkwise", 10**6, 128, config={"split": 0})
    assert use_split("chunkwise", 17, 16, chunk_size=16, config={"split": 1})
    assert not use_split("chunkwise", 0, 16, config={"split": 1})
    # a fused grid too small for the GPU: the default model's layers (B*H = 8, V = 64, BV = 64)
    assert use_split("chunkwise", 2048, 32, V=64, BH=8)
    assert not use_split("chunkwise", 512, 32, V=64, BH=8)  # only 8 chunks
    assert not use_split("chunkwise", 2048, 32, V=64, BH=32)  # 32 programs
    assert not use_split("chunkwise", 2048, 32, V=64, BH=8, config={"BV": 16})  # 4 V blocks: 32
    assert not use_split("chunkwise", 2048, 32)  # the grid is unknown: chunks and K only
    # float32 and float64 always split (the fused kernel spills there, see spec.WIDE_DTYPES)
    assert use_split("chunkwise", 65, 32, dtype="float32")
    assert use_split("chunkwise", 65, 32, dtype="float64")
    assert not use_split("chunkwise", 64, 32, dtype="float32")  # one chunk
    assert not use_split("chunkwise", 2048, 32, dtype="bfloat16")


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(4, 16),
    m=st.integers(1, 8),
    K=st.sampled_from([16, 48, 128, 200, 256]),
    V=st.sampled_from([16, 64, 100, 128]),
    c=st.sampled_from([16, 64]),
    dtype=st.sampled_from(["bfloat16", "float32"]),
    phase=st.sampled_from(["fwd", "bwd"]),
)
def test_the_rule_is_constant_on_a_planner_bucket(n, m, K, V, c, dtype, phase):
    """Plans are stored per power-of-two bucket of T and of B*H: the rule must not change
    inside one, in either phase."""
    T = (2 ** (n - 1) + 1, 2**n)
    BH = (2 ** (m - 1) + 1, 2**m) if m > 1 else (1, 1)
    answers = {
        use_split("chunkwise", t, K, c, V=V, BH=bh, dtype=dtype, phase=phase)
        for t in T
        for bh in BH
    }
    assert len(answers) == 1


def test_bad_split_config_and_stage():
    with pytest.raises(ValueError, match="split must be 0 \\(fused\\) or 1 \\(split\\), got 2"):
        check_config({"split": 2})
    with pytest.raises(ValueError, match="stage must be one of"):
        KernelSpec("parallel", "fwd", 16, 16, 16, 16, 16, "float32", "float32", stage="output")
    bkc = "BKC must be a power of two"
    args = ("chunkwise", "fwd", 16, 16, 16, 16, 16, "float32", "float32")
    for stage, BKC in (("states", 0), ("output", 32), ("states", 48), ("fused", 16)):
        with pytest.raises(ValueError, match=bkc):
            KernelSpec(*args, stage=stage, BKC=BKC)
    spec = KernelSpec(
        "chunkwise", "fwd", 16, 16, 16, 16, 16, "float32", "float32", stage="states", BKC=16
    )
    assert "chunkwise.states" in spec.short() and "def kernel" in render(spec)


def test_split_is_searched_in_the_full_space(monkeypatch):
    monkeypatch.setenv("RTP_TUNE_CONFIGS", "full")
    short = Problem(4, 16, 2048, 64, 64, "bfloat16", "cpu", "triton", False)
    splits = {dict(c.config).get("split") for c in tune.candidates(short, configs=True)}
    assert splits == {None, 1}  # the rule says fused; the search also tries split
    long = Problem(4, 16, 65536, 64, 64, "bfloat16", "cpu", "triton", False)
    splits = {dict(c.config).get("split") for c in tune.candidates(long, configs=True)}
    assert splits == {None, 1}  # a forward stays fused at any length
    backward = dataclasses.replace(long, phase="bwd")
    splits = {dict(c.config).get("split") for c in tune.candidates(backward, configs=True)}
    assert splits == {None, 0}  # the rule splits the backward; the search also tries fused
    # 16 chunks: the K = 256 pass splits, the K = 64 pass does not yet
    mixed = Problem(4, 16, 1024, 64, 256, "bfloat16", "cpu", "triton", False, "bwd")
    splits = {dict(c.config).get("split") for c in tune.candidates(mixed, configs=True)}
    assert splits == {None, 0, 1}  # the backward's passes disagree: both ways
    few = Problem(1, 2, 2048, 64, 64, "bfloat16", "cpu", "triton", False)  # 2 programs
    splits = {dict(c.config).get("split") for c in tune.candidates(few, configs=True)}
    assert splits == {None, 0}
    monkeypatch.setenv("RTP_TUNE_CONFIGS", "quick")
    assert all("split" not in dict(c.config) for c in tune.candidates(short, configs=True))


def test_a_tuned_split_config_is_cached_and_reused(monkeypatch):
    from rtpcompile.kernels import cache

    monkeypatch.setenv("RTP_TUNE_CONFIGS", "full")
    monkeypatch.setattr(
        tune, "_time", lambda fn, device: 1.0 if "split=1" in fn() else 2.0
    )  # fake timings: split wins
    monkeypatch.setattr(tune, "_runner", lambda p, candidate, x: lambda: candidate.label)
    p = Problem(1, 1, 40, 16, 24, "bfloat16", "cpu", "triton", False)  # the rule: fused
    won = plan.plan_for(p, tune=True)
    assert dict(won.config)["split"] == 1 and won.form == "chunkwise"
    assert cache.load(plan.cache_key(p))["config"]["split"] == 1
    plan.reset()
    again = plan.plan_for(p)
    assert again.source == "cache" and again.config == won.config


# ---- GPU: compiled split kernels, bfloat16, long sequences -----------------------------------

GPU_CASES = [
    # B, H, T, K, V, forced
    (1, 2, 9000, 64, 64, False),  # 141 chunks, B*H = 2: split by the rule (both phases)
    (2, 4, 2048, 128, 128, True),
    (1, 2, 1000, 256, 256, False),  # K = 256: split by the rule
    (2, 3, 333, 48, 80, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_split(case, dtype, monkeypatch):
    B, H, T, K, V, forced = case
    if forced:
        _force_split(monkeypatch)
    else:
        assert use_split("chunkwise", T, K, 64, V=V, BH=B * H)
        assert use_split("chunkwise", T, K, 64, V=V, BH=B * H, phase="bwd")
    check("chunkwise", B, H, T, K, V, dtype, True, True, btHd=True, chunk=64, device="cuda")


@pytest.mark.gpu
def test_gpu_split_close_to_fused():
    _, (q, k, v, g, s0) = make(2, 4, 3000, 128, 128, torch.bfloat16, "cuda", state=True)
    fused = kernels.triton_forward("chunkwise", q, k, v, g, 0.1, s0, 64, {"split": 0})
    split = kernels.triton_forward("chunkwise", q, k, v, g, 0.1, s0, 64, SPLIT)
    for a, b in zip(fused, split, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_k256_splits_with_64_row_chunks():
    q = torch.empty(1, 1, 70, 256, device="meta", dtype=torch.bfloat16)
    v = torch.empty(1, 1, 70, 40, device="meta", dtype=torch.bfloat16)
    seen = kernels.kernels_for("chunkwise", q, q, v, q[0, :, 0, 0], chunk_size=64, backward=True)
    # passes reading K = 256 run split (the backward's K = 40 passes stay fused)
    assert {i.spec.stage for i in seen if i.spec.K == 256} == {"states", "output"}
    assert {i.spec.stage for i in seen if i.spec.K == 40} == {"fused"}
    assert {i.spec.BT for i in seen} == {64}  # fused K = 256 would clamp to 32


class _CudaLike:
    """Shape, device and element size of a CUDA tensor, for split_fits without a GPU."""

    def __init__(self, *shape, itemsize=2):
        self.shape, self.device, self._itemsize = shape, torch.device("cuda"), itemsize
        self.dtype = torch.bfloat16

    def element_size(self):
        return self._itemsize


@pytest.mark.parametrize("capturing", [False, True])
def test_split_fits_asks_the_driver_only_for_big_buffers_outside_capture(monkeypatch, capturing):
    asked = []

    def free_memory(device):
        asked.append(device)
        return 3 << 30, 80 << 30  # 3 GiB free

    monkeypatch.setattr(torch.cuda, "mem_get_info", free_memory)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)

    def fits(B, H, T, K, V):
        q = _CudaLike(B, H, T, K)
        p = launch.Pass("chunkwise", q, q, _CudaLike(B, H, T, V), None, 1.0)
        return launch.split_fits(p, 64)

    # 4 x 16 heads, 64 chunks of [128, 128] bf16 states: 128 MiB, below the unchecked size
    assert fits(4, 16, 4096, 128, 128) and not asked
    # 64 x 16 heads, 256 chunks of [256, 256] bf16 states: 32 GiB, over half of the free 3 GiB
    assert fits(64, 16, 16384, 256, 256) is capturing
    assert len(asked) == (0 if capturing else 1)
    # 1.25 GiB: checked, fits in half of the free 3 GiB; 2 GiB does not (unless capturing)
    assert fits(10, 16, 16384, 128, 128)
    assert fits(16, 16, 16384, 128, 128) is capturing
    assert len(asked) == (0 if capturing else 3)
    # the split backward holds the dq pass's states beside the dv pass's: 1.25 GiB fits alone,
    # not beside another 1.25 GiB (unless capturing)
    q = _CudaLike(10, 16, 16384, 128)
    p = launch.Pass("chunkwise", q, q, q, None, 1.0)
    assert launch.split_fits(p, 64, extra_bytes=launch.states_bytes(p, 64)) is capturing
