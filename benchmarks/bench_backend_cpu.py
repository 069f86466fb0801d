"""CPU benchmark of the rtp backend: eager vs Inductor vs rtp vs a hand-written chunkwise form.

    python benchmarks/bench_backend_cpu.py         # quick: stack, T = 256, 1024, 8-layer compile
    python benchmarks/bench_backend_cpu.py --full  # stack + demo, T = 2048, 8192, 16384, 24 layers

Models: ``stack`` (4 retention layers in the paper's parallel form, dim 128, 2 heads) and
``demo`` (rtpcompile.nn.default_model()). Variants: ``eager``, ``inductor``, ``rtp`` (all three
on the parallel-form model) and ``chunkwise`` (the same weights in a hand-written chunkwise
form, run eagerly). Forward only, under ``torch.inference_mode``.

Method: every (model, T, variant) runs in its own worker subprocess, so its peak memory is its
own (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, reported minus the RSS right after the
model is built; for compiled variants it includes compilation). Workers stay alive and the
driver asks them for one timed forward in turn (round robin), so the repetitions of the
variants are interleaved and drift hits all of them alike; the median is reported. A worker's
address space is capped at ``--mem-limit-gb`` (RLIMIT_DATA): a variant that would exceed it
reports "OOM" instead of taking the machine down.

Separately, ``--compile-layers`` (quick 8, full 24) times the first call of a deeper stack under
"inductor" and "rtp" with Inductor's caches off, and reads rtpcompile.backend.counters for the
time spent in detection and rewrite. Results: a markdown table on stdout, and
benchmarks/results/cpu/backend_<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ("eager", "inductor", "rtp", "chunkwise")
MODELS = ("stack", "demo")
QUICK = {"T": "256,1024", "models": "stack", "compile_layers": 8}
FULL = {"T": "2048,8192,16384", "models": "stack,demo", "compile_layers": 24}


# ------------------------------------------------------------------------------ worker side


def _rss_kb() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _status_kb(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process in KiB (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> int | None:
    """Resets this process's peak RSS (Linux ``clear_refs``); the RSS it starts from, or None.

    NOTE: the peak after the warm-up call is the run's own: a compiled variant's first call
    includes compilation (the mask proof alone can take ~3 masks), which hid a T x T buffer
    built on every call."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_kb("VmRSS")


