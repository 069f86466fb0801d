"""GPU benchmark of the generated retention kernels against flash-linear-attention and SDPA.

Usage (CUDA machine): python benchmarks/bench_gpu_kernels.py --out DIR [--quick] [--modes ...]
Writes DIR/kernels_<device>_<date>.json and .md. Times are triton.testing.do_bench medians
(ms) of eager calls, and do_bench_cudagraph medians of the same call replayed from a CUDA graph
(the GPU time alone: small calls are otherwise bound by the host's launch cost); ratio =
baseline time / our time (> 1: we are faster); peak = extra bytes allocated by one call over the
inputs (torch.cuda.max_memory_allocated). Inputs are bfloat16 in the
[B, T, H, D] layout FLA takes; our kernels read the same storage as [B, H, T, D] views.
Chunkwise rows are timed four ways: the default (rule), forced fused and split passes, and split
with the backward's older six-kernel path (split6).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import platform
from pathlib import Path

import torch
import torch.nn.functional as F


def _bench(fn) -> tuple[float, int]:
    import triton.testing

    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return float(triton.testing.do_bench(fn, warmup=25, rep=100)), int(peak)


def _bench_graph(fn) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph: the GPU time without the host's launch
    cost (Python, argument binding), which eager timing of small calls mostly measures.

    Unlike do_bench, the replays do not flush L2 between calls: inputs smaller than L2 (~50 MB
    on an H100/H200) may stay warm, for ours and the baselines alike, so compare graph columns
    with graph columns."""
    import triton.testing

    fn()  # compile and autotune outside the capture
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))


def _inputs(B, T, H, K, V, grad=False):
    q, k = (torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
    for x in (q, k, v):
        x.requires_grad_(grad)
    return q, k, v


def _ours(x):
    return x.transpose(1, 2)  # [B, T, H, D] storage as [B, H, T, D]


def _gamma(H):
    from rtpcompile import ops

    return ops.retention_init_decay(H).cuda()


# NOTE: "rule" is what a call gets by default (spec.use_split); "fused" and "split" force the
# chunkwise passes one way, so one run shows what the rule leaves on the table. "split6" is split
# with the backward's three passes (six kernels) instead of its four-kernel path (dq and dk in
# one kernel, kernels/backward.py): what that kernel buys.
CHUNK_MODES = {"rule": None, "fused": {"split": 0}, "split": {"split": 1}, "split6": {"split": 1}}


@contextlib.contextmanager
def _backward_path(mode: str):
    from rtpcompile.kernels import backward

    real = backward._split_passes
    if mode == "split6":
        backward._split_passes = lambda *args: None
    try:
        yield
    finally:
        backward._split_passes = real


def _chunk_labels(BH: int, T: int, D: int, modes) -> list[tuple[str, str]]:
    """(mode, row label) to time: the rule always picks fused or split (K = V here, so every
    pass the same way), so when that mode is timed anyway its row is labelled the rule's and the
    rule is not timed twice."""
    from rtpcompile.kernels.spec import use_split

    same = "split" if use_split("chunkwise", T, D, 64, V=D, BH=BH, dtype="bfloat16") else "fused"
    out = []
    for mode in modes:
        if mode == "rule" and same in modes:
            continue
        out.append((mode, f"{mode}, the rule" if mode == same and "rule" in modes else mode))
    return out


def chunk_cases(B, H, T, D, rows, modes=tuple(CHUNK_MODES)):
    from fla.ops.retention import chunk_retention

    from rtpcompile import kernels

    q, k, v = _inputs(B, T, H, D, D, grad=True)
    do = torch.randn_like(v)
    gamma, scale = _gamma(H), D**-0.5

    def fla_fwd():
        with torch.no_grad():
            return chunk_retention(q, k, v, scale=scale)

    def fla_fwd_bwd():
        o, _ = chunk_retention(q, k, v, scale=scale)
        return torch.autograd.grad(o, (q, k, v), do)

    for mode, label in _chunk_labels(B * H, T, D, modes):
        cfg = CHUNK_MODES[mode]

        # NOTE: no final state, like FLA's call (output_final_state=False)
        def ours_fwd(cfg=cfg):
            return kernels.triton_forward(
                "chunkwise", _ours(q), _ours(k), _ours(v), gamma, scale, None, 64, cfg,
                state_out=False,
            )  # fmt: skip

        def ours_fwd_bwd(cfg=cfg, fwd=ours_fwd):
            o, sf = fwd()
            return kernels.triton_backward(
                "chunkwise", _ours(do), None, _ours(q), _ours(k), _ours(v), gamma, scale, None,
                sf, 64, cfg,
            )  # fmt: skip

        for name, ours, theirs in (
            ("fwd", ours_fwd, fla_fwd),
            ("fwd+bwd", ours_fwd_bwd, fla_fwd_bwd),
        ):
            if mode == "split6" and name == "fwd":
                continue  # the forward is split's
            shape = dict(B=B, H=H, T=T, K=D, V=D)
            with _backward_path(mode):
                _row(rows, f"chunkwise {name} ({label})", shape, ours, {"fla": theirs})


def parallel_cases(B, H, T, D, rows):
    from fla.ops.retention import parallel_retention

    from rtpcompile import kernels

    q, k, v = _inputs(B, T, H, D, D)
    gamma, scale = _gamma(H), D**-0.5
    qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))

    # NOTE: o alone, as FLA's parallel_retention and SDPA return (no state-only pass)
    def ours():
        return kernels.triton_forward(
            "parallel", _ours(q), _ours(k), _ours(v), gamma, scale, None, 64, state_out=False
        )

    baselines = {
        "fla": lambda: parallel_retention(q, k, v, scale=scale),
        "sdpa": lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True),
    }
    _row(rows, "parallel fwd", dict(B=B, H=H, T=T, K=D, V=D), ours, baselines)


