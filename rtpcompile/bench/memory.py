"""Peak memory of one call.

CUDA: in process, ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``,
minus what was allocated before the call (the inputs) — exact for the caching allocator.

CPU: there is no allocator counter, so each measurement runs in a fresh subprocess
(``python -m rtpcompile.bench.worker``) that builds the inputs, warms the variant up on a short
sequence (compiling it if needed), resets the kernel's peak-RSS mark (``/proc/self/clear_refs``)
and takes the current RSS as a baseline, makes the one measured call and reports how far the
peak resident set rose above the baseline. The worker runs with glibc's mmap threshold fixed at
128 KiB, so every large buffer is a fresh mapping returned on free and the reading is the
call's own peak, not memory recycled from earlier calls. Readings below ~1 MiB are noise.
Without /proc (not Linux) it falls back to ``ru_maxrss`` growth, a lower bound.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable

import torch

from .stats import error_text

RESULT_PREFIX = "RTP_BENCH_RESULT "


def cuda_peak(fn: Callable[[], object], device: str | torch.device) -> int:
    """Bytes allocated at the peak of ``fn()`` above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return int(peak)


def max_rss_bytes() -> int:
    """The peak resident set of this process so far (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakRSS:
    """``with PeakRSS() as p: ...`` then ``p.bytes``: how far the peak RSS rose inside."""

    def __enter__(self) -> PeakRSS:
        self.exact = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # NOTE: "5" resets VmHWM (the peak RSS) to the current RSS
            self.exact = _status_kib("VmHWM") is not None
        except OSError:
            pass
        self.base = (_status_kib("VmRSS") or 0) * 1024 if self.exact else max_rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        peak = (_status_kib("VmHWM") or 0) * 1024 if self.exact else max_rss_bytes()
        self.bytes = max(0, peak - self.base)


def subprocess_peak(spec: dict, timeout_s: float = 300.0) -> tuple[int | None, str]:
    """Run ``spec`` in ``rtpcompile.bench.worker``; (peak bytes, "") or (None, why it failed)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    env["MALLOC_TRIM_THRESHOLD_"] = str(128 * 1024)
    cmd = [sys.executable, "-m", "rtpcompile.bench.worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return None, f"memory worker timed out after {timeout_s:.0f} s"
    except OSError as exc:
        return None, error_text(exc)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
            return result.get("peak_bytes"), result.get("error", "")
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return None, f"memory worker exited {proc.returncode}: {tail[:160]}"
