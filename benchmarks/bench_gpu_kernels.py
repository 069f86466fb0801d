"""GPU benchmark of the retention ops against flash-linear-attention and SDPA.

Usage (CUDA machine): python benchmarks/bench_gpu_kernels.py --out DIR [--quick] [--modes ...]
Writes DIR/kernels_<device>_<date>.json and .md, both rewritten after every row (a run cut off
by a timeout keeps the rows it finished; meta "finished" says whether it ran to the end). Times
are triton.testing.do_bench medians (ms) of eager calls, and do_bench_cudagraph medians of the
same call replayed from a CUDA graph (the GPU time alone: small calls are otherwise bound by the
host's launch cost); ratio = baseline time / our time (> 1: we are faster); peak = extra bytes
allocated by one call over the inputs (torch.cuda.max_memory_allocated).

"ours" is the public op as a user calls it (``rtpcompile.ops.retention_chunkwise`` /
``retention_parallel`` / ``retention_recurrent``, fwd+bwd through autograd), like FLA's public
autograd functions; "kernels" (eager only) is the generated kernels called directly
(``kernels.triton_forward`` / ``triton_backward``, no op dispatch, planning or autograd): what
the 2026-11-23 table timed as "ours". Inputs are bfloat16 in the [B, T, H, D] layout FLA takes;
ours read the same storage as [B, H, T, D] views (the op takes any strides). FLA is optional:
without it the FLA columns are empty and meta "fla" is None.
Chunkwise rows are timed four ways: the default (rule), forced fused and split passes, and split
with the backward's older six-kernel path (split6).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import itertools
import json
import math
import os
import platform
import types
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
    # NOTE: do_bench's default return_mode is "mean"; the tables are medians
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return float(ms), int(peak)


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


@functools.cache
def _fla() -> types.SimpleNamespace:
    """flash-linear-attention, imported once: ``ops`` (fla.ops.retention, or None when it does
    not import), ``version`` (None without it) and ``error`` (why not). The benchmark runs
    without it: FLA's columns are then empty, ours and SDPA's are timed all the same."""
    try:
        import fla
        from fla.ops import retention
    except Exception as exc:  # noqa: BLE001 - missing, or broken against this torch/triton
        return types.SimpleNamespace(ops=None, version=None, error=repr(exc)[:300])
    return types.SimpleNamespace(
        ops=retention, version=getattr(fla, "__version__", "?"), error=None
    )


def _fla_fn(name: str):
    """``fla.ops.retention.<name>``, or None without FLA (or without that function)."""
    fla_ops = _fla().ops
    return None if fla_ops is None else getattr(fla_ops, name, None)


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


@contextlib.contextmanager
def _chunk_config(cfg: dict | None):
    """The public ops' chunkwise calls (forward and backward) run with ``cfg`` merged into the
    planner's kernel config: how the op is timed with its passes forced fused or split. None
    changes nothing (the "rule" rows: exactly a user's call)."""
    from rtpcompile.lowering import plan

    real = plan.choose

    def choose(*args, **kwargs):
        p = real(*args, **kwargs)
        if p.form != "chunkwise":
            return p
        return dataclasses.replace(p, config=tuple(sorted({**dict(p.config), **cfg}.items())))

    if cfg:
        plan.choose = choose
    try:
        yield
    finally:
        plan.choose = real


def _chunk_labels(BH: int, T: int, D: int, modes) -> list[tuple[str, dict[str, str]]]:
    """(mode, {row: label}) to time, rows among "fwd" and "fwd+bwd". The rule picks fused or
    split per phase (K = V here, so every pass of one phase the same way): a forced mode that
    does what the rule does for a row is labelled the rule's there, and the rule's own row is
    timed only where no forced mode does the same (e.g. fused forward with split backward)."""
    from rtpcompile.kernels.spec import use_split

    def rule(phase: str) -> str:
        split = use_split("chunkwise", T, D, 64, V=D, BH=BH, dtype="bfloat16", phase=phase)
        return "split" if split else "fused"

    fwd, bwd = rule("fwd"), rule("bwd")
    same = {"fwd": fwd, "fwd+bwd": fwd if fwd == bwd else None}
    out = []
    for mode in modes:
        labels = {}
        for row, picked in same.items():
            if mode == "rule":
                if picked not in modes:
                    labels[row] = "rule" if row == "fwd" else f"rule: {fwd} fwd, {bwd} bwd"
            elif mode == "split6" and row == "fwd":
                continue  # the forward is split's
            else:
                labels[row] = f"{mode}, the rule" if mode == picked and "rule" in modes else mode
        if labels:
            out.append((mode, labels))
    return out


# NOTE: gradients of q, k, v only, as FLA's (its decays are fixed): the op's autograd skips
# d gamma's terms when gamma does not require grad, and the kernels-only rows ask for the same
QKV = (True, True, True, False, False)


def chunk_cases(B, H, T, D, rows, modes=tuple(CHUNK_MODES)):
    from rtpcompile import kernels, ops

    chunk_retention = _fla_fn("chunk_retention")
    q, k, v = _inputs(B, T, H, D, D, grad=True)
    do = torch.randn_like(v)
    gamma, scale = _gamma(H), D**-0.5

    def fla_fwd():
        with torch.no_grad():
            return chunk_retention(q, k, v, scale=scale)

    def fla_fwd_bwd():
        o, _ = chunk_retention(q, k, v, scale=scale)
        return torch.autograd.grad(o, (q, k, v), do)

    # NOTE: no final state, like FLA's call (output_final_state=False); chunk 64, as FLA's
    def ours_fwd():
        with torch.no_grad():
            return ops.retention_chunkwise(
                _ours(q), _ours(k), _ours(v), gamma, 64, output_final_state=False, scale=scale
            )

    def ours_fwd_bwd():
        o, _ = ops.retention_chunkwise(
            _ours(q), _ours(k), _ours(v), gamma, 64, output_final_state=False, scale=scale
        )
        return torch.autograd.grad(o, (q, k, v), _ours(do))

    for mode, labels in _chunk_labels(B * H, T, D, modes):
        cfg = CHUNK_MODES[mode]

        def kernels_fwd(cfg=cfg):
            return kernels.triton_forward(
                "chunkwise", _ours(q), _ours(k), _ours(v), gamma, scale, None, 64, cfg,
                state_out=False,
            )  # fmt: skip

        def kernels_fwd_bwd(cfg=cfg, fwd=kernels_fwd):
            o, sf = fwd()
            return kernels.triton_backward(
                "chunkwise", _ours(do), None, _ours(q), _ours(k), _ours(v), gamma, scale, None,
                sf, 64, cfg, needs=QKV,
            )  # fmt: skip

        for name, ours, direct, theirs in (
            ("fwd", ours_fwd, kernels_fwd, fla_fwd),
            ("fwd+bwd", ours_fwd_bwd, kernels_fwd_bwd, fla_fwd_bwd),
        ):
            if name not in labels:
                continue
            shape = dict(B=B, H=H, T=T, K=D, V=D)
            baselines = {"fla": theirs} if chunk_retention is not None else {}
            with _backward_path(mode), _chunk_config(cfg):
                _row(rows, f"chunkwise {name} ({labels[name]})", shape, ours, baselines, direct)


def parallel_cases(B, H, T, D, rows):
    from rtpcompile import kernels, ops

    parallel_retention = _fla_fn("parallel_retention")
    q, k, v = _inputs(B, T, H, D, D)
    gamma, scale = _gamma(H), D**-0.5
    qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))

    # NOTE: o alone, as FLA's parallel_retention and SDPA return (no state-only pass)
    def ours():
        return ops.retention_parallel(_ours(q), _ours(k), _ours(v), gamma, scale)

    def direct():
        return kernels.triton_forward(
            "parallel", _ours(q), _ours(k), _ours(v), gamma, scale, None, 64, state_out=False
        )

    baselines = {}
    if parallel_retention is not None:
        baselines["fla"] = lambda: parallel_retention(q, k, v, scale=scale)
    baselines["sdpa"] = lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
    _row(rows, "parallel fwd", dict(B=B, H=H, T=T, K=D, V=D), ours, baselines, direct)


