"""Muon, the hybrid Newton-Schulz schedule and the paper's parameter split (docs §7, paper §2.4)."""
import copy
import math

import pytest
import torch

from dsv4_lab import DSV4LM, ModelConfig, TrainConfig
from dsv4_lab.optim import Muon, MuonWithAdamW, build_optimizer, newton_schulz, param_split
from dsv4_lab.optim.newton_schulz import SCHEDULES
from numerics import close_err
WELL_CONDITIONED = [(64, 128), (128, 64), (96, 256), (32, 512)]     # random rectangular: sigma_min / ||G||_F > 1e-2


def svals(X):
    return torch.linalg.svdvals(X.double())


# --- Newton-Schulz -------------------------------------------------------------------------------------------------

# Error model of the singular values after the V4 schedule. Exact arithmetic: the schedule's last two steps map
# [0.7, 1.2] into 1 +/- 1e-3 (its design band) -> NS_BAND = 2e-3 covers fp32 (rounding ~1e-6 on top). bf16: the
# last step's derivative at sigma = 1 is a + 3b + 5c = 0, so earlier rounding is squeezed out; what remains is the
# rounding of the last step's ~6 bf16 results of magnitude <= 2 (A, A @ A, B, B @ X, a X, their sum) plus the final
# cast. Each is an elementwise relative error <= u_bf16 = 2^-9 (any CPU kernel: fp32 or bf16 accumulation rounds
# once to bf16 at the end, K <= 512 adds <= K u32 = 3e-5 more); an elementwise relative error u on a matrix whose
# singular values ~1 moves them by <= u x its magnitude, i.e. <= 2 u per rounded result of magnitude 2:
# NS_BF16 = NS_BAND + 6 x 2 u_bf16 = 2.5e-2 (worst case: all errors aligned; the keller5 band is >= 0.1).
NS_BAND = 2e-3
NS_BF16 = NS_BAND + 6 * 2 * 2.0 ** -9


def check_ns_singular_values(shape, seed: int = 0):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    s32 = svals(newton_schulz(G, "v4", dtype=torch.float32))
    s16 = svals(newton_schulz(G, "v4", dtype=torch.bfloat16))
    return [(f"NS v4 fp32 {shape}", (s32 - 1).abs().max().item(), NS_BAND),
            (f"NS v4 bf16 {shape}", (s16 - 1).abs().max().item(), NS_BF16)]


@pytest.mark.parametrize("shape", WELL_CONDITIONED)
def test_v4_schedule_singular_values_at_one(shape):
    for what, err, tol in check_ns_singular_values(shape):
        assert err <= tol, (what, err, tol)


def check_polar(seed: int = 0):
    """NS(G) vs the polar factor U V^T: X - U V^T = U (S_X - I) V^T in exact arithmetic, so every entry is within the
    spectral norm max|s - 1| <= NS_BAND (fp32 rounding ~1e-6 on top)."""
    G = torch.randn(48, 160, generator=torch.Generator().manual_seed(1 + 100 * seed))
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return [("NS v4 = polar factor U V^T (max entry)", (newton_schulz(G, "v4").double() - U @ Vh).abs().max().item(),
             NS_BAND)]


def test_v4_schedule_is_polar_factor():
    for what, err, tol in check_polar():
        assert err < tol, (what, err, tol)


def check_keller5_band(seed: int = 0):
    """What the two (2, -1.5, 0.5) steps are for: 5 Keller steps leave singular values in a band around 1 (the
    polynomial 3.4445 x - 4.775 x^3 + 2.0315 x^5 oscillates between ~0.68 and ~1.2), 8 Keller steps alone still do,
    the V4 schedule removes it (max|s - 1| <= NS_BAND, the model above). Where a random spectrum's extreme values land
    in the band varies by input (min s ~0.68, max s 1.128 .. 1.14 over 20 seeds), so the band is asserted as an
    excursion of >= 0.1 below and >= 0.05 above 1 (50x and 25x NS_BAND; rows threshold / excursion, < 1)."""
    G = torch.randn(64, 128, generator=torch.Generator().manual_seed(2 + 100 * seed))
    s = svals(newton_schulz(G, "keller5"))
    s8 = svals(newton_schulz(G, [SCHEDULES["v4"][0]] * 8))
    return [("keller5 leaves a band below 1 (0.1 / (1 - min s))", 0.1 / (1 - s.min().item()), 1.0),
            ("keller5 leaves a band above 1 (0.05 / (max s - 1))", 0.05 / (s.max().item() - 1), 1.0),
            ("8 Keller steps still leave a band (0.1 / max|s - 1|)", 0.1 / (s8 - 1).abs().max().item(), 1.0),
            ("V4 schedule removes the band", (svals(newton_schulz(G, "v4")) - 1).abs().max().item(), NS_BAND)]


