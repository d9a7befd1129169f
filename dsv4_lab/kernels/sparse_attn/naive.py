"""CSA core attention, naive PyTorch twin of triton.py (docs §2.5; docs/kernels.md §2.3).

For query i (absolute position t = q_offset + i) the candidate set is the union of
    window entries     kv[j],   j in [t - window + 1, t] ∩ [0, Tk)                    (uncompressed, docs §2.2)
    selected entries   comp[s], s = idx[i, k] for k < K, kept iff 0 <= s < S          (-1 / out of range = masked)
and o_{t,h} = sum_j p_{h,j} e_j with p = exp(z) / (sum exp(z) + exp(sink_h)), z = scale * q_{t,h} . e_j (K = V).
A repeated index is counted once per occurrence (a gather). Equal to the masked reference sink_attention
(tests/reference_attention.py) over the concatenated
entries with the corresponding mask (tests/test_kernels_interpret.py checks it).

Shapes: q (B, T, H, D); kv (B, Tk, D); comp (B, S, D); idx (B, T, K) integer; sink (H,) fp32 or None.
Returns o (B, T, H, D) in q's dtype and lse (B, T, H) = log(sum exp(z) + exp(sink)) (natural log), fp32 (fp64
for fp64 inputs).
"""
from __future__ import annotations

import torch


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


def sink_softmax(z: torch.Tensor, sink: torch.Tensor | None):
    """The softmax of docs §2.5 over scores z (B, Tq, H, N) (-inf = masked) whose denominator also holds exp(sink_h):
    (p (B, Tq, H, N), lse (B, Tq, H) = log(sum exp(z) + exp(sink)), -inf when nothing is visible and no sink)."""
    B, Tq, H, _ = z.shape
    if sink is not None:
        z = torch.cat([z, sink.to(z.dtype).view(1, 1, H, 1).expand(B, Tq, H, 1)], -1)
    lse = torch.logsumexp(z, -1)
    p = torch.exp(z - lse.clamp_min(-1e30)[..., None])
    return (p[..., :-1] if sink is not None else p), lse


def sparse_attn_naive(q, kv, comp, idx, sink, scale: float, window: int, q_offset: int = 0,
                      chunk: int = 4096, return_lse: bool = False):
    B, T, H, D = q.shape
    ct = torch.promote_types(q.dtype, torch.float32)
    outs, lses = [], []
    for t0 in range(0, T, chunk):                           # chunk the queries: memory O(chunk * (W + K) * D)
        t1 = min(T, t0 + chunk)
        E, valid = gather_entries(kv, comp, idx, window, q_offset, t0, t1)      # (B, Tq, N, D), (B, Tq, N)
        z = torch.einsum("bthd,btnd->bthn", q[:, t0:t1].to(ct), E.to(ct)) * scale
        p, lse = sink_softmax(z.masked_fill(~valid[:, :, None], float("-inf")), sink)   # lse (B, Tq, H)
        outs.append(torch.einsum("bthn,btnd->bthd", p, E.to(ct)).to(q.dtype))
        lses.append(lse.to(ct))                                                 # fp32 (fp64 for fp64 inputs)
    o = torch.cat(outs, 1)
    return (o, torch.cat(lses, 1)) if return_lse else o
