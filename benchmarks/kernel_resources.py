"""Registers, spills and shared memory of the generated kernels' defaults, compiled for sm_90.

Usage (any machine with Triton's Linux wheel; no GPU needed):
    python benchmarks/kernel_resources.py --out benchmarks/results/static
    python benchmarks/kernel_resources.py --sweep float32 --out /tmp/sweep   # block search
Writes kernel_resources_<target>_<date>.md and .json. Each row is one kernel of a forward call
with the kernels' default blocks (``spec.choose`` without a config), compiled by Triton for the
target and read back from ``ptxas -v`` (``rtpcompile.kernels.aot``), specialised as a launch
of ``aot.SHAPE`` with contiguous [B, H, T, D] tensors specialises it (``--layout``: bthd for
views of [B, T, H, D], none for the unspecialised compile of the tables before 2026-11-25).
Static figures: they say whether a program fits its registers, not how fast it runs. float32
appears twice: with ``tl.dot``'s "ieee" input precision (torch's default float32 matmul
precision, "highest") and with "tf32" (``torch.set_float32_matmul_precision("high")``).

``--decode B,H,D`` compiles the decode step's kernel at every block config (BV x warps) and
writes decode_occupancy_<target>_<date>.md/.json: registers, programs per SM and waves.

``--sweep DTYPE`` compiles every candidate block (BT, BV, warps, and BKC for the split stages)
of each kernel at a few (K, V) and appends one JSON line per candidate to
``sweep_<dtype>_<precision>_<target>_<date>.jsonl``: the measurements behind
``spec.default_blocks``' float32 rule. ``--check DTYPE --shapes K,V ...`` compiles the defaults
of the forward's and the backward's shapes of pass at those dims.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import platform
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from rtpcompile.kernels import aot
from rtpcompile.kernels.spec import KernelSpec, choose

# (K, V): the demo model's layers, the benchmark shapes and a K != V case
SHAPES = ((32, 64), (64, 64), (128, 128), (256, 256), (128, 256))
# (dtype, float32 precision) of the table's sections; bfloat16 ignores the precision
SECTIONS = (
    (torch.bfloat16, "ieee"),
    (torch.float16, "ieee"),
    (torch.float32, "ieee"),
    (torch.float32, "tf32"),
)
# the sweep's shapes: K = V at every K block, and K != V both ways (the backward swaps them)
SWEEP_SHAPES = ((32, 32), (64, 64), (128, 128), (256, 256), (32, 64), (64, 32), (128, 256))
SWEEP_BT = (16, 32, 64)
SWEEP_BV = (16, 32, 64)
SWEEP_WARPS = (4, 8)
KINDS = ("fused", "states", "output", "parallel")
_LAYOUT_WORDS = {"bhtd": "contiguous [B, H, T, D]", "bthd": "[B, T, H, D] viewed as [B, H, T, D]"}


def kernels_of(K: int, V: int, dtype: torch.dtype, fp32_precision: str = "ieee") -> list:
    """The default specs a forward runs: fused chunkwise, both split stages, parallel, recurrent."""
    specs = []
    for kind in KINDS + ("recurrent",):
        specs.append(_default(kind, K, V, dtype, fp32_precision))
    return specs


def _default(
    kind: str, K: int, V: int, dtype: torch.dtype, prec: str, direction: str = "fwd", **extra
) -> KernelSpec:
    """The default spec of one kernel of a pass (``kind``: a chunkwise stage or a form)."""
    prec = prec if dtype == torch.float32 else "ieee"
    if kind == "recurrent":
        flags = {"state_in": True, "state_out": True, **extra}
        return choose(kind, direction, K, V, dtype, dtype, 64, fp32_precision=prec, **flags)
    if kind == "parallel":
        return choose(kind, direction, K, V, dtype, dtype, 64, fp32_precision=prec, **extra)
    cfg = {"split": int(kind != "fused")}
    flags = {"state_out": kind != "output", "store_o": kind != "states", **extra}
    return choose(
        "chunkwise", direction, K, V, dtype, dtype, 64, cfg, stage=kind, fp32_precision=prec,
        **flags,
    )  # fmt: skip


def _dqk(K: int, V: int, dtype: torch.dtype, prec: str, dgamma: bool = True) -> KernelSpec:
    """The split backward's dq/dk kernel at (K, V), with or without d gamma's terms."""
    return _default("dqk", K, V, dtype, prec, "bwd", state_out=False, row_dot=dgamma)


def dgamma_kinds(K: int, V: int, dtype: torch.dtype, prec: str) -> list[KernelSpec]:
    """The dq pass's kernels when gamma needs a gradient (``row_dot``: the forward-mode d gamma
    sum, with the state's derivative carried; its own blocks, ``blocks.row_dot_blocks``), and
    the split dq/dk kernel with and without d gamma's terms. The dq pass is (do, v, k): pass
    (K, V) = the call's (V, K)."""
    specs = [_default(kind, K, V, dtype, prec, row_dot=True) for kind in KINDS]
    return specs + [_dqk(K, V, dtype, prec, dgamma=False), _dqk(K, V, dtype, prec)]


