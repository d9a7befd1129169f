"""Token-level KV compressors of CSA (m = 4, overlapping) and HCA (m' non-overlapping) (docs §2.3, §3).

Every token s gives a value C_s = wkv u_s and a score Z_s = wgate u_s (computed in fp32). Block i holds tokens
i*m .. i*m+m-1; `ape` B[rho] is added to the score of the token at position rho inside its own block.

Overlapping (CSA, docs §2.3): wkv / wgate / ape have 2c channels. The first half [0, c) is the "b" series that feeds
the NEXT entry, the second half [c, 2c) the "a" series that feeds the token's own entry. Entry i pools 2m = 8 slots,
independently for every channel ch (the gates are vectors):

    w_{., ch}  = softmax( [Z^b_{m(i-1)+rho, ch} + B^b_{rho, ch}]_rho  ||  [Z^a_{mi+rho, ch} + B^a_{rho, ch}]_rho )
    C~_{i, ch} = sum_rho w^b_rho C^b_{m(i-1)+rho, ch} + sum_rho w^a_rho C^a_{mi+rho, ch}

For i = 0 the b slots have score -inf and value 0 (or come from a decode cache, `prev`).
Non-overlapping (HCA, docs §3; also CSA with compressor_overlap=False, the plain m-token pool): c channels,
C~_i = sum_rho softmax_rho(Z_{mi+rho} + B_rho) C_{mi+rho}, per channel.

Then C^Comp_i = RMSNorm_w(C~_i), RoPE on its last r dims at position i*m (the block's first token). Only complete
blocks are compressed: the trailing T mod m tokens are never used by `forward`; with a KV cache, `step` keeps them in
the compressor's state (the uncompressed tail, docs §6.1) and pools each block when its last token arrives.

The pool, the ape bias and the RMSNorm are one op, kernels/compressor_pool (`compressor_pool`, on already-projected
inputs), shared by `forward` and `step`: its fused Triton kernels when `impl` (the model's cfg.kernels) selects
Triton for the tensor (`takes_kernel`; in training a fused backward too, CompressorPoolFn), else its naive twin (the
pools `pool_overlap`, `pool_plain`, re-exported here) under autograd (CPU, fp64). `forward` with a
RotaryTable hands the tables to the op, which applies RoPE too (the naive twin with the same `apply_rope`), so on the
kernel path the module is three launches (the two GEMMs and the kernel; without autograd on CUDA the GEMMs are one:
`project`, docs/kernels.md §10-11). With another rope RoPE
is `rotate` after the pool, and `step` always returns its entries before RoPE (the caller rotates them with
`rotate`).
`Compressor` owns the weights (names as REF: wkv, wgate, ape, norm).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.compressor_pool import compressor_pool, pool_overlap, pool_plain  # noqa: F401 (re-export)
from ..layers import Linear, RMSNorm, linear_f32
from ..rope import RotaryTable


class Compressor(nn.Module):
    """Weights and forward of one compressor: u (B, T, d) -> entries (B, floor(T/m), c)."""

    def __init__(self, d: int, c: int, m: int, overlap: bool, eps: float = 1e-6, impl: str = "auto"):
        super().__init__()
        self.c, self.m, self.overlap = c, m, overlap
        self.impl = impl                            # cfg.kernels: auto | triton | torch (kernels/__init__.py)
        k = 2 if overlap else 1
        self.wkv = Linear(d, k * c)                 # bf16 in REF checkpoints, computed in fp32; never QAT'd (docs §8.2)
        self.wgate = Linear(d, k * c)
        self.ape = nn.Parameter(torch.zeros(m, k * c))   # learned slot bias B (init UNCONFIRMED; zeros as HF)
        self.norm = RMSNorm(c, eps, impl=impl)
        self._both = None                           # (tensor, wkv's address, wgate's address): _apply, _both_weights

    def _apply(self, fn, recurse=True):
        """nn.Module._apply (to, cuda, bfloat16, ...), then, on CUDA, wkv's and wgate's weights placed in one storage,
        wgate's rows right after wkv's, so that a projection without autograd runs both as one GEMM (project). They
        stay two Parameters (names, gradients, optimizer states, the same values); a weight later moved out of
        that storage (a new .data, FSDP2's shards) only turns the one-GEMM path off. On the CPU nothing moves."""
        super()._apply(fn, recurse)
        wk, wg = self.wkv.weight, self.wgate.weight
        if (wk.is_cuda and type(wk.data) is torch.Tensor and type(wg.data) is torch.Tensor and wk.dtype == wg.dtype
                and wk.device == wg.device and wk.shape[1:] == wg.shape[1:]):
            both = self._both_weights()                                     # still placed (a no-op move)
            if both is None:
                both = torch.cat([wk.detach(), wg.detach()])                  # (2 k c, d)
                wk.data, wg.data = both[: wk.shape[0]], both[wk.shape[0]:]
            self._both = (both, wk.data_ptr(), wg.data_ptr())
        else:
            self._both = None
        return self

    def _both_weights(self) -> torch.Tensor | None:
        """[wkv; wgate] (2 k c, d): the storage _apply placed both weights in, while both still lie there, else None.
        That tensor keeps the storage alive, so equal addresses mean the same memory."""
        b = self._both
        if b is None or self.wkv.weight.data_ptr() != b[1] or self.wgate.weight.data_ptr() != b[2]:
            return None
        return b[0]

    def project(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, Z) each (B, T, k*c), in fp32 (fp64 for fp64 inputs) whatever autocast says (docs §2.3). Z excludes ape.

        On bf16 operands (bf16 autocast on u's device in training, or u and both weights bf16 as in a bf16
        checkpoint) the GEMMs round u and the weights to bf16 and accumulate in fp32 with an fp32 result
        (layers.linear_f32): every product of two bf16 numbers is exact in fp32, so this is the spec's fp32
        computation on bf16-rounded operands up to the order of the fp32 sums, at tensor-core speed on CUDA.
        Without autograd on CUDA both are one GEMM over [wkv; wgate] (_apply), C and Z views of its (B, T, 2 k c)
        output: the same products, one launch fewer. Otherwise the operands are cast to fp32 (fp64 stays fp64)
        first."""
        wk, wg = self.wkv.weight, self.wgate.weight
        dev = u.device.type
        if ((torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16)
                or u.dtype == wk.dtype == wg.dtype == torch.bfloat16):
            if not torch.compiler.is_compiling() and not (                     # (no data_ptr under a trace)
                    torch.is_grad_enabled() and (u.requires_grad or wk.requires_grad or wg.requires_grad)):
                both = self._both_weights()
                if both is not None:
                    CZ = linear_f32(u, both)                                   # (B, T, 2 k c) fp32
                    return CZ[..., : wk.shape[0]], CZ[..., wk.shape[0]:]
            return linear_f32(u, wk), linear_f32(u, wg)
        ct = torch.promote_types(u.dtype, torch.float32)
        with torch.autocast(device_type=dev, enabled=False):
            C = F.linear(u.to(ct), wk.to(ct))
            Z = F.linear(u.to(ct), wg.to(ct))
        return C, Z

    def pool_norm(self, C: torch.Tensor, Z: torch.Tensor, with_ape: bool = True, prev=None) -> torch.Tensor:
        """C, Z (B, n, m, k*c) projections of n complete blocks (Z without ape when with_ape, else including it);
        prev (prev_C, prev_Z) (B, m, c) or None -> (B, n, c) entries RMSNorm_w(pool(C, Z + ape)), before RoPE."""
        return compressor_pool(C, Z, self.ape if with_ape else None, self.norm.weight, self.norm.eps, self.overlap,
                               *(prev if prev is not None else (None, None)), impl=self.impl)

    def rotate(self, x: torch.Tensor, rope, first_block: int = 0) -> torch.Tensor:
        """RoPE at position i*m of entry i (docs §2.3). x (B, n, c) normed entries of blocks first_block.. -> same."""
        n = x.shape[1]
        pos = (torch.arange(n, device=x.device) + first_block) * self.m
        return rope(x, pos) if n else x

    def forward(self, u: torch.Tensor, rope) -> torch.Tensor:
        """u (B, T, d) -> compressed entries (B, floor(T/m), c); trailing T mod m tokens are not used."""
        n = u.shape[1] // self.m
        C, Z = self.project(u if u.shape[1] == n * self.m else u[:, : n * self.m])   # (B, n*m, k*c) fp32
        C, Z = C.unflatten(1, (n, self.m)), Z.unflatten(1, (n, self.m))       # (B, n, m, k*c)
        if isinstance(rope, RotaryTable):     # the op rotates too: on the kernel path pool + RoPE are one launch
            return compressor_pool(C, Z, self.ape, self.norm.weight, self.norm.eps, self.overlap, impl=self.impl,
                                   cos=rope.cos, sin=rope.sin)
        return self.rotate(self.pool_norm(C, Z), rope)

    def step(self, u: torch.Tensor, state, p0: int) -> tuple[torch.Tensor, int]:
        """Stream the chunk u (B, T, d) at positions p0.. through the compressor state (docs §6.1-6.2).

        state: the cache's CompressorState, fp32 (kv, score incl. ape) rows; with overlap rows [0, m) hold the last
        complete block (its b series feeds the next entry) and rows [m, 2m) the incomplete current block, else m rows.
        Returns (entries (B, n_new, c) of the blocks completed in this chunk, after the RMSNorm and before RoPE
        (`rotate`); the index of the first of them) and leaves the state holding the new incomplete block (and the
        last complete one)."""
        m = self.m
        B, T, _ = u.shape
        C, Z = self.project(u)                                                 # (B, T, k*c) fp32
        pos = torch.arange(p0, p0 + T, device=u.device)
        Z = Z + self.ape.to(Z.dtype)[pos % m]                                  # the stored score includes ape
        r0 = p0 % m                                                            # tail rows already in the state
        cur = slice(m, 2 * m) if self.overlap else slice(0, m)
        C = torch.cat([state.kv[:, cur][:, :r0].to(C.dtype), C], 1)            # stream from the current block start
        Z = torch.cat([state.score[:, cur][:, :r0].to(Z.dtype), Z], 1)
        n_new, first = (r0 + T) // m, p0 // m
        Cb = C[:, : n_new * m].unflatten(1, (n_new, m))                        # (B, n_new, m, k*c)
        Zb = Z[:, : n_new * m].unflatten(1, (n_new, m))
        prev = None
        if self.overlap and first > 0 and n_new > 0:                           # b series of the last complete block
            prev = (state.kv[:, :m, :self.c], state.score[:, :m, :self.c])
        normed = self.pool_norm(Cb, Zb, with_ape=False, prev=prev)             # (B, n_new, c); Zb includes ape
        if self.overlap and n_new > 0:
            state.kv[:, :m], state.score[:, :m] = Cb[:, -1], Zb[:, -1]         # last complete block -> "previous"
        left = r0 + T - n_new * m                                              # rows of the new incomplete block
        state.kv[:, cur], state.score[:, cur] = 0.0, float("-inf")
        state.kv[:, cur.start:cur.start + left] = C[:, n_new * m:]
        state.score[:, cur.start:cur.start + left] = Z[:, n_new * m:]
        return normed, first
