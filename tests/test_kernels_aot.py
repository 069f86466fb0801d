"""Every generated template compiles for a real GPU target, on this CPU-only machine.

The interpreter runs kernels as Python, so it cannot catch code Triton's compiler rejects or
register spills. ``kernels.aot.resources`` runs Triton's full pipeline for sm_90 and reads
``ptxas -v``, specialised as a launch specialises the kernel (checked against the arguments the
launch path passes); these tests compile each template (flags on) once, keep the split stages'
bfloat16 defaults spill-free and the float32 defaults within a few bytes of it, and compile a
"tf32" float32 kernel (benchmarks/kernel_resources.py has the full table).
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton")

from rtpcompile.kernels import aot, backward, codegen, launch  # noqa: E402
from rtpcompile.kernels.spec import choose  # noqa: E402


@pytest.fixture(autouse=True)
def _compiler(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90)
    except Exception as exc:  # noqa: BLE001 - a wheel without the NVIDIA backend
        pytest.skip(f"Triton's NVIDIA backend (ptxas) is unavailable: {exc}")


BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
EVERYTHING = {"row_scale": True, "row_dot": True, "extra_value_column": True, "state_in": True}
SPECS = {
    # the backward's dk/dv shape of pass: reversed, s0 at position 0, every optional feature
    "fused-bwd-all-flags": lambda: choose(
        "chunkwise", "bwd", 48, 81, F16, F16, 64, state_offset=0, state_out=True, **EVERYTHING
    ),
    "states-bwd-s0": lambda: choose(
        "chunkwise",
        "bwd",
        100,
        72,
        F16,
        F16,
        64,
        {"split": 1},
        stage="states",
        state_in=True,
        state_offset=0,
        state_out=True,
        store_o=False,
    ),  # fmt: skip
    "output-all-flags": lambda: choose(
        "chunkwise",
        "bwd",
        100,
        81,
        F32,
        F32,
        64,
        {"split": 1},
        stage="output",
        row_scale=True,
        row_dot=True,
        extra_value_column=True,
        state_offset=0,
    ),  # fmt: skip
    "parallel-all-flags": lambda: choose(
        "parallel",
        "fwd",
        48,
        81,
        BF16,
        BF16,
        64,
        row_scale=True,
        row_dot=True,
        extra_value_column=True,
    ),  # fmt: skip
    "recurrent": lambda: choose(
        "recurrent", "fwd", 128, 128, BF16, BF16, 64, state_in=True, state_out=True
    ),
}


@pytest.mark.parametrize("name", SPECS)
def test_template_compiles_for_sm90(name):
    r = aot.resources(SPECS[name]())
    assert 0 < r.registers <= 255 and r.spill_bytes >= 0 and r.shared_bytes >= 0


@pytest.mark.parametrize("K", [128, 256])
def test_split_defaults_do_not_spill_in_bfloat16(K):
    for stage in ("states", "output"):
        flags = {"state_out": stage == "states", "store_o": stage == "output"}
        spec = choose("chunkwise", "fwd", K, K, BF16, BF16, 64, {"split": 1}, stage=stage, **flags)
        r = aot.resources(spec)
        assert r.spill_bytes == 0, f"{spec.short()}: {r}"


@pytest.mark.parametrize("K,V", [(64, 64), (128, 128), (256, 256), (128, 64)])
def test_dqk_defaults_do_not_spill_in_bfloat16(K, V):
    """The backward's dq/dk kernel (``blocks.dqk_blocks``): a V read in one loop step spilled
    16-36 bytes (K = 64, V = 64 and K = 128, V = 64) unspecialised, nothing as launched (since
    2026-11-25); two or more steps spill nothing either way."""
    for dgamma in (False, True):
        spec = choose("chunkwise", "bwd", K, V, BF16, BF16, 64, {"split": 1}, stage="dqk",
                      row_dot=dgamma)  # fmt: skip
        r = aot.resources(spec)
        assert r.spill_bytes == 0, f"{spec.short()}: {r}"


# NOTE: float32 defaults (blocks._wide_blocks) compile spill-free at these K (ptxas of Triton 3.9's
# wheel, benchmarks/results/static); the bound leaves room for a compiler update's few bytes
# while failing the pathology the rule fixed: the 16-bit blocks spilled 92 bytes (split output)
# to 22,680 (fused) per thread in float32 unspecialised, 14,272 (split output with row dots)
# and 22,176 (fused) at K = 64 as launched.
F32_SPILL_BOUND = 128
F32_KINDS = ("parallel", "fused", "states", "output", "dqk", "dqk-no-dgamma")


F32_FLAGS = {
    "fused": {"state_out": True},
    "states": {"state_out": True, "store_o": False},
    # the dq pass's shape of output stage with d gamma: a ones column, row scales and row dots
    "output": {"extra_value_column": True, "row_scale": True, "row_dot": True},
    "dqk": {"row_dot": True},  # the split backward's dq/dk kernel with d gamma's terms
    # and without (4 warps: 48 / 264 bytes at K = 64 / 128 unspecialised, 0 as launched)
    "dqk-no-dgamma": {},
}


def _float32_default(kind: str, K: int):
    """The float32 default spec of one kernel ("ieee" dots)."""
    if kind == "parallel":
        return choose("parallel", "fwd", K, K, F32, F32, 64, fp32_precision="ieee")
    flags = F32_FLAGS[kind]
    V = K + int(flags.get("extra_value_column", False))
    cfg = {"split": int(kind != "fused")}
    stage = kind.split("-")[0]
    direction = "bwd" if stage == "dqk" else "fwd"
    return choose("chunkwise", direction, K, V, F32, F32, 64, cfg, stage=stage,
                  fp32_precision="ieee", **flags)  # fmt: skip


@pytest.mark.parametrize("K", [64, 128])
@pytest.mark.parametrize("kind", F32_KINDS)
def test_float32_defaults_do_not_spill(kind, K):
    spec = _float32_default(kind, K)
    r = aot.resources(spec)
    assert r.spill_bytes <= F32_SPILL_BOUND, f"{spec.short()}: {r}"


def test_tf32_dots_compile_for_sm90():
    spec = choose("parallel", "fwd", 80, 48, F32, F32, 64, fp32_precision="tf32")
    assert spec.precision == "tf32"
    r = aot.resources(spec)
    assert 0 < r.registers <= 255 and r.spill_bytes <= F32_SPILL_BOUND


def _small_spec():
    return choose("recurrent", "fwd", 16, 16, F16, F16, 64, state_in=True, state_out=True)


@pytest.mark.parametrize("capability", [100, 120])
def test_blackwell_targets_compile(capability):
    """ptxas gets the architecture of the PTX's .target line (sm_100a, sm_120a), not sm_100."""
    r = aot.resources(_small_spec(), capability=capability)
    assert 0 < r.registers <= 255 and r.spill_bytes >= 0


