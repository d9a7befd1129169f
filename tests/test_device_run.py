"""benchmarks/device_run.sh's GPU-test step on the CPU, with a fake python3 and nvidia-smi first on PATH: each case
gets its verdict line; a case that ran out of GPU memory beside the others is marked OOM and run again alone after
them, its second verdict the one that counts (PASS, or FAIL with its log kept), while an ordinary failure is not run
again."""
import os
import shutil
import subprocess
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


@pytest.mark.skipif(not all(map(shutil.which, ("bash", "xargs", "timeout", "tar"))), reason="needs bash, xargs, "
                    "timeout and tar")
def test_a_case_out_of_gpu_memory_is_run_again_alone(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text(FAKE_PYTHON)
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho fake GPU\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "benchmarks" / "results").mkdir(parents=True)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "OUT": str(out), "TEST_JOBS": "4",
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
