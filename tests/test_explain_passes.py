"""kernels_for / explain list the backward passes the op's backward actually launches.

The op's backward takes an output mask from ``ctx.needs_input_grad`` and skips the passes of
gradients nobody wants (only v needs one: the dv pass alone; a frozen decay with q, k, v
trainable: all three). ``kernels_for`` listed every pass whatever the pattern. Now it takes the
mask (``needs``) and its list equals the kernels the Triton path launches (recorded under the
interpreter); ``explain()`` reads the pattern from the traced graph, uses it in
``Report.kernels`` and names the skipped passes in its table.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("triton", reason="the Triton kernels need triton")

from rtpcompile import kernels, ops  # noqa: E402
from rtpcompile.explain import backward_note, explain  # noqa: E402
from rtpcompile.kernels import GRADIENTS, launch  # noqa: E402

B, H, T, K, V, CHUNK = 1, 2, 37, 8, 12, 16  # NOTE: T not a multiple of the chunk

# (form, inputs that require grad, initial state?)
CASES = [
    ("chunkwise", ("q", "k", "v"), False),  # frozen decay: still every pass
    ("chunkwise", ("v",), False),  # the dv pass only
    ("chunkwise", ("gamma",), True),  # dq, dk and (for the state term) dv
    ("chunkwise", ("v", "initial_state"), True),
    ("parallel", ("q", "k", "v", "gamma"), False),
    ("parallel", ("q",), True),
    ("parallel", ("k", "gamma"), False),
    ("recurrent", ("initial_state",), True),  # the dv pass, for its final state
    ("recurrent", ("q", "v"), False),
]


def _recorder(monkeypatch) -> list:
    launched = []
    real = launch._launch
    monkeypatch.setattr(launch, "_launch", lambda spec, *a: launched.append(spec) or real(spec, *a))
    return launched


def _inputs(pattern, state: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    t = {n: torch.randn(B, H, T, d, generator=g) for n, d in (("q", K), ("k", K), ("v", V))}
    t["gamma"] = torch.tensor([0.3, 0.95])
    t["initial_state"] = torch.randn(B, H, K, V, generator=g) if state else None
    for name in pattern:
        t[name].requires_grad_()
    return t


@pytest.mark.parametrize(
    "form,pattern,state",
    CASES,
    ids=[f"{f}-{'+'.join(p)}-{'s0' if s else 'nos0'}" for f, p, s in CASES],
)
def test_kernels_for_lists_what_the_backward_launches(
    triton_on_cpu, monkeypatch, form, pattern, state
):
    launched = _recorder(monkeypatch)
    t = _inputs(pattern, state)
    args = [t[n] for n in GRADIENTS]
    o, sf = torch.ops.rtp.retention_fwd(*args[:4], 0.5, args[4], form, CHUNK, True)
    n_fwd = len(launched)
    (o.sum() + sf.sum()).backward()
    needs = tuple(t[n] is not None and t[n].requires_grad for n in GRADIENTS)
    meta = [None if x is None else x.detach().to("meta") for x in args]
    listed = kernels.kernels_for(
        form, *meta, chunk_size=CHUNK, backward=True, final_state_grad=True, needs=needs
    )
    fwd = kernels.kernels_for(form, *meta, chunk_size=CHUNK)
    assert [i.spec for i in fwd] == launched[:n_fwd]
    assert [i.spec for i in listed[len(fwd) :]] == launched[n_fwd:]
    everything = kernels.kernels_for(form, *meta, chunk_size=CHUNK, backward=True)
    if needs[:3] != (True,) * 3 and not needs[3]:
        assert len(listed) < len(everything)  # the listing used to be this, for every pattern


def test_kernels_for_checks_needs():
    meta = torch.empty(1, 2, 5, 4, device="meta")
    with pytest.raises(ValueError, match="needs must be 5 bools"):
        kernels.kernels_for("recurrent", meta, meta, meta, meta[0, :, 0, 0], needs=(True,))
    fwd = kernels.kernels_for("recurrent", meta, meta, meta, meta[0, :, 0, 0])
    none = kernels.kernels_for(
        "recurrent", meta, meta, meta, meta[0, :, 0, 0], backward=True, needs=(False,) * 5
    )
    assert none == fwd  # no gradient wanted: no backward runs


# -- explain: the pattern from the traced graph ---------------------------------------------------


class Layer(nn.Module):
    """A parallel retention written out (rewritten by the backend); the decay a parameter or a
    buffer."""

    def __init__(self, learnable: bool):
        super().__init__()
        gamma = torch.tensor([0.9, 0.97])
        if learnable:
            self.gamma = nn.Parameter(gamma)
        else:
            self.register_buffer("gamma", gamma)

    def forward(self, q, k, v):
        idx = torch.arange(q.shape[2])
        diff = idx[:, None] - idx[None, :]
        mask = torch.where(diff >= 0, self.gamma[:, None, None] ** diff.clamp(min=0), 0.0)
        return (q @ k.transpose(-1, -2) * mask) @ v


class Native(nn.Module):
    """An rtp op call already in the graph (kept as it is), with a learnable decay."""

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.tensor([0.9, 0.97]))

    def forward(self, q, k, v, s0):
        return ops.retention_chunkwise(q, k, v, self.gamma, CHUNK, initial_state=s0)


def _qkv(pattern, T=19):
    g = torch.Generator().manual_seed(1)
    t = [torch.randn(B, H, T, d, generator=g) for d in (K, K, V)]
    return [x.requires_grad_(n in pattern) for n, x in zip("qkv", t, strict=True)]


@pytest.mark.parametrize(
    "learnable,pattern,grads,note",
    [
        (False, "qkv", ("q", "k", "v"), ""),  # frozen decay: nothing skipped
        (False, "v", ("v",), "kernels' backward: dv pass only (dv wanted)"),
        (True, "", ("gamma",), "kernels' backward: dq pass only (dgamma wanted)"),
        (True, "q", ("q", "gamma"), "kernels' backward: dq pass only (dq, dgamma wanted)"),
        (False, "", (), ""),  # nothing needs a gradient (an inference trace)
    ],
)
def test_explain_reads_the_pattern_and_lists_its_passes(learnable, pattern, grads, note):
    report = explain(Layer(learnable), *_qkv(pattern))
    (index,) = [i for i, r in enumerate(report.regions) if r.claimed]
    assert report.grads(index) == grads
    text = str(report)
    assert (note in text) if note else "backward:" not in text
    train = report.kernels(index, backward=True, dtype=torch.float16)
    every = report.kernels(index, backward=True, dtype=torch.float16, grads=GRADIENTS)
    assert train == report.kernels(index, backward=True, dtype=torch.float16, grads=grads or None)
    assert (len(train) < len(every)) == bool(note)
    if not grads:  # an inference trace says nothing about training: all passes are listed
        assert train == every


def test_explain_a_native_call_with_a_state():
    q, k, v = _qkv("v")
    s0 = torch.randn(B, H, K, V, requires_grad=True)
    report = explain(Native(), q, k, v, s0)
    (region,) = report.claimed
    assert region.native and report.grads(0) == ("v", "gamma", "initial_state")
    # d gamma (with a state too) is the dq pass's; the initial state's gradient the dv pass's
    assert "kernels' backward: dq, dv passes only (dv, dgamma, ds0 wanted)" in str(report)
    with pytest.raises(ValueError, match="grads must be names from"):
        report.kernels(0, backward=True, grads=("q", "bias"))
    only_v = report.kernels(0, backward=True, grads=("v",))
    assert len(only_v) < len(report.kernels(0, backward=True))


def test_backward_note_follows_the_backward_rule():
    assert backward_note(None, False) == ""
    assert backward_note((False,) * 5, True) == ""
    assert backward_note((True, True, True, False, False), False) == ""
    assert backward_note((False, False, False, True, False), True) == (
        "kernels' backward: dq pass only (dgamma wanted)"  # with a state too
    )
    assert backward_note((True, False, True, True, True), True) == (
        "kernels' backward: dq, dv passes only (dq, dv, dgamma, ds0 wanted)"
    )
    assert backward_note((False, False, False, False, True), True) == (
        "kernels' backward: dv pass only (ds0 wanted)"
    )


def _recording_backend():
    """The rtp backend's detection and rewrite, then AOTAutograd (no Inductor)."""
    from torch._dynamo.backends.debugging import aot_eager

    from rtpcompile import options
    from rtpcompile.backend import detect_and_rewrite

    def backend(gm, example_inputs, **_):
        new_gm, _ = detect_and_rewrite(gm, example_inputs, options.resolve(None))
        return aot_eager(new_gm, example_inputs)

    return backend


