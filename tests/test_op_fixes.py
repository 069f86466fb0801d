"""Regression tests for fixes to the rtp op, its planner, the autotuner and the kernel cache."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as forward_ad

from rtpcompile import ops, options
from rtpcompile.kernels import cache, codegen
from rtpcompile.lowering import plan, tune


def _inputs(B=1, H=2, T=7, K=3, V=5, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, K, generator=gen, dtype=dtype) for _ in range(2))
    v = torch.randn(B, H, T, V, generator=gen, dtype=dtype)
    gamma = torch.tensor([0.9, 0.5], dtype=dtype)[:H]
    s0 = torch.randn(B, H, K, V, generator=gen, dtype=dtype)
    return q, k, v, gamma, s0


def _raw(q, k, v, gamma, s0, form="chunkwise"):
    return torch.ops.rtp.retention_fwd(q, k, v, gamma, 0.5, s0, form, 0, True)


# ----------------------------------------------------------------- forward-mode AD, raw op


@pytest.mark.parametrize("use", ["func.jvp", "forward_ad"])
@pytest.mark.parametrize("name", ["q", "k", "v", "gamma", "s0"])
def test_raw_op_refuses_a_tangent_on_any_input(use, name):
    """The raw op gave a silent zero tangent (the public ops refused); now it refuses too."""
    args = dict(zip(("q", "k", "v", "gamma", "s0"), _inputs(), strict=True))
    primal = args[name]

    def f(x):
        return _raw(**(args | {name: x}))[0]

    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        if use == "func.jvp":
            torch.func.jvp(f, (primal,), (torch.ones_like(primal),))
        else:
            with forward_ad.dual_level():
                f(forward_ad.make_dual(primal, torch.ones_like(primal)))


def test_raw_op_inside_a_dual_level_without_tangents_runs():
    """Only a tangent on the op's own inputs is refused, not an active dual level."""
    q, k, v, gamma, s0 = _inputs()
    expected = _raw(q, k, v, gamma, s0)
    x = torch.randn(3, dtype=torch.float64)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, torch.ones_like(x))
        got = _raw(q, k, v, gamma, s0)
        assert forward_ad.unpack_dual(dual * 2).tangent is not None
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # NOTE: the reverse mode through the raw op is untouched
    q.requires_grad_()
    (o, sf) = _raw(q, k, v, gamma, s0)
    (dq,) = torch.autograd.grad((o.sum() + sf.sum()), q)
    assert torch.isfinite(dq).all() and dq.abs().sum() > 0


# ----------------------------------------------------------------- empty calls, autotuning


def test_next_pow2_of_zero_is_not_a_real_bucket():
    assert [plan.next_pow2(n) for n in (0, 1, 2, 3, 4, 5, 2048)] == [1, 1, 2, 4, 4, 8, 2048]


@pytest.fixture
def tuning(tmp_path, monkeypatch):
    monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("RTP_AUTOTUNE", "1")
    monkeypatch.delenv("RTP_CACHE", raising=False)
    monkeypatch.delenv("RTP_KERNELS", raising=False)
    plan.reset()
    yield
    plan.reset()


@pytest.mark.parametrize("shape", [(0, 1, 2048), (1, 2, 0), (1, 0, 64)], ids=["B0", "T0", "H0"])
def test_empty_calls_are_neither_tuned_nor_cached(tuning, shape):
    """A B=0 call ran every benchmark (noise: nothing runs) and stored the winner under the
    bucket BH=2, which a real B=1, H=2 call then read back."""
    B, H, T = shape
    q = torch.randn(B, H, T, 8)
    gamma = torch.full((H,), 0.99)
    for form in ("auto", "chunkwise"):
        o, s = ops.retention(q, q, q, gamma, form=form, output_final_state=True)
        assert o.shape == q.shape and s.shape == (B, H, 8, 8)
        q.requires_grad_()
        o = ops.retention(q, q, q, gamma, form=form)
        (o.sum() * 0).backward()  # NOTE: the backward plans its own pass
        q = q.detach()
    assert plan.counters["benchmarks"] == 0 and plan.counters["tunings"] == 0
    assert cache.entries() == [] and plan._memo == {}


