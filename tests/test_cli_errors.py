"""Bad command-line input: one argparse-style error line and exit code 2, never a traceback."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from rtpcompile import cli
from rtpcompile.kernels import cache
from rtpcompile.lowering import plan


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RTP_CACHE", raising=False)
    cache._reported.clear()
    plan.reset()
    yield tmp_path / "cache"
    plan.reset()


def _usage_error(capsys, argv: list[str]) -> str:
    """The error line of a command line argparse rejects (exit code 2)."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["bench", "--dtype", "banana"], "invalid choice: 'banana'"),
        (["bench", "--heads", "0"], "--heads: expected a positive integer, got '0'"),
        (["bench", "--reps", "0"], "--reps: expected a positive integer, got '0'"),
        (["bench", "--batch", "-1"], "--batch: expected a positive integer, got '-1'"),
        (["bench", "--max-call-s", "0"], "--max-call-s: expected a positive number, got '0'"),
        (["bench", "--threads", "0"], "--threads: expected a positive integer, got '0'"),
        (["demo", "--decode-tokens", "0"], "expected a positive integer, got '0'"),
        (["demo", "--threads", "0"], "--threads: expected a positive integer, got '0'"),
        (["demo", "--reps", "0"], "--reps: expected a positive integer, got '0'"),
        (["tune", "--shape", "1,2,40,16", "--device", "foo"], "expected cpu, cuda or cuda:N"),
        (["tune", "--shape", "1,2,40,16", "--device", "meta"], "got 'meta'"),
        (["tune", "--shape", "1,2,40,16", "--threads", "0"], "expected a positive integer"),
        (["bench", "--device", "meta"], "expected cpu, cuda or cuda:N, got 'meta'"),
        (["export", "--heads", "0"], "--heads: expected a positive integer, got '0'"),
        (["export", "--seq-len", "0"], "--seq-len: expected a positive integer, got '0'"),
        (["export", "--position", "0"], "--position: expected a positive integer, got '0'"),
        (["export", "--batch", "0"], "--batch: expected a positive integer, got '0'"),
    ],
)
def test_bad_values_are_usage_errors(capsys, argv, expected):
    assert expected in _usage_error(capsys, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["demo", "--tiny"], ["bench"], ["tune", "--shape", "1,2,8,8"]])
def test_cuda_without_a_cuda_device(capsys, command):
    line = _usage_error(capsys, [*command, "--device", "cuda"])
    assert "expected cpu (no CUDA device is available here), got 'cuda'" in line


