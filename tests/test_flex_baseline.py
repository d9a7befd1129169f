"""The FlexAttention HCA baseline (benchmarks/flex_hca.py, T1) computes hca_attn_naive's function.

Two independent parts are checked on CPU:
* the analytic block tables: every block marked full is entirely visible under the exact HCA mask, every block
  marked neither full nor partial is entirely invisible, every partial block is mixed (the same classification
  create_block_mask derives by evaluating the mask densely);
* the output: flex_attention with that BlockMask (eager on CPU, which evaluates mask_mod everywhere) and the exact
  sink correction o * sigmoid(lse - sink) equals the naive twin, with and without a sink.
Eager Flex ignores the block tables, so a slow test also compiles Flex on CPU (the compiled kernel skips empty blocks
and skips mask_mod in full blocks) and checks that corrupting the full-block table changes the answer.
"""
from __future__ import annotations

import os
import shutil
import sys
import warnings

import pytest
import torch

import torch.nn.attention.flex_attention as fa                # torch >= 2.11 (pyproject): always there
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import flex_hca  # noqa: E402

from dsv4_lab.kernels.hca_attn.naive import hca_attn_naive  # noqa: E402

# (N, H, D, W, R): block 128; R = 1 / 2 and W = 300 give full compressed and full window blocks at small N;
# N = 300 is not a multiple of 128 (padded query and KV tails); W = 0 has no window
SHAPES = [(512, 2, 16, 128, 128), (384, 3, 8, 128, 64), (300, 2, 16, 100, 128), (512, 2, 16, 128, 1),
          (768, 2, 16, 300, 2), (256, 2, 8, 0, 32)]


