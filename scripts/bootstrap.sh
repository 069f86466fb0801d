#!/usr/bin/env bash
# Create .venv (once) with torch, the package in editable mode and the extras for $1 ("demo" or "test").
# On a machine without CUDA this installs the CPU build torch==2.13.0+cpu, never a multi-GB CUDA
# build: from pip's configured indexes/find-links if they hold it, else from PyTorch's CPU index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${RTP_VENV:-.venv}
want=${1:-demo}
stamp="$VENV/.rtp-$want-$(sha1sum pyproject.toml scripts/bootstrap.sh | sha1sum | cut -c1-12)"
[ -f "$stamp" ] && exit 0

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip >/dev/null
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pip install "${TORCH_SPEC:-torch>=2.11}"
    else
        # NOTE: plain PyPI's Linux torch==2.13.0 is the CUDA build; "+cpu" names the CPU one
        pip install "${TORCH_SPEC:-torch==2.13.0+cpu}" 2>/dev/null \
            || pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
    fi
fi
case "$want" in
    demo) pip install -e ".[bench]" ;;
    test)
        pip install -e ".[dev,hf,bench]"
        # torchscale's RetNet is a third-party test subject; its other requirements (timm, ...) are
        # not needed by the parts we test and would pull another torch, hence --no-deps.
        pip install --no-deps "torchscale==0.3.0" || echo "torchscale unavailable: its tests will skip"
        # torch-mlir wheels pin no torch; --no-deps keeps the installed one.
        pip install --no-deps "torch-mlir==20261001" || echo "torch-mlir unavailable: MLIR import tests will skip"
        ;;
    *) echo "usage: bootstrap.sh demo|test" >&2; exit 2 ;;
esac
rm -f "$VENV"/.rtp-"$want"-* && touch "$stamp"
