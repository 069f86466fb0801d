"""Write a suite's results: ``<suite>.json``, ``<suite>.md`` and its PNG plots into one folder."""

from __future__ import annotations

from pathlib import Path

from . import plots
from .env import settings_lines
from .report import (
    Record,
    fmt_bytes,
    fmt_rate,
    notes,
    pivot,
    table,
    to_json,
    validate,
    write_json,
)

TITLES = {
    "op-fwd": "Forward (no grad)",
    "op-fwdbwd": "Forward + backward (gradients of q, k, v)",
    "model-prefill": "Prefill (forward over T tokens, no grad)",
    "model-train": "Training step (forward, cross-entropy, backward)",
}


def env_lines(env: dict) -> list[str]:
    return [
        f"- date: {env['date']}",
        f"- device: {env['device']} ({env['device_name']}), {env['threads']} threads, "
        f"1-min load average at start {env.get('loadavg_1m')}",
        f"- torch {env['torch']}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
        f"flash-linear-attention {env.get('fla')}, python {env['python']}",
        *settings_lines(env),
    ]


def _op_sections(records: list[Record], descriptions: dict[str, str]) -> list[str]:
    out = []
    for bench in ("op-fwd", "op-fwdbwd"):
        if not any(r.bench == bench for r in records):
            continue
        out += [f"### {TITLES[bench]}: time (median ±half the interquartile range)", ""]
        out += [pivot(records, bench, "time"), ""]
        if any(r.bench == bench and r.memory_bytes is not None for r in records):
            out += [f"### {TITLES[bench]}: peak memory above the inputs", ""]
            out += [pivot(records, bench, "memory"), ""]
    used = dict.fromkeys(r.variant for r in records)
    rows = [[f"`{v}`", descriptions.get(v, "")] for v in used]
    return out + ["### Variants", "", table(["variant", "what"], rows), ""]


def _model_sections(records: list[Record]) -> list[str]:
    out = []
    for bench in ("model-prefill", "model-train"):
        if any(r.bench == bench for r in records):
            out += [f"### {TITLES[bench]}", "", pivot(records, bench, "time"), ""]
        if any(r.bench == bench and r.memory_bytes is not None for r in records):
            out += [f"### {TITLES[bench]}: peak memory above the inputs (one call)", ""]
            out += [pivot(records, bench, "memory"), ""]
    dec = [r for r in records if r.bench == "decode" and r.status == "ok"]
    if dec:
        out += ["### Decoding: time per token, tokens/s and cache bytes by context", ""]
        rows = [_decode_row(r) for r in sorted(dec, key=lambda r: (r.T, r.variant))]
        headers = ["model", "context", "per token", "tokens/s", "state", "K/V", "cache"]
        out += [table(headers, rows), ""]
    return out


def _decode_row(r: Record) -> list[str]:
    e = r.extra
    return [
        r.variant, str(r.T), f"{1e3 * r.time.median:.2f} ms", fmt_rate(e["tokens_per_s"]),
        fmt_bytes(e["state_bytes"]), fmt_bytes(e["kv_bytes"]), fmt_bytes(e["cache_bytes"]),
    ]  # fmt: skip


def write_suite(
    out: Path,
    suite: str,
    env: dict,
    config: dict,
    records: list[Record],
    extra_notes: list[str],
    command: str,
    descriptions: dict[str, str] | None = None,
    plot: bool = True,
) -> list[Path]:
    """Write ``<suite>.json``, ``<suite>.md`` and the plots; returns the paths written."""
    doc = to_json(env, {**config, "command": command}, records)
    validate(doc)
    written = [write_json(out / f"{suite}.json", doc)]
    subtitle = f"{env['device_name']}, torch {env['torch']}, {env['date'][:10]}"
    pngs = []
    if plot:
        maker = plots.op_plots if suite == "op" else plots.model_plots
        pngs = maker(records, out, subtitle)
    title = "Op-level retention benchmarks" if suite == "op" else "Model-level benchmarks"
    lines = [f"## {title} ({env['device']})", "", *env_lines(env), f"- reproduce: `{command}`", ""]
    cfg_text = ", ".join(f"{k}={v}" for k, v in config.items() if k != "command")
    lines += [f"Configuration: {cfg_text}", ""]
    if suite == "op":
        lines += _op_sections(records, descriptions or {})
    else:
        lines += _model_sections(records)
    lines += [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    skipped = notes(records) + extra_notes
    if skipped:
        lines += ["Notes:", ""] + [f"- {n}" for n in skipped] + [""]
    md = out / f"{suite}.md"
    md.write_text("\n".join(lines))
    return written + [md] + pngs
