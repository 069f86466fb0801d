"""Tool fixes of 2026-11-24: tune --form, RTP_CACHE checked up front, stale cache entries, the
export summary and size flags, Report.kernels' arguments, demo's title, the cache warning's
location, and the memory worker's malloc environment."""

from __future__ import annotations

import json
import os
import sys
import warnings

import pytest
import torch
from conftest import clean_rtp_env

from rtpcompile import ops, options
from rtpcompile.cli import main
from rtpcompile.kernels import cache
from rtpcompile.lowering import plan


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """aten, no RTP_* option from the environment, an empty cache and planner."""
    clean_rtp_env(monkeypatch, tmp_path / "cache")
    plan.reset()
    yield tmp_path
    plan.reset()


def _qkv(T, K=8, grad=False):
    torch.manual_seed(0)
    return [torch.randn(1, 2, T, K, dtype=torch.float32, requires_grad=grad) for _ in range(3)]


# ----------------------------------------------------------------------------- tune --form


def test_tune_form_chunkwise_warms_the_forced_chunkwise_calls(fresh, monkeypatch, capsys):
    """tune had no --form: ops.retention_chunkwise(q, k, v, g) plans under request=chunkwise,
    a bucket tune never wrote, and benchmarked again in deployment."""
    assert main(["tune", "--shape", "1,2,40,8", "--phase", "both", "--form", "chunkwise"]) == 0
    out = capsys.readouterr().out
    assert out.count("form chunkwise: chunkwise(C=") == 2 and "(autotuned)" in out
    plan.reset()
    monkeypatch.setenv("RTP_AUTOTUNE", "1")
    q, k, v = _qkv(40, grad=True)
    o, _ = ops.retention_chunkwise(q, k, v, ops.retention_init_decay(2))
    o.sum().backward()
    stats = plan.stats()
    assert stats["benchmarks"] == 0 and stats["cache_hits"] == 2, stats


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_tune_warms_the_calls_of_a_forced_chunk_size(fresh, monkeypatch, capsys, how):
    """A forced chunk size keys the entries (the planner still picks parallel or chunkwise at
    it): tune stored chunk-free keys only, and a deployment with RTP_CHUNK_SIZE benchmarked
    again (found 2026-11-25)."""
    monkeypatch.setenv("RTP_CHUNK_SIZE", "16")
    flags = ["--chunk-size", "16"] if how == "flag" else []
    if how == "flag":
        monkeypatch.delenv("RTP_CHUNK_SIZE")
    assert main(["tune", "--shape", "1,2,64,8", *flags]) == 0
    assert "(autotuned)" in capsys.readouterr().out
    plan.reset()
    monkeypatch.setenv("RTP_CHUNK_SIZE", "16")
    monkeypatch.setenv("RTP_AUTOTUNE", "1")
    q, k, v = _qkv(64)
    ops.retention(q, k, v, ops.retention_init_decay(2))
    stats = plan.stats()
    assert stats["benchmarks"] == 0 and stats["cache_hits"] == 1, stats


@pytest.mark.parametrize("form", ["parallel", "recurrent"])
def test_tune_forced_parallel_or_recurrent_has_nothing_to_tune(fresh, capsys, form):
    assert main(["tune", "--shape", "1,2,40,8", "--form", form]) == 0
    out = capsys.readouterr().out
    assert f"form {form}: {form} (forced, nothing to tune)" in out
    assert "0 benchmark run(s)" in out and not cache.entries()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_tune_forced_chunkwise_with_a_chunk_has_nothing_to_tune(fresh, capsys, monkeypatch, how):
    """A forced form and chunk run as given (the planner reads no entry): tune benchmarked
    other chunks and stored C=64 under the key forcing 32, which the cache then refused with a
    warning at every read (until 2026-11-25)."""
    flags = ["--chunk-size", "32"] if how == "flag" else []
    if how == "env":
        monkeypatch.setenv("RTP_CHUNK_SIZE", "32")
    assert main(["tune", "--shape", "1,2,128,16", "--form", "chunkwise", *flags]) == 0
    out = capsys.readouterr().out
    assert "chunkwise(C=32) (forced, nothing to tune)" in out
    assert "0 benchmark run(s)" in out and not cache.entries()


