"""GPU kernels vs the CPU reference: bit-exact quantization, GEMMs against float64, dispatch and errors.

Everything marked ``gpu`` needs CUDA and triton (skipped otherwise); the rest runs on the CPU in CI.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import fourbit
from fourbit import ops
import fourbit.kernels as K
from fourbit.rounding import ElementIndex
from fourbit.kernels.swizzle import blocked_offset, from_blocked, to_blocked
from kernel_cases import BF16_OUT_RTOL, assert_same_bytes, block_values, edge_input, gemm_check, grid_operand

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
BLOCKS = [(1, 16), (16, 16)]
BLOCK_IDS = ["1x16", "16x16"]
KINDS = ["random", "zeros", "denormals", "huge", "ties", "mixed_scale"]
# (leading shape..., C): tile is 32 x 128, so these cut tiles in both directions
SHAPES = [(256, 512), (272, 304), (3, 16, 48)]
SHAPE_IDS = ["256x512", "272x304", "3x16x48"]

gpu = pytest.mark.gpu


def _ref(x, **kw):
    return fourbit.quantize(x.cpu(), backend="reference", **kw)


def _cuda(q):
    return dataclasses.replace(q, data=q.data.cuda(), scales=q.scales.cuda(), tensor_scale=q.tensor_scale.cuda())


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- quantize: bit-exact ---------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_nvfp4_quantize_bit_exact(kind, block, dtype, rounding):
    x = edge_input(kind, (272, 304), dtype, _gen(hash(kind) % 1000)).cuda()
    kw = dict(block=block, rounding=rounding, seed=1234 if rounding == "stochastic" else None)
    assert_same_bytes(fourbit.quantize(x, "nvfp4", backend="triton", **kw), _ref(x, scheme="nvfp4", **kw))


@gpu
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_nvfp4_quantize_shapes(shape, block, rounding):
    x = (torch.randn(*shape, generator=_gen(1)) * 3).bfloat16().cuda()
    if block == (16, 16) and (x.numel() // x.shape[-1]) % 16:
        pytest.skip("rows not a multiple of 16")
    kw = dict(block=block, rounding=rounding, seed=7)
    got = fourbit.quantize(x, "nvfp4", backend="triton", **kw)
    want = _ref(x, scheme="nvfp4", **kw)
    assert got.data.shape == want.data.shape and got.scales.shape == want.scales.shape
    assert_same_bytes(got, want)


@gpu
@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize("shape", [(33, 70), (5, 3, 20), (17, 16)], ids=["33x70", "5x3x20", "17x16"])
def test_nvfp4_quantize_pad(shape, block):
    x = torch.randn(*shape, generator=_gen(2)).cuda()
    kw = dict(block=block, pad=True, rounding="stochastic", seed=99)
    assert_same_bytes(fourbit.quantize(x, "nvfp4", backend="triton", **kw), _ref(x, scheme="nvfp4", **kw))


@gpu
@pytest.mark.parametrize("amax", [0.5, 1e-30, 0.0], ids=["below", "tiny", "zero"])  # inf/NaN/-1: ValueError (test_bad_input)
def test_nvfp4_quantize_given_amax(amax):
    x = torch.randn(64, 256, generator=_gen(3)).cuda()
    kw = dict(amax=amax)
    assert_same_bytes(fourbit.quantize(x, "nvfp4", backend="triton", **kw), _ref(x, scheme="nvfp4", **kw))
    amax_t = torch.tensor(amax, device="cuda")
    assert_same_bytes(fourbit.quantize(x, "nvfp4", backend="triton", amax=amax_t), _ref(x, scheme="nvfp4", **kw))


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nvfp4_quantize_nonfinite(dtype):
    x = torch.randn(64, 128, generator=_gen(4)).to(dtype)
    x[3, 5], x[10, 40], x[20, 100] = float("nan"), float("inf"), float("-inf")
    kw = dict(check_finite=False)
    x = x.cuda()
    assert_same_bytes(fourbit.quantize(x, "nvfp4", backend="triton", **kw), _ref(x, scheme="nvfp4", **kw))


@gpu
def test_nvfp4_stochastic_seed_determinism():
    x = torch.randn(128, 256, generator=_gen(5)).cuda()
    a = fourbit.quantize(x, "nvfp4", rounding="stochastic", seed=11, backend="triton")
    b = fourbit.quantize(x, "nvfp4", rounding="stochastic", seed=11, backend="triton")
    c = fourbit.quantize(x, "nvfp4", rounding="stochastic", seed=12, backend="triton")
    assert torch.equal(a.data, b.data)
    assert not torch.equal(a.data, c.data)


@gpu
def test_nvfp4_large_index_stochastic():
    """Flat indices past 2^32 exercise the high word of the counter (r * C + c >= 2^32)."""
    from fourbit.nvfp4 import quantize_nvfp4
    from fourbit.packing import pack_fp4
    from fourbit.rounding import Rounding, random_bits

    R0, C = 2**16, 2**16
    x = torch.randn(R0 + 16, C, dtype=torch.bfloat16, device="cuda")
    q = fourbit.quantize(x, "nvfp4", rounding="stochastic", seed=3, backend="triton")
    tail = x[-16:].cpu().float()  # rows whose flat indices are >= 2^32
    bits = random_bits(3, (torch.arange(16)[:, None] + R0) * C + torch.arange(C))
    amax = x.abs().max().float().cpu()
    codes, scales, _ = quantize_nvfp4(tail, q.config, Rounding.STOCHASTIC, bits, amax)
    assert torch.equal(q.data[-16:].cpu(), pack_fp4(codes))
    assert torch.equal(q.scales[-16:].view(torch.uint8).cpu(), scales.view(torch.uint8))


@gpu
@pytest.mark.parametrize("block", [(1, 16), (16, 16)], ids=["1x16", "16x16"])
@pytest.mark.parametrize(
    "index", [ElementIndex(32, 0, None), ElementIndex(2**26 + 16, 48, 4096), ElementIndex(0, 16, 512)],
    ids=["rows", "past-2^32", "cols"],
)
def test_nvfp4_stochastic_element_index(block, index):
    """A shard quantized with its place in the whole (ElementIndex) takes the reference's bits, and the
    row shards of a matrix reassemble the whole matrix's quantization when they share its amax."""
    x = torch.randn(64, 256, generator=_gen(8)).cuda()
    kw = dict(block=block, rounding="stochastic", seed=21, sr_index=index)
    got = fourbit.quantize(x, "nvfp4", backend="triton", **kw)
    assert_same_bytes(got, fourbit.quantize(x.cpu(), "nvfp4", backend="reference", **kw))
    whole = fourbit.quantize(x, "nvfp4", block=block, rounding="stochastic", seed=21, backend="triton")
    amax = x.abs().max()
    parts = [
        fourbit.quantize(x[r : r + 32], "nvfp4", block=block, rounding="stochastic", seed=21, amax=amax,
                         sr_index=ElementIndex(row_offset=r), backend="triton")
        for r in (0, 32)
    ]
    assert torch.equal(torch.cat([p.data for p in parts]), whole.data)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rht_on", [True, False], ids=["rht", "no-rht"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("shape", [(1000, 768), (4096, 272), (16, 16)], ids=["pad-tokens", "odd-features", "one-block"])
