"""The public ops in every form against the float64 reference: outputs, states, grads, errors."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rtpcompile import ops
from rtpcompile.lowering import reference as ref

FORMS = ("parallel", "chunkwise", "recurrent")


def make(B, H, T, K, V, dtype=torch.float64, seed=0, state=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=dtype) for d in (K, K, V))
    s0 = torch.randn(B, H, K, V, generator=g, dtype=torch.float64) if state else None
    return q, k, v, s0


def run(form, q, k, v, gamma, s0=None, chunk_size=None, scale=None):
    return ops.retention(
        q,
        k,
        v,
        gamma,
        form=form,
        initial_state=s0,
        output_final_state=True,
        chunk_size=chunk_size,
        scale=scale,
    )


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    "B,H,T,K,V,chunk",
    [(1, 1, 1, 8, 8, 4), (2, 3, 63, 12, 20, 16), (1, 2, 65, 48, 80, 64), (2, 2, 130, 7, 5, 64)],
    ids=lambda x: str(x),
)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "state"])
def test_forms_match_reference(form, B, H, T, K, V, chunk, with_state):
    q, k, v, s0 = make(B, H, T, K, V, state=with_state)
    gamma = torch.linspace(0.5, 1.0, H, dtype=torch.float64)
    o, s = run(form, q, k, v, gamma, s0, chunk)
    ro, rs = ref.reference_recurrent(q, k, v, gamma, None, s0)
    torch.testing.assert_close(o, ro, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, rs, rtol=1e-10, atol=1e-10)


def test_reference_forms_agree():
    q, k, v, s0 = make(2, 3, 41, 6, 9, state=True)
    gamma = torch.tensor([0.3, 0.9, 1.0], dtype=torch.float64)
    ro, rs = ref.reference_recurrent(q, k, v, gamma, 0.7, s0)
    for o, s in (
        ref.reference_parallel(q, k, v, gamma, 0.7, s0),
        ref.reference_chunkwise(q, k, v, gamma, 0.7, s0, chunk_size=8),
    ):
        torch.testing.assert_close(o, ro)
        torch.testing.assert_close(s, rs)


@settings(max_examples=25)
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    T=st.integers(1, 300),
    K=st.sampled_from([1, 3, 8, 12, 16, 33]),
    V=st.sampled_from([1, 5, 8, 16, 20]),
    chunk=st.sampled_from([1, 7, 16, 64, 128]),
    gammas=st.lists(st.floats(1e-3, 1.0), min_size=3, max_size=3),
    form=st.sampled_from(FORMS),
    split=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_property_forms_agree_and_split_continues(B, H, T, K, V, chunk, gammas, form, split, seed):
    q, k, v, _ = make(B, H, T, K, V, seed=seed)
    gamma = torch.tensor(gammas[:H], dtype=torch.float64)
    ro, rs = ref.reference_recurrent(q, k, v, gamma)
    o, s = run(form, q, k, v, gamma, chunk_size=chunk)
    torch.testing.assert_close(o, ro, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s, rs, rtol=1e-9, atol=1e-9)
    # split at a random point and carry the state: equals the whole sequence
    cut = int(split * T)
    o1, s1 = run(form, q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], gamma, chunk_size=chunk)
    o2, s2 = run("chunkwise", q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], gamma, s1, chunk)
    torch.testing.assert_close(torch.cat([o1, o2], dim=2), ro, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s2, rs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "state"])
@pytest.mark.parametrize("T,K,V", [(1, 3, 2), (9, 3, 5), (13, 4, 4)], ids=lambda x: str(x))
def test_gradcheck(form, with_state, T, K, V):
    q, k, v, s0 = make(1, 2, T, K, V, state=with_state)
    gamma = torch.tensor([0.8, 0.95], dtype=torch.float64)
    inputs = [x.requires_grad_() for x in (q, k, v, gamma)]
    if with_state:
        inputs.append(s0.requires_grad_())

    def f(*args):
        s = args[4] if with_state else None
        return run(form, *args[:4], s, chunk_size=4, scale=0.6)

    assert torch.autograd.gradcheck(f, tuple(inputs))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_accumulates_in_float32(form, dtype):
    q, k, v, _ = make(2, 2, 70, 16, 24, dtype=torch.float64)
    gamma = torch.tensor([0.9, 0.99], dtype=torch.float64)
    ro, rs = ref.reference_recurrent(q.to(dtype), k.to(dtype), v.to(dtype), gamma)
    o, s = run(form, q.to(dtype), k.to(dtype), v.to(dtype), gamma.float(), chunk_size=16)
    assert o.dtype == dtype and s.dtype == torch.float32
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    torch.testing.assert_close(o.double(), ro, rtol=tol, atol=tol * ro.abs().max().item())
    torch.testing.assert_close(s.double(), rs, rtol=1e-4, atol=1e-4 * rs.abs().max().item())


@pytest.mark.parametrize("form", FORMS)
def test_gradients_float32_match_float64(form):
    q, k, v, s0 = make(2, 2, 50, 12, 10, state=True)
    gamma = torch.tensor([0.9, 0.97], dtype=torch.float64)
    grads = {}
    for dtype in (torch.float64, torch.float32):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v, gamma, s0)]
        o, s = run(form, *leaves[:4], leaves[4], chunk_size=16)
        (o.square().sum() + s.square().sum()).backward()
        grads[dtype] = [x.grad.double() for x in leaves]
    for g32, g64 in zip(grads[torch.float32], grads[torch.float64], strict=True):
        torch.testing.assert_close(g32, g64, rtol=1e-3, atol=1e-3 * g64.abs().max().item())


def test_permuted_and_sliced_inputs():
    """[B, T, H, D] views and slices of a fused projection are read as they are."""
    B, T, H, K = 2, 33, 3, 8
    fused = torch.randn(B, T, H, 3 * K, dtype=torch.float64)
    q, k, v = (x.transpose(1, 2) for x in fused.split(K, dim=-1))
    assert not q.is_contiguous()
    gamma = ops.retention_init_decay(H, dtype=torch.float64)
    ro, _ = ref.reference_recurrent(q, k, v, gamma)
    for form in FORMS:
        torch.testing.assert_close(run(form, q, k, v, gamma)[0], ro)


def test_long_sequence_stays_finite():
    T = 100_000
    q, k, v, _ = make(1, 1, T, 4, 4, dtype=torch.float32)
    gamma = torch.tensor([1 - 2**-12])
    o, s = ops.retention_chunkwise(q, k, v, gamma, chunk_size=256)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    tail = slice(T - 300, T)
    # the last 300 outputs agree with a recurrent continuation from the state 300 tokens earlier
    _, s_mid = ops.retention_chunkwise(
        q[:, :, : T - 300], k[:, :, : T - 300], v[:, :, : T - 300], gamma
    )
    o_tail, s_end = ops.retention_recurrent(
        q[:, :, tail], k[:, :, tail], v[:, :, tail], gamma, s_mid
    )
    torch.testing.assert_close(o_tail, o[:, :, tail], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(s_end, s, rtol=1e-3, atol=1e-3)


def test_tiny_gamma_and_gamma_one():
    q, k, v, _ = make(1, 2, 200, 4, 4)
    gamma = torch.tensor([1e-30, 1.0], dtype=torch.float64)
    ro, rs = ref.reference_recurrent(q, k, v, gamma)
    for form in FORMS:
        o, s = run(form, q, k, v, gamma, chunk_size=64)
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o, ro)
        torch.testing.assert_close(s, rs)


def test_empty_sequence():
    q, k, v, s0 = make(2, 2, 0, 4, 6, state=True)
    gamma = ops.retention_init_decay(2, dtype=torch.float64)
    for form in FORMS:
        o, s = run(form, q, k, v, gamma, s0)
        assert o.shape == (2, 2, 0, 6)
        torch.testing.assert_close(s, s0)


def test_init_helpers():
    gamma = ops.retention_init_decay(4)
    torch.testing.assert_close(gamma, 1 - 2.0 ** (-5 - torch.arange(4.0)))
    s = ops.retention_init_state(2, 4, 8, 16)
    assert s.shape == (2, 4, 8, 16) and s.dtype == torch.float32 and not s.any()


def test_gamma_gets_gradient_through_auto():
    q, k, v, _ = make(1, 2, 20, 4, 4, dtype=torch.float32)
    gamma = torch.tensor([0.9, 0.8], requires_grad=True)
    ops.retention(q, k, v, gamma).sum().backward()
    assert (
        gamma.grad is not None and torch.isfinite(gamma.grad).all() and gamma.grad.abs().sum() > 0
    )


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda q, k, v, g, s: (q[0], k, v, g, s), "q must have 4 dims"),
        (lambda q, k, v, g, s: (q, k[:, :, :3], v, g, s), "must agree in [B, H, T]"),
        (lambda q, k, v, g, s: (q, k[..., :3], v, g, s), "same head dim K"),
        (lambda q, k, v, g, s: (q, k, v.double(), g, s), "share a dtype"),
        (lambda q, k, v, g, s: (q, k, v, g[:1], s), "gamma must have shape [2]"),
        (lambda q, k, v, g, s: (q, k, v, g * 0 + 1.5, s), "gamma values must lie in [0, 1]"),
        (lambda q, k, v, g, s: (q, k, v, g * 0 - 0.1, s), "gamma values must lie in [0, 1]"),
        (lambda q, k, v, g, s: (q, k, v, g, s[:, :, :2]), "initial_state must have shape"),
        (lambda q, k, v, g, s: (q.to(torch.complex64), k, v, g, s), "complex"),
        (lambda q, k, v, g, s: (q.int(), k.int(), v.int(), g, s), "must be float16"),
    ],
    ids=[
        "rank",
        "btq",
        "kdim",
        "dtype",
        "gamma-shape",
        "gamma>1",
        "gamma<0",
        "state",
        "complex",
        "int",
    ],
)
def test_bad_input_messages(mutate, message):
    q, k, v, _ = make(1, 2, 5, 4, 6, dtype=torch.float32)
    s = torch.zeros(1, 2, 4, 6)
    gamma = torch.tensor([0.9, 0.8])
    args = mutate(q, k, v, gamma, s)
    with pytest.raises(ValueError, match=re.escape(message)):
        ops.retention(*args[:4], initial_state=args[4])


def test_bad_form_and_chunk_size():
    q, k, v, _ = make(1, 1, 5, 4, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="form must be one of"):
        ops.retention(q, k, v, torch.tensor([0.9]), form="fast")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        ops.retention_chunkwise(q, k, v, torch.tensor([0.9]), chunk_size=0)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        ops.retention_init_decay(0)


def test_opcheck_with_permuted_inputs():
    B, T, H, K, V = 2, 9, 2, 4, 6
    q = torch.randn(B, T, H, K).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, H, K).transpose(1, 2).requires_grad_()
    v = torch.randn(B, T, H, V).transpose(1, 2).requires_grad_()
    gamma = torch.tensor([0.9, 0.7], requires_grad=True)
    s0 = torch.randn(B, H, K, V).requires_grad_()
    for form in ("auto", *FORMS):
        torch.library.opcheck(torch.ops.rtp.retention_fwd, (q, k, v, gamma, 0.5, s0, form, 4))
        torch.library.opcheck(torch.ops.rtp.retention_fwd, (q, k, v, gamma, 0.5, None, form, 0))
    # the backward op too: its fake outputs match the real ones, the gradient of an absent
    # initial state included (an empty tensor: no [B, H, K, V] of zeros is filled)
    with torch.no_grad():
        o, sf = torch.ops.rtp.retention_fwd(q, k, v, gamma, 0.5, s0, "auto", 0)
    do, dsf = torch.randn_like(o), torch.randn_like(sf)
    for form in ("auto", *FORMS):
        for state, dsf_ in ((s0, dsf), (None, None)):
            # NOTE: detached: the backward op has no autograd formula (no double backward)
            args = (do, dsf_, q.detach(), k.detach(), v.detach(), gamma.detach(), 0.5)
            args += (None if state is None else state.detach(), sf, form, 4)
            torch.library.opcheck(torch.ops.rtp.retention_bwd, args)
            assert torch.ops.rtp.retention_bwd(*args)[4].shape == (
                s0.shape if state is not None else (0,)
            )


@pytest.mark.parametrize("form", ("auto", *FORMS))
@pytest.mark.parametrize("with_state", [False, True])
def test_no_final_state_asked_gives_an_empty_one_and_the_same_gradients(form, with_state):
    """``output_final_state=False``: the op's second result is an empty tensor (nothing computed
    or saved for it), o and every gradient are those of a call that returns the state."""
    q, k, v, _ = make(2, 2, 11, 5, 3, dtype=torch.float32, seed=4)
    gamma = torch.tensor([0.9, 0.6])
    s0 = torch.randn(2, 2, 5, 3) if with_state else None
    results = []
    for state_out in (True, False):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, gamma)]
        s = None if s0 is None else s0.clone().requires_grad_()
        o, sf = torch.ops.rtp.retention_fwd(*leaves, 0.5, s, form, 4, state_out)
        assert (sf.shape == (0,)) != state_out and sf.dtype == torch.float32
        o.sin().sum().backward()
        results.append([o, *(x.grad for x in leaves), None if s is None else s.grad])
    for a, b in zip(*results, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    args = (q, k, v, gamma.requires_grad_(), 0.5, s0, form, 4, False)
    torch.library.opcheck(torch.ops.rtp.retention_fwd, args)
    if with_state:
        # the backward's fake: ds0 is [B, H, K, V] though the saved final state is empty
        # NOTE: detached: the backward op has no autograd formula (no double backward)
        do = torch.randn(o.shape)
        bwd = (do, None, *(x.detach() for x in (q, k, v, gamma)), 0.5, s0, sf.detach(), form, 4)
        torch.library.opcheck(torch.ops.rtp.retention_bwd, bwd)
        assert torch.ops.rtp.retention_bwd(*bwd)[4].shape == (2, 2, 5, 3)


@pytest.mark.parametrize("T", [0, 1, 9])
def test_aten_forms_skip_the_final_state_when_not_asked(T):
    """The aten forms return no final state without ``state_out`` and the same output."""
    from rtpcompile.lowering import aten_impl

    q, k, v, _ = make(1, 2, T, 5, 3, dtype=torch.float32, seed=2)
    lg = torch.log(torch.tensor([0.9, 0.5]))
    s0 = torch.randn(1, 2, 5, 3)
    for form in FORMS:
        o, sf = aten_impl.forward(form, q, k, v, lg, 0.5, s0, 4)
        o2, none = aten_impl.forward(form, q, k, v, lg, 0.5, s0, 4, state_out=False)
        assert none is None and sf.shape == (1, 2, 5, 3)
        torch.testing.assert_close(o2, o, rtol=0, atol=0)


def test_public_ops_compute_the_state_only_when_asked(monkeypatch):
    from rtpcompile.lowering import dispatch

    asked = []
    real = dispatch.forward
    monkeypatch.setattr(
        dispatch, "forward", lambda *a, **kw: asked.append(kw["state_out"]) or real(*a, **kw)
    )
    q, k, v, _ = make(1, 2, 6, 4, 4, dtype=torch.float32)
    gamma = torch.tensor([0.9, 0.7])
    ops.retention_parallel(q, k, v, gamma)
    ops.retention(q, k, v, gamma)
    ops.retention(q, k, v, gamma, output_final_state=True)
    assert ops.retention_chunkwise(q, k, v, gamma, output_final_state=False)[1] is None
    ops.retention_chunkwise(q, k, v, gamma)
    ops.retention_recurrent(q, k, v, gamma, None)
    assert asked == [False, False, True, False, True, True]


def test_compiled_without_a_state_matches_eager():
    """Through AOTAutograd (fake outputs, the empty state's gradient) in training."""

    def f(q, k, v, gamma):
        return ops.retention(q, k, v, gamma, form="parallel").sin().sum()

    q, k, v, _ = make(1, 2, 9, 4, 6, dtype=torch.float32, seed=2)
    gamma = torch.tensor([0.9, 0.7])
    grads = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, gamma)]
        fn(*leaves).backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiles_fullgraph_dynamic():
    def f(q, k, v, gamma):
        return ops.retention(q, k, v, gamma).sin().sum()

    compiled = torch.compile(f, backend="inductor", fullgraph=True, dynamic=True)
    gamma = torch.tensor([0.9, 0.7], requires_grad=True)
    for T in (5, 300, 7):
        q, k, v, _ = make(1, 2, T, 4, 4, dtype=torch.float32, seed=T)
        leaves = [x.requires_grad_() for x in (q, k, v)]
        out = compiled(*leaves, gamma)
        out.backward()
        got = [x.grad.clone() for x in (*leaves, gamma)]
        for x in (*leaves, gamma):
            x.grad = None
        f(*leaves, gamma).backward()
        for a, b in zip(got, [x.grad for x in (*leaves, gamma)], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        gamma.grad = None


def test_gamma_is_checked_once_per_version(monkeypatch):
    """On an accelerator (meta stands in), a gamma that takes no gradient and passed is not
    re-checked until it changes in place (a decode loop's steps); on CPU, and for a gamma that
    takes a gradient, every call (see the fused optimizer test below)."""
    from rtpcompile.lowering import validate

    checked = []
    monkeypatch.setattr(validate, "_check_gamma_values", checked.append)
    for device, expected in (("meta", [1, 1, 2, 2]), ("cpu", [1, 2, 3, 4])):
        checked.clear()
        gamma = torch.full((3,), 0.9, device=device)
        counts = []
        for step in range(4):
            if step == 2:
                gamma.mul_(1.0)  # an optimizer step: in place, new version
            validate.check_gamma_values(gamma)
            counts.append(len(checked))
        assert counts == expected, device
        other = torch.full((3,), 0.9, device=device)  # another tensor is checked on its own
        validate.check_gamma_values(other)
        assert len(checked) == expected[-1] + 1
    checked.clear()
    learnable = torch.full((3,), 0.9, device="meta", requires_grad=True)
    for _ in range(3):
        validate.check_gamma_values(learnable)
    assert len(checked) == 3
    with torch.inference_mode():  # inference tensors have no version: checked every call
        gamma = torch.full((3,), 0.9, device="meta")
        checked.clear()
        for _ in range(2):
            validate.check_gamma_values(gamma)
        assert len(checked) == 2


@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
def test_a_gamma_a_fused_optimizer_moved_out_of_range_is_refused(optimizer):
    """A fused optimizer writes the parameter in place without bumping its version: the next
    call ran the moved gamma unchecked (a negative one as 0, one above 1 growing the output
    to ~7e18), found 2026-11-25."""
    gen = torch.Generator().manual_seed(0)
    q, v = (torch.randn(1, 2, 6, d, generator=gen) for d in (3, 4))
    gamma = torch.nn.Parameter(torch.tensor([0.5, 0.9]))
    opt = getattr(torch.optim, optimizer)([gamma], lr=10.0, fused=True)
    (-100 * ops.retention(q, q, v, gamma).sum()).backward()
    opt.step()
    # NOTE: torch's fused step leaves the version (the test passes either way)
    assert not 0 <= gamma.min() <= gamma.max() <= 1
    with pytest.raises(ValueError, match="gamma values must lie in"):
        ops.retention(q, q, v, gamma)


def test_a_gamma_parameter_can_be_swapped_after_a_call():
    """``module.to`` under ``set_swap_module_params_on_conversion`` swaps the parameter, which
    ``torch.utils.swap_tensors`` refuses while it has a weak reference: the check's cache held
    one after the first call."""
    q, v = torch.randn(1, 2, 5, 3), torch.randn(1, 2, 5, 4)
    gamma = torch.nn.Parameter(torch.tensor([0.5, 0.9]))
    ops.retention(q, q, v, gamma)
    torch.utils.swap_tensors(gamma, torch.nn.Parameter(torch.tensor([0.4, 0.8])))
    torch.testing.assert_close(gamma.detach(), torch.tensor([0.4, 0.8]))
    from rtpcompile.lowering import validate

    for grad in (True, False):  # on an accelerator (meta stands in) a frozen one was cached
        frozen = torch.nn.Parameter(torch.full((2,), 0.9, device="meta"), requires_grad=grad)
        validate.check_gamma_values(frozen)
        torch.utils.swap_tensors(frozen, torch.nn.Parameter(torch.ones(2, device="meta")))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scale": 10**400}, "scale must be a finite number, got an int of 1329 bits"),
        ({"scale": torch.tensor(True)}, "got a torch.bool tensor"),
        ({"scale": torch.tensor(1 + 0j)}, "got a torch.complex64 tensor"),
        ({"scale": torch.tensor(0.5, device="meta")}, "got a meta torch.float32 tensor"),
        ({"chunk_size": torch.tensor(True)}, "chunk_size must be a positive int"),
        ({"chunk_size": torch.tensor([3])}, "chunk_size must be a positive int"),
        ({"gamma": 10**400}, "gamma must be a number in"),
        ({"gamma": -(10**400)}, "gamma must be a number in"),
    ],
)
def test_odd_scalars_are_refused_with_a_value_error(kwargs, match):
    """Each was an OverflowError, a RuntimeError from ``.item()``, or accepted (a bool or complex
    tensor scale as 1, ``tensor([3])`` as a chunk size), found 2026-11-25."""
    q, v = torch.randn(1, 2, 9, 3), torch.randn(1, 2, 9, 4)
    args = {"gamma": torch.tensor([0.5, 0.9]), "form": "chunkwise", **kwargs}
    gamma = args.pop("gamma")
    with pytest.raises(ValueError, match=match):
        ops.retention(q, q, v, gamma, **args)
