"""DeepSeekMoE (docs §5) and anticipatory routing (docs §10): routing against per-token references, the bias
changes selection only, hash routing, clamp placement, bias update, balance loss, QAT roles, lagged routing."""

import pytest
import torch
import torch.nn.functional as F

from dsv4_lab import DSV4LM, ModelConfig
from dsv4_lab.ffn import DenseFFN
from dsv4_lab.moe import MoE, balanced_tid2eid, router_stats, set_moe_probe
from numerics import close_err


def cfg_(**kw):
    base = dict(ffn="moe", d_model=32, n_routed_experts=8, n_activated_experts=2, moe_inter_dim=16, vocab_size=64)
    return ModelConfig.from_preset("tiny-dense", **{**base, **kw})


def swiglu_ref(ex, x, limit):
    g, u = x @ ex.w1.weight.T, x @ ex.w3.weight.T
    if limit > 0:
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    return (F.silu(g) * u) @ ex.w2.weight.T


def moe_ref(moe, x, ids):
    """Per-token loop: scores, top-k on score + bias (or the hash table), weights from unbiased scores."""
    cfg, g = moe.cfg, moe.gate
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = g.weight @ x[t]
        s = F.softplus(logits).sqrt() if cfg.score_func == "sqrtsoftplus" else torch.sigmoid(logits)
        if g.is_hash:
            sel = g.tid2eid[ids[t]].tolist()
        else:
            sel = sorted(range(cfg.n_routed_experts), key=lambda e: -(s[e] + g.e_score_correction_bias[e]).item())
            sel = sel[: cfg.n_activated_experts]
        w = torch.stack([s[e] for e in sel])
        w = w / w.sum() * cfg.route_scale
        for e, we in zip(sel, w):
            out[t] += we * swiglu_ref(moe.experts[e], x[t:t + 1], cfg.swiglu_limit)[0]
        if moe.shared_expert is not None:
            out[t] += swiglu_ref(moe.shared_expert, x[t:t + 1], moe.shared_expert.limit)[0]
    return out


REF_VARIANTS = [dict(), dict(score_func="sigmoid", route_scale=2.5), dict(n_hash_layers=1), dict(n_shared_experts=0)]


def variant_id(kw):
    return ",".join(f"{k}={v}" for k, v in kw.items()) or "base"


def check_per_token_reference(kw: dict, seed: int = 0):
    """[(name, error, tolerance)]: MoE layer vs the per-token loop (allclose atol 1e-5, rtol 1e-5): fp32 outputs
    |y| ~ 0.1 from dot products of length <= 32 in another order, a few u32 x |y| = 1e-8; the bar is for the
    selection: top-k of score + bias with no ties closer than the fp32 reorder of the scores."""
    torch.manual_seed(seed)
    moe = MoE(cfg_(**kw), 0)
    with torch.no_grad():
        if not moe.gate.is_hash:
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    x, ids = torch.randn(2, 9, 32), torch.randint(0, 64, (2, 9))
    y = moe(x, ids)
    return [(f"MoE vs per-token {variant_id(kw)} (allclose)",
             *close_err(y.view(-1, 32), moe_ref(moe, x.view(-1, 32), ids.view(-1)), 1e-5))]


@pytest.mark.parametrize("kw", REF_VARIANTS, ids=variant_id)
def test_moe_matches_per_token_reference(kw):
    for what, err, tol in check_per_token_reference(kw):
        assert err <= tol, (what, err, tol)


def test_bias_changes_selection_never_weights():
    torch.manual_seed(0)
    moe = MoE(cfg_(), 3)
    x = torch.randn(20, 32)
    w0, i0, s = moe.gate(x, None)
    with torch.no_grad():
        moe.gate.e_score_correction_bias[5] = 100.0               # expert 5 is picked by every token
    w1, i1, s1 = moe.gate(x, None)
    assert (i1 == 5).any(-1).all() and not torch.equal(i0, i1)
    assert torch.equal(s, s1)                                     # scores unbiased
    assert torch.allclose(w1, s.gather(1, i1) / s.gather(1, i1).sum(-1, keepdim=True) * moe.cfg.route_scale)
    assert torch.allclose(w1.sum(-1), torch.full((20,), moe.cfg.route_scale))


