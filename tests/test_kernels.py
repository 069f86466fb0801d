"""Generated Triton kernels against the float64 reference: outputs and every gradient.

CPU tests run the kernels under the Triton interpreter (TRITON_INTERPRET=1, set per test before
any kernel module is generated; the module cache is keyed by it). The interpreter is slow, so
shapes are small and the recurrent form gets short sequences. ``gpu`` tests run the compiled
kernels on CUDA, bfloat16 and large shapes included.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="the Triton kernels need triton")

from rtpcompile import kernels  # noqa: E402
from rtpcompile.kernels import codegen, launch  # noqa: E402
from rtpcompile.kernels.spec import KernelSpec, choose, render  # noqa: E402
from rtpcompile.lowering import reference as ref  # noqa: E402

FORMS = ("chunkwise", "parallel", "recurrent")
TOL = {torch.float64: 1e-10, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2}


@pytest.fixture(autouse=True)
def _interpreter(request, monkeypatch):
    if "gpu" in request.keywords:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    # NOTE: this file covers the fused chunkwise kernel; the split pass, which the rule picks for
    # float32 and for small grids, has the same matrix in tests/test_kernel_split.py
    monkeypatch.setattr(launch, "use_split", lambda *args, **kwargs: False)
    yield


def make(B, H, T, K, V, dtype, device="cpu", seed=0, state=False, btHd=False):
    """Inputs in float64 (leaves for the reference) and their low-precision, strided copies."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=torch.float64) for d in (K, K, V))
    s0 = torch.randn(B, H, K, V, generator=g, dtype=torch.float64) if state else None
    gamma = torch.linspace(0.6, 1.0, H, dtype=torch.float64) ** (1.0 / max(1, H))
    if H > 1:
        gamma[0] = 0.3
    ref_in = [x.to(device).requires_grad_() for x in (q, k, v, gamma)]
    ref_in.append(None if s0 is None else s0.to(device).requires_grad_())
    low = []
    for x in (q, k, v):
        x = x.to(device, dtype)
        # NOTE: [B, T, H, D] storage seen as [B, H, T, D], the layout of a real projection
        low.append(x.transpose(1, 2).contiguous().transpose(1, 2) if btHd else x)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    low.append(gamma.to(device, wide))
    low.append(None if s0 is None else s0.to(device, wide))
    return ref_in, low


def close(actual, expected, dtype, what):
    err = (actual.double() - expected).abs().max().item()
    size = expected.abs().max().item() + 1e-6
    assert err <= TOL[dtype] * size, f"{what}: max error {err:.3e} vs max |ref| {size:.3e}"


def check(form, B, H, T, K, V, dtype, state, dsf, btHd=False, chunk=16, device="cpu", seed=0):
    (q, k, v, gamma, s0), (lq, lk, lv, lg, ls0) = make(
        B, H, T, K, V, dtype, device, seed, state, btHd
    )
    scale = K**-0.5
    ro, rs = ref.reference_parallel(q, k, v, gamma, scale, s0)
    o, sf = kernels.triton_forward(form, lq, lk, lv, lg, scale, ls0, chunk)
    assert o.shape == (B, H, T, V) and sf.shape == (B, H, K, V)
    assert sf.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    close(o, ro, dtype, "o")
    close(sf, rs, dtype, "final state")
    gen = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(ro.shape, generator=gen, dtype=torch.float64).to(device)
    dsf_ = torch.randn(rs.shape, generator=gen, dtype=torch.float64).to(device) if dsf else None
    loss = (ro * do).sum() + ((rs * dsf_).sum() if dsf else 0)
    leaves = [x for x in (q, k, v, gamma, s0) if x is not None]
    grads = torch.autograd.grad(loss, leaves)
    out = kernels.triton_backward(
        form,
        do.to(dtype),
        None if dsf_ is None else dsf_.to(sf.dtype),
        lq,
        lk,
        lv,
        lg,
        scale,
        ls0,
        sf,
        chunk,
    )
    assert (out[4] is None) == (not state)
    for name, a, e in zip(("dq", "dk", "dv", "dgamma", "ds0"), out, grads, strict=False):
        close(a, e, dtype, name)