@pytest.mark.parametrize("learnable,pattern", [(False, "v"), (True, ""), (False, "qkv")])
def test_the_compiled_backward_gets_the_pattern_explain_reports(
    triton_on_cpu, monkeypatch, learnable, pattern
):
    """What explain read from the trace is the mask the compiled op's backward receives, and
    the kernels it launches are kernels_for's with that mask."""
    from rtpcompile.lowering import dispatch

    masks = []
    real = dispatch.backward
    monkeypatch.setattr(
        dispatch,
        "backward",
        lambda *a, needs=None, **kw: masks.append(needs) or real(*a, needs=needs, **kw),
    )
    launched = _recorder(monkeypatch)
    model = Layer(learnable)
    report = explain(model, *_qkv(pattern))
    (index,) = [i for i, r in enumerate(report.regions) if r.claimed]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=_recording_backend(), dynamic=False)
    o = compiled(*_qkv(pattern))
    n_fwd = len(launched)
    o.sum().backward()
    torch._dynamo.reset()
    needs = report.needs[index]
    assert masks == [None if all(needs[:4]) else needs]  # dispatch: None is "all"
    (fwd_spec,) = launched[:n_fwd]
    q = torch.empty(B, H, 19, K, device="meta")
    v = torch.empty(B, H, 19, V, device="meta")
    listed = kernels.kernels_for(
        fwd_spec.form, q, q, v, torch.empty(H, device="meta"), chunk_size=CHUNK,
        backward=True, state_out=False, needs=needs,
    )  # fmt: skip
    assert [i.spec for i in listed[1:]] == launched[n_fwd:]