def test_hash_table_deterministic_distinct_balanced():
    V, N, K = 101, 8, 3
    t = balanced_tid2eid(V, N, K, seed=7)
    assert torch.equal(t, balanced_tid2eid(V, N, K, seed=7))
    assert not torch.equal(t, balanced_tid2eid(V, N, K, seed=8))
    assert t.shape == (V, K) and t.dtype == torch.int64
    assert all(len(set(r)) == K for r in t.tolist())
    counts = torch.bincount(t.flatten(), minlength=N)
    assert counts.max() - counts.min() <= 1 and counts.sum() == V * K


def test_hash_routing_ignores_input_and_bias():
    torch.manual_seed(0)
    model = DSV4LM(cfg_(n_hash_layers=1, layer_types=["dense"] * 2))
    g0, g1 = model.blocks[0].ffn.gate, model.blocks[1].ffn.gate
    assert g0.is_hash and not g1.is_hash and not hasattr(g0, "e_score_correction_bias")
    assert not torch.equal(g0.tid2eid, DSV4LM(cfg_(n_hash_layers=2, layer_types=["dense"] * 2)).blocks[1].ffn.gate.tid2eid)
    ids = torch.randint(0, 64, (10,))
    _, idx_a, _ = g0(torch.randn(10, 32), ids)
    _, idx_b, _ = g0(torch.randn(10, 32) * 5, ids)
    assert torch.equal(idx_a, idx_b) and torch.equal(idx_a, g0.tid2eid[ids])
    assert "blocks.0.ffn.gate.tid2eid" in model.state_dict()           # persistent: checkpoints carry the table


@pytest.mark.parametrize("shared_clamp", [False, True])
def test_clamp_only_on_routed_experts_unless_hf_flag(shared_clamp):
    torch.manual_seed(0)
    moe = MoE(cfg_(shared_expert_clamp=shared_clamp, swiglu_limit=10.0), 3)
    with torch.no_grad():
        for p in moe.parameters():
            if p.ndim == 2 and p is not moe.gate.weight:
                p.mul_(60.0)
    x = torch.randn(12, 32)
    set_moe_probe(moe, True)
    y = moe(x.view(1, 12, 32))
    assert moe.stats["max_preact"] > 10 and moe.stats["shared_max_preact"] > 10 and moe.stats["clamp_frac"] > 0
    assert moe.experts[0].limit == 10.0 and moe.shared_expert.limit == (10.0 if shared_clamp else 0.0)
    ref = moe_ref(moe, x, None)
    assert (y.view(12, 32) - ref).abs().max() / ref.abs().max() < 1e-5
    # the clamp acts: removing it from the routed experts changes the output
    for e in moe.experts:
        e.limit = 0.0
    assert (moe(x.view(1, 12, 32)) - y).abs().max() > 1.0


def test_dense_ffn_is_plain_swiglu():
    cfg = ModelConfig.from_preset("tiny-dense")
    f = DenseFFN(cfg)
    x = torch.randn(3, 5, cfg.d_model) * 50
    assert torch.allclose(f(x), swiglu_ref(f.mlp, x, 0.0), atol=1e-4)