def test_keller5_leaves_a_band_that_the_last_two_steps_remove():
    for what, err, tol in check_keller5_band():
        assert err < tol, (what, err, tol)


def check_tiny_singular_values(seed: int = 0):
    """Honest limit: a singular value below ~2e-5 ||G||_F is not lifted to 1 in 10 steps (the first 8 steps' gain at
    small sigma is a = 3.4445 each, 3.4445^8 ~ 2e4). ||G||_F ~ 8: sigma 1e-7 (1.2e-8 relative) stays ~0 (< 0.1), 1e-4
    (1.2e-5 relative) gets only part way (0.3 < s < 0.95: rows 0.05 / (1 - s) and 0.3 / s, < 1; G's singular values
    are S exactly for any orthogonal U, V, so s ~0.81 on every seed), the rest (>= 5e-5 relative) reach 1 within
    NS_BAND."""
    U, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(3 + 100 * seed)))
    V, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(4 + 100 * seed)))
    S = torch.ones(64)
    S[-1], S[-2], S[-3] = 1e-7, 1e-4, 4e-4
    s = svals(newton_schulz(U @ torch.diag(S) @ V.T, "v4"))          # sorted descending
    return [("NS limit: sigma 1e-7 stays ~0", s[-1].item(), 0.1),
            ("NS limit: sigma 1e-4 part way, below 0.95 (0.05 / (1 - s))", 0.05 / (1 - s[-2].item()), 1.0),
            ("NS limit: sigma 1e-4 part way, above 0.3 (0.3 / s)", 0.3 / s[-2].item(), 1.0),
            ("NS limit: sigma >= 4e-4 lifted to 1", (s[:-2] - 1).abs().max().item(), NS_BAND)]


def test_v4_schedule_limit_tiny_singular_values():
    for what, err, tol in check_tiny_singular_values():
        assert err < tol, (what, err, tol)


# Same NS on the same matrix by another path (batched vs one matrix, transposed, stacked experts, the optimizer vs
# the update written out): the same fp32 steps, only the GEMM blocking may differ, i.e. a reassociation of K <= 40-term
# sums, <= K u32 |X| ~ 2e-6 per step for entries |X| < 1; the schedule's last steps contract the spectrum towards 1,
# so the difference stays at that level instead of compounding: bar 1e-5 on entries (allclose atol, rtol 1e-5).
SAME_NS_TOL = 1e-5


def check_batched_and_tall(seed: int = 0):
    g = torch.Generator().manual_seed(5 + 100 * seed)
    G = torch.randn(3, 2, 40, 24, generator=g)
    out = newton_schulz(G)
    rows = [("NS batched = one matrix at a time (allclose)", *close_err(out[i, j], newton_schulz(G[i, j]), SAME_NS_TOL))
            for i in range(3) for j in range(2)]
    rows.append(("NS tall = transposed wide (allclose)", *close_err(newton_schulz(G[0, 0].T), out[0, 0].T,
                                                                    SAME_NS_TOL)))
    return rows


def test_batched_and_tall_are_independent_matrices():
    for what, err, tol in check_batched_and_tall():
        assert err <= tol, (what, err, tol)


