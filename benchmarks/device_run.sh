#!/bin/bash
# One device call (the `device` tool's `run`): GPU tests, then the named benchmark families, time-capped so the
# call ends inside its limit; every result and log comes back in $OUT/results.tgz.
#   bash benchmarks/device_run.sh "<pytest -k expression or ->" <family> [family ...]
#   env: TEST_TIMEOUT (s, default 150), BENCH_TIMEOUT (s, default 360), E2E_EXTRA=1 (+ EXTRA_TIMEOUT, default 150)
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
K=$1; shift
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ "$K" != "-" ]; then
  timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider -rfE --durations=12 tests/test_kernels_gpu.py tests/test_hca_prefill_gpu.py \
    ${K:+-k "$K"} > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"; tail -c 2500 "$OUT/gpu_tests.log"
fi
if [ $# -gt 0 ]; then
  timeout "${BENCH_TIMEOUT:-360}" python3 benchmarks/run_all.py --only "$@" > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; grep -E "^(== |e2e |csa |hca |Traceback|[A-Za-z]*Error)" "$OUT/bench.log" | cut -c1-300 | tail -60
fi
if [ -n "${E2E_EXTRA:-}" ]; then                     # bench_e2e.extra(): batch-1 arms, KL off, profiled steps
  timeout "${EXTRA_TIMEOUT:-150}" python3 benchmarks/bench_e2e.py --extra > "$OUT/e2e_extra.log" 2>&1
  echo "e2e extra rc=$?"; grep -vE "Warning|_warn_once" "$OUT/e2e_extra.log" | cut -c1-260 | tail -40
fi
tar czf "$OUT/results.tgz" benchmarks/results
