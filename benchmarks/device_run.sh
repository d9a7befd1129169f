#!/bin/bash
# One call on a GPU machine: GPU tests, then the named benchmark families, time-capped so the
# call ends inside its limit; every result and log comes back in $OUT/results.tgz.
#   bash benchmarks/device_run.sh "<pytest -k expression or ->" <family> [family ...]
#   env: TEST_TIMEOUT (s, default 300: on a cold machine the compiled-training case alone took over 120 s; TEST_JOBS parallel, default 4; PER_TEST s, default 240; SLOW_FIRST: a grep -E pattern of the test ids started first; a case that ran out of GPU memory beside the others is run again alone afterwards, all such within RETRY_TIMEOUT s, default 240), BENCH_TIMEOUT (s, default 360), E2E_EXTRA=1 (+ EXTRA_TIMEOUT, default 150: the V4 step breakdown only),
#        PROBES="probe_mhc_parts.py probe_host.py ..." (benchmarks/ scripts run last, one after another, each capped at PROBE_TIMEOUT s, default 120; their JSON lands in benchmarks/results)
#        CSA_8K_REPEATS=n (after the families: bench_csa's 8K prefill family alone in n fresh processes, each capped at
#        REPEAT_TIMEOUT s, default 150, gathered by prefill_8k_repeats.py into csa_8k_repeats.json; each process's own
#        record comes back in $OUT/csa_8k_processes.tgz; csa.json is left as the families wrote it),
#        ALONE (a grep -E pattern of test ids that time the GPU, default "bench_queued": run one at a time after the
#        others, within ALONE_TIMEOUT s, default 120),
#        NEED_GPU (a grep -E pattern, e.g. H200: on a card whose name does not match, say so and exit 3 before anything
#        runs, so a machine of the wrong kind costs only its start)
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
K=$1; shift
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv,noheader
if [ -n "${NEED_GPU:-}" ] && ! nvidia-smi --query-gpu=name --format=csv,noheader | grep -qE "$NEED_GPU"; then
  echo "device_run.sh: NEED_GPU=$NEED_GPU; this card is $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1): nothing run"
  exit 3
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ "$K" != "-" ]; then
  # one pytest process per test, TEST_JOBS at a time (Triton compiles are CPU-bound; the GPU has room for several),
  # each capped at PER_TEST s, the whole step at TEST_TIMEOUT s: a slow case cannot hide the others' results. A case
  # still running when the step's cap hits gets no line in gpu_tests.log; its own $OUT/t.<pid>.log comes back instead
  # the GPU suite: every test marked `gpu` (the kernel cases, the HCA prefill, CUDA graphs, batch invariance, the
  # MoE's CUTLASS grouped GEMM, compiled training)
  python3 -m pytest -q --collect-only -p no:cacheprovider -m gpu tests --ignore=tests/lab \
    ${K:+-k "$K"} 2>/dev/null | grep "::" > "$OUT/gpu_test_ids.all"
  # the cases that took longest in earlier runs start first, so that none of them begins near the step's cap
  SLOW=${SLOW_FIRST:-"indexer_select-|compile_blocks|deterministic_training|invariant_mode|indexer_methods|indexer_topk-|model_kernel_path"}
  # cases that time the GPU (ALONE) run after the others, one at a time: beside other jobs their timings read the
  # other processes' kernels too
  ALONE=${ALONE:-"bench_queued"}
  grep -E "$ALONE" "$OUT/gpu_test_ids.all" > "$OUT/gpu_test_ids.alone"
  grep -vE "$ALONE" "$OUT/gpu_test_ids.all" > "$OUT/gpu_test_ids.shared"
  { grep -E "$SLOW" "$OUT/gpu_test_ids.shared"; grep -vE "$SLOW" "$OUT/gpu_test_ids.shared"; } > "$OUT/gpu_test_ids.txt"
  rm -f "$OUT/gpu_test_ids.all" "$OUT/gpu_test_ids.shared"
  : > "$OUT/gpu_tests.log"
  export OUT
  # one case: its verdict line in gpu_tests.log, and the tail of its log in gpu_test_failures.log if it failed
  RUN_ONE='
    t0=$(date +%s); timeout -s INT -k 20 '"${PER_TEST:-240}"' python3 -m pytest -q -p no:cacheprovider -rfE --full-trace "$1" > "$OUT/t.$$.log" 2>&1
    rc=$?; case $rc in 0) r=PASS;; 5) r=NONE;; 124|137) r=TIMEOUT;; *) r=FAIL;; esac
    grep -q " skipped" "$OUT/t.$$.log" && [ $rc = 0 ] && r=SKIP
    # out of GPU memory beside the other jobs (torch.OutOfMemoryError, or a CUDA error where a kernel or a copy ran
    # out): run again alone once they are done (below), not a verdict yet
    [ $r = FAIL ] && [ -z "${RETRY:-}" ] && grep -qE "OutOfMemoryError|CUDA error: out of memory" "$OUT/t.$$.log" && r=OOM && echo "$1" >> "$OUT/oom_retry.txt"
    echo "$r $(( $(date +%s) - t0 ))s $1" >> "$OUT/gpu_tests.log"
    # a timed-out case gets SIGINT first: pytest then prints the stack it was interrupted in (a compile, a kernel)
    case $r in FAIL|TIMEOUT) { echo "== $r $1"; tail -c 3000 "$OUT/t.$$.log"; } >> "$OUT/gpu_test_failures.log";; esac
    rm -f "$OUT/t.$$.log"'
  timeout "${TEST_TIMEOUT:-300}" xargs -a "$OUT/gpu_test_ids.txt" -d '\n' -P "${TEST_JOBS:-4}" -I{} bash -c "$RUN_ONE" _ {}
  echo "gpu tests rc=$? ($(wc -l < "$OUT/gpu_test_ids.txt") collected)"
  if [ -s "$OUT/gpu_test_ids.alone" ]; then           # one at a time, after the shared ones
    timeout "${ALONE_TIMEOUT:-120}" xargs -a "$OUT/gpu_test_ids.alone" -d '\n' -P 1 -I{} bash -c "$RUN_ONE" _ {}
    echo "gpu tests run alone: rc=$? ($(wc -l < "$OUT/gpu_test_ids.alone"))"
  fi
  rm -f "$OUT/gpu_test_ids.alone"
  if [ -s "$OUT/oom_retry.txt" ]; then                # one at a time, each within the step's cap again
    RETRY=1 timeout "${RETRY_TIMEOUT:-240}" xargs -a "$OUT/oom_retry.txt" -d '\n' -P 1 -I{} bash -c "$RUN_ONE" _ {}
    echo "gpu tests re-run alone after running out of memory: rc=$? ($(wc -l < "$OUT/oom_retry.txt"))"
  fi
  sort "$OUT/gpu_tests.log"; cut -d" " -f1 "$OUT/gpu_tests.log" | sort | uniq -c
  [ -f "$OUT/gpu_test_failures.log" ] && tail -c 3000 "$OUT/gpu_test_failures.log"
