"""PNG plots of the results (time and memory against T on log axes); needs matplotlib.

Dashed grey guides show slopes 1 (linear) and 2 (quadratic) so the growth of each curve can be
read off directly. A variant keeps one colour and marker in every panel and plot, and legends
list variants in the order of the markdown tables; a variant measured at one length only is a
lone marker, and a legend entry is shown as a marker without a line then.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from . import optional
from .report import Record

MARKERS = "osD^vP*Xh<>p"


def _series(records: list[Record], bench: str, value) -> dict[str, tuple[list[int], list[float]]]:
    """{variant: (Ts, values)} in the variants' first-seen order (the tables' column order)."""
    order = {v: i for i, v in enumerate(dict.fromkeys(r.variant for r in records))}
    out: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    chosen = (r for r in records if r.bench == bench and r.status == "ok")
    for r in sorted(chosen, key=lambda r: (order[r.variant], r.T)):
        y = value(r)
        if y is not None and y > 0:
            out[r.variant][0].append(r.T)
            out[r.variant][1].append(y)
    return dict(out)


def _styles(records: list[Record]) -> dict[str, dict]:
    """One colour and marker per variant, the same in every panel of every plot."""
    names = dict.fromkeys(r.variant for r in records)
    return {
        name: {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)]}
        for i, name in enumerate(names)
    }


def _guides(ax, series) -> None:
    points = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys, strict=True)]
    if not points:
        return
    x0 = min(p[0] for p in points)
    y0 = min(p[1] for p in points if p[0] == x0)
    x1 = max(p[0] for p in points)
    for slope, style in ((1, "--"), (2, ":")):
        ax.plot([x0, x1], [y0, y0 * (x1 / x0) ** slope], style, color="grey", lw=0.8,
                label=f"∝ T{'²' if slope == 2 else ''}")  # fmt: skip


def _panel(ax, series, title, ylabel, xlabel="T (tokens)", styles=None) -> None:
    for name, (xs, ys) in series.items():
        style = (styles or {}).get(name, {"marker": "o"})
        # NOTE: a one-point series has no line; its legend entry must not show one either
        ls = "-" if len(xs) > 1 else "none"
        ax.plot(xs, ys, ms=4, ls=ls, label=name, **style)
    if "tokens/s" not in title:
        _guides(ax, series)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7)


def _figure(
    path: Path, panels: list[tuple[str, str, dict, str]], subtitle: str, styles=None
) -> Path | None:
    plt = optional.pyplot()
    if plt is None or not any(p[2] for p in panels):
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (title, ylabel, series, xlabel) in zip(axes[0], panels, strict=True):
        _panel(ax, series, title, ylabel, xlabel, styles)
    fig.suptitle(subtitle, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def op_plots(records: list[Record], out: Path, subtitle: str) -> list[Path]:
    """op_time.png and op_memory.png (one panel per mode); returns the files written."""
    modes = [m for m in ("fwd", "fwdbwd") if any(r.bench == f"op-{m}" for r in records)]
    names = {"fwd": "forward", "fwdbwd": "forward + backward"}
    written = []
    for what, ylabel, value in (
        ("time", "seconds (median)", lambda r: r.time.median if r.time else None),
        ("memory", "peak bytes above inputs", lambda r: r.memory_bytes),
    ):
        panels = [
            (f"{names[m]}: {what}", ylabel, _series(records, f"op-{m}", value), "T (tokens)")
            for m in modes
        ]
        path = _figure(out / f"op_{what}.png", panels, subtitle, _styles(records))
        if path:
            written.append(path)
    return written


def model_plots(records: list[Record], out: Path, subtitle: str) -> list[Path]:
    """model.png: prefill and training time per backend, decode cache bytes and tokens/s."""
    seconds = lambda r: r.time.median if r.time else None  # noqa: E731
    panels = [
        ("prefill time", "seconds", _series(records, "model-prefill", seconds), "T (tokens)"),
        ("training step time", "seconds", _series(records, "model-train", seconds), "T (tokens)"),
        (
            "decode: cache bytes",
            "bytes",
            _series(records, "decode", lambda r: r.extra.get("cache_bytes")),
            "context (tokens)",
        ),
        (
            "decode: tokens/s",
            "tokens/s",
            _series(records, "decode", lambda r: r.extra.get("tokens_per_s")),
            "context (tokens)",
        ),
    ]
    panels = [p for p in panels if p[2]]
    path = _figure(out / "model.png", panels, subtitle, _styles(records))
    return [path] if path else []