def test_bias_update_rule_and_only_in_training():
    torch.manual_seed(0)
    moe = MoE(cfg_(bias_update_speed=0.01), 3)
    x = torch.randn(1, 40, 32)
    moe.eval()
    moe(x)
    moe.on_train_step(0, 1.0)
    assert moe.gate.e_score_correction_bias.abs().sum() == 0      # eval forwards count nothing
    moe.train()
    moe(x)
    moe(x)
    load = moe.load_accum.clone()
    assert load.sum() == 2 * 40 * 2
    moe.on_train_step(1, 1.0)
    b = moe.gate.e_score_correction_bias
    expect = 0.01 * torch.sign(load.mean() - load)
    assert torch.allclose(b, expect) and (b[load > load.mean()] < 0).all() and (b[load < load.mean()] > 0).all()
    assert moe.load_accum.sum() == 0
    assert not moe.gate.e_score_correction_bias.requires_grad


def test_sequence_balance_loss_v3_form():
    torch.manual_seed(0)
    cfg = cfg_(balance_loss_weight=0.3)
    moe = MoE(cfg, 3).train()
    x = torch.randn(2, 7, 32)
    moe(x)
    loss = moe._aux["balance_loss"]
    Nr, K, T = 8, 2, 7
    ref = 0.0
    for b in range(2):
        s = F.softplus(x[b] @ moe.gate.weight.T).sqrt()
        idx = torch.topk(s, K, -1).indices
        f = torch.zeros(Nr)
        for t in range(T):
            for e in idx[t].tolist():
                f[e] += Nr / (K * T)
        P = (s / s.sum(-1, keepdim=True)).mean(0)
        ref += 0.3 * (f * P).sum() / 2
    assert torch.allclose(loss, ref, rtol=1e-5)
    loss.backward()
    assert moe.gate.weight.grad.abs().sum() > 0
    off = MoE(cfg_(balance_loss_weight=0.0), 3).train()
    off(x)
    assert "balance_loss" not in off._aux


def test_qat_roles():
    fp4 = MoE(cfg_(quant="fp4"), 3)
    assert fp4.experts[0].w1.quant == "fp4" and fp4.experts[0].w2.quant == "fp4" and fp4.shared_expert.w1.quant == "fp8"
    fp8 = MoE(cfg_(quant="fp8"), 3)
    assert fp8.experts[0].w3.quant == "fp8" and fp8.shared_expert.w2.quant == "fp8"
    none = MoE(cfg_(), 3)
    assert none.experts[0].w1.quant is None and none.shared_expert.w1.quant is None


def _train_steps(moe, xs, lr=0.5, seed=0):
    """A fake training loop: forward, SGD step on the gate with a random direction, hook. Returns routing indices."""
    g = torch.Generator().manual_seed(seed)
    idxs = []
    for step, x in enumerate(xs):
        moe(x)
        idxs.append(moe.stats["indices"].clone())
        with torch.no_grad():
            moe.gate.weight.add_(torch.randn(moe.gate.weight.shape, generator=g) * lr)
        moe.on_train_step(step, 1.0)
    return idxs


def test_anticipatory_delta_zero_equals_normal_routing():
    torch.manual_seed(0)
    xs = [torch.randn(1, 16, 32) for _ in range(4)]
    a = MoE(cfg_(), 3).train()
    b = MoE(cfg_(anticipatory="always", anticipatory_delta=0), 3).train()
    b.load_state_dict(a.state_dict())
    ia, ib = _train_steps(a, xs), _train_steps(b, xs)
    assert all(torch.equal(p, q) for p, q in zip(ia, ib))
    assert torch.equal(a(xs[0]), b(xs[0]))


