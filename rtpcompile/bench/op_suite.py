"""Op level: every retention form and the automatic choice against the alternatives, over T.

For each mode ("fwd" under no_grad, "fwdbwd" = forward + gradients of q, k, v) and each T, all
available variants are timed in this process, interleaved (see stats.interleaved). Peak memory
is read per call (memory.py). A variant is skipped at a T where its predicted time per call
(from the previous T and its growth exponent) exceeds ``max_call_s``, or its T x T temporaries
would exceed ``max_mem_gb``; once skipped or failed it stays skipped for longer sequences.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch

from . import memory
from .report import Record, fmt_bytes, fmt_seconds
from .stats import interleaved, synchronizer
from .variants import OpInputs, OpVariant, build

MODES = ("fwd", "fwdbwd")
FULL_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
QUICK_LENGTHS = (256, 1024, 4096)


@dataclasses.dataclass
class OpConfig:
    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 1
    heads: int = 8
    k_dim: int = 64
    v_dim: int = 64
    lengths: tuple[int, ...] = FULL_LENGTHS
    modes: tuple[str, ...] = MODES
    reps: int = 5
    warmup: int = 2
    max_call_s: float = 20.0
    max_mem_gb: float = 8.0
    memory: bool = True
    memory_lengths: tuple[int, ...] | None = None  # None: every length
    variants: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        bad = sorted(set(self.modes) - set(MODES))
        if bad:
            raise ValueError(f"unknown mode(s) {bad}; valid modes: {list(MODES)}")
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"lengths must be positive integers, got {list(self.lengths)}")


def _skip_reason(cfg: OpConfig, v: OpVariant, T: int, last: tuple[int, float] | None) -> str:
    tt_bytes = v.tt_buffers * cfg.batch * cfg.heads * T * T * 4
    if tt_bytes > cfg.max_mem_gb * 2**30:
        return f"needs ~{fmt_bytes(tt_bytes)} of T x T buffers > {cfg.max_mem_gb:g} GiB"
    if last is not None:
        predicted = last[1] * (T / last[0]) ** v.growth
        if predicted > cfg.max_call_s:
            return f"predicted {fmt_seconds(predicted)} per call > {cfg.max_call_s:g} s"
    return ""


def _peak(cfg: OpConfig, v: OpVariant, x: OpInputs, mode: str, T: int) -> tuple[int | None, str]:
    if torch.device(cfg.device).type == "cuda":
        try:
            return memory.cuda_peak(functools.partial(v.run, x, mode), cfg.device), ""
        except Exception as exc:  # noqa: BLE001
            return None, memory.error_text(exc)
    spec = {
        "variant": v.name, "mode": mode, "T": T, "B": cfg.batch, "H": cfg.heads,
        "K": cfg.k_dim, "V": cfg.v_dim, "dtype": cfg.dtype, "device": cfg.device,
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    return memory.subprocess_peak(spec)


def _run_length(cfg, mode, T, variants, last, stopped, log) -> list[Record]:
    bench = f"op-{mode}"
    records, active = [], []
    for v in variants:
        reason = stopped.get(v.name) or _skip_reason(cfg, v, T, last.get(v.name))
        if reason:
            stopped.setdefault(v.name, reason)
            records.append(Record(bench, v.name, T, status="skipped", note=reason))
        else:
            active.append(v)
    dtype = getattr(torch, cfg.dtype)
    needs_bthd = any(v.name.startswith("fla-") for v in active)
    x = OpInputs.make(
        cfg.batch, cfg.heads, T, cfg.k_dim, cfg.v_dim, dtype, cfg.device, mode == "fwdbwd",
        needs_bthd,
    )  # fmt: skip
    fns: dict[str, Callable[[], object]] = {
        v.name: functools.partial(v.run, x, mode) for v in active
    }
    stats, errors = interleaved(fns, cfg.reps, cfg.warmup, synchronizer(cfg.device))
    for v in active:
        if v.name in errors:
            stopped[v.name] = f"failed at T={T}"
            records.append(Record(bench, v.name, T, status="error", note=errors[v.name]))
            continue
        last[v.name] = (T, stats[v.name].median)
        rec = Record(bench, v.name, T, time=stats[v.name])
        if cfg.memory and (cfg.memory_lengths is None or T in cfg.memory_lengths):
            rec.memory_bytes, err = _peak(cfg, v, x, mode, T)
            rec.note = err
        records.append(rec)
    shown = ", ".join(f"{r.variant} {fmt_seconds(r.time.median)}" for r in records if r.time)
    log(f"  {mode:6s} T={T:<6d} {shown}")
    return records


def run(cfg: OpConfig, log: Callable[[str], None] = print) -> tuple[list[Record], list[str]]:
    """Measure every (mode, T, variant); returns the records and notes on missing variants."""
    variants, notes = build(cfg.device, list(cfg.variants) if cfg.variants else None)
    records: list[Record] = []
    for mode in cfg.modes:
        last: dict[str, tuple[int, float]] = {}
        stopped: dict[str, str] = {}
        for T in sorted(cfg.lengths):
            records += _run_length(cfg, mode, T, variants, last, stopped, log)
    return records, notes


def descriptions(device: str) -> dict[str, str]:
    variants, _ = build(device)
    return {v.name: v.description for v in variants}
