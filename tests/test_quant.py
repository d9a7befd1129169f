"""FP8 / MXFP4 fake quantisers, packing, FP4 -> FP8 absorption and QAT wiring (docs §8, §2.2, §6.3)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsv4_lab import DSV4LM, ModelConfig, TrainConfig
from dsv4_lab.layers import Linear
from dsv4_lab.optim import build_optimizer
from dsv4_lab.quant import (E2M1_GRID, dequantize_fp8_tiles, fake_quant_fp8, fake_quant_fp8_ref, fake_quant_fp8_weight,
                            fake_quant_fp8_weight_ref, fake_quant_kv, fake_quant_mxfp4, fake_quant_mxfp4_fp8_weight,
                            fake_quant_mxfp4_ref, fp4_to_fp8_lossless, fp8_quantize, mxfp4_dequantize,
                            mxfp4_quantize, qat_linear)
from dsv4_lab.quant.fp8 import ceil_log2


# --- an independent, element-by-element reference built from the format definitions ---------------------------------

def e4m3_magnitudes():
    """Non-negative finite E4M3 values by code 0..126 (code 127 = NaN): exponent bias 7, subnormals at e = 0."""
    out = []
    for code in range(127):
        e, m = code >> 3, code & 7
        out.append((m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return out


E4M3 = e4m3_magnitudes()


def round_to_grid(y, grid):
    """Nearest magnitude in `grid` (sorted, index parity = mantissa parity), ties to the even index; keeps sign."""
    a = abs(y)
    best = min(range(len(grid)), key=lambda i: (abs(grid[i] - a), i % 2))
    return math.copysign(grid[best], y)


def slow_fake_quant(row, block, qmax, floor, grid):
    out = []
    for k in range(0, len(row), block):
        blk = row[k:k + block]
        amax = max(max(abs(v) for v in blk), floor)
        r = float(np.float32(amax) * np.float32(1.0 / qmax))          # fp32 product, as the reference kernel
        s = 2.0 ** math.ceil(math.log2(r))
        out += [round_to_grid(max(-qmax, min(qmax, v / s)), grid) * s for v in blk]
    return out


def probe_rows(gen):
    """Random rows over many magnitudes plus hand-made ties, an all-zero block and a partial last block."""
    rows = (torch.randn(6, 200, generator=gen) * torch.logspace(-6, 4, 6)[:, None]).tolist()
    fp8_ties = [448.0, 1.0625, -1.1875, 2.0 ** -10, 3 * 2.0 ** -10, 240.0, 464.0 / 2, 0.0]
    fp4_ties = [6.0, 0.25, 0.75, -1.25, 1.75, 2.5, -3.5, 5.0, 0.1, 5.9]
    rows.append(fp8_ties + [0.0] * 24 + fp4_ties + [0.0] * 22 + [1e-9] * 32 + [0.0] * 64 + [3.0] * 40)
    return rows


def test_e4m3_cast_is_round_to_nearest_even_on_cpu():
    pos = torch.tensor(E4M3)
    assert torch.equal(pos.to(torch.float8_e4m3fn).float(), pos)       # the definition-built grid is E4M3
    mids = (pos[:-1] + pos[1:]) / 2
    got = mids.to(torch.float8_e4m3fn).float()
    idx = torch.searchsorted(pos, got)
    assert torch.equal(pos[idx], got) and bool((idx % 2 == 0).all())  # ties go to the even code


def test_ceil_log2_is_exact_at_powers_of_two():
    r = torch.tensor([1.0, 2.0 ** -20, 2.0 ** 30, 1.0000001, 0.75, 3.0, 2.0 ** -126])
    assert ceil_log2(r).tolist() == [0, -20, 30, 1, 0, 2, -126]
    assert float(np.float32(448.0) * np.float32(1 / 448)) == 1.0 and float(np.float32(6.0) * np.float32(1 / 6)) == 1.0


@pytest.mark.parametrize("block", [128, 64, 32])
def test_fp8_matches_slow_reference(block):
    rows = probe_rows(torch.Generator().manual_seed(0))
    x = torch.tensor(rows, dtype=torch.float32)
    want = torch.tensor([slow_fake_quant(r, block, 448.0, 1e-4, E4M3) for r in x.tolist()])
    assert torch.equal(fake_quant_fp8_ref(x, block), want)


def test_mxfp4_matches_slow_reference():
    x = torch.tensor(probe_rows(torch.Generator().manual_seed(1)), dtype=torch.float32)
    want = torch.tensor([slow_fake_quant(r, 32, 6.0, 6 * 2.0 ** -126, list(E2M1_GRID)) for r in x.tolist()])
    assert torch.equal(fake_quant_mxfp4_ref(x), want)
    ties = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] + [0.0] * 24)
    assert fake_quant_mxfp4_ref(ties)[:8].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


def test_fp8_weight_tiles_match_slow_reference():
    w = torch.randn(130, 260, generator=torch.Generator().manual_seed(2)) * torch.logspace(-3, 2, 130)[:, None]
    got = fake_quant_fp8_weight_ref(w)
    for r0 in range(0, 130, 128):
        for c0 in range(0, 260, 128):
            tile = w[r0:r0 + 128, c0:c0 + 128]
            flat = slow_fake_quant(tile.flatten().tolist(), tile.numel(), 448.0, 1e-4, E4M3)
            assert torch.equal(got[r0:r0 + 128, c0:c0 + 128], torch.tensor(flat).view_as(tile))


def _on_grid(gen, shape, mags, block, qmax):
    """Values q * 2^k with q on the grid and every block holding +-qmax (so the quantiser's scale is 2^k)."""
    v = torch.tensor(mags)[torch.randint(len(mags), shape, generator=gen)]
    v = v * torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    v[..., ::block] = qmax
    k = torch.randint(-20, 20, (*shape[:-1], shape[-1] // block, 1), generator=gen).float()
    return (v.view(*shape[:-1], -1, block) * 2.0 ** k).view(shape)


def test_exact_on_grid_and_idempotent():
    g = torch.Generator().manual_seed(3)
    x8 = _on_grid(g, (8, 256), E4M3, 128, 448.0)
    assert torch.equal(fake_quant_fp8_ref(x8), x8)
    x4 = _on_grid(g, (8, 256), list(E2M1_GRID), 32, 6.0)
    assert torch.equal(fake_quant_mxfp4_ref(x4), x4)
    x = torch.randn(5, 7, 300, generator=g) * 10
    for f in (fake_quant_fp8_ref, fake_quant_fp8_weight_ref, fake_quant_mxfp4_ref):
        y = f(x)
        assert torch.equal(f(y), y) and not torch.equal(y, x)


def test_bf16_input_gives_the_same_numbers():
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(4)).bfloat16()
    for f in (fake_quant_fp8_ref, fake_quant_mxfp4_ref):
        y = f(x)
        assert y.dtype == torch.bfloat16 and torch.equal(y.float(), f(x.float()))


def test_straight_through_gradients():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 100, generator=g, requires_grad=True)
    c = torch.randn(3, 100, generator=g)
    for f in (fake_quant_fp8, fake_quant_fp8_weight, fake_quant_mxfp4, fake_quant_mxfp4_fp8_weight,
              lambda t: fake_quant_kv(t, 16)):
        x.grad = None
        (f(x) * c).sum().backward()
        assert torch.equal(x.grad, c)


# --- packed MXFP4 -----------------------------------------------------------------------------------------------------

def test_mxfp4_pack_layout_and_round_trip():
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([6.0, 0.5, -1.0, 3.0])                     # scale 2^0; codes 7, 1, 8|2 = 10, 5
    codes, scales = mxfp4_quantize(x)
    assert codes.shape == (1, 16) and scales.tolist() == [[127]]
    assert codes[0, :2].tolist() == [7 | (1 << 4), 10 | (5 << 4)]      # low nibble = even element
    w = torch.randn(3, 64, 96, generator=torch.Generator().manual_seed(6)) * 0.05
    c, s = mxfp4_quantize(w)
    assert c.dtype == torch.uint8 and c.shape == (3, 64, 48) and s.shape == (3, 64, 3)
    assert torch.equal(mxfp4_dequantize(c, s), fake_quant_mxfp4_ref(w))
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4_quantize(torch.randn(4, 40))


def test_fp8_quantize_parts():
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(7))
    q, e = fp8_quantize(x, 128)
    assert q.dtype == torch.float8_e4m3fn and e.shape == (4, 3)
    y = (q.float().view(4, -1)[:, :300])
    scale = (2.0 ** e.float()).repeat_interleave(128, -1)[:, :300]
    assert torch.equal(y * scale, fake_quant_fp8_ref(x, 128))


