"""Model level: eager vs Inductor vs rtp (prefill, training step), and hybrids vs a Transformer
of the same width and depth (decode time per token, cache bytes) at several context lengths.

Prefill and training-step variants are timed interleaved per length (stats.interleaved).
Decoding starts from a synthetic cache of the given context (models.synthetic_cache), one fresh
cache per repetition, the models interleaved within each repetition.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import torch

from ..nn import RTPConfig, default_config
from . import models
from .report import Record, fmt_bytes, fmt_rate, fmt_seconds
from .stats import interleaved, summarize, synchronizer

# (label, layout, fraction of retention); ratio 0 is the pure Transformer.
HYBRIDS = (
    ("B 2/3 (default)", "B", 2 / 3),
    ("A 1/2", "A", 1 / 2),
    ("B 1/3", "B", 1 / 3),
    ("B 1/2", "B", 1 / 2),
    ("C 1/2", "C", 1 / 2),
    ("C 3/4", "C", 3 / 4),
    ("transformer", "B", 0.0),
)
QUICK_HYBRIDS = ("B 2/3 (default)", "C 1/2", "transformer")


@dataclasses.dataclass
class ModelConfig:
    device: str = "cpu"
    base: RTPConfig | None = None  # None: the default model
    backends: tuple[str, ...] = models.BACKENDS
    prefill_lengths: tuple[int, ...] = (256, 1024, 4096)
    train_lengths: tuple[int, ...] = (256, 1024)
    contexts: tuple[int, ...] = (256, 2048, 16384)
    decode_tokens: int = 16
    hybrids: tuple[str, ...] = tuple(h[0] for h in HYBRIDS)
    reps: int = 3
    max_call_s: float = 30.0
    whole_model: bool = False


def _time_backends(cfg, bench, lengths, make_fn, log) -> list[Record]:
    model = models.build_model(cfg.base, cfg.device)
    compiled, records = {}, []
    for name in cfg.backends:
        fn, note = models.compile_for(model, name, cfg.whole_model)
        if fn is None:
            records += [Record(bench, name, T, status="skipped", note=note) for T in lengths]
        else:
            compiled[name] = fn
    last: dict[str, list[tuple[int, float]]] = {}
    for T in sorted(lengths):
        ids = models.random_ids(model.config.vocab_size, T + 1, cfg.device)
        fns, skipped = {}, []
        for name, fn in compiled.items():
            predicted = _predict(last.get(name, []), T)
            if predicted > cfg.max_call_s:
                note = f"predicted {fmt_seconds(predicted)} per call > {cfg.max_call_s:g} s"
                skipped.append(Record(bench, name, T, status="skipped", note=note))
            else:
                fns[name] = make_fn(fn, model, ids)
        start = time.perf_counter()
        stats, errors = interleaved(fns, cfg.reps, 1, synchronizer(cfg.device))
        peaks = _cuda_peaks({n: f for n, f in fns.items() if n not in errors}, cfg.device)
        records += skipped
        for name in fns:
            if name in errors:
                records.append(Record(bench, name, T, status="error", note=errors[name]))
            else:
                last.setdefault(name, []).append((T, stats[name].median))
                peak = peaks.get(name)
                records.append(Record(bench, name, T, time=stats[name], memory_bytes=peak))
        shown = ", ".join(f"{n} {fmt_seconds(s.median)}" for n, s in stats.items())
        log(
            f"  {bench:13s} T={T:<6d} {shown}   ({time.perf_counter() - start:.0f} s incl. compile)"
        )
    return records


def _cuda_peaks(fns: dict[str, Callable[[], object]], device: str) -> dict[str, int]:
    """Bytes allocated at the peak of one more call of each fn, over what was allocated before
    it (CUDA only: the caching allocator's counters; {} on other devices)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return {}
    peaks = {}
    for name, fn in fns.items():
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        peaks[name] = torch.cuda.max_memory_allocated(dev) - base
    return peaks


def _predict(history: list[tuple[int, float]], T: int) -> float:
    """Time at T from the measured ones: the growth exponent seen between the last two lengths
    (clipped to [1, 2]; 2 with a single point)."""
    if not history:
        return 0.0
    (t1, s1), growth = history[-1], 2.0
    if len(history) > 1 and history[-2][0] != t1:
        t0, s0 = history[-2]
        growth = min(2.0, max(1.0, math.log(s1 / s0) / math.log(t1 / t0)))
    return s1 * (T / t1) ** growth


def _prefill(fn, model, ids):
    return models.prefill_fn(fn, ids[:, :-1])


def _train(fn, model, ids):
    return models.train_step_fn(fn, model, ids)


def _decode_records(cfg: ModelConfig, log) -> list[Record]:
    base = cfg.base or default_config()
    chosen = [h for h in HYBRIDS if h[0] in cfg.hybrids]
    built = {
        label: models.build_model(dataclasses.replace(base, layout=layout, ratio=ratio), cfg.device)
        for label, layout, ratio in chosen
    }
    sync = synchronizer(cfg.device)
    records = []
    for ctx in cfg.contexts:
        samples: dict[str, list[float]] = {label: [] for label in built}
        sizes: dict[str, dict] = {}
        for _ in range(cfg.reps):
            for label, m in built.items():
                cache = models.synthetic_cache(m, ctx)
                # NOTE: at the context the row is labelled with, before the decoded tokens
                # (read after them until 2026-11-25: ctx + decode_tokens tokens of K/V)
                sizes[label] = cache.nbytes()
                first = torch.zeros(1, 1, dtype=torch.long, device=cfg.device)
                res = models.decode(m, cache, first, cfg.decode_tokens, sync)
                samples[label].append(res.seconds / res.tokens)
        for label, m in built.items():
            st = summarize(samples[label])
            extra = {
                "tokens_per_s": 1.0 / st.median,
                "cache_bytes": sizes[label]["total"],
                "state_bytes": sizes[label]["state"],
                "kv_bytes": sizes[label]["kv"],
                "params": models.num_params(m),
                "layer_types": m.layer_types,
            }
            records.append(Record("decode", label, ctx, time=st, extra=extra))
        shown = ", ".join(
            f"{r.variant} {fmt_rate(r.extra['tokens_per_s'])} tok/s "
            f"{fmt_bytes(r.extra['cache_bytes'])}"
            for r in records[-len(built) :]
        )
        log(f"  decode        ctx={ctx:<6d} {shown}")
    return records


def run(cfg: ModelConfig, log: Callable[[str], None] = print) -> list[Record]:
    """Prefill and training-step timings per backend, then decoding per hybrid layout."""
    records = _time_backends(cfg, "model-prefill", cfg.prefill_lengths, _prefill, log)
    if cfg.train_lengths:
        records += _time_backends(cfg, "model-train", cfg.train_lengths, _train, log)
    if cfg.contexts:
        records += _decode_records(cfg, log)
    return records
