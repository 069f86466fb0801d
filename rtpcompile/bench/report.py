"""Benchmark records and their JSON and markdown renderings.

A result file is ``{"schema": SCHEMA, "env": {...}, "config": {...}, "records": [...]}``; each
record is one (bench, variant, T) cell: a time summary and/or a peak-memory reading, or the
reason it was skipped or failed. ``validate`` checks that shape (used by the tests).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path

from .stats import Stats

SCHEMA = "rtpcompile-bench/1"
STATUSES = ("ok", "skipped", "error")


@dataclasses.dataclass
class Record:
    """One measured cell. ``extra`` holds bench-specific numbers (tokens/s, cache bytes, ...)."""

    bench: str
    variant: str
    T: int
    time: Stats | None = None
    memory_bytes: int | None = None
    status: str = "ok"
    note: str = ""
    extra: dict[str, object] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["time"] = None if self.time is None else self.time.to_dict()
        return d


def to_json(env: dict, config: dict, records: Iterable[Record]) -> dict[str, object]:
    return {
        "schema": SCHEMA,
        "env": env,
        "config": config,
        "records": [r.to_dict() for r in records],
    }


def validate(doc: dict) -> None:
    """Raise ValueError naming the first field that does not follow the schema."""
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"schema must be {SCHEMA!r}, got {doc.get('schema')!r}")
    for key in ("env", "config", "records"):
        if key not in doc:
            raise ValueError(f"result is missing {key!r}")
    for key in ("date", "device", "torch"):
        if key not in doc["env"]:
            raise ValueError(f"env is missing {key!r}")
    for i, rec in enumerate(doc["records"]):
        for key, kind in (("bench", str), ("variant", str), ("T", int), ("status", str)):
            if not isinstance(rec.get(key), kind):
                got = rec.get(key)
                raise ValueError(f"records[{i}].{key} must be {kind.__name__}, got {got!r}")
        if rec["status"] not in STATUSES:
            got = rec["status"]
            raise ValueError(f"records[{i}].status must be one of {STATUSES}, got {got!r}")
        t = rec.get("time")
        if t is not None and not {"median", "p25", "p75", "n"} <= set(t):
            raise ValueError(f"records[{i}].time needs median, p25, p75, n; got {sorted(t)}")


def write_json(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


# -- markdown -----------------------------------------------------------------------------------


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    for unit, factor in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= factor or unit == "µs":
            value = s / factor
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{s:.3g} s"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= factor:
            return f"{fmt_rate(n / factor)} {unit}"  # NOTE: 1000 KiB read "1e+03 KiB" with :.3g
    return f"{int(n)} B"


def fmt_rate(per_second: float) -> str:
    """A number such as tokens/s: 3 significant digits, whole from 100 (no 1.82e+03)."""
    return f"{per_second:.3g}" if abs(per_second) < 100 else f"{per_second:.0f}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table (first column left-aligned, the others right-aligned)."""
    align = [":---"] + ["---:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(rec: Record | None, what: str) -> str:
    if rec is None:
        return ""
    if rec.status != "ok":
        return "skip" if rec.status == "skipped" else "error"
    if what == "time":
        if rec.time is None:
            return "-"
        return f"{fmt_seconds(rec.time.median)} ±{100 * rec.time.spread / 2:.0f}%"
    return fmt_bytes(rec.memory_bytes)


def pivot(records: Iterable[Record], bench: str, what: str = "time") -> str:
    """Rows T, columns variants (in first-seen order); ``what`` is "time" or "memory"."""
    recs = [r for r in records if r.bench == bench]
    order = list(dict.fromkeys(r.variant for r in recs))  # NOTE: the same for time and memory
    if what == "memory":
        recs = [r for r in recs if r.memory_bytes is not None or r.status != "ok"]
    variants = [v for v in order if any(r.variant == v for r in recs)]
    lengths = sorted({r.T for r in recs})
    cells = {(r.variant, r.T): r for r in recs}
    rows = [[str(T)] + [_cell(cells.get((v, T)), what) for v in variants] for T in lengths]
    if what == "memory":
        # NOTE: a length where some variant ran but nothing was measured is not a memory length
        # (its skips are time skips): no row of blank cells
        rows = [r for r in rows if "" not in r[1:] or set(r[1:]) - {"", "skip", "error"}]
    return table(["T"] + variants, rows)


def notes(records: Iterable[Record]) -> list[str]:
    """Skip/error reasons, one line per (bench, variant, status): the first T where each
    happened (keyed without the status until 2026-11-25, so a memory note on a timed length hid
    the error that failed a later one)."""
    first: dict[tuple[str, str, str], str] = {}
    for r in records:
        key = (r.bench, r.variant, r.status)
        if r.note and key not in first:
            first[key] = f"{r.bench} / {r.variant} / T={r.T}: {r.note}"
    return list(first.values())


def from_json(doc: dict) -> list[Record]:
    """The records of a result file (to re-render its markdown or plots)."""
    validate(doc)
    records = []
    for d in doc["records"]:
        t = d.get("time")
        st = None
        if t is not None:
            fields = ("median", "p25", "p75", "min", "max", "n", "number")
            st = Stats(**{k: t[k] for k in fields if k in t})
        rest = {k: d[k] for k in ("memory_bytes", "status", "note", "extra") if k in d}
        records.append(Record(d["bench"], d["variant"], d["T"], time=st, **rest))
    return records


def text_table(headers: list[str], rows: list[list[str]], indent: str = "  ") -> str:
    """A plain-text table for the terminal: first column left-aligned, the others right."""
    cols = list(zip(headers, *rows, strict=True))
    widths = [max(len(str(c)) for c in col) for col in cols]

    def line(cells):
        first = str(cells[0]).ljust(widths[0])
        rest = [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return indent + "  ".join([first, *rest]).rstrip()

    return "\n".join(
        [line(headers), indent + "-" * (sum(widths) + 2 * (len(widths) - 1))]
        + [line(r) for r in rows]
    )
