"""fourbit.diagnose: the statistics are checked against closed forms, not against recorded numbers.

Stochastic rounding's mean is the value clipped to the block's largest representable magnitude, so the
expected gain bias of a GEMM whose only stochastic operand is dy is computable exactly from that clip;
round-to-nearest on values placed off the grid has a known deterministic bias.
"""

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from fourbit import diagnose as dg
from fourbit.quantize import quantize
from fourbit.recipes import get_recipe


def _grid_aligned_dy(M=64, N=32, amax=1e-3, seed=0):
    """dy whose every 16-block along rows and along columns holds one +-amax (the tensor amax), so every
    NVFP4 block scale is exactly 448 * s_dec: no value saturates, stochastic rounding is exactly unbiased."""
    g = torch.Generator().manual_seed(seed)
    dy = (torch.rand(M, N, generator=g) * 2 - 1) * amax * 0.9
    m, n = torch.meshgrid(torch.arange(M), torch.arange(N), indexing="ij")
    return torch.where(m % 16 == n % 16, amax * torch.sign(dy + 1e-12), dy)


def _ops(dy, K=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    M, N = dy.shape
    return dg.LayerOperands("l", torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) * 0.1, dy)


@pytest.mark.parametrize("gemm", ["dgrad", "wgrad"])
def test_sr_gradient_unbiased_when_nothing_saturates(gemm):
    ops = _ops(_grid_aligned_dy())
    rec = get_recipe("nvfp4-no-rht")  # SR on dy, no transform, so the block structure above is what is quantized
    assert dg.operand_stats(ops, rec)[f"clip {gemm}.dy"] == 0.0
    st_ = dg.gemm_stats(ops, rec, gemm, trials=32, dy_only=True)
    assert st_.trials == 32 and st_.se > 0
    assert abs(st_.z) < 2, st_


def test_sr_bias_equals_the_saturation_closed_form():
    """On Gaussian dy about 3% of values lie above 6 x their E4M3-rounded block scale; E[Q_SR(dy)] is dy
    clipped there, so the expected dgrad gain bias is <(clip(dy) - dy) W, dy W> / ||dy W||^2. The measured
    bias agrees within 3 standard errors and is itself beyond 3 standard errors from zero."""
    g = torch.Generator().manual_seed(2)
    dy = torch.randn(64, 32, generator=g) * 1e-3
    ops = _ops(dy)
    rec = get_recipe("nvfp4-no-rht")
    q = quantize(dy, rec.dgrad.a.scheme)
    top = dg.grid_max(q)
    clipped = torch.clamp(dy, -top, top)
    exact = (dy @ ops.w).double()
    expected = float(((clipped - dy).double() @ ops.w.double()).flatten() @ exact.flatten()) / float(exact.square().sum())
    st_ = dg.gemm_stats(ops, rec, "dgrad", trials=48, dy_only=True)
    assert expected < 0 and dg.operand_stats(ops, rec)["clip dgrad.dy"] > 0.01
    assert abs(st_.bias - expected) < 3 * st_.se, (st_, expected)
    assert st_.z < -3


def test_round_to_nearest_bias_beyond_three_sr_standard_errors():
    """Every non-max value at 2.4 grid units (RNE -> 2, always down): no-SR shrinks the gradient by a fixed,
    computable amount; SR's mean over seeds is unbiased and its standard error far smaller than that shift."""
    M, N = 64, 32
    m, n = torch.meshgrid(torch.arange(M), torch.arange(N), indexing="ij")
    unit = 1e-4
    dy = torch.where(m % 16 == n % 16, 6 * unit, 2.4 * unit)  # block amax 6 units -> scale = 1 unit, exact
    ops = _ops(dy)
    exact = (dy.double() @ ops.w.double())
    rne = torch.where(m % 16 == n % 16, 6 * unit, 2.0 * unit).double() @ ops.w.double()
    expected = float((rne - exact).flatten() @ exact.flatten()) / float(exact.square().sum())
    no_sr = dg.gemm_stats(ops, get_recipe("nvfp4-none"), "dgrad", trials=32, dy_only=True)
    sr = dg.gemm_stats(ops, get_recipe("nvfp4-no-rht"), "dgrad", trials=32, dy_only=True)
    assert no_sr.trials == 1 and no_sr.se == 0 and no_sr.z == -math.inf
    assert no_sr.bias == pytest.approx(expected, rel=1e-5)
    assert abs(sr.z) < 2
    assert abs(no_sr.bias) > 3 * sr.se


def test_weight_mismatch_zero_with_2d_blocks_only():
    ops = _ops(torch.randn(32, 32) * 1e-3)
    assert dg.operand_stats(ops, get_recipe("nvfp4"))["weight mismatch"] == 0.0
    assert dg.operand_stats(ops, get_recipe("nvfp4-no-2d"))["weight mismatch"] > 0.01


def test_flush_fraction_matches_the_e2m1_threshold():
    """RNE flushes |v| <= 0.25 block-scale units to zero (0.25 ties to even, 0): counted independently."""
    g = torch.Generator().manual_seed(3)
    t = torch.randn(32, 64, generator=g) * torch.rand(32, 64, generator=g) ** 4
    q = quantize(t, get_recipe("nvfp4").fprop.a.scheme)
    unit = dg.grid_max(q) / 6  # block decode scale times tensor scale, per element
    expected = float(((t.abs() <= 0.25 * unit) & (t != 0)).sum()) / int((t != 0).sum())
    assert dg.flush_fraction(t, q) == pytest.approx(expected, abs=1.0 / t.numel())


def test_capture_matches_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 16), nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 20, bias=False))
    ids = torch.randint(0, 20, (2, 8))
    layers = dg.capture(model, [ids])
    assert [l.name for l in layers] == ["1", "3"]
    logits = model(ids)
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 20), ids[:, 1:].reshape(-1))
    loss.backward()
    for l, lin in zip(layers, (model[1], model[3])):
        assert torch.allclose(dg.exact_gemm(l, "wgrad").float(), lin.weight.grad, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(c=st.floats(-0.5, 0.5), n=st.integers(1, 6))
def test_gain_stats_closed_forms(c, n):
    exact = torch.arange(1.0, 13.0, dtype=torch.float64).reshape(3, 4)
    same = dg.gain_stats([exact * (1 + c)] * n, exact)
    assert same.bias == pytest.approx(c, abs=1e-12) and same.se == 0 and same.noise == pytest.approx(0, abs=1e-12)
    noise = torch.ones_like(exact) * 0.1
    pair = dg.gain_stats([exact + noise, exact - noise], exact)  # symmetric: no bias, nonzero SE
    assert pair.bias == pytest.approx(0, abs=1e-12) and pair.se > 0 and pair.z == pytest.approx(0, abs=1e-9)


def test_diagnose_tiny_model_report(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 32), nn.Linear(32, 64, bias=False), nn.GELU(), nn.Linear(64, 50, bias=False))
    layers = dg.capture(model, [torch.randint(0, 50, (2, 16))])
    res = dg.diagnose(layers, ["nvfp4", "nvfp4-no-sr", "nvfp4-no-rht", "nvfp4-no-2d", "fp8-blockwise"], trials=3)
    assert {r.recipe for r in res} == {"nvfp4", "nvfp4-no-sr", "nvfp4-no-rht", "nvfp4-no-2d"}  # 128x128 blocks do not fit
    md = dg.markdown(res)
    assert "| stochastic rounding | wgrad rel err |" in md and "| 2D weight blocks | weight mismatch |" in md
    assert dg.plot(res, tmp_path / "d.png").stat().st_size > 1000
