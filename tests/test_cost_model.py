"""The Triton cost model (tune.estimate on the "triton" backend): occupancy, split passes, dtypes.

Everything here runs on the CPU: the model is arithmetic over the grids that kernels/launch.py
would launch (docs/autotune.md#cost-model). What is asserted is what the model's form implies,
not that its constants match a GPU (they are vendor peaks times assumed fractions).
"""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rtpcompile.kernels.spec import FEW_PROGRAMS, default_blocks, use_split
from rtpcompile.lowering import plan, tune
from rtpcompile.lowering.plan import Plan, Problem

DTYPES = ("bfloat16", "float16", "float32", "float64")
DIMS = st.sampled_from([(16, 16), (32, 64), (64, 64), (60, 100), (128, 128), (256, 64), (1, 1)])
PINNED = [Plan("parallel", 64), Plan("recurrent", 64)] + [
    Plan("chunkwise", c, config=(("split", s),)) for c in (16, 32, 64) for s in (0, 1)
]


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    for name in ("RTP_CACHE", "RTP_AUTOTUNE", "RTP_CHUNK_SIZE", "RTP_FORM", "RTP_KERNELS"):
        monkeypatch.delenv(name, raising=False)
    plan.reset()
    tune.sm_count.cache_clear()
    yield
    plan.reset()
    tune.sm_count.cache_clear()


def problem(T=2048, B=1, H=8, K=32, V=64, dtype="float32", **changes) -> Problem:
    p = Problem(B, H, T, K, V, dtype, "cpu", "triton", False)
    return dataclasses.replace(p, **changes)


def names(p: Problem, c: Plan) -> list[str]:
    return [k.name for k in tune._triton_kernels(p, c)]


# ----------------------------------------------------------------------------- basic shape


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    phase=st.sampled_from(["fwd", "bwd"]),
    BH=st.integers(1, 300),
    dims=DIMS,
    T=st.integers(1, 20000),
)
def test_estimates_are_positive_finite_and_grow_with_T(dtype, phase, BH, dims, T):
    """With the fused/split choice pinned, a longer sequence never costs less; with the rule the
    choice may flip at a chunk-count threshold (see test_rule_flip_can_make_longer_cheaper)."""
    K, V = dims
    short = problem(T, H=BH, K=K, V=V, dtype=dtype, phase=phase)
    long = dataclasses.replace(short, T=2 * T)
    for c in PINNED:
        a, b = tune.estimate(short, c), tune.estimate(long, c)
        assert 0 < a <= b < math.inf, (c.label, a, b)
        if T >= 128:  # past a few tiles every term grows
            assert a < b, c.label
    for c in tune.candidates(long):
        assert 0 < tune.estimate(long, c) < math.inf


def test_empty_sequence_costs_only_launches():
    for phase in ("fwd", "bwd"):
        p = problem(T=0, phase=phase)
        for c in PINNED:
            assert 0 < tune.estimate(p, c) < math.inf


def test_rule_flip_can_make_longer_cheaper():
    """The model says a split pass already beats the fused one at 8 chunks with few programs,
    where use_split still runs fused (FEW_PROGRAMS_MIN_CHUNKS): a finding, pinned here so a
    change of either side is noticed (docs/autotune.md#cost-model)."""
    c = Plan("chunkwise", 64)
    at8 = problem(T=512, dtype="bfloat16")  # 8 chunks of 64, 8 programs: fused by the rule
    at16 = problem(T=1024, dtype="bfloat16")  # 16 chunks: split by the rule
    assert names(at8, c) == ["fused"] and names(at16, c) == ["states", "output"]
    split8 = dataclasses.replace(c, config=(("split", 1),))
    assert tune.estimate(at8, split8) < tune.estimate(at8, c)


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    phase=st.sampled_from(["fwd", "bwd"]),
    BH=st.integers(1, 256),
    more=st.integers(2, 64),
    dims=DIMS,
    T=st.integers(64, 16384),
)
def test_more_heads_never_cost_more_per_head(dtype, phase, BH, more, dims, T):
    """More programs fill the GPU: each added head costs at most what the average head did."""
    K, V = dims
    few = problem(T, H=BH, K=K, V=V, dtype=dtype, phase=phase)
    many = dataclasses.replace(few, H=BH * more)
    plans = PINNED + (tune.candidates(few) if BH >= FEW_PROGRAMS else [])  # rule: BH-free here
    for c in plans:
        per_few = tune.estimate(few, c) / BH
        per_many = tune.estimate(many, c) / (BH * more)
        assert per_many <= per_few * (1 + 1e-12), c.label


