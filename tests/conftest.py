"""Shared test settings: deterministic hypothesis in CI, float64 references, GPU skipping."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run on a GPU machine with -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Point the persistent caches at a per-session temporary directory (unless set)."""
    if "RTP_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("RTP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "rtp-cache"))
    yield


def clean_rtp_env(monkeypatch, cache_dir) -> None:
    """No RTP_* option left over from the environment, and the caches in ``cache_dir``."""
    for name in [n for n in os.environ if n.startswith("RTP_")]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RTP_CACHE_DIR", str(cache_dir))


@pytest.fixture
def fresh_plans(tmp_path, monkeypatch):
    """An empty autotune cache, no RTP_* option, and no memoised plan before or after."""
    from rtpcompile.kernels import cache
    from rtpcompile.lowering import plan

    clean_rtp_env(monkeypatch, tmp_path / "cache")
    cache._reported.clear()
    plan.reset()
    yield
    plan.reset()


@pytest.fixture
def aten_env(tmp_path, monkeypatch):
    """The aten implementation: no RTP_* option left over from the environment."""
    clean_rtp_env(monkeypatch, tmp_path / "cache")
    yield


@pytest.fixture
def triton_on_cpu(tmp_path, monkeypatch):
    """The rtp op on the generated kernels under the interpreter, with a fresh cache and planner
    and no RTP_* option left over from the environment."""
    from rtpcompile.lowering import dispatch, plan

    clean_rtp_env(monkeypatch, tmp_path / "cache")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RTP_KERNELS", "triton")
    dispatch._kernels_package.cache_clear()
    plan.reset()
    yield
    plan.reset()
    dispatch._kernels_package.cache_clear()


@pytest.fixture
def fresh_compile():
    """Dynamo's caches and the backend's counters cleared before and after the test (each test
    compiles new module instances and reads the counters of its own compiles)."""
    from torch._dynamo.utils import counters as dynamo_counters

    from rtpcompile.backend import counters

    torch._dynamo.reset()
    counters.clear()
    dynamo_counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def op_calls(monkeypatch, fresh_compile):
    """One entry per call of the rtp op's forward implementation (a claimed region ran it)."""
    from rtpcompile.lowering import custom_ops

    calls = []
    real = custom_ops._forward
    monkeypatch.setattr(custom_ops, "_forward", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.fixture
def inductor_graphs(monkeypatch):
    """Inductor's compile_fx replaced by the (rewritten) graph run eagerly: fast, and the test
    can inspect every graph module Inductor would have received (the list yielded)."""
    import torch
    import torch._inductor.compile_fx as cfx

    from rtpcompile.backend import counters

    seen = []

    def fake_compile_fx(gm, example_inputs, **kwargs):
        seen.append(gm)
        return gm.forward

    monkeypatch.setattr(cfx, "compile_fx", fake_compile_fx)
    torch._dynamo.reset()
    counters.clear()
    yield seen
    torch._dynamo.reset()


@pytest.fixture
def kernel_launches(monkeypatch):
    """TRITON_INTERPRET=1 and the KernelSpec of every Triton kernel launched, in order."""
    pytest.importorskip("triton", reason="the Triton kernels need triton")
    from rtpcompile.kernels import launch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    launches = []
    real = launch._launch

    def spy(spec, *args):
        launches.append(spec)
        return real(spec, *args)

    monkeypatch.setattr(launch, "_launch", spy)
    return launches
