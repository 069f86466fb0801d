"""Registers, spills and shared memory of the generated kernels' defaults, compiled for sm_90.

Usage (any machine with Triton's Linux wheel; no GPU needed):
    python benchmarks/kernel_resources.py --out benchmarks/results/static
Writes kernel_resources_<date>.md and .json. Each row is one kernel of a forward call with the
kernels' default blocks (``spec.choose`` without a config), compiled by Triton for the target and
read back from ``ptxas -v`` (``rtpcompile.kernels.aot``). Static figures: they say whether a
program fits its registers, not how fast it runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import warnings
from pathlib import Path

import torch

from rtpcompile.kernels import aot
from rtpcompile.kernels.spec import choose

# (K, V): the demo model's layers, the benchmark shapes and a K != V case
SHAPES = ((32, 64), (64, 64), (128, 128), (256, 256), (128, 256))
DTYPES = (torch.bfloat16, torch.float32)


def kernels_of(K: int, V: int, dtype: torch.dtype) -> list:
    """The default specs a forward runs: fused chunkwise, both split stages, parallel, recurrent."""
    specs = []
    for stage in ("fused", "states", "output"):
        cfg = {"split": int(stage != "fused")}
        flags = {"state_out": stage != "output", "store_o": stage != "states"}
        specs.append(choose("chunkwise", "fwd", K, V, dtype, dtype, 64, cfg, stage=stage, **flags))
    specs.append(choose("parallel", "fwd", K, V, dtype, dtype, 64))
    specs.append(choose("recurrent", "fwd", K, V, dtype, dtype, 64, state_in=True, state_out=True))
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/static")
    parser.add_argument("--capability", type=int, default=90, help="sm_XY as XY (90: Hopper)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="triton")
    import triton

    rows = []
    for dtype in DTYPES:
        for K, V in SHAPES:
            for spec in kernels_of(K, V, dtype):
                try:
                    r = aot.resources(spec, args.capability)
                    row = {"kernel": spec.short(), **vars(r)}
                except Exception as exc:  # noqa: BLE001 - recorded; the table goes on
                    row = {"kernel": spec.short(), "error": repr(exc)[:300]}
                print(json.dumps(row), flush=True)
                rows.append(row)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    meta = {"date": date, "target": f"sm_{args.capability}", "triton": triton.__version__,
            "torch": torch.__version__, "python": platform.python_version()}  # fmt: skip
    lines = [
        f"# Generated kernels on {meta['target']}: registers, spills, shared memory ({date})",
        "",
        f"Compiled on a CPU-only machine by Triton {meta['triton']} (torch {meta['torch']}) and "
        "read from `ptxas -v`; default blocks of a forward call. Reproduce: "
        f"`python benchmarks/kernel_resources.py --capability {args.capability}`.",
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"kernel_resources_{meta['target']}_{date}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.md and .json")


if __name__ == "__main__":
    main()
