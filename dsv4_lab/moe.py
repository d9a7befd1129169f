"""DeepSeekMoE as in V4 (docs §5): shared expert + routed experts, sqrt(softplus) router with an aux-loss-free
bias, hash routing in the first layers, SwiGLU clamping, and anticipatory routing (docs §10).

    x (B, T, d) = ffn_norm(u)
    s = score(W_g x)  (N, N_r) fp32, score = sqrt(softplus) | sigmoid                                   (docs §5.1.1-2)
    K = TopK(s + b)            score layers (layer >= n_hash_layers), b = e_score_correction_bias       (docs §5.1.3)
      = tid2eid[token id]      hash layers (layer < n_hash_layers), a fixed seeded table [V, K_r]      (docs §5.2)
    w_k = route_scale * s_k / sum_{k' in K} s_k'     from the UNBIASED scores, also in hash layers      (docs §5.1.4)
    y = sum_k E_k(x; w_k) + E_shared(x)        E = SwiGLU, w_k multiplies the intermediate before W2    (docs §5.3)

Clamp (docs §5.3): routed experts clip up to [-L, L] and gate to <= L (L = swiglu_limit, 0 = off); the shared
expert is not clamped (REF) unless shared_expert_clamp=True (HF-compat, docs/hf_parity.md 9c).

Aux-loss-free balancing (docs §5.1.5): the bias changes the selection only. Expert loads (tokens routed to each
expert) are counted in every training forward and accumulated; `on_train_step` applies
b_e += gamma * sign(mean load - load_e) (gamma = bias_update_speed; under-loaded experts go up) and resets the count;
under DDP the counts are all-reduced first, so every rank keeps the same bias.
Sequence-wise balance loss (docs §5.1.6, V3 form): alpha * sum_e f_e P_e per sequence, averaged over the batch,
recorded as _aux["balance_loss"] (score layers only: hash selections cannot be balanced by a loss).

Hash table (docs §5.2; the real hash is UNCONFIRMED): `balanced_tid2eid` deals a seeded random permutation of the
experts round-robin, K_r consecutive slots per token, so every token gets K_r distinct experts and every expert
serves floor or ceil(V K_r / N_r) token ids; then the rows are shuffled over token ids. Seed = hash_seed, layer.

Anticipatory routing (docs §10; no public implementation: this is our design, UNCONFIRMED details in App. D.4)
------------------------------------------------------------------------------------------------------------
Paper: at step t the features use theta_t but the routing indices come from theta_{t - Delta}; V4 fetches step t's
data at step t - Delta, runs a forward with the then-current weights and caches the indices. Used dynamically:
a loss-spike detector switches it on for a while, then training reverts to normal routing.

What we do, per score-routed MoE layer:
  * a shift register holds copies of this layer's router parameters (W_g, b) of the last Delta + 1 versions
    (non-persistent buffers (Delta+1, N_r, d) and (Delta+1, N_r), slot 0 = oldest, updated in place so a CUDA graph
    can replay the forward, docs/kernels.md §10); it is pushed in `on_train_step` after every optimizer step
    (parameters version t+1 after step t), so at the forward of step t slot 0 is exactly (W_g, b)_{t - Delta};
    the first push fills every slot, so early in training slot 0 is the first version pushed;
  * indices = TopK(score(W_g^{t-Delta} x) + b^{t-Delta}); weights = current scores gathered at those indices
    (renormalised, times route_scale), like hash routing: only the index choice is frozen, so the gate still
    learns and gradients are unchanged in form. Delta = 0 is exactly normal routing.
  * Why a router snapshot instead of the paper's full lagged forward: it needs no data prefetch and no second model
    copy (the training loop stays untouched), it is exact for the router parameters, and it isolates the mechanism
    the paper credits (routing decisions that cannot chase the current, possibly diverging, weights). It differs
    from the paper in one way: the router's input x is computed with the current upstream weights, not
    theta_{t - Delta}. The full variant would cost one extra forward per step (the paper reports ~20 % overhead).
  * modes: off (no snapshots, normal routing), always (on every step), auto (snapshots always kept; a loss
    > spike_factor x running median of the last 100 losses, after 10 steps of history, switches routing on for
    anticipatory_period steps, then off). The paper's "short rollback" is left to the training loop (not done).
  * overhead: wall-clock seconds spent on snapshots and lagged scoring are accumulated in `anticipatory_time_s`
    and reported as _aux["anticipatory_overhead_s"] (per forward) and "anticipatory_active" (0/1). Under a CUDA
    graph (cuda_graph=true) the forward's host time is not measured: the captured forward adds nothing to
    `anticipatory_time_s` and reports no "anticipatory_overhead_s" (replays run no Python); the snapshot pushes stay
    eager and are still counted. `routing_key(model)` (the active flags) is part of the graph's key.

Statistics for notebooks: `stats` (last forward: per-expert load, and with `probe = True` the max |pre-activation|
of the routed experts' gate/up branches and the fraction of clamped entries); metrics in _aux: "load_max_over_mean".
"""
from __future__ import annotations