CASES = [
    # form, B, H, T, K, V, chunk
    ("chunkwise", 1, 2, 1, 8, 8, 16),
    ("chunkwise", 1, 2, 63, 48, 80, 16),
    ("chunkwise", 2, 1, 65, 16, 16, 32),
    ("chunkwise", 1, 2, 130, 12, 20, 64),
    ("parallel", 1, 2, 1, 8, 8, 16),
    ("parallel", 1, 2, 63, 48, 80, 16),
    ("parallel", 2, 1, 130, 12, 20, 16),
    ("recurrent", 1, 2, 1, 48, 80, 16),
    ("recurrent", 2, 1, 5, 12, 20, 16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("state,dsf", [(False, False), (True, True)], ids=["no-state", "state+dsf"])
def test_forms_float32(case, state, dsf):
    form, B, H, T, K, V, chunk = case
    check(form, B, H, T, K, V, torch.float32, state, dsf, btHd=T % 2 == 1, chunk=chunk)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("state,dsf", [(True, False), (False, True)], ids=["state", "dsf"])
def test_state_or_final_grad_alone(form, state, dsf):
    check(form, 1, 2, 9 if form == "recurrent" else 40, 12, 20, torch.float32, state, dsf)


@pytest.mark.parametrize("form", FORMS)
def test_float16_permuted(form):
    if form == "recurrent":  # NOTE: the interpreter is slowest on per-token float16 math
        check(form, 1, 1, 3, 16, 24, torch.float16, True, True, btHd=True)
    else:
        check(form, 1, 2, 65, 48, 80, torch.float16, True, True, btHd=True)


def test_float64_accumulates_in_float64():
    check("chunkwise", 1, 2, 40, 8, 12, torch.float64, True, True, btHd=True)


def test_fused_qkv_slices():
    """q, k, v as slices of one fused projection (non-contiguous, shared storage)."""
    B, H, T, D = 1, 2, 33, 16
    qkv = torch.randn(B, T, 3 * H * D, dtype=torch.float32)
    q, k, v = (x.view(B, T, H, D).transpose(1, 2) for x in qkv.split(H * D, dim=-1))
    gamma = torch.tensor([0.5, 0.95])
    o, s = kernels.triton_forward("chunkwise", q, k, v, gamma, 0.25, None, 16)
    ro, rs = ref.reference_recurrent(q, k, v, gamma, 0.25)
    close(o, ro, torch.float32, "o")
    close(s, rs, torch.float32, "state")


@settings(max_examples=12, deadline=None)
@given(
    form=st.sampled_from(("chunkwise", "parallel")),
    T=st.integers(1, 70),
    K=st.sampled_from([5, 16, 24, 48]),
    V=st.sampled_from([3, 16, 33, 80]),
    state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_shapes(form, T, K, V, state, seed):
    check(form, 1, 2, T, K, V, torch.float32, state, state, chunk=16, seed=seed)


def test_extra_value_column_and_row_scale():
    """The spec's optional features: v gets a column of ones; query rows get a per-row scale."""
    (q, k, v, gamma, _), (lq, lk, lv, lg, _) = make(1, 2, 37, 12, 20, torch.float32)
    rs = torch.rand(1, 2, 37, dtype=torch.float64) + 0.5
    ones = torch.ones(*v.shape[:3], 1, dtype=torch.float64)
    expect, _ = ref.reference_parallel(q * rs[..., None], k, torch.cat([v, ones], -1), gamma, 0.3)
    for form in ("chunkwise", "parallel", "recurrent"):
        p = launch.Pass(form, lq, lk, lv, lg, 0.3, row_scale=rs.float(), extra_value_column=True)
        o, _, _ = launch.run(p, 16)
        assert o.shape[-1] == 21
        close(o, expect.detach(), torch.float32, f"{form} o with ones column and row scale")


def test_through_the_op(monkeypatch):
    """RTP_KERNELS=triton routes the public op (forward and autograd) through these kernels."""
    from rtpcompile import ops
    from rtpcompile.lowering import dispatch

    monkeypatch.setenv("RTP_KERNELS", "triton")
    dispatch._kernels_package.cache_clear()
    (q, k, v, gamma, s0), (lq, lk, lv, lg, ls0) = make(1, 2, 40, 16, 24, torch.float32, state=True)
    leaves = [x.detach().requires_grad_() for x in (lq, lk, lv, lg, ls0)]
    o, s = ops.retention(
        *leaves[:4], form="chunkwise", initial_state=leaves[4], output_final_state=True
    )
    assert dispatch.use_triton(lq)
    ro, rs = ref.reference_parallel(q, k, v, gamma, None, s0)
    close(o, ro, torch.float32, "o")
    (o.sum() + s.sum()).backward()
    (ro.sum() + rs.sum()).backward()
    for a, e in zip(leaves, (q, k, v, gamma, s0), strict=True):
        close(a.grad, e.grad, torch.float32, "grad through op")
    dispatch._kernels_package.cache_clear()


# ---- code generation, the module cache, explain() support ---------------------------------


def _spec(**kw) -> KernelSpec:
    return choose("chunkwise", "fwd", 48, 80, torch.float16, torch.float16, 64, **kw)


def test_render_is_deterministic_and_named_by_hash():
    a, b = render(_spec()), render(_spec())
    assert a == b and "# K = 48  " in a
    assert codegen.info(_spec()).module == codegen.module_name(a)
    assert codegen.info(_spec(state_in=True)).module != codegen.info(_spec()).module


@pytest.mark.parametrize(
    ("form", "direction", "stage"),
    [
        ("parallel", "fwd", "fused"),
        ("recurrent", "fwd", "fused"),
        ("chunkwise", "bwd", "fused"),
        ("chunkwise", "bwd", "states"),
        ("chunkwise", "bwd", "output"),
        ("chunkwise", "bwd", "dqk"),
    ],
)
def test_reductions_sum_with_tritons_own_combine(form, direction, stage):
    """Every reduction goes through ``_sum`` (Triton's ``_sum_combine``): the interpreter sums
    that one with numpy and any other combine function element by element in Python (3x the
    CPU kernel tests' time when the row-dot sums used a local ``a + b``)."""
    spec = choose(form, direction, 48, 80, torch.float32, torch.float32, 64, row_dot=True,
                  stage=stage)  # fmt: skip
    src = render(spec)
    assert src.count("tl.reduce(") == src.count("tl.reduce(x, axis, tl.standard._sum_combine)") == 1
    assert "tl.sum(" not in src


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="form must be one of"):
        KernelSpec("diagonal", "fwd", 8, 8, 16, 16, 16, "float32", "float32")
    with pytest.raises(ValueError, match="power of two"):
        KernelSpec("chunkwise", "fwd", 8, 8, 24, 16, 16, "float32", "float32")
    with pytest.raises(ValueError, match="K, V <= 256"):
        choose("chunkwise", "fwd", 300, 8, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="dtypes"):
        choose("chunkwise", "fwd", 8, 8, torch.int32, torch.float32)


def test_cache_dir_private_and_tampered_module_regenerated(tmp_path, monkeypatch):
    monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(codegen, "_LOADED", {})
    spec = _spec(state_out=True)
    module = codegen.load(spec)
    path = codegen.cache_dir() / f"{codegen.info(spec).module}.py"
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_text() == render(spec) and module.__file__ == str(path)
    # tamper: the next process must not import it as is
    path.write_text(render(spec).replace("tl.exp2", "tl.exp"))
    monkeypatch.setattr(codegen, "_LOADED", {})
    codegen.load(spec)
    assert path.read_text() == render(spec)


def test_cache_dir_tightened(tmp_path, monkeypatch):
    monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path))
    (tmp_path / "kernels").mkdir(mode=0o777)
    os.chmod(tmp_path / "kernels", 0o777)
    assert stat.S_IMODE(codegen.cache_dir().stat().st_mode) == 0o700


