"""Triton's own host steps for each launch of our kernels, timed on a CPU for an sm_90 target.

Usage (any machine with Triton's NVIDIA backend, bundled with the Linux wheels; no GPU needed):
    python benchmarks/triton_launch_cost.py [--out benchmarks/results/cpu] [--calls 20000]

Before its C launcher runs, ``JITFunction.run`` binds and specialises every argument (the
binder: one ``specialize_impl`` per tensor, stride and size), builds the cache key, and compares
every constexpr global the kernel reads with its compile-time copy. This script runs those three
steps as ``run`` does (``aot.specialization``'s binder, for sm_90), on the arguments
``launch._call`` passes for the kernels of ``call_overhead.py``'s two cases, and times them for
the kernels as generated (the spec's constants inlined as literals,
``kernels/inline_constants.py``) and as the templates read before (module-level
``tl.constexpr`` constants) in one run. Median of 5 repeats, microseconds per launch. What is not
timed: the grid, ``launch_metadata`` and the C launcher itself (they need a driver).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import timeit
from contextlib import nullcontext
from pathlib import Path

import torch

# (name, B, H, T, K, V, with initial state), as call_overhead.py's cases but at a GPU batch
CASES = (
    ("decode T=1", 64, 16, 1, 128, 128, True),
    ("prefill T=2048", 4, 16, 2048, 128, 128, False),
)


def _launched_specs(B, H, T, K, V, with_state) -> list:
    """The kernel specs a bfloat16 forward + backward call of the case launches, in order."""
    from rtpcompile import ops
    from rtpcompile.kernels import launch

    seen = []
    os.environ.update(TRITON_INTERPRET="1", RTP_KERNELS="triton")  # CPU tensors to the kernels
    # NOTE: the binder imports gluon lazily, which asserts that triton.language's functions are
    # JIT functions unless interpreting; they are interpreted ones when Triton was first imported
    # under TRITON_INTERPRET=1 (as in the test suite), so gluon is imported while it is set
    import triton.experimental.gluon  # noqa: F401

    real = launch._launch
    launch._launch = lambda spec, *args, **kwargs: seen.append(spec)
    try:
        dt = torch.bfloat16
        q, k = (torch.randn(B, H, T, K, dtype=dt, requires_grad=True) for _ in range(2))
        v = torch.randn(B, H, T, V, dtype=dt, requires_grad=True)
        s0 = torch.zeros(B, H, K, V) if with_state else None
        gamma = ops.retention_init_decay(H)
        o, _ = ops.retention(q, k, v, gamma, initial_state=s0, output_final_state=True)
        torch.autograd.grad(o.float().sum(), (q, k, v))
    finally:
        launch._launch = real
        os.environ.pop("TRITON_INTERPRET")  # the steps below compile for sm_90, not interpret
    return seen


def _steps(spec, shape, calls: int) -> dict:
    """Microseconds per launch of the binder, the cache key and the globals check."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    from rtpcompile.kernels import aot, codegen, launch

    fn = codegen.load(spec).kernel
    fn.cache_key  # noqa: B018 - fills used_global_vals, as the first launch does
    bind = create_function_from_signature(
        fn.signature, fn.params, make_backend(GPUTarget("cuda", 90, 32))
    )
    args = aot.launch_arguments(spec, shape)
    options = launch.compile_options(spec)
    _, specialization, found_options = bind(*args, **options)
    key_cache: dict = {}
    used = fn.used_global_vals

    def globals_check():  # JITFunction.run's loop
        absent = object()
        for (name, _), (val, where) in used.items():
            if where.get(name, absent) != val:
                raise RuntimeError(name)

    def time(f) -> float:
        f()
        return statistics.median(timeit.repeat(f, number=calls, repeat=5)) / calls * 1e6

    return {
        "kernel": spec.short(),
        "arguments": len(args),
        "binder_us": round(time(lambda: bind(*args, **options)), 2),
        "cache_key_us": round(
            time(lambda: compute_cache_key(key_cache, specialization, found_options)), 2
        ),
        "globals": len(used),
        "globals_us": round(time(globals_check), 2),
    }


def measure(calls: int) -> list[dict]:
    from rtpcompile.kernels import inline_constants

    torch.set_num_threads(1)
    before = {name: os.environ.get(name) for name in ("TRITON_INTERPRET", "RTP_KERNELS")}
    rows = []
    try:
        for name, B, H, T, K, V, with_state in CASES:
            for spec in _launched_specs(B, H, T, K, V, with_state):
                row = {"case": name}
                for label, module_constants in (("inlined", False), ("module", True)):
                    chosen = inline_constants.module_constants() if module_constants else None
                    with chosen or nullcontext():
                        steps = _steps(spec, (B, H, T), calls)
                    row.update(kernel=steps.pop("kernel"), arguments=steps.pop("arguments"))
                    row.update({f"{label}_{key}": value for key, value in steps.items()})
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# Triton's host steps per launch of our kernels ({meta['date']})",
        "",
        f"{meta['machine']}, triton {meta['triton']}, Python {meta['python']}; sm_90 target, "
        f"no GPU; microseconds per launch (median of 5 x {meta['calls']}). Reproduce: "
        "`python benchmarks/triton_launch_cost.py`. Constants inlined (as generated) against "
        "module-level ``tl.constexpr`` constants (as the templates read them): the binder and "
        "the key are the same work, the globals check is what inlining removes.",
        "",
        "| case | kernel | arguments | binder | cache key | globals checked (their time), "
        "inlined | globals checked (their time), module constants |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['kernel']} | {r['arguments']} | {r['inlined_binder_us']} | "
            f"{r['inlined_cache_key_us']} | {r['inlined_globals']} ({r['inlined_globals_us']}) | "
            f"{r['module_globals']} ({r['module_globals_us']}) |"
        )
    lines += ["", "Per call (all its launches):", ""]
    lines += ["| case | launches | steps, inlined | steps, module constants |", "|---|---|---|---|"]
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case]

        def total(label, mine=mine):
            steps = ("binder", "cache_key", "globals")
            return sum(r[f"{label}_{step}_us"] for r in mine for step in steps)

        lines.append(f"| {case} | {len(mine)} | {total('inlined'):.1f} | {total('module'):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import triton

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write triton_launch_cost.{json,md} here")
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    rows = measure(args.calls)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "triton": triton.__version__,
        "python": platform.python_version(),
        "calls": args.calls,
    }
    text = markdown(meta, rows)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "triton_launch_cost.json").write_text(
            json.dumps({"meta": meta, "rows": rows}, indent=1)
        )
        (out / "triton_launch_cost.md").write_text(text)


if __name__ == "__main__":
    main()
