"""dsv4_lab/kernels/compile_check.py: kernels that run in the Triton interpreter but that the GPU compiler rejects are
caught on CPU (docs/kernels.md §7). Each kernel below runs in the interpreter without error; three of them do not lower
for sm_90 (a name bound on one branch only; a loop-carried variable that changes type; an autotune config that only
the GPU runs, with a block that is not a power of two)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

if sys.platform != "linux":                                      # triton is a Linux-only dependency (pyproject)
    pytest.skip(f"triton is not installed on {sys.platform} (a Linux-only dependency)", allow_module_level=True)

WORKER = r'''
import json, sys
import torch
import triton
import triton.language as tl
from dsv4_lab.kernels import compile_check
from dsv4_lab.kernels.indexer_topk.rowselect import _keys          # a helper from the package, called by a kernel
compile_check.install()


@triton.jit
def good(X, Y, n, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    x = tl.load(X + o, mask=o < n, other=0.0)
    tl.store(Y + o, tl.sum(x, 0) + x, mask=o < n)                   # tl.sum: triton.language's own @jit code


@triton.jit
def with_helper(X, Y, n, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    x = tl.load(X + o, mask=o < n, other=0.0)
    tl.store(Y + o, _keys(x, o < n, 0).to(tl.float32), mask=o < n)


@triton.jit
def one_branch_name(X, Y, n, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    x = tl.load(X + o, mask=o < n, other=0.0)
    if n > 2:
        t = tl.sum(x, 0)
    else:
        s = tl.max(x, 0)
    tl.store(Y + o, x + t, mask=o < n)                              # t: unbound when n <= 2 (the GPU compiler says so)


@triton.jit
def loop_type_change(X, Y, n, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.int32)
    for i in range(0, n):
        acc = acc + tl.load(X + o, mask=o < n, other=0.0)           # int32 -> fp32 inside the loop
    tl.store(Y + o, acc.to(tl.float32), mask=o < n)


from dsv4_lab.kernels._common import configs                        # the interpreter runs BLOCK 8 only


@triton.autotune(configs=configs([triton.Config({"BLOCK": 8}), triton.Config({"BLOCK": 12})],
                                 triton.Config({"BLOCK": 8})), key=["n"])
@triton.jit
def tuned_gpu_config(X, Y, n, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)                                         # BLOCK 12: not a power of two, only on the GPU
    tl.store(Y + o, tl.load(X + o, mask=o < n, other=0.0), mask=o < n)


out = {}
for name, kern in (("good", good), ("with_helper", with_helper), ("one_branch_name", one_branch_name),
                   ("loop_type_change", loop_type_change), ("tuned_gpu_config", tuned_gpu_config)):
    x, y = torch.arange(5, dtype=torch.float32), torch.zeros(5)
    try:
        kern[(1,)](x, y, 5) if kern is tuned_gpu_config else kern[(1,)](x, y, 5, BLOCK=8)
        out[name] = "ok"
    except compile_check.KernelDoesNotCompile as e:
        out[name] = "rejected: " + str(e)
    except Exception as e:
        out[name] = f"other {type(e).__name__}: {e}"
out["compiled"] = compile_check.compiled()
print(json.dumps(out))
'''


def _run(src: str, folder) -> dict:
    """The worker as a script (@triton.jit needs a source file) in a fresh interpreter process; the check is off
    unless the worker installs it."""
    path = folder / "worker.py"
    path.write_text(src)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", DSV4_GPU_COMPILE_CHECK="0",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    return _run(WORKER, tmp_path_factory.mktemp("cc"))


def test_valid_kernels_lower_and_run(verdicts):
    assert verdicts["good"] == "ok" and verdicts["with_helper"] == "ok", verdicts
    assert "__main__.good" in verdicts["compiled"] and "__main__.with_helper" in verdicts["compiled"]


@pytest.mark.parametrize("name, says", [("one_branch_name", "NameError"), ("loop_type_change", "Loop-carried"),
                                        ("tuned_gpu_config", "power of 2")])
def test_kernels_the_gpu_compiler_rejects_are_caught(verdicts, name, says):
    v = verdicts[name]
    assert v.startswith("rejected: ") and f"__main__.{name}" in v and says in v, v


def test_the_interpreter_alone_runs_them(tmp_path):
    """Without the check the same two kernels run in the interpreter without error: what the check is for."""
    src = WORKER.replace("compile_check.install()\n", "\n", 1)
    assert src != WORKER
    out = _run(src, tmp_path)
    assert out["one_branch_name"] == "ok" and out["loop_type_change"] == "ok" and out["tuned_gpu_config"] == "ok", out