def backward_kinds(K: int, V: int, dtype: torch.dtype, prec: str) -> list[KernelSpec]:
    """The default specs of the backward's shapes of pass at (K, V): the dq pass with d gamma's
    sum and an initial state; time-reversed dk/dv passes with every feature (a ones column,
    V + 1, row scales, the state at position 0); a state-only pass; the dq/dk kernels."""
    specs = [_default("fused", K, V, dtype, prec, row_dot=True, state_in=True)]
    rows = {"row_scale": True, "extra_value_column": True}
    for kind in ("fused", "output", "parallel"):
        extra = dict(rows, state_in=kind == "fused", state_offset=0)
        specs.append(_default(kind, K, V + 1, dtype, prec, "bwd", **extra))
    specs.append(_default("states", K, V + 1, dtype, prec, "bwd", extra_value_column=True))
    specs.append(_default("fused", K, V, dtype, prec, "bwd", store_o=False, state_in=True))
    specs += [_dqk(K, V, dtype, prec, dgamma=False), _dqk(K, V, dtype, prec)]
    return specs


def check(
    dtype: torch.dtype, prec: str, shapes: tuple[tuple[int, int], ...], capability: int, jobs: int
) -> list[dict]:
    """The rows of every default kernel of the forward and the backward at ``shapes``."""
    specs = [
        spec
        for K, V in shapes
        for spec in kernels_of(K, V, dtype, prec) + backward_kinds(K, V, dtype, prec)
    ]
    with ProcessPoolExecutor(jobs) as pool:
        rows = list(pool.map(measure, specs, itertools.repeat(capability)))
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def candidates(kind: str, K: int, V: int, dtype: torch.dtype, prec: str) -> list[KernelSpec]:
    """Every block choice of one kernel the sweep compiles (BV at most the block covering V)."""
    base = _default(kind, K, V, dtype, prec)
    cover = max(16, 1 << (V - 1).bit_length())
    bts = (32, 64) if kind == "states" else SWEEP_BT
    bkcs = sorted({min(base.BK, 32), min(base.BK, 64)}) if kind in ("states", "output") else (0,)
    # NOTE: a fused float32 program at K >= 128 holds a [BK, BV] state on top of the tiles; at
    # K = 64 every 64-wide tile already spilled, and such compiles take ptxas ~10 s each
    big = 32 if kind == "fused" and base.BK >= 128 else 64
    found = []
    for bt, bv, w, bkc in itertools.product(bts, SWEEP_BV, SWEEP_WARPS, bkcs):
        if bv <= min(cover, big) and bt <= big:
            found.append(dataclasses.replace(base, BT=bt, BV=bv, num_warps=w, BKC=bkc))
    return found


def measure(
    spec: KernelSpec, capability: int = 90, layout: str | None = "bhtd", shape=aot.SHAPE
) -> dict:
    """One table row: the kernel's summary and its resources, or the compiler's error."""
    warnings.filterwarnings("ignore", module="triton")
    try:
        found = aot.resources(spec, capability, shape, layout=layout)
        return {"kernel": spec.short(), **vars(found)}
    except Exception as exc:  # noqa: BLE001 - recorded; the table goes on
        return {"kernel": spec.short(), "error": repr(exc)[:300]}


def sweep(
    dtype: torch.dtype,
    prec: str,
    out: Path,
    capability: int,
    jobs: int,
    shapes: tuple[tuple[int, int], ...] = SWEEP_SHAPES,
    kinds: tuple[str, ...] = KINDS,
) -> None:
    """Compile every candidate of every kernel at ``shapes``; one JSON line each (appended)."""
    specs = [
        (kind, K, V, spec)
        for K, V in shapes
        for kind in kinds
        for spec in candidates(kind, K, V, dtype, prec)
    ]
    out.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    path = out / f"sweep_{str(dtype).split('.')[-1]}_{prec}_sm_{capability}_{date}.jsonl"
    with ProcessPoolExecutor(jobs) as pool, path.open("a") as f:
        rows = pool.map(measure, [s for *_, s in specs], itertools.repeat(capability))
        for (kind, K, V, spec), row in zip(specs, rows, strict=True):
            row.update(kind=kind, K=K, V=V, BT=spec.BT, BV=spec.BV, w=spec.num_warps,
                       BKC=spec.BKC)  # fmt: skip
            f.write(json.dumps(row) + "\n")
            f.flush()
    print(f"wrote {path}")