def recurrent_cases(B, H, D, rows):
    from rtpcompile import kernels, ops

    fused_recurrent_retention = _fla_fn("fused_recurrent_retention")
    q, k, v = _inputs(B, 1, H, D, D)
    s0 = torch.randn(B, H, D, D, device="cuda")
    gamma, scale = _gamma(H), D**-0.5

    def ours():
        return ops.retention_recurrent(_ours(q), _ours(k), _ours(v), gamma, s0, scale)

    def direct():
        return kernels.triton_forward(
            "recurrent", _ours(q), _ours(k), _ours(v), gamma, scale, s0, 64
        )

    baselines = {}
    if fused_recurrent_retention is not None:
        baselines["fla"] = lambda: fused_recurrent_retention(
            q, k, v, scale=scale, initial_state=s0, output_final_state=True
        )
    _row(rows, "recurrent decode T=1", dict(B=B, H=H, T=1, K=D, V=D), ours, baselines, direct)


def decode_bandwidth_case(B, H, D, rows):
    """The issue's decode target: state bytes read + written by one recurrent step, as a
    fraction of the device-to-device copy bandwidth measured on the same bytes."""
    from rtpcompile import ops

    q, k, v = _inputs(B, 1, H, D, D)
    s0 = torch.randn(B, H, D, D, device="cuda")
    gamma, scale = _gamma(H), D**-0.5
    state_bytes = 2 * s0.numel() * s0.element_size()  # read s0, write the final state
    src = torch.randn(s0.numel(), device="cuda")
    dst = torch.empty_like(src)
    row = {"case": "decode bandwidth", "B": B, "H": H, "T": 1, "K": D, "V": D}

    def step():
        return ops.retention_recurrent(_ours(q), _ours(k), _ours(v), gamma, s0, scale)

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