class Step(nn.Module):
    """One recurrent step with a state (claimed as "recurrent step"), a frozen decay."""

    def __init__(self):
        super().__init__()
        self.register_buffer("gamma", torch.tensor([0.9, 0.8]))

    def forward(self, q, k, v, state):
        state = self.gamma.view(1, -1, 1, 1) * state + torch.einsum("bhk,bhv->bhkv", k, v)
        return torch.einsum("bhk,bhkv->bhv", q, state), state


@pytest.mark.parametrize("pattern", ["s", "qs", "kv"])
def test_report_kernels_of_a_step_are_the_launched_ones(triton_on_cpu, monkeypatch, pattern):
    """A recurrent step runs the recurrent kernels on any device: Report.kernels (float32) is
    exactly what the compiled step launches, forward and backward, the state output's gradient
    included (a zero one when the new state is unused: autograd materialises it)."""
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(B, H, K, generator=g) for _ in range(2))
    v, s = torch.randn(B, H, V, generator=g), torch.randn(B, H, K, V, generator=g)
    args = [x.requires_grad_(n in pattern) for n, x in zip("qkvs", (q, k, v, s), strict=True)]
    report = explain(Step(), *args)
    (region,) = report.claimed
    expected = [i.spec for i in report.kernels(0, backward=True, batch=B, dtype=torch.float32)]
    launched = _recorder(monkeypatch)
    torch._dynamo.reset()
    o, _ = torch.compile(Step(), backend=_recording_backend(), dynamic=False)(*args)
    o.sum().backward()
    torch._dynamo.reset()
    assert launched == expected
    assert len(expected) < len(report.kernels(0, backward=True, grads=GRADIENTS)) or (
        pattern == "kv"
    )
