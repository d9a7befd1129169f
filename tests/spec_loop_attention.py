"""A deliberately slow, per-query reference of one V4 attention layer, written straight from docs §2-§3.

It reads only the parameters of a dsv4_lab attention module (by name) and recomputes everything in fp64 with
Python loops over queries, blocks, slots and entries: its own RoPE/YaRN angles, its own Hadamard matrix, its own
top-k. It shares no code with dsv4_lab.attention, so agreement tests the vectorised implementation.
"""
from __future__ import annotations

import math

import torch

D = torch.float64


def _rms(x, w=None, eps=1e-6):
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y * w if w is not None else y


def _theta(r, base, yarn):
    """theta_k = base^(-2k/r), YaRN-corrected (docs §2.6)."""
    th = [base ** (-2 * k / r) for k in range(r // 2)]
    if yarn is None or yarn["factor"] <= 1:
        return th
    L0, f = yarn["original_seq_len"], yarn["factor"]

    def corr(beta):
        return r * math.log(L0 / (2 * math.pi * beta)) / (2 * math.log(base))
    lo, hi = max(math.floor(corr(yarn["beta_fast"])), 0), min(math.ceil(corr(yarn["beta_slow"])), r - 1)
    if lo == hi:
        hi += 0.001
    out = []
    for k in range(r // 2):
        ramp = min(max((k - lo) / (hi - lo), 0.0), 1.0)
        out.append(th[k] * ((1 - ramp) + ramp / f))
    return out


def _rope(x, pos, theta, inverse=False):
    """Rotate the last r dims of x (..., c): pairs (2k, 2k+1) as complex numbers times exp(+-i pos theta_k)."""
    r = 2 * len(theta)
    if r == 0:
        return x
    x = x.clone()
    for k, th in enumerate(theta):
        a = pos * th * (-1 if inverse else 1)
        i0, i1 = x.shape[-1] - r + 2 * k, x.shape[-1] - r + 2 * k + 1
        x0, x1 = x[..., i0].clone(), x[..., i1].clone()
        x[..., i0] = x0 * math.cos(a) - x1 * math.sin(a)
        x[..., i1] = x0 * math.sin(a) + x1 * math.cos(a)
    return x


def _hadamard(n):
    h = [[1.0]]
    while len(h) < n:
        h = [row + row for row in h] + [row + [-v for v in row] for row in h]
    return torch.tensor(h, dtype=D) / math.sqrt(n)


def _compress(P, prefix, u, m, overlap, c, eps):
    """List of pooled+normed entries (before RoPE), one per complete block (docs §2.3 / §3)."""
    Wkv, Wz, ape, nw = (P[prefix + "wkv.weight"], P[prefix + "wgate.weight"], P[prefix + "ape"],
                        P[prefix + "norm.weight"])
    T = u.shape[0]
    C = [Wkv @ u[s] for s in range(T)]
    Z = [Wz @ u[s] for s in range(T)]
    entries = []
    for i in range(T // m):
        vals, scores = [], []
        if overlap:
            if i > 0:                                        # previous block, first half ("b" series)
                for rho in range(m):
                    s = m * (i - 1) + rho
                    vals.append(C[s][:c])
                    scores.append(Z[s][:c] + ape[rho, :c])
            for rho in range(m):                             # own block, second half ("a" series)
                s = m * i + rho
                vals.append(C[s][c:])
                scores.append(Z[s][c:] + ape[rho, c:])
        else:
            for rho in range(m):
                s = m * i + rho
                vals.append(C[s])
                scores.append(Z[s] + ape[rho])
        sc = torch.stack(scores)                             # (slots, c)
        w = torch.exp(sc - sc.max(0).values) / torch.exp(sc - sc.max(0).values).sum(0)   # per-channel softmax
        entries.append(_rms(sum(w[j] * vals[j] for j in range(len(vals))), nw, eps))
    return entries


def spec_attention(module, u: torch.Tensor) -> torch.Tensor:
    """u (T, d) one sequence -> output (T, d), fp64. `module` is an Attention / CSAttention / HCAttention."""
    cfg = module.cfg
    P = {n: p.detach().to(D) for n, p in module.named_parameters()}
    u = u.detach().to(D)
    T = u.shape[0]
    H, c, r, eps = cfg.n_heads, cfg.head_dim, cfg.rope_head_dim, cfg.norm_eps
    kind = module.layer_type
    comp = kind in ("csa", "hca")
    yarn = dict(factor=cfg.yarn_factor, original_seq_len=cfg.yarn_original_seq_len, beta_fast=cfg.yarn_beta_fast,
                beta_slow=cfg.yarn_beta_slow) if comp else None
    theta = _theta(r, cfg.compress_rope_theta if comp else cfg.rope_theta, yarn)

    # queries (docs §2.1) and window entries (docs §2.2)
    latent, q, k = [], [], []
    for t in range(T):
        if cfg.q_lora_rank > 0:
            cq = _rms(P["wq_a.weight"] @ u[t], P["q_norm.weight"], eps)
            qt = (P["wq_b.weight"] @ cq).view(H, c)
        else:
            cq = u[t]                                         # indexer latent without a low-rank query
            qt = (P["wq.weight"] @ u[t]).view(H, c)
        latent.append(cq)
        if cfg.qk_norm:
            qt = _rms(qt, None, eps)
        q.append(_rope(qt, t, theta))
        kt = P["wkv.weight"] @ u[t]
        if cfg.qk_norm:
            kt = _rms(kt, P["kv_norm.weight"], eps)
        k.append(_rope(kt, t, theta))

    # compressed entries (docs §2.3, §3)
    if comp:
        m = cfg.csa_ratio if kind == "csa" else cfg.hca_ratio
        overlap = cfg.compressor_overlap if kind == "csa" else False
        ent = [_rope(e, i * m, theta) for i, e in enumerate(_compress(P, "compressor.", u, m, overlap, c, eps))]
    else:
        m, ent = 1, []
    S = len(ent)

    # indexer (docs §2.4)
    if kind == "csa":
        nI, cI = cfg.index_n_heads, cfg.index_head_dim
        Hd = _hadamard(cI) if cfg.index_hadamard else torch.eye(cI, dtype=D)
        kI = [_rope(e, i * m, theta) @ Hd for i, e in
              enumerate(_compress(P, "indexer.compressor.", u, m, cfg.compressor_overlap, cI, eps))]

    out = []
    for t in range(T):
        visible = [s for s in range(S) if s < (t + 1) // m]
        if kind == "csa":
            mode = getattr(module, "index_mode", cfg.index_mode)
            if mode == "all" or getattr(module, "indexer_stage", "sparse") == "warmup":
                chosen = visible
            elif mode == "learned":
                qI = _rope((P["indexer.wq_b.weight"] @ latent[t]).view(nI, cI), t, theta) @ Hd
                w = (P["indexer.weights_proj.weight"] @ u[t]) * cI ** -0.5 * nI ** -0.5
                score = {s: sum(float(w[h]) * max(float(qI[h] @ kI[s]), 0.0) for h in range(nI)) for s in visible}
                K = min(cfg.index_topk, S)
                chosen = sorted(visible, key=lambda s: -score[s])[:K]        # fewer if fewer are visible
            else:
                raise ValueError("spec loop covers index_mode learned / all")
        else:
            chosen = visible
        if kind == "dense":
            window = list(range(0, t + 1))
        elif comp and not cfg.window_branch:
            window = []
        else:
            window = list(range(max(0, t - cfg.window + 1), t + 1))
        kappa = [k[j] for j in window] + [ent[s] for s in chosen]
        o = torch.zeros(H, c, dtype=D)
        for h in range(H):
            z = [float(q[t][h] @ x) / math.sqrt(c) for x in kappa]
            zs = [float(P["attn_sink"][h])] if cfg.attn_sink else []
            mx = max(z + zs) if (z + zs) else 0.0
            den = sum(math.exp(v - mx) for v in z + zs)
            for x, v in zip(kappa, z):
                o[h] += math.exp(v - mx) / den * x
        if cfg.output_rope:
            o = _rope(o, t, theta, inverse=True)              # de-rotate at the query position (docs §2.6)
        if cfg.o_groups > 0:                                  # grouped output projection (docs §2.7)
            g, dg = cfg.o_groups, cfg.o_lora_rank
            WA = P["wo_a.weight"].view(g, dg, -1)
            og = o.reshape(g, -1)
            mid = torch.cat([WA[i] @ og[i] for i in range(g)])
            out.append(P["wo_b.weight"] @ mid)
        else:
            out.append(P["wo.weight"] @ o.reshape(-1))
    return torch.stack(out)
