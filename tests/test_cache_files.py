"""The persistent autotune cache's files: entry values, damaged files, import and export
(symlinks, devices, modes), and the kernel module cache directory beside it."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import pytest
from test_cache import (  # noqa: F401  (fresh_cache: the autouse fixture, for this module too)
    _entry_path,
    fresh_cache,
    make_key,
    make_value,
)

from rtpcompile import cli
from rtpcompile.kernels import cache


def _aten_key(**spec) -> dict:
    return make_key(spec={**make_key()["spec"], "backend": "aten", **spec})


@pytest.mark.parametrize(
    ("key", "change"),
    [(make_key(), {"chunk_size": c}) for c in (0, 1, 7, 24, 512, 10**9)]
    + [(make_key(), {"form": "parallel", "chunk_size": 0}),
       (make_key(), {"config": {"BV": 3, "bogus": 1}}),
       (make_key(), {"config": {"BV": 8}}),
       (make_key(), {"config": {"num_warps": 3}}),
       (_aten_key(), {"config": {"BV": 32}})],
)  # fmt: skip
def test_values_the_tuner_never_writes_are_logged_misses(key, change, caplog):
    value = {**make_value(), **change}
    assert cache.check_entry({"key": key, "value": value, "created": 1.0}) is not None
    assert cache.store(key, value)  # well-formed: stored, then read back as a miss
    assert cache.load(key) is None and cache.load(key) is None
    assert sum("ignoring invalid entry" in r.getMessage() for r in caplog.records) == 1


def test_valid_chunks_and_configs_are_kept():
    for chunk in (16, 32, 64, 128, 256):
        assert cache.check_value(make_value(chunk=chunk)) is None
    triton = make_key(spec={**make_key()["spec"], "backend": "triton"})
    value = {**make_value(), "config": {"BV": 32, "num_warps": 4, "num_stages": 2, "split": 1}}
    assert cache.store(triton, value) and cache.load(triton) == value
    forced = _aten_key(chunk=7)  # the call forced chunk_size=7: the tuner stores that chunk
    assert cache.store(forced, make_value(chunk=7)) and cache.load(forced) == make_value(chunk=7)
    assert cache.check_value(make_value(chunk=7), _aten_key(chunk=8)) is not None


def test_deeply_nested_entry_is_a_logged_miss(caplog):
    key = make_key()
    path = _entry_path(key)
    path.parent.mkdir(parents=True)
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert cache.load(key) is None
    assert any("nested too deeply" in r.getMessage() for r in caplog.records)
    assert cache.store(key, make_value()) and cache.load(key) == make_value()


def test_import_of_a_deeply_nested_file_is_a_value_error(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        cache.import_entries(deep)


def test_import_into_an_unwritable_directory_raises(tmp_path, monkeypatch):
    cache.store(make_key(), make_value())
    exported = tmp_path / "x.json"
    cache.export_entries(exported)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    with pytest.raises(OSError, match="cannot write to the cache directory .*a-file"):
        cache.import_entries(exported)


# ----------------------------------------------------------------------------- export target


def _exported(text: str) -> list:
    doc = json.loads(text)
    assert doc["format"] == cache.EXPORT_FORMAT
    return doc["entries"]


def test_export_writes_through_a_symlink(tmp_path):
    cache.store(make_key(), make_value())
    target, link = tmp_path / "target.json", tmp_path / "link.json"
    target.write_text("old")
    link.symlink_to(target)
    assert cache.export_entries(link) == 1
    assert link.is_symlink() and len(_exported(target.read_text())) == 1
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "new.json")
    cache.export_entries(dangling)
    assert dangling.is_symlink() and len(_exported((tmp_path / "new.json").read_text())) == 1


def test_export_refuses_another_users_symlink(tmp_path, monkeypatch):
    """A link another user planted (a shared /tmp) must not redirect the write onto our file."""
    cache.store(make_key(), make_value())
    target, link = tmp_path / "mine.json", tmp_path / "planted.json"
    target.write_text("precious")
    link.symlink_to(target)
    monkeypatch.setattr(os, "getuid", lambda: link.lstat().st_uid + 1)
    with pytest.raises(PermissionError, match="symlink owned by uid"):
        cache.export_entries(link)
    assert target.read_text() == "precious"


def test_export_file_permissions(tmp_path):
    cache.store(make_key(), make_value())
    old = os.umask(0o022)
    try:
        cache.export_entries(tmp_path / "new.json")
        (tmp_path / "private.json").write_text("")
        os.chmod(tmp_path / "private.json", 0o600)
        cache.export_entries(tmp_path / "private.json")
    finally:
        os.umask(old)
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o644  # ships with a model
    assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600  # an existing mode stays
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_export_writes_into_a_fifo_without_replacing_it(tmp_path):
    import stat
    import threading

    cache.store(make_key(), make_value())
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    assert cache.export_entries(fifo) == 1
    reader.join(timeout=30)
    assert stat.S_ISFIFO(fifo.stat().st_mode) and len(_exported(got[0])) == 1


def test_export_dash_is_stdout(capsys):
    cache.store(make_key(), make_value())
    assert cache.export_entries("-") == 1
    assert len(_exported(capsys.readouterr().out)) == 1
    assert cli.main(["cache", "export", "-"]) == 0
    captured = capsys.readouterr()
    assert len(_exported(captured.out)) == 1 and "exported 1 entry to stdout" in captured.err


# ----------------------------------------------------------------------------- kernel cache dir


@pytest.fixture
def kernel_dirs(monkeypatch):
    from rtpcompile.kernels import codegen

    monkeypatch.setattr(codegen, "_FALLBACK", {})
    return codegen


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="XDG layout")
def test_both_caches_share_one_root(tmp_path, monkeypatch, kernel_dirs):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RTP_CACHE_DIR", "~/x")
    assert cache.directory() == tmp_path / "home" / "x" / "autotune"
    assert kernel_dirs.cache_dir() == tmp_path / "home" / "x" / "kernels"
    monkeypatch.delenv("RTP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.directory() == tmp_path / "xdg" / "rtpcompile" / "autotune"
    assert kernel_dirs.cache_dir() == tmp_path / "xdg" / "rtpcompile" / "kernels"


def _assert_falls_back_once(codegen, blocked: Path, why: str) -> Path:
    with pytest.warns(RuntimeWarning, match=f"{blocked}.*{why}.*RTP_CACHE_DIR"):
        fallback = codegen.cache_dir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert codegen.cache_dir() == fallback  # one warning, one directory per process
    assert fallback != blocked and fallback.is_dir()
    assert fallback.stat().st_mode & 0o777 == 0o700
    return fallback


def test_kernel_cache_under_a_file_falls_back(tmp_path, monkeypatch, kernel_dirs):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path / "a-file"))
    fallback = _assert_falls_back_once(kernel_dirs, tmp_path / "a-file" / "kernels", "directory")
    pytest.importorskip("triton", reason="the Triton kernels need triton")
    import torch

    from rtpcompile.kernels.spec import choose

    spec = choose("recurrent", "fwd", 16, 16, torch.float32, torch.float32, 16)
    monkeypatch.setattr(kernel_dirs, "_LOADED", {})
    module = kernel_dirs.load(spec)  # the kernels still load, from the private directory
    assert Path(module.__file__).parent == fallback


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX owners")
def test_kernel_cache_owned_by_another_user_is_never_used(tmp_path, monkeypatch, kernel_dirs):
    monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path))
    (tmp_path / "kernels").mkdir()
    owner = (tmp_path / "kernels").stat().st_uid
    monkeypatch.setattr(kernel_dirs.os, "getuid", lambda: owner + 1)
    _assert_falls_back_once(kernel_dirs, tmp_path / "kernels", "owned by uid")


def test_read_only_kernel_cache_falls_back(tmp_path, monkeypatch, kernel_dirs):
    # NOTE: os.access stands in for a read-only directory, which root could still write
    monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernel_dirs.os, "access", lambda path, mode: False)
    _assert_falls_back_once(kernel_dirs, tmp_path / "kernels", "not writable")


# ----------------------------------------------------------------------------- unusable directory


def test_directory_under_a_file_is_one_warning_and_no_log(tmp_path, monkeypatch, caplog):
    """Was: one "ignoring unreadable entry ... it will be rewritten" log line per key read, and
    the "cannot write" message twice (a log line and a RuntimeWarning)."""
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path / "a-file"))
    keys = [make_key(T=t) for t in (16, 32, 64)]
    with caplog.at_level("WARNING", logger="rtpcompile"):
        with pytest.warns(RuntimeWarning) as record:
            for key in keys:
                assert cache.load(key) is None
                assert not cache.store(key, make_value())
    assert [r.getMessage() for r in caplog.records] == []
    [warning] = record
    assert "cannot write to" in str(warning.message) and "a-file" in str(warning.message)


def test_why_not_writable(tmp_path, monkeypatch):
    assert cache.why_not_writable() is None
    assert cache.directory().is_dir() and list(cache.directory().iterdir()) == []
    for mode in ("off", "readonly"):
        monkeypatch.setenv("RTP_CACHE", mode)
        assert f"RTP_CACHE='{mode}' never writes" in cache.why_not_writable()
    monkeypatch.delenv("RTP_CACHE")
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path / "a-file"))
    assert "cannot write to " + str(tmp_path / "a-file") in cache.why_not_writable()


# ----------------------------------------------------------------------------- tuner's values


def _plan_problem(T=2048, request="auto", chunk=0, backend="aten", phase="fwd"):
    from rtpcompile.lowering.plan import Problem

    return Problem(1, 4, T, 32, 32, "float32", "cpu", backend, False, phase, request, chunk)


@pytest.mark.parametrize(
    ("request_", "chunk", "form", "chunk_size", "why"),
    [("auto", 0, "recurrent", 64, "not one the tuner compares"),
     ("auto", 0, "recurrent", 16, "not one the tuner compares"),
     ("auto", 0, "parallel", 32, "parallel winner must be 64"),
     ("auto", 32, "chunkwise", 64, "differs from the chunk the key forces"),
     ("auto", 32, "parallel", 64, "differs from the chunk the key forces"),
     ("auto", 48, "chunkwise", 64, "differs from the chunk the key forces"),
     ("chunkwise", 0, "recurrent", 64, "differs from the form the key forces")],
)  # fmt: skip
def test_planted_entries_the_tuner_never_writes_are_logged_misses(
    request_, chunk, form, chunk_size, why, caplog
):
    """Was: an imported or hand-edited entry with form "recurrent" under an auto key planned
    T=2048 recurrent (193 ms vs 17 ms chunkwise), and chunk 64 under a key forcing chunk 32
    (``RTP_CHUNK_SIZE=32``) overrode the forced chunk; both were accepted as cache hits."""
    from rtpcompile.lowering import plan

    p = _plan_problem(request=request_, chunk=chunk)
    key = plan.cache_key(p)
    value = {"form": form, "chunk_size": chunk_size, "config": {}, "time_ms": 0.1, "timings": {}}
    assert why in cache.check_entry({"key": key, "value": value, "created": 1.0})
    assert cache.store(key, value)
    with caplog.at_level("WARNING", logger="rtpcompile"):
        found = plan.plan_for(p)
        plan.reset()
        assert plan.plan_for(p).source == "model"
    assert found.source == "model" and plan.stats()["cache_misses"] == 1
    assert found.form != "recurrent" and (not chunk or found.chunk_size == chunk)
    logged = [r.getMessage() for r in caplog.records if "ignoring invalid entry" in r.getMessage()]
    assert len(logged) == 1 and why in logged[0] and "rewritten" in logged[0]
    exported = cache.directory().parent / "x.json"
    cache.export_entries(exported)  # an invalid entry is not exported, and not imported either
    assert json.loads(exported.read_text())["entries"] == []


def test_import_skips_entries_the_tuner_never_writes(tmp_path):
    from rtpcompile.lowering import plan

    key = plan.cache_key(_plan_problem())
    good = {"form": "chunkwise", "chunk_size": 64, "config": {}, "time_ms": 0.1, "timings": {}}
    doc = {"format": cache.EXPORT_FORMAT, "version": cache.FORMAT_VERSION,
           "entries": [{"key": key, "value": {**good, "form": "recurrent"}, "created": 1.0},
                       {"key": key, "value": good, "created": 1.0}]}  # fmt: skip
    (tmp_path / "x.json").write_text(json.dumps(doc))
    assert cache.import_entries(tmp_path / "x.json") == (1, 1)
    assert cache.load(key) == good


@pytest.mark.parametrize(
    ("request_", "chunk", "backend", "phase", "T"),
    [("auto", 0, "aten", "fwd", 2048), ("auto", 0, "aten", "bwd", 40),
     ("auto", 24, "aten", "fwd", 300), ("chunkwise", 0, "aten", "fwd", 100),
     ("auto", 0, "triton", "fwd", 200), ("auto", 32, "triton", "bwd", 200),
     ("chunkwise", 0, "triton", "fwd", 20)],
)  # fmt: skip
def test_every_candidate_the_tuner_may_store_is_valid(request_, chunk, backend, phase, T):
    from rtpcompile.lowering import plan, tune

    p = _plan_problem(T=T, request=request_, chunk=chunk, backend=backend, phase=phase)
    key = plan.cache_key(p)
    plans = tune.candidates(p, configs=True)
    assert plans
    for c in plans:
        value = {"form": c.form, "chunk_size": c.chunk_size, "config": dict(c.config),
                 "time_ms": 1.0, "timings": {c.label: 1.0}}  # fmt: skip
        assert cache.check_entry({"key": key, "value": value, "created": 1.0}) is None, c


def test_schema_constants_match_the_planner():
    from rtpcompile.kernels import cache_schema
    from rtpcompile.lowering import plan, tune

    assert cache_schema.PARALLEL_CHUNK == plan.DEFAULT_CHUNK
    assert set(cache_schema.TUNED_FORMS) < set(cache_schema.FORMS) == set(plan.FORMS)
    assert min(tune.CHUNKS) == cache_schema.MIN_CHUNK and max(tune.CHUNKS) == cache.MAX_CHUNK
