"""Hyper-connections: n_hc residual streams mixed around every sub-layer (docs §1; PAPER §2.2).

Residual state X (B, T, n, d), n = hc_mult. One residual site (attention or FFN) computes, per token, in fp32:

    v = vec(X) (n d),  rho = 1 / sqrt(mean(v^2) + norm_eps)                           weightless flatten-RMS (§1.2.1)
    mu = rho * v W^T   (n(2+n),)  layout [0:n] pre | [n:2n] post | [2n:] res row-major  one fused projection (§1.2.2)
    A~ = a_pre mu_pre + S_pre,  C~ = a_post mu_post + S_post,  B~ = a_res Mat(mu_res) + S_res   static + dynamic (§1.2.3)

    residual="mhc" (manifold-constrained, docs §1.2.4):
        A = sigmoid(A~) + eps,  C = 2 sigmoid(C~),  P = sinkhorn(B~)  (softmax + eps, column norm, 19 x (row, column))
    residual="hc" (unconstrained hyper-connections, Zhu et al. 2024 as restated in the mHC paper):
        the same fused projection and static/dynamic split, but the dynamic part goes through tanh (HC's choice) and
        nothing is constrained:  A = a_pre tanh(mu_pre) + S_pre,  C = a_post tanh(mu_post) + S_post,
        P = a_res tanh(Mat(mu_res)) + S_res.  P can have any sign and any row/column sums, so its spectral norm is
        unbounded and products of P through depth can grow or shrink: the instability mHC removes. The toggle changes
        exactly the maps (constraint family), never the parameters or their shapes.

    pre  (collapse):  u = sum_i A_i x_i                                (B, T, d), the sub-layer input before its norm
    post (expand):    x'_j = C_j y + sum_i P_ij x_i                    output stream j uses COLUMN j of P (B = P^T)

Final collapse (`HyperHead`, docs §1.1.4): z = sum_i a_i x_i, a = sigmoid(a_head (x^ W_head^T) + s_head) + eps.

Initialisation (docs §1.4, UNCONFIRMED; config fields hc_alpha_init, hc_res_diag_init, hc_fn_init_std):
    W ~ N(0, hc_fn_init_std), a = hc_alpha_init (all three), and static biases chosen so the block starts near a
    plain residual on identical streams:
      mhc: S_pre = -ln(n-1) (A ~ 1/n; 0 when n = 1), S_post = 0 (C ~ 1), S_res = hc_res_diag_init * I (P ~ I)
      hc:  S_pre = 1/n, S_post = 1, S_res = I (the same starting maps without the nonlinearities)
      head: S_head = -ln(n-1) (a ~ 1/n), a_head = hc_alpha_init.

Probes (for notebooks): set `site.probe = True` (or `set_probe(model, True)`) and each forward stores in
`site.probe_out`: P (B, T, n, n), its per-token spectral norm and Sinkhorn residual (max |row/column sum - 1|).
`mixing_probes(model)` gathers them per layer. `sinkhorn` is a standalone function (defined once, in
kernels/mhc/naive.py).

Paths (cfg.kernels, dsv4_lab.kernels.use_triton): residual="mhc" on the Triton path runs the fused kernels of
kernels/mhc (pre: coefficients + Sinkhorn + collapse; post: expand + residual mix; both with Triton backward
kernels); elsewhere, and always for "hc", the maps come from the naive twin kernels/mhc/naive.py (mhc) or the tanh
maps below (hc) under PyTorch autograd.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .kernels import use_triton
from .kernels.mhc import mhc_post, mhc_pre
from .kernels.mhc.naive import mhc_collapse_naive, mhc_maps_naive, sinkhorn


# ---------------------------------------------------------------------------------------------------------------
# Sinkhorn projection (docs §1.2 step 4) and probes
# ---------------------------------------------------------------------------------------------------------------

def sinkhorn_residual(P: torch.Tensor) -> torch.Tensor:
    """(..., n, n) -> (...,) max |row sum - 1| and |column sum - 1|: distance from doubly stochastic."""
    r = (P.sum(-1) - 1).abs().amax(-1)
    c = (P.sum(-2) - 1).abs().amax(-1)
    return torch.maximum(r, c)


def spectral_norm(P: torch.Tensor) -> torch.Tensor:
    """(..., n, n) -> (...,) largest singular value (the residual map's worst-case gain; equal for P and P^T)."""
    return torch.linalg.matrix_norm(P.double(), ord=2).to(P.dtype)


# ---------------------------------------------------------------------------------------------------------------
# One residual site
# ---------------------------------------------------------------------------------------------------------------

class HyperConnection(nn.Module):
    """One hc / mhc residual site with the interface of residual.py: `pre(X) -> (u, ctx)`, `post(y, X, ctx)`.

    Parameters (docs §1.3, names as REF/HF): fn [n(2+n), n d] (W^pre; W^post; W^res stacked), base [n(2+n)] (S),
    scale [3] (alpha^pre, alpha^post, alpha^res)."""

    def __init__(self, cfg: ModelConfig, constrained: bool | None = None):
        super().__init__()
        n, d = cfg.hc_mult, cfg.d_model
        self.n, self.cfg = n, cfg
        self.constrained = (cfg.residual == "mhc") if constrained is None else constrained
        self.iters, self.eps, self.norm_eps = cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.norm_eps
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * d))
        self.base = nn.Parameter(torch.empty((2 + n) * n))
        self.scale = nn.Parameter(torch.empty(3))
        self.probe = False
        self.probe_out: dict | None = None
        self.reset_parameters_v4()

    @torch.no_grad()
    def reset_parameters_v4(self):
        n, cfg = self.n, self.cfg
        nn.init.normal_(self.fn, 0.0, cfg.hc_fn_init_std)
        self.scale.fill_(cfg.hc_alpha_init)
        pre, post, res = self.base.split([n, n, n * n])
        if self.constrained:
            pre.fill_(-math.log(n - 1) if n > 1 else 0.0)            # sigmoid(-ln(n-1)) = 1/n
            post.zero_()                                             # 2 sigmoid(0) = 1
            res.copy_((torch.eye(n) * cfg.hc_res_diag_init).flatten())
        else:
            pre.fill_(1.0 / n)
            post.fill_(1.0)
            res.copy_(torch.eye(n).flatten())

    def maps(self, X: torch.Tensor):
        """X (B, T, n, d) -> A (B, T, n), C (B, T, n), P (B, T, n, n) in fp32 (fp64 stays fp64).
        mhc: the naive twin of the fused kernels (kernels/mhc/naive.py), the one reference of these maps."""
        if self.constrained:                                                      # mHC (docs §1.2.4)
            return mhc_maps_naive(X, self.fn, self.scale, self.base, self.iters, self.eps, self.norm_eps)
        n = self.n                                                                # HC: tanh dynamic, unconstrained
        ct = torch.promote_types(X.dtype, torch.float32)
        v = X.flatten(2).to(ct)                                                   # (B, T, n d)
        v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + self.norm_eps)      # weightless flatten-RMS
        with torch.autocast(X.device.type, enabled=False):                        # fp32 under autocast too
            mu = F.linear(v, self.fn.to(ct))                                      # (B, T, n(2+n))
        mu_pre, mu_post, mu_res = mu.split([n, n, n * n], dim=-1)
        s_pre, s_post, s_res = self.base.to(ct).split([n, n, n * n])
        a = self.scale.to(ct)
        A = a[0] * torch.tanh(mu_pre) + s_pre
        C = a[1] * torch.tanh(mu_post) + s_post
        P = a[2] * torch.tanh(mu_res.unflatten(-1, (n, n))) + s_res.view(n, n)   # [i, j] at 2n + n i + j
        return A, C, P

    def _probe(self, A, C, P):
        if self.probe:
            P = P.detach()
            self.probe_out = {"P": P, "spectral_norm": spectral_norm(P), "sinkhorn_residual": sinkhorn_residual(P),
                              "A": A.detach(), "C": C.detach()}

    def pre(self, X: torch.Tensor):
        """X (B, T, n, d) -> u (B, T, d), ctx = (path, coef [A, C, P] (B, T, (2 + n) n), X as post must read it)."""
        n = self.n
        if self.constrained and use_triton(self.cfg, X):
            # fused Triton pre (coefficients + Sinkhorn + collapse) and post, forward and backward (kernels/mhc);
            # Xa is X passed through the pre kernel so post's dX reaches the pre backward, which sums both
            u, coef, Xa = mhc_pre(X, self.fn, self.scale, self.base, self.iters, self.eps, self.norm_eps,
                                  impl="triton", alias=True)
            self._probe(coef[..., :n], coef[..., n:2 * n], coef[..., 2 * n:].unflatten(-1, (n, n)))
            return u, ("triton", coef, Xa)
        A, C, P = self.maps(X)
        self._probe(A, C, P)
        coef = torch.cat([A, C, P.flatten(-2)], -1)
        return mhc_collapse_naive(X, coef), ("torch", coef, X)

    def post(self, y: torch.Tensor, X: torch.Tensor, ctx) -> torch.Tensor:
        """x'_j = C_j y + sum_i P_ij x_i (column j of P; paper B = P^T), computed in fp32 like REF."""
        path, coef, Xp = ctx
        return mhc_post(y, Xp, coef, impl=path)