def test_ptx_arch_is_read_from_the_target_line():
    ptx = "//\n.version 9.0\n.target sm_120a\n.address_size 64\n"
    assert aot.ptx_arch(ptx) == "sm_120a"
    assert aot.ptx_arch(".version 8.7\n.target sm_80\n") == "sm_80"
    with pytest.raises(RuntimeError, match="no .target line"):
        aot.ptx_arch(".version 8.7\n")


def test_capabilities_cover_the_common_targets():
    assert {75, 80, 86, 89, 90, 100, 120} <= set(aot.capabilities())


# NOTE: 88 passes ptxas-blackwell's list but not the legacy ptxas Triton picks for it, and Triton's
# LLVM aborts the process on it; 9 was a ptxas error with the whole PTX dumped
@pytest.mark.parametrize("capability", [9, 88, 1000, 90.0, "90", True])
def test_bad_capability_is_a_value_error(capability):
    with pytest.raises(ValueError, match=r"major \* 10 \+ minor.*one of \[.*90.*got"):
        aot.resources(_small_spec(), capability=capability)


@pytest.mark.parametrize("field", ["in_dtype", "out_dtype"])
@pytest.mark.parametrize("bad", ["int8", "torch.float32", "fp16"])
def test_spec_rejects_unknown_dtype_names(field, bad):
    """Was accepted, then a bare KeyError in aot.signature (or a template error)."""
    spec = _small_spec()
    with pytest.raises(ValueError, match=rf"KernelSpec.{field} must be one of .*float32.*{bad}"):
        dataclasses.replace(spec, **{field: bad})


def _launched(run, *args) -> list[tuple]:
    """(spec, arguments) of every kernel call ``run(*args)`` makes through ``launch``, recorded
    instead of launched (meta tensors: nothing runs)."""
    calls = []

    class Kernel:
        def __init__(self, spec):
            self.spec = spec
            self.arg_names = codegen.load(spec).kernel.arg_names

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.spec, args, kwargs))

    fake = types.SimpleNamespace(
        load=lambda spec: types.SimpleNamespace(kernel=Kernel(spec)), info=codegen.info
    )
    real = launch.codegen
    launch.codegen = fake
    try:
        run(*args)
    finally:
        launch.codegen = real
    return calls