def test_tune_form_chunkwise_tunes_a_decoding_shape_too(fresh, capsys):
    """The decoding rule (T = 1 -> recurrent) is for form auto only: a forced chunkwise call at
    T = 1 plans (and benchmarks) chunk sizes."""
    assert main(["tune", "--shape", "1,2,1,8", "--form", "chunkwise"]) == 0
    assert "(autotuned)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- RTP_CACHE


def test_bad_rtp_cache_fails_every_call_not_by_history(fresh, monkeypatch):
    """Was checked only when the planner reached the cache: a bucket memoised earlier in the
    process ran with RTP_CACHE=bogus, a new bucket failed."""
    q, k, v = _qkv(40)
    g = ops.retention_init_decay(2)
    ops.retention(q, k, v, g)  # memoises the bucket
    monkeypatch.setenv("RTP_CACHE", "bogus")
    with pytest.raises(ValueError, match="RTP_CACHE must be one of .* got 'bogus'"):
        ops.retention(q, k, v, g)
    monkeypatch.setenv("RTP_CACHE", " RO ")
    ops.retention(q, k, v, g)


def test_check_variables_checks_rtp_cache():
    with pytest.raises(ValueError, match=r"RTP_CACHE must be one of \['on', 'off', 'readonly'\]"):
        options.check_variables({"RTP_CACHE": "sometimes"})
    for good in ("on", "off", "readonly", "ro", "1", "0", "", "True"):
        options.check_variables({"RTP_CACHE": good})


# ----------------------------------------------------------------------------- stale entries


def _tune_one(capsys) -> str:
    assert main(["tune", "--shape", "1,2,40,8"]) == 0
    capsys.readouterr()
    ((entry_id, path, entry),) = cache.entries()
    return entry_id


def _replant(entry_id: str, **changes) -> str:
    """Rewrite entry ``entry_id`` with other key fields, under its new key's id."""
    path = cache.directory() / f"{entry_id}.json"
    entry = json.loads(path.read_text())
    path.unlink()
    entry["key"].update(changes)
    new = cache.key_id(entry["key"])
    (cache.directory() / f"{new}.json").write_text(json.dumps(entry))
    return new