def test_schedule_argument():
    G = torch.randn(16, 32, generator=torch.Generator().manual_seed(6))
    assert torch.equal(newton_schulz(G, SCHEDULES["v4"]), newton_schulz(G, "v4"))
    assert torch.equal(newton_schulz(torch.zeros(8, 8)), torch.zeros(8, 8))       # eps: zero in, zero out
    with pytest.raises(ValueError, match="ns_schedule"):
        newton_schulz(G, "v5")
    with pytest.raises(ValueError, match="ns_schedule"):
        newton_schulz(G, [(1.0, 2.0)])


# --- Muon ------------------------------------------------------------------------------------------------------------

def _one_step(shape, groups=None, lr=0.02, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(*shape, generator=g) * 0.02)
    if groups is not None:
        p._muon_groups = groups
    w0 = p.detach().clone()
    p.grad = torch.randn(*shape, generator=g)
    Muon([p], lr=lr, weight_decay=0.0, **kw).step()
    return (w0 - p.detach()) / lr                                      # the update O


RMS_SHAPES = [(64, 128), (256, 64), (4, 32, 96)]


def check_update_rms(shape, seed: int = 0):
    """The update O = NS(G) sqrt(max(A, B)) rms_scale has rms = rms_scale sqrt(sum s^2 / min(A, B)) = rms_scale (1 +-
    NS_BAND) (the singular values s of NS(G) within NS_BAND of 1): |rms - 0.18| <= 0.18 NS_BAND = 3.6e-4 under the
    bar 2e-3 (allclose atol), |rms - 0.3| <= 6e-4 under the bar 3e-3."""
    O = _one_step(shape, seed=seed)
    rms = O.pow(2).mean(dim=(-2, -1)).sqrt()                           # per matrix (per expert for 3-D)
    O3 = _one_step(shape, rms_scale=0.3, seed=seed)
    return [(f"Muon update rms = 0.18 {shape} (allclose)", *close_err(rms, torch.full_like(rms, 0.18), 2e-3, 0.0)),
            (f"Muon update rms = 0.3 {shape}", abs(O3.pow(2).mean().sqrt().item() - 0.3), 3e-3)]


@pytest.mark.parametrize("shape", RMS_SHAPES)
def test_update_rms_is_rms_scale(shape):
    for what, err, tol in check_update_rms(shape):
        assert err <= tol, (what, err, tol)


def check_stacked_experts(seed: int = 0):
    """Stacked experts' update = NS of each expert's matrix (SAME_NS_TOL above; entries |O| < 1)."""
    O3 = _one_step((3, 24, 40), seed=1 + 100 * seed)
    g = torch.Generator().manual_seed(1 + 100 * seed)
    torch.randn(3, 24, 40, generator=g)
    G = torch.randn(3, 24, 40, generator=g)
    return [("Muon stacked experts = separate matrices (allclose)",
             *close_err(O3[e], newton_schulz(G[e]) * math.sqrt(40) * 0.18, SAME_NS_TOL)) for e in range(3)]


def test_stacked_experts_equal_separate_matrices():
    for what, err, tol in check_stacked_experts():
        assert err <= tol, (what, err, tol)


def check_grouped_rows(seed: int = 0):
    """Row groups are orthogonalised on their own: each block's singular values within NS_BAND of 1 (the same
    model as the plain NS), while the whole matrix's are not (row 0.05 / max|s - 1|, < 1)."""
    g_, dg, k = 4, 16, 48                                              # wo_a-like [g*d_g, H*c/g]
    O = _one_step((g_ * dg, k), groups=g_, seed=2 + 100 * seed)
    rows = [("Muon row groups: each block orthogonal", (svals(blk / (math.sqrt(max(dg, k)) * 0.18)) - 1).abs().max()
             .item(), NS_BAND) for blk in O.view(g_, dg, k)]
    whole = svals(O / (math.sqrt(g_ * dg + 0 * k) * 0.18))
    rows.append(("Muon row groups: the whole matrix is not (0.05 / max|s - 1|)", 0.05 / (whole - 1).abs().max().item(),
                 1.0))
    O = _one_step((24, 32), groups=(4, 4, 16), seed=3 + 100 * seed)   # mHC pre/post/res row blocks
    rows += [("Muon mHC row blocks: each orthogonal", (svals(blk / (math.sqrt(32) * 0.18)) - 1).abs().max().item(),
              NS_BAND) for blk in torch.split(O, [4, 4, 16])]
    return rows