def test_empty_problem_plans_by_rule_and_autotune_refuses_it(tuning):
    empty = plan.Problem(0, 2, 2048, 64, 64, "float32", "cpu", "aten", False)
    chosen = plan.plan_for(empty, tune=True, force=True)
    assert (chosen.form, chosen.source) == ("parallel", "rule")
    forced = plan.Problem(1, 2, 0, 64, 64, "float32", "cpu", "aten", False, request="chunkwise")
    assert plan.plan_for(forced, tune=True).form == "chunkwise"
    assert tune.autotune(empty, plan.cache_key(empty)) is None
    assert plan.counters["benchmarks"] == 0 and cache.entries() == []


# ----------------------------------------------------------------- RTP_DUMP_KERNELS


def test_dump_kernels_naming_a_file_is_a_value_error(tmp_path, monkeypatch):
    """/dev/null gave a bare FileExistsError on every Triton call; now the variable is named,
    up front, like any bad RTP_* value (on every backend)."""
    for target in (tmp_path / "file", "/dev/null"):
        (tmp_path / "file").write_text("x")
        monkeypatch.setenv("RTP_DUMP_KERNELS", str(target))
        with pytest.raises(ValueError, match="RTP_DUMP_KERNELS must name a directory"):
            options.current()
        q = torch.randn(1, 2, 4, 3)
        with pytest.raises(ValueError, match="RTP_DUMP_KERNELS"):
            ops.retention(q, q, q, 0.9)
    monkeypatch.setenv("RTP_DUMP_KERNELS", str(tmp_path / "new" / "dir"))
    options.current()  # NOTE: a missing directory is fine: it is created on the first dump