def test_cache_list_marks_stale_entries(fresh, capsys):
    """Entries of another rtpcompile source or torch read as if in use: no marker."""
    first = _tune_one(capsys)
    assert main(["cache", "list"]) == 0
    assert "stale" not in capsys.readouterr().out
    old = _replant(first, source="0123456789abcdef", torch="2.0.0")
    assert main(["cache", "list"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(old))
    assert line.endswith("(stale: other rtpcompile source, other torch)")
    assert main(["cache", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["stale"] for r in rows] == ["other rtpcompile source, other torch"]
    # the planner indeed never reads it
    q, k, v = _qkv(40)
    ops.retention(q, k, v, ops.retention_init_decay(2))
    assert plan.stats()["cache_hits"] == 0


def test_cache_export_counts_stale_entries(fresh, capsys):
    first = _tune_one(capsys)
    target = fresh / "out.json"
    assert main(["cache", "export", str(target)]) == 0
    assert "stale:" not in capsys.readouterr().out
    _replant(first, triton="0.0.1")
    assert main(["cache", "export", str(target)]) == 0
    out = capsys.readouterr().out
    assert "exported 1 entry" in out and "(1 stale: never read by this installation" in out
    assert len(json.loads(target.read_text())["entries"]) == 1


# ----------------------------------------------------------------------------- export


def test_export_widths_include_head_dims_and_batch():
    """_widths held the weights' sizes only: at T = K (dim 32, 2 heads: K = 16) the [B, H, T, K]
    values counted as T x T with no note."""
    from rtpcompile.commands.export import _widths
    from rtpcompile.nn import RTPHybridLM

    sizes = _widths(RTPHybridLM(64, 32, 1, 2, ratio=1.0), 3)
    assert {16, 32, 2, 3} <= sizes  # K, V, the head count, the batch
    assert 16 not in {int(d) for p in RTPHybridLM(64, 32, 1, 2).parameters() for d in p.shape}


def test_export_size_flags_next_to_a_checkpoint_are_a_usage_error(tmp_path, capsys):
    """Were silently ignored: the checkpoint's model was exported."""
    from rtpcompile.nn import RTPHybridLM

    path = tmp_path / "m.pt"
    torch.save(RTPHybridLM(64, 32, 1, 2, ratio=1.0), path)
    argv = ["export", "--program", "--checkpoint", str(path), "--seq-len", "8"]
    assert main([*argv, "--dim", "64", "--heads", "4"]) == 2
    err = capsys.readouterr().err
    assert "--dim, --heads cannot be used with --checkpoint" in err


# ----------------------------------------------------------------------------- explain


@pytest.fixture(scope="module")
def report():
    import rtpcompile
    from rtpcompile.nn import RTPHybridLM

    torch.manual_seed(0)
    model = RTPHybridLM(64, 32, 1, 2, ratio=1.0)
    return rtpcompile.explain(model, torch.randint(0, 64, (1, 9)))


@pytest.mark.parametrize("batch", [0, -1, True, 1.0, "2"])
def test_report_kernels_rejects_a_bad_batch(report, batch):
    """batch=0 returned kernels though nothing would launch."""
    with pytest.raises(ValueError, match="kernels\\(\\): batch must be a positive integer"):
        report.kernels(0, batch=batch)


@pytest.mark.parametrize("dtype", ["bf16", torch.int32, torch.complex64, None])
def test_report_kernels_rejects_a_bad_dtype(report, dtype):
    """dtype="bf16" failed with torch.empty's TypeError."""
    with pytest.raises(ValueError, match="kernels\\(\\): dtype must be one of torch.float16"):
        report.kernels(0, dtype=dtype)


def test_report_kernels_still_takes_the_op_dtypes(report):
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert report.kernels(0, batch=2, dtype=dtype)


# ----------------------------------------------------------------------------- demo


def test_demo_time_section_names_the_chosen_backends(monkeypatch, capsys):
    """Printed "time: eager vs inductor vs rtp" whatever --backends chose."""
    from rtpcompile.commands import demo

    monkeypatch.setattr(demo, "_explain", lambda model, ids: None)
    monkeypatch.setattr(demo, "_decode", lambda model, s, device: {})
    argv = ["demo", "--tiny", "--backends", "eager", "--no-train", "--no-plot", "--reps", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "== time: eager\n" in out and "inductor" not in out


# ----------------------------------------------------------------------------- cache warning


def test_cache_write_warning_points_at_the_callers_line(fresh, monkeypatch):
    """The RuntimeWarning's location was a line of rtpcompile/kernels/cache.py."""
    (fresh / "a-file").write_text("")
    monkeypatch.setenv("RTP_CACHE_DIR", str(fresh / "a-file"))
    monkeypatch.setenv("RTP_AUTOTUNE", "1")
    q, k, v = _qkv(40)
    g = ops.retention_init_decay(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops.retention(q, k, v, g)
        line = sys._getframe().f_lineno - 1
    (found,) = [w for w in caught if "rtpcompile cache: cannot write" in str(w.message)]
    assert (found.filename, found.lineno) == (__file__, line)


# ----------------------------------------------------------------------------- memory worker


def test_worker_run_by_hand_reexecutes_with_the_malloc_environment(monkeypatch):
    """Run by hand without the environment memory.subprocess_peak sets, the worker's reading
    depended on glibc's dynamic mmap threshold (0 B sometimes)."""
    from rtpcompile.bench import worker

    calls = []
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
    monkeypatch.setattr(sys, "platform", "linux")
    for name in worker.MALLOC_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "999")  # kept as given
    worker._with_malloc_env(["{}"])
    ((exe, argv, env),) = calls
    assert argv == [sys.executable, "-m", "rtpcompile.bench.worker", "{}"]
    assert env["MALLOC_MMAP_THRESHOLD_"] == "131072" and env["MALLOC_TRIM_THRESHOLD_"] == "999"
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    worker._with_malloc_env(["{}"])
    assert len(calls) == 1  # set: runs in this process