def test_parallel_forward_without_a_state_out_is_one_kernel():
    """The final state of a parallel forward costs a state-only chunkwise pass; a call that
    returns no state (``output_final_state=False``) launches the parallel kernel alone."""
    p = problem(T=512, K=128, V=128, dtype="bfloat16", H=64)
    c = Plan("parallel", 64)
    assert names(p, c) == ["parallel", "state-only"]
    lean = dataclasses.replace(p, state_out=False)
    assert names(lean, c) == ["parallel"]
    assert tune.estimate(lean, c) < tune.estimate(p, c)
    # the planner keys it for the Triton forward only: the backward's passes do not depend on
    # it, and aten computes the state anyway
    x = torch.empty(1, 2, 8, 4)
    for phase, backend, kept in (("fwd", "triton", False), ("bwd", "triton", True),
                                 ("fwd", "aten", True)):  # fmt: skip
        got = plan.problem_of(x, x, False, phase=phase, backend=backend, state_out=False)
        assert got.state_out is kept, (phase, backend)
    key = plan.cache_key(lean)["spec"]
    assert key["state_out"] is False and plan.cache_key(p)["spec"]["state_out"] is True


def test_backward_is_three_passes_with_swapped_dims():
    # 16 chunks of 64: the backward's passes stay fused (past 16 they split, blocks.py)
    p = problem(T=1024, K=32, V=128, dtype="bfloat16", H=64)
    bwd = dataclasses.replace(p, phase="bwd")
    c = Plan("chunkwise", 64)
    assert len(tune._triton_kernels(bwd, c)) == 3  # fused: dq, dk (K, V swapped) and dv
    assert names(bwd, c) == ["fused"] * 3
    square = dataclasses.replace(p, V=32)
    assert tune.estimate(dataclasses.replace(square, phase="bwd"), c) == pytest.approx(
        3 * tune.estimate(square, c)
    )
    # the parallel form's forward also runs a state-only pass; its backward needs none
    assert names(p, Plan("parallel", 64)) == ["parallel", "state-only"]
    assert names(bwd, Plan("parallel", 64)) == ["parallel"] * 3


# ----------------------------------------------------------------------------- split vs fused


