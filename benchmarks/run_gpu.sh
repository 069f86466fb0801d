#!/usr/bin/env bash
# Record the GPU benchmarks (needs CUDA; flash-linear-attention and matplotlib are optional).
# Results go to $OUT when set, else benchmarks/results/cuda/. On a bare machine install the package
# first so the "rtp" entry point exists: python3 -m pip install --no-deps --no-build-isolation -e .
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=${OUT:-benchmarks/results/cuda}
"$PY" -m rtpcompile bench --device cuda --out "$out" "$@"
"$PY" -m rtpcompile demo --device cuda --no-plot | tee "$out/demo.txt"  # 8 files in all