def _binder_specialization(spec, args, kwargs) -> tuple[dict, dict]:
    """(signature, attrs) as Triton's launcher derives them from ``args`` for sm_90."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = codegen.load(spec).kernel
    backend = make_backend(GPUTarget("cuda", 90, 32))
    bound, found, options = create_function_from_signature(fn.signature, fn.params, backend)(
        *args, **kwargs
    )
    _, types_, _, attrs = fn._pack_args(backend, kwargs, bound, found, options)
    return types_, attrs


# NOTE: the state's layout is not the spec's: the backward's dq pass reads s0 transposed, and an
# output stage is passed the pass's state, which it does not read
_STATE_ARGS = {"s0", "s_sb", "s_sh", "s_sk", "s_sv"}


@pytest.mark.parametrize("layout", aot.LAYOUTS)
@pytest.mark.parametrize("dtype", [BF16, F32, torch.float64])
def test_specialisation_is_what_the_launch_path_passes(dtype, layout):
    """aot compiled every stride and size as a plain i32; a launch makes the unit strides
    constants and marks 16-divisible ints and aligned pointers, and compiles other code (fused
    K = V = 256 bfloat16: 184 spilled bytes and 20,480 shared unspecialised, 0 and 51,200 as
    launched). Every kernel of a forward and a backward is specialised as launched."""
    B, H, T = aot.SHAPE
    K, V = 64, 64

    def rows(D):
        x = torch.empty(B, T, H, D, dtype=dtype, device="meta").transpose(1, 2)
        return x if layout == "bthd" else torch.empty(B, H, T, D, dtype=dtype, device="meta")

    q, k, v, do = rows(K), rows(K), rows(V), rows(V)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.empty(H, device="meta", dtype=acc)
    s0 = torch.empty(B, H, K, V, device="meta", dtype=acc)
    calls = []
    for form in ("chunkwise", "parallel"):
        calls += _launched(backward.forward, form, q, k, v, g, K**-0.5, s0, 64)
        for state in (None, s0):
            args = (form, do, s0, q, k, v, g, K**-0.5, state, None, 64)
            calls += _launched(backward.backward, *args)
    stages = {(spec.form, spec.stage) for spec, _, _ in calls}
    assert stages == {("chunkwise", s) for s in ("fused", "states", "output", "dqk")} | {
        ("parallel", "fused")
    }, stages
    for spec, args, kwargs in calls:
        # the launch says its compile options, fp fusion included (Triton 3.10 turns its own
        # default off), and aot compiles with the same
        assert kwargs == launch.compile_options(spec) and kwargs["enable_fp_fusion"] is True
        names = codegen.load(spec).kernel.arg_names
        want_types, want_attrs = _binder_specialization(spec, args, kwargs)
        got_types, _, got_attrs, options = aot.specialization(spec, layout=layout)
        assert options["enable_fp_fusion"] is True
        for i, name in enumerate(names):
            if name not in _STATE_ARGS:
                want = (want_types[name], want_attrs.get((i,)))
                assert (got_types[name], got_attrs.get((i,))) == want, (spec.short(), name)
        # a float64 kernel takes its scales as doubles: Triton types a Python float fp32 unless
        # the parameter says otherwise (float64 results were off by ~2e-8 until 2026-11-25)
        wide = "fp64" if dtype == torch.float64 else "fp32"
        assert {got_types[s] for s in ("scale", "state_scale") if s in names} == {wide}
        units = [s for s in ("s_qk", "s_kk", "s_vv") if s in names]  # a states stage has no q
        assert len(units) >= 2 and all(got_types[s] == "constexpr" for s in units)


def test_unspecialised_compile_on_request():
    spec = choose("chunkwise", "fwd", 64, 64, BF16, BF16, 64)
    types_, constexprs, attrs, _ = aot.specialization(spec, layout=None)
    assert not constexprs and not attrs and types_["s_qk"] == "i32"
    with pytest.raises(ValueError, match="layout must be one of"):
        aot.resources(spec, layout="bhdt")


def test_fused_bfloat16_k256_compiles_as_launched():
    """The finding's kernel: unspecialised it spilled 184 bytes with 20,480 shared; as launched
    (unit strides constant: vector loads) it spills nothing and stages 51,200 bytes."""
    spec = choose("chunkwise", "fwd", 256, 256, BF16, BF16, 64)
    launched, plain = aot.resources(spec), aot.resources(spec, layout=None)
    assert launched.spill_bytes == 0 and plain.spill_bytes > 0, (launched, plain)
    assert launched.shared_bytes > plain.shared_bytes, (launched, plain)


def test_blocks_per_sm_is_the_occupancy_rule():
    """The smallest of registers (per warp, in units of 256), warps, block slots and shared
    memory: the figures the CUDA occupancy calculator gives on sm_90."""
    res = aot.Resources
    assert aot.blocks_per_sm(res(208, 0, 0), 4) == 2  # 208*32 -> 6656 per warp, 26624 a block
    assert aot.blocks_per_sm(res(64, 0, 0), 8) == 4  # 2048 per warp: 8 warps take 16384
    assert aot.blocks_per_sm(res(32, 0, 0), 8) == 8  # warp-bound: 64 warps
    assert aot.blocks_per_sm(res(16, 0, 0), 1) == 32  # block slots
    assert aot.blocks_per_sm(res(32, 0, 100 * 1024), 4) == 2  # shared memory: 228 KiB
    assert aot.blocks_per_sm(res(32, 0, 16 * 1024), 1) == 13  # with 1 KiB reserved per block
    assert aot.blocks_per_sm(res(32, 0, 0), 8, capability=86) == 6  # 48 warps
    with pytest.raises(ValueError, match="capability must be one of"):
        aot.blocks_per_sm(res(32, 0, 0), 4, capability=75)


def test_decode_occupancy_table(tmp_path, monkeypatch):
    """``kernel_resources.py --decode``: one config compiled at the decode shape, its row and
    table (the bench script is loaded as the CLI runs it)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "kernel_resources.py"
    spec = importlib.util.spec_from_file_location("kernel_resources", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "DECODE_BV", (64,))
    monkeypatch.setattr(bench, "DECODE_WARPS", (8,))
    (row,) = bench.decode(64, 16, 128, torch.bfloat16, 90, jobs=1)
    assert (row["BV"], row["num_warps"], row["programs"]) == (64, 8, 2 * 64 * 16)
    assert row["spill_bytes"] == 0 and row["blocks_per_sm"] >= 1
    assert row["waves"] == round(2048 / (row["blocks_per_sm"] * 132), 2)
    bench.write_decode([row], tmp_path, 64, 16, 128, 90)
    (md,) = tmp_path.glob("decode_occupancy_sm_90_*.md")
    assert f"| 64 | 8 | {row['registers']} | 0 | {row['blocks_per_sm']} |" in md.read_text()


