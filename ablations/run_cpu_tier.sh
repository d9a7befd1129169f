#!/usr/bin/env bash
# The CPU tier of the ablations (issue 13 item 5), resumable, in chunks:
#
#     ablations/run_cpu_tier.sh [MINUTES]        # default 10; JOBS=N overrides the job count (default: all cores)
#
# Runs the eight sweeps below at --scale cpu under runs/, one job per core (each job 1 thread: dsv4_lab/sweep.py
# splits the cores). No new run starts after MINUTES minus one run's length (RUN_S, default 150 s), so a chunk ends
# about MINUTES after it began; runs in flight finish first. Re-running the same command continues where the last
# chunk stopped: finished and diverged runs are skipped, interrupted ones resume from their checkpoint (a hard kill
# loses at most ckpt_interval steps of one run). Exit 0 once the whole tier is done (then the CSVs and figures are
# rebuilt), 3 while runs are left.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MINUTES=${1:-10}
JOBS=${JOBS:-$(nproc)}
RUN_S=${RUN_S:-150}
SWEEPS="csa_vs_hca mhc_vs_hc muon_vs_adamw fp4_vs_fp8 anticipatory swiglu_clamp attention_sink indexer_mode"
deadline=$(( $(date +%s) + MINUTES * 60 - RUN_S ))
complete=0
for s in $SWEEPS; do
    left=$(( deadline - $(date +%s) ))
    if [ "$left" -le 0 ]; then
        echo "[cpu tier] chunk time used up before $s; run the same command again to continue"
        break
    fi
    if nice "$PY" -m dsv4_lab sweep "ablations/$s.json" --scale cpu --jobs "$JOBS" --root runs --stop-after "$left"; then
        complete=$(( complete + 1 ))
    fi
done
n=$(echo $SWEEPS | wc -w)
if [ "$complete" -eq "$n" ]; then
    "$PY" -m dsv4_lab summarize runs --figures figures
    echo "[cpu tier] all $n sweeps complete: ablations/results/*.csv and figures/ablation_*.png rebuilt"
    exit 0
fi
"$PY" -m dsv4_lab summarize runs
echo "[cpu tier] $complete/$n sweeps complete; run the same command again to continue"
exit 3
