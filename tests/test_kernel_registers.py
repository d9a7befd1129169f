"""benchmarks/kernel_registers.py reads a kernel's registers and spills for sm_90 on the CPU (Triton compiles for a
named target without a GPU, and ships ptxas): checked on the RMSNorm forward at two block sizes."""
import sys
from pathlib import Path

import pytest

if sys.platform != "linux":                                      # triton is a Linux-only dependency (pyproject)
    pytest.skip(f"triton is not installed on {sys.platform} (a Linux-only dependency)", allow_module_level=True)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_ptxas_report_of_a_kernel_compiled_on_the_cpu():
    import kernel_registers as kr

    from dsv4_lab.kernels.rmsnorm.triton import _rmsnorm_fwd
    fn = _rmsnorm_fwd                                            # a JITFunction: this process does not interpret
    ptr = {"X": "*bf16", "W": "*fp32", "Y": "*bf16", "RSTD": "*fp32", "R": "i32", "D": "i32", "sx": "i32",
           "eps": "fp32"}
    small = kr.resources(fn, ptr, dict(HAS_W=True, BLOCK_R=1, BLOCK_D=128), num_warps=4)
    big = kr.resources(fn, ptr, dict(HAS_W=True, BLOCK_R=16, BLOCK_D=1024), num_warps=4)
    for r in (small, big):
        assert 0 < r["registers"] <= 255 and r["spill_stores"] is not None and r["smem"] >= 0, r
        assert r["programs_per_sm_by_registers"] == 65536 // (r["registers"] * 128)
    assert big["registers"] > small["registers"]                 # 16 rows of 1024 per program hold more


def test_one_launch_select_compiles_for_the_gpu():
    """The one-launch select (select.py _select_one_launch) never runs under the interpreter (its grid barriers need
    every program resident at once; the interpreter runs the same levels as separate launches), so the compile
    check never sees it: compiled here for sm_90 through ptxas, fp32 and bf16 rows, with room for two programs per
    SM (its launch keeps P R <= SMs)."""
    import kernel_registers as kr
    for r in kr.select_one_launch().values():
        assert 0 < r["registers"] <= 128 and r["spill_stores"] == 0, r


def test_tail_select_emit_compiles_for_the_gpu():
    """The tail select's emit (tailselect.py _emit_tail) with the constexprs tail_select passes it (kernel_registers'
    `tail_emit` lists them: a constexpr added to the kernel and not there fails here), both store forms, without and
    with programmatic dependent launch: no spills, and at most 128 registers per thread at 8 warps with the inline
    stores, so that two of its programs fit an SM (with tl.store, the form torch.compile traces, ~160: one program
    per SM); with PDL its PTX waits on the launch before it (griddepcontrol.wait) on each of its three paths, without
    PDL it does not."""
    import kernel_registers as kr
    res = kr.tail_emit()
    assert len(res) == 4, sorted(res)
    for key, r in res.items():
        cap = 128 if "_asm" in key else 255
        assert 0 < r["registers"] <= cap and r["spill_stores"] == 0, (key, r)
        assert (r["pdl_waits"] >= 3) if key.endswith("_pdl") else (r["pdl_waits"] == 0), (key, r["pdl_waits"])


def test_tail_one_launch_compiles_for_the_gpu():
    """The tail select in one launch (tailselect.py _tail_one_launch) never runs under the interpreter (its grid
    barriers need every program resident at once), so the compile check never sees it: compiled here for sm_90
    through ptxas, both store forms, from digit 0 and from digit 1: no spills, and with the inline stores at most 128
    registers per thread at 8 warps (two programs fit an SM)."""
    import kernel_registers as kr
    res = kr.tail_one_launch()
    assert len(res) == 4, sorted(res)
    for key, r in res.items():
        cap = 128 if "_asm" in key else 255
        assert 0 < r["registers"] <= cap and r["spill_stores"] == 0, (key, r)


def test_select_inline_stores_compile_without_layout_conversions():
    """The selects' scattered stores as inline PTX (select.py _scatter, ASM) compile for sm_90 through ptxas, and
    the sieve and row selects keep their rows in the layout they were loaded in: with tl.store, Triton gives each
    store of the compacted candidates / picks a one-element-per-thread layout and converts the block into it through
    shared memory (and runs the position cumsum again there), on every block of the row."""
    import kernel_registers as kr
    for fam in (kr.sieve(), kr.rowsel()):
        for key, r in fam.items():
            if not key.endswith("_asm"):
                continue
            plain = fam[key[:-len("_asm")]]
            assert 0 < r["registers"] <= 255 and r["registers"] <= plain["registers"], (key, r, plain)
            assert r["layout_converts"] <= 2 < plain["layout_converts"], (key, r["layout_converts"],
                                                                            plain["layout_converts"])