def exact_mask(N, S, Sp, W, R):
    t = torch.arange(N)[:, None]
    k = torch.arange(Sp + N)[None, :]
    j = k - Sp
    return (k < torch.clamp((t + 1) // R, max=S)) | ((k >= Sp) & (j <= t) & (j > t - W))


@pytest.mark.parametrize("N,H,D,W,R", SHAPES)
def test_block_tables_classify_blocks_exactly(N, H, D, W, R):
    S = N // R
    partial, full, Sp = flex_hca.hca_block_tables(N, S, W, R)
    m = exact_mask(N, S, Sp, W, R)
    B = flex_hca.BLOCK
    nq, nk = partial.shape
    assert nq == -(-N // B) and nk == -(-(Sp + N) // B) and Sp % B == 0 and Sp >= S
    mp = torch.zeros(nq * B, nk * B, dtype=torch.bool)              # padded rows/cols: invisible
    mp[:N, :Sp + N] = m
    blocks = mp.view(nq, B, nk, B)
    cnt = blocks.sum((1, 3))
    rows = torch.tensor([min(B, N - i * B) for i in range(nq)])[:, None]
    cols = torch.full((1, nk), B)                                    # a KV block is full only with B real columns
    assert torch.equal(full, cnt == rows * cols), "full blocks"
    assert torch.equal(partial, (cnt > 0) & ~full), "partial blocks"
    # the BlockMask carries exactly these blocks
    bm, _ = flex_hca.hca_block_mask(N, S, W, R, "cpu")
    for num, idx, tab in ((bm.kv_num_blocks, bm.kv_indices, partial),
                          (bm.full_kv_num_blocks, bm.full_kv_indices, full)):
        for i in range(nq):
            got = sorted(idx[0, 0, i, :num[0, 0, i]].tolist())
            assert got == tab[i].nonzero().flatten().tolist(), f"query block {i}"


def test_block_tables_match_create_block_mask():
    N, W, R = 768, 300, 2
    S = N // R
    partial, full, Sp = flex_hca.hca_block_tables(N, S, W, R)
    ref = fa.create_block_mask(flex_hca.hca_mask_mod(S, Sp, W, R), None, None, N, Sp + N, device="cpu",
                               BLOCK_SIZE=flex_hca.BLOCK)
    assert int(full.sum()) > 0 and int(partial.sum()) > 0
    for num, idx, tab in ((ref.kv_num_blocks, ref.kv_indices, partial),
                          (ref.full_kv_num_blocks, ref.full_kv_indices, full)):
        for i in range(tab.shape[0]):
            assert sorted(idx[0, 0, i, :num[0, 0, i]].tolist()) == tab[i].nonzero().flatten().tolist()


FLEX_SHAPES = [SHAPES[0], SHAPES[2], SHAPES[4], SHAPES[5]]


@pytest.mark.parametrize("N,H,D,W,R", FLEX_SHAPES)
def test_flex_hca_equals_naive(N, H, D, W, R):
    for what, err, tol in check_flex_hca(N, H, D, W, R):
        assert err < tol, (what, err, tol)


def check_flex_hca(N, H, D, W, R, seed: int = 0):
    """[(name, error, tolerance)]: eager Flex HCA (fp32) vs the naive fp64 HCA with and without the sink: each output
    is a softmax-weighted mean of K <= D + W + N / R <= 450 rounded terms (D-term scores, W + N / R weights) of values
    |v| <= ~4.5; roundings of random sign add like sqrt(K) u32 |v| <= 21 x 6e-8 x 4.5 = 6e-6 (the worst case K u32 |v|
    would be 1.2e-4, never approached by independent roundings); bar 1e-5 absolute. The sink correction acts (row
    1e-3 / change, < 1)."""
    g = torch.Generator().manual_seed(N + W + R + 1000 * seed)
    S = N // R
    q = torch.randn(1, N, H, D, generator=g)
    kv = torch.randn(1, N, D, generator=g)
    comp = torch.randn(1, S, D, generator=g)
    sink = torch.randn(H, generator=g) * 2
    bm, Sp = flex_hca.hca_block_mask(N, S, W, R, "cpu")
    kv_all = flex_hca.pack_kv(kv, comp, Sp)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                              # "called without torch.compile()"
        for sk in (sink, None):
            o = flex_hca.flex_hca(q, kv_all, sk, D ** -0.5, bm)
            ref = hca_attn_naive(q.double(), kv.double(), comp.double(), None if sk is None else sk.double(),
                                 D ** -0.5, W, R)
            assert o.shape == ref.shape
            rows.append((f"flex HCA vs naive fp64 {(N, H, D, W, R)} sink={sk is not None}",
                         (o.double() - ref).abs().max().item(), 1e-5))
        # the sink correction is not a no-op here
        o_s = flex_hca.flex_hca(q, kv_all, sink, D ** -0.5, bm)
        o_n = flex_hca.flex_hca(q, kv_all, None, D ** -0.5, bm)
    rows.append((f"flex HCA {(N, H, D, W, R)}: the sink acts (1e-3 / change)",
                 1e-3 / (o_s - o_n).abs().max().item(), 1.0))
    return rows


@pytest.mark.slow
def test_compiled_flex_uses_the_block_tables():
    """Compiled Flex on CPU (no lse there in torch 2.13, so no sink): equal to naive; dropping the full blocks from
    the table changes the output (i.e. the kernel really reads the tables)."""
    N, H, D, W, R = 768, 2, 16, 300, 2
    S = N // R
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, N, H, D, generator=g)
    kv = torch.randn(1, N, D, generator=g)
    comp = torch.randn(1, S, D, generator=g)
    bm, Sp = flex_hca.hca_block_mask(N, S, W, R, "cpu")
    bad = fa.BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, torch.zeros_like(bm.full_kv_num_blocks),
                                      bm.full_kv_indices, BLOCK_SIZE=flex_hca.BLOCK, mask_mod=bm.mask_mod,
                                      seq_lengths=(N, Sp + N))
    kv_all = flex_hca.pack_kv(kv, comp, Sp)
    cxx = [c for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c and shutil.which(c)]
    if not cxx:                                                      # the one genuinely optional piece
        pytest.skip("torch.compile on CPU needs a C++ compiler: none of $CXX, c++, g++, clang++ is on PATH")
    flex = torch.compile(fa.flex_attention, dynamic=False)
    v_all = kv_all.clone()                     # torch 2.11's CPU Flex lowering refuses K and V as one buffer
    try:
        o = flex(q.transpose(1, 2), kv_all, v_all, block_mask=bm, scale=D ** -0.5, enable_gqa=True)
    except Exception as e:                     # torch's own platform limit: its CPU Flex lowering needs AVX2
        if "not supported for CPU" not in str(e):
            raise
        pytest.skip(f"torch.compile's CPU Flex lowering refuses this CPU (it needs AVX2): {str(e).splitlines()[0]}")
    o_bad = flex(q.transpose(1, 2), kv_all, v_all, block_mask=bad, scale=D ** -0.5, enable_gqa=True)
    ref = hca_attn_naive(q.double(), kv.double(), comp.double(), None, D ** -0.5, W, R).transpose(1, 2)
    assert (o.double() - ref).abs().max().item() < 1e-5
    assert (o_bad.double() - ref).abs().max().item() > 1e-2