fi
if [ $# -gt 0 ]; then
  timeout "${BENCH_TIMEOUT:-360}" python3 benchmarks/run_all.py --only "$@" > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; grep -E "^(== |e2e |csa |hca |Traceback|[A-Za-z]*Error)" "$OUT/bench.log" | cut -c1-300 | tail -60
fi
if [ -n "${CSA_8K_REPEATS:-}" ]; then               # one process is one sample of the host-bound 8K prefill (README T2)
  R8=$(mktemp -d); saved=$R8/saved.json; [ -f benchmarks/results/csa.json ] && cp benchmarks/results/csa.json "$saved"
  pairs=()
  for i in $(seq 1 "$CSA_8K_REPEATS"); do            # each process writes csa.json afresh: a failed one adds nothing
    rm -f benchmarks/results/csa.json
    CSA_FAMILIES=prefill_8192 timeout "${REPEAT_TIMEOUT:-150}" python3 benchmarks/run_all.py --only csa \
      > "$OUT/repeat_8k.log" 2>&1
    rc=$?; echo "8K repeat $i rc=$rc"
    if [ $rc -eq 0 ] && [ -f benchmarks/results/csa.json ]; then
      cp benchmarks/results/csa.json "$R8/csa_8k_$i.json" && pairs+=("repeat=$R8/csa_8k_$i.json")
    fi
  done
  if [ -f "$saved" ]; then cp "$saved" benchmarks/results/csa.json; else rm -f benchmarks/results/csa.json; fi
  if [ ${#pairs[@]} -gt 0 ]; then
    tar czf "$OUT/csa_8k_processes.tgz" -C "$R8" "${pairs[@]#repeat=$R8/}"
    python3 benchmarks/prefill_8k_repeats.py --out benchmarks/results/csa_8k_repeats.json \
      --note "device_run.sh CSA_8K_REPEATS=$CSA_8K_REPEATS: one machine, the 8K family alone per process" "${pairs[@]}"
    echo "8K repeats rc=$?"
  else
    echo "8K repeats: no process gave a sample"
  fi
fi
if [ -n "${E2E_EXTRA:-}" ]; then                     # bench_e2e --breakdown-only: GPU time of a V4 step by component
  timeout "${EXTRA_TIMEOUT:-150}" python3 benchmarks/bench_e2e.py --breakdown-only > "$OUT/e2e_extra.log" 2>&1
  echo "e2e extra rc=$?"; grep -vE "Warning|_warn_once" "$OUT/e2e_extra.log" | cut -c1-260 | tail -40
fi
for p in ${PROBES:-}; do                             # probes: each a benchmarks/ script writing its own JSON
  timeout "${PROBE_TIMEOUT:-120}" python3 "benchmarks/$p" >> "$OUT/probes.log" 2>&1
  echo "probe $p rc=$?"
done
[ -f "$OUT/probes.log" ] && grep -E "results/|Traceback|Error" "$OUT/probes.log" | cut -c1-300 | tail -20
tar czf "$OUT/results.tgz" benchmarks/results
