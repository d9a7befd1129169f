#!/usr/bin/env bash
# The GPU tier of the five named ablations (issue 17 item 1), resumable, in chunks, several runs per GPU:
#
#     ablations/run_gpu_tier.sh [MINUTES]          # default 9; JOBS=N runs per GPU (default 6)
#     ablations/run_gpu_tier.sh estimate           # device minutes left, from measured ms/step and records; no GPU
#     ablations/run_gpu_tier.sh smoke              # 30 steps of every distinct arm config: ms/step on this GPU
#     ablations/run_gpu_tier.sh archive            # copy finished runs' records to $ARCHIVE (nothing else)
#
# Environment: SWEEPS (names), SWEEP_DIR (ablations), RUNS (runs), RECORDS (ablations/records), ARCHIVE, PY, RUN_S.
# Runs the sweeps below at --scale gpu under runs/, JOBS processes sharing the GPU (the lab-width models are
# launch-bound: packing 4 graphed runs gave 2.7x the throughput of one). No run starts that is expected to end after
# MINUTES: the expected length of one run with JOBS sharing the GPU comes per sweep from ablations/gpu_cost.py
# (measured ms/step, benchmarks/results/cuda_graph.json), or RUN_S seconds if set; a run longer than the whole chunk
# still gets one wave of JOBS runs. Runs in flight finish first. Re-running the same command continues where the last
# chunk stopped: finished and diverged runs are skipped, interrupted ones resume from their checkpoint (on another
# machine only if their run dirs came along: scripts/carry_runs.py). Before starting it copies the committed records
# (ablations/records/<sweep>/gpu/) into runs/ (never over a run dir that exists), and after the chunk it copies every
# finished run's records, without checkpoints and with repository-relative paths, into $ARCHIVE/<sweep>/gpu/
# (default: $OUT/records when $OUT is set): commit those into ablations/records/ to carry the tier across machines.
# It prints the device seconds each sweep used in this chunk (and writes them to $ARCHIVE/device_seconds/<chunk>.csv,
# summed per sweep by notebook 09) and the verdicts of the runs under runs/ (into runs/gpu_tier_results/, not the
# committed CSVs). Exit 0 once all five sweeps are done, 3 while runs are left. MINUTES must stay under the device's
# per-command limit (10 minutes); under an outer `timeout`, follow with `run_gpu_tier.sh archive`.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
SWEEPS=${SWEEPS:-"csa_vs_hca mhc_vs_hc muon_vs_adamw fp4_vs_fp8 anticipatory"}
ARG=${1:-9}
JOBS=${JOBS:-6}
RUN_S=${RUN_S:-auto}                                # seconds of one packed run; auto: per sweep from gpu_cost.py
ARCHIVE=${ARCHIVE:-${OUT:+$OUT/records}}
SWEEP_DIR=${SWEEP_DIR:-ablations}                   # where the sweep files are
RUNS=${RUNS:-runs}                                  # where runs train
RECORDS=${RECORDS:-ablations/records}               # committed records, copied into $RUNS before a chunk

archive_runs() {                                    # finished runs' records, without checkpoints, into $ARCHIVE
    "$PY" - "$ARCHIVE" "$RUNS" $SWEEPS <<'PY'
import json, shutil, sys
from pathlib import Path
from dsv4_lab.sweep import is_diverged, is_finished
archive, runs, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
n = 0
for name in names:
    for sj in Path(runs, name, "gpu").rglob("sweep.json"):
        rd = sj.parent
        if not (rd / "config.json").exists():
            continue
        steps = json.loads((rd / "config.json").read_text())["train"]["max_steps"]
        if not (is_diverged(rd) or is_finished(rd, steps)):
            continue
        dst = archive / rd.relative_to(runs)
        shutil.copytree(rd, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("ckpt.pt"))
        here = str(Path.cwd()) + "/"                # committed records carry paths relative to the repository
        for f in dst.iterdir():
            if f.suffix in (".json", ".ipynb", ".log", ".jsonl") and f.is_file():
                t = f.read_text()
                if here in t:
                    f.write_text(t.replace(here, ""))
        if not is_diverged(rd):
            (dst / "finished.json").write_text("{}\n")
        n += 1
print(f"[gpu tier] {n} finished run records -> {archive}")
PY
}

if [ "$ARG" = "archive" ]; then                     # only the copy (after a chunk that an outer timeout cut short)
    [ -n "$ARCHIVE" ] || { echo "run_gpu_tier.sh archive: set ARCHIVE=dir (or OUT)" >&2; exit 2; }
    archive_runs
    exit 0
fi

if [ "$ARG" = "estimate" ]; then                   # device minutes left, from measurements (ablations/gpu_cost.py)
    SWEEP_DIR="$SWEEP_DIR" RECORDS="$RECORDS" "$PY" ablations/gpu_cost.py estimate $SWEEPS
    exit $?
fi

if [ "$ARG" = "smoke" ]; then
    # 30 steps of each distinct arm config of each sweep (seed 0), JOBS at once, under runs/gpu_smoke/; prints
    # ms/step (from the last record's time_s) so the estimate above can be replaced by a measurement.
    SWEEPS="$SWEEPS" JOBS="$JOBS" SWEEP_DIR="$SWEEP_DIR" RUNS="$RUNS" "$PY" - <<'PY'
