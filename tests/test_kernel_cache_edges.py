"""Edges of the kernel listing, the kernel module cache, the source dump and the spec bounds.

- ``kernels_for`` took no scale and listed a scale-1.0 call: below ``backward.TINY_SCALE`` a
  backward with a final-state gradient runs the three-pass kernels, not the split path's four.
- ``RTP_CACHE=off`` / ``readonly`` still wrote the generated modules under ``$RTP_CACHE_DIR``.
- ``RTP_DUMP_KERNELS`` set after a kernel was loaded never dumped that kernel.
- A relative ``RTP_CACHE_DIR`` was resolved against the working directory at each use, so one
  process split its cache (kernels and autotune entries) over directories after ``os.chdir``.
- ``rtpcompile cache clear`` left the generated modules in ``kernels/``.
- ``KernelSpec`` accepted K = 257 (the + 1 is V's column of ones) and said "[1, 256]" at 258.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rtpcompile import cli
from rtpcompile.kernels import cache
from rtpcompile.kernels.spec import KernelSpec, choose

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A fresh module memo and cache root, under the interpreter, no RTP_* option left over."""
    pytest.importorskip("triton", reason="the generated modules import triton")
    from rtpcompile.kernels import codegen

    for name in [n for n in os.environ if n.startswith("RTP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(codegen, "_LOADED", {})
    monkeypatch.setattr(codegen, "_TRANSIENT", [])
    monkeypatch.setattr(codegen, "_DUMPED", set())
    monkeypatch.setattr(codegen, "_DUMP_WARNED", set())
    cache._reported.clear()
    return codegen


def _spec(V: int = 16) -> KernelSpec:
    return choose("recurrent", "fwd", 8, V, torch.float32, torch.float32, 16)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- kernels_for


def _meta(T=130, K=16, dtype=torch.float32):
    q = torch.empty(1, 2, T, K, dtype=dtype, device="meta")
    return q, q, q, torch.empty(2, device="meta")


def _stages(infos) -> list[str]:
    return [i.spec.stage for i in infos]


def test_kernels_for_lists_the_tiny_scale_backward():
    """Below TINY_SCALE (float32) a final-state gradient runs the three split passes (six
    launches after the forward's two), not the four-launch path with its dqk kernel."""
    from rtpcompile.kernels import backward

    args = ("chunkwise", *_meta(), None, 16)
    plain = rtp_kernels().kernels_for(*args, backward=True, final_state_grad=True)
    assert plain == rtp_kernels().kernels_for(
        *args, backward=True, final_state_grad=True, scale=0.25
    )
    assert _stages(plain) == ["states", "output", "states", "states", "output", "dqk"]
    tiny = rtp_kernels().kernels_for(
        *args, backward=True, final_state_grad=True, scale=backward.TINY_SCALE / 2
    )
    assert _stages(tiny) == ["states", "output"] * 4
    # NOTE: the same at -tiny; without a final-state gradient, or in float16, scale changes nothing
    assert tiny == rtp_kernels().kernels_for(
        *args, backward=True, final_state_grad=True, scale=-(2.0**-40)
    )
    assert rtp_kernels().kernels_for(*args, backward=True, scale=2.0**-40) == (
        rtp_kernels().kernels_for(*args, backward=True)
    )
    half = ("chunkwise", *_meta(dtype=torch.float16), None, 16)
    assert rtp_kernels().kernels_for(*half, backward=True, final_state_grad=True) == (
        rtp_kernels().kernels_for(*half, backward=True, final_state_grad=True, scale=2.0**-40)
    )


def test_kernels_for_scale_matches_the_launches(kernel_env, monkeypatch):
    """What a tiny-scale call launches is what kernels_for(scale=...) lists (the interpreter)."""
    from rtpcompile.kernels import codegen, launch

    kernels = rtp_kernels()
    seen = []
    real = launch._launch

    def recorded(spec, *args, **kwargs):
        seen.append(codegen.info(spec))
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(launch, "_launch", recorded)
    q = torch.randn(1, 2, 130, 16, dtype=torch.float32)
    g = torch.tensor([0.9, 0.5])
    scale = 2.0**-40
    o, sf = kernels.triton_forward("chunkwise", q, q, q, g, scale, None, 16)
    kernels.triton_backward(
        "chunkwise", torch.randn_like(o), torch.randn_like(sf), q, q, q, g, scale, None, sf, 16
    )
    listed = kernels.kernels_for(
        "chunkwise", q, q, q, g, None, 16, backward=True, final_state_grad=True, scale=scale
    )
    assert [i.module for i in seen] == [i.module for i in listed]


def test_kernels_for_scale_checked():
    args = ("chunkwise", *_meta(T=8), None, 16)
    with pytest.raises(ValueError, match="nonzero scale"):
        rtp_kernels().kernels_for(*args, scale=0.0)
    with pytest.raises(ValueError, match="scale must be a real number"):
        rtp_kernels().kernels_for(*args, scale=True)
    with pytest.raises(TypeError):
        rtp_kernels().kernels_for(*args, False, False, None, True, None, 0.5)  # keyword only


def rtp_kernels():
    pytest.importorskip("triton", reason="kernels_for renders the Triton templates")
    from rtpcompile import kernels

    return kernels


# ----------------------------------------------------------------------------- RTP_CACHE off


@pytest.mark.parametrize("mode", ["off", "readonly"])
def test_cache_off_writes_no_kernel_module(kernel_env, tmp_path, monkeypatch, mode):
    codegen = kernel_env
    monkeypatch.setenv("RTP_CACHE", mode)
    module = codegen.load(_spec())
    where = Path(module.__file__).parent
    assert not (tmp_path / "cache").exists()
    assert where.name.startswith("rtpcompile-kernels-") and where.is_dir()
    assert stat.S_IMODE(where.stat().st_mode) == 0o700
    assert codegen.cache_dir() == where  # one directory per process
    monkeypatch.setenv("RTP_CACHE", "on")
    module = codegen.load(_spec(V=32))
    assert Path(module.__file__).parent == tmp_path / "cache" / "kernels"


def test_cache_readonly_kernel_directory_removed_at_exit(tmp_path):
    pytest.importorskip("triton", reason="the generated modules import triton")
    code = (
        "import torch\n"
        "from rtpcompile.kernels import codegen\n"
        "from rtpcompile.kernels.spec import choose\n"
        "spec = choose('recurrent', 'fwd', 8, 16, torch.float32, torch.float32, 16)\n"
        "print(codegen.load(spec).__file__)\n"
    )
    env = dict(os.environ, RTP_CACHE="readonly", RTP_CACHE_DIR=str(tmp_path / "cache"))
    env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path.name.startswith("rtp_") and not path.parent.exists()
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- dump


def test_dump_set_after_the_first_load(kernel_env, tmp_path, monkeypatch):
    codegen = kernel_env
    spec = _spec()
    name = codegen.info(spec).module
    codegen.load(spec)  # loaded before RTP_DUMP_KERNELS is set
    monkeypatch.setenv("RTP_DUMP_KERNELS", str(tmp_path / "dump"))
    codegen.load(spec)
    dumped = tmp_path / "dump" / f"{name}.py"
    assert dumped.read_text() == codegen.render(spec)
    dumped.unlink()
    codegen.load(spec)
    assert not dumped.exists()  # once per directory
    monkeypatch.setenv("RTP_DUMP_KERNELS", str(tmp_path / "other"))
    codegen.load(spec)
    assert _files(tmp_path / "other") == [f"{name}.py"]
    monkeypatch.delenv("RTP_DUMP_KERNELS")
    other = _spec(V=32)
    codegen.load(other)
    assert _files(tmp_path / "other") == [f"{name}.py"]


def test_dump_late_through_the_op(kernel_env, tmp_path, monkeypatch):
    """The tester's case: the same op call before and after setting the variable."""
    from rtpcompile import ops
    from rtpcompile.kernels import launch

    codegen = kernel_env
    monkeypatch.setenv("RTP_KERNELS", "triton")
    seen = []
    real = launch._launch

    def recorded(spec, *args, **kwargs):
        seen.append(spec)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(launch, "_launch", recorded)
    q = torch.randn(1, 1, 3, 8)
    g = torch.tensor([0.9])
    ops.retention(q, q, q, g, form="recurrent")
    assert seen
    monkeypatch.setenv("RTP_DUMP_KERNELS", str(tmp_path / "dump"))
    ops.retention(q, q, q, g, form="recurrent")
    assert _files(tmp_path / "dump") == sorted({codegen.info(s).module + ".py" for s in seen})


# ----------------------------------------------------------------------------- relative root


def test_relative_cache_dir_resolved_once(kernel_env, tmp_path, monkeypatch):
    codegen = kernel_env
    monkeypatch.setattr(cache, "_ABSOLUTE", {})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    monkeypatch.setenv("RTP_CACHE_DIR", "rel")
    assert cache.root() == tmp_path / "a" / "rel" and cache.root().is_absolute()
    first = codegen.load(_spec())
    monkeypatch.chdir(tmp_path / "b")
    assert cache.directory() == tmp_path / "a" / "rel" / "autotune"
    second = codegen.load(_spec(V=32))
    assert Path(first.__file__).parent == Path(second.__file__).parent
    assert Path(second.__file__).parent == tmp_path / "a" / "rel" / "kernels"
    assert not (tmp_path / "b" / "rel").exists()
    # NOTE: "~" still follows HOME (not memoised), as both caches always did
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RTP_CACHE_DIR", "~/x")
    assert cache.root() == tmp_path / "home" / "x"


# ----------------------------------------------------------------------------- cache clear


def _plant_kernels(root: Path) -> Path:
    d = root / "kernels"
    d.mkdir(parents=True)
    (d / "rtp_0123456789abcdef01234567.py").write_text("x = 1\n")
    (d / "rtp_76543210fedcba9876543210.py").write_text("x = 2\n")
    (d / ".tmp-abc.py").write_text("")
    (d / "notes.txt").write_text("mine")
    (d / "rtp_my_helpers.py").write_text("mine")  # named like one, not a generated module
    (d / "rtp_dir.py").mkdir()  # a directory named like a module: left alone
    return d


@pytest.mark.parametrize("entries_only", [False, True])
def test_cache_clear_removes_kernel_modules(tmp_path, monkeypatch, capsys, entries_only):
    monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.delenv("RTP_CACHE", raising=False)
    d = _plant_kernels(tmp_path / "c")
    before = _files(d)
    argv = ["cache", "clear"] + (["--entries-only"] if entries_only else [])
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    if entries_only:
        assert _files(d) == before and "kernel" not in out
    else:
        assert _files(d) == ["notes.txt", "rtp_my_helpers.py"] and (d / "rtp_dir.py").is_dir()
        assert f"and 3 generated kernel module(s) from {d}" in out
    assert out.startswith(f"removed 0 file(s) from {tmp_path / 'c' / 'autotune'}")


def test_cache_clear_removes_only_entries(tmp_path, monkeypatch, capsys):
    """Every ``*.json`` was removed: an ``autotune`` directory linked to a project lost its
    ``package.json`` (found 2026-11-25)."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("package.json", "config.json", "0123456789abcdef01234567.json"):
        (project / name).write_text("{}")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "autotune").symlink_to(project)
    monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.delenv("RTP_CACHE", raising=False)
    assert cli.main(["cache", "clear", "--entries-only"]) == 0
    assert capsys.readouterr().out.startswith("removed 1 file(s)")
    assert sorted(p.name for p in project.iterdir()) == ["config.json", "package.json"]


@pytest.mark.parametrize("mode", ["off", "readonly"])
def test_cache_clear_refused_keeps_kernel_modules(tmp_path, monkeypatch, capsys, mode):
    monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("RTP_CACHE", mode)
    d = _plant_kernels(tmp_path / "c")
    before = _files(d)
    assert cli.main(["cache", "clear"]) == 1
    assert _files(d) == before
    with pytest.raises(ValueError, match="must be 'on'"):
        cache.clear_kernels()


def test_cache_clear_without_a_kernel_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path / "none"))
    monkeypatch.delenv("RTP_CACHE", raising=False)
    assert cli.main(["cache", "clear"]) == 0
    assert "and 0 generated kernel module(s)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- spec bounds


def _kspec(K: int, V: int, ones: bool = False) -> KernelSpec:
    return KernelSpec(
        "chunkwise", "fwd", K, V, 16, 512, 512, "float32", "float32", extra_value_column=ones
    )


@pytest.mark.parametrize(
    "K, V, ones, message",
    [
        (257, 8, False, r"KernelSpec.K must be in \[1, 256\], got 257"),
        (258, 8, False, r"KernelSpec.K must be in \[1, 256\], got 258"),
        (257, 8, True, r"KernelSpec.K must be in \[1, 256\], got 257"),
        (8, 257, False, r"KernelSpec.V must be in \[1, 256\], got 257"),
        (8, 258, True, r"KernelSpec.V must be in \[1, 257\] \(with extra_value_column\), got 258"),
        (0, 8, False, r"KernelSpec.K must be in \[1, 256\], got 0"),
    ],
)
def test_spec_dim_bounds(K, V, ones, message):
    with pytest.raises(ValueError, match=message):
        _kspec(K, V, ones)


def test_spec_dim_bounds_accepted():
    assert _kspec(256, 256).V == 256
    assert _kspec(256, 257, ones=True).V == 257  # 256 values and the column of ones
    with pytest.raises(ValueError, match=r"K, V <= 256 .*got K=8, V=257 without one"):
        choose("chunkwise", "fwd", 8, 257, torch.float32, torch.float32)
    spec = choose("chunkwise", "fwd", 8, 257, torch.float32, torch.float32, extra_value_column=True)
    assert spec.V == 257


def test_a_forked_childs_exit_keeps_the_parents_temporary_kernel_directory(monkeypatch):
    """The atexit hook is inherited by a fork; only the process that made the directory
    removes it (a child's exit removed it, and the parent's next kernel warned)."""
    import os
    import sys

    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    from rtpcompile.kernels import codegen

    monkeypatch.setenv("RTP_CACHE", "off")
    monkeypatch.setattr(codegen, "_TRANSIENT", [])
    found = codegen._transient_dir()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # NOTE: the child runs the hook it inherited (only it: not pytest's others)
        codegen._remove_at_exit(found, parent)
        os._exit(0)
    os.waitpid(pid, 0)
    assert found.is_dir(), sys.platform
    codegen._remove_at_exit(found, os.getpid())
    assert not found.exists()