@pytest.mark.parametrize("dtype", [BF16, torch.float16, torch.float32])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_decode_step_keeps_its_state_in_one_layout(dtype, direction):
    """The decode step's kernels (state in and out; the backward's with d gamma's row dots) at
    their default blocks, as a (64, 16, 1) call launches them: k and q read as [1, BK] rows and
    transposed made Triton convert the [BK, BV] state between two layouts through shared memory
    at every step (8 KiB staged, 208-255 registers: 2 programs per SM); read as [BK] vectors the
    state keeps the layout it is loaded and stored in (127-136 registers in bfloat16, 3-4
    programs, ~1 KiB of shared memory for the small vectors' conversions)."""
    flags = {"row_dot": True} if direction == "bwd" else {}
    spec = choose("recurrent", direction, 128, 128, dtype, dtype, 64, fp32_precision="ieee",
                  state_in=True, state_out=True, **flags)  # fmt: skip
    r = aot.resources(spec, shape=(64, 16, 1))
    assert r.spill_bytes == 0 and r.shared_bytes <= 2048, f"{spec.short()}: {r}"
    assert aot.blocks_per_sm(r, spec.num_warps) >= 3, f"{spec.short()}: {r}"


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@pytest.mark.parametrize("shape", [(64, 16, 1), (2, 8, 2048)], ids=["decode", "T-loop"])
def test_recurrent_k256_default_does_not_spill(dtype, shape):
    """At K = 256 the recurrent kernel's [256, 32] state slice runs on 8 warps: at 4 it took 128
    registers and spilled 8 bytes per thread when T is not 1 (the loop is not unrolled)."""
    spec = choose("recurrent", "fwd", 256, 256, dtype, dtype, 64, fp32_precision="ieee",
                  state_in=True, state_out=True)  # fmt: skip
    r = aot.resources(spec, shape=shape)
    assert spec.num_warps == 8 and r.spill_bytes == 0, f"{spec.short()}: {r}"


def test_the_smallest_config_fits_an_sm86_block_where_float64_defaults_do_not():
    """The float64 parallel kernel's defaults at K = V = 256 need 196,608 B of shared memory
    with a state (Hopper gives 232,448 B a block; A100 166,912 B, sm_86/89 101,376 B): a launch
    out of resources runs again with ``custom_ops.SMALLEST_CONFIG``, which fits all three."""
    from rtpcompile.lowering.custom_ops import SMALLEST_CONFIG

    flags = {"state_in": True, "row_dot": True}
    F64 = torch.float64
    default = choose("parallel", "fwd", 256, 256, F64, F64, 64, **flags)
    small = choose("parallel", "fwd", 256, 256, F64, F64, 64, dict(SMALLEST_CONFIG), **flags)
    assert aot.resources(default, capability=80).shared_bytes > 166_912
    assert aot.resources(small, capability=80).shared_bytes <= 101_376