def test_anticipatory_routes_with_the_old_parameters():
    torch.manual_seed(0)
    delta = 2
    moe = MoE(cfg_(anticipatory="always", anticipatory_delta=delta, bias_update_speed=0.05), 3).train()
    xs = [torch.randn(1, 16, 32) for _ in range(6)]
    g = torch.Generator().manual_seed(1)
    versions = []                                               # (W, b) used by the forward of each step
    for step, x in enumerate(xs):
        versions.append((moe.gate.weight.detach().clone(), moe.gate.e_score_correction_bias.detach().clone()))
        moe(x)
        W, b = versions[max(step - delta, 0)]
        flat = x.view(-1, 32)
        expect = torch.topk(F.softplus(flat @ W.T).sqrt() + b, 2, -1).indices
        assert torch.equal(moe.stats["indices"].sort(-1).values, expect.sort(-1).values), step
        # weights: current scores at those indices
        s = F.softplus(flat @ moe.gate.weight.T).sqrt()
        w, idx, _ = moe.gate(flat, None)
        assert torch.allclose(w, s.gather(1, idx) / s.gather(1, idx).sum(-1, keepdim=True) * moe.cfg.route_scale)
        with torch.no_grad():
            moe.gate.weight.add_(torch.randn(moe.gate.weight.shape, generator=g) * 0.5)
        moe.on_train_step(step, 1.0)
    # with current parameters the picks would differ at some step (the test can fail)
    x = xs[-1].view(-1, 32)
    now = torch.topk(F.softplus(x @ moe.gate.weight.T).sqrt() + moe.gate.e_score_correction_bias, 2, -1).indices
    moe(xs[-1])
    assert not torch.equal(now.sort(-1).values, moe.stats["indices"].sort(-1).values)
    assert moe.gate.anticipatory_time_s > 0 and moe._aux["anticipatory_active"] == 1.0


def test_anticipatory_auto_switches_on_after_a_spike_then_off():
    moe = MoE(cfg_(anticipatory="auto", anticipatory_delta=1, anticipatory_period=3, spike_factor=1.5), 3).train()
    x = torch.randn(1, 8, 32)
    active = []
    losses = [2.0] * 12 + [5.0] + [2.0] * 5
    for step, loss in enumerate(losses):
        moe(x)
        active.append(moe._aux["anticipatory_active"])
        moe.on_train_step(step, loss)
    # the spike is at step 12; routing is lagged for steps 13, 14, 15
    assert active == [0.0] * 13 + [1.0] * 3 + [0.0] * 2


def test_router_stats_and_model_level_on_train_step():
    torch.manual_seed(0)
    model = DSV4LM(cfg_(layer_types=["dense"] * 2, n_hash_layers=1)).train()
    ids = torch.randint(0, 64, (2, 10))
    out = model(ids, ids.roll(-1, 1))
    assert "balance_loss" in out.aux and any(k.endswith("load_max_over_mean") for k in out.aux)
    st = router_stats(model)
    assert [s["hash"] for s in st] == [True, False] and all(s["load"].sum() == 2 * 10 * 2 for s in st)
    out.loss.backward()
    assert model.blocks[1].ffn.gate.weight.grad is not None
    for m in model.modules():
        if hasattr(m, "on_train_step"):
            m.on_train_step(0, out.loss.item())
    assert model.blocks[1].ffn.gate.e_score_correction_bias.abs().sum() > 0


# --- grouped dispatch (tokens sorted by expert, grouped GEMMs) against the per-expert loop ----------------------------
# Error model: in fp64 the grouped path and the per-token fp64 reference below differ only in summation order
# (|diff| ~ 1e-15 max|y|; FP8 fake-quantisers round the same fp64 values, a flip needs a value within ~1e-15 of a
# rounding boundary). An fp32 run against the fp64 reference: each output chains two dot products of lengths d and I
# (gamma_k <= k u, u = 2^-24) through SwiGLU (|silu'| <= 1.1) and sums K + 1 <= 3 terms of similar size, so
# |err| <= 10 (d + I) u max|y| with room to spare.
U32 = 2.0 ** -24