# NOTE: the decode step's default (BV = 64, 4 warps at K = 128) reached 0.75 of copy bandwidth on
# the H200 (2026-11-25) holding 208 registers per thread at that call's specialisation, 2
# programs per SM: its state went through shared memory between two layouts at every step.
# Since the k and q vector reads it holds 127, 4 programs per SM (sm_90, benchmarks/results/
# static, decode_occupancy), not yet timed. The sweep times the kernel's other launch configs
# the same way, so the next GPU run shows which reaches the 0.80 target.
DECODE_SWEEP = {"BV": (16, 32, 64, 128), "num_warps": (1, 2, 4, 8)}


def decode_sweep_case(B, H, D, rows):
    """One recurrent step's kernel (called directly, replayed from a CUDA graph) at each
    DECODE_SWEEP config, as a fraction of the copy bandwidth on the same state bytes."""
    from rtpcompile import kernels

    q, k, v = (x.transpose(1, 2) for x in _inputs(B, 1, H, D, D))
    s0 = torch.randn(B, H, D, D, device=q.device)
    gamma, scale = _gamma(H), D**-0.5
    src = torch.randn(s0.numel(), device=q.device)
    dst = torch.empty_like(src)
    copy_ms = _bench_graph(lambda: dst.copy_(src))
    for bv, warps in itertools.product(*DECODE_SWEEP.values()):
        if bv > D:
            continue
        row = {"case": "decode sweep", "B": B, "H": H, "T": 1, "K": D, "V": D, "BV": bv,
               "num_warps": warps, "copy_graph_ms": copy_ms}  # fmt: skip
        config = {"BV": bv, "num_warps": warps}

        def step(config=config):
            return kernels.triton_forward("recurrent", q, k, v, gamma, scale, s0, 64, config)

        try:
            row["kernels_graph_ms"] = _bench_graph(step)
            row["graph_fraction_of_copy"] = copy_ms / row["kernels_graph_ms"]
        except Exception as exc:  # noqa: BLE001 - a config that cannot launch is recorded
            row["kernels_graph_error"] = repr(exc)[:300]
        print(json.dumps(row), flush=True)
        rows.append(row)