import json, os, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
from dsv4_lab.sweep import load_sweep, eval_runs
runs = []
for name in os.environ["SWEEPS"].split():
    sw = load_sweep(f"{os.environ['SWEEP_DIR']}/{name}.json")
    for r in eval_runs(sw, "gpu", os.path.join(os.environ["RUNS"], "gpu_smoke")):
        if r["seed"] == 0:
            kv = {**r["kv"], "max_steps": 30, "warmup_steps": 5, "eval_interval": 30, "ckpt_interval": 30,
                  "log_interval": 10}
            runs.append((f"{name}/{r['arm']}", kv))
def one(item):
    label, kv = item
    args = [f"{k}={v}" for k, v in kv.items()]
    p = subprocess.run([sys.executable, "-m", "dsv4_lab", "train", *args], capture_output=True, text=True)
    if p.returncode:
        return label, f"FAILED: {(p.stderr.strip().splitlines() or ['?'])[-1][:200]}"
    recs = [json.loads(l) for l in open(os.path.join(kv["run_dir"], "metrics.jsonl"))]
    a, b = recs[1], recs[-1]                   # skip step 0 (JIT); time_s is wall time since the loop began
    return label, f"{1e3 * (b['time_s'] - a['time_s']) / (b['step'] - a['step']):.1f} ms/step, loss {b['train_loss']:.3f}"
failed = 0
with ThreadPoolExecutor(int(os.environ["JOBS"])) as ex:
    for label, res in ex.map(one, runs):
        print(f"[gpu smoke] {label:<28} {res}", flush=True)
        failed += res.startswith("FAILED")
sys.exit(1 if failed else 0)
PY
    exit $?
fi

MINUTES=$ARG
end=$(( $(date +%s) + MINUTES * 60 ))
declare -A run_s                                    # per sweep: seconds one run takes with JOBS sharing the GPU
if [ "$RUN_S" = auto ]; then
    while read -r name sec; do run_s[$name]=$sec; done < <(SWEEP_DIR="$SWEEP_DIR" "$PY" ablations/gpu_cost.py wave "$JOBS" $SWEEPS)
fi
for s in $SWEEPS; do                                # committed records first (never over an existing run dir)
    [ -d "$RECORDS/$s/gpu" ] || continue
    for rd in "$RECORDS/$s/gpu"/*/ "$RECORDS/$s/gpu"/select/*/; do
        [ -d "$rd" ] || continue
        dst="$RUNS/${rd#"$RECORDS"/}"
        [ -e "$dst" ] || { mkdir -p "$(dirname "$dst")"; cp -r "$rd" "$dst"; }
    done
done
complete=0
chunk=$(date -u +%Y%m%dT%H%M%SZ)
gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" 2>/dev/null)
first=1
for s in $SWEEPS; do
    rs=${run_s[$s]:-}                               # RUN_S if set; 240 s for a sweep without measurements
    [ -n "$rs" ] || { [ "$RUN_S" = auto ] && rs=240 || rs=$RUN_S; }
    left=$(( end - rs - $(date +%s) ))              # no run starts that would end after the chunk
    if [ "$left" -le 0 ] && [ "$first" = 0 ]; then
        echo "[gpu tier] chunk time used up before $s; run the same command again to continue"
        break
    fi
    [ "$left" -le 0 ] && left=30                    # a run longer than the chunk: one wave of JOBS runs, then stop
    first=0
    t0=$(date +%s)
    if "$PY" -m dsv4_lab sweep "$SWEEP_DIR/$s.json" --scale gpu --jobs "$JOBS" --root "$RUNS" --stop-after "$left"; then
        complete=$(( complete + 1 ))
    fi
    used=$(( $(date +%s) - t0 ))
    echo "[gpu tier] $s: $used s of device time in this chunk"
    if [ -n "$ARCHIVE" ]; then                      # device seconds per sweep and chunk (notebook 09 sums them)
        mkdir -p "$ARCHIVE/device_seconds"
        f="$ARCHIVE/device_seconds/$chunk.csv"
        [ -e "$f" ] || echo "sweep,chunk,seconds,jobs,device" > "$f"
        echo "$s,$chunk,$used,$JOBS,$gpu" >> "$f"
    fi
done
if [ -n "$ARCHIVE" ]; then
    archive_runs
fi
n=$(echo $SWEEPS | wc -w)
# the verdicts of the GPU runs here, into a scratch folder (the committed ablations/results/*.csv are rebuilt from
# ablations/records once the archived records are copied there: ablations/README.md "GPU tier")
"$PY" -m dsv4_lab summarize "$RUNS" --out "$RUNS/gpu_tier_results" --sweeps "$SWEEP_DIR"
if [ "$complete" -eq "$n" ]; then
    echo "[gpu tier] all $n sweeps complete"
    exit 0
fi
echo "[gpu tier] $complete/$n sweeps complete; run the same command again to continue"
exit 3
