"""CSA core attention, naive PyTorch twin of triton.py (docs §2.5; docs/kernels.md §2.3).

For query i (absolute position t = q_offset + i) the candidate set is the union of
    window entries     kv[j],   j in [t - window + 1, t] ∩ [0, Tk)                    (uncompressed, docs §2.2)
    selected entries   comp[s], s = idx[i, k] for k < K, kept iff 0 <= s < S          (-1 / out of range = masked)
and o_{t,h} = sum_j p_{h,j} e_j with p = exp(z) / (sum exp(z) + exp(sink_h)), z = scale * q_{t,h} . e_j (K = V).
A repeated index is counted once per occurrence (a gather). Equal to the masked reference sink_attention
(tests/reference_attention.py) over the concatenated entries with the corresponding mask (tests/kernels_cases.py).

How (the CPU path of the model, so it is written for speed without changing the math): the window is a band.
Queries go in blocks of L; block b's window keys are the L + W - 1 consecutive rows of the left-padded kv ending at
its last query, read as one strided view (`unfold`, no copy): one batched matmul per block instead of a gather of W
rows per query, and a band mask keeps exactly each query's W keys (and rows inside [0, Tk)). Heads are folded into
the GEMM rows. The picks: the scores of all S compressed entries as one GEMM (B, Tq H, D) @ (B, D, S), the K picked
columns gathered from it; their output is the probabilities scatter-added back onto (B, Tq, H, S) times comp (no
(B, Tq, K, D) copy of the picked rows, whose backward is an index_put accumulate). This costs O(T H S D) instead of
O(T H K D) flops, cheaper on a CPU at the lab's sizes (S up to a few thousand); queries are chunked so the
(B, chunk, H, S) scores stay <= 16M numbers. `gather_entries` states the same candidate set entry by entry (the
tests' form).

Shapes: q (B, T, H, D); kv (B, Tk, D); comp (B, S, D); idx (B, T, K) integer; sink (H,) fp32 or None.
Returns o (B, T, H, D) in q's dtype and lse (B, T, H) = log(sum exp(z) + exp(sink)) (natural log), fp32 (fp64
for fp64 inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sink_softmax(zs: list, sink: torch.Tensor | None):
    """The softmax of docs §2.5 over score blocks zs = [z_i (B, Tq, H, N_i)] side by side (-inf = masked) whose
    denominator also holds exp(sink_h): ([p_i (B, Tq, H, N_i)], lse (B, Tq, H) = log(sum exp(z) + exp(sink)), -inf
    when nothing is visible and no sink). Each block's p = exp(z - lse) is computed on its own (no slicing)."""
    B, Tq, H, _ = zs[0].shape
    cols = zs + ([sink.to(zs[0].dtype).view(1, 1, H, 1).expand(B, Tq, H, 1)] if sink is not None else [])
    lse = torch.logsumexp(torch.cat(cols, -1), -1)
    m = lse.clamp_min(-1e30)[..., None]
    return [torch.exp(z - m) for z in zs], lse


