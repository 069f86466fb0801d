"""The checks of the public ops and of the rtp op itself: raw calls, compiled calls, odd inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as forward_ad

from rtpcompile import ops
from rtpcompile.lowering import reference as ref
from rtpcompile.lowering import validate

FORMS = ("parallel", "chunkwise", "recurrent")


def inputs(B=1, H=2, T=6, K=4, V=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, T, d, generator=g, dtype=dtype) for d in (K, K, V)]


@pytest.mark.parametrize("bad", [-1e-3, -0.5, 1.5, float("nan")])
def test_compiled_calls_check_gamma_values(bad):
    """The op checks gamma on the real tensor at run time, so a compiled call (which skips the
    public op's checks while tracing) refuses a bad gamma as eager does."""
    q, k, v = inputs()

    def f(q, k, v, gamma):
        return ops.retention(q, k, v, gamma)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    gamma = torch.full((2,), bad)
    for fn in (f, compiled):
        with pytest.raises(ValueError, match=r"gamma values must lie in \[0, 1\]"):
            fn(q, k, v, gamma)
    torch.testing.assert_close(compiled(q, k, v, gamma.fill_(0.9)), f(q, k, v, gamma))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(form="bogus"), "form must be one of"),
        (dict(chunk_size=-3), "chunk_size must be >= 0"),
        (dict(gamma=torch.full((1, 2, 1, 1), 0.9)), r"gamma must have shape \[2\]"),
        (dict(gamma=torch.full((3,), 0.9)), r"gamma must have shape \[2\]"),
        (dict(scale=float("inf")), "scale must be finite"),
        (dict(gamma=torch.tensor([0.9, 1.5])), r"gamma values must lie in \[0, 1\]"),
        (dict(k=torch.randn(1, 2, 1, 4)), r"must agree in \[B, H, T\]"),
        (dict(k=torch.randn(1, 2, 6, 5)), "the same head dim K"),
        (dict(v=torch.randn(1, 2, 6)), "must have 4 dims"),
        (dict(state=torch.zeros(1, 2, 3, 4)), r"initial_state must have shape \[B, H, K, V\]"),
    ],
)
def test_the_raw_op_checks_what_its_schema_cannot(change, message):
    """Public-op messages for a raw (or compiled) call, not an IndexError from inside a form."""
    q, k, v = inputs()
    args = dict(gamma=torch.full((2,), 0.9), scale=0.5, form="chunkwise", chunk_size=4)
    args.update(change)
    k, v = args.get("k", k), args.get("v", v)

    def call(q, k, v):
        a = args
        return torch.ops.rtp.retention_fwd(
            q, k, v, a["gamma"], a["scale"], a.get("state"), a["form"], a["chunk_size"]
        )

    with pytest.raises(ValueError, match=message):
        call(q, k, v)
    if "values" not in message:  # the structure is checked on fake tensors too (compile time)
        with pytest.raises(Exception, match=message):
            torch.compile(call, backend="aot_eager", fullgraph=True)(q, k, v)


@pytest.mark.parametrize("form", ("auto", *FORMS))
@pytest.mark.parametrize(("B", "H", "T"), [(0, 2, 300), (1, 0, 9), (0, 2, 0)])
def test_empty_batch_or_heads(form, B, H, T):
    """B = 0 or H = 0: empty outputs, states and gradients of the right shapes, every form."""
    q, k, v = (x.requires_grad_() for x in inputs(B, H, T, 5, 3))
    s0 = torch.zeros(B, H, 5, 3, requires_grad=True)
    o, s = ops.retention(
        q, k, v, torch.full((H,), 0.9), form=form, initial_state=s0, output_final_state=True
    )
    assert o.shape == (B, H, T, 3) and s.shape == (B, H, 5, 3)
    (o.sum() + s.sum()).backward()
    assert q.grad.shape == q.shape and s0.grad.shape == s0.shape


def test_zero_head_dims_are_refused():
    q, k, v = inputs(K=0)
    with pytest.raises(ValueError, match="head dims K and V must be >= 1; got K=0, V=3"):
        ops.retention(q, k, v, 0.9)


@pytest.mark.parametrize("use", ["func.jvp", "forward_ad"])
def test_forward_mode_ad_is_refused_not_zero(use):
    """Torch's custom ops have no forward-mode formula and would give a zero tangent."""
    q, k, v = inputs()
    gamma = torch.full((2,), 0.9)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        if use == "func.jvp":
            torch.func.jvp(lambda q: ops.retention(q, k, v, gamma), (q,), (torch.ones_like(q),))
        else:
            with forward_ad.dual_level():
                ops.retention(forward_ad.make_dual(q, torch.ones_like(q)), k, v, gamma)


def test_vmap_over_gamma_runs_per_sample():
    """vmap goes through torch's per-sample fallback; the value check sees real tensors."""
    q, k, v = inputs()
    gammas = torch.tensor([[0.9, 0.5], [0.3, 1.0]])
    got = torch.vmap(lambda g: ops.retention(q, k, v, g))(gammas)
    for i in range(2):
        torch.testing.assert_close(got[i], ops.retention(q, k, v, gammas[i]))