class HyperHead(nn.Module):
    """Final collapse of the streams before the last RMSNorm (docs §1.1 step 4); also MTP's own copy (docs §9).
    Same for hc and mhc (no Sinkhorn, no post). Parameters hc_fn [n, n d], hc_base [n], hc_scale [1]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n, d = cfg.hc_mult, cfg.d_model
        self.n, self.cfg, self.eps, self.norm_eps = n, cfg, cfg.hc_eps, cfg.norm_eps
        self.hc_fn = nn.Parameter(torch.empty(n, n * d))
        self.hc_base = nn.Parameter(torch.empty(n))
        self.hc_scale = nn.Parameter(torch.empty(1))
        self.reset_parameters_v4()

    @torch.no_grad()
    def reset_parameters_v4(self):
        nn.init.normal_(self.hc_fn, 0.0, self.cfg.hc_fn_init_std)
        self.hc_base.fill_(-math.log(self.n - 1) if self.n > 1 else 0.0)
        self.hc_scale.fill_(self.cfg.hc_alpha_init)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        ct = torch.promote_types(X.dtype, torch.float32)
        v = X.flatten(2).to(ct)                                                   # (B, T, n d)
        rho = torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + self.norm_eps)        # flatten-RMS, applied after the
        with torch.autocast(X.device.type, enabled=False):                        # fp32 under autocast too
            mu = F.linear(v, self.hc_fn.to(ct)) * rho                             # n-wide projection (as the pre)
        a = torch.sigmoid(mu * self.hc_scale.to(ct) + self.hc_base.to(ct)) + self.eps
        return (a.unsqueeze(-1) * X.to(ct)).sum(2).to(X.dtype)                    # (B, T, d)


# ---------------------------------------------------------------------------------------------------------------
# Probes over a whole model (notebooks)
# ---------------------------------------------------------------------------------------------------------------

def set_probe(model: nn.Module, on: bool = True) -> None:
    for m in model.modules():
        if isinstance(m, HyperConnection):
            m.probe, m.probe_out = on, None


def mixing_probes(model: nn.Module) -> list[dict]:
    """After a forward with probes on: one dict per residual site in forward order (name, P, spectral norm and
    Sinkhorn residual per token, their max/mean)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, HyperConnection) and m.probe_out is not None:
            p = m.probe_out
            out.append({"name": name, **p, "spectral_norm_max": p["spectral_norm"].max().item(),
                        "spectral_norm_mean": p["spectral_norm"].mean().item(),
                        "sinkhorn_residual_max": p["sinkhorn_residual"].max().item()})
    return out


def composite_gain(probes: list[dict]) -> torch.Tensor:
    """Spectral norm of the product of the residual maps through depth, per token: || P_L^T ... P_1^T ||_2 (B, T).
    This is the gain of the pure-residual path from the embedding to the last layer (mHC paper's Amax metric uses
    the same product); for mHC each factor has norm <= 1, for HC it is unbounded."""
    M = None
    for p in probes:
        Pt = p["P"].transpose(-1, -2).double()
        M = Pt if M is None else Pt @ M
    return torch.linalg.matrix_norm(M, ord=2)