def test_dump_kernels(tmp_path, monkeypatch):
    monkeypatch.setenv("RTP_DUMP_KERNELS", str(tmp_path / "dump"))
    monkeypatch.setattr(codegen, "_LOADED", {})
    q = torch.randn(1, 1, 3, 8)
    kernels.triton_forward("recurrent", q, q, q, torch.tensor([0.9]), 1.0, None, 16)
    dumped = sorted(p.name for p in (tmp_path / "dump").iterdir())
    expect = [i.module + ".py" for i in kernels.kernels_for("recurrent", q, q, q, q[0, :, 0, 0])]
    assert dumped == expect


def test_dump_replaces_a_link_at_a_kernels_name(tmp_path, monkeypatch):
    """The dump wrote through a link another user left at a (predictable) kernel name in a
    shared directory, into its target (found 2026-11-25)."""
    dump, victim = tmp_path / "dump", tmp_path / "victim.txt"
    dump.mkdir()
    victim.write_text("precious")
    q = torch.randn(1, 1, 3, 8)
    (info,) = kernels.kernels_for("recurrent", q, q, q, q[0, :, 0, 0])[:1]
    (dump / f"{info.module}.py").symlink_to(victim)
    monkeypatch.setenv("RTP_DUMP_KERNELS", str(dump))
    monkeypatch.setattr(codegen, "_LOADED", {})
    kernels.triton_forward("recurrent", q, q, q, torch.tensor([0.9]), 1.0, None, 16)
    assert victim.read_text() == "precious"
    written = dump / f"{info.module}.py"
    assert not written.is_symlink() and written.read_text().startswith('"""Generated by rtpcompile')