def test_wgrad_kernel_bit_exact(shape, rounding, rht_on, dtype):
    """quantize_wgrad(t) = quantize(rht(pad(t^T))): the fused transpose + pad + RHT + quantize kernel."""
    import torch.nn.functional as F

    from fourbit.hadamard import RHT, rht

    t = (torch.randn(shape, generator=_gen(21)) * 5).to(dtype).cuda()
    transform = RHT(16, 1234) if rht_on else None
    a = F.pad(t.T, (0, (-shape[0]) % 16))
    a = rht(a, -1, transform=transform) if rht_on else a
    for index in (None, ElementIndex(col_offset=a.shape[1], row_stride=3 * a.shape[1])):
        kw = dict(rounding=rounding, seed=5 if rounding == "stochastic" else None, sr_index=index)
        want = fourbit.quantize(a.cpu(), "nvfp4", pad=True, backend="reference", **kw)
        got = K.quantize_wgrad(t, want.config, transform=transform, **kw)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert_same_bytes(got, want)
        amax = K.wgrad_amax(t, want.config, transform)
        assert torch.equal(amax.cpu().reshape(()), a.abs().max().float().cpu())


@gpu
def test_quantlinear_wgrad_uses_fused_kernel_bit_exact(monkeypatch):
    """dW through the fused wgrad kernel equals dW through the reference chain (transpose, pad, RHT, quantize)."""
    from fourbit.nn import QuantLinear

    lin = QuantLinear(256, 128, bias=False, recipe="nvfp4").cuda()
    x = torch.randn(200, 256, device="cuda", requires_grad=True)
    calls = []
    real = ops.quantize_wgrad
    monkeypatch.setattr(ops, "quantize_wgrad", lambda *a, **k: calls.append(1) or real(*a, **k))
    lin(x).square().sum().backward()
    fused_dw = lin.weight.grad.clone()
    assert calls, "the fused wgrad kernel was not used"
    monkeypatch.setattr(ops, "wgrad_applies", lambda *a: False)  # the reference chain instead
    lin.weight.grad = None
    lin.step = 0  # same SR seeds
    lin(x).square().sum().backward()
    assert torch.equal(lin.weight.grad, fused_dw)


@gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_dequantized_operand_bit_exact(kind, block, dtype, rounding):
    """``quantize_dequantized``: values = e2m1(code) * e4m3(block scale) of the CPU reference, exactly (NaN
    blocks NaN), the tensor scale bit for bit; rows and columns cut tiles and are padded to blocks."""
    x = edge_input(kind, (272, 312), dtype, _gen(hash(kind) % 1000)).cuda()
    kw = dict(block=block, rounding=rounding, seed=1234 if rounding == "stochastic" else None)
    want = _ref(x, scheme="nvfp4", pad=True, check_finite=False, **kw)
    got = K.quantize_dequantized(x, want.config, rounding=rounding, seed=kw["seed"])
    assert got.rows == 272 and got.values.dtype == torch.bfloat16
    torch.testing.assert_close(got.values.cpu().double(), block_values(want), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got.tensor_scale.cpu().view(torch.int32), want.tensor_scale.view(torch.int32))


@gpu
@pytest.mark.parametrize("rht_on", [True, False], ids=["rht", "no-rht"])
@pytest.mark.parametrize("shape", [(1000, 768), (4096, 272)], ids=["pad-tokens", "odd-features"])
def test_wgrad_kernel_dequantized_bit_exact(shape, rht_on):
    """``quantize_wgrad(..., dequantized=True)`` = codes times scales of its packed (bit-exact) output."""
    from fourbit.hadamard import RHT
    from fourbit.schemes import NVFP4Config

    t = (torch.randn(shape, generator=_gen(22)) * 5).bfloat16().cuda()
    kw = dict(rounding="stochastic", seed=5, transform=RHT(16, 1234) if rht_on else None)
    packed = K.quantize_wgrad(t, NVFP4Config(), **kw)
    got = K.quantize_wgrad(t, NVFP4Config(), dequantized=True, **kw)
    want = dataclasses.replace(packed, data=packed.data.cpu(), scales=packed.scales.cpu())
    assert got.rows == shape[1]
    assert torch.equal(got.values.cpu().double(), block_values(want))
    assert torch.equal(got.tensor_scale.cpu(), packed.tensor_scale.cpu())


@gpu
@pytest.mark.parametrize("rht_on", [True, False], ids=["rht", "no-rht"])
@pytest.mark.parametrize("shape", [(1000, 768), (4096, 272), (16384, 768)], ids=["pad-tokens", "odd-features", "preset"])
def test_dual_kernel_bit_exact(shape, rht_on):
    """``quantize_dual`` = ``quantize`` (rowwise) and ``quantize_wgrad`` (columnwise) bit for bit, packed and
    dequantized, with a NaN poisoning one block on each side and a given amax pair."""
    from fourbit.hadamard import RHT
    from fourbit.schemes import NVFP4Config

    t = (torch.randn(shape, generator=_gen(23)) * 5).bfloat16().cuda()
    t[3, 40] = float("nan")
    cfg, tr = NVFP4Config(), RHT(16, 99) if rht_on else None
    row, col = K.DualOperand("nearest"), K.DualOperand("stochastic", 7)
    want_r = fourbit.quantize(t, cfg, check_finite=False, backend="triton")
    want_c = K.quantize_wgrad(t, cfg, rounding="stochastic", seed=7, transform=tr)
    for amax in (None, K.dual_amax(t, cfg, tr)):
        r, c = K.quantize_dual(t, cfg, row, col, transform=tr, amax=amax)
        assert_same_bytes(r, want_r)
        assert_same_bytes(c, want_c)
    dr, dc = K.quantize_dual(t, cfg, row, col, transform=tr, dequantized=True)
    assert torch.equal(dr.values.view(torch.int16), K.quantize_dequantized(t, cfg, rounding="nearest").values.view(torch.int16))
    assert torch.equal(dc.values.view(torch.int16), K.quantize_wgrad(t, cfg, rounding="stochastic", seed=7, transform=tr,
                                                                     dequantized=True).values.view(torch.int16))  # fmt: skip


@gpu
@pytest.mark.parametrize("recipe", ["nvfp4", "nvfp4-no-2d", "nvfp4-none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_quantlinear_dequantized_path_matches_packed_path(recipe, dtype, monkeypatch):
    """On CUDA QuantLinear runs its GEMMs on ``Dequantized`` operands (``_emulates``); y, dx and dW equal the
    packed path's (quantize, dequantize, GEMM) up to float32 summation order: same codes, scales, seeds."""
    import fourbit.nn.functional as L
    from fourbit.nn import QuantLinear

    lin = QuantLinear(768, 256, bias=False, recipe=recipe).cuda().to(dtype)
    x = (torch.randn(1020, 768, generator=_gen(3)) * 2).to(dtype).cuda()  # 1020 tokens: wgrad pads to 1024
    dy = torch.randn(1020, 256, generator=_gen(4)).to(dtype).cuda()
    real, used, outs = L._emulates, [], []
    monkeypatch.setattr(L, "_emulates", lambda *a: used.append(real(*a)) or used[-1])
    for _ in range(2):
        lin.step, lin.weight.grad = 0, None
        xi = x.clone().requires_grad_()
        y = lin(xi)
        y.backward(dy)
        outs.append([y.detach().float(), xi.grad.float(), lin.weight.grad.float()])
        monkeypatch.setattr(L, "_emulates", lambda *a: False)
    assert used and all(used[:2]), "the dequantized path was not taken"  # forward and backward each decide
    tol = 2e-6 if dtype == torch.float32 else 8e-3  # bf16 outputs: one rounding of a slightly different sum
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))