def test_number_gammas_and_scales():
    q, k, v = inputs(dtype=torch.float64)
    # a Python number becomes a decay in q's accumulation dtype: float64 here, exact
    o = ops.retention(q, k, v, 0.9, scale=0.5)
    expect = ref.reference_parallel(q, k, v, torch.full((2,), 0.9, dtype=torch.float64), 0.5)[0]
    torch.testing.assert_close(o, expect, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ops.retention(q, k, v, np.float32(0.5)), ops.retention(q, k, v, 0.5))
    assert ops.retention_init_decay(np.int64(3)).shape == (3,)
    assert ops.retention_init_state(np.int64(1), 2, 3, 4).shape == (1, 2, 3, 4)
    with pytest.raises(ValueError, match="gamma must be a number in"):
        ops.retention(q, k, v, True)
    for bad, message in (
        (float("nan"), "scale must be a finite number"),
        (torch.tensor(0.5, requires_grad=True), "a learnable scale is not supported"),
        ("0.5", "scale must be a finite number or None, got '0.5'"),
    ):
        with pytest.raises(ValueError, match=message):
            ops.retention(q, k, v, 0.9, scale=bad)
    assert validate.check_scale(torch.tensor(0.25), 4) == 0.25


def test_kernel_limits_decide_the_implementation():
    """kernels="auto" sends what the Triton kernels cannot run to aten."""
    from rtpcompile import kernels
    from rtpcompile.lowering import dispatch

    q = torch.empty(1, 1, 1, 256, device="meta")
    for V, scale, fits in ((256, 1.0, True), (257, 1.0, False), (8, 0.0, False)):
        v = torch.empty(1, 1, 1, V, device="meta")
        assert dispatch._fits(kernels, q, v, scale) is fits
    assert not dispatch._fits(None, q, q, 1.0)


def test_forced_kernels_name_the_users_dims(monkeypatch):
    """kernels="triton" on a shape the kernels cannot run: the error names K and V as the user
    passed them, before anything runs (the backward's passes swap them)."""
    from rtpcompile.lowering import dispatch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RTP_KERNELS", "triton")
    dispatch._kernels_package.cache_clear()
    q, k, v = inputs(K=8, V=257)
    with pytest.raises(ValueError, match="support head dims K, V <= 256, got K=8, V=257"):
        ops.retention(q, k, v, 0.9)
    q, k, v = inputs()
    with pytest.raises(ValueError, match="need a nonzero scale"):
        ops.retention(q, k, v, 0.9, scale=0.0)


def test_a_cpu_call_on_auto_does_not_ask_for_the_kernels(monkeypatch):
    """The kernels' import answer is cached and depends on TRITON_INTERPRET on CPU: an aten call
    must not fix it before a later call forces the kernels."""
    from rtpcompile.lowering import dispatch

    asked = []
    monkeypatch.setattr(dispatch, "_triton_module", lambda: asked.append(1))
    monkeypatch.delenv("RTP_KERNELS", raising=False)
    q, k, v = inputs()
    assert not dispatch.use_triton(q, v, 0.5) and asked == []


def test_forced_kernels_that_cannot_run_raise_instead_of_running_aten(monkeypatch):
    """kernels="triton" on CPU without TRITON_INTERPRET (the kernels unavailable) is an error
    that says what to set; before, the call ran aten silently (a CI job would believe it had
    tested the kernels)."""
    from rtpcompile.lowering import dispatch

    monkeypatch.setattr(dispatch, "_triton_module", lambda: None)
    monkeypatch.setenv("RTP_KERNELS", "triton")
    q, k, v = inputs()
    with pytest.raises(RuntimeError, match="forces the Triton kernels.*TRITON_INTERPRET=1"):
        ops.retention(q, k, v, 0.9)
    monkeypatch.setenv("RTP_KERNELS", "auto")
    ops.retention(q, k, v, 0.9)  # auto: aten, no error


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the kernels can run")
def test_setting_the_interpreter_after_a_forced_call_failed(monkeypatch):
    """The first forced call on CPU without TRITON_INTERPRET says to set it; once set, the next
    call runs the kernels (the first call's answer was cached and the same error kept coming)."""
    pytest.importorskip("triton", reason="the Triton kernels need triton")
    from rtpcompile.lowering import dispatch

    monkeypatch.setenv("RTP_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dispatch._kernels_package.cache_clear()
    q, k, v = inputs()
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1"):
        ops.retention(q, k, v, 0.9)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.use_triton(q, v, 0.5)
    torch.testing.assert_close(
        ops.retention(q, k, v, 0.9), ops.retention(q, k, v, 0.9, form="parallel")
    )


def test_a_broken_triton_is_named_as_such(monkeypatch):
    """Triton installed but not importable: the forced call's error says so (it told the user to
    set TRITON_INTERPRET, already set)."""
    pytest.importorskip("triton", reason="the Triton kernels need triton")
    from rtpcompile import kernels
    from rtpcompile.lowering import dispatch

    monkeypatch.setenv("RTP_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "_triton_importable", lambda: False)
    q, k, v = inputs()
    with pytest.raises(RuntimeError, match="installed but could not be imported"):
        ops.retention(q, k, v, 0.9)
    assert dispatch._triton_module() is None


def test_explain_reports_when_forced_kernels_cannot_run(monkeypatch):
    """explain() is a diagnostic: with RTP_KERNELS=triton on CPU and no interpreter it reports
    (the compiled call raises the clear error), where it raised that error itself."""
    pytest.importorskip("triton", reason="the Triton kernels need triton")
    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine the kernels can run")
    import rtpcompile

    monkeypatch.setenv("RTP_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def f(q, k, v):
        t = q.shape[2]
        i = torch.arange(t)
        d = i[:, None] - i[None, :]
        return (q @ k.mT * torch.where(d >= 0, 0.9 ** d.clamp(min=0), 0.0)) @ v

    report = rtpcompile.explain(f, *inputs())
    assert len(report.claimed) == 1
