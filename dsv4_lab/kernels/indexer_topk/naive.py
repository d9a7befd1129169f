"""Lightning-indexer scores + top-k, naive PyTorch twin of triton.py (docs §2.4; docs/kernels.md §3). Forward only.

    I[t, s] = sum_h w[t, h] * ReLU(qI[t, h] . kI[s])          (w already holds the 1/sqrt(c^I n^I_h) factors)
    entry s is a candidate for the query at position t = q_offset + i iff s < floor((t + 1) / ratio)
    idx[t] = the k candidates with the largest I[t, s], sorted by score (descending); ties go to the LOWER index
             (declared tie rule, docs/kernels.md §9.1); slots beyond the number of candidates are -1.

This file is the model's one statement of the index score (`index_scores`), of visibility (`visible`) and of the
top-k contract (`topk_indices`: int32, sorted, lower index first among ties, -1 for invisible / missing); the
attention's other selectors (oracle, random: attention/csa.py) go through `topk_indices` too.

Shapes: qI (B, T, HI, DI); kI (B, S, DI); w (B, T, HI). Returns idx (B, T, k) int32 (and the scores of the picks,
fp32, -inf for -1 slots, when return_scores). Queries are processed `chunk` at a time, so the [T, S] score matrix
exists for `chunk` rows only (the dense matrix is never written at long T). Scores are computed in fp32 (fp64 for
fp64 inputs).

Packed keys (`MXFP4Keys`): the paper stores indexer keys as MXFP4 (docs §2.4, §6.3, §8.1), which the model's
quant="fp4" path reproduces exactly (its keys are MXFP4 fake-quantised; the "paper" cache storage packs them).
kI may be given that way: codes (B, S, DI / 2) uint8, two 4-bit E2M1 codes per byte (low nibble = even element;
code = sign << 3 | index into the magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6), and scales (B, S, DI / 32) uint8, the
E8M0 byte e + 127 of each 32-element block (value = magnitude * 2^e; byte 0 reads as 0, which the quantiser never
writes). Every such value is exact in bf16, so this twin's scores equal those of the unpacked keys
(`mxfp4_key_values`); the Triton kernel's, up to the grouping of the fp32 sum (triton.py `_mxfp4_logits`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class MXFP4Keys(NamedTuple):
    """Indexer keys (B, S, DI) stored as packed MXFP4 (module docstring); DI % 32 == 0."""
    codes: torch.Tensor                     # (B, S, DI / 2) uint8
    scales: torch.Tensor                    # (B, S, DI / 32) uint8

    @property
    def shape(self) -> tuple[int, int, int]:
        B, S, half = self.codes.shape
        return B, S, 2 * half


def check_mxfp4_keys(keys: MXFP4Keys) -> None:
    """One-line ValueError naming the field, the value and what is allowed."""
    c, s = keys.codes, keys.scales
    if c.dtype != torch.uint8 or s.dtype != torch.uint8:
        raise ValueError(f"MXFP4Keys: codes / scales dtype = {c.dtype} / {s.dtype} is not allowed: uint8 / uint8")
    if c.dim() != 3 or s.shape != (*c.shape[:2], c.shape[2] // 16) or c.shape[2] % 16:
        raise ValueError(f"MXFP4Keys: codes {tuple(c.shape)}, scales {tuple(s.shape)} are not allowed: (B, S, DI / 2) "
                         "and (B, S, DI / 32) with DI a multiple of 32")


def key_tensors(kI) -> tuple[torch.Tensor, ...]:
    """The tensors that hold the keys kI: (codes, scales) of MXFP4Keys, else (kI,) (device checks)."""
    return tuple(kI) if isinstance(kI, MXFP4Keys) else (kI,)


def mxfp4_key_values(keys: MXFP4Keys) -> torch.Tensor:
    """Packed keys -> (B, S, DI) fp32 values: 2^(byte - 127) times the E2M1 value of each code (bit for bit
    dsv4_lab.quant.mxfp4_dequantize, restated here so that the kernels do not import the model's quant package)."""
    check_mxfp4_keys(keys)
    c = torch.stack([keys.codes & 15, keys.codes >> 4], -1).flatten(-2).to(torch.int32)     # (B, S, DI) codes
    m = c & 7
    e, mant = m >> 1, m & 1
    two_mag = torch.where(e == 0, mant, (2 + mant) << (e - 1).clamp_min(0))                # 2 |value| / 2^e
    mag = two_mag.float() * 0.5
    val = torch.where((c & 8) != 0, -mag, mag)                                              # code 8: -0.0
    scale = (keys.scales.to(torch.int32) << 23).view(torch.float32)                         # 2^(byte - 127)
    return (val.unflatten(-1, (-1, 32)) * scale[..., None]).flatten(-2)


def dense_keys(kI, dtype: torch.dtype) -> torch.Tensor:
    """kI as a (B, S, DI) tensor: packed keys unpacked into `dtype` (exact for bf16 and wider), tensors as they are."""
    return mxfp4_key_values(kI).to(dtype) if isinstance(kI, MXFP4Keys) else kI


def visible(t: torch.Tensor, S: int, ratio: int) -> torch.Tensor:
    """(T, S) bool: entry s is visible to the query at absolute position t iff s < floor((t + 1) / ratio)."""
    return torch.arange(S, device=t.device)[None, :] < torch.div(t[:, None] + 1, ratio, rounding_mode="floor")


def index_scores(qI: torch.Tensor, kI: torch.Tensor, w: torch.Tensor, ct: torch.dtype | None = None) -> torch.Tensor:
    """I_{t,s} = sum_h w_{t,h} ReLU(qI_{t,h} . kI_s): qI (B, T, HI, DI), w (B, T, HI) and kI (B, S, DI) keys shared by
    every query, or (B, T, S, DI) keys gathered per query (the KL over picks: kernels/sparse_kl) -> (B, T, S), no
    mask. Computed in ct (default fp32, fp64 for fp64 inputs)."""
    ct = ct or torch.promote_types(qI.dtype, torch.float32)
    pattern = "bthd,bsd->bths" if kI.dim() == 3 else "bthd,btsd->bths"
    logits = torch.einsum(pattern, qI.to(ct), kI.to(ct)).relu()                        # (B, T, HI, S)
    return torch.einsum("bths,bth->bts", logits, w.to(ct))


def indexer_scores(qI, kI, w, ratio: int, q_offset: int = 0, t0: int = 0, t1: int | None = None):
    """(B, t1 - t0, S) scores of query rows t0..t1-1 with invisible entries at -inf."""
    t1 = qI.shape[1] if t1 is None else t1
    sc = index_scores(qI[:, t0:t1], kI, w[:, t0:t1])
    t = torch.arange(t0, t1, device=qI.device) + q_offset
    return sc.masked_fill(~visible(t, kI.shape[1], ratio)[None], float("-inf"))


def topk_indices(scores: torch.Tensor, k: int, return_scores: bool = False, use_topk: bool = False):
    """The top-k contract: scores (B, T, S) with -inf = not a candidate -> idx (B, T, k) int32 sorted by score
    (descending), ties to the lower index, -1 for slots without a candidate (also every slot past S). use_topk=True
    takes torch.topk (faster, ties unspecified) instead of the stable sort. Consumers treat a row as a set (each slot
    masked on its own): the Triton methods return it unsorted, in torch.topk(sorted=False) order (prefill; ties
    unspecified) or in select's fixed slot order (decode; the same tie rule: triton.py, select.py)."""
    B, T, S = scores.shape
    kk = min(k, S)
    idx = torch.full((B, T, k), -1, dtype=torch.int32, device=scores.device)
    val = torch.full((B, T, k), float("-inf"), dtype=torch.float32, device=scores.device)
    if kk > 0:
        if use_topk:
            v, i = torch.topk(scores, kk, dim=-1)
        else:
            v, i = torch.sort(scores, dim=-1, descending=True, stable=True)
            v, i = v[..., :kk], i[..., :kk]
        idx[..., :kk] = torch.where(v == float("-inf"), -1, i).to(torch.int32)
        val[..., :kk] = v.float()
    return (idx, val) if return_scores else idx


def indexer_topk_naive(qI, kI, w, k: int, ratio: int, q_offset: int = 0, chunk: int = 1024,
                       return_scores: bool = False, use_topk: bool = False, score_dtype: str = "fp32"):
    """score_dtype "bf16": the fp32 scores rounded once to bf16 before the top-k (ties to the lower index). kI: keys,
    or MXFP4Keys (unpacked first)."""
    kI = dense_keys(kI, qI.dtype)
    B, T = qI.shape[:2]
    idx = torch.full((B, T, k), -1, dtype=torch.int32, device=qI.device)
    val = torch.full((B, T, k), float("-inf"), dtype=torch.float32, device=qI.device)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        sc = indexer_scores(qI, kI, w, ratio, q_offset, t0, t1)
        if score_dtype == "bf16":
            sc = sc.to(torch.bfloat16).float()
        idx[:, t0:t1], val[:, t0:t1] = topk_indices(sc, k, return_scores=True, use_topk=use_topk)
    return (idx, val) if return_scores else idx
