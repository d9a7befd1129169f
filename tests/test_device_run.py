"""benchmarks/device_run.sh's GPU-test step on the CPU, with a fake python3 and nvidia-smi first on PATH: each case
gets its verdict line; a case that ran out of GPU memory beside the others is marked OOM and run again alone after
them, its second verdict the one that counts (PASS, or FAIL with its log kept), while an ordinary failure is not run
again. With CSA_8K_REPEATS the 8K prefill runs in that many fresh processes, gathered into one record."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# the fake interpreter: collection lists four cases; t_oom fails with an out-of-memory error only beside the others
# (RETRY unset), t_oom_always every time, t_fail with an assertion, t_ok never
FAKE_PYTHON = """#!/bin/sh
case "$*" in
  *--collect-only*) printf 'tests/x.py::t_ok\\ntests/x.py::t_oom\\ntests/x.py::t_oom_always\\ntests/x.py::t_fail\\n';;
  *"import torch"*) echo "torch fake triton fake";;
  *t_ok*) echo "1 passed";;
  *t_oom_always*) echo "torch.OutOfMemoryError: CUDA out of memory (always)"; exit 1;;
  *t_oom*) if [ -n "$RETRY" ]; then echo "1 passed"; else echo "torch.OutOfMemoryError: CUDA out of memory"; exit 1; fi;;
  *t_fail*) echo "AssertionError: wrong"; exit 1;;
esac
"""


def _fake_machine(tmp_path, python3: str):
    """A bin folder holding the fake python3 and nvidia-smi, an empty work tree with benchmarks/results, and $OUT:
    returns (PATH with the fakes first, work, out)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text(python3)
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho fake GPU\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "benchmarks" / "results").mkdir(parents=True)
    return f"{fake}{os.pathsep}{os.environ['PATH']}", work, out


@pytest.mark.skipif(not all(map(shutil.which, ("bash", "xargs", "timeout", "tar"))), reason="needs bash, xargs, "
                    "timeout and tar")
def test_a_case_out_of_gpu_memory_is_run_again_alone(tmp_path):
    path, work, out = _fake_machine(tmp_path, FAKE_PYTHON)
    env = {**os.environ, "PATH": path, "OUT": str(out), "TEST_JOBS": "4",
           "TEST_TIMEOUT": "60", "PER_TEST": "30", "RETRY_TIMEOUT": "60"}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_run.sh"), ""], cwd=work, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = sorted((ln.split()[0], ln.split()[-1].split("::")[1]) for ln in (out / "gpu_tests.log").read_text()
                   .splitlines())
    assert lines == sorted([("PASS", "t_ok"), ("FAIL", "t_fail"), ("OOM", "t_oom"), ("PASS", "t_oom"),
                            ("OOM", "t_oom_always"), ("FAIL", "t_oom_always")]), lines
    failures = (out / "gpu_test_failures.log").read_text()
    assert "== FAIL tests/x.py::t_fail" in failures and "== FAIL tests/x.py::t_oom_always" in failures
    assert "t_oom\n" not in failures, failures
    assert "re-run alone after running out of memory" in res.stdout and (out / "results.tgz").exists()


# the fake interpreter of the 8K repeats: each bench_csa process writes csa.json with its own 8K record (the parts
# 1.0, -, 2.0, 0.5 ms against SDPA-flash's 1.0), but the second fails and writes nothing; prefill_8k_repeats.py runs
# in the real interpreter
FAKE_BENCH = """#!/bin/sh
case "$*" in
  *"import torch"*) echo "torch fake triton fake";;
  *run_all.py*)
    n=$(cat count 2>/dev/null || echo 0); n=$((n + 1)); echo $n > count
    [ $n -eq 2 ] && exit 1
    ms=$(echo "1.0 - 2.0 0.5" | cut -d" " -f$n)
    printf '{"env": {"gpu": "fake", "time": "t%s"}, "csa_prefill": {"triton_8192": {"ms": %s, "compressor_ms": 0.1, \
"indexer_ms": 0.1, "indexer_method": "m", "sparse_ms": 0.1, "sdpa_flash_ms": 1.0, "speedup_vs_sdpa_flash": %s}}}' \
      $n $ms $(echo "1.0 - 0.5 2.0" | cut -d" " -f$n) > benchmarks/results/csa.json;;
  *prefill_8k_repeats.py*) exec "$REALPY" "$@";;
esac
"""


@pytest.mark.skipif(not all(map(shutil.which, ("bash", "tar", "seq", "mktemp"))), reason="needs bash, tar, seq, mktemp")
def test_8k_repeats_gather_one_sample_per_process_and_leave_csa_json_as_it_was(tmp_path):
    path, work, out = _fake_machine(tmp_path, FAKE_BENCH)
    (work / "benchmarks" / "prefill_8k_repeats.py").symlink_to(ROOT / "benchmarks" / "prefill_8k_repeats.py")
    saved = '{"families": {"topk_row": {"status": "ok"}}}'
    (work / "benchmarks" / "results" / "csa.json").write_text(saved)
    env = {**os.environ, "PATH": path, "OUT": str(out), "CSA_8K_REPEATS": "4",
           "REALPY": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_run.sh"), "-"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert [ln for ln in res.stdout.splitlines() if ln.startswith("8K repeat")] == \
        ["8K repeat 1 rc=0", "8K repeat 2 rc=1", "8K repeat 3 rc=0", "8K repeat 4 rc=0", "8K repeats rc=0"], res.stdout
    rep = json.loads((work / "benchmarks" / "results" / "csa_8k_repeats.json").read_text())
    assert [s["time"] for s in rep["samples"]] == ["t1", "t3", "t4"]                  # the failed process: no sample
    assert rep["stats"]["by_parts_speedup"]["all"] == {"n": 3, "median": 1.0, "min": 0.5, "max": 2.0, "below_1": 1}
    assert (work / "benchmarks" / "results" / "csa.json").read_text() == saved     # the families' record, untouched
    with tarfile.open(out / "csa_8k_processes.tgz") as t:                          # each sampled process's record
        assert sorted(t.getnames()) == ["csa_8k_1.json", "csa_8k_3.json", "csa_8k_4.json"]