def test_score_kernel_loops_over_key_tiles_pipelined():
    """The indexer score kernel's configs of several key tiles per program (NLOOP > 1) compile for sm_90 with the
    key tiles' loads as asynchronous copies in flight across iterations and no shared-memory buffer refilled under
    a running MMA; one tile per program (NLOOP 1) stays straight-line code, with nothing to pipeline. The decode
    launch that also counts the select's first digit (level0_*, 8 key tiles at 1M context) is of the first kind,
    without spills."""
    import kernel_registers as kr
    res = kr.scores()
    assert any("_L1_" in t for t in res) and any("_L1_" not in t for t in res), sorted(res)
    level0 = [t for t in res if t.startswith("level0_")]
    assert len(level0) == 2 and all(res[t]["spill_stores"] == 0 for t in level0), sorted(res)
    for tag, r in res.items():
        assert r["mma_refill_hazards"] == [] and 0 < r["registers"] <= 255, (tag, r)
        if "_L1_" in tag:
            assert r["async_copies"] == 0, (tag, r)
        else:
            assert r["async_copies"] >= 2, (tag, r)


def test_compiled_as_a_gpu_launch_specializes_it():
    """resources() marks pointers 16-byte aligned and the integers of `ints` divisible by 16 where they are, as the
    JIT does for a launch: the mHC pre kernel's pass 1 then compiles software-pipelined (asynchronous copies of x and
    W), the code the GPU runs. Compiled with no marks at all, pass 1 has no asynchronous copies: what the registers
    would be read from otherwise."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import kernel_registers as kr
    from dsv4_lab.kernels.mhc import triton as mt
    c = dict(N=4, D=384, NP=4, ITERS=20, SPLIT=mt.SPLIT_W, EMUL=False, MIX=False, SAVE=False, BT=16, BC=128, CPS=1)
    fn = mt._mhc_pre_kernel.fn
    launched = kr.resources(fn, kr.MHC_POINTERS, c, 4, ints={"NTOK": 65536})
    assert launched["async_copies"] > 0, launched
    sig = {a: kr.MHC_POINTERS.get(a, "constexpr") for a in fn.arg_names}
    bare = triton.compile(ASTSource(fn, sig, c), target=GPUTarget("cuda", kr.ARCH, 32),
                          options={"num_warps": 4, "num_stages": 3})
    assert "async_copy_global_to_local" not in bare.asm["ttgir"]
    with pytest.raises(ValueError, match="norm_eps"):
        kr.resources(fn, kr.MHC_POINTERS, c, 4, ints={"norm_eps": 16})


def _chunk_sums_kernel():
    """A loop like the mHC pre kernel's pass 1: a tile of x per iteration, its sum of squares, and its product with
    two weight tiles, chained into the accumulator (CHAIN) or through a fresh tile added to it."""
    import triton
    import triton.language as tl

    @triton.jit
    def chunk_sums(X, W, OUT, NT, K: tl.constexpr, N: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   CHAIN: tl.constexpr):
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        n = tl.arange(0, N)
        acc = tl.zeros([BT, N], tl.float32)
        ss = tl.zeros([BT], tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            x = tl.load(X + t[:, None] * K + kk[None, :], mask=(t < NT)[:, None], other=0.0)
            xf = x.to(tl.float32)
            ss += tl.sum(xf * xf, 1)
            w0 = tl.load(W + kk[:, None] * N + n[None, :])
            w1 = tl.load(W + K * N + kk[:, None] * N + n[None, :])
            if CHAIN:
                acc = tl.dot(x, w0, acc)
                acc = tl.dot(x, w1, acc)
            else:
                acc += tl.dot(x, w1, tl.dot(x, w0))
        tl.store(OUT + t[:, None] * N + n[None, :], acc * ss[:, None], mask=(t < NT)[:, None])
    return chunk_sums


def test_mma_refill_hazards_are_found_and_the_mhc_pre_kernel_has_none():
    """kernel_registers.mma_refill_hazards reads the TTGIR of a kernel compiled for sm_90: a pipelined x tile read by
    asynchronous warpgroup MMAs and by an elementwise sum gets as many buffers as copies in flight (Triton 3.6), so
    when the MMAs are chained into the loop's accumulator the copy two iterations ahead refills the buffer they read
    (the configs of the mHC pre kernel that raced on bf16 streams have this shape); with each iteration's products
    in a fresh tile the MMAs are waited for inside the iteration. The pre kernel's 8-warp configs on bf16 streams,
    both mixes, have none."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import kernel_registers as kr
    from dsv4_lab.kernels.mhc import triton as mt
    fn = _chunk_sums_kernel()
    sig = {"X": "*bf16", "W": "*bf16", "OUT": "*fp32", "NT": "i32"} | {a: "constexpr" for a in ("K", "N", "BT", "BK",
                                                                                               "CHAIN")}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(4)}
    found = {}
    for chain in (True, False):
        k = triton.compile(ASTSource(fn, sig, dict(K=1024, N=32, BT=128, BK=128, CHAIN=chain), attrs),
                           target=GPUTarget("cuda", kr.ARCH, 32), options={"num_warps": 8, "num_stages": 3})
        assert "async_copy_global_to_local" in k.asm["ttgir"]
        found[chain] = kr.mma_refill_hazards(k.asm["ttgir"])
    assert len(found[True]) == 1 and "2 buffers for 2 copies" in found[True][0], found
    assert found[False] == [], found
    for cfg in mt._mhc_pre_kernel.configs:
        if cfg.num_warps != 8:
            continue
        for mix in (True, False):
            c = dict(N=4, D=384, NP=4, ITERS=20, SPLIT=mt.SPLIT_W, EMUL=False, MIX=mix, SAVE=True, **cfg.kwargs)
            r = kr.resources(mt._mhc_pre_kernel.fn, kr.MHC_POINTERS, c, 8, cfg.num_stages, ints={"NTOK": 65536})
            assert r["async_copies"] > 0 and r["mma_refill_hazards"] == [], (cfg, mix, r)


