#!/usr/bin/env bash
# One phase of a GPU session, sized for the device tool: each phase ends well inside its
# 10-minute call limit and leaves at most 8 files in $OUT (logs, tables, and one tarball for the
# rest), which is what the tool brings back. Run from the repository root on the CUDA machine:
#
#   bash benchmarks/gpu_session.sh tests-kernels  # gpu-marked kernel tests, bfloat16 included
#   bash benchmarks/gpu_session.sh tests-e2e      # gpu-marked end-to-end tests (compiled models)
#   bash benchmarks/gpu_session.sh kernels        # bench_gpu_kernels.py: ours vs FLA vs SDPA (~6-8 min)
#   bash benchmarks/gpu_session.sh models         # host cost, demo, RetNet-shaped training step
#
# The test phases run pytest -n 4 when pytest-xdist imports (the GPU image has it): compiling
# the ~230 distinct kernels of the kernel tests (1-2.4 s each on sm_90) dominates them.
# flash-linear-attention is optional (without it the kernels phase has no FLA columns): carry
# its wheel in .whl/ (recipe in docs/performance-notes.md, "Carrying flash-linear-attention")
# and it is installed first. Results are dated and name the device; commit what you keep under
# benchmarks/results/<device>/.
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:?usage: gpu_session.sh tests-kernels|tests-e2e|kernels|models}
case "$phase" in
tests-kernels | tests-e2e | kernels | models) ;;
*)
  echo "unknown phase $phase (tests-kernels|tests-e2e|kernels|models; 'tests' is now two)" >&2
  exit 2
  ;;
esac
out=${OUT:-/tmp/rtp-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
day=$(date -u +%Y-%m-%d)

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
install() { "$PY" -m pip install -q --no-deps --no-build-isolation -e . >>"$out/install.log" 2>&1; }
# NOTE: without build isolation the image's own setuptools builds; one older than 77 reads no SPDX
# license string (PEP 639), so the copy here falls back to the table form it does read
install || { sed -i 's/^license = "\(.*\)"$/license = { text = "\1" }/' pyproject.toml && install; } ||
  { echo "install failed; see install.log"; tail -20 "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" |
  tee -a "$out/device.txt"

# NOTE: pipefail: a step's status is its command's (or the timeout's 124), not tee's or tail's;
# the script exits with the first failure so the device tool's rc says whether the phase passed
rc=0
step() { "$@" || { s=$?; echo "step failed (rc $s): $*" >&2; [ "$rc" -ne 0 ] || rc=$s; }; }
# NOTE: -n 4 only where pytest-xdist imports; each worker compiles its own kernels (Triton's
# on-disk cache is shared), so four take about a quarter of the time on 16 cores
# RTP_GPU_WORKERS and RTP_GPU_TEST_LIMIT (seconds) let both test phases share one call
xdist=""
"$PY" -c "import xdist" 2>/dev/null && xdist="-n ${RTP_GPU_WORKERS:-4}"
test_limit=${RTP_GPU_TEST_LIMIT:-540}
gpu_tests() { # name, timeout, test files...
  local name=$1 limit=$2
  shift 2
  step bash -o pipefail -c "timeout $limit $PY -m pytest -m gpu $xdist -q --tb=short -rA \
    -p no:cacheprovider $* 2>&1 | tee $out/gpu_${name}_tests_$day.log | tail -40"
}
case "$phase" in
tests-kernels)
  gpu_tests kernels "$test_limit" tests/test_kernels.py tests/test_kernel_split.py \
    tests/test_kernel_dqk.py tests/test_kernel_precision.py tests/test_kernel_dgamma.py
  ;;
tests-e2e)
  # NOTE: compiles whole models (training, prefill and decode, reduce-overhead)
  gpu_tests e2e "$test_limit" tests/test_gpu_e2e.py
  ;;
kernels)
  step bash -o pipefail -c "timeout 540 $PY benchmarks/bench_gpu_kernels.py --out $out 2>&1 |
    tee $out/bench_kernels_$day.log | tail -60"
  ;;
models)
  # NOTE: 90 + 180 + 300 s, inside the tool's 600 s call with the install; host_overhead times
  # the eager public op with and without the custom op's dispatch (RTP_EAGER_BYPASS), and with
  # the kernels' constants as module globals (compiles a second set of kernels)
  step bash -o pipefail -c "timeout 90 $PY benchmarks/host_overhead.py 2>&1 |
    tee $out/host_overhead_$day.txt | tail -14"
  step bash -o pipefail -c "timeout 180 $PY -m rtpcompile demo --device cuda --no-plot 2>&1 |
    tee $out/demo_$day.txt | tail -40"
  step bash -o pipefail -c "timeout 300 $PY -m rtpcompile bench --device cuda --suite model --model retnet \
    --backends inductor,rtp --prefill-lengths 4096 --train-lengths 4096 --no-decode \
    --out /tmp/rtp-retnet --no-plot 2>&1 | tail -30"
  [ -d /tmp/rtp-retnet ] && tar -czf "$out/retnet_$day.tar.gz" -C /tmp rtp-retnet
  ;;
esac
ls "$out"
exit "$rc"
