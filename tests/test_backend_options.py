"""The backend's ``options`` dict reaches the op at run time (kernels, autotune), forward and
backward, for rewritten regions and for rtp op calls already in the graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_backend import Retention, inputs

from rtpcompile import ops, options
from rtpcompile.lowering import dispatch, plan


@pytest.fixture
def seen(monkeypatch):
    """Which options each rtp op implementation ran under: ("fwd" | "bwd", kernels, autotune)."""
    found = []
    real_forward, real_backward = dispatch.forward, dispatch.backward

    def forward(*args, **kwargs):
        opts = options.current()
        found.append(("fwd", opts.kernels, opts.autotune))
        return real_forward(*args, **kwargs)

    def backward(*args, **kwargs):
        opts = options.current()
        found.append(("bwd", opts.kernels, opts.autotune))
        return real_backward(*args, **kwargs)

    monkeypatch.setattr(dispatch, "forward", forward)
    monkeypatch.setattr(dispatch, "backward", backward)
    monkeypatch.setattr(plan, "_memo", {})
    monkeypatch.setenv("RTP_CACHE", "off")
    torch._dynamo.reset()
    yield found
    torch._dynamo.reset()


def test_runtime_text_keeps_only_the_explicit_runtime_options():
    assert options.runtime_text(None) == ""
    assert options.runtime_text({"form": "chunkwise", "strict": True}) == ""
    text = options.runtime_text({"kernels": "Triton", "autotune": "yes", "verify": True})
    assert text == "kernels=triton;autotune=1"
    with options.scoped(text):
        assert options.current().kernels == "triton" and options.current().autotune
    assert options.current().kernels == "auto"
    for bad in (3.7, True, "4.0", torch.tensor(2.5)):
        with pytest.raises(ValueError, match="'chunk_size' must be a positive integer"):
            options.resolve({"chunk_size": bad})
    for good in ("16", " 16", np.int64(16), torch.tensor(16)):
        assert options.resolve({"chunk_size": good}).chunk_size == 16
    for bad in ("kernels", "kernels=triton;", "strict=1", "form=parallel"):
        with pytest.raises(ValueError, match="runtime_options: expected"):
            options.parse_runtime_text(bad)


def test_a_rewritten_region_runs_forward_and_backward_with_the_options(seen):
    """The real Inductor: the backward is AOTAutograd's compiled one, not the op's autograd."""
    model = Retention(learnable=True)
    compiled = torch.compile(model, backend="rtp", options={"kernels": "aten", "autotune": True})
    q, k, v = inputs(9, grad=True)
    out = compiled(q, k, v)
    torch.testing.assert_close(out, model(q, k, v), rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert ("fwd", "aten", True) in seen and ("bwd", "aten", True) in seen
    seen.clear()
    model(q, k, v)  # eager: the environment's options only
    assert seen == []  # no op in the eager model
    ops.retention(q, k, v, 0.9)
    assert seen == [("fwd", "auto", False)]


def test_an_op_call_in_the_graph_carries_the_options(seen):
    def f(q, k, v, gamma):
        o, _ = ops.retention_chunkwise(q, k, v, gamma)
        return o

    q, k, v = inputs(7, grad=True)
    gamma = torch.tensor([0.9, 0.8, 0.5], requires_grad=True)
    compiled = torch.compile(f, backend="rtp", options={"autotune": True})
    compiled(q, k, v, gamma).sum().backward()
    # NOTE: the tuner's candidate runs count too; every one ran with autotune on
    assert {s[0] for s in seen} == {"fwd", "bwd"} and all(s[2] for s in seen)


def test_a_bad_option_reaches_the_caller_as_the_wrapped_value_error(fresh_compile):
    """What docs/backend.md promises a caller catching it: torch.compile wraps the backend's
    ValueError in BackendCompilerFailed (a RuntimeError) that names it and keeps it as its
    ``inner_exception`` (and ``__context__``; ``__cause__`` is None)."""
    compiled = torch.compile(Retention(), backend="rtp", options={"form": "bogus"})
    with pytest.raises(RuntimeError, match="option 'form' must be one of") as info:
        compiled(*inputs(5))
    inner = getattr(info.value, "inner_exception", None)
    assert isinstance(inner, ValueError) and info.value.__context__ is inner
