"""Eager public-op calls skip the custom op's dispatch (``lowering/eager.py``) only where nothing
traces or watches them, and give bitwise the op's results: outputs, states and every gradient."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from rtpcompile import ops
from rtpcompile.lowering import eager
from rtpcompile.lowering import reference as ref

BYPASS = "_RetentionBackward"
OP = "GeneratedBackwardFor_rtp_retention_fwd_defaultBackward"


def inputs(B=2, H=3, T=37, K=6, V=10, dtype=torch.float64, state=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=dtype) for d in (K, K, V))
    gamma = torch.linspace(0.6, 0.99, H, dtype=torch.float32)
    s0 = torch.randn(B, H, K, V, generator=g, dtype=torch.float64) if state else None
    return [q, k, v, gamma, s0]


def grads_of(form, tensors, wanted, chunk_size=None, final_state=True):
    """Outputs and the gradients of ``wanted`` (indices of q, k, v, gamma, s0) of one call."""
    leaves = [
        None if t is None else t.detach().clone().requires_grad_(i in wanted)
        for i, t in enumerate(tensors)
    ]
    q, k, v, gamma, s0 = leaves
    o, s = ops.retention(
        q, k, v, gamma, form=form, initial_state=s0, output_final_state=True,
        chunk_size=chunk_size,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum()
    if final_state:
        loss = loss + (s * torch.randn(s.shape, generator=g, dtype=s.dtype)).sum()
    got = torch.autograd.grad(loss, [leaves[i] for i in sorted(wanted)])
    return o.grad_fn, (o.detach(), s.detach(), *got)


def test_a_plain_eager_call_bypasses_the_op_and_matches_it_bitwise():
    tensors = inputs()
    with eager.bypassing(True):
        fn, fast = grads_of("chunkwise", tensors, {0, 1, 2, 3, 4}, chunk_size=16)
    with eager.bypassing(False):
        fn_op, slow = grads_of("chunkwise", tensors, {0, 1, 2, 3, 4}, chunk_size=16)
    assert type(fn).__name__ == BYPASS and type(fn_op).__name__ == OP
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b)


@settings(max_examples=25)
@given(
    form=st.sampled_from(["auto", "parallel", "chunkwise", "recurrent"]),
    T=st.sampled_from([1, 2, 15, 33, 64]),
    K=st.integers(1, 9),
    V=st.integers(1, 9),
    state=st.booleans(),
    final_state=st.booleans(),
    wanted=st.sets(st.integers(0, 4), min_size=1),
)
def test_the_bypass_equals_the_op_and_the_reference(form, T, K, V, state, final_state, wanted):
    """Every form, awkward sizes, any subset of gradients (the op's ``output_mask``): the bypass
    gives the op's numbers bitwise, and both are the float64 reference's."""
    if not state:
        wanted = (wanted - {4}) or {0}
    tensors = inputs(B=2, H=2, T=T, K=K, V=V, state=state)
    with eager.bypassing(True):
        fn, fast = grads_of(form, tensors, wanted, chunk_size=8, final_state=final_state)
    with eager.bypassing(False):
        fn_op, slow = grads_of(form, tensors, wanted, chunk_size=8, final_state=final_state)
    assert (type(fn).__name__, type(fn_op).__name__) == (BYPASS, OP)
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b)
    q, k, v, gamma, s0 = tensors
    ro, rs = ref.reference_recurrent(q, k, v, gamma.double(), None, s0)
    torch.testing.assert_close(fast[0], ro, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast[1], rs, rtol=1e-10, atol=1e-10)


def test_the_kernels_under_the_interpreter_take_the_bypass(monkeypatch):
    """The Triton path (``RTP_KERNELS=triton`` on CPU under the interpreter) through the bypass:
    the same kernels, the same numbers as through the op."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RTP_KERNELS", "triton")
    tensors = inputs(B=1, H=2, T=19, K=8, V=12, dtype=torch.float32, state=True)
    with eager.bypassing(True):
        fn, fast = grads_of("chunkwise", tensors, {0, 1, 2, 3, 4}, chunk_size=16)
    with eager.bypassing(False):
        _, slow = grads_of("chunkwise", tensors, {0, 1, 2, 3, 4}, chunk_size=16)
    assert type(fn).__name__ == BYPASS
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b)


def test_no_grad_and_inference_mode_run_the_implementation_alone():
    q, k, v, gamma, s0 = inputs()
    with eager.bypassing(False):
        want = ops.retention_recurrent(q, k, v, gamma, s0)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            got = ops.retention_recurrent(q, k, v, gamma, s0)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        assert got[0].grad_fn is None


def test_a_second_backward_raises_in_both_paths():
    """Neither path has a double-backward formula: differentiating a gradient is an error, never
    a silently missing term."""
    for on in (True, False):
        q, k, v, gamma, _ = inputs(state=False)
        q.requires_grad_()
        with eager.bypassing(on):
            o, _ = ops.retention_chunkwise(q, k, v, gamma)
            (gq,) = torch.autograd.grad(o.sum(), q, create_graph=True)
        with pytest.raises(RuntimeError, match="no autograd formula"):
            torch.autograd.grad((gq * gq).sum() + (q * q).sum(), q)


