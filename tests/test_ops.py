"""The op seam (fourbit.ops, fourbit.nn.functional): every custom op passes torch.library.opcheck (schema,
fake implementation against the real one, autograd registration, AOT dispatch), and the reference
implementations agree with independent computations (the public quantize, the host seed derivation)."""

import pytest
import torch

import fourbit
from fourbit import ops
from fourbit.hadamard import RHT
from fourbit.nn.functional import Role, linear_backward, linear_forward, recipe_key
from fourbit.recipes import get_recipe
from fourbit.rounding import derive_seed, seed_base, seed_key
from fourbit.schemes import resolve_scheme

SCHEMES = {
    "nvfp4": resolve_scheme("nvfp4"),
    "nvfp4-2d": resolve_scheme("nvfp4", block=(16, 16)),
    "mxfp4": resolve_scheme("mxfp4"),
    "mxfp8": resolve_scheme("mxfp8"),
    "fp8": resolve_scheme("fp8"),
    "fp8-blockwise": resolve_scheme("fp8-blockwise"),
}
# padded shapes: a ragged last dim (not a multiple of any block) and ragged rows (2D blocks)
SHAPES = [(4, 8, 128), (40, 130)]


@pytest.mark.parametrize("stochastic", [False, True], ids=["rne", "sr"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", list(SCHEMES))
def test_quantize_op_opcheck(name, shape, stochastic):
    config = SCHEMES[name]
    x = torch.randn(shape) * 3
    args = (x, ops.scheme_key(config), stochastic, 1234, None, None, 0, 0, ops.NO_ROW_STRIDE)
    torch.library.opcheck(torch.ops.fourbit.quantize.default, args)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_quantize_op_equals_public_quantize_reference(name):
    """The op's outputs are fourbit.quantize's (backend='reference'), and its fake gives their shapes/dtypes."""
    config = SCHEMES[name]
    x = torch.randn(48, 256)
    q = fourbit.quantize(x, config, rounding="stochastic", seed=7, backend="reference")
    data, scales, ts = torch.ops.fourbit.quantize(x, ops.scheme_key(config), True, 7, None, None, 0, 0, -1)
    assert torch.equal(data, q.data)
    assert torch.equal(scales.view(torch.uint8) if scales.dtype != torch.float32 else scales,
                       q.scales.view(torch.uint8) if q.scales.dtype != torch.float32 else q.scales)
    if q.tensor_scale is not None:
        assert torch.equal(ts, q.tensor_scale)
    assert (tuple(data.shape), tuple(scales.shape)) == ops.quantized_shapes(x.shape, config)


def test_quantize_op_device_key_equals_seed():
    """A key tensor (what the GPU computes) draws the same bits as the seed it came from."""
    config = SCHEMES["nvfp4"]
    x = torch.randn(32, 64)
    seed = derive_seed(5, 3, 11, Role.WGRAD_DY)
    by_seed = ops.quantize(x, config, stochastic=True, seed=seed)
    key = ops.seed_keys(torch.tensor([11]), seed_base(5, 3))[Role.WGRAD_DY]
    by_key = ops.quantize(x, config, stochastic=True, key=key)
    assert torch.equal(by_seed.data, by_key.data)


@pytest.mark.parametrize("pair", ["nvfp4", "mxfp4", "fp8", "fp8-blockwise"])
def test_qmm_op_opcheck_and_float64_reference(pair):
    config = SCHEMES[pair]
    a, b = torch.randn(32, 256), torch.randn(48, 256)
    qa, qb = fourbit.quantize(a, config), fourbit.quantize(b, config)
    args = (*ops._flat(qa), *ops._flat(qb), torch.float32)
    torch.library.opcheck(torch.ops.fourbit.qmm.default, args)
    out = ops.qmm(qa, qb)
    da, db = qa.dequantize(torch.float64), qb.dequantize(torch.float64)
    # float32 accumulation of K products: |error| <= K * 2^-24 * sum_k |a_k b_k| (the classic summation bound)
    bound = 256 * 2.0**-24 * (da.abs() @ db.abs().T)
    assert ((out.double() - da @ db.T).abs() <= bound).all()


def test_dequantized_ops_opcheck_and_values():
    """quantize_dequantized's reference values times the tensor scale are the dequantized tensor, exactly."""
    for config in (SCHEMES["nvfp4"], SCHEMES["nvfp4-2d"]):
        x = torch.randn(40, 128)
        args = (x, ops.scheme_key(config), False, 0, None, None, 0, 0, -1)
        torch.library.opcheck(torch.ops.fourbit.quantize_dequantized.default, args)
        d = ops.quantize_dequantized(x, config)
        expect = fourbit.quantize(x, config, pad=True).dequantize()
        assert torch.equal((d.values[: d.rows, :128].float() * d.tensor_scale), expect)
    a = ops.quantize_dequantized(torch.randn(16, 128), SCHEMES["nvfp4"])
    b = ops.quantize_dequantized(torch.randn(24, 128), SCHEMES["nvfp4"])
    torch.library.opcheck(torch.ops.fourbit.dequantized_mm.default,
                          (a.values, b.values, a.tensor_scale, b.tensor_scale, torch.float32))
    ref = (a.values.double() @ b.values.double().T) * a.tensor_scale.double() * b.tensor_scale.double()
    torch.testing.assert_close(ops.dequantized_mm(a, b).double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rht", [False, True], ids=["plain", "rht"])
def test_wgrad_ops_opcheck_and_reference_chain(rht):
    """quantize_wgrad's reference is quantize(rht(pad(t^T))) through the public functions."""
    config = SCHEMES["nvfp4"]
    t = torch.randn(40, 64)  # 40 tokens: padded to 48
    transform = RHT(16, 3) if rht else None
    signs = ops._signs(transform, t.device)
    for dequantized in (False, True):
        args = (t, ops.scheme_key(config), True, 99, None, signs, None, 0, 0, -1, dequantized)
        torch.library.opcheck(torch.ops.fourbit.quantize_wgrad.default, args)
    torch.library.opcheck(torch.ops.fourbit.wgrad_amax.default, (t, signs))
    a = torch.nn.functional.pad(t.T, (0, 8))
    a = fourbit.rht(a, -1, transform=transform) if rht else a
    expect = fourbit.quantize(a, config, rounding="stochastic", seed=99)
    got = ops.quantize_wgrad(t, config, stochastic=True, seed=99, transform=transform)
    assert torch.equal(got.data, expect.data) and torch.equal(got.tensor_scale, expect.tensor_scale)
    assert float(ops.wgrad_amax(t, transform)) == float(a.abs().amax())


@pytest.mark.parametrize("step", [0, 1, 2**40 + 3])
def test_seed_keys_op_matches_host_derivation(step):
    base = seed_base(1234, 7)
    keys = ops.seed_keys(torch.tensor([step]), base)
    torch.library.opcheck(torch.ops.fourbit.seed_keys.default, (torch.tensor([step]), base - (1 << 64) if base >= 1 << 63 else base))
    for role in Role:
        k = seed_key(derive_seed(1234, 7, step, role))
        assert int(keys[role]) & 0xFFFFFFFF == k


def test_advance_step_op():
    counter = torch.tensor([5])
    step = ops.advance_step(counter, True)
    assert int(step) == 5 and int(counter) == 6
    step = ops.advance_step(counter, False)
    assert int(step) == 6 and int(counter) == 6
    torch.library.opcheck(torch.ops.fourbit.advance_step.default, (torch.tensor([3]), True))


@pytest.mark.parametrize("recipe", ["nvfp4", "mxfp4", "fp8", "fp8-blockwise", "nvfp4-no-2d"])
def test_linear_ops_opcheck(recipe):
    r = get_recipe(recipe)
    x = torch.randn(32, 128, requires_grad=True)
    w = torch.randn(256, 128, requires_grad=True)
    step = torch.tensor([3])
    torch.library.opcheck(torch.ops.fourbit.linear_forward.default, (x, w, step, recipe_key(r), 1, 0, torch.float32))
    dy = torch.randn(32, 256)
    torch.library.opcheck(torch.ops.fourbit.linear_backward.default,
                          (dy, x.detach(), w.detach(), step, recipe_key(r), 1, 0, True, True))
    y = linear_forward(x, w, step, recipe_key(r), 1, 0, torch.float32)
    y.backward(dy)
    dx, dw = linear_backward(dy, x.detach(), w.detach(), step, recipe_key(r), 1, 0, True, True)
    assert torch.equal(x.grad, dx) and torch.equal(w.grad, dw)


def test_dequantized_k_align_is_the_gemm_kernels():
    """ops.DEQUANTIZED_K_ALIGN (checked before a launch, without importing triton) is the GEMM kernel's K step."""
    pytest.importorskip("triton")
    from fourbit.kernels.dequant_gemm import K_ALIGN

    assert ops.DEQUANTIZED_K_ALIGN == K_ALIGN
