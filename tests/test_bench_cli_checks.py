"""``rtpcompile bench`` / ``demo``: honest result files and input checks made before a long run.

Each test names the fault it guards against (found 2026-11-25): result files without the RTP_*
settings, an unwritable --out found after the run, error notes that lost their cause, empty
--variants meaning "all", a partial run replacing a recorded sweep, --memory-lengths that
measured nothing, memory-table columns in another order than the time table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import pytest

from rtpcompile import cli
from rtpcompile.bench import env as bench_env
from rtpcompile.bench import optional, plots, report, writers
from rtpcompile.bench.report import Record
from rtpcompile.bench.stats import Stats, error_text
from rtpcompile.commands import bench as bench_cmd
from rtpcompile.kernels import cache
from rtpcompile.lowering import plan

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TINY = ["bench", "--suite", "op", "--lengths", "24", "--variants", "chunkwise", "--modes", "fwd",
        "--no-memory", "--no-plot", "--reps", "1", "--threads", "1"]  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    for name in [k for k in os.environ if k.startswith("RTP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path / "cache"))
    cache._reported.clear()
    plan.reset()
    yield
    plan.reset()


@pytest.fixture
def no_runs(monkeypatch):
    """A command line that must be refused must not start measuring (were it accepted, the
    test fails at once instead of running a sweep)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the benchmark started")

    monkeypatch.setattr(bench_cmd.op_suite, "run", refuse)
    monkeypatch.setattr(bench_cmd.model_suite, "run", refuse)