def test_grouped_rows_are_independent_matrices():
    for what, err, tol in check_grouped_rows():
        assert err < tol, (what, err, tol)
    with pytest.raises(ValueError, match="_muon_groups"):
        _one_step((10, 8), groups=3)


def check_momentum(seed: int = 0):
    """Muon's steps = momentum, Nesterov and decoupled decay written out (the same NS: SAME_NS_TOL above; the weights
    |W| ~ 3 add allclose's rtol 1e-5 |W| for their fp32 updates)."""
    g = torch.Generator().manual_seed(7 + 100 * seed)
    p = torch.nn.Parameter(torch.randn(16, 24, generator=g))
    grads = [torch.randn(16, 24, generator=g) for _ in range(3)]
    opt = Muon([p], lr=0.05, momentum=0.9, weight_decay=0.2)
    W, M = p.detach().clone(), torch.zeros(16, 24)
    rows = []
    for G in grads:
        p.grad = G.clone()
        opt.step()
        M = 0.9 * M + G
        O = newton_schulz(0.9 * M + G) * math.sqrt(24) * 0.18
        W = W * (1 - 0.05 * 0.2) - 0.05 * O
        rows.append(("Muon momentum, Nesterov, decoupled decay written out (allclose)",
                     *close_err(p.detach(), W, SAME_NS_TOL)))
    return rows


def test_momentum_nesterov_and_decoupled_weight_decay():
    for what, err, tol in check_momentum():
        assert err <= tol, (what, err, tol)


# Ours and torch's Muon run the same keller5 NS in bf16 with other operation orders: each of the 5 steps rounds
# results of magnitude <= |a| + |b| + |c| = 10.25 to bf16 (u = 2^-9), and keller5 does not contract (|p'(sigma)| up to
# 3.4 on small singular values), so the differences add over the steps: rel <= 5 x 10.25 u_bf16 = 0.1 per update;
# the 3 updates' sum has the same relative bound.
MUON_BF16 = 5 * 10.25 * 2.0 ** -9


