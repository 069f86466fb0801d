"""float32 ``tl.dot`` precision: a KernelSpec field that follows torch's float32 matmul setting.

float32 inputs get "tf32" when torch allows TF32 for float32 matmuls (as Inductor's and cuBLAS's
matmuls do), else "ieee"; float64 is always "ieee", 16-bit inputs are unchanged, and under the
Triton interpreter it is "ieee" too. The numerical tests run the generated kernels under the
interpreter (TRITON_INTERPRET=1, RTP_KERNELS=triton) through ``torch.ops.rtp.retention_fwd``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton")

from rtpcompile.kernels import codegen, launch  # noqa: E402
from rtpcompile.kernels.spec import (  # noqa: E402
    KernelSpec,
    choose,
    default_blocks,
    float32_precision,
    render,
)
from rtpcompile.lowering import dispatch  # noqa: E402
from rtpcompile.lowering import reference as ref  # noqa: E402

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


@contextlib.contextmanager
def matmul_precision(value: str):
    """torch.set_float32_matmul_precision(value) inside the block, the previous value after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.fixture
def compiled(monkeypatch):
    """choose() as for CUDA tensors: not under the interpreter."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _spec(dtype=F32, **kw) -> KernelSpec:
    return choose("parallel", "fwd", 48, 80, dtype, dtype, 64, **kw)


def replace(spec: KernelSpec, prec: str) -> KernelSpec:
    return dataclasses.replace(spec, fp32_precision=prec)


def _prec_line(spec: KernelSpec) -> str:
    """The precision the kernels' dots are written with (the spec's constants are literals in the
    code; each keeps a comment line at the top)."""
    source = render(spec)
    record = next(line for line in source.splitlines() if line.startswith("# PREC ="))
    written = set(re.findall(r"input_precision=(\"\w+\")", source))
    assert written == {record.removeprefix("# PREC = ")}, (record, written)
    return f"PREC = tl.constexpr({record.removeprefix('# PREC = ')})"


# ---- the spec field ----------------------------------------------------------------------------


def test_field_defaults_to_ieee_and_is_rendered():
    base = _spec(fp32_precision="ieee")
    assert base.fp32_precision == "ieee" and base.precision == "ieee"
    fast = dataclasses.replace(base, fp32_precision="tf32")
    assert fast.precision == "tf32" and _prec_line(fast) == 'PREC = tl.constexpr("tf32")'
    assert _prec_line(base) == 'PREC = tl.constexpr("ieee")'
    # the precision is in the source, so it names a different module
    names = {codegen.module_name(render(s)) for s in (base, fast, replace(base, "tf32x3"))}
    assert len(names) == 3
    assert "float32[tf32]" in fast.short() and "[" not in base.short().split()[3]


def test_16_bit_and_float64_sources_do_not_change():
    # NOTE: 16-bit dots ignore input_precision; their sources keep Triton's default, "tf32"
    for dtype, prec in ((BF16, "tf32"), (F16, "tf32"), (F64, "ieee")):
        spec = _spec(dtype, fp32_precision="ieee")
        assert spec.fp32_precision == "ieee" and spec.precision == prec
        assert _prec_line(spec) == f'PREC = tl.constexpr("{prec}")'


def test_bad_precision_is_a_value_error():
    with pytest.raises(ValueError, match=r"fp32_precision must be one of \['ieee', 'tf32', "):
        replace(_spec(fp32_precision="ieee"), "fast")
    with pytest.raises(ValueError, match=r"or one of \['ieee', 'tf32', 'tf32x3'\], got 'TF32'"):
        _spec(fp32_precision="TF32")
    with pytest.raises(ValueError, match="float32 inputs only and must be 'ieee' for float64"):
        replace(_spec(F64), "tf32")
    with pytest.raises(ValueError, match="for bfloat16, got 'tf32x3'"):
        replace(_spec(BF16), "tf32x3")


def test_choose_ignores_the_precision_for_other_dtypes():
    for dtype in (BF16, F16, F64):
        assert _spec(dtype, fp32_precision="tf32").fp32_precision == "ieee"
    with pytest.raises(ValueError, match=r"None \(follow torch\) or one of .* got 'fp16'"):
        _spec(BF16, fp32_precision="fp16")


def test_float32_blocks_and_unchanged_16_bit_blocks():
    """float32/float64 take their own blocks (blocks._wide_blocks); 16-bit ones are unchanged."""
    for form, split in (("parallel", False), ("chunkwise", False), ("chunkwise", True),
                        ("recurrent", False)):  # fmt: skip
        for K in (16, 32, 48, 100, 128, 256):
            old = default_blocks(form, K, 80, 64, split)
            for name in ("bfloat16", "float16"):
                assert default_blocks(form, K, 80, 64, split, dtype=name) == old
            wide = default_blocks(form, K, 80, 64, split, dtype="float32")
            if form == "recurrent":
                assert wide == old
            elif split:
                assert (wide["BT"], wide["BV"], wide["BKC"]) == (32, 64, min(wide["BK"], 32))
            else:
                assert wide["BT"] == (32 if form == "parallel" else 16) and wide["num_warps"] == 8
    assert default_blocks("chunkwise", 64, 64, 16, True, dtype="float32")["BT"] == 16
    assert default_blocks("recurrent", 128, 128, dtype="float64")["BV"] == 32
    spec = choose("chunkwise", "fwd", 64, 64, F32, F32, 64, stage="output")
    assert (spec.BT, spec.BKC, spec.num_warps) == (32, 32, 4)


# ---- following torch ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, expected", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")]
)
def test_choose_follows_torch_float32_matmul_precision(compiled, setting, expected):
    before = torch.get_float32_matmul_precision()
    with matmul_precision(setting):
        assert float32_precision() == expected
        assert _spec().fp32_precision == expected
        assert _spec(fp32_precision="ieee").fp32_precision == "ieee"  # explicit wins
        assert _spec(F64).precision == "ieee" and _spec(BF16).fp32_precision == "ieee"
    assert torch.get_float32_matmul_precision() == before


def test_choose_follows_legacy_allow_tf32(compiled):
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert _spec().fp32_precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = False
        assert _spec().fp32_precision == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def test_interpreter_forces_ieee(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.empty(1, 2, 70, 48)
    v = torch.empty(1, 2, 70, 80)
    with matmul_precision("high"):
        assert float32_precision() == "ieee"
        infos = launch_specs(q, v)  # what a pass on CPU tensors launches
    assert infos and all(s.fp32_precision == "ieee" for s in infos)


def launch_specs(q: torch.Tensor, v: torch.Tensor) -> list[KernelSpec]:
    """The specs a chunkwise forward of these shapes would launch (nothing runs)."""
    seen = []
    real = launch.choose

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    with pytest.MonkeyPatch.context() as mp, launch.recording():
        mp.setattr(launch, "choose", spy)
        p = launch.Pass("chunkwise", q, q, v, torch.full((2,), 0.9), 48**-0.5)
        launch.run(p, 64)
    return seen


# ---- numerics under the interpreter ------------------------------------------------------------


def _check_against_reference(form: str, T: int = 70, K: int = 48, V: int = 80) -> None:
    """retention_fwd in float32 vs the float64 reference: o, the final state, every gradient."""
    g = torch.Generator().manual_seed(0)
    wide = [torch.randn(1, 2, T, d, generator=g, dtype=F64) for d in (K, K, V)]
    wide += [torch.tensor([0.3, 0.97], dtype=F64), torch.randn(1, 2, K, V, generator=g, dtype=F64)]
    wide = [x.requires_grad_() for x in wide]
    low = [x.detach().float().requires_grad_() for x in wide]
    scale = K**-0.5
    o, sf = torch.ops.rtp.retention_fwd(*low[:4], scale, low[4], form, 16)
    assert dispatch.use_triton(low[0]) and sf.dtype == F32
    ro, rs = ref.reference_parallel(*wide[:4], scale, wide[4])
    dout, dsf = (torch.randn(x.shape, generator=g, dtype=F64) for x in (ro, rs))
    ((o * dout.float()).sum() + (sf * dsf.float()).sum()).backward()
    ((ro * dout).sum() + (rs * dsf).sum()).backward()
    pairs = [("o", o, ro), ("final state", sf, rs)]
    pairs += [(f"d{n}", a.grad, e.grad) for n, a, e in zip("qkv", low, wide, strict=False)]
    for what, actual, expected in pairs:
        err = (actual.double() - expected.detach()).abs().max().item()
        size = expected.detach().abs().max().item() + 1e-6
        assert err <= 2e-4 * size, f"{form} {what}: max error {err:.3e} vs max |ref| {size:.3e}"


@pytest.mark.parametrize("form", ["chunkwise", "parallel"])
def test_float32_kernels_match_the_float64_reference(triton_on_cpu, form):
    with matmul_precision("high"):  # under the interpreter: "ieee" all the same
        _check_against_reference(form)


def test_interpreter_computes_tf32_dots_in_float32(triton_on_cpu, monkeypatch):
    """A "tf32" source runs under the interpreter, which computes its dots in float32 (numpy)."""
    real = launch.choose
    specs = []

    def tf32(*args, **kwargs):
        specs.append(real(*args, **{**kwargs, "fp32_precision": "tf32"}))
        return specs[-1]

    monkeypatch.setattr(launch, "choose", tf32)
    _check_against_reference("parallel", T=40, K=20, V=24)
    assert specs and all(s.precision == "tf32" for s in specs)


@pytest.mark.gpu
@pytest.mark.parametrize(("setting", "precision", "bound"), [("highest", "ieee", 2e-4),
                                                            ("high", "tf32", 5e-3)])  # fmt: skip
@pytest.mark.parametrize("form", ["chunkwise", "parallel", "recurrent"])
def test_gpu_float32_follows_the_setting_within_its_accuracy(form, setting, precision, bound):
    """On CUDA the kernels run the precision torch's setting asks for, each within its own
    accuracy against float64: "ieee" to float32 rounding, "tf32" to TF32's ~1e-3."""
    g = torch.Generator().manual_seed(0)
    T, K, V = 300, 64, 96
    wide = [torch.randn(2, 4, T, d, generator=g, dtype=F64) for d in (K, K, V)]
    wide = [x.cuda() for x in wide] + [torch.linspace(0.9, 0.999, 4, dtype=F64, device="cuda")]
    low = [x.float() for x in wide]
    with matmul_precision(setting):
        assert float32_precision() == precision
        o, _ = torch.ops.rtp.retention_fwd(*low, K**-0.5, None, form, 0)
    ro, _ = ref.reference_parallel(*wide, K**-0.5)
    err = (o.double() - ro).abs().max().item() / ro.abs().max().item()
    assert err <= bound, f"{form} at {setting!r} ({precision}): relative error {err:.2e}"