def _time_into(row, name, fn, graph: bool = True) -> None:
    """``name``_ms and _peak_bytes (eager), ``name``_graph_ms (CUDA graph, when ``graph``), or
    an error entry."""
    try:
        row[f"{name}_ms"], row[f"{name}_peak_bytes"] = _bench(fn)
    except Exception as exc:  # noqa: BLE001 - recorded, the benchmark goes on
        row[f"{name}_error"] = repr(exc)[:300]
        return
    if not graph:
        return
    try:
        row[f"{name}_graph_ms"] = _bench_graph(fn)
    except Exception as exc:  # noqa: BLE001 - e.g. a baseline that cannot be captured
        row[f"{name}_graph_error"] = repr(exc)[:300]


def _row(rows, what, shape, ours, baselines, kernels_only=None):
    """Time ``ours`` (the public op) and each baseline, eager and from a CUDA graph, and
    ``kernels_only`` (the kernels called directly) eager only; append the row to ``rows``."""
    row = {"case": what, **shape}
    _time_into(row, "ours", ours)
    if kernels_only is not None:
        # NOTE: eager only: replayed from a graph it launches the op's kernels, the same GPU time
        _time_into(row, "kernels", kernels_only, graph=False)
    for name, fn in baselines.items():
        _time_into(row, name, fn)
        for suffix in ("ms", "graph_ms"):
            if f"ours_{suffix}" in row and f"{name}_{suffix}" in row:
                kind = "ratio" if suffix == "ms" else "graph_ratio"
                row[f"{kind}_vs_{name}"] = row[f"{name}_{suffix}"] / row[f"ours_{suffix}"]
    print(json.dumps(row), flush=True)
    rows.append(row)
    torch.cuda.empty_cache()


def _replace(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a kill mid-write leaves the previous version)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Results(list):
    """The rows so far; every ``append`` rewrites ``<stem>.json`` ({"meta", "rows"}) and
    ``<stem>.md`` in ``out``, so a run stopped by a timeout keeps every row it finished.
    ``finish()`` marks the run complete (meta "finished": True)."""

    def __init__(self, out: Path, stem: str, meta: dict):
        super().__init__()
        self.meta = {**meta, "finished": False}
        out.mkdir(parents=True, exist_ok=True)
        self.json_path, self.md_path = out / f"{stem}.json", out / f"{stem}.md"
        self.write()

    def append(self, row: dict) -> None:
        super().append(row)
        self.write()

    def finish(self) -> None:
        self.meta["finished"] = True
        self.write()

    def write(self) -> None:
        _replace(self.json_path, json.dumps({"meta": self.meta, "rows": list(self)}, indent=1))
        _replace(self.md_path, markdown(self.meta, self))


def metadata(device: str) -> dict:
    """The run's versions; "fla" is None when flash-linear-attention does not import (and
    "fla_error" says why)."""
    import triton

    fla = _fla()
    meta = {
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fla": fla.version,
        "python": platform.python_version(),
    }
    if fla.error is not None:
        meta["fla_error"] = fla.error
    return meta


