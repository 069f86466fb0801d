"""The benchmark harness: statistics, the interleaved timer, result schema, markdown, a tiny run."""

from __future__ import annotations

import json

import pytest

from rtpcompile.bench import memory, op_suite, report, stats, writers
from rtpcompile.bench.report import Record
from rtpcompile.cli import build_parser


def test_summarize_median_quartiles_spread():
    st = stats.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (st.median, st.p25, st.p75, st.min, st.max, st.n) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert st.spread == pytest.approx(2.0 / 3.0)
    even = stats.summarize([1.0, 2.0, 3.0, 4.0])
    assert even.median == 2.5 and even.p25 == pytest.approx(1.75)
    assert stats.summarize([2.0]).spread == 0.0


def test_summarize_and_quantile_reject_bad_input():
    with pytest.raises(ValueError, match="at least one sample"):
        stats.summarize([])
    with pytest.raises(ValueError, match=r"q must be in \[0, 1\]"):
        stats.quantile([1.0], 1.5)


def test_interleaved_rotates_order_and_reports_errors():
    calls = []

    def make(name):
        return lambda: calls.append(name)

    def broken():
        raise MemoryError("too big")

    fns = {"a": make("a"), "b": make("b"), "c": broken}
    result, errors = stats.interleaved(fns, reps=3, warmup=1, min_sample_s=0.0)
    assert set(result) == {"a", "b"} and result["a"].n == 3
    assert errors == {"c": "MemoryError: too big"}
    timed = calls[2:]  # after one warm-up call each
    assert timed[:2] == ["a", "b"] and timed[2:4] == ["b", "a"]
    with pytest.raises(ValueError, match="reps"):
        stats.interleaved(fns, reps=0)


def test_interleaved_calibrates_the_calls_per_sample(monkeypatch):
    """The warm-up call sets a first count (4 ms: 5 calls for 20 ms); a calibration sample of
    that many calls sets the count used (0.25 ms a call: 80), so a slow first call does not make
    1 ms samples. A call slower than the sample length needs no calibration."""
    per_call = iter([0.004, 0.00025] + [0.00025] * 3 + [0.05] * 4)
    counts = []

    def fake(fn, number, sync):
        counts.append(number)
        return next(per_call)

    monkeypatch.setattr(stats, "_time_once", fake)
    result, _ = stats.interleaved({"fast": lambda: None}, reps=3)
    assert counts == [1, 5, 80, 80, 80] and result["fast"].number == 80
    counts.clear()
    result, _ = stats.interleaved({"slow": lambda: None}, reps=3)
    assert counts == [1, 1, 1, 1] and result["slow"].number == 1


def _records():
    t = stats.summarize([0.010, 0.012, 0.011])
    return [
        Record("op-fwd", "chunkwise", 512, time=t, memory_bytes=3 * 2**20),
        Record("op-fwd", "naive-eager", 512, time=t, memory_bytes=2**30),
        Record("op-fwd", "naive-eager", 1024, status="skipped", note="predicted 30 s per call"),
        Record("op-fwd", "chunkwise", 1024, status="error", note="RuntimeError: boom"),
    ]


def test_json_round_trip_and_schema_errors():
    env = {"date": "2026-01-01T00:00:00+00:00", "device": "cpu", "torch": "2.13"}
    doc = json.loads(json.dumps(report.to_json(env, {"reps": 3}, _records())))
    report.validate(doc)
    assert doc["records"][0]["time"]["median"] == pytest.approx(0.011)
    assert doc["records"][2]["time"] is None and doc["records"][2]["status"] == "skipped"
    back = report.from_json(doc)
    assert back[0].time == _records()[0].time and back[2].note == "predicted 30 s per call"
    bad = dict(doc, records=[dict(doc["records"][0], status="weird")])
    with pytest.raises(ValueError, match="status must be one of"):
        report.validate(bad)
    with pytest.raises(ValueError, match="schema must be"):
        report.validate(dict(doc, schema="other"))
    with pytest.raises(ValueError, match="env is missing 'torch'"):
        report.validate(dict(doc, env={"date": "x", "device": "cpu"}))


def test_markdown_pivot_tables():
    recs = _records()
    assert report.pivot(recs, "op-fwd", "time").splitlines() == [
        "| T | chunkwise | naive-eager |",
        "| :--- | ---: | ---: |",
        "| 512 | 11 ms ±5% | 11 ms ±5% |",
        "| 1024 | error | skip |",
    ]
    mem = report.pivot(recs, "op-fwd", "memory").splitlines()
    assert mem[2] == "| 512 | 3 MiB | 1 GiB |"
    assert report.notes(recs) == [
        "op-fwd / naive-eager / T=1024: predicted 30 s per call",
        "op-fwd / chunkwise / T=1024: RuntimeError: boom",
    ]


def test_memory_table_has_no_rows_of_unmeasured_lengths():
    """Memory is measured at some lengths only: a length where a variant ran without a memory
    measurement (its skips are time skips) gets no row of blank cells; an all-skip one stays."""
    t = stats.summarize([0.010, 0.012, 0.011])
    recs = _records() + [
        Record("op-fwd", "chunkwise", 2048, time=t),  # timed, memory not measured
        Record("op-fwd", "naive-eager", 2048, status="skipped", note="too slow"),
    ]
    rows = report.pivot(recs, "op-fwd", "memory").splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| 512", "| 1024"]