def _usage_error(capsys, argv: list[str]) -> str:
    """The one stderr line of a command refused with exit code 2 (argparse or UsageError)."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


# -- 1. the RTP_* settings and the autotune cache are recorded ---------------------------------


def test_env_block_records_rtp_variables_and_the_autotune_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RTP_FORM", "recurrent")
    monkeypatch.setenv("RTP_CHUNK_SIZE", "32")
    monkeypatch.setenv("RTP_CACHE", "readonly")
    env = bench_env.describe("cpu")
    assert env["rtp_env"] == {
        "RTP_CACHE": "readonly",
        "RTP_CACHE_DIR": str(tmp_path / "cache"),
        "RTP_CHUNK_SIZE": "32",
        "RTP_FORM": "recurrent",
    }
    assert env["autotune_cache"] == {"mode": "readonly", "dir": str(cache.directory())}
    text = "\n".join(writers.env_lines(env))
    assert "RTP_FORM='recurrent'" in text and "RTP_CHUNK_SIZE='32'" in text
    assert f"autotune cache: readonly, {cache.directory()}" in text


def test_env_block_says_when_no_rtp_variable_is_set(monkeypatch):
    monkeypatch.delenv("RTP_CACHE_DIR")
    env = bench_env.describe("cpu")
    assert env["rtp_env"] == {} and env["autotune_cache"]["mode"] == "on"
    assert "- RTP_* environment: none set" in writers.env_lines(env)


def test_bench_files_record_the_settings_and_plan_sources(monkeypatch, tmp_path, capsys):
    """Before: RTP_FORM=recurrent changed what naive-rtp ran and neither file said so."""
    monkeypatch.setenv("RTP_CHUNK_SIZE", "16")
    out = tmp_path / "b"
    assert cli.main([*TINY, "--out", str(out)]) == 0
    doc = json.loads((out / "op.json").read_text())
    assert doc["env"]["rtp_env"]["RTP_CHUNK_SIZE"] == "16"
    assert doc["env"]["autotune_cache"]["dir"] == str(cache.directory())
    assert set(doc["env"]["plan_sources"]) >= {"cache_hits", "tunings", "model"}
    md = (out / "op.md").read_text()
    assert "RTP_CHUNK_SIZE='16'" in md and "autotune cache: on," in md
    assert "reproduce: `RTP_CACHE_DIR=" in md and "RTP_CHUNK_SIZE=16 rtpcompile bench" in md


# -- 2. an unusable output path is a usage error before anything runs -------------------------


def test_unwritable_bench_out_is_refused_up_front(capsys, tmp_path, no_runs):
    afile = tmp_path / "afile"
    afile.write_text("")
    line = _usage_error(capsys, [*TINY, "--out", str(afile / "sub")])
    assert line.startswith("rtpcompile bench: error: --out: expected a folder")
    assert f"{str(afile)!r} is a file" in line
    line = _usage_error(capsys, [*TINY, "--out", str(afile)])
    assert "--out: expected a folder" in line


@pytest.mark.parametrize("where", ["under-a-file", "a-folder"])
def test_unwritable_demo_plot_is_refused_up_front(capsys, tmp_path, where):
    afile = tmp_path / "afile"
    afile.write_text("")
    target = afile / "x.png" if where == "under-a-file" else tmp_path
    argv = ["demo", "--tiny", "--no-train", "--lengths", "16", "--backends", "eager"]
    line = _usage_error(capsys, [*argv, "--plot", str(target)])
    assert line.startswith("rtpcompile demo: error: --plot: expected a file name")


def test_output_checks_accept_folders_still_to_be_made(tmp_path):
    from rtpcompile.commands._common import check_output_file, check_output_folder

    check_output_folder(tmp_path / "new" / "deeper", "--out")
    check_output_file(tmp_path / "new" / "plot.png", "--plot")


# -- 3. error notes keep their cause; a run where everything failed exits 1 --------------------


def test_error_text_keeps_the_cause_of_a_wrapper_exception():
    exc = RuntimeError(
        "backend='rtp' raised:\nValueError: environment variable RTP_FORM: bad\n\n"
        "Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace"
    )
    text = error_text(exc)
    assert text == (
        "RuntimeError: backend='rtp' raised: ValueError: environment variable RTP_FORM: bad"
    )
    try:
        try:
            raise KeyError("the root cause")
        except KeyError as inner:
            raise RuntimeError("wrapper") from inner
    except RuntimeError as outer:
        assert error_text(outer) == "RuntimeError: wrapper (caused by KeyError: 'the root cause')"
    assert error_text(ValueError("one line\nsecond")) == "ValueError: one line"
    assert error_text(ValueError()) == "ValueError: "


def test_bench_exits_1_when_every_measurement_failed(monkeypatch, tmp_path, capsys):
    """A planner that fails makes every rtp call fail: the files are written, the exit code
    says. (A bad RTP_* value did this until 2026-11-25; it is now a usage error up front.)"""
    from rtpcompile.lowering import plan

    def broken(*args, **kwargs):
        raise ValueError("no plan today")

    monkeypatch.setattr(plan, "plan_for", broken)
    out = tmp_path / "b"
    assert cli.main([*TINY, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "warning: op / chunkwise failed at every length: ValueError" in err
    assert "error: every measurement of the op suite failed" in err
    assert "no plan today" in (out / "op.md").read_text()


# -- 4. empty --variants is a usage error ------------------------------------------------------


@pytest.mark.parametrize("text", ["", ",", " , "])
def test_empty_variants_is_a_usage_error(capsys, tmp_path, no_runs, text):
    argv = ["bench", "--suite", "op", "--variants", text, "--out", str(tmp_path / "b")]
    line = _usage_error(capsys, argv)
    assert "--variants: expected variant names like chunkwise,auto" in line


# -- 5. the default output folder does not replace a recorded sweep ----------------------------


def _parsed(argv: list[str]) -> argparse.Namespace:
    return cli.build_parser().parse_args(argv)


def test_default_out_refuses_to_replace_a_recorded_result(capsys, tmp_path, no_runs, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recorded = tmp_path / "benchmarks" / "results" / "cpu" / "op.json"
    recorded.parent.mkdir(parents=True)
    recorded.write_text("{}")
    line = _usage_error(capsys, [*TINY, "--device", "cpu"])
    assert "benchmarks/results/cpu/op.json exists (a recorded result)" in line
    assert "--out FOLDER" in line and "--force" in line
    assert recorded.read_text() == "{}"
    # --force, an explicit --out, or a --quick run (its own folder) pass the check
    for extra in (["--force"], ["--out", "benchmarks/results/cpu"], ["--quick"]):
        args = _parsed([*TINY, "--device", "cpu", *extra])
        assert bench_cmd._output_folder(args, "cpu").name in ("cpu", "cpu-quick")
    # the model suite's file is not op.json: a model-only run is not refused
    args = _parsed(["bench", "--suite", "model", "--device", "cpu"])
    assert bench_cmd._output_folder(args, "cpu") == Path("benchmarks/results/cpu")


# -- 6. --memory-lengths must be timed lengths ------------------------------------------------


def test_memory_lengths_outside_lengths_is_a_usage_error(capsys, tmp_path, no_runs):
    argv = ["bench", "--suite", "op", "--lengths", "64", "--memory-lengths", "128,64"]
    line = _usage_error(capsys, [*argv, "--out", str(tmp_path / "b")])
    assert "--memory-lengths 128 not among the op lengths 64" in line
    line = _usage_error(capsys, [*argv[:-1], "64", "--no-memory", "--out", str(tmp_path / "b")])
    assert "--memory-lengths does nothing with --no-memory" in line
    line = _usage_error(capsys, ["bench", "--suite", "op", "--quick", "--memory-lengths", "512"])
    assert "not among the op lengths 256,1024,4096" in line
    assert not (tmp_path / "b").exists()


# -- 8. help texts, memory table order, plots, the CPU backend script --------------------------


def test_every_bench_option_has_a_help_text_and_reps_defaults_are_right():
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices["bench"]
    missing = [a.dest for a in parser._actions if not a.help]
    assert missing == []
    reps = next(a for a in parser._actions if a.dest == "reps").help
    assert "model level 3" in reps and "--quick: 3 and 2" in reps


def _st(t: float) -> Stats:
    return Stats(median=t, p25=t, p75=t, min=t, max=t, n=1)


def test_memory_table_columns_follow_the_time_table():
    """A variant skipped at the memory length used to move to the front of the memory table
    (skipped records are written before the measured ones of that length)."""
    recs = [
        Record("op-fwd", "a", 64, time=_st(1e-3)),
        Record("op-fwd", "b", 64, time=_st(2e-3)),
        Record("op-fwd", "b", 128, status="skipped", note="too slow"),
        Record("op-fwd", "a", 128, time=_st(2e-3), memory_bytes=2048),
    ]
    time_head = report.pivot(recs, "op-fwd", "time").splitlines()[0]
    mem_head = report.pivot(recs, "op-fwd", "memory").splitlines()[0]
    assert time_head == mem_head == "| T | a | b |"


@pytest.mark.skipif(optional.pyplot() is None, reason="needs matplotlib")
def test_plot_styles_are_stable_and_single_points_have_no_line(tmp_path):
    recs = [
        Record("op-fwd", "a", 64, time=_st(1e-3), memory_bytes=10),
        Record("op-fwd", "b", 64, time=_st(2e-3)),
        Record("op-fwd", "b", 128, time=_st(4e-3), memory_bytes=30),
        Record("op-fwd", "a", 128, time=_st(2e-3), memory_bytes=20),
    ]
    styles = plots._styles(recs)
    assert list(styles) == ["a", "b"] and styles["a"] != styles["b"]
    plt = optional.pyplot()
    fig, ax = plt.subplots()
    series = plots._series(recs, "op-fwd", lambda r: r.memory_bytes)
    assert list(series) == ["a", "b"] and series["b"] == ([128], [30])
    plots._panel(ax, series, "memory", "bytes", styles=styles)
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert lines["a"].get_linestyle() == "-" and lines["b"].get_linestyle() == "None"
    assert lines["b"].get_color() == styles["b"]["color"]
    plt.close(fig)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--variants", "eager,foo"], "argument --variants: expected some of"),
        (["--variants", ","], "argument --variants: expected some of"),
        (["--models", "stak"], "argument --models: expected some of ['stack', 'demo']"),
        (["--T", "0"], "argument --T: expected positive integers"),
        (["--T", "x"], "argument --T: expected positive integers"),
    ],
)
def test_cpu_backend_script_checks_its_names(capsys, tmp_path, argv, expected):
    bench = _script("bench_backend_cpu")
    with pytest.raises(SystemExit) as info:
        bench.main([*argv, "--out-dir", str(tmp_path / "o")])
    assert info.value.code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_error_text_keeps_a_cause_after_a_long_first_line_and_survives_a_cycle():
    from rtpcompile.bench.stats import error_text

    try:
        try:
            raise ValueError("the real reason")
        except ValueError as inner:
            raise RuntimeError("x" * 400) from inner
    except RuntimeError as exc:
        text = error_text(exc)
    assert len(text) <= 300 and "ValueError: the real reason" in text, text
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    assert error_text(a) == "RuntimeError: a (caused by RuntimeError: b)"
    try:
        raise RuntimeError("lookup failed") from KeyError()
    except RuntimeError as exc:
        assert "KeyError" in error_text(exc)


def test_the_reproduce_line_quotes_values_as_assignments(monkeypatch):
    """``'RTP_CACHE_DIR=/a b' rtpcompile ...`` is a command name to bash, not an assignment; and
    TRITON_INTERPRET is part of what a CPU Triton run needs."""
    import subprocess

    from rtpcompile.bench import env as bench_env
    from rtpcompile.commands.bench import reproduce_command

    monkeypatch.setenv("RTP_CACHE_DIR", "/tmp/c dir")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    recorded = bench_env.rtp_environment()
    assert recorded["TRITON_INTERPRET"] == "1"
    line = reproduce_command(recorded, ["--quick", "--out", "/tmp/x y"])
    assert "RTP_CACHE_DIR='/tmp/c dir'" in line and line.endswith("--quick --out '/tmp/x y'")
    # NOTE: a shell takes the settings as assignments: echo them instead of running bench
    probe = line.replace("rtpcompile bench", "sh -c 'echo \"$RTP_CACHE_DIR|$TRITON_INTERPRET\"'")
    shown = subprocess.run(["sh", "-c", probe], capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == "/tmp/c dir|1"
