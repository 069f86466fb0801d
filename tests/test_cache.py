"""The persistent autotune cache: validation, atomic writes, concurrency, modes, CLI."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from rtpcompile import cli
from rtpcompile.kernels import cache
from rtpcompile.lowering import plan

ROOT = Path(__file__).resolve().parents[1]


def make_key(T: int = 512, **changes) -> dict:
    key = {
        "version": cache.FORMAT_VERSION,
        "source": "abc123",
        "spec": {"op": "retention", "phase": "fwd", "K": 64, "V": 64, "state_in": False},
        "device": "test-cpu",
        "capability": "AVX2/2threads",
        "torch": "2.13.0",
        "triton": "3.9.0",
        "dtype": "float32",
        "bucket": {"T": T, "BH": 8},
    }
    key.update(changes)
    return key


def make_value(form: str = "chunkwise", chunk: int = 64, ms: float = 1.5) -> dict:
    return {
        "form": form,
        "chunk_size": chunk,
        "config": {},
        "time_ms": ms,
        "timings": {"parallel": None, f"chunkwise(C={chunk})": ms},
    }


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RTP_CACHE", raising=False)
    monkeypatch.delenv("RTP_AUTOTUNE", raising=False)
    cache._reported.clear()
    plan.reset()
    yield tmp_path / "cache"
    plan.reset()


def test_store_and_load_round_trip(fresh_cache):
    key = make_key()
    assert cache.load(key) is None
    assert cache.store(key, make_value())
    assert cache.load(key) == make_value()
    assert cache.load(make_key(T=1024)) is None
    assert cache.directory() == fresh_cache / "autotune"
    assert [e[0] for e in cache.entries()] == [cache.key_id(key)]


def _entry_path(key: dict) -> Path:
    return cache.directory() / f"{cache.key_id(key)}.json"


@pytest.mark.parametrize(
    "text",
    ["", "{", "not json", "[1, 2]", '{"key": 1}', "\x00\xff garbage"],
    ids=["empty", "truncated", "text", "list", "wrong-type", "binary"],
)
def test_corrupt_entry_is_a_logged_miss_then_rewritten(text, caplog):
    key = make_key()
    path = _entry_path(key)
    path.parent.mkdir(parents=True)
    path.write_text(text, encoding="latin-1")
    with caplog.at_level("WARNING", logger="rtpcompile"):
        assert cache.load(key) is None
        assert cache.load(key) is None
    assert len([r for r in caplog.records if str(path) in r.getMessage()]) == 1  # logged once
    assert cache.store(key, make_value())
    assert cache.load(key) == make_value()


def _mutations():
    def entry(key=None, value=None, **top):
        doc = {"key": key or make_key(), "value": value or make_value(), "created": 1.0}
        doc.update(top)
        return doc

    return {
        "unknown-top-field": entry(extra=1),
        "unknown-key-field": entry(key={**make_key(), "x": 1}),
        "unknown-value-field": entry(value={**make_value(), "code": "import os"}),
        "missing-value-field": entry(value={k: v for k, v in make_value().items() if k != "form"}),
        "chunk-is-string": entry(value={**make_value(), "chunk_size": "64"}),
        "chunk-is-bool": entry(value={**make_value(), "chunk_size": True}),
        "bad-form": entry(value={**make_value(), "form": "flash"}),
        "config-float": entry(value={**make_value(), "config": {"BT": 1.5}}),
        "spec-nested": entry(key={**make_key(), "spec": {"K": [64]}}),
        "bucket-str": entry(key={**make_key(), "bucket": {"T": "512"}}),
        "created-str": entry(created="yesterday"),
        "old-version": entry(key={**make_key(), "version": cache.FORMAT_VERSION - 1}),
    }


@pytest.mark.parametrize("name", sorted(_mutations()))
def test_invalid_entries_are_misses(name):
    doc = _mutations()[name]
    assert cache.check_entry(doc) is not None
    key = make_key()
    path = _entry_path(key)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(doc))
    assert cache.load(key) is None


def test_entry_under_another_key_is_a_miss():
    key, other = make_key(), make_key(device="another-cpu")
    cache.store(other, make_value())
    _entry_path(other).rename(_entry_path(key))  # right file name, wrong content
    assert cache.load(key) is None


def test_store_rejects_invalid_values():
    with pytest.raises(ValueError, match="chunk_size"):
        cache.store(make_key(), {**make_value(), "chunk_size": -1})


def test_version_bump_invalidates_everything(monkeypatch):
    key = make_key()
    cache.store(key, make_value())
    monkeypatch.setattr(cache, "FORMAT_VERSION", cache.FORMAT_VERSION + 1)
    bumped = {**key, "version": cache.FORMAT_VERSION}
    assert cache.key_id(bumped) != cache.key_id(key)
    assert cache.load(bumped) is None
    assert cache.load(key) is None  # the old file no longer validates either
    assert all(entry is None for _, _, entry in cache.entries())


def test_cache_off_disables_reads_and_writes(monkeypatch, fresh_cache):
    cache.store(make_key(), make_value())
    monkeypatch.setenv("RTP_CACHE", "off")
    assert cache.load(make_key()) is None
    assert not cache.store(make_key(T=64), make_value())
    assert len(list((fresh_cache / "autotune").iterdir())) == 1


def test_cache_readonly_mode_reads_without_writing(monkeypatch):
    cache.store(make_key(), make_value())
    monkeypatch.setenv("RTP_CACHE", "readonly")
    assert cache.load(make_key()) == make_value()
    assert not cache.store(make_key(T=64), make_value())
    assert cache.load(make_key(T=64)) is None


@pytest.mark.parametrize("setting", ["readonly", "off"])
def test_clear_is_refused_unless_the_cache_is_on(monkeypatch, capsys, setting):
    """Deleting is a write: ``cache clear`` under readonly removed every entry and exited 0."""
    cache.store(make_key(), make_value())
    monkeypatch.setenv("RTP_CACHE", setting)
    with pytest.raises(ValueError, match=f"cannot clear with RTP_CACHE='{setting}'"):
        cache.clear()
    assert cli.main(["cache", "clear"]) == 1
    assert "cannot clear" in capsys.readouterr().err
    monkeypatch.setenv("RTP_CACHE", "on")
    assert cache.load(make_key()) == make_value()


def test_bad_cache_mode_lists_valid_ones(monkeypatch):
    monkeypatch.setenv("RTP_CACHE", "sometimes")
    with pytest.raises(ValueError, match=r"RTP_CACHE.*'on', 'off', 'readonly'.*'sometimes'"):
        cache.mode()


def _assert_unwritable_dir_warns_once():
    with pytest.warns(RuntimeWarning, match="cannot write"):
        assert not cache.store(make_key(), make_value())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cache.store(make_key(T=64), make_value())  # no second warning
    assert cache.load(make_key()) is None


def test_directory_under_a_file_works_without_persisting(tmp_path, monkeypatch):
    # NOTE: works as root too, where chmod cannot make a directory read-only.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("RTP_CACHE_DIR", str(blocker / "cache"))
    _assert_unwritable_dir_warns_once()


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores directory permissions"
)
def test_read_only_directory_works_without_persisting(fresh_cache):
    d = cache.directory()
    d.mkdir(parents=True)
    d.chmod(0o500)
    try:
        _assert_unwritable_dir_warns_once()
    finally:
        d.chmod(0o700)


def test_read_only_directory_via_failing_replace(monkeypatch):
    def deny(*_):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cache.os, "replace", deny)
    _assert_unwritable_dir_warns_once()
    assert not list(cache.directory().glob(".tmp-*"))  # the temporary file was removed


def test_export_import_round_trip(tmp_path, monkeypatch):
    for T in (64, 128, 256):
        cache.store(make_key(T=T), make_value(ms=T / 10))
    exported = tmp_path / "tuned.json"
    assert cache.export_entries(exported) == 3
    doc = json.loads(exported.read_text())
    doc["entries"].append({"key": make_key(), "value": {"form": "parallel"}, "created": 1.0})
    exported.write_text(json.dumps(doc))
    monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert cache.import_entries(exported) == (3, 1)
    assert cache.load(make_key(T=128)) == make_value(ms=12.8)
    with pytest.raises(ValueError, match="not an rtpcompile autotune export"):
        bad = tmp_path / "bad.json"
        bad.write_text("{}")
        cache.import_entries(bad)


# ----------------------------------------------------------------------------- concurrency


def _hammer(worker: int, rounds: int, failures) -> None:
    shared = make_key(T=4096)
    own = make_key(T=8 << worker)
    for i in range(rounds):
        cache.store(shared, make_value(chunk=16 << (i % 4), ms=float(worker)))
        cache.store(own, make_value(ms=float(i)))
        got = cache.load(shared)
        if got is None or cache.check_value(got) is not None:
            failures.put(f"worker {worker} round {i}: partial or missing read {got!r}")
        mine = cache.load(own)
        if mine is None or mine["time_ms"] != float(i):
            failures.put(f"worker {worker} round {i}: own entry {mine!r}")


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)
def test_many_processes_writing_same_and_different_keys():
    ctx = multiprocessing.get_context("fork")
    failures = ctx.Queue()
    workers = [ctx.Process(target=_hammer, args=(w, 40, failures)) for w in range(6)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=120)
        assert p.exitcode == 0
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert errors == []
    files = list(cache.directory().iterdir())
    assert not [f for f in files if f.name.startswith(".tmp-")], "temporary files left behind"
    assert len(files) == 7  # 6 own keys + the shared one
    assert all(entry is not None for _, _, entry in cache.entries())


# ----------------------------------------------------------------------------- CLI


def test_cli_cache_commands(capsys, tmp_path, fresh_cache):
    cache.store(make_key(), make_value())
    assert cli.main(["cache", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(fresh_cache / "autotune")
    assert cli.main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert cache.key_id(make_key()) in out and "chunkwise(C=64)" in out
    cache.store(make_key(T=2000), dict(make_value(), config={"num_warps": 8, "BV": 32}))
    assert cli.main(["cache", "list"]) == 0
    assert "chunkwise(C=64)[BV=32,num_warps=8]" in capsys.readouterr().out
    cache.clear()
    cache.store(make_key(), make_value())
    assert cli.main(["cache", "show", cache.key_id(make_key())[:6]]) == 0
    assert json.loads(capsys.readouterr().out)["value"] == make_value()
    assert cli.main(["cache", "show", "zzz"]) == 1
    assert cli.main(["cache", "export", str(tmp_path / "x.json")]) == 0
    assert cli.main(["cache", "clear"]) == 0
    assert cache.entries() == []
    assert cli.main(["cache", "import", str(tmp_path / "x.json")]) == 0
    assert cache.load(make_key()) == make_value()


def test_cli_tune_warms_the_cache(capsys):
    assert cli.main(["tune", "--shape", "1,2,40,8", "--shape", "1,2,1,8", "--phase", "both"]) == 0
    out = capsys.readouterr().out
    assert "(autotuned)" in out and "rule" in out
    assert plan.counters["benchmarks"] > 0
    plan.reset()
    assert cli.main(["tune", "--shape", "1,2,33,8"]) == 0  # same bucket as T=40
    assert "(autotune cache)" in capsys.readouterr().out
    assert plan.counters["benchmarks"] == 0


@pytest.mark.parametrize(
    ("flags", "state_out"),
    [([], (False, True)), (["--state"], (False, True)), (["--final-state", "yes"], (True,)),
     (["--state", "--final-state", "no"], (False,))],
)  # fmt: skip
def test_cli_tune_plans_the_triton_forward_with_or_without_a_final_state(
    monkeypatch, capsys, flags, state_out
):
    """Triton forwards are planned apart with and without a state out; auto tunes both."""
    from rtpcompile.lowering import dispatch

    seen = []
    monkeypatch.setattr(dispatch, "use_triton", lambda t: True)
    monkeypatch.setattr(
        plan, "plan_for", lambda p, **kw: seen.append(p) or plan.Plan("parallel", 64, "tuned")
    )
    assert cli.main(["tune", "--shape", "1,2,300,8", "--phase", "both", *flags]) == 0
    *fwd, bwd = seen
    assert [(p.phase, p.backend) for p in fwd] == [("fwd", "triton")] * len(state_out)
    assert tuple(p.state_out for p in fwd) == state_out
    assert bwd.phase == "bwd" and bwd.state_out  # the backward's passes do not depend on it
    assert ("no state out" in capsys.readouterr().out) == (False in state_out)


def test_cli_tune_rejects_bad_shapes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["tune", "--shape", "1,2,x"])
    assert "B,H,T,K" in capsys.readouterr().err


# ----------------------------------------------------------------------------- processes

_CHILD = """
import json, torch
from rtpcompile import ops
from rtpcompile.lowering import plan
q = torch.randn(1, 2, 50, 16)
o = ops.retention(q, q, q, ops.retention_init_decay(2))
o, s = ops.retention(q, q, q, ops.retention_init_decay(2), output_final_state=True)
print(json.dumps(plan.stats()))
"""


def test_second_process_with_warm_cache_runs_zero_benchmarks(fresh_cache):
    env = {**os.environ, "RTP_AUTOTUNE": "1", "RTP_CACHE_DIR": str(fresh_cache)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])

    def child() -> dict:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    cold = child()
    assert cold["benchmarks"] > 0 and cold["tunings"] == 1 and cold["cache_misses"] == 1
    warm = child()
    assert warm["benchmarks"] == 0 and warm["tunings"] == 0
    assert warm["cache_hits"] == 1 and warm["cache_misses"] == 0


# ----------------------------------------------------------------------------- odd values


def test_cli_cache_list_tells_apart_entries_differing_in_threads_versions_and_source(capsys):
    """Was: entries tuned with --threads 1 and --threads 2 (or under another torch, or another
    source hash) printed the same line."""
    variants = {
        "one": make_key(capability="AVX2/1threads"),
        "two": make_key(),  # AVX2/2threads
        "torch": make_key(torch="2.12.0"),
        "source": make_key(source="f00dfeed" * 2),
        "cuda-a": make_key(device="NVIDIA H200", capability="sm_90"),
        "cuda-b": make_key(device="NVIDIA H200", capability="sm_90", triton="3.8.0"),
    }
    for i, key in enumerate(variants.values()):  # other timings: still told apart by the key
        assert cache.store(key, make_value(ms=1.0 + i))
    assert cli.main(["cache", "list"]) == 0
    lines = dict(line.split("  ", 1) for line in capsys.readouterr().out.strip().splitlines())
    assert len(set(lines.values())) == len(variants)
    by_name = {name: lines[cache.key_id(key)] for name, key in variants.items()}
    assert "on test-cpu, 1 thread ->" in by_name["one"]
    assert "on test-cpu, 2 threads [torch 2.13.0, source abc123] ->" in by_name["two"]
    assert "[torch 2.12.0, source abc123]" in by_name["torch"]
    assert "[torch 2.13.0, source f00dfeed]" in by_name["source"]  # a short hash
    assert "on NVIDIA H200 [triton 3.9.0] ->" in by_name["cuda-a"]
    assert "on NVIDIA H200 [triton 3.8.0] ->" in by_name["cuda-b"]
    assert "thread" not in by_name["cuda-a"]
    cache.clear()
    cache.store(make_key(), make_value())  # nothing to tell apart: no tags
    assert cli.main(["cache", "list"]) == 0
    assert "on test-cpu, 2 threads -> chunkwise(C=64) 1.5 ms" in capsys.readouterr().out
