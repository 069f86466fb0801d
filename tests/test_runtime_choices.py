"""What a compiled graph runs, and what ``explain`` and ``verify`` say it runs: the chunk size
(``RTP_CHUNK_SIZE`` at run time, ``options={"chunk_size": ...}`` frozen), the form (``RTP_FORM``),
the run-time options under ``verify``, and the ``log`` option's scope."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import clean_rtp_env
from test_backend import Retention, inputs

import rtpcompile
import rtpcompile.backend as backend
from rtpcompile import options
from rtpcompile.lowering import dispatch, plan


@pytest.fixture
def ran(tmp_path, monkeypatch):
    """Eager stub for Inductor; records (form, T, chunk, kernels option) per op forward."""
    import torch._inductor.compile_fx as cfx

    clean_rtp_env(monkeypatch, tmp_path / "cache")
    monkeypatch.setattr(cfx, "compile_fx", lambda gm, example_inputs, **kw: gm.forward)
    found = []
    real = dispatch.forward

    def forward(form, q, k, v, gamma, scale, s0, chunk, *args, **kwargs):
        found.append((form, q.shape[2], chunk, options.current().kernels))
        return real(form, q, k, v, gamma, scale, s0, chunk, *args, **kwargs)

    monkeypatch.setattr(dispatch, "forward", forward)
    plan.reset()
    torch._dynamo.reset()
    yield found
    torch._dynamo.reset()
    plan.reset()


def test_chunk_size_from_the_environment_is_read_at_every_call(ran, monkeypatch):
    """RTP_CHUNK_SIZE at compile time is not frozen into a rewritten region (docs/backend.md)."""
    monkeypatch.setenv("RTP_CHUNK_SIZE", "16")
    compiled = torch.compile(Retention(), backend="rtp", options={"form": "chunkwise"})
    q, k, v = inputs(40)
    compiled(q, k, v)
    monkeypatch.setenv("RTP_CHUNK_SIZE", "32")
    compiled(q, k, v)
    assert [r[:3] for r in ran] == [("chunkwise", 40, 16), ("chunkwise", 40, 32)]


def test_chunk_size_in_the_options_dict_is_frozen(ran, monkeypatch):
    monkeypatch.setenv("RTP_CHUNK_SIZE", "32")
    opts = {"form": "chunkwise", "chunk_size": 16}
    compiled = torch.compile(Retention(), backend="rtp", options=opts)
    q, k, v = inputs(40)
    compiled(q, k, v)
    monkeypatch.setenv("RTP_CHUNK_SIZE", "64")
    compiled(q, k, v)
    assert [r[2] for r in ran] == [16, 16]


def test_verify_runs_the_options_dicts_kernels(ran, monkeypatch):
    """The environment asks for Triton (which cannot run here without the interpreter); the
    dict asks for aten: the compiled graph and its verify check both run aten."""
    monkeypatch.setenv("RTP_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    opts = {"kernels": "aten", "verify": True}
    compiled = torch.compile(Retention(), backend="rtp", options=opts)
    q, k, v = inputs(20)
    torch.testing.assert_close(compiled(q, k, v), Retention()(q, k, v), rtol=1e-4, atol=1e-4)
    assert len(ran) == 2 and {r[3] for r in ran} == {"aten"}


def test_explain_follows_the_form_and_chunk_environment(ran, monkeypatch):
    q, k, v = inputs(300)
    monkeypatch.setenv("RTP_FORM", "parallel")
    (row,) = rtpcompile.explain(Retention(), q, k, v).rows()
    assert row[-1].startswith("parallel at T=300") and "RTP_FORM" in row[-1]
    torch.compile(Retention(), backend="rtp")(q, k, v)
    assert ran[-1][0] == "parallel"
    monkeypatch.setenv("RTP_FORM", "chunkwise")
    monkeypatch.setenv("RTP_CHUNK_SIZE", "16")
    (row,) = rtpcompile.explain(Retention(), q, k, v).rows()
    assert row[-1].startswith("chunkwise (chunk 16) at T=300")


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "rtpcompile"]


def test_log_option_applies_to_its_own_compile_only(ran, caplog):
    logger = logging.getLogger("rtpcompile")
    level, handlers = logger.level, list(logger.handlers)
    q, k, v = inputs(20)
    # NOTE: caplog's handler takes every record that propagates; the levels decide
    torch.compile(Retention(), backend="rtp", options={"log": "debug"})(q, k, v)
    assert any("region(s) claimed" in m for m in _messages(caplog))
    assert (logger.level, logger.handlers) == (level, handlers)
    caplog.clear()
    torch._dynamo.reset()
    torch.compile(Retention(), backend="rtp", options={"log": "off"})(q, k, v)
    assert _messages(caplog) == []


def test_verify_logs_under_its_compiles_log_option(ran, caplog):
    q, k, v = inputs(20)
    opts = {"log": "info", "verify": True}
    torch.compile(Retention(), backend="rtp", options=opts)(q, k, v)
    assert any("rtp verify" in m for m in _messages(caplog))
    assert backend.counters["graphs"] >= 1