@settings(max_examples=50, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    phase=st.sampled_from(["fwd", "bwd"]),
    BH=st.integers(1, 128),
    dims=DIMS,
    T=st.integers(2, 40000),
    chunk=st.sampled_from(tune.TRITON_CHUNKS),
)
def test_split_estimate_follows_use_split(dtype, phase, BH, dims, T, chunk):
    """Each pass is estimated with the kernels launch runs: split (states, output) exactly when
    spec.use_split says so, the states kernel walking one dot per chunk, the fused four; a
    backward whose passes all split is the dq pass's states, the dv pass and the dq/dk kernel."""
    K, V = dims
    p = problem(T, H=BH, K=K, V=V, dtype=dtype, phase=phase)
    c = Plan("chunkwise", chunk)
    kernels = iter(tune._triton_kernels(p, c))
    passes = tune._triton_passes(p)
    splits = [
        use_split("chunkwise", T, pk, chunk, V=pv, BH=BH, dtype=dtype, phase=phase)
        for pk, pv, _ in passes
    ]
    if phase == "bwd" and all(splits):
        names = [k.name for k in kernels]
        assert names == ["states", "states", "output", "dqk"]
        return
    for (pk, pv, _), split in zip(passes, splits, strict=True):
        if split:
            d = default_blocks("chunkwise", pk, pv, chunk, split=True, dtype=dtype)
            states, output = next(kernels), next(kernels)
            chunks, nv = -(-T // d["BT"]), -(-pv // d["BV"])
            assert (states.name, output.name) == ("states", "output")
            assert states.steps == chunks  # one dot per chunk on the sequential chain
            assert states.programs == nv * -(-pk // d["BKC"]) * BH
            assert output.programs == nv * chunks * BH
        else:
            d = default_blocks("chunkwise", pk, pv, chunk, dtype=dtype)
            fused = next(kernels)
            assert fused.name == "fused" and fused.steps == 4 * -(-T // d["BT"])
            assert fused.programs == -(-pv // d["BV"]) * BH
    assert next(kernels, None) is None
    if phase == "fwd":  # one orientation: the rule's estimate is the pinned one's
        rule = int(use_split("chunkwise", T, K, chunk, V=V, BH=BH, dtype=dtype))
        pinned = dataclasses.replace(c, config=(("split", rule),))
        assert tune.estimate(p, c) == tune.estimate(p, pinned)


def test_split_pays_for_its_chunk_state_buffer():
    """Split, the [B*H, chunks, K, V] buffer is written and read back in the input dtype, and k
    and v are read by both kernels."""
    p = problem(T=2048, H=64, K=128, V=128, dtype="bfloat16")
    fused = tune._triton_kernels(p, Plan("chunkwise", 64, config=(("split", 0),)))
    split = tune._triton_kernels(p, Plan("chunkwise", 64, config=(("split", 1),)))
    buffer = 64 * (2048 // 64) * 128 * 128 * 2
    reread = 64 * 2048 * (128 + 128) * 2
    assert sum(k.bytes for k in split) == sum(k.bytes for k in fused) + reread + 2 * buffer


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(["bfloat16", "float16", "float32"]),
    BH=st.integers(1, 8),
    dims=st.sampled_from([(16, 16), (32, 64), (64, 64), (60, 100), (128, 128), (128, 32)]),
    chunks=st.integers(32, 256),
    chunk=st.sampled_from(tune.TRITON_CHUNKS),
)
def test_few_programs_prefer_the_split_pass(dtype, BH, dims, chunks, chunk):
    """A fused pass of <= 8 programs walking >= 32 chunks leaves the GPU idle; the split pass
    (a one-dot sequential kernel and a fully parallel one) is estimated faster."""
    K, V = dims
    p = problem(T=chunks * chunk, H=BH, K=K, V=V, dtype=dtype)
    fused = Plan("chunkwise", chunk, config=(("split", 0),))
    split = Plan("chunkwise", chunk, config=(("split", 1),))
    assert tune.estimate(p, split) < tune.estimate(p, fused)


def test_demo_prefill_shape():
    """B=1, H=8, K=32, V=64, T=2048 (the demo's float32 prefill, 5.6x slower than Inductor on an
    H200 when it ran fused): 8 fused programs on 132 SMs. The model picks chunkwise, which the
    launcher runs split (float32 always splits), over parallel (T^2 FMA-unit work) and over the
    fused pass (a long dot chain on 8 SMs). The float32 split runs 32-row chunks for C >= 32
    (blocks._wide_blocks), so C = 32 and C = 64 launch the same kernels and tie."""
    p = problem()
    chosen = tune.model_choice(p)
    assert chosen.form == "chunkwise" and chosen.chunk_size in (32, 64)
    assert tune.estimate(p, Plan("chunkwise", 32)) == tune.estimate(p, Plan("chunkwise", 64))
    assert names(p, chosen) == ["states", "output"]
    fused = dataclasses.replace(chosen, config=(("split", 0),))
    assert tune.estimate(p, chosen) < tune.estimate(p, fused)
    assert tune.estimate(p, chosen) < tune.estimate(p, Plan("parallel", 64))
    half = dataclasses.replace(p, dtype="bfloat16")
    assert names(half, chosen) == ["states", "output"]  # FEW_PROGRAMS: 8 < 32, 32 chunks > 8
    assert tune.estimate(half, chosen) < tune.estimate(half, fused)


# ----------------------------------------------------------------------------- dtypes, SMs


@settings(max_examples=30, deadline=None)
@given(BH=st.integers(1, 300), dims=DIMS, T=st.integers(1, 20000))
def test_wider_dtypes_are_never_faster(BH, dims, T):
    K, V = dims
    p = problem(T, H=BH, K=K, V=V)
    for c in PINNED:
        at = {dt: tune.estimate(dataclasses.replace(p, dtype=dt), c) for dt in DTYPES}
        assert at["bfloat16"] == at["float16"] <= at["float32"], c.label
        # NOTE: float64 recurrent takes narrower V blocks from K = 128 (spec.default_blocks:
        # wider ones spill), so more programs: its estimate may undercut float32's there
        if c.form != "recurrent":
            assert at["float32"] <= at["float64"], c.label


def test_sm_count_comes_from_the_cuda_device_and_is_cached(monkeypatch):
    calls = []

    def properties(dev):
        calls.append(dev)
        return types.SimpleNamespace(multi_processor_count=16)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    assert tune.sm_count("cuda:0") == 16 and tune.sm_count("cuda:0") == 16
    assert len(calls) == 1
    assert tune.sm_count("cpu") == tune.DEFAULT_SMS == tune.MACHINES["triton"].sms
    p = problem(T=4096, H=64, K=128, V=128, dtype="bfloat16")
    small = dataclasses.replace(p, device="cuda:0")
    for c in PINNED:
        assert tune.estimate(small, c) >= tune.estimate(p, c)
    assert tune.estimate(small, PINNED[0]) > tune.estimate(p, PINNED[0])  # 2048 programs


def test_sm_count_without_cuda_is_the_default(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tune.sm_count("cuda:0") == tune.DEFAULT_SMS


# ----------------------------------------------------------------------------- buckets


@settings(max_examples=25, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    phase=st.sampled_from(["fwd", "bwd"]),
    B=st.integers(1, 4),
    H=st.integers(1, 40),
    dims=DIMS,
    T=st.integers(2, 20000),
    data=st.data(),
)
def test_one_choice_per_bucket_and_the_launcher_agrees(dtype, phase, B, H, dims, T, data):
    """Every problem of one planner bucket gets the model's choice at the bucket, and for every
    T of the bucket the launcher runs the same kernels (fused or split) the model estimated."""
    K, V = dims
    p = problem(T, B=B, H=H, K=K, V=V, dtype=dtype, phase=phase)
    top = plan.next_pow2(T)
    other = dataclasses.replace(
        p, T=data.draw(st.integers(top // 2 + 1, top)), B=1, H=data.draw(st.sampled_from(
            [h for h in range(1, 2 * B * H + 1) if plan.next_pow2(h) == plan.next_pow2(B * H)]
        )),
    )  # fmt: skip
    assert other.bucket() == p.bucket()
    first = plan.plan_for(p)
    plan.reset()
    assert plan.plan_for(other) == first
    assert first == dataclasses.replace(tune.model_choice(p.at_bucket()), source="model")
    assert names(p, first) == names(p.at_bucket(), first) == names(other, first)


def test_tf32_float32_dots_count_at_the_tensor_core_rate(monkeypatch):
    """After set_float32_matmul_precision("high") the kernels' float32 dots run as TF32 on the
    tensor cores (spec.float32_precision), and the CUDA estimate follows; CPU never does."""
    from rtpcompile.kernels import spec

    p = dataclasses.replace(problem(T=4096, H=64, K=128, V=128), device="cuda:0")
    c = Plan("chunkwise", 64)
    ieee = tune.estimate(p, c)
    monkeypatch.setattr(spec, "float32_precision", lambda: "tf32")
    assert tune.estimate(p, c) < ieee
    assert tune.estimate(dataclasses.replace(p, dtype="bfloat16"), c) <= tune.estimate(p, c)
    cpu = dataclasses.replace(p, device="cpu")
    assert tune.estimate(cpu, c) == ieee
