"""Hybrid Newton-Schulz orthogonalisation for Muon (docs §7, paper §2.4 Algorithm 1).

    M_0 = G / (||G||_F + eps)
    M_k = a M + b (M M^T) M + c (M M^T)^2 M          (one "quintic" step with coefficients (a, b, c))

Each step maps every singular value s of M to p(s) = a s + b s^3 + c s^5 and keeps the singular vectors, so after
enough steps M ~ U V^T (the orthogonal polar factor of G). V4's schedule ("v4"): 8 steps of Keller Jordan's
(3.4445, -4.7750, 2.0315), whose slope at 0 is large (pulls small singular values up fast) but which only settles
singular values into a band around 1 (about [0.7, 1.2]), then 2 steps of (2, -1.5, 0.5), for which p(1) = 1 and
p'(1) = 0, so the band collapses onto 1 (quadratic convergence).

Practical details (standard, not stated in the paper): tall matrices are transposed so that M M^T is the smaller
Gram matrix; the Frobenius norm gets eps = 1e-7 so a zero gradient gives a zero update; batched input (..., n, m)
treats every leading index as an independent matrix.
"""
from __future__ import annotations

import torch

KELLER = (3.4445, -4.7750, 2.0315)      # modded-nanogpt / torch.optim.Muon default
FIXED_POINT = (2.0, -1.5, 0.5)          # p(1) = 1, p'(1) = 0

SCHEDULES: dict[str, list[tuple[float, float, float]]] = {
    "v4": [KELLER] * 8 + [FIXED_POINT] * 2,     # docs §7: 8 + 2 = 10 steps
    "keller5": [KELLER] * 5,                    # modded-nanogpt / torch.optim.Muon: 5 steps
}


def resolve_schedule(schedule) -> list[tuple[float, float, float]]:
    """A schedule name from SCHEDULES or a list of (a, b, c) triples -> the list of triples."""
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(f"ns_schedule = {schedule!r} is not allowed: one of {sorted(SCHEDULES)} "
                             "or a list of (a, b, c) coefficient triples")
        return list(SCHEDULES[schedule])
    steps = [tuple(float(v) for v in t) for t in schedule]
    if not steps or any(len(t) != 3 for t in steps):
        raise ValueError(f"ns_schedule = {schedule!r} is not allowed: a non-empty list of (a, b, c) triples")
    return steps


def newton_schulz(G: torch.Tensor, schedule="v4", eps: float = 1e-7, dtype: torch.dtype | None = None
                  ) -> torch.Tensor:
    """Approximate U V^T of G = U S V^T for G of shape (..., n, m); returns the same shape and dtype as G.

    dtype: the matmul dtype; None = bf16 on CUDA (paper §3.4.1: stable in BF16), fp32 elsewhere (CPU bf16 matmuls
    are slow and the tests want tight numbers).
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix (..., n, m), got shape {tuple(G.shape)}")
    steps = resolve_schedule(schedule)
    if dtype is None:
        dtype = torch.bfloat16 if G.is_cuda else torch.float32
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT                                                       # (..., m, n) with m < n: small Gram
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)                 # all singular values <= 1
    for a, b, c in steps:
        A = X @ X.mT                                                   # (..., n, n) Gram
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)
