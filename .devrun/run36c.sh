#!/bin/bash
# run 36 call 3: radix_select without the zeroing launch (tickets): indexer GPU tests, then CSA top-k row + 1M decode
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 250 python3 -m pytest -q -p no:cacheprovider -rfE -m gpu tests/test_kernels_gpu.py -k "indexer" -n 3 \
  > "$OUT/gpu_tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/gpu_tests.log"
grep -vE "Warning|warn" "$OUT/gpu_tests.log" | tail -25
CSA_FAMILIES="topk_row decode_1048576 prefill_8192" CSA_FAMILY_CAP_S=90 timeout 240 python3 benchmarks/bench_csa.py \
  > "$OUT/csa.log" 2>&1; echo "csa rc=$?" >> "$OUT/csa.log"
grep -vE "Warning|warn" "$OUT/csa.log" | cut -c1-1500 | tail -12
cp benchmarks/results/csa.json "$OUT/"