def test_kernels_for_lists_forward_and_backward():
    q = torch.empty(2, 4, 300, 64, dtype=torch.bfloat16, device="meta")
    v = torch.empty(2, 4, 300, 96, dtype=torch.bfloat16, device="meta")
    s0 = torch.empty(2, 4, 64, 96, device="meta")
    g = torch.empty(4, device="meta")
    fwd = kernels.kernels_for("parallel", q, q, v, g, s0)
    assert [i.spec.form for i in fwd] == ["parallel", "chunkwise"]  # o, then the final state
    both = kernels.kernels_for("chunkwise", q, q, v, g, s0, backward=True, final_state_grad=True)
    dirs = [(i.spec.direction, i.spec.K, i.spec.V) for i in both]
    assert dirs[:4] == [("fwd", 64, 96), ("fwd", 96, 64), ("bwd", 96, 64), ("bwd", 64, 96)]
    assert all(i.module.startswith("rtp_") and len(i.digest) == 64 for i in both)
    assert "chunkwise/bwd" in str(both[2])


@pytest.mark.parametrize("form", FORMS)
def test_no_state_out_launches_no_state_work(form, monkeypatch):
    """``state_out=False`` (an op call with ``output_final_state=False``): the same o, no
    state; the parallel form drops its state-only chunkwise pass, the others their store."""
    launched = []
    real = launch._launch
    monkeypatch.setattr(launch, "_launch", lambda spec, *a: launched.append(spec) or real(spec, *a))
    T = 5 if form == "recurrent" else 37
    (q, k, v, gamma, s0), (lq, lk, lv, lg, ls0) = make(1, 2, T, 24, 16, torch.float32, state=True)
    ro, _ = ref.reference_parallel(q, k, v, gamma, 0.5, s0)
    o, sf = kernels.triton_forward(form, lq, lk, lv, lg, 0.5, ls0, 16, state_out=False)
    assert sf is None
    close(o, ro, torch.float32, "o")
    assert [(x.form, x.state_out) for x in launched] == [(form, False)]
    meta = [torch.empty_like(x, device="meta") for x in (lq, lk, lv, lg, ls0)]
    with_state = kernels.kernels_for(form, *meta)
    without = kernels.kernels_for(form, *meta, state_out=False)
    assert len(with_state) == (2 if form == "parallel" else 1) and len(without) == 1
    with pytest.raises(ValueError, match="final_state_grad needs state_out"):
        kernels.kernels_for(form, *meta, backward=True, final_state_grad=True, state_out=False)


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import rtpcompile.kernels as k\n"
        "assert k.available() is False\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- GPU: compiled kernels, bfloat16 and large shapes --------------------------------------