def test_against_torchao_mx_formats():
    import torchao.prototype.mx_formats.mx_tensor as mx         # the pinned dev extra (pyproject): required
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(8)) * torch.logspace(-3, 3, 64)[:, None]
    # RCEIL = 2^ceil(log2(amax / max_pos)): the V4 reference's rule (torchao's default FLOOR can clip)
    s, d = mx.to_mx(x, torch.float4_e2m1fn_x2, 32, ScaleCalculationMode.RCEIL)
    codes, scales = mxfp4_quantize(x)
    assert torch.equal(d.view(torch.uint8), codes) and torch.equal(s.view(torch.uint8).view(scales.shape), scales)
    s, d = mx.to_mx(x, torch.float8_e4m3fn, 32, ScaleCalculationMode.RCEIL)
    assert torch.equal(mx.to_dtype(d, s, torch.float8_e4m3fn, 32, torch.float32), fake_quant_fp8_ref(x, 32))


# --- FP4 -> FP8 absorption (docs §8.3) -------------------------------------------------------------------------------

def test_exactness_condition_by_enumeration():
    # [CALC] of docs §8.3, recomputed: v * 2^k is an E4M3 value for every E2M1 v iff k in [-8, 6]
    grid = set(E4M3)
    ok = [k for k in range(-16, 12) if all(v * 2.0 ** k in grid for v in E2M1_GRID)]
    assert ok == list(range(-8, 7))


