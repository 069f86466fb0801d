"""Per-token time of a compiled CPU decode loop: backend "rtp" vs "inductor" vs eager.

    python benchmarks/cpu_decode.py                     # layouts default, A, C; 2 rounds
    python benchmarks/cpu_decode.py --layouts default --rounds 3
    python benchmarks/cpu_decode.py --layouts A --backends eager --steps 5 --out /tmp/d  # smoke

B=1, one thread, a 128-token prompt through the model's cache, 20 warm-up steps, then the median
of 300 one-token steps (``--steps``). Each (round, layout, backend) runs in its own subprocess
(a fresh Dynamo and Inductor), backends interleaved within a round so drift hits them alike.
Writes a markdown table to stdout and benchmarks/results/cpu/decode_<date>.md (or ``--out``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BACKENDS = ("eager", "inductor", "rtp")

_WORKER = """
import statistics, sys, time, torch
from rtpcompile.nn import RTPHybridLM, default_model
torch.set_num_threads(1)
backend, layout, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
m = default_model() if layout == "default" else RTPHybridLM(256, 256, 6, 8, layout=layout)
m.eval()
f = m if backend == "eager" else torch.compile(m, backend=backend)
with torch.no_grad():
    cache = m.new_cache(1)
    f(torch.randint(0, 256, (1, 128)), cache)
    x = torch.randint(0, 256, (1, 1))
    for _ in range(20):
        f(x, cache)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        f(x, cache)
        times.append(time.perf_counter() - t)
print(statistics.median(times) * 1e3)
"""


def _one(backend: str, layout: str, steps: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _WORKER, backend, layout, str(steps)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode:
        raise SystemExit(f"worker {backend}/{layout} failed:\n{out.stderr}")
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="default,A,C")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300, help="timed one-token steps")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cpu")
    args = parser.parse_args(argv)
    layouts = args.layouts.split(",")
    backends = args.backends.split(",")
    if not set(backends) <= set(BACKENDS):
        parser.error(f"--backends: expected some of {list(BACKENDS)}, got {args.backends!r}")
    found: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for layout in layouts:
            for backend in backends:
                found.setdefault((layout, backend), []).append(_one(backend, layout, args.steps))
    load = os.getloadavg()[0]
    lines = [
        f"# CPU decode per token ({dt.date.today()}, {os.cpu_count()} cores, one thread, "
        f"load average {load:.1f} at the end)",
        "",
        f"`python benchmarks/cpu_decode.py --layouts {args.layouts} --rounds {args.rounds} "
        f"--steps {args.steps} --backends {args.backends}`: median of {args.steps} one-token "
        "steps after a 128-token prompt, B=1; each cell lists the rounds.",
        "",
    ]
    ratio = {"rtp", "inductor"} <= set(backends)
    lines += [
        "| model | " + " | ".join(backends) + " |" + (" rtp / inductor |" if ratio else ""),
        "|---|" + "---|" * (len(backends) + ratio),
    ]
    for layout in layouts:
        cells = [", ".join(f"{t:.2f}" for t in found[layout, b]) + " ms" for b in backends]
        row = f"| {layout} | " + " | ".join(cells) + " |"
        if ratio:
            median = {b: statistics.median(found[layout, b]) for b in ("rtp", "inductor")}
            row += f" {median['rtp'] / median['inductor']:.2f} |"
        lines.append(row)
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"decode_{dt.date.today():%Y%m%d}.md"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