GPU_CASES = [
    ("chunkwise", 2, 4, 2048, 128, 128, 64),
    ("chunkwise", 1, 2, 1000, 256, 256, 64),
    ("chunkwise", 2, 3, 333, 48, 80, 64),
    ("parallel", 2, 4, 1024, 128, 128, 64),
    ("parallel", 1, 2, 257, 256, 100, 64),
    ("recurrent", 4, 8, 1, 128, 128, 64),
    ("recurrent", 2, 3, 16, 256, 80, 64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("state", [False, True], ids=["no-state", "state+dsf"])
def test_gpu_forms(case, dtype, state):
    form, B, H, T, K, V, chunk = case
    check(form, B, H, T, K, V, dtype, state, state, btHd=True, chunk=chunk, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("form", FORMS)
def test_gpu_float16(form):
    T = 16 if form == "recurrent" else 300
    check(form, 2, 3, T, 64, 96, torch.float16, True, True, btHd=True, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("form,T", [("recurrent", 1), ("chunkwise", 20), ("parallel", 20)])
def test_gpu_more_than_65535_batch_heads(form, T):
    """B*H = 69632: more programs than the batch*head grid axis takes (65535); the launcher
    runs the batch in slices, so a large decode batch needs no splitting by the caller."""
    check(form, 4352, 16, T, 16, 16, torch.float16, True, True, device="cuda")


def test_backward_launches_three_passes_and_one_small_op(monkeypatch):
    """What a backward without states launches on a GPU: the three passes and, for d gamma, the
    sum of the dq pass's partial sums (no [B, H, T] row-dot buffers, no zeros for an absent
    initial state's gradient). Launches are mocked; torch ops are seen by a dispatch mode.
    With both states: gamma clamped, d gamma's final-state term (one [K, V] product per head,
    ``backward._final_state_dgamma``) and ds0 (one product)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.overloadpacket.__name__ not in ("empty", "empty_like"):
                self.seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    launched = []
    monkeypatch.setattr(launch, "_launch", lambda spec, *a, **kw: launched.append(spec.form))
    _, (q, k, v, g, _) = make(2, 3, 40, 16, 24, torch.float32)
    sf = torch.zeros(2, 3, 16, 24)
    do = torch.ones_like(v)
    for form in FORMS:
        launched.clear()
        with Ops() as ops:
            ops.seen = []
            out = kernels.triton_backward(form, do, None, q, k, v, g, 0.3, None, sf, 16)
        assert launched == [form] * 3 and ops.seen == ["sum"], (
            launched,
            ops.seen,
        )
        assert out[3].shape == (3,) and out[4] is None
    # with an initial state and a final-state gradient, still three passes: the dv pass's own
    # final state gives ds0 (no fourth, state-only pass)
    s0 = torch.randn(2, 3, 16, 24)
    for form in ("chunkwise", "recurrent"):
        launched.clear()
        dsf = torch.ones_like(s0)
        with Ops() as ops:
            ops.seen = []
            kernels.triton_backward(form, do, dsf, q, k, v, g, 0.3, s0, sf, 16)
        assert launched == [form] * 3, launched
        assert ops.seen == ["clamp", "sum", "arange", "sub", "clamp", "pow", "mul", "mul", "bmm",
                            "_unsafe_view", "mul", "sum", "pow", "mul", "mul", "sum", "mul", "add_",
                            "add_", "mul", "mul"], (form, ops.seen)  # fmt: skip


@pytest.mark.parametrize(
    "form,cfg",
    [("chunkwise", {"split": 0}), ("chunkwise", {"split": 1}), ("parallel", None)]
    + [("recurrent", None)],
    ids=["fused", "split", "parallel", "recurrent"],
)
def test_empty_sequence_backward_is_zero(form, cfg):
    """T = 0 launches nothing for the gradient passes: d gamma is exactly 0 (its partial sums
    are zeros, not uninitialised memory), dq, dk, dv are empty, ds0 is dsf (sf is s0)."""
    _, (q, k, v, g, s0) = make(2, 3, 0, 12, 20, torch.float32, state=True)
    o, sf = kernels.triton_forward(form, q, k, v, g, 0.3, s0, 16, cfg)
    torch.testing.assert_close(sf, s0)
    dsf = torch.randn_like(sf)
    dq, dk, dv, dg, ds0 = kernels.triton_backward(form, o, dsf, q, k, v, g, 0.3, s0, sf, 16, cfg)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    torch.testing.assert_close(ds0, dsf)
    # no step decays anything: the final state is s0 itself, so d gamma is exactly 0
    assert torch.equal(dg, torch.zeros(3))
    no_state = kernels.triton_backward(form, o, None, q, k, v, g, 0.3, None, sf, 16, cfg)
    assert torch.equal(no_state[3], torch.zeros(3))


@pytest.mark.gpu
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("K", [48, 256])
def test_gpu_float64(form, K):
    """float64 kernels take ``scale`` as a double (``scale: tl.float64``): with the float32
    argument Triton gives a Python float, every result was off by ~1e-8 relative, 100x this
    test's 1e-10. At K = 256 the parallel kernel's defaults fit an sm_90 block; smaller GPUs
    retry with the smallest config (``tests/test_kernels_aot.py``)."""
    T = 5 if form == "recurrent" else 65
    check(form, 1, 2, T, K, 80, torch.float64, True, True, btHd=True, chunk=32, device="cuda")