# the decode step's block search (bench_gpu_kernels.DECODE_SWEEP times the same configs on a GPU)
DECODE_BV = (16, 32, 64, 128)
DECODE_WARPS = (1, 2, 4, 8)
H100_SMS = 132  # H100 and H200 SXM


def decode(B: int, H: int, D: int, dtype: torch.dtype, capability: int, jobs: int) -> list[dict]:
    """The recurrent step's kernel (T = 1, state in and out, K = V = D) at every DECODE_BV x
    DECODE_WARPS config, specialised for a call of (B, H, 1): its registers and spills, how many
    programs an SM holds (``aot.blocks_per_sm``), the state bytes those programs hold, the grid
    and the waves it takes on a 132-SM GPU. Static figures: bench_gpu_kernels times them."""
    base = _default("recurrent", D, D, dtype, "ieee")
    specs = [
        dataclasses.replace(base, BV=bv, num_warps=w)
        for bv in DECODE_BV
        for w in DECODE_WARPS
        if bv <= max(16, 1 << (D - 1).bit_length())
    ]
    args = (itertools.repeat(capability), itertools.repeat("bhtd"), itertools.repeat((B, H, 1)))
    if jobs == 1:  # NOTE: in this process (a pool needs this module importable by name)
        found = list(map(measure, specs, *args))
    else:
        with ProcessPoolExecutor(jobs) as pool:
            found = list(pool.map(measure, specs, *args))
    rows = []
    for spec, row in zip(specs, found, strict=True):
        row.update(BV=spec.BV, num_warps=spec.num_warps, default=spec == base)
        if "error" not in row:
            blocks = aot.blocks_per_sm(aot.Resources(row["registers"], row["spill_bytes"],
                                                     row["shared_bytes"]),
                                       spec.num_warps, capability)  # fmt: skip
            programs = -(-D // spec.BV) * B * H
            row.update(
                blocks_per_sm=blocks,
                warps_per_sm=blocks * spec.num_warps,
                state_kib_per_sm=blocks * D * spec.BV * 4 / 1024,
                programs=programs,
                waves=round(programs / max(1, blocks * H100_SMS), 2),
            )
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def write_decode(rows: list[dict], out: Path, B: int, H: int, D: int, capability: int) -> None:
    """decode_occupancy_<target>_<date>.md and .json under ``out``."""
    import triton

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    target = f"sm_{capability}"
    lines = [
        f"# Decode step kernel on {target}: registers and occupancy per block config ({date})",
        "",
        f"The recurrent kernel of one decode step (T = 1, float32 state in and out, K = V = {D}, "
        f"bfloat16 q, k, v), specialised for a call of B = {B}, H = {H}, compiled on a CPU-only "
        f"machine by Triton {triton.__version__} and read from `ptxas -v`. Programs per SM: the "
        "occupancy rule (registers allocated per warp in units of 256, resident warps, block "
        f"slots; `rtpcompile.kernels.aot.blocks_per_sm`); waves on {H100_SMS} SMs. Static "
        "figures, no launch: what bandwidth each reaches is timed on a GPU by "
        "`benchmarks/bench_gpu_kernels.py` (decode sweep). Reproduce: "
        f"`python benchmarks/kernel_resources.py --decode {B},{H},{D}`.",
        "",
        "| BV | warps | registers / thread | spill bytes | programs / SM | warps / SM | "
        "state KiB / SM | programs | waves |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['BV']}{' (default)' if r['default'] else ''} | {r['num_warps']} |"
        if "error" in r:
            lines.append(f"{head} error: {r['error']} | | | | | | |")
            continue
        lines.append(
            f"{head} {r['registers']} | {r['spill_bytes']} | {r['blocks_per_sm']} | "
            f"{r['warps_per_sm']} | {r['state_kib_per_sm']:.0f} | {r['programs']} | "
            f"{r['waves']} |"
        )
    out.mkdir(parents=True, exist_ok=True)
    stem = f"decode_occupancy_{target}_{date}"
    meta = {"date": date, "target": target, "triton": triton.__version__, "B": B, "H": H, "D": D}
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.md and .json")


def table(capability: int, jobs: int, layout: str | None = "bhtd") -> list[dict]:
    """Rows of the default kernels of every section and shape, in order."""
    specs = [
        spec
        for dtype, prec in SECTIONS
        for K, V in SHAPES
        for spec in kernels_of(K, V, dtype, prec) + dgamma_kinds(K, V, dtype, prec)
    ]
    with ProcessPoolExecutor(jobs) as pool:
        found = pool.map(measure, specs, itertools.repeat(capability), itertools.repeat(layout))
        rows = list(found)
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def write(rows: list[dict], out: Path, capability: int, layout: str | None = "bhtd") -> None:
    """kernel_resources_<target>_<date>.md and .json under ``out``."""
    import triton

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    meta = {"date": date, "target": f"sm_{capability}", "triton": triton.__version__,
            "torch": torch.__version__, "python": platform.python_version(),
            "layout": layout or "none", "shape": list(aot.SHAPE)}  # fmt: skip
    B, H, T = aot.SHAPE
    specialised = (
        f"Each kernel is specialised as Triton's launcher specialises a call of B={B}, H={H}, "
        f"T={T} with q, k, v {_LAYOUT_WORDS[meta['layout']]} (unit strides constant, strides, "
        "T and pointers marked 16-divisible or aligned where they are)"
        if layout
        else "Each kernel is compiled unspecialised (every stride and size a plain i32), as the "
        "tables before 2026-11-25 were"
    )
    lines = [
        f"# Generated kernels on {meta['target']}: registers, spills, shared memory ({date})",
        "",
        f"Compiled on a CPU-only machine by Triton {meta['triton']} (torch {meta['torch']}) and "
        "read from `ptxas -v`; default blocks of a forward call, of the backward's dq pass when γ "
        "needs a gradient (`rd`: the forward-mode dγ sum), and of the split backward's dq/dk "
        "kernel with and without dγ. float32 rows without a precision use "
        '`tl.dot(..., input_precision="ieee")` '
        '(torch\'s default, "highest"); '
        'rows marked `tf32` are what `torch.set_float32_matmul_precision("high")` runs. '
        f"{specialised}. Reproduce: `python benchmarks/kernel_resources.py --capability "
        f"{capability}{'' if layout == 'bhtd' else ' --layout ' + meta['layout']}`.",
        "",
        "| kernel | registers / thread | spill bytes | shared bytes |",
        "|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | error: {r['error']} | | |")
        else:
            lines.append(
                f"| {r['kernel']} | {r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} |"
            )
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if layout == "bhtd" else f"_{meta['layout']}"
    stem = f"kernel_resources_{meta['target']}_{date}{suffix}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.md and .json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/static")
    parser.add_argument("--capability", type=int, default=90, help="sm_XY as XY (90: Hopper)")
    parser.add_argument("--jobs", type=int, default=2, help="compiler processes")
    parser.add_argument(
        "--layout",
        choices=(*aot.LAYOUTS, "none"),
        default="bhtd",
        help="q, k, v of the launch each kernel is specialised for (none: unspecialised)",
    )
    parser.add_argument("--sweep", choices=("float32", "float16", "bfloat16"), default=None)
    parser.add_argument("--precision", choices=("ieee", "tf32", "tf32x3"), default="ieee")
    parser.add_argument("--shapes", nargs="*", default=None, help="K,V pairs (sweep)")
    parser.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS)
    parser.add_argument(
        "--check",
        choices=("float32", "float64", "bfloat16"),
        default=None,
        help="compile the defaults (forward and backward shapes) at --shapes",
    )
    parser.add_argument(
        "--decode",
        default=None,
        metavar="B,H,D",
        help="the decode step's kernel at every block config (e.g. 64,16,128: the issue's shape)",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="triton")
    if args.decode:
        B, H, D = (int(x) for x in args.decode.split(","))
        rows = decode(B, H, D, torch.bfloat16, args.capability, args.jobs)
        write_decode(rows, Path(args.out), B, H, D, args.capability)
        return
    shapes = SWEEP_SHAPES
    if args.shapes:
        shapes = tuple(tuple(int(d) for d in kv.split(",")) for kv in args.shapes)
    if args.check:
        check(getattr(torch, args.check), args.precision, shapes, args.capability, args.jobs)
        return
    if args.sweep:
        dtype = getattr(torch, args.sweep)
        out = Path(args.out)
        sweep(dtype, args.precision, out, args.capability, args.jobs, shapes, tuple(args.kinds))
        return
    layout = None if args.layout == "none" else args.layout
    write(table(args.capability, args.jobs, layout), Path(args.out), args.capability, layout)


if __name__ == "__main__":
    main()