def test_dump_into_an_unusable_directory_warns_once_and_the_kernels_run(
    triton_on_cpu, tmp_path, monkeypatch
):
    (tmp_path / "file").write_text("x")
    target = str(tmp_path / "file" / "sub")  # NOTE: under a file: mkdir fails, stat says nothing
    monkeypatch.setenv("RTP_DUMP_KERNELS", target)
    monkeypatch.setattr(codegen, "_LOADED", {})  # NOTE: every module loads (and dumps) again
    monkeypatch.setattr(codegen, "_DUMP_WARNED", set())
    q, k, v, gamma, _ = _inputs(T=5, K=4, V=4, dtype=torch.float32)
    with pytest.warns(
        RuntimeWarning, match="cannot dump generated kernels into RTP_DUMP_KERNELS"
    ) as caught:
        o = ops.retention(q, k, v, gamma, form="parallel")
    # NOTE: the warning points at the line above (a fixed stacklevel pointed into rtpcompile)
    assert {w.filename for w in caught} == {__file__}
    ref = ops.retention(q.double(), k.double(), v.double(), gamma.double(), form="parallel")
    torch.testing.assert_close(o.double(), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(codegen, "_LOADED", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NOTE: once per value
        ops.retention(q, k, v, gamma, form="parallel")


# ----------------------------------------------------------------- chunk size bounds


def test_chunk_size_beyond_int64_is_the_documented_value_error():
    q, k, v, gamma, _ = _inputs(T=20)
    for bad in (2**63, 10**21):
        with pytest.raises(
            ValueError, match=r"positive int or None \(an int at most 2\*\*63 - 1\)"
        ):
            ops.retention_chunkwise(q, k, v, gamma, chunk_size=bad)
    o, _ = ops.retention_chunkwise(q, k, v, gamma, chunk_size=2**63 - 1)
    torch.testing.assert_close(o, ops.retention(q, k, v, gamma, form="parallel"))


@pytest.mark.parametrize("bad", ["１６", "²", "16.0", str(2**63), "-3", "0"])
def test_rtp_chunk_size_takes_ascii_digits_up_to_int64_only(bad):
    with pytest.raises(ValueError, match="RTP_CHUNK_SIZE: option 'chunk_size' must be"):
        options.from_env({"RTP_CHUNK_SIZE": bad})
    with pytest.raises(ValueError, match="option 'chunk_size' must be"):
        options.resolve({"chunk_size": bad})


def test_text_options_are_read_without_surrounding_blanks_alike():
    """' 16' was a chunk size while ' parallel' was refused as a form."""
    env = {
        "RTP_CHUNK_SIZE": " 16 ",
        "RTP_FORM": " Parallel\t",
        "RTP_KERNELS": "aten ",
        "RTP_AUTOTUNE": " 1",
        "RTP_LOG": " off",
    }
    found = options.from_env(env)
    assert found == {
        "chunk_size": 16,
        "form": "parallel",
        "kernels": "aten",
        "autotune": True,
        "log": "off",
    }
    assert options.resolve({"chunk_size": str(2**63 - 1)}).chunk_size == 2**63 - 1


# ----------------------------------------------------------------- retention_init_decay


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64])
def test_init_decay_refuses_dtypes_that_lose_the_decay(dtype):
    """bfloat16 rounded heads 4.. to gamma = 1.0 (no decay), float16 heads 7..."""
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.float64"):
        ops.retention_init_decay(16, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_init_decay_keeps_every_head_decaying(dtype):
    gamma = ops.retention_init_decay(16, dtype=dtype)
    assert gamma.dtype == dtype and bool((gamma < 1).all())
    exact = 1 - 2.0 ** (-5 - torch.arange(16, dtype=torch.float64))
    torch.testing.assert_close(gamma.double(), exact, rtol=0, atol=1e-7)


# ----------------------------------------------------------------- backward: only what is needed

_NAMES = ("q", "k", "v", "gamma", "s0")
_SUBSETS = [
    tuple(n for i, n in enumerate(_NAMES) if mask >> i & 1) for mask in range(1, 2 ** len(_NAMES))
]


def _call(args, form):
    q, k, v, gamma, s0 = (args[n] for n in _NAMES)
    o, sf = ops.retention(
        q, k, v, gamma, form=form, initial_state=s0, output_final_state=True, chunk_size=2
    )
    return o, sf


@pytest.mark.parametrize("subset", _SUBSETS, ids="+".join)
def test_every_requires_grad_subset_passes_gradcheck_on_aten(subset):
    """The backward skips the passes only unwanted gradients need: float64 gradcheck of the
    output and the final state w.r.t. each subset (the others are constants)."""
    args = dict(zip(_NAMES, _inputs(T=5, K=3, V=4), strict=True))
    args["gamma"] = torch.tensor([0.8, 0.6], dtype=torch.float64)
    for form in ("chunkwise", "parallel"):

        def f(*xs, form=form):
            return _call(args | dict(zip(subset, xs, strict=True)), form)

        xs = tuple(args[n].clone().requires_grad_() for n in subset)
        assert torch.autograd.gradcheck(f, xs, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize(
    "subset, passes",
    [
        (("v",), 1),
        (("q",), 1),
        (("k",), 1),
        (("s0",), 0),
        # NOTE: d gamma (with dq) comes from dgamma.dgamma_chunked, which runs no forward
        (("gamma",), 0),
        (("q", "gamma"), 0),
        (("q", "s0"), 1),
        (("k", "v"), 2),
        (_NAMES, 2),
    ],  # fmt: skip
    ids=lambda x: "+".join(x) if isinstance(x, tuple) else str(x),
)
def test_aten_backward_runs_only_the_passes_needed(subset, passes, monkeypatch):
    from rtpcompile.lowering import aten_impl

    args = dict(zip(_NAMES, _inputs(T=9), strict=True))
    for n in subset:
        args[n] = args[n].clone().requires_grad_()
    o, sf = _call(args, "chunkwise")
    calls = []
    real = aten_impl.forward
    monkeypatch.setattr(aten_impl, "forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    grads = torch.autograd.grad((o.sum() + sf.sum()), [args[n] for n in subset])
    assert len(calls) == passes
    assert all(
        g is not None and g.shape == args[n].shape for g, n in zip(grads, subset, strict=True)
    )


def _grads(args, subset, form):
    xs = {n: args[n].clone().requires_grad_(n in subset) for n in _NAMES}
    o, sf = _call(xs, form)
    gen = torch.Generator().manual_seed(1)
    do, dsf = torch.randn(o.shape, generator=gen), torch.randn(sf.shape, generator=gen)
    loss = (o * do.to(o.dtype)).sum() + (sf * dsf.to(sf.dtype)).sum()
    return torch.autograd.grad(loss, [xs[n] for n in subset])


@pytest.mark.parametrize(
    "subset", [("v",), ("q",), ("gamma",), ("s0",), ("k", "s0"), ("gamma", "v"), _NAMES],
    ids="+".join,
)  # fmt: skip
def test_triton_backward_of_a_subset_matches_the_float64_reference(triton_on_cpu, subset):
    """The kernels' backward with a mask: the gradients asked for match float64 aten, and the
    passes not needed are not launched (one pass for v alone)."""
    from rtpcompile.kernels import launch

    args = dict(zip(_NAMES, _inputs(T=11, K=4, V=8, dtype=torch.float32), strict=True))
    ref_args = {n: t.double() for n, t in args.items()}
    for form in ("chunkwise", "parallel"):
        got = _grads(args, subset, form)
        with options.scoped("kernels=aten"):
            want = _grads(ref_args, subset, form)
        for n, g, w in zip(subset, got, want, strict=True):
            torch.testing.assert_close(g.double(), w, rtol=2e-4, atol=2e-4, msg=f"{form} d{n}")
    if subset == ("v",):
        xs = {n: args[n].clone().requires_grad_(n == "v") for n in _NAMES}
        o, sf = _call(xs, "parallel")
        runs = []
        real = launch.run
        from rtpcompile.kernels import backward as kernel_backward

        def counting(*a, **kw):
            runs.append(1)
            return real(*a, **kw)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kernel_backward, "run", counting)
            torch.autograd.grad(o.sum() + sf.sum(), xs["v"])
        assert len(runs) == 1


class _FrozenDecay(torch.nn.Module):
    def __init__(self, D=8, H=2):
        super().__init__()
        self.H = H
        self.proj = torch.nn.Linear(D, 3 * D, dtype=torch.float64)
        self.register_buffer("gamma", torch.tensor([0.9, 0.6], dtype=torch.float64))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.proj(x).view(B, T, 3, self.H, D // self.H).permute(2, 0, 3, 1, 4)
        return ops.retention(q, k, v, self.gamma, form="chunkwise", chunk_size=4)


@pytest.mark.parametrize("backend", ["aot_eager", "rtp"])
def test_compiled_model_with_a_frozen_decay_skips_its_gradient(backend, monkeypatch):
    from rtpcompile.lowering import dispatch

    torch.manual_seed(0)
    model = _FrozenDecay()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    seen = []
    real = dispatch.backward
    monkeypatch.setattr(
        dispatch, "backward", lambda *a, **kw: seen.append(kw.get("needs")) or real(*a, **kw)
    )
    model(x).square().sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        compiled(x).square().sum().backward()
    finally:
        torch._dynamo.reset()
    for p, w in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, w)
    # NOTE: eager and compiled backward both skipped d gamma (and the absent state's)
    assert seen and all(n == (True, True, True, False, False) for n in seen), seen


@pytest.mark.parametrize("T", [0, 6])
@pytest.mark.parametrize("kernels", ["aten", "triton"])
def test_backward_op_with_an_output_mask_matches_its_fake_and_the_full_backward(
    T, kernels, triton_on_cpu
):
    """opcheck of ``retention_bwd`` with a mask (the fake's empty outputs agree); the wanted
    gradients equal those of the unmasked call, T = 0 (the state passes through) included."""
    q, k, v, gamma, s0 = _inputs(T=T, K=4, V=8, dtype=torch.float32)
    with options.scoped(f"kernels={kernels}"):
        o, sf = torch.ops.rtp.retention_fwd(q, k, v, gamma, 0.5, s0, "chunkwise", 4)
        do, dsf = torch.randn_like(o), torch.randn_like(sf)
        args = (do, dsf, q, k, v, gamma, 0.5, s0, sf, "chunkwise", 4, f"kernels={kernels}")
        full = torch.ops.rtp.retention_bwd(*args)
        masks = ("00100", "00001", "10010", "01011")
        for mask in ([c == "1" for c in text] for text in masks):
            torch.library.opcheck(torch.ops.rtp.retention_bwd, (*args, mask))
            got = torch.ops.rtp.retention_bwd(*args, mask)
            for want, g, f in zip(mask, got, full, strict=True):
                if want:
                    torch.testing.assert_close(g, f, rtol=1e-5, atol=1e-5)
                else:
                    assert g.shape == (0,)
    with pytest.raises(ValueError, match="output_mask must have 5 entries"):
        torch.ops.rtp.retention_bwd(*args, [True])


# ----------------------------------------------------------------- autocast, the saved state


@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent"])
def test_eager_autocast_keeps_the_float32_state_and_gradients(form):
    """Under an eager ``torch.autocast`` the op's aten products ran in bfloat16 (state error
    3e-3 against 4e-7, gradients 1e-3 to 7e-3) until 2026-11-25: the implementations now run
    with autocast off, so the result is the one computed outside it, forward and backward."""
    B, H, T, K, V = 1, 2, 96, 8, 6
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, d, generator=gen).bfloat16() for d in (K, K, V))
    gamma = torch.tensor([0.99, 0.9])
    s0 = torch.randn(B, H, K, V, generator=gen)

    def run():
        leaves = [t.detach().requires_grad_() for t in (q, k, v, gamma, s0)]
        o, s = ops.retention(*leaves[:4], form=form, initial_state=leaves[4],
                             output_final_state=True)  # fmt: skip
        (o.float().square().sum() + s.sum()).backward()
        return [o, s] + [t.grad for t in leaves]

    plain = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = run()
    for a, b in zip(cast, plain, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bypass", [True, False])
def test_writing_into_the_returned_state_leaves_the_backward_intact(bypass, monkeypatch):
    """The final state was saved for the backward (which reads only its dtype): writing into
    the returned state (a decode loop's buffer) failed the backward's version check."""
    monkeypatch.setenv("RTP_EAGER_BYPASS", "1" if bypass else "0")
    q, k, v, gamma, s0 = (t.requires_grad_() for t in _inputs())
    o, state = ops.retention(q, k, v, gamma, initial_state=s0, output_final_state=True)
    expected = torch.autograd.grad(o.sum(), (q, k, v, gamma, s0), retain_graph=True)
    state.zero_()
    got = torch.autograd.grad(o.sum(), (q, k, v, gamma, s0))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_parallel_memory_estimate_counts_float64_at_eight_bytes():
    """The aten parallel form's T x T temporaries are float64 for float64 inputs: counted at 4
    bytes until 2026-11-25, so a float64 plan could take twice the memory budget."""
    wide, narrow = (plan.Problem(2, 4, 1024, 8, 8, d, "cpu", "aten", False)
                    for d in ("float64", "float32"))  # fmt: skip
    assert tune._parallel_bytes(wide) == 2 * tune._parallel_bytes(narrow)
    assert tune._parallel_bytes(wide) == 8 * 1024 * 1024 * (3 * 2 * 4 + 2 * 4)


# ----------------------------------------------------------------- scales the kernels take


def test_kernels_take_only_a_float32_scale_with_a_finite_inverse_unless_float64(triton_on_cpu):
    """The kernels' scale is a float32 argument (float64 kernels: a double): a float16 call at
    scale 1e-39 returned an inf final state (the state, held times scale, is divided through
    1 / scale) and one below 2**-149 reached the kernels as 0. Forced, such a call is now the
    ValueError scale 0 gets; on "auto" it runs on aten."""
    from rtpcompile import kernels
    from rtpcompile.lowering import dispatch

    q, k, v, gamma, s0 = (t.half() if t.dim() == 4 else t.float() for t in _inputs(K=4, V=4))
    for scale in (1e-39, -1e-39, 1e-46, 1e39, 1e36, 2.0**17):
        with pytest.raises(ValueError, match=r"\[2\*\*-127, 3.4e38\]"):
            ops.retention(q, k, v, gamma, initial_state=s0.float(), scale=scale)
    least = kernels.MIN_SCALE
    o, sf = ops.retention(q, k, v, gamma, initial_state=s0.float(), scale=least,
                          output_final_state=True)  # fmt: skip
    ref = ops.retention(*(t.double() for t in (q, k, v, gamma)), initial_state=s0.double(),
                        scale=least, output_final_state=True)  # fmt: skip
    assert torch.isfinite(sf).all()
    torch.testing.assert_close(sf.double(), ref[1], rtol=1e-3, atol=1e-3)
    for dtype, scale, fits in [
        (torch.float16, 1e-39, False), (torch.float32, 1e-39, False), (torch.float32, 1e39, False),
        (torch.bfloat16, least, True), (torch.float64, 1e-39, True), (torch.float64, 0.0, False),
        (torch.float16, 1e-38, True), (torch.float16, 2.0**16, True), (torch.float16, 1e5, False),
        (torch.float32, 1e36, True),
    ]:  # fmt: skip
        x = torch.empty(1, 1, 2, 4, dtype=dtype)
        assert dispatch._fits(kernels, x, x, scale) is fits, (dtype, scale)


def test_the_planner_asks_about_the_calls_scale(monkeypatch):
    """The planner asked whether the kernels run a call without its scale: a scale they refuse
    (0, or outside their range) was planned for Triton and run on aten, where the T x T
    memory rule of the parallel form was then never applied."""
    from rtpcompile.lowering import custom_ops, dispatch

    asked = []
    monkeypatch.setattr(dispatch, "use_triton", lambda q, v=None, scale=1.0: asked.append(scale))
    monkeypatch.setenv("RTP_KERNELS", "triton")  # NOTE: on CPU only forced kernels ask
    plan.reset()
    q = torch.empty(1, 2, 200, 4)
    custom_ops._planned("auto", q, q, None, 0, "fwd", True, 1e-39)
    assert asked == [1e-39]
    plan.reset()


@pytest.mark.parametrize("scale", [1e39, -1e39, 1e-46, 1e-39])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_scale_outside_float32s_range_is_refused(scale, dtype):
    """Found 2026-11-26: the aten forms multiply float32 accumulators by the scale, so 1e39 gave
    inf (NaN where q is 0) and 1e-46 gave 0 with no error; float64 inputs take any finite one."""
    q, k, v = (torch.ones(1, 1, 4, 2, dtype=dtype) for _ in range(3))
    with pytest.raises(ValueError, match="float32's range"):
        ops.retention(q, k, v, 0.5, scale=scale)
    o = ops.retention(q.double() * 1e-20, k.double(), v.double(), 0.5, scale=1e39)
    assert torch.isfinite(o).all() and o.abs().max() > 0
    assert not ops.retention(q, k, v, 0.5, scale=0.0).any()  # 0 stays allowed