def recurrent_cases(B, H, D, rows):
    from rtpcompile import kernels

    q, k, v = _inputs(B, 1, H, D, D)
    s0 = torch.randn(B, H, D, D, device="cuda")
    gamma, scale = _gamma(H), D**-0.5

    def ours():
        return kernels.triton_forward(
            "recurrent", _ours(q), _ours(k), _ours(v), gamma, scale, s0, 64
        )

    baselines = {}
    try:
        from fla.ops.retention import fused_recurrent_retention

        baselines["fla"] = lambda: fused_recurrent_retention(
            q, k, v, scale=scale, initial_state=s0, output_final_state=True
        )
    except ImportError:
        pass
    _row(rows, "recurrent decode T=1", dict(B=B, H=H, T=1, K=D, V=D), ours, baselines)


def decode_bandwidth_case(B, H, D, rows):
    """The issue's decode target: state bytes read + written by one recurrent step, as a
    fraction of the device-to-device copy bandwidth measured on the same bytes."""
    from rtpcompile import kernels

    q, k, v = _inputs(B, 1, H, D, D)
    s0 = torch.randn(B, H, D, D, device="cuda")
    gamma, scale = _gamma(H), D**-0.5
    state_bytes = 2 * s0.numel() * s0.element_size()  # read s0, write the final state
    src = torch.randn(s0.numel(), device="cuda")
    dst = torch.empty_like(src)
    row = {"case": "decode bandwidth", "B": B, "H": H, "T": 1, "K": D, "V": D}

    def step():
        return kernels.triton_forward(
            "recurrent", _ours(q), _ours(k), _ours(v), gamma, scale, s0, 64
        )

    _time_into(row, "ours", step)
    _time_into(row, "copy", lambda: dst.copy_(src))  # also reads and writes state_bytes
    # NOTE: eager figures include the host's launch cost; graph figures are the kernel's own
    # bandwidth, what a decode loop captured in a CUDA graph (reduce-overhead) gets
    for suffix in ("", "graph_"):
        ours_ms, copy_ms = row.get(f"ours_{suffix}ms"), row.get(f"copy_{suffix}ms")
        if ours_ms and copy_ms:
            row[f"ours_{suffix}GBps"] = state_bytes / ours_ms / 1e6
            row[f"copy_{suffix}GBps"] = state_bytes / copy_ms / 1e6
            row[f"{suffix}fraction_of_copy"] = copy_ms / ours_ms
    print(json.dumps(row), flush=True)
    rows.append(row)


def _time_into(row, name, fn) -> None:
    """``name``_ms and _peak_bytes (eager), ``name``_graph_ms (CUDA graph), or an error entry."""
    try:
        row[f"{name}_ms"], row[f"{name}_peak_bytes"] = _bench(fn)
    except Exception as exc:  # noqa: BLE001 - recorded, the benchmark goes on
        row[f"{name}_error"] = repr(exc)[:300]
        return
    try:
        row[f"{name}_graph_ms"] = _bench_graph(fn)
    except Exception as exc:  # noqa: BLE001 - e.g. a baseline that cannot be captured
        row[f"{name}_graph_error"] = repr(exc)[:300]


