#!/bin/bash
# third GPU call: the failing GPU test with its message, HCA fwd+bwd, FlexAttention baseline (time-capped)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py -k "indexer or mhc" -x > $OUT/gpu_tests.log 2>&1
tail -c 2500 $OUT/gpu_tests.log
timeout 220 python3 benchmarks/hca_extra.py > $OUT/extra.log 2>&1
cut -c1-400 $OUT/extra.log
