"""A decode step whose state lives in a caller's cache object is claimed (recurrent step), and the
compiled decode loop equals eager."""

from __future__ import annotations

import pytest
import torch

import rtpcompile
from rtpcompile import backend
from rtpcompile.nn import RTPHybridLM


@pytest.fixture
def eager_inductor(monkeypatch):
    """compile_fx replaced by the graph's own forward: the rewrite runs, Inductor does not."""
    import torch._inductor.compile_fx as cfx

    monkeypatch.setattr(cfx, "compile_fx", lambda gm, example_inputs, **kw: gm.forward)
    torch._dynamo.reset()
    backend.counters.clear()
    yield
    torch._dynamo.reset()


def _model(ratio=1.0):
    torch.manual_seed(0)
    return RTPHybridLM(vocab_size=64, dim=32, num_layers=2, num_heads=2, ratio=ratio).eval()


def _ids(T):
    return torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(0))


def test_the_cached_decode_step_is_claimed(eager_inductor):
    model = _model()
    with torch.no_grad():
        cache = model.new_cache(2)
        model(_ids(11), cache=cache)
        report = rtpcompile.explain(model, _ids(1), cache=cache)
    assert len(report.claimed) == 2
    assert all(r.written == "recurrent step" and r.state is not None for r in report.claimed)
    assert "recurrent at T=1" in str(report)


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_compiled_decode_loop_equals_eager(eager_inductor, ratio):
    model = _model(ratio)
    compiled = torch.compile(model, backend="rtp")
    prompt = _ids(11)
    with torch.no_grad():
        caches = [model.new_cache(2), model.new_cache(2)]
        outs = [model(prompt, cache=caches[0]), compiled(prompt, cache=caches[1])]
        backend.counters.clear()  # the decode graph's claims only
        for _ in range(4):
            token = outs[0][:, -1:].argmax(-1)
            outs = [model(token, cache=caches[0]), compiled(token, cache=caches[1])]
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert backend.counters["regions_claimed"] >= 1  # the decode graph's recurrent steps


def test_a_cached_multi_token_continuation_is_one_chunk_step(eager_inductor):
    """Several tokens after a prefix (a chunked prefill, a draft): each retention layer's chunk
    step (parallel part, the state's decayed part scaled like the scores, the state update) is one
    claimed region, and the compiled continuation equals eager."""
    model = _model()
    with torch.no_grad():
        caches = [model.new_cache(2), model.new_cache(2)]
        for cache in caches:
            model(_ids(11), cache=cache)
        report = rtpcompile.explain(model, _ids(5), cache=caches[1])
        assert [r.written for r in report.claimed] == ["chunk step"] * 2
        assert all(r.state is not None and r.state_output is not None for r in report.claimed)
        caches[1] = model.new_cache(2)
        model(_ids(11), cache=caches[1])
        compiled = torch.compile(model, backend="rtp")
        want, got = model(_ids(5), cache=caches[0]), compiled(_ids(5), cache=caches[1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(caches[0].layers, caches[1].layers, strict=True):
        torch.testing.assert_close(a.state, b.state, rtol=1e-5, atol=1e-5)