def check_muon_vs_torch(seed: int = 8):
    # torch.optim.Muon: 5 steps of (3.4445, -4.775, 2.0315) in bf16, EMA momentum buf = lerp(buf, g, 1 - mu) and
    # update lerp(g, buf, mu) = (1 - mu) * (our mu M + G): a scale NS's Frobenius normalisation removes; with
    # adjust_lr_fn="match_rms_adamw" it scales by 0.2 sqrt(max(A, B)) = our rms_scale 0.2. Same decoupled decay.
    assert hasattr(torch.optim, "Muon"), "torch.optim.Muon needs torch >= 2.9 (pyproject requires >= 2.11)"
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(64, 96, generator=g) * 0.02
    grads = [torch.randn(64, 96, generator=g) for _ in range(3)]

    def run(make):
        p = torch.nn.Parameter(W0.clone())
        opt = make(p)
        for G in grads:
            p.grad = G.clone()
            opt.step()
        return p.detach() - W0

    theirs = run(lambda p: torch.optim.Muon([p], lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"))
    ours = run(lambda p: Muon([p], lr=0.01, weight_decay=0.1, ns_schedule="keller5", rms_scale=0.2,
                              ns_dtype=torch.bfloat16))
    plain = run(lambda p: Muon([p], lr=0.01, weight_decay=0.1, ns_schedule="keller5", rms_scale=0.2,
                               ns_dtype=torch.bfloat16, nesterov=False))
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    return [("Muon vs torch.optim.Muon (bf16 NS)", rel(ours, theirs), MUON_BF16),
            ("Muon: nesterov off is 3x farther (ratio)", 3 * rel(ours, theirs) / rel(plain, theirs), 1.0)]


def test_matches_torch_muon_with_shared_coefficients():
    for what, err, tol in check_muon_vs_torch():
        assert err <= tol, (what, err, tol)


# --- parameter split and the optimizer object -----------------------------------------------------------------------

ADAMW_SUFFIXES = ("embed.weight", "head.weight", "norm.weight", "attn_sink")          # paper §2.4 list, tiny model
MUON_SUFFIXES = ("wq_a.weight", "wq_b.weight", "wkv.weight", "wo_a.weight", "wo_b.weight", "w1.weight", "w2.weight",
                 "w3.weight")


def _tiny(**kw):
    torch.manual_seed(0)
    return DSV4LM(ModelConfig.from_preset("tiny-dense", **kw))


def test_split_matches_paper_on_plain_tiny_model():
    model = _tiny(residual="plain")
    split = param_split(model)
    assert set(split) == {n for n, _ in model.named_parameters()}
    for name, where in split.items():
        expected = "adamw" if name.endswith(ADAMW_SUFFIXES) else "muon" if name.endswith(MUON_SUFFIXES) else None
        assert expected is not None, f"test does not know {name}; extend the lists"
        assert where == expected, name
    opt = build_optimizer(model, TrainConfig(optimizer="muon"))
    assert isinstance(opt, MuonWithAdamW)
    ids = [id(p) for gr in opt.param_groups for p in gr["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())   # every parameter exactly once
    assert opt.adamw.defaults["eps"] == 1e-20 and opt.adamw.defaults["betas"] == (0.9, 0.95)
    assert model.blocks[0].attn.wo_a.weight._muon_groups == model.cfg.o_groups


def test_split_mhc_static_biases_and_gates_go_to_adamw():
    model = _tiny(residual="mhc")
    split = param_split(model)
    hc = [n for n in split if ".hc" in n or "hc_" in n or "_res." in n]
    assert hc, "residual=mhc built no mHC parameters"
    for name in hc:
        leaf = name.rsplit(".", 1)[-1]
        if "base" in leaf or "scale" in leaf:
            assert split[name] == "adamw", name
        elif leaf.endswith("fn"):
            assert split[name] == "muon", name


def test_override_attribute_and_bias_like_matrices():
    model = _tiny()
    model.blocks[0].attn.wkv.weight._optimizer = "adamw"
    model.register_parameter("ape", torch.nn.Parameter(torch.zeros(4, 8)))
    split = param_split(model)
    assert split["blocks.0.attn.wkv.weight"] == "adamw" and split["ape"] == "adamw"
    model.norm.weight._optimizer = "muon"
    with pytest.raises(ValueError, match="_optimizer"):
        param_split(model)


def test_adamw_arm_is_the_plain_baseline():
    model = _tiny()
    opt = build_optimizer(model, TrainConfig(optimizer="adamw", adam_eps=1e-8))
    assert type(opt) is torch.optim.AdamW and opt.defaults["eps"] == 1e-8
    decay, nodecay = opt.param_groups
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in nodecay["params"])
    assert decay["weight_decay"] == 0.1 and nodecay["weight_decay"] == 0.0


def _train_steps(model, opt, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n):
        x = torch.randint(0, 16, (2, 33), generator=g)
        out = model(x[:, :-1], x[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    return losses


def test_state_dict_round_trip_resumes_exactly():
    tc = TrainConfig(optimizer="muon", lr=1e-2)
    a = _tiny()
    oa = build_optimizer(a, tc)
    _train_steps(a, oa, 2)
    b = _tiny()
    b.load_state_dict(a.state_dict())
    ob = build_optimizer(b, tc)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))      # as from disk: no shared buffers
    _train_steps(a, oa, 2, seed=1)
    _train_steps(b, ob, 2, seed=1)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
    with pytest.raises(ValueError, match="muon"):
        ob.load_state_dict(torch.optim.AdamW(b.parameters()).state_dict())


def test_lr_set_through_param_groups_reaches_both_parts():
    model = _tiny()
    opt = build_optimizer(model, TrainConfig(optimizer="muon"))
    for gr in opt.param_groups:
        gr["lr"] = 0.0 * gr.get("lr_mult", 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    _train_steps(model, opt, 1)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_muon_trains_tiny_model():
    model = _tiny()
    losses = _train_steps(model, build_optimizer(model, TrainConfig(optimizer="muon", lr=3e-3)), 15)
    assert losses[-1] < losses[0] - 1.0