def _row(rows, what, shape, ours, baselines):
    row = {"case": what, **shape}
    _time_into(row, "ours", ours)
    for name, fn in baselines.items():
        _time_into(row, name, fn)
        for suffix in ("ms", "graph_ms"):
            if f"ours_{suffix}" in row and f"{name}_{suffix}" in row:
                kind = "ratio" if suffix == "ms" else "graph_ratio"
                row[f"{kind}_vs_{name}"] = row[f"{name}_{suffix}"] / row[f"ours_{suffix}"]
    print(json.dumps(row), flush=True)
    rows.append(row)
    torch.cuda.empty_cache()


def markdown(meta, rows) -> str:
    lines = [
        f"# Retention kernels on {meta['device']} ({meta['date']})",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, fla {meta['fla']}; bfloat16; "
        "ms = triton.testing.do_bench of eager calls (host launch cost included); graph ms = "
        "triton.testing.do_bench_cudagraph (GPU time only); ratio = baseline ms / ours ms "
        "(> 1: ours faster); peak = extra MiB allocated by one call. Chunkwise and parallel calls "
        "return no final state (ours with state_out=False, as FLA's default and SDPA); the "
        "decode step returns it.",
        "",
        "| case | B | H | T | K=V | ours ms | fla ms | ratio vs fla | ours graph ms "
        "| fla graph ms | graph ratio vs fla | sdpa ms | ratio vs sdpa | graph ratio vs sdpa "
        "| ours peak MiB | fla peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(row, key, digits=3):
        x = row.get(key)
        return "-" if x is None else f"{x:.{digits}f}"

    def mib(row, key):
        x = row.get(key)
        return "-" if x is None else f"{x / 2**20:.0f}"

    for r in (r for r in rows if r["case"] != "decode bandwidth"):
        lines.append(
            f"| {r['case']} | {r['B']} | {r['H']} | {r['T']} | {r['K']} | {f(r, 'ours_ms')} "
            f"| {f(r, 'fla_ms')} | {f(r, 'ratio_vs_fla', 2)} | {f(r, 'ours_graph_ms')} "
            f"| {f(r, 'fla_graph_ms')} | {f(r, 'graph_ratio_vs_fla', 2)} | {f(r, 'sdpa_ms')} "
            f"| {f(r, 'ratio_vs_sdpa', 2)} | {f(r, 'graph_ratio_vs_sdpa', 2)} "
            f"| {mib(r, 'ours_peak_bytes')} | {mib(r, 'fla_peak_bytes')} |"
        )
    bandwidth = [r for r in rows if r["case"] == "decode bandwidth" and "ours_ms" in r]
    if bandwidth:
        lines += [
            "",
            "Decode step, state bytes read + written (float32 state) against a device-to-device "
            "copy of the same bytes (target: >= 0.80 of copy):",
            "",
            "| timing | B | H | K=V | ours ms | ours GB/s | copy ms | copy GB/s "
            "| fraction of copy |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {label} | {r['B']} | {r['H']} | {r['K']} | {f(r, f'ours_{x}ms', 4)} "
            f"| {f(r, f'ours_{x}GBps', 0)} | {f(r, f'copy_{x}ms', 4)} "
            f"| {f(r, f'copy_{x}GBps', 0)} | {f(r, f'{x}fraction_of_copy', 2)} |"
            for r in bandwidth
            for label, x in (("eager", ""), ("CUDA graph", "graph_"))
        ]
    errors = [(r["case"], k, v) for r in rows for k, v in r.items() if k.endswith("_error")]
    for case, k, v in errors:
        lines.append(f"\n- {case}: {k} = {v}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/h200")
    parser.add_argument("--quick", action="store_true", help="only T=2048 and 4096")
    parser.add_argument(
        "--modes",
        default=",".join(CHUNK_MODES),
        help="chunkwise modes to time, among rule (the default choice), fused, split, split6",
    )
    args = parser.parse_args()
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or any(m not in CHUNK_MODES for m in modes):
        parser.error(f"--modes must name some of {list(CHUNK_MODES)}, got {args.modes!r}")
    import fla
    import triton

    device = torch.cuda.get_device_name()
    meta = {
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fla": getattr(fla, "__version__", "?"),
        "python": platform.python_version(),
    }
    rows: list[dict] = []
    B, H = 4, 16
    for D, Ts in ((128, (2048, 4096, 16384)), (256, (2048, 4096, 16384))):
        for T in Ts if not args.quick else Ts[:2]:
            chunk_cases(B, H, T, D, rows, modes)
    for T in (256, 512, 1024):
        parallel_cases(B, H, T, 128, rows)
    for D in (128, 256):
        recurrent_cases(B, H, D, rows)
    decode_bandwidth_case(64, 16, 128, rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"kernels_{device.replace(' ', '_')}_{meta['date']}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))
    assert math.isfinite(sum(r.get("ours_ms", 0.0) for r in rows))


if __name__ == "__main__":
    main()