def routed_ref(moe, flat, w, idx):
    """Per token, in the inputs' dtype: sum_k w_k W2_e (SiLU(clamp(W1_e x)) * clamp(W3_e x)), QAT as the layer's role."""
    from dsv4_lab.quant.qat import ACT_BLOCK, fake_quant_fp8, qat_weight
    q, L = moe.experts[0].w1.quant, moe.experts[0].limit
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for k in range(idx.shape[1]):
            ex = moe.experts[int(idx[t, k])]
            W1, W3, W2 = (qat_weight(m.weight, q) if q else m.weight for m in (ex.w1, ex.w3, ex.w2))
            x = fake_quant_fp8(flat[t:t + 1], ACT_BLOCK) if q else flat[t:t + 1]
            g, u = x @ W1.T, x @ W3.T
            if L > 0:
                g, u = g.clamp(max=L), u.clamp(-L, L)
            h = F.silu(g) * u * w[t, k]
            out[t] += ((fake_quant_fp8(h, ACT_BLOCK) if q else h) @ W2.T)[0]
    return out


def _grads(moe, *ts):
    """Gradients of the routed experts' weights (None -> 0: the loop leaves experts without tokens untouched)."""
    out = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in moe.experts.parameters()]
    return out + [t.grad.clone() for t in ts]


def _run(moe, fn, flat, w, idx):
    moe.zero_grad(set_to_none=True)
    flat, w = flat.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = fn(flat, w, idx)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)).sum().backward()
    return y.detach(), _grads(moe, flat, w)


def _rel(a, b):
    """max |a - b| / max |b| in fp64 (the scale of _close's bound)."""
    return ((a.double() - b.double()).abs().max() / max(b.double().abs().max(), 1e-30)).item()


def _close(a, b, tol):
    return (a.double() - b.double()).abs().max() <= tol * max(b.double().abs().max(), 1e-30)


GROUPED_CASES = ["default", "one_token", "empty_experts", "all_one_expert", "fp8", "unaligned", "no_clamp", "hash"]


def check_grouped_dispatch(case: str, seed: int = 0):
    """[(name, error, tolerance)]: grouped dispatch (fp64, fp32) and the fp32 loop vs the fp64 per-token reference,
    outputs and every gradient, relative to the reference's max (error model above)."""
    torch.manual_seed(seed)
    kw = dict(n_routed_experts=8, n_activated_experts=2, swiglu_limit=0.5)
    d, N, layer = 32, 10, 3
    if case == "empty_experts":
        kw.update(n_routed_experts=16)
        N = 3                                               # at most 6 of 16 experts get a token
    if case == "one_token":
        N = 1
    if case == "fp8":
        kw.update(quant="fp8")
    if case == "no_clamp":
        kw.update(swiglu_limit=0.0)
    if case == "hash":
        kw.update(n_hash_layers=1)
        layer = 0
    if case == "unaligned":
        d = 30                                              # rows of 30 fp32 = 120 bytes: the padded-bmm path
        kw.update(moe_inter_dim=14)
    cfg = cfg_(**{"d_model": d, **kw})
    moe = MoE(cfg, layer)
    with torch.no_grad():
        for p in moe.experts.parameters():
            p.mul_(20.0)                                    # pre-activations of a few units: the clamp acts
    x, ids = torch.randn(N, d), torch.randint(0, 64, (N,))
    with torch.no_grad():
        w, idx, _ = moe.gate(x, ids)
    if case == "all_one_expert":
        idx = torch.stack([torch.full((N,), 5), torch.full((N,), 2)], 1)
    moe64 = MoE(cfg, layer).double()
    moe64.load_state_dict(moe.state_dict())
    y_ref, g_ref = _run(moe64, lambda *a: routed_ref(moe64, *a), x.double(), w.double(), idx)
    y64, g64 = _run(moe64, moe64._routed_grouped, x.double(), w.double(), idx)
    rows = [(f"grouped {case} fp64 out", _rel(y64, y_ref), 1e-12),
            (f"grouped {case} fp64 grads", max(_rel(a, b) for a, b in zip(g64, g_ref)), 1e-12)]
    if case != "fp8":                   # fp32 vs fp64 moves FP8 roundings: the fp64 comparison above covers QAT
        tol = 10 * (d + cfg.moe_inter_dim) * U32
        y32, g32 = _run(moe, moe._routed_grouped, x, w, idx)
        rows += [(f"grouped {case} fp32 out", _rel(y32, y_ref), tol),
                 (f"grouped {case} fp32 grads", max(_rel(a, b) for a, b in zip(g32, g_ref)), tol)]
        yl, gl = _run(moe, moe._routed_loop, x, w, idx)          # the loop reference agrees to the same bound
        rows += [(f"loop {case} fp32 out", _rel(yl, y_ref), tol),
                 (f"loop {case} fp32 grads", max(_rel(a, b) for a, b in zip(gl, g_ref)), tol)]
    if case == "empty_experts":                             # experts without tokens: zero gradient
        unused = [e for e in range(16) if not (idx == e).any()]
        assert len(unused) >= 10 and all(moe64.experts[e].w1.weight.grad.abs().sum() == 0 for e in unused)
    return rows