def test_formatting_units():
    assert report.fmt_seconds(2.5e-5) == "25 µs"
    assert report.fmt_seconds(0.1234) == "123 ms"
    assert report.fmt_seconds(3.0) == "3 s"
    assert report.fmt_bytes(512) == "512 B" and report.fmt_bytes(1536) == "1.5 KiB"
    text = report.text_table(["a", "bb"], [["x", "1"], ["yy", "22"]]).splitlines()
    assert text[0] == "  a   bb" and text[3] == "  yy  22"


def test_skip_rule_predicts_time_and_memory():
    cfg = op_suite.OpConfig(max_call_s=1.0, max_mem_gb=0.001)
    variants = {v.name: v for v in op_suite.build("cpu")[0]}
    quad, lin = variants["naive-eager"], variants["chunkwise"]
    assert "T x T buffers" in op_suite._skip_reason(cfg, quad, 4096, None)
    cfg = op_suite.OpConfig(max_call_s=1.0)
    assert "predicted" in op_suite._skip_reason(cfg, lin, 4096, (1024, 0.3))
    assert op_suite._skip_reason(cfg, lin, 2048, (1024, 0.3)) == ""


def test_tiny_op_run_writes_valid_files(tmp_path):
    cfg = op_suite.OpConfig(
        lengths=(32, 64), reps=1, warmup=1, memory=False, heads=2, k_dim=16, v_dim=16,
        variants=("naive-eager", "parallel", "chunkwise", "auto", "sdpa"),
    )  # fmt: skip
    records, notes = op_suite.run(cfg, log=lambda _: None)
    assert len(records) == 2 * 2 * 5 and all(r.status == "ok" for r in records)
    env = {"date": "2026-01-01T00:00:00+00:00", "device": "cpu", "device_name": "cpu",
           "torch": "x", "threads": 1, "python": "3"}  # fmt: skip
    paths = writers.write_suite(tmp_path, "op", env, {"reps": 1}, records, notes, "cmd", plot=False)
    assert {p.name for p in paths} == {"op.json", "op.md"}
    report.validate(json.loads((tmp_path / "op.json").read_text()))
    md = (tmp_path / "op.md").read_text()
    assert "| T | naive-eager | parallel | chunkwise | auto | sdpa |" in md
    assert "reproduce: `cmd`" in md


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown or unavailable op variant"):
        op_suite.run(op_suite.OpConfig(variants=("nope",)))
    with pytest.raises(ValueError, match="unknown mode"):
        op_suite.OpConfig(modes=("sideways",))


def test_cpu_memory_worker_reads_a_peak():
    spec = {"variant": "naive-eager", "mode": "fwd", "T": 512, "B": 1, "H": 4, "K": 16, "V": 16}
    peak, err = memory.subprocess_peak(spec, timeout_s=120)
    assert err == "" and peak is not None
    assert peak >= 4 * 512 * 512 * 4  # at least one [H, T, T] float32 buffer


def test_bench_command_is_registered():
    args = build_parser().parse_args(["bench", "--quick", "--suite", "op", "--lengths", "64"])
    assert args.quick and args.suite == ["op"] and args.lengths == [64]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--suite", "nope"])


def test_model_level_presets_and_lengths():
    """--model retnet is the issue's RetNet shape; --train-lengths reaches the model suite."""
    from rtpcompile.bench import models
    from rtpcompile.commands.bench import model_config

    argv = ["bench", "--suite", "model", "--model", "retnet", "--train-lengths", "4096"]
    cfg = model_config(build_parser().parse_args([*argv, "--prefill-lengths", "1024"]), "cuda")
    assert cfg.train_lengths == (4096,) and cfg.prefill_lengths == (1024,)
    base = cfg.base
    assert (base.dim, base.num_layers, base.ratio) == (1024, 12, 1.0)
    assert base.dim // base.num_heads == 128
    assert model_config(build_parser().parse_args(["bench"]), "cpu").base is None
    assert model_config(build_parser().parse_args(["bench", "--no-decode"]), "cpu").contexts == ()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--model", "gpt"])
    with pytest.raises(ValueError, match="benchmark model must be one of"):
        models.model_preset("gpt")


def test_tiny_model_run_records_times(monkeypatch):
    """The model suite end to end on a tiny model (CPU: no peak memory, CUDA only)."""
    from rtpcompile.bench import model_suite
    from rtpcompile.bench.models import tiny_config

    cfg = model_suite.ModelConfig(
        base=tiny_config(), backends=("eager",), prefill_lengths=(16,), train_lengths=(16,),
        contexts=(), reps=1,
    )  # fmt: skip
    records = model_suite.run(cfg, log=lambda line: None)
    assert {(r.bench, r.status) for r in records} == {
        ("model-prefill", "ok"),
        ("model-train", "ok"),
    }
    assert all(r.memory_bytes is None for r in records)
