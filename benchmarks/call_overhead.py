"""Host-side cost of one rtp op call on the Triton path, with the kernel launch itself mocked.

Usage (any machine; no GPU needed):
    python benchmarks/call_overhead.py [--out benchmarks/results/cpu] [--calls 3000]

What a GPU call pays in Python before Triton's own launcher runs: options, the planner, the
kernel spec of every pass, output allocation; and the public op as users call it eagerly, with
and without the custom op's dispatch (``RTP_EAGER_BYPASS``, ``lowering/eager.py``). A decode
step's kernel reads and writes the state in a few tens of microseconds on an H100/H200, so this
overhead decides whether an eager decode step is launch-bound. Tensors are CPU tensors routed
to the kernels (``RTP_KERNELS=triton``); ``launch._launch`` is replaced by a no-op, so nothing
runs under the interpreter and the figures are the Python path alone (CPU allocation of the
outputs included, which the CUDA caching allocator makes cheaper; the backward column also
includes its d gamma tail). Median of 5 repeats of ``--calls`` calls, in microseconds per call.

The launch columns count what one call would launch on a GPU, exactly: the Triton kernels (calls
of the mocked launcher) plus the torch ops that run a device kernel (seen by a
``TorchDispatchMode``; views and empty allocations launch nothing). On a GPU each launch costs a
few microseconds of host time and of device latency, which is what an eager small call pays.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import timeit
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# (name, B, H, T, K, V, with initial state): a decode step and a training-length prefill.
# NOTE: B and H are small on purpose: the Python path does not depend on them, while on a CPU
# the backward's few element-wise torch ops (d gamma's sum and state terms) would otherwise add
# real work.
CASES = (
    ("decode T=1", 1, 2, 1, 128, 128, True),
    ("prefill T=2048", 1, 2, 2048, 128, 128, False),
)


def _per_call(fn, calls: int) -> float:
    fn()
    return statistics.median(timeit.repeat(fn, number=calls, repeat=5)) / calls * 1e6


def _callables(B, H, T, K, V, with_state) -> tuple[str, dict]:
    """The chosen form and the calls to time for one case."""
    from rtpcompile import kernels, ops
    from rtpcompile.lowering import plan

    q, k = (torch.randn(B, H, T, K) for _ in range(2))
    v = torch.randn(B, H, T, V)
    gamma, scale = ops.retention_init_decay(H), K**-0.5
    s0 = torch.zeros(B, H, K, V) if with_state else None
    chosen = plan.choose("auto", T, with_state, q=q, v=v)

    def op():
        return torch.ops.rtp.retention_fwd(q, k, v, gamma, scale, s0, "auto", 0)

    def op_no_grad():
        with torch.no_grad():
            return op()

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def public():  # the public op forward, as a user calls it eagerly
        return ops.retention(*leaves, gamma, initial_state=s0, output_final_state=True)

    def public_no_grad():
        with torch.no_grad():
            return public()

    def public_fwd_bwd():
        o, _ = public()
        return torch.autograd.grad(o, leaves, do)

    o, sf = op()
    do = torch.randn_like(o)
    return chosen.form, {
        "op": op,
        "op_no_grad": op_no_grad,
        "op_bwd": lambda: torch.ops.rtp.retention_bwd(
            do, None, q, k, v, gamma, scale, s0, sf, "auto", 0
        ),
        # NOTE: "_op" columns: the same public calls with RTP_EAGER_BYPASS=0 (through the op)
        "public_no_grad": public_no_grad,
        "public_no_grad_op": public_no_grad,
        "public_fwd_bwd": public_fwd_bwd,
        "public_fwd_bwd_op": public_fwd_bwd,
        "plan": lambda: plan.choose("auto", T, with_state, q=q, v=v),
        "kernels": lambda: kernels.triton_forward(
            chosen.form, q, k, v, gamma, scale, s0, chosen.chunk_size, None
        ),
    }


# NOTE: ops that allocate without writing (or only fill metadata) launch no device kernel
_NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


class _DeviceOps(TorchDispatchMode):
    """Counts the torch ops of a call that would launch a device kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "rtp":
            # NOTE: our op is not a launch: count the ops inside its CPU implementation
            with self:
                return func.redispatch(_CPU, *args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _NO_LAUNCH:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


_TRITON_LAUNCHES: list[int] = []


def _launches(fn) -> tuple[int, int]:
    """(Triton kernels, torch device ops) one call of ``fn`` launches."""
    _TRITON_LAUNCHES.clear()
    with _DeviceOps() as seen:
        fn()
    if os.environ.get("RTP_SHOW_OPS"):
        print(seen.ops)
    return len(_TRITON_LAUNCHES), len(seen.ops)


def measure(calls: int) -> list[dict]:
    os.environ.update(TRITON_INTERPRET="1", RTP_KERNELS="triton")
    from rtpcompile.kernels import launch
    from rtpcompile.lowering import eager

    # the Python path only; each would-be launch is counted
    launch._launch = lambda *args, **kwargs: _TRITON_LAUNCHES.append(1)
    # NOTE: unlaunched outputs hold whatever memory held; the backward's few element-wise ops on
    # them would time denormal arithmetic, not the path
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)  # small tensors: thread start-up would be noise, not the path
    rows = []
    for name, B, H, T, K, V, with_state in CASES:
        form, calls_of = _callables(B, H, T, K, V, with_state)
        row = {"case": name, "B": B, "H": H, "T": T, "K": K, "V": V, "form": form}
        for label, fn in calls_of.items():
            with eager.bypassing(not label.endswith("_op")):
                row[f"{label}_us"] = round(_per_call(fn, calls), 1)
        for label in ("op", "op_bwd"):
            row[f"{label}_triton"], row[f"{label}_torch_ops"] = _launches(calls_of[label])
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# Host-side cost of one rtp op call ({meta['date']})",
        "",
        f"{meta['machine']}, torch {meta['torch']}, Python {meta['python']}; kernel launch "
        "mocked; microseconds per call (median of 5 x "
        f"{meta['calls']}). Reproduce: `python benchmarks/call_overhead.py`.",
        "",
        "| case | form | forward op | forward op, no_grad | backward op | planner | "
        "forward kernel layer (specs, outputs) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} (B={r['B']}, H={r['H']}, K={r['K']}, V={r['V']}) | {r['form']} | "
            f"{r['op_us']} | {r['op_no_grad_us']} | {r['op_bwd_us']} | {r['plan_us']} | "
            f"{r['kernels_us']} |"
        )
    lines += [
        "",
        "The public op as a user calls it eagerly (``ops.retention``, initial state as in the "
        "case, "
        "``output_final_state=True``), skipping the custom op's dispatch (the default) and through "
        "the op (``RTP_EAGER_BYPASS=0``); forward under no_grad, and forward + "
        "``autograd.grad`` for q, k, v:",
        "",
        "| case | forward, no_grad | forward, no_grad, through the op | forward + backward | "
        "forward + backward, through the op |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['public_no_grad_us']} | {r['public_no_grad_op_us']} | "
            f"{r['public_fwd_bwd_us']} | {r['public_fwd_bwd_op_us']} |"
        )
    lines += [
        "",
        "Launches per call on a GPU (exact counts: Triton kernels + torch ops that run a kernel):",
        "",
        "| case | forward op | backward op |",
        "|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['op_triton']} + {r['op_torch_ops']} | "
            f"{r['op_bwd_triton']} + {r['op_bwd_torch_ops']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write call_overhead.{json,md} here")
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    rows = measure(args.calls)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "calls": args.calls,
    }
    text = markdown(meta, rows)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "call_overhead.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (out / "call_overhead.md").write_text(text)


if __name__ == "__main__":
    main()
