"""CPU benchmark: a training step of a checkpointed retention stack, eager vs Inductor vs rtp.

    python benchmarks/cpu_checkpoint_training.py              # T = 1024, 2048
    python benchmarks/cpu_checkpoint_training.py --T 4096 --reps 3
    python benchmarks/cpu_checkpoint_training.py --learnable    # trainable decays

Model: ``RetentionStack`` of bench_backend_cpu_models.py (4 layers written in the paper's
parallel form, dim 128, 2 heads) with every layer under ``torch.utils.checkpoint``
(``use_reentrant=False``), as gradient checkpointing trains it. Variants: ``eager``,
``inductor`` and ``rtp`` on that model, and ``inductor-no-checkpoint`` and
``rtp-no-checkpoint`` (the same stack without the checkpoints) to show what the checkpoints
cost and save. One step is forward, ``sum().backward()`` and clearing the gradients.
``--learnable`` makes each layer's log-decay a trainable parameter (its gradient then goes
back through the layer's T x T mask; results go to checkpoint_training_learnable_<date>.md).

Method: each variant runs in its own subprocess. It builds the model, runs two steps at the
measured length (compiling), then times ``--reps`` steps and reports the median, and the peak
RSS rise of one more step (``rtpcompile.bench.memory.PeakRSS``, glibc's mmap threshold at
128 KiB so large buffers are returned on free). Results: a markdown table on stdout and
benchmarks/results/cpu/checkpoint_training_<date>.md.
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
VARIANTS = ("eager", "inductor", "rtp", "inductor-no-checkpoint", "rtp-no-checkpoint")
PREFIX = "RTP_CKPT_RESULT "


def _worker(spec: dict) -> dict:
    import torch
    from torch.utils.checkpoint import checkpoint

    sys.path.insert(0, str(HERE))
    from bench_backend_cpu_models import RetentionStack

    from rtpcompile.bench.memory import PeakRSS

    torch.set_num_threads(spec["threads"])
    variant = spec["variant"]

    class Checkpointed(RetentionStack):
        def forward(self, x):
            for layer in self.layers:
                x = checkpoint(layer, x, use_reentrant=False)
            return x

    model = (RetentionStack if variant.endswith("-no-checkpoint") else Checkpointed)()
    if spec.get("learnable"):
        for layer in model.layers:
            log_gamma = layer._buffers.pop("log_gamma")
            layer.log_gamma = torch.nn.Parameter(log_gamma)
    backend = None if variant == "eager" else variant.split("-")[0]
    fn = model if backend is None else torch.compile(model, backend=backend)
    x = model.make_input(spec["T"]).requires_grad_()

    def step():
        fn(x).sum().backward()
        model.zero_grad(set_to_none=True)
        x.grad = None

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    step()
    times = []
    for _ in range(spec["reps"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    with PeakRSS() as peak:
        step()
    return {"median_s": statistics.median(times), "first_s": first, "peak_bytes": peak.bytes}


def measure(variant: str, T: int, args) -> dict:
    spec = {"variant": variant, "T": T, "reps": args.reps, "threads": args.threads}
    spec["learnable"] = args.learnable
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    env["MALLOC_TRIM_THRESHOLD_"] = str(128 * 1024)
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(PREFIX):
            return json.loads(line[len(PREFIX) :])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {tail[:160]}"}


def to_markdown(results: dict, args) -> str:
    learnable = " with trainable decays" if args.learnable else ""
    flag = " --learnable" if args.learnable else ""
    lines = [
        f"# Training step of a checkpointed retention stack{learnable}, CPU ({dt.date.today()})",
        "",
        f"`python benchmarks/cpu_checkpoint_training.py --T {args.T} --reps {args.reps}{flag}` on "
        f"{platform.machine()} ({os.cpu_count()} cores, {args.threads} threads), Python "
        f"{platform.python_version()}, torch {_torch_version()}. 4 layers in the paper's parallel "
        "form, dim 128, 2 heads, batch 1; each layer under torch.utils.checkpoint except in the "
        "-no-checkpoint variants. Median step (forward + backward) of the reps after two "
        "warm-up steps; peak RSS rise of one more step. Ratios: checkpointed Inductor's time or "
        "memory over the variant's.",
        "",
        "| T | variant | step (ms) | vs inductor | peak step memory (MiB) | vs inductor |",
        "|---|---|---|---|---|---|",
    ]
    for T, rows in results.items():
        base = rows.get("inductor", {})
        for variant, row in rows.items():
            if "error" in row:
                lines.append(f"| {T} | {variant} | {row['error']} | | | |")
                continue
            ms, mib = row["median_s"] * 1e3, row["peak_bytes"] / 2**20
            speed = f"{base['median_s'] / row['median_s']:.2f}x" if "median_s" in base else "-"
            memory = (
                f"{base['peak_bytes'] / row['peak_bytes']:.2f}x"
                if base.get("peak_bytes") and row["peak_bytes"]
                else "-"
            )
            lines.append(f"| {T} | {variant} | {ms:.0f} | {speed} | {mib:.0f} | {memory} |")
    return "\n".join(lines) + "\n"


def _torch_version() -> str:
    import torch

    return torch.__version__


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", default="1024,2048", help="comma-separated sequence lengths")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--learnable", action="store_true", help="trainable log-decays")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out-dir", default=str(HERE / "results" / "cpu"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(PREFIX + json.dumps(_worker(json.loads(args.worker))), flush=True)
        return
    wanted = set(args.variants.split(","))
    if wanted - set(VARIANTS):
        p.error(f"--variants: unknown {sorted(wanted - set(VARIANTS))}, choose from {VARIANTS}")
    variants = [v for v in VARIANTS if v in wanted]
    results = {}
    for T in (int(t) for t in args.T.split(",")):
        results[T] = {v: measure(v, T, args) for v in variants}
        print(f"T={T}: " + json.dumps(results[T]), file=sys.stderr, flush=True)
    text = to_markdown(results, args)
    print(text)
    name = "checkpoint_training_learnable" if args.learnable else "checkpoint_training"
    out = Path(args.out_dir) / f"{name}_{dt.date.today():%Y%m%d}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
