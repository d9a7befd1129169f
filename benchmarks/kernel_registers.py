"""Registers, spills and shared memory of our Triton kernels on an sm_90 GPU, read on the CPU (no GPU needed).

Triton compiles a kernel for a named target without a driver, and ships NVIDIA's ptxas, whose `-v` report gives the
registers per thread, the spill bytes and the stack frame. Registers per thread x threads per program bounds how many
programs an SM holds (65 536 registers per SM on an H200), and so how many warps it has to hide memory latency: the
number to read first when a kernel is latency-bound (docs/kernels.md §3 and §4 quote this file's results).

Covered: the indexer score kernel (indexer_topk/triton.py) for every autotune config; the sieve and row selects
(indexer_topk/sieve.py, rowselect.py) by dtype x warps x store form (tl.store; inline PTX: _asm), at their prefill
shapes; the one-launch split-row select (select.py) at decode's setting; the
mHC pre kernel (mhc/triton.py) for every autotune config and candidate, with and without its fused mix; the mHC pre backward for every entry of
bench_mhc.py's BWD_SWEEP and its dW kernel; the HCA prefill kernel and the CSA sparse-attention backward (its sparse
and window parts) for every autotune config.
Each entry also lists the pipelined shared-memory buffers an asynchronous MMA may still read when they are refilled
(`mma_refill_hazards`, empty when none): a race the GPU shows only now and then.

    python benchmarks/kernel_registers.py [--only sieve rowsel scores mhc_pre mhc_pre_bwd mhc_dw hca_fwd
                                           sparse_bwd window_bwd select_one_launch tail_emit tail_one_launch
                                           sparse_decode] [--out DIR]
Writes benchmarks/results/kernel_registers.json (or DIR/kernel_registers.json); --only merges into the saved file.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
RESULTS = os.path.join(HERE, "results")
from dsv4_lab.kernels.compile_check import TARGET_ARCH as ARCH  # noqa: E402  (sm_90: the H200)
SMEM_PER_SM = 233472                        # shared memory per SM on an H200 (228 KiB)
ROW_ARGS = {a: "i32" for a in ("L", "sv", "so", "Tq", "q0", "k")}     # the selects' row-length and stride arguments
# their values at the shapes compiled (resources' `ints`): the sieve on a 128K prefill's last chunk of 8K query rows
# (32K entries per row), rowsel on an 8K prefill's rows (2K entries), the one-launch select on one 1M-context decode
# row (256K entries over 128 programs of 2K), k = 512
SIEVE_INTS = dict(L=32768, sv=32768, so=512, Tq=8192, q0=122880, k=512)
ROWSEL_INTS = dict(L=2048, sv=2048, so=512, Tq=8192, q0=0, k=512)
SELECT_ONE_LAUNCH_INTS = dict(L=262144, C=2048, P=128, sv=262144, so=512, Tq=1, q0=1048575, k=512)


def mma_refill_hazards(ttgir: str) -> list[str]:
    """Pipelined shared-memory buffers that an asynchronous warpgroup MMA may still be reading when the loop's next
    asynchronous copy refills them, read off the TTGIR of one compiled kernel.

    Triton's software pipeliner gives a load copied D iterations ahead into shared memory a ring of buffers; the copy
    issued in iteration i lands in the buffer of iteration i + D. With D + 1 buffers that is never the buffer iteration
    i reads; with D buffers it is the same one, which is safe only if every MMA reading it has completed (a
    `warp_group_dot_wait` with pendings 0 after it) before the copy is issued. A buffer whose ring holds as many
    buffers as copies issued before the loop (D), read by an asynchronous `warp_group_dot` that is not waited for
    before the refilling copy in the loop body, is reported as '<buffer>: <reason>'. Triton 3.6 builds such a ring
    when the loaded tile has a use besides the MMA (the mHC pre kernel's x: the MMAs and its sum of squares)."""
    lines = [ln.strip() for ln in ttgir.splitlines()]
    alloc_of: dict = {}                              # SSA value -> the multi-buffered alloc it views
    ring: dict = {}                                  # alloc -> (buffers, prologue copies)
    for i, ln in enumerate(lines):
        m = re.match(r"(%[\w.]+) = ttg\.local_alloc\s*:\s*\(\) -> !ttg\.memdesc<(\d+)x", ln)
        if m:
            name, nbuf = m.group(1), int(m.group(2))
            alloc_of[name] = name
            pro = 0
            for ln2 in lines[i + 1:]:
                if "scf.for" in ln2:
                    break
                if re.search(r"ttg\.memdesc_index " + re.escape(name) + r"\[", ln2):
                    pro += 1
            ring[name] = (nbuf, pro)
            continue
        m = re.match(r"(%[\w.]+) = ttg\.memdesc_(?:index|trans|reshape|subslice) (%[\w.]+)", ln)
        if m and m.group(2) in alloc_of:
            alloc_of[m.group(1)] = alloc_of[m.group(2)]
    out = []
    # scan each loop body in order: async dots reading a ring, waits retiring them, copies refilling a ring
    pending: list = []                               # (dot result, allocs it reads), oldest first
    for ln in lines:
        if "scf.for" in ln:
            pending = []
            continue
        m = re.match(r"(%[\w.]+) = ttng\.warp_group_dot (%[\w.]+), (%[\w.]+),", ln)
        if m and "isAsync = true" in ln:
            pending.append((m.group(1), {alloc_of[v] for v in m.group(2, 3) if v in alloc_of}))
            continue
        m = re.search(r"ttng\.warp_group_dot_wait .*\{pendings = (\d+)", ln)
        if m:
            k = int(m.group(1))
            pending = pending[len(pending) - k:] if k else []
            continue
        m = re.search(r"ttg\.async_copy_global_to_local %[\w.]+, (%[\w.]+)", ln)
        if m and m.group(1) in alloc_of:
            a = alloc_of[m.group(1)]
            nbuf, pro = ring.get(a, (0, 0))
            if nbuf and nbuf <= pro and any(a in reads for _, reads in pending):
                out.append(f"{a}: {nbuf} buffers for {pro} copies in flight, refilled while an asynchronous MMA "
                           "may read it")
    return sorted(set(out))


def resources(fn, pointers: dict, constexprs: dict, num_warps: int, num_stages: int = 3, ints: dict | None = None,
              maxnreg: int | None = None) -> dict:
    """Compile the @triton.jit function fn for sm_90 (pointers: {arg: "*bf16" | "i32" | ...}; every other argument
    a constexpr from `constexprs`) and read ptxas -v: {registers, spill_stores, spill_loads, stack, smem, ...}.

    The compile is specialized as Triton's JIT specializes a GPU launch: every pointer marked 16-byte aligned (what a
    fresh PyTorch allocation is), and each integer argument given in `ints` ({arg: its value at the shape compiled})
    marked divisible by 16 when it is. Without these marks the compiler may neither vectorise the loads nor
    software-pipeline a loop (no asynchronous copies), and the registers and shared memory it reports are those of
    code the GPU never runs. `async_copies` counts the asynchronous global-to-shared copies in the TTGIR (cp.async:
    a loop whose loads feed tl.dot, pipelined over num_stages) and `tma_copies` the TMA ones; `layout_converts` the
    layout conversions (each a round trip through shared memory with barriers, unless Triton finds a shuffle)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = {a: pointers.get(a, "constexpr") for a in fn.arg_names}
    ints = ints or {}
    unknown = [a for a in ints if sig.get(a) not in ("i32", "i64")]
    if unknown:
        raise ValueError(f"resources: ints {unknown} are not integer arguments of {fn.__name__}")
    ones = {a: 1 for a, v in ints.items() if v == 1}             # the JIT compiles an integer argument of 1 as a constant
    sig.update({a: "constexpr" for a in ones})
    constexprs = {**constexprs, **ones}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if sig[a].startswith("*") or (a in ints and ints[a] % 16 == 0)}
    k = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", ARCH, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages,
                                **({"maxnreg": maxnreg} if maxnreg else {})})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(k.asm["ptx"])
        p = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{ARCH}a", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True, timeout=300)
    text = p.stderr

    def num(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else None
    regs = num(r"Used (\d+) registers")
    threads = 32 * num_warps
    ttgir = k.asm["ttgir"]
    return {"num_warps": num_warps, "num_stages": num_stages, "maxnreg": maxnreg, "registers": regs,
            "spill_stores": num(r"(\d+) bytes spill stores"), "spill_loads": num(r"(\d+) bytes spill loads"),
            "stack": num(r"(\d+) bytes stack frame"), "smem": k.metadata.shared,
            "async_copies": ttgir.count("ttg.async_copy_global_to_local"),
            "tma_copies": ttgir.count("async_tma_copy_global_to_local"),
            "layout_converts": ttgir.count("ttg.convert_layout"),
            "pdl_waits": k.asm["ptx"].count("griddepcontrol.wait"),
            "mma_refill_hazards": mma_refill_hazards(ttgir),
            "programs_per_sm_by_registers": (65536 // (regs * threads)) if regs else None,
            "programs_per_sm_by_smem": (SMEM_PER_SM // k.metadata.shared) if k.metadata.shared else None}


def _jit(kernel):
    """The JITFunction under a kernel's autotune / heuristics wrappers."""
    from triton.runtime.jit import JITFunction
    while not isinstance(kernel, JITFunction):                   # _common.jit's kernels are a subclass of it
        kernel = kernel.fn
    return kernel


def _attention_ints(fn, T, H, D, K=512, ratio=4):
    """The integer arguments of attention kernel fn at one sequence of T tokens, contiguous q / o / do (B, T, H, D),
    kv (B, T, D), compressed entries (B, T / ratio, D), indices (B, T, K), lse (B, T, H); those fn takes."""
    S = T // ratio
    ints = dict(T=T, Tk=T, S=S, q_offset=0, kv_start=0, T_BUCKET=T, sqb=T * H * D, sqt=H * D, sqh=D, skb=T * D,
                skt=D, scb=S * D, scs=D, sib=T * K, sit=K, sob=T * H * D, sot=H * D, soh=D, slb=T * H, slt=H)
    return {a: v for a, v in ints.items() if a in fn.arg_names}


# the selects' two store forms (select.py _scatter): tl.store, and inline PTX stores (entries tagged _asm)
STORE_FORMS = ((False, ""), (True, "_asm"))


def sieve():
    from dsv4_lab.kernels.indexer_topk import sieve as sv
    out = {}
    for dt in ("bf16", "fp32"):
        ptr = {"VAL": f"*{dt}", "CV": "*fp32", "CI": "*i32", "OVAL": "*fp32", "OIDX": "*i32", "PATH": "*i32",
               **ROW_ARGS}
        for nw in (2, 4, 8, 16):
            for asm, tag in STORE_FORMS:
                c = dict(RATIO=4, LOW=16 if dt == "bf16" else 0, CAND=2048, NS=16, SB=64, BLOCK=2048, ASM=asm, KB=0)
                out[f"{dt}_nw{nw}{tag}"] = resources(sv._sieve_select, ptr, c, nw, ints=SIEVE_INTS)
    return out


def rowsel():
    from dsv4_lab.kernels.indexer_topk import rowselect as rs
    out = {}
    for dt in ("bf16", "fp32"):
        ptr = {"VAL": f"*{dt}", "OVAL": "*fp32", "OIDX": "*i32", **ROW_ARGS}
        for nw in (2, 4, 8):
            for asm, tag in STORE_FORMS:
                c = dict(RATIO=4, LOW=16 if dt == "bf16" else 0, BLOCK=2048, ASM=asm)
                out[f"{dt}_L2048_nw{nw}{tag}"] = resources(rs._row_select, ptr, c, nw, ints=ROWSEL_INTS)
    return out


# the indexer score kernel on a 128K prefill's last chunk of 8K queries (HI 4 x DI 64, ratio 4: 32K keys), bf16 scores
SCORE_INTS = dict(Tq=8192, Sp=32768, t0=122880, q_offset=0, sqb=131072 * 256, sqt=256, sqh=64, skb=32768 * 64, sks=64,
                  ssb=32768 * 64, sss=64, swb=131072 * 4, swt=4, sob=8192 * 32768, sot=32768, NPROG=1, KSEL=0)
# the same kernel at a 1M-context decode step with the select's first digit fused (level0): one query, 256K keys in
# programs of level0_chunk(256K) keys, the select's 2 (bf16 scores) or 4 (fp32) digits of 8 bits
LEVEL0_INTS = dict(SCORE_INTS, Tq=1, Sp=262144, t0=0, q_offset=1048575, sqb=256, sqt=256, skb=262144 * 64,
                   ssb=262144 * 64, swb=4, sob=262144, sot=262144, NPROG=128, KSEL=512)


def scores():
    """Every config and candidate of the indexer score kernel (indexer_topk/triton.py) at prefill tiles (32 queries x 4 heads),
    on bf16 keys and on MXFP4-packed keys (tags ending in _mxfp4); and its decode launch with the select's first digit
    fused (level0_*: one query, heads padded to 16 dot rows, LEVEL0_CONFIG, bf16 or fp32 scores)."""
    import torch
    import triton.language as tl

    from dsv4_lab.kernels.indexer_topk import triton as it
    from dsv4_lab.kernels.indexer_topk.select import digit_levels
    out = {}
    for packed in (False, True):
        kt = "*u8" if packed else "*bf16"
        ptr = {"QI": "*bf16", "KI": kt, "KS": kt, "WT": "*bf16", "OUT": "*bf16", "HIST": "*i32", "PH": "*i32",
               **{a: "i32" for a in SCORE_INTS}}
        for cfg in list(it._indexer_scores_fwd.configs) + it.SCORE_CANDIDATE_CONFIGS:
            c = dict(HI=4, HIP=4, DI=64, BLOCK_D=64, BLOCK_M=32, RATIO=4, DOT_DT=tl.bfloat16, FILL=False,
                     MXFP4=packed, L0DB=0, L0NL=0, **cfg.kwargs)
            tag = "BN{BLOCK_N}_L{NLOOP}".format(**cfg.kwargs) + f"_w{cfg.num_warps}_s{cfg.num_stages}" \
                + ("_mxfp4" if packed else "")
            out[tag] = resources(_jit(it._indexer_scores_fwd), ptr, c, cfg.num_warps, cfg.num_stages,
                                 ints=SCORE_INTS)
    lc = it.LEVEL0_CONFIG
    chunk = it.level0_chunk(LEVEL0_INTS["Sp"])
    for sdt, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        nl = digit_levels(dt, it.LEVEL0_DB)
        ptr = {"QI": "*bf16", "KI": "*bf16", "KS": "*bf16", "WT": "*bf16", "OUT": f"*{sdt}", "HIST": "*i32",
               "PH": "*i32", **{a: "i32" for a in LEVEL0_INTS}}
        c = dict(HI=4, HIP=16, DI=64, BLOCK_D=64, BLOCK_M=1, RATIO=4, DOT_DT=tl.bfloat16, FILL=False, MXFP4=False,
                 L0DB=it.LEVEL0_DB, L0NL=nl, BLOCK_N=lc["BLOCK_N"], NLOOP=chunk // lc["BLOCK_N"])
        tag = f"level0_BN{lc['BLOCK_N']}_L{chunk // lc['BLOCK_N']}_w{lc['num_warps']}_s{lc['num_stages']}_{sdt}"
        out[tag] = resources(_jit(it._indexer_scores_fwd), ptr, c, lc["num_warps"], lc["num_stages"],
                             ints=LEVEL0_INTS)
    return out


MHC_POINTERS = {"X": "*bf16", "FN": "*fp32", "WH": "*bf16", "WL": "*bf16", "SC": "*fp32", "BASE": "*fp32",
                "U": "*bf16", "COEF": "*fp32", "MU": "*fp32", "RHO": "*fp32", "NTOK": "i32", "norm_eps": "fp32",
                "eps": "fp32"}


def mhc_pre(n=4, d=384, ntok=65536):
    """Every config of the pre kernel, both mixes, with and without the backward's saved tensors, on bf16 streams
    (tags as below) and on fp32 streams (tags ending in _fp32: x split into bf16 halves, larger tiles in shared
    memory; `programs_per_sm_by_smem` 0 = more than an SM has)."""
    from dsv4_lab.kernels.mhc import triton as mt
    out = {}
    for dt, split in (("bf16", mt.SPLIT_W), ("fp32", mt.SPLIT_XW)):
        ptr = dict(MHC_POINTERS, X=f"*{dt}", U=f"*{dt}")
        for cfg in list(mt._mhc_pre_kernel.configs) + mt.PRE_CANDIDATE_CONFIGS:
            for mix in (True, False):
                for save in (False, True):
                    c = dict(N=n, D=d, NP=4, ITERS=20, SPLIT=split, EMUL=False, MIX=mix, SAVE=save, **cfg.kwargs)
                    tag = "BT{BT}_BC{BC}_CPS{CPS}".format(**cfg.kwargs) + f"_w{cfg.num_warps}_s{cfg.num_stages}" \
                        + (f"_r{cfg.maxnreg}" if cfg.maxnreg else "") \
                        + f"_{'fused' if mix else 'split'}_{'save' if save else 'nosave'}" \
                        + ("_fp32" if dt == "fp32" else "")
                    out[tag] = dict(resources(mt._mhc_pre_kernel.fn, ptr, c, cfg.num_warps, cfg.num_stages,
                                              ints={"NTOK": ntok}, maxnreg=cfg.maxnreg),
                                    in_autotune_list=cfg in mt._mhc_pre_kernel.configs)
    return out


def mhc_pre_bwd(n=4, d=384, ntok=65536):
    from bench_mhc import BWD_SWEEP

    from dsv4_lab.kernels.mhc import triton as mt
    ptr = {"X": "*bf16", "DU": "*bf16", "DXIN": "*bf16", "DCOEF": "*fp32", "MU": "*fp32", "RHO": "*fp32",
           "SC": "*fp32", "BASE": "*fp32", "FN": "*fp32", "WH": "*bf16", "WL": "*bf16", "DX": "*bf16",
           "DMUS": "*fp32", "DBASE": "*fp32", "DSCC": "*fp32", "SCR": "*fp32", "NTOK": "i32", "eps": "fp32"}
    out = {}
    for e in BWD_SWEEP:
        c = dict(N=n, D=d, NP=4, ITERS=20, SPLIT=mt.SPLIT_W, EMUL=False, HAS_DXIN=True, BT=e["BWD_BT"],
                 BC=e["BWD_BC"])
        out[f"BT{e['BWD_BT']}_BC{e['BWD_BC']}_w{e['BWD_WARPS']}"] = resources(mt._mhc_pre_bwd_kernel, ptr, c,
                                                                              e["BWD_WARPS"], ints={"NTOK": ntok})
    return out


def mhc_dw(n=4, d=384, ntok=65536):
    """The mHC pre backward's dW kernel (mhc/triton.py _mhc_dw_kernel) at its launch defaults, bf16 and fp32 streams."""
    from dsv4_lab.kernels.mhc import triton as mt
    out = {}
    for dt, split in (("bf16", mt.SPLIT_W), ("fp32", mt.SPLIT_XW)):
        ptr = {"DMUS": "*fp32", "X": f"*{dt}", "DW": "*fp32", "NTOK": "i32"}
        c = dict(N=n, D=d, NP=4, SPLIT=split, EMUL=False, BT=mt.DW_BT, BK=mt.DW_BK)
        out[f"{dt}_BT{mt.DW_BT}_BK{mt.DW_BK}_w4"] = resources(mt._mhc_dw_kernel, ptr, c, 4, ints={"NTOK": ntok})
    return out


def hca_fwd(T=131072, H=16, D=128):
    """The HCA prefill kernel (hca_attn/triton.py _hca_fwd_kernel) for every autotune config at the 128K benchmark
    shape (bench_hca.py: H 16, d 128, window 128, m' 128, bf16, with the sink; q / o (B, T, H, D), kv (B, T, D),
    compressed entries (B, T / 128, D), lse (B, T, H), all contiguous)."""
    import triton.language as tl

    from dsv4_lab.kernels.hca_attn import triton as ht
    fn = _jit(ht._hca_fwd_kernel)
    ints = _attention_ints(fn, T, H, D, ratio=128)
    ptr = {"Q": "*bf16", "KV": "*bf16", "C": "*bf16", "SINK": "*fp32", "O": "*bf16", "LSE": "*fp32", "qk_scale": "fp32",
           **{a: "i32" for a in ints}}
    out = {}
    for cfg in ht._hca_fwd.configs:
        kw = cfg.kwargs
        c = dict(H=H, HP=16, D=D, W=128, RATIO=128, BLOCK_D=D, BLOCK_T=ht._tail_width({**kw, "HP": 16}),
                 HAS_SINK=True, DOT_DT=tl.bfloat16, **kw)
        out["BLOCK_M{BLOCK_M}_S{BLOCK_S}_J{BLOCK_J}".format(**kw) + f"_w{cfg.num_warps}_s{cfg.num_stages}"] = resources(
            fn, ptr, c, cfg.num_warps, cfg.num_stages, ints=ints)
    return out


def sparse_bwd(H=8, D=128, W=128, K=512, T=4096):
    """The CSA sparse-attention backward (sparse_attn/triton.py _sparse_bwd) at `small`'s attention shapes, bf16:
    one 4K sequence, q / o / do (B, T, H, D), kv (B, T, D), compressed entries (B, T / 4, D), indices (B, T, K), lse
    (B, T, H), all contiguous."""
    import triton.language as tl

    from dsv4_lab.kernels.sparse_attn import triton as sa
    ints = _attention_ints(_jit(sa._sparse_bwd), T, H, D, K)
    ptr = {"Q": "*bf16", "KV": "*bf16", "C": "*bf16", "IDX": "*i32", "O": "*bf16", "DO": "*bf16", "LSE": "*fp32",
           "DQ": "*fp32", "DC": "*fp32", "DELTA": "*fp32", "scale": "fp32", **{a: "i32" for a in ints}}
    out = {}
    for cfg in sa._sparse_bwd.configs:
        c = dict(H=H, D=D, W=W, K_SEL=K, BLOCK_H=max(16, H), BLOCK_D=D, BLOCK_W=min(64, W), DOT_DT=tl.bfloat16,
                 **cfg.kwargs)
        out["BLOCK_K{BLOCK_K}".format(**cfg.kwargs) + f"_w{cfg.num_warps}_s{cfg.num_stages}"] = resources(
            sa._sparse_bwd.fn, ptr, c, cfg.num_warps, cfg.num_stages, ints=ints)
    return out


def window_bwd(H=8, D=128, T=4096):
    """The sliding-window part of the CSA / HCA attention backward (sparse_attn/triton.py _window_bwd) for every
    autotune config at `small`'s shapes, bf16 (layouts as sparse_bwd's)."""
    import triton.language as tl

    from dsv4_lab.kernels.sparse_attn import triton as sa
    fn = _jit(sa._window_bwd)
    ints = _attention_ints(fn, T, H, D)
    ptr = {"Q": "*bf16", "KV": "*bf16", "DO": "*bf16", "LSE": "*fp32", "DELTA": "*fp32", "DKV": "*fp32",
           "scale": "fp32", **{a: "i32" for a in ints}}
    out = {}
    for cfg in sa._window_bwd.configs:
        c = dict(H=H, D=D, W=128, BLOCK_HP=1 << (H - 1).bit_length(), BLOCK_D=D, DOT_DT=tl.bfloat16, **cfg.kwargs)
        out["ROWS{ROWS}_N{BLOCK_N}".format(**cfg.kwargs) + f"_w{cfg.num_warps}_s{cfg.num_stages}"] = resources(
            fn, ptr, c, cfg.num_warps, cfg.num_stages, ints=ints)
    return out


def select_one_launch():
    """The split-row select in one launch (select.py _select_one_launch: grid barriers between the digit levels),
    decode's setting (8-bit digits, 2048-entry blocks, 8 warps), bf16 and fp32 rows, from digit 0 and (_first1) from
    digit 1: two programs per SM must fit for P R <= SMs to be resident with room to spare."""
    from dsv4_lab.kernels.indexer_topk import select as sel
    out = {}
    for dt, nl in (("bf16", 2), ("fp32", 4)):
        ptr = {"VAL": f"*{dt}", "HIST": "*i32", "PH": "*i32", "OVAL": "*fp32", "OIDX": "*i32", "C": "i32", "P": "i32",
               **ROW_ARGS}
        for asm, tag in STORE_FORMS:
            for first in (0, 1):                        # 1: digit 0 counted by the score launch (first_level=1)
                c = dict(NL=nl, DB=8, RATIO=0, BLOCK=2048, QB=128, FIRST=first, ASM=asm)
                out[f"{dt}_nw8{tag}" + ("_first1" if first else "")] = resources(
                    sel._select_one_launch, ptr, c, 8, ints=SELECT_ONE_LAUNCH_INTS)
    return out


# the tail select's pointer and integer arguments and decode's constexprs (tailselect.py _emit_tail, _tail_one_launch)
TAIL_DECODE = dict(RATIO=0, BLOCK=2048, QB=128, KP=512, CAP=1024, SMALL=64)
TAIL_PTRS = {"VAL": "*fp32", "HIST": "*i32", "PH": "*i32", "TV": "*fp32", "TI": "*i32", "BV": "*fp32", "BI": "*i32",
             "TC": "*i32", "BC": "*i32", "OVAL": "*fp32", "OIDX": "*i32", "C": "i32", "P": "i32", **ROW_ARGS}


def tail_emit():
    """The tail select's emit launch (tailselect.py _emit_tail: the chunk's two lists with their counts, the ticket,
    the last program's tail), decode's setting (one 256K-entry fp32 row over 128 programs of 2048, k 512, CAP 1024,
    the small tile 64, 8 warps), by store form, without and (_pdl) with programmatic dependent launch (PDL 2: the
    chunk's block loaded, then griddepcontrol.wait)."""
    from dsv4_lab.kernels.indexer_topk import tailselect as ts
    return {f"fp32_nw8{tag}" + ("_pdl" if pdl else ""): resources(
                ts._emit_tail, TAIL_PTRS, dict(TAIL_DECODE, ALL=False, ASM=asm, PDL=pdl), 8,
                ints=SELECT_ONE_LAUNCH_INTS)
            for asm, tag in STORE_FORMS for pdl in (0, 2)}


def tail_one_launch():
    """The tail select in one launch (tailselect.py _tail_one_launch: a grid barrier per digit, then the emit with
    every program's ticket), decode's setting as tail_emit, by store form, from digit 0 and (_first1) from digit 1:
    never run by the interpreter, so compiled here; two programs per SM must fit (P R <= SMs resident with room)."""
    from dsv4_lab.kernels.indexer_topk import tailselect as ts
    return {f"fp32_nw8{tag}" + ("_first1" if first else ""): resources(
                ts._tail_one_launch, TAIL_PTRS, dict(TAIL_DECODE, FIRST=first, ASM=asm), 8, ints=SELECT_ONE_LAUNCH_INTS,
                maxnreg=ts.ONE_LAUNCH_MAXNREG if asm else None)       # as tail_select launches it
            for asm, tag in STORE_FORMS for first in (0, 1)}


def sparse_decode():
    """The CSA split-KV decode attention's two launches (sparse_attn/triton_decode.py _sparse_split, _combine) at the
    1M decode shape (H 16 x d 128, k 512, window 128, bf16, 32-entry blocks), without and (_pdl) with programmatic
    dependent launch (each program waits on the launch before it: griddepcontrol.wait)."""
    import triton.language as tl

    from dsv4_lab.kernels.sparse_attn import triton_decode as sd
    i32 = "i32"
    split_ptr = {"Q": "*bf16", "KV": "*bf16", "C": "*bf16", "IDX": "*i32", "PM": "*fp32", "PL": "*fp32",
                 "PACC": "*fp32", "qk_scale": "fp32",
                 **{a: i32 for a in ("T", "Tk", "S", "K_SEL", "W", "q_offset", "CHUNK", "NSK", "NS", "sqb", "sqt",
                                     "sqh", "skb", "skt", "scb", "scs", "sib", "sit")}}
    comb_ptr = {"PM": "*fp32", "PL": "*fp32", "PACC": "*fp32", "SINK": "*fp32", "O": "*bf16", "LSE": "*fp32",
                **{a: i32 for a in ("T", "NQB", "NS", "sob", "sot", "soh", "slb", "slt")}}
    out = {}
    for pdl in (False, True):
        tag = "_pdl" if pdl else ""
        out["split" + tag] = resources(sd._sparse_split, split_ptr, dict(H=16, D=128, BLOCK_H=16, BLOCK_D=128,
                                                                          BLOCK_N=32, DOT_DT=tl.bfloat16, PDL=pdl),
                                       4, num_stages=2)
        out["combine" + tag] = resources(sd._combine, comb_ptr, dict(H=16, HP=16, BT=1, D=128, BLOCK_M=16,
                                                                      BLOCK_D=128, NS_P=32, SB=32, HAS_SINK=True,
                                                                      PDL=pdl), 4, num_stages=2)
    return out


FAMILIES = {"sieve": sieve, "rowsel": rowsel, "scores": scores, "mhc_pre": mhc_pre,
            "mhc_pre_bwd": mhc_pre_bwd, "mhc_dw": mhc_dw, "hca_fwd": hca_fwd, "sparse_bwd": sparse_bwd, "window_bwd": window_bwd,
            "select_one_launch": select_one_launch, "tail_emit": tail_emit,
            "tail_one_launch": tail_one_launch, "sparse_decode": sparse_decode}


def main(only=None, out_dir=None):
    from common import env_info, write_json
    path = os.path.join(out_dir or RESULTS, "kernel_registers.json")
    res = {}
    if only and os.path.exists(path):                    # a subset: keep the other families' saved results
        with open(path) as f:
            res = json.load(f)
    res.setdefault("families", {})
    res["what"] = f"ptxas -v for sm_{ARCH} of Triton kernels compiled on the CPU (kernel_registers.py docstring)"
    for name, f in FAMILIES.items():
        if only and name not in only:
            continue
        res[name] = f()
        res["families"][name] = {"env": env_info()}          # what it ran on (env_info names the commit)
        for tag, r in res[name].items():
            print(f"{name:12s} {tag:40s} regs {r['registers']:>4} spills {r['spill_stores']:>4} / "
                  f"{r['spill_loads']:>4} smem {r['smem']:>6} converts {r['layout_converts']:>3} "
                  f"programs/SM by registers "
                  f"{r['programs_per_sm_by_registers']}, by smem {r['programs_per_sm_by_smem']}", flush=True)
    write_json(path, res)
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=list(FAMILIES))
    ap.add_argument("--out")
    a = ap.parse_args()
    main(a.only, a.out)