MX_GPU_CASES = [(s, f) for s, f in (("mxfp4", None), ("mxfp6", None), ("mxfp6", "e3m2"), ("mxfp8", None), ("mxfp8", "e5m2"))]


@gpu
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("mode", ["floor", "rceil"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scheme,fmt", MX_GPU_CASES, ids=[f"{s}-{f or 'default'}" for s, f in MX_GPU_CASES])
def test_mx_kernel_bit_exact(scheme, fmt, dtype, mode, rounding):
    """The MX kernel (``backend="triton"``) = the reference, byte for byte, on edge inputs with padding,
    non-finite blocks, scales across E8M0's range and an ElementIndex for stochastic rounding."""
    for kind in KINDS:
        x = edge_input(kind, (48, 208), dtype, _gen(30))  # 208 columns: padded to 224
        x[1, 5] = float("nan")
        index = ElementIndex(row_offset=3, col_offset=9, row_stride=1000) if rounding == "stochastic" else None
        kw = dict(fmt=fmt, scale_mode=mode, rounding=rounding, seed=8 if rounding == "stochastic" else None,
                  sr_index=index, pad=True, check_finite=False)  # fmt: skip
        got = fourbit.quantize(x.cuda(), scheme, backend="triton", **kw)
        assert_same_bytes(got, fourbit.quantize(x, scheme, backend="reference", **kw))


FP8_GPU_CASES = [(None, None), (None, "e5m2"), ((1, 128), None), ((128, 128), None), ((128, 128), "e5m2")]


@gpu
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("pow2", [False, True], ids=["fp32-scale", "pow2-scale"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block,fmt", FP8_GPU_CASES, ids=["tensor", "tensor-e5m2", "1x128", "128x128", "128x128-e5m2"])
def test_fp8_kernel_bit_exact(block, fmt, dtype, pow2, rounding):
    """The FP8 kernel (``backend="triton"``) = the reference, byte for byte and scale bit for scale bit,
    on the edge inputs, padded shapes (rows and columns for 128x128) and with an ElementIndex for SR."""
    for kind in KINDS:
        x = edge_input(kind, (136, 208), dtype, _gen(31))
        index = ElementIndex(row_offset=3, col_offset=9, row_stride=1000) if rounding == "stochastic" else None
        kw = dict(block=block, fmt=fmt, pow2_scale=pow2, rounding=rounding, seed=8 if rounding == "stochastic" else None,
                  sr_index=index, pad=block is not None, check_finite=False)  # fmt: skip
        got = fourbit.quantize(x.cuda(), "fp8", backend="triton", **kw)
        want = fourbit.quantize(x, "fp8", backend="reference", **kw)
        assert torch.equal(got.data.cpu(), want.data)
        assert torch.equal(got.scales.cpu().view(torch.int32), want.scales.view(torch.int32))


@gpu
@pytest.mark.parametrize("scheme,kw", [("mxfp4", {}), ("mxfp8", {"scale_mode": "rceil"}), ("fp8", {}),
                                       ("fp8-blockwise", {}), ("fp8-blockwise", {"block": (128, 128)})])  # fmt: skip
def test_mx_fp8_auto_is_the_kernel_on_large_inputs(scheme, kw, monkeypatch):
    """On CUDA, ``backend="auto"`` runs the MX/FP8 kernels, and they match the reference over many programs
    (1000 rows x 3 column tiles, rows not a multiple of the tile, magnitudes over 6 decades)."""
    from fourbit.kernels import fp8_quantize, mx_quantize

    calls = []
    for mod, name in ((mx_quantize, "quantize_mx"), (fp8_quantize, "quantize_fp8")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    x = torch.randn(1000, 384, generator=_gen(32)) * torch.logspace(-3, 3, 384)
    for rounding, seed in (("nearest", None), ("stochastic", 5)):
        args = dict(kw, rounding=rounding, seed=seed, pad=True, check_finite=False)
        n = len(calls)
        auto = fourbit.quantize(x.cuda(), scheme, **args)
        assert len(calls) == n + 1, "backend='auto' did not run the kernel"
        assert_same_bytes(auto, fourbit.quantize(x, scheme, backend="reference", **args))


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4", "fp8-blockwise"])
def test_kernels_launch_on_the_operands_device(scheme):
    from fourbit.gemm import qmm

    """Tensors on cuda:1 while cuda:0 is current: every kernel runs on cuda:1 (Triton launches on the
    current device unless told), and matches the reference; so does the GEMM of two such operands."""
    x = torch.randn(256, 512, generator=_gen(33))
    torch.cuda.set_device(0)
    q = fourbit.quantize(x.to("cuda:1"), scheme, rounding="stochastic", seed=3, check_finite=False)
    assert q.data.device == torch.device("cuda:1")
    assert_same_bytes(q, fourbit.quantize(x, scheme, backend="reference", rounding="stochastic", seed=3))
    w = fourbit.quantize(x[:128].to("cuda:1"), scheme, check_finite=False)
    got = qmm(q, w, out_dtype=torch.float32)
    assert got.device == torch.device("cuda:1")
    want = q.dequantize().double() @ w.dequantize().double().T
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_operand_device_finds_the_first_cuda_operand():
    from fourbit.kernels.device import operand_device

    cpu = torch.zeros(2)
    assert operand_device((cpu, 3, None)) is None
    q = fourbit.quantize(torch.randn(4, 16), "nvfp4")
    assert operand_device((q,)) is None  # a CPU QuantizedTensor (by its codes)


@gpu
@pytest.mark.parametrize("scheme,kw", [("mxfp4", {}), ("mxfp8", {"scale_mode": "rceil"}), ("fp8", {}),
                                       ("fp8-blockwise", {}), ("fp8-blockwise", {"block": (128, 128)})])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_mx_fp8_kernels_read_transposed_views_in_place(scheme, kw, dtype):
    """The MX and FP8 kernels quantize wgrad's ``t.T`` straight from ``t`` (no contiguous copy), under
    ``backend="triton"`` and ``"auto"`` alike: the bytes of the reference on the contiguous transpose, with
    padding of the token dim and SR with an ElementIndex."""
    t = (torch.randn(1000, 384, generator=_gen(34)) * torch.logspace(-3, 3, 384)).to(dtype)  # (tokens, features)
    for rounding, seed in (("nearest", None), ("stochastic", 5)):
        index = ElementIndex(col_offset=1000, row_stride=4000) if seed else None
        args = dict(kw, rounding=rounding, seed=seed, sr_index=index, pad=True, check_finite=False)
        want = fourbit.quantize(t.T.contiguous(), scheme, backend="reference", **args)
        for backend in ("triton", "auto"):
            assert_same_bytes(fourbit.quantize(t.cuda().T, scheme, backend=backend, **args), want)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantize_swizzled_on_gpu(dtype):
    """``fourbit.kernels.quantize_swizzled``: fourbit.quantize's codes and tensor scale, and its scales in
    SWIZZLE_32_4_4 order, for a shape that pads both the 128-row and the 4-block tiles."""
    x = edge_input("random", (300, 208), dtype, _gen(35))
    data, scales, tscale = K.quantize_swizzled(x.cuda(), rounding="stochastic", seed=2, pad=True)
    want = fourbit.quantize(x, "nvfp4", rounding="stochastic", seed=2, pad=True, backend="reference")
    assert torch.equal(data.cpu(), want.data)
    assert torch.equal(tscale.cpu().view(torch.int32), want.tensor_scale.view(torch.int32))
    assert torch.equal(scales.cpu().view(torch.uint8), to_blocked(want.scales.view(torch.uint8)))


# --- dispatch and bad input ------------------------------------------------------------------------


@gpu
def test_auto_uses_kernel_and_matches():
    x = torch.randn(64, 128, device="cuda")
    auto = fourbit.quantize(x, "nvfp4")
    assert auto.data.is_cuda
    assert_same_bytes(auto, fourbit.quantize(x, "nvfp4", backend="triton"))


@gpu
def test_non_contiguous_is_copied():
    x = torch.randn(256, 96, device="cuda").t()  # (96, 256), strides (1, 96)
    assert not x.is_contiguous()
    assert_same_bytes(fourbit.quantize(x, "nvfp4", backend="triton"), _ref(x.contiguous(), scheme="nvfp4"))


@gpu
def test_bad_input_same_errors_as_reference():
    for x, kw, err in [
        (torch.ones(4, 16, dtype=torch.int32), {}, TypeError),
        (torch.ones(4, 20), {}, ValueError),  # 20 not divisible by 16
        (torch.ones(20, 16), {"block": (16, 16)}, ValueError),
        (torch.tensor([[float("nan")] * 16]), {}, ValueError),  # check_finite
    ]:
        with pytest.raises(err) as ref_err:
            fourbit.quantize(x, "nvfp4", backend="reference", **kw)
        with pytest.raises(err) as gpu_err:
            fourbit.quantize(x.cuda(), "nvfp4", backend="triton", **kw)
        assert str(gpu_err.value) == str(ref_err.value)


@gpu
def test_uncovered_options():
    x = torch.randn(32, 64, device="cuda")
    with pytest.raises(NotImplementedError, match="four_over_six"):
        fourbit.quantize(x, "nvfp4", four_over_six=True, backend="triton")
    assert fourbit.quantize(x, "nvfp4", four_over_six=True).data.is_cuda  # auto falls back to the reference
    with pytest.raises(NotImplementedError, match="mxfp4"):
        fourbit.quantize(x, "mxfp4", block=(32, 32), backend="triton")  # 2D MX blocks: no kernel
    with pytest.raises(NotImplementedError, match="fp8"):
        fourbit.quantize(x, "fp8", block=(1, 32), backend="triton")  # FP8 with 1x32 tiles: no kernel


def test_triton_backend_on_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        fourbit.quantize(torch.randn(4, 16), "nvfp4", backend="triton")


def test_auto_on_cpu_is_the_reference():
    x = torch.randn(8, 32)
    assert_same_bytes(fourbit.quantize(x, "nvfp4"), fourbit.quantize(x, "nvfp4", backend="reference"))


# --- GEMMs ---------------------------------------------------------------------------------------------

GEMM_SHAPES = [(256, 384, 512), (200, 176, 272), (64, 64, 4096)]
GEMM_IDS = ["256x384x512", "200x176x272", "64x64x4096"]


@gpu
@pytest.mark.parametrize("b_block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=GEMM_IDS)
@pytest.mark.parametrize("method", ["dequant", "cublas"])
def test_qmm_vs_float64(shape, b_block, method):
    from fourbit.kernels.nvfp4_gemm import qmm

    M, N, Kd = shape
    a = grid_operand(M, Kd, _gen(10), (1, 16))
    b = grid_operand(N, Kd, _gen(11), b_block)
    out = qmm(_cuda(a), _cuda(b), method=method)
    a_hat, b_hat = a.dequantize(), b.dequantize()
    assert out.shape == (M, N) and out.dtype == torch.float32
    gemm_check(out, a_hat, b_hat)
    if method == "dequant":  # the default behind fourbit.kernels.qmm, also in bf16 (rounded once)
        assert torch.equal(K.qmm(_cuda(a), _cuda(b)), out)
        gemm_check(K.qmm(_cuda(a), _cuda(b), out_dtype=torch.bfloat16), a_hat, b_hat, rtol_out=BF16_OUT_RTOL)


@gpu
@pytest.mark.parametrize("shape", [(256, 512), (4096, 768), (48, 4112)], ids=["small", "gpu-preset", "edges"])
def test_transpose_of_2d_weight_uses_kernel_and_matches_requantizing(shape):
    """gemm.transpose on CUDA (packed-FP4 transpose kernel) = quantizing W^T afresh, byte for byte."""
    from fourbit.gemm import transpose

    w = torch.randn(shape, generator=_gen(18)).cuda()
    qt = transpose(fourbit.quantize(w, "nvfp4", block=(16, 16)))
    assert_same_bytes(qt, fourbit.quantize(w.T.contiguous(), "nvfp4", block=(16, 16), backend="reference"))


@gpu
def test_qmm_mxfp4_dequant_path():
    """MXFP4 x MXFP4 on CUDA: dequantized to BF16, BF16 GEMM; within the float32-accumulation bound."""
    x = torch.randn(200, 320, generator=_gen(16)) * torch.logspace(-8, 8, 320)
    w = torch.randn(176, 320, generator=_gen(17))
    a, b = fourbit.quantize(x.cuda(), "mxfp4"), fourbit.quantize(w.cuda(), "mxfp4")
    out = K.qmm(a, b)
    assert out is not None and out.shape == (200, 176)
    gemm_check(out, a.dequantize().cpu(), b.dequantize().cpu())


@gpu
def test_qmm_dequant_tiles():
    """Every GEMM tile of the dequantize-then-GEMM path, on edges that are not multiples of any tile."""
    from fourbit.kernels.dequant_gemm import GEMM_TILES
    from fourbit.kernels.nvfp4_gemm import qmm

    a = _cuda(grid_operand(200, 272, _gen(14), (1, 16)))
    b = _cuda(grid_operand(176, 272, _gen(15), (16, 16)))
    for tile in GEMM_TILES:
        gemm_check(qmm(a, b, config=tile, method="dequant"), a.dequantize().cpu(), b.dequantize().cpu())


@gpu
def test_qmm_padded_k_and_configs():
    x, w = torch.randn(48, 40, generator=_gen(12)).cuda(), torch.randn(32, 40, generator=_gen(13)).cuda()
    a, b = fourbit.quantize(x, "nvfp4", pad=True), fourbit.quantize(w, "nvfp4", pad=True)
    from fourbit.kernels.dequant_gemm import GEMM_TILES
    from fourbit.kernels.nvfp4_gemm import qmm

    for tile in (None, *GEMM_TILES):
        gemm_check(qmm(a, b, config=tile), a.dequantize().cpu(), b.dequantize().cpu())


@gpu
def test_qmm_declines_other_schemes():
    a = fourbit.quantize(torch.randn(32, 64, device="cuda"), "mxfp8")  # MXFP8: no GEMM kernel (falls back)
    assert K.qmm(a, a) is None
    b = fourbit.quantize(torch.randn(32, 64, device="cuda"), "nvfp4")
    assert K.qmm(fourbit.quantize(torch.randn(32, 64, device="cuda"), "mxfp4"), b) is None  # mixed schemes


@gpu
def test_qmm_runs_fp8_on_scaled_mm():
    g = torch.Generator(device="cuda").manual_seed(0)
    a = fourbit.quantize(torch.randn(64, 256, device="cuda", generator=g), "fp8")
    b = fourbit.quantize(torch.randn(32, 256, device="cuda", generator=g), "fp8")
    ref = a.dequantize().double() @ b.dequantize().double().T
    out = K.qmm(a, b)
    assert out.dtype == torch.float32
    # FP8 x FP8 products are exact, but Hopper's FP8 tensor cores accumulate with ~14 significant bits
    # (DeepSeek-V3 section 3.5.2): errors up to ~2^-13 of the running sum, not FP32 round-off
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-3 * float(ref.abs().max()))


@gpu
@pytest.mark.parametrize("batch", [1, 3, 4, 5, 16])
@pytest.mark.parametrize("w_block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize("Kd", [512, 304], ids=["K512", "K304"])  # 304: K not a multiple of the K step
def test_w4a16_vs_float64(batch, w_block, Kd):
    N = 272
    w = grid_operand(N, Kd, _gen(20), w_block)
    w_hat = w.dequantize()
    w = _cuda(w)
    x = torch.randn(batch, Kd, generator=_gen(21)).bfloat16()
    from fourbit.kernels.nvfp4_gemm import FMA_BATCH_LIMIT, GEMV_CONFIGS, GEMV_FMA_CONFIGS, linear_w4a16

    # the default dispatch, a plain and a split-K tensor-core config, two CUDA-core configs (compiles are slow)
    configs = (None, GEMV_CONFIGS[0], GEMV_CONFIGS[-1]) + (GEMV_FMA_CONFIGS[:2] if batch <= FMA_BATCH_LIMIT else ())
    for cfg in configs:
        y = torch.full((batch, N), float("nan"), dtype=torch.bfloat16, device="cuda")  # poison the allocator
        del y
        y = linear_w4a16(x.cuda(), w, config=cfg)
        assert y.shape == (batch, N) and y.dtype == torch.bfloat16
        gemm_check(y, x.float(), w_hat, rtol_out=BF16_OUT_RTOL)


@gpu
def test_w4a16_bias_and_declines():
    w = fourbit.quantize(torch.randn(64, 128, device="cuda"), "nvfp4")
    x = torch.randn(2, 3, 128, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(64, device="cuda", dtype=torch.bfloat16)
    y = K.linear_w4a16(x, w, bias)
    ref = x.double() @ w.dequantize(torch.float64).T + bias.double()
    assert y.shape == (2, 3, 64)
    assert float((y.double() - ref).abs().max()) <= 0.05 * float(ref.abs().max())
    assert K.linear_w4a16(torch.randn(17, 128, device="cuda", dtype=torch.bfloat16), w) is None  # batch > 16
    assert K.linear_w4a16(x.float(), w) is None  # not bf16


@gpu
def test_torch_compile_of_quantized_linear():
    w = fourbit.quantize(torch.randn(128, 256, device="cuda"), "nvfp4")

    def f(x):
        return K.qmm(fourbit.quantize(x, "nvfp4"), w)

    x = torch.randn(64, 256, device="cuda")
    assert torch.equal(torch.compile(f)(x), f(x))


# --- FP8 through scaled_mm ------------------------------------------------------------------------------

# Hopper's FP8 tensor cores accumulate with about 14 bits of alignment (DeepSeek-V3, section 3.3.2), and
# the output is bf16: bound the error by 2^-11 of sum |a b| plus one bf16 rounding.
FP8_ACCUM_RTOL = 2.0**-11


@gpu
@pytest.mark.parametrize(
    "a_block,b_block",
    [(None, None), ((1, 128), (128, 128)), ((1, 128), (1, 128))],
    ids=["tensorwise", "1x128-128x128", "1x128-1x128"],
)
def test_fp8_mm_vs_float64(a_block, b_block):
    M, N, Kd = 256, 384, 640
    x, w = torch.randn(M, Kd, generator=_gen(30)).cuda(), torch.randn(N, Kd, generator=_gen(31)).cuda()
    a = fourbit.quantize(x, "fp8", block=a_block)
    b = fourbit.quantize(w, "fp8", block=b_block)
    out = K.fp8_mm(a, b)
    assert out is not None and out.dtype == torch.bfloat16
    a64, b64 = a.dequantize(torch.float64).cpu(), b.dequantize(torch.float64).cpu()
    ref = a64 @ b64.T
    err = (out.double().cpu() - ref).abs()
    assert bool((err <= FP8_ACCUM_RTOL * (a64.abs() @ b64.abs().T) + BF16_OUT_RTOL * ref.abs()).all())


@gpu
def test_fp8_mm_falls_back_with_reason():
    a = fourbit.quantize(torch.randn(64, 192, device="cuda"), "fp8", block=(1, 64))
    with pytest.warns(UserWarning, match="not wired"):
        assert K.fp8_mm(a, a) is None
    b = fourbit.quantize(torch.randn(64, 96, device="cuda"), "fp8", block=(1, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert K.fp8_mm(b, b) is None


@gpu
def test_native_nvfp4_is_gated_off_hopper():
    a = fourbit.quantize(torch.randn(128, 128, device="cuda"), "nvfp4")
    from fourbit.kernels.fp8_gemm import nvfp4_mm_native

    if torch.cuda.get_device_capability() < (10, 0):
        assert nvfp4_mm_native(a, a) is None
    else:  # pragma: no cover - Blackwell only
        gemm_check(nvfp4_mm_native(a, a, out_dtype=torch.float32), a.dequantize().cpu(), a.dequantize().cpu())


def test_fp8_mm_on_cpu_declines():
    from fourbit.kernels.fp8_gemm import fp8_mm_unsupported

    a = fourbit.quantize(torch.randn(16, 128), "fp8")
    assert "CUDA" in fp8_mm_unsupported(a, a)


# --- swizzled scale layout (CPU) ---------------------------------------------------------------------


@pytest.mark.parametrize("rows,cols", [(128, 4), (300, 7), (5, 12), (256, 64)], ids=str)
def test_swizzle_matches_closed_form_and_inverts(rows, cols):
    s = torch.randint(0, 255, (rows, cols), dtype=torch.uint8, generator=_gen(40))
    blocked = to_blocked(s)
    assert blocked.numel() == (-(-rows // 128) * 128) * (-(-cols // 4) * 4)
    r = torch.arange(rows)[:, None].expand(rows, cols)
    c = torch.arange(cols)[None, :].expand(rows, cols)
    assert torch.equal(blocked[blocked_offset(r, c, cols)], s)
    assert torch.equal(from_blocked(blocked, rows, cols), s)
    # the padding is zero: exactly rows * cols nonzero-able slots are taken by S
    mask = torch.zeros(blocked.numel(), dtype=torch.bool)
    mask[blocked_offset(r, c, cols).reshape(-1)] = True
    assert int(mask.sum()) == rows * cols and not bool(blocked[~mask].any())


def test_swizzle_known_positions():
    """cuBLAS layout by hand: (r, c) = (33, 2) sits in tile 0 at lane 1, row group 1, column 2."""
    s = torch.zeros(128, 4, dtype=torch.uint8)
    s[33, 2] = 7
    assert int(to_blocked(s).nonzero()) == 1 * 16 + 1 * 4 + 2


def test_quantize_swizzled_is_cuda_only():
    with pytest.raises(ValueError, match="CUDA"):
        K.quantize_swizzled(torch.randn(16, 32))


@gpu
def test_seed_keys_and_device_keys_on_gpu():
    """On the GPU: ``seed_keys`` = the host's ``seed_key(derive_seed(...))`` for every role, and the quantize
    kernels give the same bytes with the key read from device memory as with the int seed (NVFP4 1x16 and
    wgrad, MXFP4, FP8 1x128, all stochastically rounded; also inside a captured and replayed CUDA graph,
    which then follows the key written before each replay)."""
    from fourbit.nn.linear import Role, derive_seed, seed_base
    from fourbit.rounding import seed_key
    from fourbit.schemes import NVFP4Config as NVFP4

    dev = torch.device("cuda")
    for seed, layer, step in ((0, 0, 0), (2**63 - 1, 17, 12345), (99, 3, 2**40 + 7)):
        counter = torch.tensor([step], dtype=torch.int64, device=dev)
        keys = K.seed_keys(counter, seed_base(seed, layer), True)
        assert (keys.long() & 0xFFFFFFFF).tolist() == [seed_key(derive_seed(seed, layer, step, r)) for r in Role]
        assert int(counter) == step + 1

    def key_of(seed):
        k = seed_key(seed)
        return torch.tensor([k - (1 << 32) if k >= 1 << 31 else k], dtype=torch.int32, device=dev)

    x = torch.randn(256, 512, generator=_gen(5)).cuda() * 3
    cases = [("nvfp4", {}), ("mxfp4", {}), ("fp8", dict(block=(1, 128)))]
    for scheme, kw in cases:
        want = fourbit.quantize(x, scheme, rounding="stochastic", seed=7, **kw)
        got = fourbit.quantize(x, scheme, rounding="stochastic", seed=key_of(7), **kw)
        assert torch.equal(got.data, want.data) and torch.equal(got.scales.view(torch.uint8), want.scales.view(torch.uint8))
    w_want = K.quantize_wgrad(x, NVFP4(), rounding="stochastic", seed=11)
    w_got = K.quantize_wgrad(x, NVFP4(), rounding="stochastic", seed=key_of(11))
    assert torch.equal(w_got.data, w_want.data) and torch.equal(w_got.scales.view(torch.uint8), w_want.scales.view(torch.uint8))

    key = key_of(1)
    fourbit.quantize(x, "nvfp4", rounding="stochastic", seed=key)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q = fourbit.quantize(x, "nvfp4", rounding="stochastic", seed=key, check_finite=False)
    for s in (2, 3):
        key.copy_(key_of(s))
        graph.replay()
        want = fourbit.quantize(x, "nvfp4", rounding="stochastic", seed=s)
        assert torch.equal(q.data, want.data)