def _worker(spec: dict) -> None:
    """Build one variant, then answer 'time' (one timed forward) and 'quit' on stdin."""
    import resource

    limit = int(spec["mem_limit_gb"] * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    import torch
    from bench_backend_cpu_models import build

    torch.set_num_threads(spec["threads"])
    variant = spec["variant"]
    form = "chunkwise" if variant == "chunkwise" else "parallel"
    model = build(spec["model"], form, spec["layers"], spec["chunk"]).eval()
    x = model.make_input(spec["T"])
    fn = model if variant in ("eager", "chunkwise") else torch.compile(model, backend=variant)
    base = _rss_kb()
    run_base = None
    for line in sys.stdin:
        cmd = line.strip()
        reply: dict = {}
        if cmd == "time":
            try:
                with torch.inference_mode():
                    start = time.perf_counter()
                    fn(x)
                    reply["seconds"] = time.perf_counter() - start
                if run_base is None:  # NOTE: the first call warms up (and compiles)
                    run_base = _reset_peak() or -1
            except (RuntimeError, MemoryError) as err:  # NOTE: allocation failure under the cap
                reply["error"] = "OOM" if "alloc" in str(err).lower() else str(err)[:200]
        elif cmd == "quit":
            reply = {"peak_mb": _rss_kb() / 1024, "base_mb": base / 1024}
            hwm = _status_kb("VmHWM")
            if run_base and run_base > 0 and hwm is not None:
                reply["run_extra_mb"] = (hwm - run_base) / 1024
        print(json.dumps(reply), flush=True)
        if cmd == "quit":
            return


# ------------------------------------------------------------------------------ driver side


class Worker:
    def __init__(self, spec: dict):
        cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.failed: str | None = None

    def ask(self, cmd: str) -> dict:
        if self.failed:
            return {"error": self.failed}
        try:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self.failed = f"worker exited ({self.proc.wait()})"
            return {"error": self.failed}
        reply = json.loads(line)
        if "error" in reply:
            self.failed = reply["error"]
        return reply

    def close(self) -> dict:
        reply = self.ask("quit")
        self.proc.wait()
        return reply


def measure(model: str, T: int, args) -> dict:
    """Interleaved timings (warm-up call first) and peak memory of every variant at one T."""
    spec = dict(model=model, T=T, layers=args.layers, chunk=args.chunk, threads=args.threads)
    spec["mem_limit_gb"] = args.mem_limit_gb
    workers = {v: Worker(dict(spec, variant=v)) for v in args.variants}
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    for rep in range(args.reps + 1):  # rep 0 warms up (and compiles)
        for v, w in workers.items():
            reply = w.ask("time")
            if rep and "seconds" in reply:
                times[v].append(reply["seconds"])
    row = {}
    for v, w in workers.items():
        mem = w.close()
        row[v] = {
            "median_s": statistics.median(times[v]) if times[v] else None,
            "times_s": times[v],
            "peak_mb": mem.get("peak_mb"),
            "extra_mb": mem["peak_mb"] - mem["base_mb"] if "peak_mb" in mem else None,
            "run_extra_mb": mem.get("run_extra_mb"),
            "error": w.failed,
        }
    return row


def compile_timing(args) -> dict:
    """First-call time of a deep stack under inductor and rtp, plus the backend's counters."""
    code = f"""
import json, sys, time, torch
sys.path[:0] = [{str(HERE)!r}, {str(HERE.parent)!r}]
from bench_backend_cpu_models import RetentionStack
backend = sys.argv[1]
m = RetentionStack(layers={args.compile_layers}).eval()
x = m.make_input(256)
start = time.perf_counter()
with torch.inference_mode():
    torch.compile(m, backend=backend)(x)
out = {{"first_call_s": time.perf_counter() - start}}
if backend == "rtp":
    from rtpcompile.backend import counters
    out.update({{k: v for k, v in counters.items()}})
print(json.dumps(out))
"""
    env = dict(os.environ, TORCHINDUCTOR_FX_GRAPH_CACHE="0", TORCHINDUCTOR_AUTOGRAD_CACHE="0")
    result = {}
    for backend in ("inductor", "rtp"):
        proc = subprocess.run(
            [sys.executable, "-c", code, backend], capture_output=True, text=True, env=env
        )
        lines = proc.stdout.strip().splitlines()
        result[backend] = (
            json.loads(lines[-1])
            if proc.returncode == 0 and lines
            else {"error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
        )
    return result


def _fmt_row(model: str, T: int, row: dict, variants) -> str:
    eager = row.get("eager", {}).get("median_s")
    cells = [model, str(T)]
    for v in variants:
        r = row[v]
        if r["median_s"] is None:
            cells.append(r["error"] or "n/a")
            continue
        ratio = f" ({eager / r['median_s']:.2f}x)" if eager else ""
        mem = f", +{r['extra_mb']:.0f} MB" if r["extra_mb"] is not None else ""
        if r.get("run_extra_mb") is not None:
            mem += f" (calls +{r['run_extra_mb']:.0f} MB)"
        cells.append(f"{1e3 * r['median_s']:.1f} ms{ratio}{mem}")
    return "| " + " | ".join(cells) + " |"


def to_markdown(results: dict, args) -> str:
    head = "| model | T | " + " | ".join(args.variants) + " |"
    lines = [
        f"CPU backend benchmark {results['date']} ({results['machine']}, {args.threads} threads)",
        "",
        "Forward median of interleaved reps; (speed-up vs eager), +extra peak RSS over the built",
        "model (compiled variants include compilation); (calls +MB): the peak over the RSS",
        "after the warm-up call, i.e. what the timed calls themselves allocate (Linux only).",
        "",
        head,
        "|" + "---|" * (len(args.variants) + 2),
    ]
    for model, by_t in results["runs"].items():
        for T, row in by_t.items():
            lines.append(_fmt_row(model, T, row, args.variants))
    ct = results.get("compile")
    if ct:
        ind, rtp = ct.get("inductor", {}), ct.get("rtp", {})
        lines += ["", f"Compile time, {args.compile_layers}-layer stack, first call (s):", ""]
        lines.append(f"- inductor: {ind.get('first_call_s', ind.get('error'))}")
        lines.append(f"- rtp: {rtp.get('first_call_s', rtp.get('error'))}")
        for key in ("detect_seconds", "rewrite_seconds", "compile_seconds", "regions_claimed"):
            if key in rtp:
                lines.append(f"- rtp {key}: {rtp[key]}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="the full sweep (long; run it once)")
    p.add_argument("--T", help="comma-separated sequence lengths (quick 256,1024)")
    p.add_argument("--models", help="comma-separated: stack, demo (quick: stack)")
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}"
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--mem-limit-gb", type=float, default=10.0)
    p.add_argument("--compile-layers", type=int, help="0 skips it (quick 8, full 24)")
    p.add_argument("--out-dir", default=str(HERE / "results" / "cpu"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(json.loads(args.worker))
    preset = FULL if args.full else QUICK
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.variants = tuple(_names(p, "--variants", args.variants, VARIANTS))
    args.models = ",".join(_names(p, "--models", args.models, MODELS))
    try:
        lengths = [int(t) for t in args.T.split(",") if t.strip()]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1:
        p.error(f"argument --T: expected positive integers like 256,1024, got {args.T!r}")
    now = dt.datetime.now(dt.timezone.utc)
    results = {
        "date": now.isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
    }
    results["runs"] = {}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"backend_{now.strftime('%Y%m%d-%H%M')}"
    for model in args.models.split(","):
        for T in lengths:
            print(f"[bench] {model} T={T} ...", file=sys.stderr, flush=True)
            results["runs"].setdefault(model, {})[T] = measure(model, T, args)
            _write(stem, results, args)  # NOTE: partial results survive an interrupted sweep
    if args.compile_layers:
        print(f"[bench] compile timing, {args.compile_layers} layers ...", file=sys.stderr)
        results["compile"] = compile_timing(args)
    print(_write(stem, results, args))
    print(f"[bench] wrote {stem}.json and .md", file=sys.stderr)


def _names(p: argparse.ArgumentParser, flag: str, text: str, valid: tuple[str, ...]) -> list[str]:
    """Comma-separated names from ``valid``; anything else ends the command (usage, exit 2)."""
    chosen = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in chosen if x not in valid]
    if bad or not chosen:
        p.error(f"argument {flag}: expected some of {list(valid)}, got {text!r}")
    return chosen


def _write(stem: Path, results: dict, args) -> str:
    md = to_markdown(results, args)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(md)
    return md


if __name__ == "__main__":
    main()
