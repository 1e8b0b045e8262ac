"""QuantLinear: each GEMM against an explicit composition of fourbit.quantize and a float64 matmul,
the bf16 recipe against nn.Linear bit for bit, stochastic rounding's unbiasedness, the RHT, weight reuse."""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import fourbit
from fourbit.gemm import qmm, transpose
from fourbit.hadamard import RHT
from fourbit.nn import QuantLinear, load_rng_state, rng_state
from fourbit.nn.linear import Role, derive_seed, quantize_weight, wgrad_inputs
from fourbit.recipes import get_recipe

U32 = 2.0**-24  # float32 unit roundoff
# |fl32(sum_k a_k b_k) - sum_k a_k b_k| <= gamma_K sum_k |a_k b_k|, gamma_K = K u / (1 - K u) (Higham 3.1);
# two more float32 roundings follow (the bias add and the cast), so the bound uses K + 2 terms and a
# small safety factor for the (1 - K u) denominator.
FP32_GEMM_SLACK = 1.01


def fp32_gemm_tol(a_abs: torch.Tensor, b_abs: torch.Tensor, extra: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Elementwise float32-accumulation bound for a @ b.T, given |a| and |b| in float64."""
    k = a_abs.shape[1]
    return FP32_GEMM_SLACK * (k + 2) * U32 * (a_abs @ b_abs.T + extra)


def deq(q) -> torch.Tensor:
    return q.dequantize(torch.float32).double()


def reference_grads(recipe, x, w, b, dy, layer_id, step):
    """y, dx, dW of one QuantLinear step, composed from fourbit.quantize, fourbit.rht and float64 matmuls."""
    def seed(role):
        return derive_seed(recipe.seed, layer_id, step, role)

    def q(t, op, role):
        sr = op.rounding.value == "stochastic"
        return deq(fourbit.quantize(t, op.scheme, rounding=op.rounding, seed=seed(role) if sr else None, pad=True))

    f, d, g = recipe.fprop, recipe.dgrad, recipe.wgrad
    xq, wq = q(x, f.a, Role.FPROP_X), q(w, f.b, Role.FPROP_W)  # (M, K), (N, K)
    y = xq @ wq.T + b.double()
    dyq, wtq = q(dy, d.a, Role.DGRAD_DY), q(w.T.contiguous(), d.b, Role.DGRAD_W)  # (M, N), (K, N)
    dx = dyq @ wtq.T

    # wgrad: tokens M zero-padded to the block width (and 16 for the RHT), then the RHT along M
    blocks = [op.scheme.block[1] for op in (g.a, g.b) if op.scheme.block is not None] + [16 if g.a.rht else 1]
    pad = (-x.shape[0]) % math.lcm(*blocks)
    a, bt = F.pad(dy.T, (0, pad)), F.pad(x.T, (0, pad))  # (N, M'), (K, M')
    if g.a.rht:
        transform = RHT(16, recipe.rht_seed)
        a, bt = fourbit.rht(a, -1, transform=transform), fourbit.rht(bt, -1, transform=transform)
    aq, bq = q(a, g.a, Role.WGRAD_DY), q(bt, g.b, Role.WGRAD_X)
    dw = aq @ bq.T
    return (y, (xq, wq)), (dx, (dyq, wtq)), (dw, (aq, bq))


GEMM_CASES = [  # (recipe, M tokens, K in, N out)
    ("fp8", 24, 64, 32),
    ("fp8-blockwise", 20, 128, 256),
    ("mxfp4", 40, 64, 96),
    ("nvfp4", 24, 64, 48),
    ("nvfp4", 7, 32, 16),
    ("nvfp4-no-2d", 24, 64, 48),
    ("nvfp4-no-rht", 24, 64, 48),
    ("nvfp4-none", 24, 64, 48),
    ("nvfp4+4over6", 24, 64, 48),
]


@pytest.mark.parametrize("name, M, K, N", GEMM_CASES, ids=[f"{c[0]}-M{c[1]}" for c in GEMM_CASES])
def test_gemms_equal_explicit_composition(name, M, K, N):
    recipe = get_recipe(name)
    torch.manual_seed(0)
    layer = QuantLinear(K, N, recipe=recipe, layer_id=3)
    layer.step = 5
    x = (torch.randn(M, K) * torch.logspace(-2, 2, K)).requires_grad_()  # wide dynamic range across K
    dy = torch.randn(M, N) * 1e-3

    y = layer(x)
    y.backward(dy)
    assert layer.step == 6

    (y_ref, (xq, wq)), (dx_ref, (dyq, wtq)), (dw_ref, (aq, bq)) = reference_grads(
        recipe, x.detach(), layer.weight.detach(), layer.bias.detach(), dy, layer_id=3, step=5
    )
    assert (y.double() - y_ref).abs().le(fp32_gemm_tol(xq.abs(), wq.abs(), layer.bias.double().abs())).all()
    assert (x.grad.double() - dx_ref).abs().le(fp32_gemm_tol(dyq.abs(), wtq.abs())).all()
    assert (layer.weight.grad.double() - dw_ref).abs().le(fp32_gemm_tol(aq.abs(), bq.abs())).all()
    assert torch.equal(layer.bias.grad, dy.sum(0))  # bias gradient in high precision
    # the test has teeth: quantization error is far above the float32 tolerance
    assert (y.double() - (x.double() @ layer.weight.double().T + layer.bias.double())).abs().max() > 1e-3


def test_leading_dims_flatten():
    torch.manual_seed(1)
    layer = QuantLinear(32, 16, recipe="nvfp4")
    x = torch.randn(3, 5, 32)
    y3 = layer(x)
    layer.step = 0
    y2 = layer(x.reshape(15, 32))
    assert y3.shape == (3, 5, 16) and torch.equal(y3.reshape(15, 16), y2)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
@pytest.mark.parametrize("shape", [(7, 48), (2, 5, 48)], ids=["2d", "3d"])
def test_bf16_recipe_is_nn_linear_bit_for_bit(shape, autocast):
    torch.manual_seed(0)
    ref = torch.nn.Linear(48, 24)
    layer = QuantLinear.from_linear(copy.deepcopy(ref), "bf16")
    x = torch.randn(shape)
    outs, grads = [], []
    for m in (ref, layer):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = m(xi)
        y.float().pow(2).sum().backward()
        outs.append(y)
        grads.append((xi.grad, m.weight.grad, m.bias.grad))
    assert outs[0].dtype == outs[1].dtype and torch.equal(outs[0], outs[1])
    for g_ref, g in zip(*grads):
        assert torch.equal(g_ref, g)


def test_autocast_quantizes_the_bf16_input():
    """Under autocast the input is cast to bf16 (as nn.Linear would) before quantization; output is bf16."""
    torch.manual_seed(0)
    layer = QuantLinear(64, 32, recipe="nvfp4")
    x = torch.randn(16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    xq = deq(fourbit.quantize(x.bfloat16(), "nvfp4"))
    wq = deq(fourbit.quantize(layer.weight.detach(), "nvfp4", block=(16, 16)))
    y_ref = (xq @ wq.T + layer.bias.detach().double()).to(torch.bfloat16)
    # float32 result then one bf16 rounding: at most one bf16 ulp apart where the fp32 sum straddles a tie
    assert (y.double() - y_ref.double()).abs().le(2.0**-7 * y_ref.double().abs() + 1e-6).all()


def test_stochastic_rounding_makes_dgrad_unbiased():
    """Mean of dx over S seeds -> dy @ Q(W) under SR, within 6 sigma of the closed-form SR variance;
    RNE's error is deterministic and stays.

    Each 1x16 block of dy holds +-A (the tensor amax), so every block scale is exactly 448 * s_dec and
    no element saturates: SR of a value v between adjacent FP4 grid points lo < v < hi is then exactly
    unbiased with variance (v - lo)(hi - v), and Var[dx_mk] = sum_n W_nk^2 Var[Q(dy_mn)].
    """
    S, M, K, N, A = 256, 4, 16, 32, 3.0
    torch.manual_seed(0)
    dy = torch.rand(M, N) * 2 * A - A
    dy[:, ::16] = A * torch.sign(torch.randn(M, N // 16))
    w = torch.randn(N, K)
    x = torch.randn(M, K)

    def mean_dx(name, steps):
        layer = QuantLinear(K, N, bias=False, recipe=name)
        layer.weight.data.copy_(w)
        layer.weight.requires_grad_(False)  # dgrad only
        total = torch.zeros(M, K, dtype=torch.float64)
        for _ in range(steps):
            xi = x.clone().requires_grad_()
            layer(xi).backward(dy)
            total += xi.grad.double()
        return total / steps

    wq = deq(fourbit.quantize(w, "nvfp4", block=(16, 16)))  # (N, K): dgrad's W is deterministic (RNE)
    exact = dy.double() @ wq  # (M, K)

    # closed-form variance of SR on dy's grid: scaled values v = dy * s_enc_b lie in [-6, 6]
    s_dec = A / (6 * 448)
    v = (dy.double() / (448 * s_dec)).abs()
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)
    hi_i = torch.searchsorted(grid, v, right=False).clamp(1, 7)
    lo, hi = grid[hi_i - 1], grid[hi_i]
    var_dy = (v - lo) * (hi - v) * (448 * s_dec) ** 2  # (M, N)
    sigma = (var_dy @ (wq**2)).sqrt()  # (M, K)

    sr_err = (mean_dx("nvfp4", S) - exact).abs()
    assert (sr_err <= 6 * sigma / math.sqrt(S) + 1e-6).all()
    rne_err = (mean_dx("nvfp4-no-sr", 1) - exact).abs()  # RNE: every seed gives the same dx
    assert rne_err.norm() > 4 * sr_err.norm()


def test_rht_preserves_the_wgrad_product_before_quantization():
    torch.manual_seed(0)
    recipe = get_recipe("nvfp4")
    dy, x = torch.randn(24, 48, dtype=torch.float64), torch.randn(24, 32, dtype=torch.float64)
    a, b = wgrad_inputs(dy, x, recipe)  # (48, 32), (32, 32): M padded 24 -> 32 and transformed
    assert a.shape == (48, 32) and b.shape == (32, 32)
    torch.testing.assert_close(a @ b.T, dy.T @ x, rtol=1e-12, atol=1e-12)  # float64 round-off only
    assert (a[:, :24] - dy.T).abs().max() > 0.1  # the operands really were transformed
    a0, _ = wgrad_inputs(dy, x, get_recipe("nvfp4-no-rht"))
    torch.testing.assert_close(a0[:, :24], dy.T, rtol=0, atol=0)


@pytest.mark.parametrize("name, shared", [("nvfp4", True), ("nvfp4-no-2d", False), ("fp8", True),
                                          ("fp8-blockwise", True), ("mxfp4", False)],
                         ids=["nvfp4-2d", "nvfp4-1d", "fp8-tensor", "fp8-128x128", "mxfp4-1x32"])
def test_fprop_and_dgrad_see_the_same_weight_only_with_2d_blocks(name, shared):
    torch.manual_seed(0)
    w = torch.randn(128, 256) * torch.logspace(-3, 1, 256)
    q_f, q_d = quantize_weight(w, get_recipe(name))  # (N, K) and (K, N)
    assert torch.equal(q_f.dequantize(), q_d.dequantize().T) == shared


@pytest.mark.parametrize("scheme, block", [("nvfp4", (16, 16)), ("fp8", (128, 128)), ("fp8", None)],
                         ids=["nvfp4-16x16", "fp8-128x128", "fp8-tensor"])
def test_transpose_equals_quantizing_the_transpose(scheme, block):
    torch.manual_seed(0)
    w = torch.randn(256, 128) * torch.logspace(-3, 1, 128)
    qt, ref = transpose(fourbit.quantize(w, scheme, block=block)), fourbit.quantize(w.T.contiguous(), scheme, block=block)
    assert torch.equal(qt.data, ref.data) and qt.shape == ref.shape
    assert torch.equal(qt.scales.view(torch.uint8) if qt.scales.element_size() == 1 else qt.scales,
                       ref.scales.view(torch.uint8) if ref.scales.element_size() == 1 else ref.scales)
    with pytest.raises(ValueError, match="square"):
        transpose(fourbit.quantize(w, "nvfp4"))


def test_qmm_plain_and_accumulation():
    torch.manual_seed(0)
    a, b = torch.randn(8, 256), torch.randn(4, 256)
    qa, qb = fourbit.quantize(a, "fp8", block=(1, 128)), fourbit.quantize(b, "fp8", block=(128, 128), pad=True)
    out = qmm(qa, qb)
    ref = deq(qa) @ deq(qb).T
    assert (out.double() - ref).abs().le(fp32_gemm_tol(deq(qa).abs(), deq(qb).abs())).all()
    acc = pytest.importorskip("fourbit.accumulation").Accumulation(bits=8)
    limited = qmm(qa, qb, accumulation=acc)
    assert torch.equal(limited, acc.matmul(qa.dequantize(), qb.dequantize()))
    assert not torch.equal(limited, out)  # 8-bit accumulation visibly differs


@pytest.mark.parametrize(
    "a, b, err",
    [(torch.randn(4, 16), torch.randn(4, 32), ValueError), (torch.randn(2, 4, 16), torch.randn(4, 16), ValueError),
     ("x", torch.randn(4, 16), TypeError), (torch.ones(4, 16, dtype=torch.int32), torch.randn(4, 16), TypeError)],
    ids=["k-mismatch", "3d", "not-tensor", "int"],
)
def test_qmm_bad_input(a, b, err):
    with pytest.raises(err):
        qmm(a, b)


def test_quant_linear_bad_input():
    with pytest.raises(ValueError, match="multiples of 16"):
        QuantLinear(40, 32, recipe="nvfp4")
    with pytest.raises(ValueError, match="unknown recipe"):
        QuantLinear(32, 32, recipe="int4")
    with pytest.raises(ValueError, match="in_features=32"):
        QuantLinear(32, 32, recipe="nvfp4")(torch.randn(4, 48))


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4", "fp8-blockwise"], ids=["nvfp4", "mxfp4", "fp8-blockwise"])
@pytest.mark.parametrize("M", [1, 7, 33], ids=["M1", "M7", "M33"])
def test_odd_token_counts(name, M):
    torch.manual_seed(0)
    layer = QuantLinear(128, 128, recipe=name)
    x = torch.randn(M, 128, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()
    assert layer.weight.grad.abs().sum() > 0


def test_no_tokens():
    layer = QuantLinear(32, 16, recipe="nvfp4")
    x = torch.randn(0, 32, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.shape == (0, 32) and torch.equal(layer.weight.grad, torch.zeros(16, 32))


def test_seed_mix_distinct_and_fixed():
    seeds = {derive_seed(0, layer, step, role) for layer in range(8) for step in range(64) for role in Role}
    assert len(seeds) == 8 * 64 * len(Role)
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(5, 1, 2, Role.DGRAD_DY) == derive_seed(5, 1, 2, 2)
    assert derive_seed(5, 1, 2, Role.DGRAD_DY) != derive_seed(6, 1, 2, Role.DGRAD_DY)


def _grads_at(model, x, dy):
    for p in model.parameters():
        p.grad = None
    model(x).backward(dy)
    return [p.grad.clone() for p in model.parameters()]


def test_step_counter_and_resume_continue_the_random_stream():
    torch.manual_seed(0)
    model = torch.nn.Sequential(QuantLinear(32, 32, recipe="nvfp4", layer_id=0),
                                QuantLinear(32, 32, recipe="nvfp4", layer_id=1))
    x, dy = torch.randn(16, 32), torch.randn(16, 32)
    for _ in range(3):
        _grads_at(model, x, dy)
    with torch.no_grad():
        model(x)  # inference does not advance the stream
    model.eval()
    model(x)
    model.train()
    state = rng_state(model)
    assert state == {"0": {"layer_id": 0, "step": 3}, "1": {"layer_id": 1, "step": 3}}

    resumed = copy.deepcopy(model)
    for m in resumed:
        m.step = 0
    fresh = _grads_at(copy.deepcopy(resumed), x, dy)  # a restart without the state: step 0's stream
    load_rng_state(resumed, state)
    expected = _grads_at(model, x, dy)
    got = _grads_at(resumed, x, dy)
    assert all(torch.equal(e, g) for e, g in zip(expected, got))
    assert not all(torch.equal(e, f) for e, f in zip(expected, fresh))

    with pytest.raises(ValueError, match="missing"):
        load_rng_state(resumed, {"0": state["0"]})
    with pytest.raises(ValueError, match="layer_id"):
        load_rng_state(resumed, {"0": state["0"], "1": {"layer_id": 7, "step": 1}})


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_matches_eager(backend):
    """A model of QuantLinears compiles whole (fullgraph): losses, grads and SR streams equal eager bit for bit.
    (ReLU, not GELU, between them: Inductor's vectorised erf differs from ATen's in the last bit.)"""
    if backend == "inductor" and shutil.which("g++") is None and shutil.which("clang++") is None:
        pytest.skip("inductor on CPU needs a C++ compiler")
    torch.manual_seed(0)
    model = torch.nn.Sequential(QuantLinear(64, 64, recipe="nvfp4"), torch.nn.ReLU(), QuantLinear(64, 32, recipe="nvfp4"))
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend=backend, fullgraph=True)
    x = torch.randn(16, 64)
    for _ in range(2):
        loss_e = model(x).pow(2).mean()
        loss_c = compiled(x).pow(2).mean()
        loss_e.backward()
        loss_c.backward()
        assert torch.equal(loss_e, loss_c)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert rng_state(compiled) == rng_state(model)