import collections
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .kernels.swiglu import swiglu_packed
from .layers import SwiGLU


def balanced_tid2eid(vocab_size: int, n_experts: int, k: int, seed: int) -> torch.Tensor:
    """[V, k] int64 table: k distinct experts per token id, every expert used floor/ceil(V k / N) times."""
    if k > n_experts:
        raise ValueError(f"n_activated_experts = {k} is not allowed: at most n_routed_experts = {n_experts}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_experts, generator=g)
    slots = torch.arange(vocab_size * k).view(vocab_size, k) % n_experts      # k consecutive slots are distinct
    rows = perm[slots]
    return rows[torch.randperm(vocab_size, generator=g)].long()


def score_fn(logits: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    if kind == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"score_func = {kind!r} is not allowed: one of ('sqrtsoftplus', 'sigmoid')")


_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert GEMMs run in: the autocast dtype when autocast is on for x's device, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def grouped_linear(x: torch.Tensor, w: torch.Tensor, groups: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (M, k) rows sorted by group, w (G, n, k), groups (M,) each row's group, offs (G,) int32 cumulative row ends
    -> (M, n): row r of group g = x_r w_g^T.

    Compute dtype: `compute_dtype(x)` (x and w are cast to it; no copy when they are in it already). Paths:
      * `grouped_mm` (F.grouped_mm / torch._grouped_mm, one grouped GEMM) for bf16 (CUDA sm90+: the CUTLASS kernel,
        no host sync; opaque to torch.compile), and in eager mode also for fp32 / fp16 (CPU kernel; on CUDA torch's
        own per-group fallback, which reads offs on the host). Needs k and n multiples of 16 bytes.
      * otherwise a padded batched GEMM: rows scattered into a (G, M, k) buffer (M = every row could be in one
        group), one bmm, rows gathered back. Static shapes and no host sync (torch.compile's fp32 / fp64 path), at
        G times the FLOPs: for CPU-sized tests."""
    ct = compute_dtype(x)
    x, w = x.to(ct), w.to(ct)
    align = 16 // x.element_size()
    aligned = x.shape[1] % align == 0 and w.shape[1] % align == 0
    eager_ok = ct in (torch.float32, torch.float16) and not torch.compiler.is_compiling()
    if _GROUPED_MM is not None and aligned and (ct == torch.bfloat16 or eager_ok):
        return grouped_mm(x, w.transpose(-2, -1), offs, False)
    M, G = x.shape[0], w.shape[0]
    starts = offs.long() - torch.diff(offs.long(), prepend=offs.new_zeros(1).long())      # (G,) first row of each
    pos = torch.arange(M, device=x.device) - starts[groups]                                 # row within its group
    buf = x.new_zeros(G, M, x.shape[1]).index_put((groups, pos), x)                         # (G, M, k)
    return torch.bmm(buf, w.transpose(-2, -1))[groups, pos]                                 # (M, n)


# --- the grouped GEMM as one opaque op (docs §5.4) ----------------------------------------------------------
# CUTLASS's grouped GEMM (CUDA) reads each group's rows at offs[g-1] along the dynamic dimension (the rows M). When
# that dimension is the contiguous one of an operand (a row-major A^T in the weight gradient a_g^T b_g), every group
# must start on a 16-byte boundary, i.e. hold a multiple of 8 bf16 rows, and expert loads are not; the kernel then
# fails a device-side assert. Eager autograd hands it row-major rows, so the rows are strided and no such rule
# applies; but under torch.compile, Inductor may lay the operands of aten._grouped_mm out as it likes (a transposed
# view realised as a contiguous buffer). Wrapping the GEMM and both of its gradients in one custom op hides them from
# Inductor, and the op makes its row operands row-major itself: the layout is fixed in eager and compiled runs alike.

@torch.library.custom_op("dsv4_lab::grouped_mm", mutates_args=())
def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, rows_both: bool) -> torch.Tensor:
    """rows_both False: a (M, k) rows sorted by group, b (G, k, n) -> (M, n), row r of group g = a_r b_g.
    rows_both True: a (M, k) and b (M, n) both rows sorted by group -> (G, k, n), slice g = a_g^T b_g (the weight
    gradient). offs (G,) int32 cumulative row ends. a (and b when rows_both) are made row-major first."""
    a = a.contiguous()
    if rows_both:
        return _GROUPED_MM(a.t(), b.contiguous(), offs=offs)
    return _GROUPED_MM(a, b, offs=offs)


@grouped_mm.register_fake
def _(a, b, offs, rows_both):
    if rows_both:
        return a.new_empty(offs.shape[0], a.shape[1], b.shape[1])
    return a.new_empty(a.shape[0], b.shape[-1])


def _grouped_mm_setup(ctx, inputs, output):
    a, b, offs, rows_both = inputs
    if rows_both:
        raise NotImplementedError("dsv4_lab::grouped_mm with rows_both=True (a weight gradient) has no backward")
    ctx.save_for_backward(a, b, offs)


def _grouped_mm_backward(ctx, dy):
    """y = a b_g: da = dy b_g^T (rows by group), db_g = a_g^T dy_g (G, k, n)."""
    a, b, offs = ctx.saved_tensors
    da = grouped_mm(dy, b.transpose(-2, -1), offs, False) if ctx.needs_input_grad[0] else None
    db = grouped_mm(a, dy, offs, True) if ctx.needs_input_grad[1] else None
    return da, db, None, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


# --- the grouped dispatch's data movement (docs §5.4) ---------------------------------------------------------
# A routing of N tokens to K experts each is a permutation of the N K (token, slot) pairs: row r of the expert-sorted
# layout is slot order[r] = t K + k, i.e. token tok[r] = order[r] // K, and inv = order^-1 (slot -> row). So the
# dispatch x -> x[tok] and the combine rows -> sum_k rows[inv[t K + k]] are each other's adjoints: each one's
# backward is the other one (two gathers, no index_add / index_put: no atomics, no zero buffer, deterministic).

def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype, with no `.to` call when it is in dtype already: with torch 2.11, Dynamo's trace of an autograd
    Function whose forward returns a no-op `.to(dtype)` gives zero gradients behind it (docs/kernels.md §12)."""
    return t if t.dtype == dtype else t.to(dtype)


def _sum_rows(rows: torch.Tensor, inv: torch.Tensor, K: int, dtype: torch.dtype) -> torch.Tensor:
    """rows (N K, *r) expert-sorted -> (N, *r) in dtype: y_t = sum_k rows[inv[t K + k]], summed in fp32 at least
    (fp64 for fp64), k in slot order."""
    g = rows.index_select(0, inv)                                    # (N K, *r) in slot order t K + k
    if K == 1:
        return _cast(g, dtype)
    acc = torch.promote_types(torch.promote_types(rows.dtype, dtype), torch.float32)
    return _cast(g.view(-1, K, *rows.shape[1:]).sum(1, dtype=acc), dtype)


class _ToRows(torch.autograd.Function):
    """Dispatch: x (N, *r) -> (xc, rows): xc = x.to(dtype) (N, *r) (what the shared expert reads) and
    rows = xc[src] (N K, *r), src = tok. Backward: dx = _sum_rows of the row gradients + dxc, in x's dtype (each
    token's K row gradients and the shared expert's summed in fp32 at least, as separate casts would)."""

    @staticmethod
    def forward(ctx, x, src, inv, K: int, dtype: torch.dtype):
        ctx.save_for_backward(src, inv)
        ctx.K, ctx.x_dtype = K, x.dtype
        ctx.set_materialize_grads(False)                               # an unused xc: dxc None, not a zero tensor
        xc = _cast(x, dtype)
        return xc, xc.index_select(0, src)

    @staticmethod
    def backward(ctx, dxc, g):
        src, inv = ctx.saved_tensors
        dx = _sum_rows(g, inv, ctx.K, ctx.x_dtype) if g is not None else None
        if dxc is not None:                                            # fp32 (x's dtype) + the GEMM dtype
            dx = dxc.to(ctx.x_dtype) if dx is None else dx.add_(dxc)
        return dx, None, None, None, None


class _FromRows(torch.autograd.Function):
    """Combine: rows (N K, *r) -> y = _sum_rows(rows, inv, K, dtype) (+ extra (N, *r), the shared expert's output)
    in dtype. Backward: the gradient cast to the rows' dtype once, gathered for the rows (g[src]) and passed as is to
    extra when it has that dtype."""

    @staticmethod
    def forward(ctx, rows, src, inv, K: int, dtype: torch.dtype, extra: torch.Tensor | None = None):
        ctx.save_for_backward(src, inv)
        ctx.K, ctx.rows_dtype = K, rows.dtype
        ctx.extra_dtype = extra.dtype if extra is not None else None
        y = _sum_rows(rows, inv, K, dtype)
        return y if extra is None else _cast(y + extra, dtype)

    @staticmethod
    def backward(ctx, g):
        src, inv = ctx.saved_tensors
        gr = g.to(ctx.rows_dtype)
        dextra = None
        if ctx.extra_dtype is not None:
            dextra = gr if ctx.extra_dtype == ctx.rows_dtype else g.to(ctx.extra_dtype)
        return gr.index_select(0, src), None, None, None, None, dextra


class _StackWeights(torch.autograd.Function):
    """ws = [W_0, ..., W_{m-1}] each (n_i, k) -> cat along dim 0 in dtype, viewed (G, sum n_i / G, k): one copy and
    one cast per forward (not a stack per list, a cat, then a cast). Backward: the (G, n, k) gradient cast to the
    weights' dtype once, contiguous, and split into views, which AccumulateGrad keeps (no copy per expert)."""

    @staticmethod
    def forward(ctx, G: int, dtype: torch.dtype, *ws):
        ctx.w_dtype, ctx.sizes = ws[0].dtype, [w.shape[0] for w in ws]
        out = _cast(torch.cat(ws), dtype)
        return out.view(G, -1, out.shape[-1])

    @staticmethod
    def backward(ctx, g):
        if g.dtype != ctx.w_dtype or not g.is_contiguous():                      # one copy: cast and layout
            g = torch.empty(g.shape, dtype=ctx.w_dtype, device=g.device).copy_(g)
        return (None, None, *g.view(-1, g.shape[-1]).split(ctx.sizes))


class SpikeDetector:
    """loss > factor x median of the last `window` losses (after `min_history` losses) = a spike."""

    def __init__(self, factor: float, window: int = 100, min_history: int = 10):
        self.factor, self.min_history = factor, min_history
        self.losses: collections.deque = collections.deque(maxlen=window)

    def __call__(self, loss: float) -> bool:
        spike = (len(self.losses) >= self.min_history and
                 loss > self.factor * statistics.median(self.losses))
        self.losses.append(loss)
        return spike


class Router(nn.Module):
    """The gate (docs §5.1 / §5.2). weight [N_r, d] (fp32 math); e_score_correction_bias [N_r] (score layers, not
    trained by gradient: a Parameter with requires_grad=False so checkpoints and parameter counts carry it);
    tid2eid [V, K_r] int64 buffer (hash layers).

    Anticipatory routing (docs §10, module doc): snapshot_weight (Delta+1, N_r, d) and snapshot_bias (Delta+1, N_r),
    non-persistent buffers (not in state_dict; None unless a score layer with anticipatory != 'off' and Delta > 0),
    slot 0 = the oldest version, written in place by `push_snapshot`: fixed addresses, so a CUDA graph replays the
    lagged routing. Host state the forward reads: `anticipatory_active()` (in `routing_key`, the graph's key) and
    the "no snapshot yet" flag (set by the first push: the first training forward or on_train_step, so a graph
    captured after eager warm-up steps never records a push). `_fwd_overhead` /
    `anticipatory_time_s` time the lagged scoring on the host in eager forwards only: a forward being captured into
    a CUDA graph is not timed (`_fwd_overhead` = None), and replays run no Python."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.n_experts, self.k = cfg.n_routed_experts, cfg.n_activated_experts
        self.is_hash = layer_idx < cfg.n_hash_layers
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.d_model))
        if self.is_hash:
            self.register_buffer("tid2eid", balanced_tid2eid(cfg.vocab_size, cfg.n_routed_experts,
                                                             cfg.n_activated_experts, cfg.hash_seed * 1000 + layer_idx))
        else:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts), requires_grad=False)
        # anticipatory routing state (score layers)
        self.anticipatory = cfg.anticipatory if not self.is_hash else "off"
        self.delta = cfg.anticipatory_delta
        keep = self.anticipatory != "off" and self.delta > 0
        n, d = cfg.n_routed_experts, cfg.d_model
        self.register_buffer("snapshot_weight", torch.zeros(self.delta + 1, n, d) if keep else None,
                             persistent=False)                                  # (Delta+1, N_r, d), slot 0 oldest
        self.register_buffer("snapshot_bias", torch.zeros(self.delta + 1, n) if keep else None,
                             persistent=False)                                  # (Delta+1, N_r)
        self._has_snapshot = False
        self.active_until = -1                   # auto mode: anticipatory routing on while step < active_until
        self.step = 0
        self.anticipatory_time_s = 0.0
        self._fwd_overhead: float | None = 0.0
        self.detector = SpikeDetector(cfg.spike_factor)
        self.reset_parameters_v4()

    @torch.no_grad()
    def reset_parameters_v4(self):
        nn.init.normal_(self.weight, 0.0, self.cfg.init_std)
        if not self.is_hash:
            self.e_score_correction_bias.zero_()
        self._has_snapshot = False                             # the next push fills every slot

    def scores(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        ct = torch.promote_types(x.dtype, torch.float32)
        w = self.weight if weight is None else weight
        with torch.autocast(x.device.type, enabled=False):                         # fp32 logits under autocast too
            return score_fn(F.linear(x.to(ct), w.to(ct)), self.cfg.score_func)    # (N, N_r)  docs §5.1.1

    def anticipatory_active(self) -> bool:
        if self.anticipatory == "always":
            return True
        return self.anticipatory == "auto" and self.step < self.active_until

    @torch.no_grad()
    def _lagged_indices(self, x: torch.Tensor) -> torch.Tensor:
        if self.delta == 0:                                    # Delta = 0: the current parameters (exactly)
            w, b = self.weight, self.e_score_correction_bias
        else:
            if not self._has_snapshot:
                self.push_snapshot()
            w, b = self.snapshot_weight[0], self.snapshot_bias[0]                   # (N_r, d), (N_r,)
        return torch.topk(self.scores(x, w) + b.to(torch.promote_types(x.dtype, torch.float32)), self.k,
                          dim=-1).indices

    @torch.no_grad()
    def push_snapshot(self):
        """(W_g, b) now into the last slot after shifting slots[:-1] <- slots[1:]; the first push (after creation
        or reset_parameters_v4) fills every slot. In place: the buffers keep their addresses."""
        if self.snapshot_weight is None:                       # Delta = 0 or anticipatory off: no snapshots
            return
        w = self.weight.detach()
        w = w.full_tensor() if hasattr(w, "full_tensor") else w    # a sharded (fsdp2) weight: every rank gathers it
        b = self.e_score_correction_bias.detach()
        if not self._has_snapshot:
            self.snapshot_weight.copy_(w)                      # broadcast over the Delta+1 slots
            self.snapshot_bias.copy_(b)
            self._has_snapshot = True
            return
        for i in range(self.delta):                            # low to high: slot i+1 is read before it is written
            self.snapshot_weight[i].copy_(self.snapshot_weight[i + 1])
            self.snapshot_bias[i].copy_(self.snapshot_bias[i + 1])
        self.snapshot_weight[-1].copy_(w)
        self.snapshot_bias[-1].copy_(b)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None):
        """x (N, d), input_ids (N,) -> weights (N, K) fp32, indices (N, K) int64, scores (N, N_r) fp32."""
        s = self.scores(x)
        self._fwd_overhead = 0.0
        if self.is_hash:
            if input_ids is None:
                raise ValueError(f"layer {self.layer_idx} is hash-routed (n_hash_layers={self.cfg.n_hash_layers}) "
                                 "and needs input_ids")
            idx = self.tid2eid[input_ids.reshape(-1)].long()
        elif self.anticipatory != "off" and self.anticipatory_active():
            t0 = time.perf_counter()
            idx = self._lagged_indices(x)
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                self._fwd_overhead = None                      # a graph capture: replays run no Python to time
            else:
                self._fwd_overhead = time.perf_counter() - t0
                self.anticipatory_time_s += self._fwd_overhead
        else:
            with torch.no_grad():
                idx = torch.topk(s + self.e_score_correction_bias.to(s.dtype), self.k, dim=-1).indices
        w = s.gather(1, idx)
        w = w / w.sum(-1, keepdim=True) * self.cfg.route_scale                     # bias never enters the weights
        return w, idx, s

    def after_step(self, step: int, loss: float) -> None:
        """Called by MoE.on_train_step after the bias update: spike detection and the snapshot of version step+1."""
        self.step = step + 1                                   # the next forward is step + 1
        if self.anticipatory == "off" or self.is_hash:
            return
        t0 = time.perf_counter()
        if self.anticipatory == "auto" and self.detector(loss):
            self.active_until = self.step + self.cfg.anticipatory_period
        self.push_snapshot()
        self.anticipatory_time_s += time.perf_counter() - t0


class MoE(nn.Module):
    """The FFN sub-layer `ffn(x, input_ids)` for ffn="moe" (docs §5). Experts are a ModuleList of SwiGLU (the state
    dict keeps one module per expert); moe_dispatch="grouped" stacks their weights per forward for two grouped
    GEMMs (docs §5.4), "loop" calls them one by one (the reference)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        q_routed = {"none": None, "fp8": "fp8", "fp4": "fp4"}[cfg.quant]         # QAT roles (docs §8.2)
        q_shared = None if cfg.quant == "none" else "fp8"
        self.gate = Router(cfg, layer_idx)
        self.experts = nn.ModuleList(SwiGLU(cfg.d_model, cfg.moe_inter_dim, cfg.swiglu_limit, q_routed, cfg.kernels)
                                     for _ in range(cfg.n_routed_experts))
        self.shared_expert = None
        if cfg.n_shared_experts > 0:
            self.shared_expert = SwiGLU(cfg.d_model, cfg.n_shared_experts * cfg.moe_inter_dim,
                                        cfg.swiglu_limit if cfg.shared_expert_clamp else 0.0, q_shared, cfg.kernels)
        self.register_buffer("load_accum", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.probe = False
        self.stats: dict = {}
        self._aux: dict = {}

    # --- the aux-loss-free bias (docs §5.1.5) ---------------------------------------------------------------
    @torch.no_grad()
    def update_bias(self) -> None:
        if self.gate.is_hash or self.cfg.bias_update_speed == 0:
            return
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():        # global loads: every rank keeps the same bias
            dist.all_reduce(self.load_accum)
        if self.load_accum.sum() == 0:
            return
        load = self.load_accum
        self.gate.e_score_correction_bias += self.cfg.bias_update_speed * torch.sign(load.mean() - load)
        self.load_accum.zero_()

    def on_train_step(self, step: int, loss: float) -> None:
        """After every optimizer step (training loop): bias update, then the router's snapshot / spike detector."""
        self.update_bias()
        self.gate.after_step(step, loss)

    # --- sequence-wise balance loss (docs §5.1.6) -----------------------------------------------------------
    def balance_loss(self, scores: torch.Tensor, idx: torch.Tensor, B: int, T: int) -> torch.Tensor:
        Nr, K = self.cfg.n_routed_experts, self.cfg.n_activated_experts
        chosen = torch.zeros(B * T, Nr, device=scores.device, dtype=scores.dtype).scatter_(1, idx, 1.0)
        f = chosen.view(B, T, Nr).sum(1) * (Nr / (K * T))                            # (B, N_r)
        p = (scores / scores.sum(-1, keepdim=True)).view(B, T, Nr).mean(1)          # (B, N_r)
        return self.cfg.balance_loss_weight * (f * p).sum(-1).mean()

    # --- forward --------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        w, idx, s = self.gate(flat, input_ids)                                     # (N, K), (N, K), (N, N_r)
        plan = self.sort_by_expert(idx)                                            # grp, order, bounds
        if self.cfg.moe_dispatch == "loop":
            y = self._routed_loop(flat, w, idx)
            if self.shared_expert is not None:
                y = y + self.shared_expert(flat)
        else:
            y = self._routed_grouped(flat, w, idx, plan, with_shared=True)
        with torch.no_grad():                      # per-expert loads from the sorted ids (bincount: a host sync)
            bounds = plan[2]
            load = (bounds[1:] - bounds[:-1]).to(self.load_accum.dtype)            # (N_r,) tokens per expert
        if self.training and not self.gate.is_hash:
            self.load_accum += load
            if self.cfg.balance_loss_weight > 0 and torch.is_grad_enabled():
                self._aux["balance_loss"] = self.balance_loss(s, idx, B, T)
        self._aux["load_max_over_mean"] = load.max() / load.mean()                 # 0-d tensor: no host sync
        if self.gate.anticipatory != "off":
            self._aux["anticipatory_active"] = float(self.gate.anticipatory_active())
            if self.gate._fwd_overhead is not None:            # None: captured into a CUDA graph, not timed
                self._aux["anticipatory_overhead_s"] = self.gate._fwd_overhead
        self.stats = {"load": load, "indices": idx.detach()}
        if self.probe:
            self.stats.update(self._activation_stats(flat.detach(), idx))
        return y.view(B, T, d)

    def sort_by_expert(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """idx (N, K) -> grp (N K,) the expert ids sorted (stable), order (N K,) the slot t K + k of each sorted row,
        bounds (N_r + 1,) int32 the first row of each expert (bounds[N_r] = N K; expert e has rows bounds[e] to
        bounds[e+1] - 1). One sort and one searchsorted: no host sync, static shapes (docs §5.4)."""
        grp, order = torch.sort(idx.flatten(), stable=True)
        e = torch.arange(self.cfg.n_routed_experts + 1, device=idx.device, dtype=grp.dtype)
        return grp, order, torch.searchsorted(grp, e, out_int32=True)

    def _routed_loop(self, flat: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The readable reference: one SwiGLU call per expert that got tokens (a host sync per forward)."""
        y = torch.zeros_like(flat)
        for e in torch.unique(idx).tolist():                                       # experts that got tokens
            tok, kpos = torch.where(idx == e)
            y.index_add_(0, tok, self.experts[e](flat[tok], w[tok, kpos, None]).to(y.dtype))
        return y

    def _routed_grouped(self, flat: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, plan: tuple | None = None,
                        with_shared: bool = False) -> torch.Tensor:
        """Sort the N K (token, expert) pairs by expert, then one grouped GEMM for gate/up and one for down:

            grp, order, bounds = sort_by_expert(idx)   row j = slot order_j = t K + k (token t, expert grp_j)
            offs  = bounds[1:]                         (N_r,) int32, end of each expert's rows
            h     = [W1_e; W3_e] x_t  for the rows j of expert e       (N K, 2 I)  grouped GEMM
            y_t   = sum_k W2_e (w_j SwiGLU_clamp(h_j))                  (N K, d) -> (N, d), the K rows of token t

        Data movement (docs §5.4): x is cast to the GEMM dtype once (N, d) and its rows gathered (N K, d); the
        K rows of each token are gathered back through the inverse permutation and summed in fp32 (an adjoint pair of
        gathers, no index_add / index_put); the SwiGLU writes the GEMM dtype; the expert weights are stacked by one
        cat and one cast per GEMM. Same math as `_routed_loop` (weights before W2, clamp on the routed experts, QAT
        fake-quantisers per row / per expert weight, applied in x's dtype as before); shapes are static and no value
        leaves the device, so torch.compile keeps one graph. An expert with no tokens gets a zero weight gradient
        (the loop leaves it None). with_shared: add the shared expert's output (`SwiGLU.forward_fused`, on the same cast
        of x)."""
        N, K = idx.shape
        G = self.cfg.n_routed_experts
        grp, order, bounds = self.sort_by_expert(idx) if plan is None else plan
        offs = bounds[1:]                                                          # (N_r,) int32 row ends
        tok = order // K                                                           # (N K,) token of each row
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        ct = compute_dtype(flat)                                                   # the GEMMs' dtype
        q = self.experts[0].w1.quant
        io = flat.dtype if q else ct                   # QAT fake-quantises the rows in x's dtype, as the loop does
        ws = _ToRows.apply(w.flatten(), order, inv, 1, w.dtype)[1]                 # (N K,) routing weights
        w13 = _StackWeights.apply(G, ct, *[self._w(m) for e in self.experts for m in (e.w1, e.w3)])  # (N_r, 2I, d)
        w2 = _StackWeights.apply(G, ct, *[self._w(e.w2) for e in self.experts])   # (N_r, d, I)
        xc, xs = _ToRows.apply(flat, tok, inv, K, io)                              # (N, d), (N K, d)
        if q:
            from .quant.qat import ACT_BLOCK, fake_quant_fp8
            xs = fake_quant_fp8(xs, ACT_BLOCK)
        h = grouped_linear(xs, w13, grp, offs)                                     # (N K, 2I) = [gate | up] in ct
        # SwiGLU in fp32 at least, the routing weight before W2; packed: its gradient comes back as one (N K, 2I)
        h = swiglu_packed(h, self.experts[0].limit, ws[:, None], out_dtype=io, impl=self.cfg.kernels)
        if q:
            h = fake_quant_fp8(h, ACT_BLOCK)
        out = grouped_linear(h, w2, grp, offs)                                     # (N K, d) in ct
        shared = (self.shared_expert.forward_fused(xc)                                              # (N, d)
                  if with_shared and self.shared_expert is not None else None)
        return _FromRows.apply(out, tok, inv, K, flat.dtype, shared)               # (N, d) routed (+ shared)

    @staticmethod
    def _w(lin: nn.Module) -> torch.Tensor:
        """An expert weight as its forward uses it (QAT fake-quantised when the layer has a quant role)."""
        if lin.quant:
            from .quant.qat import qat_weight
            return qat_weight(lin.weight, lin.quant)
        return lin.weight

    @torch.no_grad()
    def _activation_stats(self, flat: torch.Tensor, idx: torch.Tensor) -> dict:
        """max |gate/up pre-activation| over routed experts (before the clamp) and the fraction clamped."""
        L = self.cfg.swiglu_limit
        amax, n_clamped, n_total = 0.0, 0, 0
        for e in torch.unique(idx).tolist():
            tok = torch.where(idx == e)[0]
            g, u = self.experts[e].w1(flat[tok]).float(), self.experts[e].w3(flat[tok]).float()
            amax = max(amax, g.abs().max().item(), u.abs().max().item())
            if L > 0:
                n_clamped += int((g > L).sum() + (u.abs() > L).sum())
            n_total += g.numel() + u.numel()
        out = {"max_preact": amax, "clamp_frac": n_clamped / max(n_total, 1)}
        if self.shared_expert is not None:
            g, u = self.shared_expert.w1(flat).float(), self.shared_expert.w3(flat).float()
            out["shared_max_preact"] = max(g.abs().max().item(), u.abs().max().item())
        self._aux["max_preact"] = amax
        return out


def routing_key(model: nn.Module) -> tuple:
    """`anticipatory_active()` of every score-routed Router with anticipatory != 'off', in module order (() when
    none): the routing host state a forward reads, part of a CUDA graph's key (cuda_graph.py, docs/kernels.md §10).
    After step t's on_train_step it is what the forward of step t+1 sees."""
    return tuple(m.anticipatory_active() for m in model.modules()
                 if isinstance(m, Router) and not m.is_hash and m.anticipatory != "off")


def set_moe_probe(model: nn.Module, on: bool = True) -> None:
    for m in model.modules():
        if isinstance(m, MoE):
            m.probe = on


def router_stats(model: nn.Module) -> list[dict]:
    """Per MoE layer (forward order): name, hash or not, last-forward load (N_r,), bias, activation stats."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, MoE) and m.stats:
            out.append({"name": name, "hash": m.gate.is_hash, **m.stats,
                        "bias": None if m.gate.is_hash else m.gate.e_score_correction_bias.detach().clone()})
    return out