def test_select_stores_without_inline_ptx_while_torch_compile_traces(monkeypatch):
    """torch.compile reads which tensors a user Triton kernel writes from its TTIR and cannot read inline PTX
    (tt.elementwise_inline_asm), and Inductor re-emits the kernel's source text: the selects take the tl.store form
    while it traces, and the inline store's PTX is one line of source (an escaped newline in it became a newline
    inside a string literal, a SyntaxError in the emitted module)."""
    import ast
    import inspect
    import textwrap

    import torch

    from dsv4_lab.kernels.indexer_topk import select as sel
    monkeypatch.setattr(sel, "INTERPRET", False)
    monkeypatch.setattr(sel, "ASM_STORES", True)
    assert sel.asm_stores_on(None) is True and sel.asm_stores_on(False) is False
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert sel.asm_stores_on(None) is False and sel.asm_stores_on(True) is False
    src = textwrap.dedent(inspect.getsource(sel._scatter.fn))
    ptx = [c for c in ast.walk(ast.parse(src)) if isinstance(c, ast.Call) and getattr(c.func, "attr", "") ==
           "inline_asm_elementwise"]
    assert len(ptx) == 1 and isinstance(ptx[0].args[0], ast.Constant), "the inline store's PTX is not found"
    asm = ptx[0].args[0].value
    assert "st.global" in asm and not any(ch in asm for ch in "\n\t\r"), repr(asm)


def test_pdl_modes_and_where_the_selects_use_pdl(monkeypatch):
    """Programmatic dependent launch (select.py PDL): the first launch of a select waits before anything (the launch
    before it may have written the rows), the others load their first block, then wait; never on a CPU tensor, under
    the interpreter or while torch.compile traces (griddepcontrol is inline PTX); tail_select's default is
    tailselect.PDL, radix_select's select.PDL."""
    import torch

    from dsv4_lab.kernels import _common as cm
    from dsv4_lab.kernels.indexer_topk import select as sel
    assert cm.pdl_modes(3, True) == [1, 2, 2] and cm.pdl_modes(5, True) == [1, 2, 2, 2, 2]
    assert cm.pdl_modes(3, False) == [0, 0, 0]
    monkeypatch.setattr(cm, "INTERPRET", False)
    assert sel.pdl_on(True, torch.device("cpu")) is False
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert sel.pdl_on(True, cuda) is True and sel.pdl_on(False, cuda) is False
    monkeypatch.setattr(sel, "PDL", True)
    assert sel.pdl_on(None, cuda) is True
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    assert sel.pdl_on(True, cuda) is False
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(cm, "INTERPRET", True)
    assert sel.pdl_on(True, cuda) is False
    monkeypatch.setattr(cm, "INTERPRET", False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert sel.pdl_on(True, cuda) is False
    # tail_select's default is its own module's PDL (select.PDL is radix_select's): what it asks pdl_on for
    from dsv4_lab.kernels.indexer_topk import tailselect as ts
    asked = []

    class Asked(Exception):
        pass

    def spy(pdl, device):                     # record, then stop before any launch
        asked.append(pdl)
        raise Asked
    monkeypatch.setattr(ts, "pdl_on", spy)
    monkeypatch.setattr(cm, "INTERPRET", True)                            # a CPU row passes check_device
    for default in (True, False):
        monkeypatch.setattr(ts, "PDL", default)
        monkeypatch.setattr(sel, "PDL", not default)
        for pdl in (None, True, False):
            with pytest.raises(Asked):
                ts.tail_select(torch.randn(1, 300), 8, pdl=pdl)
            want = default if pdl is None else pdl
            assert asked.pop() is want, (default, pdl)


def test_sparse_decode_attention_compiles_with_pdl():
    """The split-KV decode attention's two launches (sparse_attn/triton_decode.py) compile for sm_90 without and with
    programmatic dependent launch: the same registers, no spills, and with PDL each waits on the launch before it
    (griddepcontrol.wait), without it neither does."""
    import kernel_registers as kr
    res = kr.sparse_decode()
    assert sorted(res) == ["combine", "combine_pdl", "split", "split_pdl"], sorted(res)
    for name in ("split", "combine"):
        plain, pdl = res[name], res[name + "_pdl"]
        assert plain["spill_stores"] == 0 and pdl["spill_stores"] == 0, (name, plain, pdl)
        assert plain["pdl_waits"] == 0 and pdl["pdl_waits"] >= 1, (name, plain["pdl_waits"], pdl["pdl_waits"])
