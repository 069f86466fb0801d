"""What a result was measured on: date, device, library versions, thread count, and the rtpcompile
settings that change what the rtp variants run (``RTP_*`` variables, the autotune cache)."""

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
        # NOTE: RTP_FORM, RTP_CHUNK_SIZE, RTP_KERNELS, RTP_CACHE, ... change what the rtp
        # variants run; a result without them cannot be compared or reproduced
        "rtp_env": rtp_environment(),
        "autotune_cache": autotune_cache(),
    }


# NOTE: not RTP_*, but it decides whether RTP_KERNELS=triton runs on CPU tensors at all
_ALSO_RECORDED = ("TRITON_INTERPRET",)


def rtp_environment() -> dict[str, str]:
    """Every ``RTP_*`` environment variable that is set (empty values too), by name, and
    ``TRITON_INTERPRET`` when set (the kernels on CPU tensors need it)."""
    return {
        k: v for k, v in sorted(os.environ.items()) if k.startswith("RTP_") or k in _ALSO_RECORDED
    }


def autotune_cache() -> dict[str, str]:
    """The autotune cache's mode (``RTP_CACHE``: on, off, readonly) and directory."""
    from ..kernels import cache  # NOTE: standard library only; cheap to import

    try:
        mode = cache.mode()
    except ValueError as exc:  # NOTE: an invalid RTP_CACHE is recorded, the run reports it
        mode = f"invalid ({exc})"
    return {"mode": mode, "dir": str(cache.directory())}


def plan_counters() -> dict[str, int]:
    """How many run-time plans came from where so far in this process (``plan.stats``)."""
    from ..lowering import plan

    return dict(plan.stats())


def plan_sources(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The plans chosen between two ``plan_counters`` readings: "cache_hits" (tuned entries the
    autotune cache supplied), "tunings" (benchmarked here), "model" (cost model), ..."""
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


def settings_lines(env: dict[str, object]) -> list[str]:
    """Markdown list items for the RTP_* variables, the autotune cache and the plan sources."""
    rtp = env.get("rtp_env") or {}
    shown = ", ".join(f"{k}={v!r}" for k, v in rtp.items()) if rtp else "none set"
    lines = [f"- RTP_* environment: {shown}"]
    cache = env.get("autotune_cache")
    if cache:
        text = f"- autotune cache: {cache['mode']}, {cache['dir']}"
        src = env.get("plan_sources")
        if src:
            text += (
                f"; lowering plans chosen during this suite (per shape bucket, in the timing "
                f"process): {src.get('cache_hits', 0)} tuned entries from the cache, "
                f"{src.get('tunings', 0)} tuned here, {src.get('model', 0)} by the cost model"
            )
        lines.append(text)
    return lines


def header_line(env: dict[str, object]) -> str:
    """One line: device, torch, triton, threads."""
    parts = [f"device: {env['device']} ({env['device_name']})", f"torch {env['torch']}"]
    if env.get("triton"):
        parts.append(f"triton {env['triton']}")
    if env.get("cuda"):
        parts.append(f"CUDA {env['cuda']}")
    parts.append(f"{env['threads']} threads")
    return ", ".join(parts)