def test_fp4_to_fp8_bit_exact_when_condition_holds():
    g = torch.Generator().manual_seed(9)
    w = torch.randn(200, 320, generator=g) * 0.02                      # partial tiles on both dims
    w[:, 32:64] *= 2.0 ** 13                                          # a wide but allowed scale spread
    codes, scales = mxfp4_quantize(w)
    r = fp4_to_fp8_lossless(codes, scales)
    assert r.fp8.dtype == torch.float8_e4m3fn and r.tile_scales.shape == (2, 3)
    assert bool(r.condition_ok.all()) and r.lossless and r.report()["max_log2_ratio"] >= 13
    assert torch.equal(dequantize_fp8_tiles(r.fp8, r.tile_scales), mxfp4_dequantize(codes, scales))
    assert torch.equal(fake_quant_mxfp4_fp8_weight(w), fake_quant_mxfp4_ref(w))


def test_fp4_to_fp8_reports_violations():
    w = torch.full((128, 256), 1.0)
    w[5, 32:64] = 2.0 ** -15                                          # ratio 2^15 in tile (0, 0) ...
    w[5, 33] = 2.0 ** -18                                             # ... and an E2M1 0.5 there: 0.5 * 2^-9 is lost
    w[7, 128:160] = 0.0                                               # ratio 2^126 in tile (0, 1) but all zeros
    codes, scales = mxfp4_quantize(w)
    r = fp4_to_fp8_lossless(codes, scales)
    assert r.condition_ok.tolist() == [[False, False]]
    assert r.exact.tolist() == [[False, True]]                         # zeros survive; the 0.5 does not
    assert r.report() == {"tiles": 2, "condition_violations": 2, "inexact_tiles": 1,
                          "max_log2_ratio": int(r.log2_ratio.max()), "lossless": False}
    w[5, 32:64], w[5, 33] = 2.0 ** -14, 2.0 ** -17                    # ratio exactly 2^14: still exact
    r = fp4_to_fp8_lossless(*mxfp4_quantize(w))
    assert r.condition_ok[0, 0] and r.exact[0, 0] and r.log2_ratio[0, 0] == 14


# --- QAT --------------------------------------------------------------------------------------------------------------

def test_qat_linear_composition():
    g = torch.Generator().manual_seed(10)
    x, w = torch.randn(2, 5, 256, generator=g), torch.randn(96, 256, generator=g) * 0.05
    y8 = qat_linear(x, w, "fp8")
    assert torch.equal(y8, F.linear(fake_quant_fp8_ref(x, 128), fake_quant_fp8_weight_ref(w, 128)))
    y4 = qat_linear(x, w, "fp4")
    assert torch.equal(y4, F.linear(fake_quant_fp8_ref(x, 128), fake_quant_mxfp4_ref(w)))
    assert not torch.equal(y4, y8)
    with pytest.raises(ValueError, match="quant kind"):
        qat_linear(x, w, "int4")


def test_fake_quant_kv_leaves_rope_dims():
    x = torch.randn(2, 7, 96, generator=torch.Generator().manual_seed(11)) * 3
    y = fake_quant_kv(x, 16)                                          # 80 non-RoPE dims: blocks 64 + partial 16
    assert torch.equal(y[..., 80:], x[..., 80:])
    assert torch.equal(y[..., :80], fake_quant_fp8_ref(x[..., :80], 64))
    assert not torch.equal(y[..., :80], x[..., :80])


def test_quant_none_builds_no_quantised_linear():
    model = DSV4LM(ModelConfig.from_preset("tiny-dense", quant="none"))
    assert all(not m.quant for m in model.modules() if isinstance(m, Linear))
    model = DSV4LM(ModelConfig.from_preset("tiny-dense", quant="fp8"))
    assert any(m.quant == "fp8" for m in model.modules() if isinstance(m, Linear))


@pytest.mark.parametrize("quant", ["fp8", "fp4"])
def test_qat_tiny_model_trains(quant):
    torch.manual_seed(0)
    model = DSV4LM(ModelConfig.from_preset("tiny-dense", quant=quant))
    if quant == "fp4" and not any(m.quant == "fp4" for m in model.modules() if isinstance(m, Linear)):
        for m in model.modules():                                     # no routed experts in this model yet:
            if isinstance(m, Linear) and m.quant:                     # put the FFN / projections on the FP4 path
                m.quant = "fp4"
    masters = [p for p in model.parameters() if p.ndim >= 2]
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=3e-3))
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(20):
        x = torch.randint(0, 16, (2, 33), generator=g)
        out = model(x[:, :-1], x[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0
    assert all(p.dtype == torch.float32 for p in masters)
    w = model.blocks[0].ffn.mlp.w1.weight
    q = (fake_quant_fp8_weight_ref if quant == "fp8" else fake_quant_mxfp4_ref)(w.detach())
    assert not torch.equal(q, w.detach())                             # masters are not on the grid: fp32 kept
