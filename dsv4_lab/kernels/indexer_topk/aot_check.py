"""Compile the indexer kernels for sm_90 (H200) on a machine without a GPU: catches compile errors, shared-memory
overflows and register spills before a GPU run. Triton compiles to PTX and runs its bundled ptxas; no driver needed.

    .venv/bin/python -m dsv4_lab.kernels.indexer_topk.aot_check        (~30 s on one core; do not set TRITON_INTERPRET)

Checks the lab shapes (HI 4, DI 64, k 512, bf16): every score-kernel autotune config for prefill (BLOCK_M 32) and
decode (BLOCK_M 4) tiles, with and without the group-max output, and the radix kernel's variants (prefill row,
group-max prefilter, two-stage stage 1 / stage 2). Exit status 1 on a failure, > 64 spilled bytes, or shared memory
> 227 KB.
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile

SMEM_LIMIT = 232448                                                   # H100/H200 max dynamic shared memory per block
SPILL_OK = 64                                                         # a few spilled bytes ("ok~") are tolerated


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile")
        return 1
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton as it
    target = GPUTarget("cuda", 90, 32)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

    def compile_one(jf, types, consts, num_warps, num_stages):
        names = list(inspect.signature(jf.fn).parameters)
        sig = {n: ("constexpr" if n in consts else types[n]) for n in names}
        src = ASTSource(fn=jf, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
        return triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})

    def spills(k):
        if not os.path.exists(ptxas):
            return "ptxas not found"
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(k.asm["ptx"])
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull], capture_output=True,
                             text=True).stderr
        os.unlink(f.name)
        lines = [ln.strip() for ln in out.splitlines() if "spill" in ln or "Used" in ln]
        return " | ".join(lines[-2:])

    bad = 0

    def report(name, fn):
        nonlocal bad
        try:
            k = fn()
            sp = spills(k)
            m = re.search(r"(\d+) bytes spill stores", sp)
            spill = int(m.group(1)) if m else -1
            ok = k.metadata.shared <= SMEM_LIMIT and 0 <= spill <= SPILL_OK
            bad += not ok
            tag = "BAD " if not ok else ("ok  " if spill == 0 else "ok~ ")
            print(f"{tag} {name}: shared {k.metadata.shared} B; {sp}", flush=True)
        except Exception as e:                                        # noqa: BLE001
            bad += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}", flush=True)

    score_types = dict(QI="*bf16", KI="*bf16", WT="*bf16", OUT="*fp32", GM="*fp32", Tq="i32", Sp="i32", t0="i32",
                       q_offset="i32", sqb="i64", sqt="i32", sqh="i32", skb="i32", sks="i32", swb="i32", swt="i32",
                       sob="i64", sot="i32", sgb="i64", sgt="i32")
    for cfg in it._indexer_scores_fwd.configs:
        for bm, fill, group in ((32, False, 0), (32, True, 0), (32, False, 32), (4, False, 0)):
            consts = dict(HI=4, HIP=4, DI=64, BLOCK_D=64, BLOCK_M=bm, RATIO=4, DOT_DT=tl.bfloat16, FILL=fill,
                          GROUP=group, **cfg.kwargs)
            report(f"scores {cfg.kwargs} warps {cfg.num_warps} stages {cfg.num_stages} BLOCK_M {bm} fill {fill} "
                   f"group {group}",
                   lambda: compile_one(it._indexer_scores_fwd.fn, score_types, consts, cfg.num_warps, cfg.num_stages))
    radix_types = dict(VAL="*fp32", IDXIN="*i32", OVAL="*fp32", OIDX="*i32", SV="*fp32", SI="*i32", GM="*fp32",
                       THR="*fp32", L="i32", C="i32", svr="i32", sir="i32", sor="i32", ssr="i32", sgr="i32",
                       sthr="i32", Tq="i32", q0="i32")
    for name, v in (("prefill row", dict(HAS_IDX=False, SORT=True, RATIO=4, GROUP=1, GP=0, GM_MAX=False,
                                         WRITE_THR=False)),
                    ("prefill row + group max", dict(HAS_IDX=False, SORT=True, RATIO=4, GROUP=32, GP=1024,
                                                     GM_MAX=False, WRITE_THR=False)),
                    ("stage 1", dict(HAS_IDX=False, SORT=False, RATIO=4, GROUP=1, GP=0, GM_MAX=False, WRITE_THR=True)),
                    ("stage 2", dict(HAS_IDX=True, SORT=True, RATIO=0, GROUP=512, GP=32, GM_MAX=True,
                                     WRITE_THR=False))):
        consts = dict(K=512, KP=512, BLOCK=4096, CAP=2048, BLOCK_C=1024, **v)
        report(f"radix {name}", lambda: compile_one(it._radix_topk_fwd, radix_types, consts, 16, 3))
    print("failures:", bad)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
