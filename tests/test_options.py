"""Options: defaults, RTP_* environment variables, explicit options, and the errors for bad ones."""

from __future__ import annotations

import re
import warnings

import pytest

from rtpcompile import options


def test_defaults():
    opts = options.resolve({})
    assert opts.form == "auto" and not opts.strict and not opts.verify and opts.kernels == "auto"


def test_environment_then_explicit(monkeypatch):
    monkeypatch.setenv("RTP_FORM", "chunkwise")
    monkeypatch.setenv("RTP_STRICT", "1")
    monkeypatch.setenv("RTP_CHUNK_SIZE", "32")
    opts = options.resolve({"form": "parallel"})
    assert opts.form == "parallel" and opts.strict is True and opts.chunk_size == 32


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown rtp option\(s\) \['fast'\]; valid options are"):
        options.resolve({"fast": True})
    with pytest.raises(ValueError, match=r"\['max_autotune'\].*Inductor settings are not passed"):
        options.resolve({"max_autotune": True})
    with pytest.raises(ValueError, match=r"torch refuses mode= together with options="):
        options.resolve({"max_autotune": True})


@pytest.mark.parametrize("bad", [["form"], "parallel", 3])
def test_options_that_are_not_a_dict_are_a_clear_error(bad):
    """Was Python's 'dictionary update sequence element #0 has length 4; 2 is required'."""
    with pytest.raises(ValueError, match=r"rtp options must be a dict .* got a"):
        options.resolve(bad)


@pytest.mark.parametrize(
    "name,value,message",
    [
        ("form", "fastest", "must be one of ['auto', 'parallel', 'chunkwise', 'recurrent']"),
        ("kernels", "cuda", "must be one of ['auto', 'aten', 'triton']"),
        ("strict", "maybe", "must be a boolean"),
        ("chunk_size", 0, "must be a positive integer"),
    ],
)
def test_bad_values(name, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        options.resolve({name: value})


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("RTP_KERNELS", "fpga")
    with pytest.raises(ValueError, match="environment variable RTP_KERNELS"):
        options.current()


@pytest.mark.parametrize("name", ["form", "kernels", "log", "strict", "chunk_size", "autotune"])
def test_a_blank_environment_variable_is_unset(monkeypatch, name):
    """``RTP_FORM=`` was an error while ``RTP_CHUNK_SIZE=`` was unset (until 2026-11-25): a
    blank value is now the default for every option; an explicit empty option stays an error."""
    for blank in ("", "  "):
        monkeypatch.setenv(f"RTP_{name.upper()}", blank)
        assert options.resolve(None) == options.Options()
    if name in ("form", "kernels", "log"):
        with pytest.raises(ValueError, match=f"option {name!r} must be one of"):
            options.resolve({name: ""})


def test_current_follows_every_environment_change(monkeypatch):
    """current() is memoised on the raw RTP_* values: a set, a change and a removal all apply."""
    for name in options.FIELDS:
        monkeypatch.delenv(f"RTP_{name.upper()}", raising=False)
    assert options.current() == options.Options()
    monkeypatch.setenv("RTP_FORM", "parallel")
    monkeypatch.setenv("RTP_CHUNK_SIZE", "32")
    assert options.current() == options.Options(form="parallel", chunk_size=32)
    monkeypatch.setenv("RTP_FORM", "recurrent")
    assert options.current().form == "recurrent"
    monkeypatch.delenv("RTP_FORM")
    monkeypatch.delenv("RTP_CHUNK_SIZE")
    assert options.current() == options.Options()
    assert options.current() == options.resolve(None)


def test_an_unknown_rtp_variable_is_a_warning_once(monkeypatch):
    """``RTP_FORMS=parallel`` (a typo of RTP_FORM) would do nothing: it is said, once."""
    monkeypatch.setattr(options, "_WARNED", set())
    env = {"RTP_FORMS": "parallel", "RTP_CACHE": "off", "RTP_FORM": "chunkwise"}
    with pytest.warns(UserWarning, match="unknown environment variable RTP_FORMS") as caught:
        assert options.from_env(env) == {"form": "chunkwise"}
    assert len(caught) == 1  # RTP_CACHE is a known variable, not an option
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        options.from_env(env)  # already said


@pytest.mark.parametrize(
    "name, value, words",
    [
        ("RTP_PROOF_MAX_GB", "abc", "must be a positive number of GiB"),
        ("RTP_PROOF_MAX_GB", "-1", "must be a positive number of GiB"),
        ("RTP_TUNE_CONFIGS", "bogus", "must be one of"),
    ],
)
def test_bad_other_variables_raise_up_front(monkeypatch, name, value, words):
    """Read deep in a stage (the mask proof, the Triton tuner), they are checked with the
    options: at compile time and at every op call, never swallowed by the backend's fallback."""
    import torch
    import torch._inductor.compile_fx as cfx
    from test_backend import Retention, inputs

    from rtpcompile import ops

    monkeypatch.setattr(cfx, "compile_fx", lambda gm, example_inputs, **kw: gm.forward)
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"environment variable {name} {words}"):
        options.resolve(None)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=f"{name} {words}"):
        torch.compile(Retention(), backend="rtp")(*inputs(8))
    torch._dynamo.reset()
    monkeypatch.setenv("RTP_AUTOTUNE", "1")  # NOTE: on aten the tuner never reads the space
    monkeypatch.setenv("RTP_CACHE", "off")
    with pytest.raises(ValueError, match=f"{name} {words}"):
        ops.retention(*inputs(8), 0.9)
    monkeypatch.setenv(name, "1" if name == "RTP_PROOF_MAX_GB" else "quick")
    options.resolve(None)


def test_rtp_log_applies_at_an_op_call(monkeypatch):
    """``RTP_LOG`` was applied at a compile or explain only: an eager call that autotuned, and
    ``rtpcompile tune``, logged nothing with ``RTP_LOG=info`` (found 2026-11-25)."""
    import logging

    from rtpcompile import options

    log = logging.getLogger("rtpcompile")
    saved = log.level, list(log.handlers)
    monkeypatch.setenv("RTP_LOG", "info")
    options._current_for.cache_clear()
    try:
        log.setLevel(logging.WARNING)
        assert options.current().log == "info"
        assert log.level == logging.INFO and log.handlers
    finally:
        log.setLevel(saved[0])
        for handler in [h for h in log.handlers if h not in saved[1]]:
            log.removeHandler(handler)
        options._current_for.cache_clear()
