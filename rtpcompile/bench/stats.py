"""Timing statistics and the interleaved timer.

Every comparison runs in one process: each repetition calls every variant once, in a rotated
order, so slow drifts of the machine (other processes, thermal limits) hit every variant alike.
A sample is the mean of ``number`` back-to-back calls, ``number`` chosen during warm-up so a
sample lasts at least ``min_sample_s``. The summary is the median and the spread of the samples.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Mapping

import torch


@dataclasses.dataclass(frozen=True)
class Stats:
    """Summary of timing samples, in seconds.

    ``spread`` is the interquartile range divided by the median (0.05 = the middle half of the
    samples lies within 5 % of the median); ``p25``/``p75`` are its ends.
    """

    median: float
    p25: float
    p75: float
    min: float
    max: float
    n: int
    number: int = 1

    @property
    def spread(self) -> float:
        return (self.p75 - self.p25) / self.median if self.median > 0 else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {**dataclasses.asdict(self), "spread": self.spread}


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted non-empty list (q in [0, 1])."""
    if not sorted_values:
        raise ValueError("quantile of an empty list")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples: list[float], number: int = 1) -> Stats:
    """Median, quartiles and extremes of a non-empty list of samples."""
    if not samples:
        raise ValueError("summarize needs at least one sample, got none")
    s = sorted(float(x) for x in samples)
    return Stats(
        median=statistics.median(s),
        p25=quantile(s, 0.25),
        p75=quantile(s, 0.75),
        min=s[0],
        max=s[-1],
        n=len(s),
        number=number,
    )


def synchronizer(device: str | torch.device) -> Callable[[], None]:
    """A function that waits for queued work on ``device`` (a no-op on CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def _time_once(fn: Callable[[], object], number: int, sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(number):
        fn()
    sync()
    return (time.perf_counter() - start) / number


def _calls_per_sample(seconds_per_call: float, min_sample_s: float, max_number: int) -> int:
    """Back-to-back calls for a sample of at least ``min_sample_s`` (1 to ``max_number``)."""
    return max(1, min(max_number, math.ceil(min_sample_s / max(seconds_per_call, 1e-9))))


def error_text(exc: BaseException, limit: int = 300) -> str:
    """One line naming the exception (what a result records instead of a time).

    A first line that only introduces the cause ("BackendCompilerFailed: backend='rtp'
    raised:") is joined with the lines after it up to the first complete one, and an explicit
    ``__cause__`` whose text is not there yet is appended: the reason must survive."""
    return _error_text(exc, limit, set())


def _error_text(exc: BaseException, limit: int, seen: set[int]) -> str:
    seen.add(id(exc))  # NOTE: a cycle of causes would recurse forever
    lines = [x.strip() for x in str(exc).strip().splitlines() if x.strip()]
    text = lines[0] if lines else ""
    for line in lines[1:]:
        if not text.endswith(":"):
            break
        text = f"{text} {line}"
    cause = exc.__cause__
    # NOTE: the cause gets at least half the room: a long first line must not push it out
    head = f"{type(exc).__name__}: {text}"
    if cause is not None and id(cause) not in seen:
        inner = _error_text(cause, limit, seen)
        if inner.split(": ", 1)[-1] not in text or not str(cause).strip():
            room = max(limit - len(inner) - len(" (caused by )"), limit // 2)
            if len(head) > room:
                head = head[: max(room - 1, 0)] + "…"
            return f"{head} (caused by {inner})"[:limit]
    return head[:limit]


def interleaved(
    variants: Mapping[str, Callable[[], object]],
    reps: int = 5,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
    min_sample_s: float = 0.02,
    max_number: int = 100,
) -> tuple[dict[str, Stats], dict[str, str]]:
    """Time every variant ``reps`` times, interleaved, after ``warmup`` untimed calls each.

    Returns ({name: Stats}, {name: error}): a variant that raises (out of memory, say) is
    reported in the second dict and left out of the remaining repetitions.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    sync = sync or (lambda: None)
    numbers: dict[str, int] = {}
    errors: dict[str, str] = {}
    for name, fn in variants.items():
        try:
            elapsed = min(_time_once(fn, 1, sync) for _ in range(max(warmup, 1)))
        except Exception as exc:  # noqa: BLE001 - a failing variant is a result, not a crash
            errors[name] = error_text(exc)
            continue
        # NOTE: fast calls are repeated inside one sample so timer resolution and Python
        # overhead do not dominate; slow calls are timed one at a time.
        number = _calls_per_sample(elapsed, min_sample_s, max_number)
        if number > 1:
            # NOTE: a warm-up call can be several times slower than steady ones (allocator,
            # caches: 0.73 ms against 0.20), which made samples of ~1 ms; one calibration
            # sample of that many calls sets the count
            try:
                elapsed = _time_once(fn, number, sync)
            except Exception as exc:  # noqa: BLE001
                errors[name] = error_text(exc)
                continue
            number = _calls_per_sample(elapsed, min_sample_s, max_number)
        numbers[name] = number
    names = list(numbers)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            if name in errors:
                continue
            try:
                samples[name].append(_time_once(variants[name], numbers[name], sync))
            except Exception as exc:  # noqa: BLE001
                errors[name] = error_text(exc)
    stats = {n: summarize(samples[n], numbers[n]) for n in names if n not in errors}
    return stats, errors
