"""The launcher makes the tensors' CUDA device current (Triton launches on the current one).

Checked without a GPU by asking for the guard; tests/test_gpu_e2e.py runs an op on cuda:1.
"""

from __future__ import annotations

import contextlib

import torch

from rtpcompile.kernels import launch


def test_a_tensor_on_another_cuda_device_gets_a_device_guard(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    guard = launch.on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


def test_the_current_device_and_cpu_need_no_guard(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    for device in (torch.device("cuda", 1), torch.device("cpu"), torch.device("meta")):
        assert isinstance(launch.on_device(device), contextlib.nullcontext)


def test_every_launch_runs_under_the_guard(monkeypatch):
    """``_launch`` enters ``on_device(q.device)`` before it touches the kernel."""
    entered, launched = [], []

    @contextlib.contextmanager
    def guard(device):
        entered.append(device)
        yield
        launched.append(bool(entered))

    monkeypatch.setattr(launch, "on_device", guard)
    monkeypatch.setattr(launch, "_launch_grid", lambda *a: launched.append("grid"))
    q = torch.randn(1, 2, 3, 4)
    p = launch.Pass(form="parallel", q=q, k=q, v=q, gamma=torch.ones(2), scale=1.0)
    launch._launch(None, p, (None, None, None), (1, 2, 3))
    assert entered == [q.device] and launched == ["grid", True]