def test_an_input_changed_in_place_after_the_call_is_caught():
    q, k, v, gamma, _ = inputs(state=False)
    k.requires_grad_()
    o, _ = ops.retention_chunkwise(q, k, v, gamma)
    assert type(o.grad_fn).__name__ == BYPASS
    q.add_(1.0)  # saved for the backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        o.sum().backward()


def test_activation_checkpointing_recomputes_through_the_bypass():
    tensors = inputs()
    leaves = [t.detach().clone().requires_grad_() for t in tensors[:3]]

    def block(q, k, v):
        return ops.retention_chunkwise(q, k, v, tensors[3], 16, tensors[4])[0]

    plain = torch.autograd.grad(block(*leaves).square().sum(), leaves)
    out = torch.utils.checkpoint.checkpoint(block, *leaves, use_reentrant=False)
    assert type(out.grad_fn).__name__ == BYPASS
    again = torch.autograd.grad(out.square().sum(), leaves)
    assert all(torch.equal(a, b) for a, b in zip(plain, again, strict=True))


class _Seen(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Functions(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Subclass(torch.Tensor):
    pass


CPU_ONLY = [torch.profiler.ProfilerActivity.CPU]


def _watchers():
    """(name, context manager) for each way something may watch a call."""
    return [
        ("dispatch mode", _Seen),
        ("function mode", _Functions),
        ("device context", lambda: torch.device("cpu")),
        ("autocast", lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
        ("profiler", lambda: torch.profiler.profile(activities=CPU_ONLY)),
        ("fake tensors", torch._subclasses.fake_tensor.FakeTensorMode),
    ]  # fmt: skip


@pytest.mark.parametrize("name,watcher", _watchers(), ids=[n for n, _ in _watchers()])
def test_nothing_watched_is_bypassed(name, watcher):
    q, k, v, gamma, _ = inputs(state=False)
    assert eager.bypasses((q, k, v, gamma, None))
    with watcher():
        assert not eager.bypasses((q, k, v, gamma, None))


def test_the_profiler_sees_the_op():
    q, k, v, gamma, _ = inputs(state=False)
    q.requires_grad_()
    with torch.profiler.profile(activities=CPU_ONLY) as prof:
        o, _ = ops.retention_chunkwise(q, k, v, gamma)
    assert type(o.grad_fn).__name__ == OP
    assert any(e.name == "rtp::retention_fwd" for e in prof.events())


def test_subclasses_transforms_and_tracers_are_not_bypassed():
    q, k, v, gamma, _ = inputs(state=False)
    assert not eager.bypasses((q.as_subclass(_Subclass), k, v, gamma, None))
    assert eager.bypasses((q, k, v, torch.nn.Parameter(gamma), None))  # a learnable decay
    seen = []

    def probe(x):
        seen.append(eager.bypasses((x, k, v, gamma, None)))
        return x

    torch.func.vmap(probe)(q)
    torch.func.grad(lambda x: probe(x).sum())(q)
    torch.jit.trace(probe, (q,), check_trace=False)
    assert seen == [False, False, False]


def test_a_compiled_call_keeps_the_op_in_the_graph():
    """Dynamo folds the bypass check away: the graph holds the op, no graph break."""
    q, k, v, gamma, _ = inputs(state=False)
    targets = []

    def backend(gm, example_inputs):
        targets.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: ops.retention_chunkwise(q, k, v, gamma, 16)[0],
                       backend=backend, fullgraph=True)  # fmt: skip
    torch.testing.assert_close(fn(q, k, v), ops.retention_chunkwise(q, k, v, gamma, 16)[0])
    assert torch.ops.rtp.retention_fwd in targets


def test_the_switch_is_read_per_call_and_checked(monkeypatch):
    q, k, v, gamma, _ = inputs(state=False)
    monkeypatch.setenv("RTP_EAGER_BYPASS", "off")
    assert not eager.bypasses((q, k, v, gamma, None))
    monkeypatch.setenv("RTP_EAGER_BYPASS", " Yes")
    assert eager.bypasses((q, k, v, gamma, None))
    monkeypatch.setenv("RTP_EAGER_BYPASS", "sometimes")
    with pytest.raises(ValueError, match="RTP_EAGER_BYPASS must be a boolean.*'sometimes'"):
        ops.retention_chunkwise(q, k, v, gamma)


def test_a_lazily_negated_input_goes_through_the_op(monkeypatch):
    """``z.conj().imag`` is a plain float tensor with the negative bit set: the dispatcher
    materialises it before an op's kernel, the Triton kernels would read it without the sign."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RTP_KERNELS", "triton")
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 2, 19, 8, dtype=torch.complex64, generator=g)
    q = z.conj().imag
    assert q.is_neg() and not eager.bypasses((q, None, None, None, None))
    k, v = torch.randn(1, 2, 19, 8, generator=g), torch.randn(1, 2, 19, 12, generator=g)
    gamma = torch.tensor([0.9, 0.5])
    got, _ = ops.retention_chunkwise(q, k, v, gamma, 16)
    want, _ = ops.retention_chunkwise(q.resolve_neg(), k, v, gamma, 16)
    assert torch.equal(got, want)


def test_batched_gradients_run_the_backward_op(monkeypatch):
    """``is_grads_batched`` runs the backward under the legacy vmap: its batched gradients go to
    the backward op (the kernels cannot read them); each row equals a single backward."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RTP_KERNELS", "triton")
    q, k, v, gamma, _ = inputs(B=1, H=2, T=20, K=4, V=3, state=False)
    q.requires_grad_()
    o, _ = ops.retention_chunkwise(q, k, v, gamma, 8)
    assert type(o.grad_fn).__name__ == BYPASS
    grads = torch.randn(3, *o.shape, dtype=o.dtype)
    (batched,) = torch.autograd.grad(o, q, grads, is_grads_batched=True, retain_graph=True)
    for i in range(3):
        (row,) = torch.autograd.grad(o, q, grads[i], retain_graph=True)
        torch.testing.assert_close(batched[i], row)


def test_compiled_autograd_sees_the_backward_op():
    """Compiled autograd traces the backward: one graph holding ``rtp.retention_bwd``, as after
    a forward through the op (the implementation's Python would break the graph)."""
    from torch._dynamo import compiled_autograd

    q, k, v, gamma, _ = inputs(state=False)
    for t in (q, k, v):
        t.requires_grad_()
    o, _ = ops.retention_chunkwise(q, k, v, gamma, 16)
    assert type(o.grad_fn).__name__ == BYPASS
    graphs = []

    def backend(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    torch._dynamo.reset()
    with compiled_autograd._enable(torch.compile(backend=backend, fullgraph=True)):
        o.square().sum().backward()
    assert len(graphs) == 1 and "rtp.retention_bwd" in graphs[0]
    want = torch.autograd.grad(
        ops.retention_chunkwise(q, k, v, gamma, 16)[0].square().sum(), (q, k, v)
    )
    for t, w in zip((q, k, v), want, strict=True):
        torch.testing.assert_close(t.grad, w)


def test_a_profiler_around_the_backward_sees_the_backward_op():
    q, k, v, gamma, _ = inputs(state=False)
    q.requires_grad_()
    o, _ = ops.retention_chunkwise(q, k, v, gamma)
    assert type(o.grad_fn).__name__ == BYPASS
    with torch.profiler.profile(activities=CPU_ONLY) as prof:
        o.sum().backward()
    assert any(e.name == "rtp::retention_bwd" for e in prof.events())


def test_bypassing_sets_the_switch_for_a_block_and_restores_it(monkeypatch):
    q, k, v, gamma, _ = inputs(state=False)
    monkeypatch.setenv("RTP_EAGER_BYPASS", "off")
    with eager.bypassing(True):
        assert eager.bypasses((q, k, v, gamma, None))
    assert os.environ["RTP_EAGER_BYPASS"] == "off"
    monkeypatch.delenv("RTP_EAGER_BYPASS")
    with eager.bypassing(False):
        assert not eager.bypasses((q, k, v, gamma, None))
    assert "RTP_EAGER_BYPASS" not in os.environ


class _Fills(TorchDispatchMode):
    """The zero fills a block runs (autograd materialising an unused output's gradient)."""

    def __init__(self):
        super().__init__()
        self.fills = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("zeros", "zeros_like", "zero_", "fill_"):
            self.fills.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("used", ["output", "state"])
def test_an_unused_output_gets_no_zero_gradient(used):
    """A returned final state the loss does not use reaches the bypass's backward as None (the
    op's generated autograd fills a zero [B, H, K, V] gradient, one launch more, and its dk and
    dv passes start from it); a loss on the final state alone gets a zero output gradient made
    there. Both give the op's gradients, and the state's gradients are the reference's."""
    tensors = inputs(B=2, H=2, T=21, K=5, V=7, state=True)
    results, fills = [], []
    for on in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in (*tensors[:3], tensors[4])]
        q, k, v, s0 = leaves
        with eager.bypassing(on):
            o, s = ops.retention(q, k, v, tensors[3], initial_state=s0, output_final_state=True)
        loss = o.sum() if used == "output" else (s * s).sum()
        with _Fills() as seen:  # NOTE: watching the backward only: the forward took the bypass
            results.append(torch.autograd.grad(loss, leaves))
        fills.append(seen.fills)
    assert fills[0] == [] and fills[1] == ["zeros"], fills
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if used == "state":
        assert torch.count_nonzero(results[0][0]) == 0  # the final state does not read q
        q, k, v, s0 = (t.detach().clone().requires_grad_() for t in (*tensors[:3], tensors[4]))
        _, rs = ref.reference_recurrent(q, k, v, tensors[3].double(), None, s0)
        want = torch.autograd.grad((rs * rs).sum(), (k, v, s0))
        for a, b in zip(results[0][1:], want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