def markdown(meta, rows) -> str:
    fla = meta.get("fla")
    fla_text = f"fla {fla}" if fla else "fla not installed (its columns are empty)"
    lines = [
        f"# Retention kernels on {meta['device']} ({meta['date']})",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, {fla_text}; bfloat16; "
        "ms = triton.testing.do_bench median of eager calls (host launch cost included); graph "
        "ms = triton.testing.do_bench_cudagraph median (GPU time only); ratio = baseline ms / "
        "ours ms (> 1: ours faster). Ours = the public op (rtpcompile.ops, autograd for "
        "fwd+bwd) as a user calls it, like FLA's public functions; kernels-only ms = the "
        "generated kernels called directly (no op dispatch, planning or autograd), eager. peak "
        "= extra MiB allocated by one call. Chunkwise and parallel calls return no final state "
        "(as FLA's default and SDPA); the decode step returns it.",
        "",
        "| case | B | H | T | K=V | ours ms | fla ms | ratio vs fla | ours graph ms "
        "| fla graph ms | graph ratio vs fla | sdpa ms | ratio vs sdpa | graph ratio vs sdpa "
        "| kernels-only ms | ours peak MiB | fla peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if meta.get("finished") is False:
        lines[2:2] = [
            "**Incomplete: written before the run's last row (cut off, or still running).**",
            "",
        ]

    def f(row, key, digits=3):
        x = row.get(key)
        return "-" if x is None else f"{x:.{digits}f}"

    def mib(row, key):
        x = row.get(key)
        return "-" if x is None else f"{x / 2**20:.0f}"

    for r in (r for r in rows if not r["case"].startswith("decode ")):
        lines.append(
            f"| {r['case']} | {r['B']} | {r['H']} | {r['T']} | {r['K']} | {f(r, 'ours_ms')} "
            f"| {f(r, 'fla_ms')} | {f(r, 'ratio_vs_fla', 2)} | {f(r, 'ours_graph_ms')} "
            f"| {f(r, 'fla_graph_ms')} | {f(r, 'graph_ratio_vs_fla', 2)} | {f(r, 'sdpa_ms')} "
            f"| {f(r, 'ratio_vs_sdpa', 2)} | {f(r, 'graph_ratio_vs_sdpa', 2)} "
            f"| {f(r, 'kernels_ms')} | {mib(r, 'ours_peak_bytes')} | {mib(r, 'fla_peak_bytes')} |"
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
    sweep = [r for r in rows if r["case"] == "decode sweep"]
    if sweep:
        lines += [
            "",
            "Decode step kernel (called directly, CUDA graph) at other launch configs, as a "
            "fraction of the copy on the same bytes:",
            "",
            "| B | H | K=V | BV | warps | kernels graph ms | fraction of copy |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['B']} | {r['H']} | {r['K']} | {r['BV']} | {r['num_warps']} "
            f"| {f(r, 'kernels_graph_ms', 4)} | {f(r, 'graph_fraction_of_copy', 2)} |"
            for r in sweep
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
    device = torch.cuda.get_device_name()
    meta = metadata(device)
    stem = f"kernels_{device.replace(' ', '_')}_{meta['date']}"
    rows = Results(Path(args.out), stem, meta)
    if meta["fla"] is None:
        print(f"flash-linear-attention not available ({meta.get('fla_error')}): no FLA columns")
    B, H = 4, 16
    # NOTE: the quick rows first, the longest (T = 16384, K = V = 256) last: a run cut off by a
    # timeout loses the fewest rows
    for D in (128, 256):
        recurrent_cases(B, H, D, rows)
    decode_bandwidth_case(64, 16, 128, rows)
    if not args.quick:
        decode_sweep_case(64, 16, 128, rows)
    for T in (256, 512, 1024):
        parallel_cases(B, H, T, 128, rows)
    for D, Ts in ((128, (2048, 4096, 16384)), (256, (2048, 4096, 16384))):
        for T in Ts if not args.quick else Ts[:2]:
            chunk_cases(B, H, T, D, rows, modes)
    rows.finish()
    print(markdown(rows.meta, rows))
    assert math.isfinite(sum(r.get("ours_ms", 0.0) for r in rows))


if __name__ == "__main__":
    main()
