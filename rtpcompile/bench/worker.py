"""Subprocess entry point for CPU peak-memory readings (see memory.py).

    python -m rtpcompile.bench.worker '{"variant": "chunkwise", "mode": "fwd", "T": 4096,
                                        "B": 1, "H": 8, "K": 64, "V": 64, "dtype": "float32"}'

prints one line ``RTP_BENCH_RESULT {"peak_bytes": N}`` (or ``{"peak_bytes": null, "error": ...}``).

The reading needs glibc's mmap and trim thresholds fixed at 128 KiB (``MALLOC_ENV``), read once
at process start: without them a large buffer may reuse memory freed earlier and read 0 B.
``memory.subprocess_peak`` sets them; run by hand on Linux without them, the worker re-executes
itself once with them added (a value already set is kept).
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch

from .memory import RESULT_PREFIX, PeakRSS
from .stats import error_text
from .variants import OpInputs, build

# NOTE: the values memory.subprocess_peak sets (see the module docstring)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024)}
WARMUP_T = 67  # NOTE: not a head dim: T == K would be duck-sized into one symbol and recompile


def measure(spec: dict) -> int:
    device = spec.get("device", "cpu")
    dtype = getattr(torch, spec.get("dtype", "float32"))
    (variant,), _ = build(device, [spec["variant"]])
    grad = spec["mode"] == "fwdbwd"
    dims = (spec["B"], spec["H"])
    kv = (spec["K"], spec["V"])
    bthd = variant.name.startswith("fla-")
    small = OpInputs.make(*dims, min(WARMUP_T, spec["T"]), *kv, dtype, device, grad, bthd)
    variant.run(small, spec["mode"])  # compiles compiled variants; not counted
    del small
    x = OpInputs.make(*dims, spec["T"], *kv, dtype, device, grad, bthd)
    gc.collect()
    with PeakRSS() as peak:
        out = variant.run(x, spec["mode"])
        del out
    return peak.bytes


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    if "threads" in spec:
        torch.set_num_threads(int(spec["threads"]))
    try:
        result: dict[str, object] = {"peak_bytes": measure(spec)}
    except Exception as exc:  # noqa: BLE001 - reported to the parent as a value
        result = {"peak_bytes": None, "error": error_text(exc)}
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def _with_malloc_env(argv: list[str]) -> None:
    """Re-execute this worker with ``MALLOC_ENV`` when the environment lacks a part of it
    (Linux only; glibc reads it at start, so setting it now would change nothing)."""
    missing = {k: v for k, v in MALLOC_ENV.items() if k not in os.environ}
    if missing and sys.platform.startswith("linux"):
        sys.stdout.flush()
        command = [sys.executable, "-m", "rtpcompile.bench.worker", *argv]
        os.execve(sys.executable, command, {**os.environ, **missing})


if __name__ == "__main__":
    _with_malloc_env(sys.argv[1:])
    sys.exit(main(sys.argv[1:]))
