#!/bin/bash
# run 36 call 5: the select's first digit in the score kernel at decode: indexer GPU tests, then top-k row + decode
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfE -m gpu tests/test_kernels_gpu.py -k "indexer" -n 4 \
  > "$OUT/gpu_tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/gpu_tests.log"
grep -vE "Warning|warn" "$OUT/gpu_tests.log" | tail -30 | cut -c1-600
CSA_FAMILIES="decode_1048576 topk_row decode_131072" CSA_FAMILY_CAP_S=70 timeout 130 python3 benchmarks/bench_csa.py \
  > "$OUT/csa.log" 2>&1; echo "csa rc=$?" >> "$OUT/csa.log"
grep -vE "Warning|warn" "$OUT/csa.log" | cut -c1-1200 | tail -8
cp benchmarks/results/csa.json "$OUT/"