def test_unknown_bench_variant(capsys, tmp_path):
    argv = ["bench", "--suite", "op", "--variants", "foo", "--out", str(tmp_path / "b")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rtpcompile bench: error: --variants") and "['foo']" in err
    assert "chunkwise" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "suite, flag",
    [
        ("model", ["--variants", "auto"]),
        ("model", ["--lengths", "64"]),
        ("model", ["--dtype", "float16"]),
        ("model", ["--heads", "2"]),
        ("model", ["--memory-lengths", "64"]),
        ("model", ["--no-memory"]),
        ("op", ["--model", "retnet"]),
        ("op", ["--prefill-lengths", "64"]),
        ("op", ["--no-decode"]),
    ],
)
def test_one_suite_bench_flags_with_the_other_suite_are_refused(capsys, tmp_path, suite, flag):
    """Were silently ignored (all but --variants/--lengths until 2026-11-24): the benchmark
    started without the flag's effect."""
    other = "op" if suite == "model" else "model"
    argv = ["bench", "--suite", suite, *flag, "--out", str(tmp_path / "b")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"{flag[0]} applies to the {other} suite only (add --suite {other})" in err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--heads", "3", "--dim", "64"], "model size flags: dim must be divisible"),
        (["--ratio", "2"], "model size flags: ratio"),
    ],
)
def test_export_argument_errors_are_usage_errors(capsys, flags, message):
    """Sizes that do not fit together exited with code 1 like a failed export."""
    assert cli.main(["export", "--program", *flags]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("rtpcompile export: error:") and message in err


def test_export_summary_skips_weights_and_explains_a_width_equal_to_t(capsys):
    argv = ["export", "--program", "--dim", "16", "--heads", "2", "--layers", "1"]
    assert cli.main([*argv, "--seq-len", "16", "--chunk-size", "8"]) == 0
    err = capsys.readouterr().err
    assert "T x T tensors (T=16)" in err and "equals a model width" in err
    assert "p_" not in err.split("T x T tensors")[1].split("\n")[0]  # no parameter listed
    assert cli.main([*argv, "--seq-len", "24", "--chunk-size", "8"]) == 0
    assert "T x T tensors (T=24): 0 []" in capsys.readouterr().err


def test_export_checkpoint_errors(capsys, tmp_path):
    assert cli.main(["export", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot read" in err and "nope.pt" in err and len(err.splitlines()) == 1
    state_dict = tmp_path / "sd.pt"
    torch.save({"w": torch.zeros(2)}, state_dict)
    assert cli.main(["export", "--checkpoint", str(state_dict)]) == 2
    err = capsys.readouterr().err
    assert "expected a torch.save'd RTPHybridLM, got a dict (a state dict?" in err
    for text in (b"not a checkpoint", b"garbage\n"):  # "g" is a pickle opcode: a ValueError
        garbage = tmp_path / "garbage.pt"
        garbage.write_bytes(text)
        assert cli.main(["export", "--checkpoint", str(garbage)]) == 2
        assert "did not load" in capsys.readouterr().err


def test_export_into_a_missing_folder(capsys, tmp_path):
    target = tmp_path / "missing" / "x.mlir"
    assert cli.main(["export", "--program", "--seq-len", "8", "-o", str(target)]) == 2
    assert "expected a file in an existing folder" in capsys.readouterr().err


def test_bench_help_keeps_its_example_lines(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert any(line.startswith("rtpcompile bench --quick") for line in lines)


def test_tune_threads_sets_the_thread_count_of_the_key(capsys):
    before = torch.get_num_threads()
    n = 2 if before == 1 else 1  # NOTE: one the process does not already run (make test: 1)
    try:
        assert cli.main(["tune", "--shape", "1,2,40,8", "--threads", str(n)]) == 0
        assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(before)
    [(_, _, entry)] = cache.entries()
    assert entry["key"]["capability"].endswith(f"/{n}threads")


# ----------------------------------------------------------------------------- cache commands


def _entry(**spec) -> tuple[dict, dict]:
    key = {
        "version": cache.FORMAT_VERSION, "source": "s", "device": "cpu0", "capability": "x/2t",
        "spec": {"op": "retention", "phase": "fwd", "backend": "aten", "K": 8, "V": 8,
                 "state_in": False, "state_out": True, "request": "auto", "chunk": 0, **spec},
        "torch": "2.13", "triton": "3.9", "dtype": "float32", "bucket": {"T": 64, "BH": 2},
    }  # fmt: skip
    value = {"form": "chunkwise", "chunk_size": 16, "config": {}, "time_ms": 1.0, "timings": {}}
    return key, value


def test_cache_list_tells_entries_apart(capsys):
    variants = [{}, {"state_out": False}, {"request": "chunkwise"}, {"chunk": 32}]
    for spec in variants:
        key, value = _entry(**spec)
        cache.store(key, {**value, "chunk_size": spec.get("chunk", 16)})
    assert cli.main(["cache", "list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summaries = [line.split("  ", 1)[1] for line in lines]
    assert len(set(summaries)) == len(variants)
    text = "\n".join(summaries)
    assert "no-state-out" in text and "request=chunkwise" in text and "chunk=32" in text


@pytest.mark.parametrize("action", [["list"], ["clear"], ["path"], ["show", "x"]])
def test_cache_commands_reject_a_bad_rtp_cache(capsys, monkeypatch, action):
    monkeypatch.setenv("RTP_CACHE", "sometimes")
    assert cli.main(["cache", *action]) == 2
    err = capsys.readouterr().err
    assert "RTP_CACHE must be one of ['on', 'off', 'readonly']" in err and "'sometimes'" in err


def test_cache_import_into_an_unwritable_directory_fails(capsys, tmp_path, monkeypatch):
    cache.store(*_entry())
    exported = tmp_path / "x.json"
    assert cli.main(["cache", "export", str(exported)]) == 0
    assert len(json.loads(exported.read_text())["entries"]) == 1
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path / "a-file"))
    capsys.readouterr()
    assert cli.main(["cache", "import", str(exported)]) == 1
    assert "cannot write to the cache directory" in capsys.readouterr().err


def test_cache_import_of_a_deeply_nested_file(capsys, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert cli.main(["cache", "import", str(deep)]) == 1
    assert "nested too deeply" in capsys.readouterr().err


def test_commands_run_from_code_check_the_device_too():
    import argparse

    from rtpcompile.commands import _common, tune

    args = argparse.Namespace(shape=[(1, 1, 8, 8, 8)], dtype="float32", device="meta")
    with pytest.raises(_common.UsageError, match="expected cpu, cuda or cuda:N, got 'meta'"):
        tune.run(args)
    with pytest.raises(_common.UsageError, match="got 'meta'"):
        _common.prepare(argparse.Namespace(threads=None, device="meta"))


# ----------------------------------------------------------------------------- tune must store


@pytest.mark.parametrize("mode", ["off", "readonly", "a-file"])
def test_tune_that_cannot_store_fails_before_benchmarking(capsys, tmp_path, monkeypatch, mode):
    """Was exit code 0 and "(autotuned)" with nothing stored."""
    if mode == "a-file":
        (tmp_path / "a-file").write_text("")
        monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path / "a-file"))
    else:
        monkeypatch.setenv("RTP_CACHE", mode)
    assert cli.main(["tune", "--shape", "1,2,40,8"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and plan.counters["benchmarks"] == 0
    expected = "cannot write to" if mode == "a-file" else f"RTP_CACHE='{mode}' never writes"
    assert err.startswith("rtpcompile tune: cannot store tuned plans:") and expected in err
    assert len(err.strip().splitlines()) == 1


def test_tune_reports_a_winner_it_could_not_store(capsys, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache, "_write_atomic", full_disk)
    with pytest.warns(RuntimeWarning, match="No space left"):
        assert cli.main(["tune", "--shape", "1,2,40,8", "--final-state", "yes"]) == 1
    out, err = capsys.readouterr()
    assert "(autotuned), NOT STORED" in out
    assert "1 tuned plan(s) could not be stored in" in err


def test_tune_with_a_bad_rtp_cache_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setenv("RTP_CACHE", "sometimes")
    assert cli.main(["tune", "--shape", "1,2,40,8"]) == 2
    assert "RTP_CACHE must be one of ['on', 'off', 'readonly']" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("RTP_FORM", "bogus", "RTP_FORM: option 'form' must be one of"),
        ("RTP_TUNE_CONFIGS", "huge", "RTP_TUNE_CONFIGS must be one of"),
        ("RTP_PROOF_MAX_GB", "-1", "RTP_PROOF_MAX_GB must be a positive number"),
    ],
)
def test_tune_with_any_bad_rtp_value_is_a_usage_error(
    capsys, monkeypatch, variable, value, message
):
    """Only RTP_CACHE was: the others ended in a traceback from the first benchmark."""
    monkeypatch.setenv(variable, value)
    assert cli.main(["tune", "--shape", "1,2,40,8"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["bench", "--suite", "op", "--lengths", "16"], ["demo"]])
def test_bench_and_demo_with_a_bad_rtp_value_stop_before_running(capsys, monkeypatch, command):
    """bench ran every variant, each failing on the value, wrote the baselines and exited 0."""
    monkeypatch.setenv("RTP_FORM", "bogus")
    assert cli.main(command) == 2
    err = capsys.readouterr().err
    assert "RTP_FORM: option 'form' must be one of" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--position", "500"], "--position 500 applies to --form recurrent only"),
        (["--program", "--dialect", "tosa"], "--dialect tosa does not apply to --program"),
        (
            ["--form", "parallel", "--chunk-size", "8"],
            "--chunk-size 8 applies to --form chunkwise only",
        ),
        (
            ["--form", "recurrent", "--seq-len", "1", "--chunk-size", "8"],
            "--chunk-size 8 applies to --form chunkwise only",
        ),
    ],
)
def test_export_flags_that_do_not_apply_are_usage_errors(capsys, flags, message):
    """Both were ignored: the output was byte-identical to the export without them."""
    seq = [] if "--seq-len" in flags else ["--seq-len", "16"]
    assert cli.main(["export", *seq, *flags]) == 2
    assert message in capsys.readouterr().err


def test_cache_commands_with_an_unexpandable_cache_dir_are_usage_errors(capsys, monkeypatch):
    """``RTP_CACHE_DIR=~nosuchuser/x`` was a RuntimeError traceback from ``Path.expanduser`` in
    ``cache path``/``list`` and at every eager op call (found 2026-11-26)."""
    monkeypatch.setenv("RTP_CACHE_DIR", "~nosuchuser_rtp/x")
    assert cli.main(["cache", "path"]) == 2
    assert "cannot use '~nosuchuser_rtp/x' as a cache directory" in capsys.readouterr().err
    from rtpcompile import options

    with pytest.raises(ValueError, match="RTP_CACHE_DIR must be a directory path"):
        options.check_variables({"RTP_CACHE_DIR": "~nosuchuser_rtp/x"})


def test_a_bad_eager_bypass_value_fails_up_front(monkeypatch):
    """``RTP_EAGER_BYPASS=maybe`` passed compiles and ``tune`` and failed only at an eager call."""
    from rtpcompile import options

    with pytest.raises(ValueError, match="RTP_EAGER_BYPASS must be a boolean"):
        options.check_variables({"RTP_EAGER_BYPASS": "maybe"})
    options.check_variables({"RTP_EAGER_BYPASS": "off"})


def test_a_failed_write_of_the_output_is_one_line(capsys, monkeypatch):
    """``cache path >/dev/full`` printed an OSError traceback."""

    class Full:
        def write(self, text):
            raise OSError(28, "No space left on device")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Full())
    assert cli.main(["cache", "path"]) == 1
    assert "rtpcompile cache: error: [Errno 28] No space left on device" in capsys.readouterr().err