def window_band(q: torch.Tensor, kv: torch.Tensor, window: int, q_offset: int, L: int):
    """Window scores of queries q (B, T, H, D) at positions q_offset + i against kv (B, Tk, D) at positions 0..Tk-1.

    Returns z (B, T, H, L + W - 1) (-inf outside each query's window [t - W + 1, t] or outside [0, Tk)), the key
    blocks Kb (B, nb, D, L + W - 1) (a view of the padded kv: block b's keys) and nb = ceil(T / L). W = 0: no keys."""
    B, T, H, D = q.shape
    Tk, W = kv.shape[1], window
    nb = -(-T // L)
    if W == 0:                                                         # (B, T, H, 0), still in kv's graph
        return torch.einsum("bthd,bnd->bthn", q, kv[:, :0]), None, nb
    Lw = L + W - 1
    need = q_offset + nb * L + W - 1                                   # padded rows the last block reaches
    P = F.pad(kv, (0, 0, W - 1, max(0, need - (Tk + W - 1))))         # row r holds position r - W + 1
    Kb = P[:, q_offset:need].unfold(1, Lw, L)                          # (B, nb, D, Lw)
    Qb = F.pad(q, (0, 0, 0, 0, 0, nb * L - T)).view(B, nb, L, H, D).permute(0, 1, 3, 2, 4)   # (B, nb, H, L, D)
    z = torch.matmul(Qb.reshape(B, nb, H * L, D), Kb).view(B, nb, H, L, Lw)   # heads folded into the GEMM rows
    r = torch.arange(L, device=q.device)[:, None]
    c = torch.arange(Lw, device=q.device)[None, :]
    band = (c >= r) & (c < r + W)                                      # (L, Lw): key c in query r's window
    j = q_offset + torch.arange(nb, device=q.device)[:, None] * L - W + 1 + c   # (nb, Lw) key positions
    ok = band[None] & ((j >= 0) & (j < Tk))[:, None, :]                # (nb, L, Lw)
    z = z.masked_fill(~ok[None, :, None], float("-inf"))
    return z.permute(0, 1, 3, 2, 4).reshape(B, nb * L, H, Lw)[:, :T], Kb, nb


def window_output(p: torch.Tensor, Kb, nb: int, L: int) -> torch.Tensor:
    """p (B, T, H, L + W - 1) window probabilities -> (B, T, H, D) = sum_c p_c key_c, through the block layout."""
    B, T, H, Lw = p.shape
    if Kb is None:                                                     # W = 0
        return None
    pb = F.pad(p, (0, 0, 0, 0, 0, nb * L - T)).view(B, nb, L, H, Lw).permute(0, 1, 3, 2, 4)  # (B, nb, H, L, Lw)
    o = torch.matmul(pb.reshape(B, nb, H * L, Lw), Kb.transpose(-1, -2)).view(B, nb, H, L, -1)   # (B, nb, H, L, D)
    return o.permute(0, 1, 3, 2, 4).reshape(B, nb * L, H, -1)[:, :T]


def gather_entries(kv, comp, idx, window: int, q_offset: int = 0, t0: int = 0, t1: int | None = None):
    """Entries and validity of queries t0..t1-1: (E (B, Tq, window + K, D), valid (B, Tq, window + K) bool)."""
    B, Tk, D = kv.shape
    S = comp.shape[1]
    T = idx.shape[1]
    t1 = T if t1 is None else t1
    t = torch.arange(t0, t1, device=kv.device) + q_offset                       # (Tq,) absolute positions
    j = t[:, None] - window + 1 + torch.arange(window, device=kv.device)        # (Tq, W) window rows, ascending
    jv = (j >= 0) & (j < Tk)
    ew = kv[:, j.clamp(0, max(Tk - 1, 0))]                                      # (B, Tq, W, D)
    s = idx[:, t0:t1].long()                                                    # (B, Tq, K)
    sv = (s >= 0) & (s < S)
    ec = torch.gather(comp[:, None].expand(-1, t1 - t0, -1, -1), 2,
                      s.clamp(0, max(S - 1, 0))[..., None].expand(-1, -1, -1, D)) if S > 0 else \
        comp.new_zeros(B, t1 - t0, s.shape[-1], D)
    E = torch.cat([ew, ec], 2)
    valid = torch.cat([jv[None].expand(B, -1, -1), sv], 2)
    return E, valid


def sparse_attn_naive(q, kv, comp, idx, sink, scale: float, window: int, q_offset: int = 0,
                      chunk: int = 4096, return_lse: bool = False, block: int = 64):
    B, T, H, D = q.shape
    S = comp.shape[1]
    ct = torch.promote_types(q.dtype, torch.float32)
    kvc, compc = kv.to(ct), comp.to(ct)
    L = max(1, min(block, T))
    K = idx.shape[-1]
    chunk = max(1, min(chunk, (1 << 24) // max(1, B * H * S)))  # (B, chunk, H, S) scores: <= 16M numbers
    outs, lses = [], []
    for t0 in range(0, T, chunk):                           # chunk the queries: memory O(chunk * H * (L + W + S))
        t1 = min(T, t0 + chunk)
        Tq = t1 - t0
        qc = q[:, t0:t1].to(ct) * scale
        zw, Kb, nb = window_band(qc, kvc, window, q_offset + t0, L)            # (B, Tq, H, Lw)
        s = idx[:, t0:t1].long()                                                # (B, Tq, K)
        sv = (s >= 0) & (s < S)                                                 # (B, Tq, K) the kept picks
        sc = s.clamp(0, max(S - 1, 0))[:, :, None].expand(-1, -1, H, -1)       # (B, Tq, H, K) column of each pick
        if S > 0 and K > 0:                                                     # scores of all S entries (one
            zall = torch.matmul(qc.reshape(B, Tq * H, D), compc.transpose(1, 2)).view(B, Tq, H, S)   # GEMM),
            zc = zall.gather(-1, sc).masked_fill(~sv[:, :, None], float("-inf"))    # the K picked ones kept
        else:
            zc = qc.new_full((B, Tq, H, K), float("-inf"))
        (pw, pk), lse = sink_softmax([zw, zc], sink)                           # lse (B, Tq, H)
        o = window_output(pw, Kb, nb, L)
        if S > 0 and K > 0:                                                     # the picks' probabilities back on
            pc = pk.new_zeros(B, Tq, H, S).scatter_add(-1, sc, pk)              # their entries (a repeat adds up,
            oc = torch.matmul(pc.view(B, Tq * H, S), compc).view(B, Tq, H, D)  # as the gather counts it twice)
            o = oc if o is None else o + oc
        if o is None:                                                           # no window, no pick: 0 (kept
            o = qc * 0                                                          # in q's graph, as a sum over none)
        outs.append(o.to(q.dtype))
        lses.append(lse.to(ct))                                                 # fp32 (fp64 for fp64 inputs)
    o = torch.cat(outs, 1)
    return (o, torch.cat(lses, 1)) if return_lse else o
