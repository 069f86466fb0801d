#!/usr/bin/env bash
# Record the CPU benchmarks into benchmarks/results/cpu/ (op.* and model.*: JSON, markdown, PNG).
# --force: this script re-records the files there on purpose. Extra arguments go to both suites,
# e.g. `--threads 1` on a machine shared with busy processes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m rtpcompile bench --device cpu --suite op --force --reps 3 --max-call-s 5 \
    --memory-lengths 1024,8192,65536 "$@"
"$PY" -m rtpcompile bench --device cpu --suite model --force "$@"
