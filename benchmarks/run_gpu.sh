#!/usr/bin/env bash
# Record the GPU benchmarks (needs CUDA; flash-linear-attention and matplotlib are optional).
# Results go to $OUT when set, else benchmarks/results/cuda/. On a bare machine install the package
# first so the "rtp" entry point exists: python3 -m pip install --no-deps --no-build-isolation -e .
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=${OUT:-benchmarks/results/cuda}
"$PY" -m rtpcompile bench --device cuda --out "$out" "$@"
# the issue's RetNet-shaped training step (12 x d=1024, all retention), rtp vs Inductor at T=4096
"$PY" -m rtpcompile bench --device cuda --suite model --model retnet --backends inductor,rtp \
  --prefill-lengths 4096 --train-lengths 4096 --no-decode --out "$out/retnet" --no-plot
"$PY" -m rtpcompile demo --device cuda --no-plot | tee "$out/demo.txt"
