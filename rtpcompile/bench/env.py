"""What a result was measured on: date, device, library versions, thread count."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform

import torch


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: str | torch.device) -> str:
    """ "NVIDIA H200" for a CUDA device, the processor name (or "cpu") otherwise."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def describe(device: str | torch.device) -> dict[str, object]:
    """The environment block written at the top of every result file."""
    dev = torch.device(device)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": dev.type,
        "device_name": device_name(dev),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda if dev.type == "cuda" else None,
        "fla": _version("flash-linear-attention") or _version("fla-core"),
        "rtpcompile": _version("rtpcompile"),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        # NOTE: other processes on the machine distort CPU timings; the load says how much.
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def header_line(env: dict[str, object]) -> str:
    """One line: device, torch, triton, threads."""
    parts = [f"device: {env['device']} ({env['device_name']})", f"torch {env['torch']}"]
    if env.get("triton"):
        parts.append(f"triton {env['triton']}")
    if env.get("cuda"):
        parts.append(f"CUDA {env['cuda']}")
    parts.append(f"{env['threads']} threads")
    return ", ".join(parts)