@pytest.mark.parametrize("case", GROUPED_CASES)
def test_grouped_dispatch_matches_reference(case):
    for what, err, tol in check_grouped_dispatch(case):
        assert err <= tol, (what, err, tol)


def _aten_ops(fn):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Rec(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    with Rec() as r:
        fn()
    return r.ops


def test_grouped_dispatch_has_no_host_sync():
    """No op whose output size or value must reach the host (what breaks torch.compile graphs and stalls CUDA):
    .item() / .tolist() (_local_scalar_dense), nonzero (torch.where), unique, bincount. The loop path is the control."""
    torch.manual_seed(0)
    sync_ops = {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "bincount"}
    for dispatch, expect_sync in (("grouped", False), ("loop", True)):
        moe = MoE(cfg_(moe_dispatch=dispatch), 3).train()
        x = torch.randn(2, 5, 32, requires_grad=True)
        ops = _aten_ops(lambda: moe(x).square().sum().backward())
        assert bool(ops & sync_ops) == expect_sync, (dispatch, ops & sync_ops)


def test_model_loss_and_grads_same_with_either_dispatch():
    torch.manual_seed(0)
    cfg = cfg_(layer_types=["dense"] * 2, n_hash_layers=1)
    a = DSV4LM(cfg).train()
    b = DSV4LM(cfg.replace(moe_dispatch="loop")).train()
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 64, (2, 12))
    la, lb = a(ids, ids.roll(-1, 1)).loss, b(ids, ids.roll(-1, 1)).loss
    la.backward()
    lb.backward()
    assert abs(la.item() - lb.item()) <= 1e-5 * abs(lb.item())
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        gp = torch.zeros_like(p) if p.grad is None else p.grad
        gq = torch.zeros_like(q) if q.grad is None else q.grad
        assert torch.allclose(gp, gq, rtol=1e-4, atol=1e-6 * (gq.abs().max() + 1e-12)), n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: the bf16 grouped GEMM kernel (sm90+)")
@pytest.mark.parametrize("n_tok", [1, 7, 517])
def test_grouped_dispatch_cuda_bf16_matches_loop(n_tok):
    """bf16 under autocast on the GPU (torch's CUTLASS grouped GEMM): odd per-expert counts, empty experts. Both paths
    round their GEMM outputs to bf16 (u = 2^-8) at the same places; tolerance 4 u max|y| (several roundings)."""
    torch.manual_seed(0)
    moe = MoE(cfg_(d_model=384, moe_inter_dim=256, n_routed_experts=16, swiglu_limit=10.0), 3).cuda()
    x = torch.randn(1, n_tok, 384, device="cuda")
    flat = x.view(-1, 384)
    with torch.no_grad():
        w, idx, _ = moe.gate(flat, None)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_ref, g_ref = _run(moe, moe._routed_loop, flat, w, idx)
        y, g = _run(moe, moe._routed_grouped, flat, w, idx)
    tol = 4 * 2.0 ** -8
    assert _close(y, y_ref, tol) and all(_close(a, b, tol) for a, b in zip(g, g_ref))
