#!/bin/bash
# run 36 call 1: loss parity seeds 5-9 (all three arms, kept beside the committed seeds 0-4) + the two rebuilt GPU tests
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
git log --oneline -1 2>&1 | head -1
( timeout 560 python3 benchmarks/bench_loss_parity.py --arms reference triton blocks --seeds 5 6 7 8 9 \
    --keep-recorded --jobs 15 --cap 545 > "$OUT/parity.log" 2>&1; echo "parity rc=$?" >> "$OUT/parity.log" ) &
PP=$!
sleep 20
timeout 420 python3 -m pytest -q -p no:cacheprovider -rfE -m gpu tests --ignore=tests/lab \
  -k "compile_blocks_gradients or moe_compiled" > "$OUT/gpu_tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/gpu_tests.log"
wait $PP
tail -c 4000 "$OUT/gpu_tests.log"; cat "$OUT/parity.log" | grep -v Warning | tail -30
cp benchmarks/results/loss_parity.json "$OUT/"
tar czf "$OUT/parity_runs.tgz" --exclude='*.pt' --exclude='*ckpt*' runs/loss_parity 2>/dev/null; ls -la "$OUT"
