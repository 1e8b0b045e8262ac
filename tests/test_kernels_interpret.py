"""The Triton kernels under Triton's CPU interpreter (``TRITON_INTERPRET=1``): bit-exactness without a GPU.

Runs only where triton is installed and CUDA is not (on a GPU machine ``test_kernels.py`` covers the same
ground on the real compiler). The interpreter executes the kernels with numpy float32 arithmetic, so this
checks the algorithm (operation order, integer hash, encoders, packing, masks), not PTX code generation.
Small shapes: the interpreter is slow.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fourbit
from fourbit.rounding import ElementIndex, Rounding
from fourbit.schemes import NVFP4Config
from kernel_cases import BF16_TRUNC_RTOL, assert_same_bytes, block_values, edge_input, gemm_check, grid_operand

INTERPRET = importlib.util.find_spec("triton") is not None and not torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not INTERPRET, reason="needs triton without CUDA (the GPU tests cover it there)")

if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel modules are first imported (below, lazily)
    import triton.runtime.interpreter as _interp

    # triton 3.6's interpreter turns a runtime loop bound into an int through int(ndarray of shape (1,)),
    # which numpy >= 2.4 refuses; take the one element instead
    _patch = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor

    # TRITON_INTERPRET is read when a function is decorated. Whatever imported triton before this module
    # (``import fourbit`` reaches torch._dynamo, which imports triton) left triton.language's own jit'd
    # helpers (tl.zeros, tl.sum, ...) and possibly our kernel modules compiled-only: re-wrap the first for
    # the interpreter and re-import the second.
    import importlib
    import sys

    import triton.language as _tl
    from triton.runtime.jit import JITFunction

    for _mod in (_tl, _tl.standard):
        for _name, _obj in list(vars(_mod).items()):
            if isinstance(_obj, JITFunction):
                setattr(_mod, _name, _interp.InterpretedFunction(_obj.fn))
    for _name in ("tl_formats", "tiling", "nvfp4_quantize", "nvfp4_dual", "nvfp4_gemm", "dequant_gemm", "fp4_transpose", "mx_quantize", "fp8_quantize", "seeds"):
        if f"fourbit.kernels.{_name}" in sys.modules:
            importlib.reload(sys.modules[f"fourbit.kernels.{_name}"])


def _kernel_quantize(x, block=(1, 16), rounding="nearest", seed=None, amax=None, pad=False, sr_index=None):
    from fourbit.kernels.nvfp4_quantize import quantize_nvfp4
    from fourbit.quantize import QuantizedTensor

    config = NVFP4Config(block=block)
    data, scales, ts = quantize_nvfp4(
        x, config, Rounding.parse(rounding), seed, amax, pad, sr_index, tile=256, max_blocks=4
    )
    return QuantizedTensor(data, scales, ts, config, x.shape, x.dtype)


CASES = [
    ("random", (32, 128), torch.float32, (1, 16), "nearest"),
    ("random", (48, 96), torch.bfloat16, (16, 16), "stochastic"),
    ("ties", (16, 64), torch.float32, (1, 16), "nearest"),
    ("denormals", (16, 64), torch.float32, (16, 16), "stochastic"),
    ("denormals", (16, 64), torch.float16, (1, 16), "nearest"),  # (the interpreter flushes bf16 subnormals)
    ("huge", (16, 64), torch.float16, (1, 16), "stochastic"),
    ("zeros", (16, 64), torch.float32, (1, 16), "nearest"),
    ("mixed_scale", (32, 64), torch.float32, (1, 16), "stochastic"),
]


@pytest.mark.parametrize("kind,shape,dtype,block,rounding", CASES, ids=[f"{c[0]}-{c[3][0]}x16-{c[4]}" for c in CASES])
def test_quantize_bit_exact(kind, shape, dtype, block, rounding):
    x = edge_input(kind, shape, dtype, torch.Generator().manual_seed(len(kind)))
    seed = 77 if rounding == "stochastic" else None
    want = fourbit.quantize(x, "nvfp4", block=block, rounding=rounding, seed=seed, backend="reference")
    assert_same_bytes(_kernel_quantize(x, block, rounding, seed), want)


@pytest.mark.parametrize("block", [(1, 16), (16, 16)], ids=["1x16", "16x16"])
def test_quantize_pad_nonfinite_amax(block):
    x = torch.randn(20, 40)
    x[1, 3], x[5, 30] = float("nan"), float("-inf")
    kw = dict(block=block, pad=True, check_finite=False)
    assert_same_bytes(_kernel_quantize(x, block, pad=True), fourbit.quantize(x, "nvfp4", backend="reference", **kw))
    y = torch.randn(16, 64)
    want = fourbit.quantize(y, "nvfp4", block=block, amax=0.25, backend="reference")
    assert_same_bytes(_kernel_quantize(y, block, amax=0.25), want)


@pytest.mark.parametrize("block", [(1, 16), (16, 16)], ids=["1x16", "16x16"])
def test_quantize_stochastic_element_index(block):
    """Global SR indices (data-parallel shards): row/col offsets and a row stride, the high word included."""
    x = torch.randn(32, 64)
    index = ElementIndex(row_offset=2**27 + 16, col_offset=32, row_stride=1024)
    want = fourbit.quantize(x, "nvfp4", block=block, rounding="stochastic", seed=5, sr_index=index, backend="reference")
    assert_same_bytes(_kernel_quantize(x, block, "stochastic", 5, sr_index=index), want)


def test_qmm_dequant_mxfp4():
    """MXFP4 through the dequantize-to-BF16 GEMM: the BF16 operand is exactly e2m1 * 2^(e - 127) (float64
    oracle from torch's own E8M0 decode), and the product is within the float32-accumulation bound."""
    from fourbit.kernels import dequant_gemm as d

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(20, 96, generator=gen) * torch.logspace(-30, 30, 96)  # scales far apart, E8M0 range
    w = torch.randn(40, 96, generator=gen)
    a, b = fourbit.quantize(x, "mxfp4"), fourbit.quantize(w, "mxfp4")
    ma, mb = d.mx_matrix(a), d.mx_matrix(b)
    a16 = d.dequantize_bf16(ma[0], ma[1], 1, 128, mx=True)
    codes = a.codes().long()
    e2m1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)
    values = torch.where(codes >= 8, -e2m1[codes % 8], e2m1[codes % 8])
    want = values * a.scales.view(torch.float8_e8m0fnu).double().repeat_interleave(32, 1)
    assert torch.equal(a16[:, :96].double(), want) and not a16[:, 96:].any()
    out = d.qmm_dequant(ma, mb, torch.float32, tile=(16, 32, 64, 2, 4, 1), mx=True)
    gemm_check(out, a.dequantize(), b.dequantize())


@pytest.mark.parametrize("shape", [(64, 64), (48, 80), (16, 144)], ids=["square", "edges", "wide"])
def test_fp4_transpose_kernel(shape):
    """Packed FP4 transpose = pack(unpack(data)^T), byte for byte, on tiles that do not divide the shape."""
    from fourbit.kernels.fp4_transpose import transpose_packed
    from fourbit.packing import pack_fp4, unpack_fp4

    codes = torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    data = pack_fp4(codes)
    assert torch.equal(transpose_packed(data, br=32, bc=32), pack_fp4(unpack_fp4(data).T.contiguous()))


WGRAD_CASES = [
    ((48, 64), torch.float32, True, "nearest", None),
    ((40, 48), torch.bfloat16, True, "stochastic", None),  # tokens padded 40 -> 48, features not a tile multiple
    ((32, 96), torch.float32, False, "stochastic", ElementIndex(col_offset=32, row_stride=128)),
    ((64, 32), torch.float16, True, "stochastic", ElementIndex(col_offset=64, row_stride=128)),
]


@pytest.mark.parametrize("shape,dtype,use_rht,rounding,index", WGRAD_CASES, ids=["rht-rne", "rht-sr-pad", "sr-index", "rht-sr-index"])
def test_wgrad_kernel_matches_transpose_pad_rht_quantize(shape, dtype, use_rht, rounding, index):
    """The fused wgrad kernel = the reference chain: transpose, zero-pad tokens to 16, RHT, quantize 1x16."""
    import torch.nn.functional as F

    from fourbit.hadamard import RHT, random_signs, rht
    from fourbit.kernels.nvfp4_quantize import quantize_nvfp4_wgrad
    from fourbit.quantize import QuantizedTensor

    t = (torch.randn(shape, generator=torch.Generator().manual_seed(shape[0])) * 3).to(dtype)
    M = shape[0]
    a = F.pad(t.T, (0, (-M) % 16))
    transform = RHT(16, 77)
    a = rht(a, -1, transform=transform) if use_rht else a
    kw = dict(rounding=rounding, seed=9 if rounding == "stochastic" else None, sr_index=index)
    want = fourbit.quantize(a, "nvfp4", pad=True, backend="reference", **kw)
    signs = random_signs(77, 16).float() if use_rht else None
    config = NVFP4Config()
    data, scales, ts = quantize_nvfp4_wgrad(t, config, Rounding.parse(rounding), kw["seed"], signs, None, index, bf=16, nb=2)
    assert_same_bytes(QuantizedTensor(data, scales, ts, config, a.shape, a.dtype), want)


def test_w4a16_tensor_core_kernel():
    """The tensor-core W4A16 kernel (weights dequantized in registers, x padded to 16 rows), with split K."""
    from fourbit.kernels import nvfp4_gemm as g

    gen = torch.Generator().manual_seed(0)
    b = grid_operand(40, 80, gen, (16, 16))
    x = torch.randn(5, 80, generator=gen).bfloat16()
    for split in (1, 2):
        y = g._linear_w4a16(x, b, g._nvfp4_matrix(b, "w"), None, (16, 32, split, 4, 1))
        gemm_check(y, x.float(), b.dequantize(), rtol_out=BF16_TRUNC_RTOL)


@pytest.mark.parametrize("b_block", [(1, 16), (16, 16)], ids=["b1x16", "b16x16"])
def test_qmm_dequant_path(b_block):
    """Dequantize-to-BF16 then GEMM: the BF16 operand is exactly e2m1 * e4m3 (float64 oracle), zero-padded
    along K; the GEMM with tensor scales in its epilogue is within the float32-accumulation bound."""
    from fourbit.kernels import dequant_gemm as d
    from fourbit.kernels import nvfp4_gemm as g

    gen = torch.Generator().manual_seed(3)
    a, b = grid_operand(20, 80, gen), grid_operand(40, 80, gen, b_block)
    mb = g._nvfp4_matrix(b, "b")
    b16 = d.dequantize_bf16(mb[0], mb[1], mb[5], 128)
    codes = b.codes().long()
    e2m1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)  # OCP MX v1.0, table 5
    values = torch.where(codes >= 8, -e2m1[codes % 8], e2m1[codes % 8])
    scale = b.scales.view(torch.float8_e4m3fn).double().reshape(-1, 5)  # torch's own E4M3 decode
    want = values * scale.repeat_interleave(b_block[0], 0).repeat_interleave(16, 1)
    assert b16.dtype == torch.bfloat16 and b16.shape == (codes.shape[0], 128)  # 2D blocks: rows padded to 48
    assert torch.equal(b16[:, :80].double(), want) and not b16[:, 80:].any()
    out = d.qmm_dequant(g._nvfp4_matrix(a, "a"), mb, torch.float32, tile=(16, 32, 64, 2, 4, 1))
    gemm_check(out, a.dequantize(), b.dequantize())


@pytest.mark.parametrize("batch", [1, 3, 4])
@pytest.mark.parametrize("K", [64, 80], ids=["K64-even", "K80-masked"])
def test_w4a16_cuda_core_kernel(batch, K):
    """The CUDA-core kernel (nibble pairs to float32 bits, FMA; batch <= 4), with and without the column mask."""
    from fourbit.kernels import nvfp4_gemm as g

    gen = torch.Generator().manual_seed(batch)
    w = grid_operand(40, K, gen, (1, 16))
    x = torch.randn(batch, K, generator=gen).bfloat16()
    for cfg in ((16, 2, 4), (32, 4, 4)):
        y = g._linear_w4a16(x, w, g._nvfp4_matrix(w, "w"), None, cfg)
        gemm_check(y, x.float(), w.dequantize(), rtol_out=BF16_TRUNC_RTOL)
    with pytest.raises(ValueError, match="at most 4 rows"):
        g._linear_w4a16(torch.zeros(5, K).bfloat16(), w, g._nvfp4_matrix(w, "w"), None, (16, 2, 4))


def test_e2m1_magic_encoder_matches_reference():
    """``encode_e2m1_rne_magic`` vs ``E2M1.encode``: every bf16 bit pattern, each midpoint and grid value
    with its float32 neighbours (both signs), random float32 patterns; NaN must give +0."""
    import triton
    import triton.language as tl

    from fourbit.formats import E2M1

    global _tl_formats  # a jit'd function resolves names in its module's globals, not in this function
    from fourbit.kernels import tl_formats as _tl_formats

    @triton.jit
    def encode(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        code = _tl_formats.encode_e2m1_rne_magic(tl.load(x_ptr + offs, mask=offs < N))
        tl.store(out_ptr + offs, code, mask=offs < N)

    grid_pts = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 7.0, 1e-45])
    near = torch.cat([grid_pts.view(torch.int32) + d for d in range(-2, 3)])
    bits = torch.cat([
        torch.arange(1 << 16, dtype=torch.int32) << 16,
        near,
        near | torch.tensor(-(2**31), dtype=torch.int32),
        torch.randint(-(2**31), 2**31 - 1, (1 << 16,), dtype=torch.int32, generator=torch.Generator().manual_seed(0)),
    ])  # fmt: skip
    x = bits.view(torch.float32)
    got = torch.empty_like(bits)
    encode[(triton.cdiv(x.numel(), 1 << 16),)](x, got, x.numel(), BLOCK=1 << 16)
    nan = torch.isnan(x)
    assert torch.equal(got[~nan], E2M1.encode(x[~nan]).to(torch.int32))
    assert not bool(got[nan].any())


def test_e2m1_decoders_match_reference():
    """``decode_e2m1`` on every code, and ``decode_e2m1_pair`` (both shifts) on 32-bit words holding every pair
    of codes at the decoded positions and random bits everywhere else, vs ``E2M1.decode`` (times 2^-126)."""
    import triton
    import triton.language as tl

    from fourbit.formats import E2M1

    global _tl_formats  # a jit'd function resolves names in its module's globals, not in this function
    from fourbit.kernels import tl_formats as _tl_formats

    @triton.jit
    def decode(code_ptr, word_ptr, out_ptr, lo_ptr, hi_ptr, N: tl.constexpr, SHIFT: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(out_ptr + offs, _tl_formats.decode_e2m1(tl.load(code_ptr + offs)))
        lo, hi = _tl_formats.decode_e2m1_pair(tl.load(word_ptr + offs), SHIFT)
        tl.store(lo_ptr + offs, lo)
        tl.store(hi_ptr + offs, hi)

    def bits(v):  # compared as bit patterns: -0 is code 8
        return v.view(torch.int32)

    lo_code, hi_code = torch.arange(256) % 16, torch.arange(256) // 16
    codes = lo_code.to(torch.int32)
    for shift in (0, 4):
        noise = torch.randint(0, 1 << 16, (256,), generator=torch.Generator().manual_seed(shift)) * 0x10001
        noise &= ~(0x000F000F << shift)
        words = (noise | (lo_code << shift) | (hi_code << (16 + shift))).to(torch.int64)
        words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
        out, lo, hi = (torch.empty(256) for _ in range(3))
        decode[(1,)](codes, words, out, lo, hi, N=256, SHIFT=shift)
        assert torch.equal(bits(out), bits(E2M1.decode(codes.to(torch.uint8))))
        assert torch.equal(bits(lo), bits(E2M1.decode(lo_code.to(torch.uint8)) * 2.0**-126))
        assert torch.equal(bits(hi), bits(E2M1.decode(hi_code.to(torch.uint8)) * 2.0**-126))


@pytest.mark.parametrize("rank", [None, 1], ids=["one-process", "rank1-of-2"])
def test_quantlinear_fused_wgrad_equals_reference_chain(rank, monkeypatch, tmp_path):
    """QuantLinear's dW through the wgrad-operand op (``ops.quantize_wgrad``, whose CPU implementation is its own
    reference) equals dW through functional's chain (transpose, pad, RHT, quantize), also as rank 1 of 2
    data-parallel ranks: the global SR index and the all-reduced amax (a 1-process gloo group stands in for
    the reduction) take the same path. The kernel itself is held to that reference by the tests above."""
    import torch.distributed as dist

    from fourbit import ops
    from fourbit.nn import QuantLinear
    from fourbit.nn.linear import DataParallel

    def applies_on_cpu(t, config, transform):  # the dispatch rule without its CUDA condition
        return t.dim() == 2 and t.numel() > 0 and isinstance(config, NVFP4Config) and config.block == (1, 16)

    real, state = ops.quantize_wgrad, {"fused": True, "calls": 0}
    monkeypatch.setattr(ops, "wgrad_applies", lambda *a: applies_on_cpu(*a) if state["fused"] else False)

    def counted(*a, **k):
        state["calls"] += 1
        return real(*a, **k)

    monkeypatch.setattr(ops, "quantize_wgrad", counted)
    parallel = None
    if rank is not None:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
        parallel = DataParallel(dist.group.WORLD, rank, 2)
    try:
        lin = QuantLinear(64, 32, bias=False, recipe="nvfp4")
        lin.parallel = parallel
        x = torch.randn(40, 64, generator=torch.Generator().manual_seed(2))  # 40 tokens: padded to 48
        grads = []
        for fused in (True, False):
            state["fused"], lin.step, lin.weight.grad = fused, 0, None
            lin(x).square().sum().backward()
            grads.append(lin.weight.grad.clone())
        assert state["calls"] == 2, "the fused wgrad kernel was not used for both operands"
        assert torch.equal(grads[0], grads[1])
    finally:
        if rank is not None:
            dist.destroy_process_group()


MX_CASES = [
    ("mxfp4", None, "floor", "nearest", torch.float32),
    ("mxfp4", None, "rceil", "stochastic", torch.bfloat16),
    ("mxfp8", None, "rceil", "nearest", torch.float32),
    ("mxfp8", "e5m2", "floor", "stochastic", torch.float16),
    ("mxfp6", None, "floor", "stochastic", torch.float32),
    ("mxfp6", "e3m2", "rceil", "nearest", torch.float32),
]


@pytest.mark.parametrize("scheme,fmt,mode,rounding,dtype", MX_CASES, ids=[f"{c[0]}{'-' + c[1] if c[1] else ''}-{c[2]}-{c[3]}" for c in MX_CASES])
def test_mx_kernel_matches_reference(scheme, fmt, mode, rounding, dtype):
    """The MX kernel = ``fourbit.quantize(..., backend="reference")`` byte for byte: scales 2^-127..2^127
    across blocks, a NaN block and an Inf block, padding to 32, stochastic rounding with an ElementIndex."""
    from fourbit.kernels.mx_quantize import quantize_mx
    from fourbit.schemes import resolve_scheme

    gen = torch.Generator().manual_seed(len(scheme) + len(mode))
    x = torch.randn(24, 200, generator=gen) * torch.logspace(-35, 35, 200)[None, :]
    x[3, 40], x[7, 100] = float("nan"), float("-inf")
    x[5, :32] = 0.0
    x = x.to(dtype)
    index = ElementIndex(row_offset=5, col_offset=7, row_stride=999) if rounding == "stochastic" else None
    kw = dict(fmt=fmt, scale_mode=mode, rounding=rounding, seed=3 if rounding == "stochastic" else None, sr_index=index)
    want = fourbit.quantize(x, scheme, pad=True, check_finite=False, backend="reference", **kw)
    config = resolve_scheme(scheme, block=None, fmt=fmt, scale_mode=mode, four_over_six=None, pow2_scale=None)
    data, scales = quantize_mx(x, config, Rounding.parse(rounding), kw["seed"], True, index, br=8, nb=2)
    assert torch.equal(data, want.data)
    assert torch.equal(scales.view(torch.uint8), want.scales.view(torch.uint8))


FP8_CASES = [
    (None, None, False, "nearest", torch.float32, None),
    (None, "e5m2", False, "stochastic", torch.bfloat16, None),
    (None, None, True, "nearest", torch.float16, 0.75),  # a given amax, below the true one: saturation
    ((1, 128), None, False, "nearest", torch.float32, None),
    ((1, 128), None, True, "stochastic", torch.bfloat16, None),
    ((128, 128), None, False, "stochastic", torch.float32, None),
    ((128, 128), "e5m2", True, "nearest", torch.float32, None),
    (None, None, False, "nearest", torch.float32, 1e-37),  # 448 / amax overflows: s_enc clamped to FLT_MAX
    (None, "e5m2", True, "stochastic", torch.float32, 1e-38),  # the same with pow2 scales
]


@pytest.mark.parametrize("block,fmt,pow2,rounding,dtype,amax", FP8_CASES, ids=[f"case{i}" for i in range(len(FP8_CASES))])
def test_fp8_kernel_matches_reference(block, fmt, pow2, rounding, dtype, amax):
    """The FP8 kernel = the reference byte for byte (codes, float32 scale bits): NaN and Inf elements, an
    all-zero tile, padding to 128 (rows too for 128x128), stochastic rounding with an ElementIndex."""
    from fourbit.kernels.fp8_quantize import quantize_fp8
    from fourbit.schemes import resolve_scheme

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(136, 200, generator=gen) * torch.logspace(-20, 20, 136)[:, None]
    x[0, :] = 0.0
    if block is not None:  # per tensor, a NaN or Inf makes every scale non-finite; tested by the others
        x[3, 40], x[7, 100] = float("nan"), float("-inf")
    x = x.to(dtype)
    index = ElementIndex(row_offset=2, col_offset=5, row_stride=512) if rounding == "stochastic" else None
    kw = dict(block=block, fmt=fmt, pow2_scale=pow2, rounding=rounding, seed=4 if rounding == "stochastic" else None,
              sr_index=index, amax=amax)  # fmt: skip
    want = fourbit.quantize(x, "fp8", pad=block is not None, check_finite=False, backend="reference", **kw)
    config = resolve_scheme("fp8", block=block, fmt=fmt, scale_mode=None, four_over_six=None, pow2_scale=pow2)
    data, scales = quantize_fp8(x, config, Rounding.parse(rounding), kw["seed"], amax, block is not None, index)
    assert torch.equal(data, want.data)
    assert torch.equal(scales.view(torch.int32), want.scales.view(torch.int32))


@pytest.mark.parametrize("block,rounding", [(None, "nearest"), ((1, 128), "stochastic"), ((128, 128), "nearest")])
def test_fp8_kernel_reads_a_transposed_view_in_place(block, rounding):
    """``strided=True``: the kernel quantizes ``t.T`` (wgrad's operand) from ``t`` without a copy, and
    gets the bytes of the reference on the contiguous transpose; padding of the token dim included."""
    from fourbit.kernels.fp8_quantize import quantize_fp8
    from fourbit.kernels.tiling import reads_in_place
    from fourbit.schemes import resolve_scheme

    gen = torch.Generator().manual_seed(12)
    t = (torch.randn(200, 256, generator=gen) * torch.logspace(-3, 3, 256)).to(torch.bfloat16)  # (tokens, features)
    view = t.T  # (features, tokens): 200 tokens pad to 256 for 1x128
    assert reads_in_place(view)
    index = ElementIndex(row_offset=0, col_offset=7, row_stride=400) if rounding == "stochastic" else None
    kw = dict(block=block, rounding=rounding, seed=6 if rounding == "stochastic" else None, sr_index=index)
    want = fourbit.quantize(view.contiguous(), "fp8", pad=block is not None, check_finite=False, backend="reference", **kw)
    config = resolve_scheme("fp8", block=block, fmt=None, scale_mode=None, four_over_six=None, pow2_scale=None)
    data, scales = quantize_fp8(view, config, Rounding.parse(rounding), kw["seed"], None, block is not None, index,
                                strided=True)  # fmt: skip
    assert torch.equal(data, want.data)
    assert torch.equal(scales.view(torch.int32), want.scales.view(torch.int32))


@pytest.mark.parametrize("scheme,rounding", [("mxfp4", "stochastic"), ("mxfp8", "nearest")])
def test_mx_kernel_reads_a_transposed_view_in_place(scheme, rounding):
    """``strided=True``: the MX kernel quantizes ``t.T`` from ``t`` without a copy, with the reference's bytes
    on the contiguous transpose (tokens padded from 72 to 96 along the block dim)."""
    from fourbit.kernels.mx_quantize import quantize_mx
    from fourbit.schemes import resolve_scheme

    gen = torch.Generator().manual_seed(13)
    t = (torch.randn(72, 80, generator=gen) * torch.logspace(-4, 4, 80)).to(torch.bfloat16)  # (tokens, features)
    view = t.T
    index = ElementIndex(row_offset=1, col_offset=3, row_stride=300) if rounding == "stochastic" else None
    kw = dict(rounding=rounding, seed=9 if rounding == "stochastic" else None, sr_index=index)
    want = fourbit.quantize(view.contiguous(), scheme, pad=True, check_finite=False, backend="reference", **kw)
    config = resolve_scheme(scheme, block=None, fmt=None, scale_mode=None, four_over_six=None, pow2_scale=None)
    data, scales = quantize_mx(view, config, Rounding.parse(rounding), kw["seed"], True, index, strided=True, br=16, nb=2)
    assert torch.equal(data, want.data)
    assert torch.equal(scales.view(torch.uint8), want.scales.view(torch.uint8))


@pytest.mark.parametrize("shape,rounding", [((200, 96), "nearest"), ((130, 80), "stochastic"), ((3, 40, 64), "nearest")])
def test_quantize_kernel_writes_swizzled_scales(shape, rounding):
    """``swizzle=True``: the codes and tensor scale of ``fourbit.quantize`` and its scales in Blackwell's
    SWIZZLE_32_4_4 order (``to_blocked`` of the reference's (rows, blocks) matrix, zero padding included):
    rows not a multiple of 128, block columns not a multiple of 4, a padded last dim, leading dims."""
    from fourbit.kernels.nvfp4_quantize import quantize_nvfp4
    from fourbit.kernels.swizzle import to_blocked

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(14)) * 3
    seed = 5 if rounding == "stochastic" else None
    want = fourbit.quantize(x, "nvfp4", rounding=rounding, seed=seed, pad=True, backend="reference")
    data, scales, tscale = quantize_nvfp4(x, NVFP4Config(), Rounding.parse(rounding), seed, None, True, swizzle=True)
    assert torch.equal(data, want.data)
    assert torch.equal(tscale.view(torch.int32), want.tensor_scale.view(torch.int32))
    ref = want.scales.view(torch.uint8).reshape(-1, want.scales.shape[-1])
    assert torch.equal(scales.view(torch.uint8), to_blocked(ref))


DEQ_CASES = [
    ((32, 128), (1, 16), "nearest", torch.float32),
    ((40, 96), (16, 16), "stochastic", torch.bfloat16),  # rows padded 40 -> 48
    ((2, 8, 72), (1, 16), "stochastic", torch.float16),  # leading dims, 72 -> 80 columns
    ((20, 64), (16, 16), "nearest", torch.float32),
]


@pytest.mark.parametrize("shape,block,rounding,dtype", DEQ_CASES, ids=["1x16-rne", "16x16-sr-rows", "1x16-sr-cols", "16x16-rne"])
def test_dequantized_operand_is_codes_times_scales(shape, block, rounding, dtype):
    """``quantize_nvfp4_dequantized`` (no packed codes written) = e2m1(code) * block scale of the reference
    quantization, exactly in BF16, zero-padded to whole blocks; its tensor scale is the reference's, bit
    for bit; a given amax, an ElementIndex and a NaN block (NaN values, as dequantizing gives) included."""
    from fourbit.kernels.nvfp4_quantize import quantize_nvfp4_dequantized

    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(shape[-1])) * 5).to(dtype)
    x.view(-1, shape[-1])[1, 2] = float("nan")
    seed = 11 if rounding == "stochastic" else None
    index = ElementIndex(row_offset=64, col_offset=16, row_stride=512) if seed else None
    for amax in (None, 3.0):
        kw = dict(block=block, rounding=rounding, seed=seed, sr_index=index, amax=amax)
        want = fourbit.quantize(x, "nvfp4", pad=True, check_finite=False, backend="reference", **kw)
        values, tscale = quantize_nvfp4_dequantized(x, NVFP4Config(block=block), Rounding.parse(rounding), seed, amax, index)
        oracle = block_values(want)
        assert values.dtype == torch.bfloat16 and values.shape == oracle.shape
        torch.testing.assert_close(values.double(), oracle, rtol=0, atol=0, equal_nan=True)
        assert torch.isnan(values[1, :16]).all() and not torch.isnan(values[1, 16:]).any()  # the NaN's block only
        assert bool(torch.isnan(values[0, :16]).all()) == (block == (16, 16))  # a 16x16 block holds rows 0-15
        assert torch.equal(tscale.view(torch.int32), want.tensor_scale.view(torch.int32))


@pytest.mark.parametrize("shape,use_rht,rounding", [((48, 64), True, "stochastic"), ((40, 32), False, "nearest")])
def test_wgrad_kernel_dequantized_output(shape, use_rht, rounding):
    """The fused wgrad kernel's ``dequantized`` output = codes times scales of its packed output, exactly."""
    from fourbit.hadamard import random_signs
    from fourbit.kernels.nvfp4_quantize import quantize_nvfp4_wgrad
    from fourbit.quantize import QuantizedTensor

    t = torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 2
    signs = random_signs(3, 16).float() if use_rht else None
    seed = 4 if rounding == "stochastic" else None
    args = (t, NVFP4Config(), Rounding.parse(rounding), seed, signs)
    data, scales, ts = quantize_nvfp4_wgrad(*args, bf=16, nb=2)
    values, ts2 = quantize_nvfp4_wgrad(*args, bf=16, nb=2, dequantized=True)
    Mp = shape[0] + (-shape[0]) % 16
    q = QuantizedTensor(data, scales, ts, NVFP4Config(), torch.Size((shape[1], Mp)), torch.float32)
    assert torch.equal(values.double(), block_values(q))
    assert torch.equal(ts2.view(torch.int32), ts.view(torch.int32))


def test_scaled_gemm_reads_strided_operands():
    """``scaled_gemm`` with a transposed B view (dgrad's W^T from fprop's W) and a transposed A: float64 oracle."""
    from fourbit.kernels.dequant_gemm import scaled_gemm

    gen = torch.Generator().manual_seed(8)
    a = torch.randint(-6, 7, (48, 128), generator=gen).bfloat16()  # small integers: exact in bf16
    w = torch.randint(-6, 7, (128, 96), generator=gen).bfloat16()  # B^T = w, B = w.T (96, 128), a view
    ta, tb = torch.tensor([0.375]), torch.tensor([3.0])
    for a_op in (a, a.T.contiguous().T):
        out = scaled_gemm(a_op, w.T, ta, tb, torch.float32, tile=(16, 32, 64, 2, 4, 1))
        want = (a.double() @ w.double()) * (0.375 * 3.0)
        assert torch.equal(out.double(), want)  # integer products and sums: exact in fp32


@pytest.mark.parametrize("recipe", ["nvfp4", "nvfp4-no-2d"])
@pytest.mark.parametrize("tokens", [64, 56], ids=["t64", "t56-padded"])
def test_quantlinear_dequantized_path_equals_quantize_then_gemm(recipe, tokens, monkeypatch):
    """QuantLinear through ``Dequantized`` operands (one kernel per operand, no packed codes, W^T a view of
    fprop's W for 16x16 blocks) gives y, dx and dW equal to the QuantizedTensor path up to float32
    summation order: same codes, scales, seeds and tensor scales."""
    import fourbit.nn.functional as L
    from fourbit import ops
    from fourbit.nn import QuantLinear

    def on_cpu(x, config):  # the dispatch rules without their CUDA condition (the ops' CPU references run)
        return x.numel() > 0 and isinstance(config, NVFP4Config) and not config.four_over_six

    monkeypatch.setattr(ops, "dequantized_applies", on_cpu)
    monkeypatch.setattr(ops, "wgrad_applies", lambda t, c, tr: t.dim() == 2 and on_cpu(t, c) and c.block == (1, 16))
    real, used = L._emulates, []
    monkeypatch.setattr(L, "_emulates", lambda *a: used.append(real(*a)) or used[-1])
    lin = QuantLinear(128, 64, bias=False, recipe=recipe)
    x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(tokens)) * 2
    outs = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(L, "_emulates", lambda *a: False)
        lin.step, lin.weight.grad = 0, None
        xi = x.clone().requires_grad_()
        y = lin(xi)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        outs.append((y.detach(), xi.grad, lin.weight.grad.clone()))
    assert used and all(used), "the dequantized path was not taken"  # forward and backward decide alike
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6 * float(want.abs().max()))


DUAL_CASES = [  # (tokens, features), dtype, RHT, row rounding, column rounding, ElementIndex (rows, columns), tile
    ((48, 64), torch.float32, True, "nearest", "stochastic", None, (32, 32)),
    ((40, 96), torch.bfloat16, True, "stochastic", "stochastic", None, (32, 64)),  # tokens padded 40 -> 48
    ((72, 48), torch.float16, False, "nearest", "nearest", None, (16, 32)),  # neither side a tile multiple
    ((32, 32), torch.float32, True, "stochastic", "stochastic",
     (ElementIndex(row_offset=96), ElementIndex(col_offset=32, row_stride=128)), (16, 16)),
]


@pytest.mark.parametrize("shape,dtype,use_rht,row_r,col_r,index,tile", DUAL_CASES, ids=["rht-rne-sr", "rht-sr-pad", "rne-odd", "sr-index"])
def test_dual_kernel_matches_rowwise_and_wgrad_references(shape, dtype, use_rht, row_r, col_r, index, tile):
    """``quantize_nvfp4_dual``: its rowwise output = the reference ``quantize(t)`` and its columnwise output =
    the reference chain of wgrad (transpose, zero-pad tokens to 16, RHT, quantize 1x16), bytes and tensor-scale
    bits, from one amax pass and one quantize pass; the dequantized outputs = codes times scales; a given amax
    pair gives the same bytes as the measured one; a NaN poisons only its own block on each side."""
    import torch.nn.functional as F

    from fourbit.hadamard import RHT, random_signs, rht
    from fourbit.kernels.nvfp4_dual import dual_amax, quantize_nvfp4_dual
    from fourbit.quantize import QuantizedTensor

    t = (torch.randn(shape, generator=torch.Generator().manual_seed(shape[1])) * 3).to(dtype)
    t[5, 17] = float("nan")
    M, Fe = shape
    row_index, col_index = index or (None, None)
    rk = dict(rounding=row_r, seed=21 if row_r == "stochastic" else None, sr_index=row_index)
    ck = dict(rounding=col_r, seed=22 if col_r == "stochastic" else None, sr_index=col_index)
    want_row = fourbit.quantize(t, "nvfp4", pad=True, check_finite=False, backend="reference", **rk)
    a = F.pad(t.T, (0, (-M) % 16))
    a = rht(a, -1, transform=RHT(16, 5)) if use_rht else a
    want_col = fourbit.quantize(a, "nvfp4", pad=True, check_finite=False, backend="reference", **ck)

    signs = random_signs(5, 16).float() if use_rht else None
    row = (Rounding.parse(row_r), rk["seed"], row_index)
    col = (Rounding.parse(col_r), ck["seed"], col_index)
    config = NVFP4Config()
    for amax in (None, dual_amax(t, signs, bm=tile[0], bf=tile[1])):
        r, c = quantize_nvfp4_dual(t, row, col, signs, amax, bm=tile[0], bf=tile[1])
        assert_same_bytes(QuantizedTensor(*r, config, t.shape, t.dtype), want_row)
        assert_same_bytes(QuantizedTensor(*c, config, a.shape, a.dtype), want_col)
    (rv, rts), (cv, cts) = quantize_nvfp4_dual(t, row, col, signs, dequantized=True, bm=tile[0], bf=tile[1])
    torch.testing.assert_close(rv.double(), block_values(want_row), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(cv.double(), block_values(want_col), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(rts.view(torch.int32), want_row.tensor_scale.view(torch.int32))
    assert torch.equal(cts.view(torch.int32), want_col.tensor_scale.view(torch.int32))
    assert int(torch.isnan(rv).sum()) == 16 and int(torch.isnan(cv).sum()) == 16  # one block each


def test_dual_api_checks_and_declines():
    """``kernels.quantize_dual`` declines what it does not cover (CPU tensors here: no kernel is claimed) and
    ``nvfp4_dual`` rejects features that are not a multiple of 16."""
    import fourbit.kernels as K
    from fourbit.kernels.nvfp4_dual import quantize_nvfp4_dual

    op = K.DualOperand(Rounding.NEAREST)
    assert K.quantize_dual(torch.randn(32, 64), NVFP4Config(), op, op) is None  # not CUDA
    assert K.dual_amax(torch.randn(32, 64), NVFP4Config()) is None
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_nvfp4_dual(torch.randn(32, 40), (Rounding.NEAREST, None, None), (Rounding.NEAREST, None, None), None)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), layer=st.integers(0, 10**6), step=st.integers(0, 2**62), advance=st.booleans())
def test_seed_keys_kernel_equals_host_seeds(seed, layer, step, advance):
    """``kernels.seed_keys`` computes on the device the six keys the host derives, ``seed_key(derive_seed(seed,
    layer, step, role))`` for each role (64-bit SplitMix64 and the 32-bit hash, wrapping as Python ints do
    masked), and advances the step counter only when told to."""
    from fourbit.kernels import seed_keys
    from fourbit.nn.linear import Role, derive_seed, seed_base
    from fourbit.rounding import seed_key

    counter = torch.tensor([step], dtype=torch.int64)
    keys = seed_keys(counter, seed_base(seed, layer), advance)
    want = [seed_key(derive_seed(seed, layer, step, role)) for role in Role]
    assert keys.dtype == torch.int32 and (keys.long() & 0xFFFFFFFF).tolist() == want
    assert int(counter) == step + advance


def test_kernels_read_a_seed_key_from_device_memory():
    """Every stochastically rounding kernel takes its key as an int or as a one-element int32 tensor holding
    ``seed_key(seed)`` (what ``seed_keys`` writes): the same bytes either way."""
    from fourbit.kernels.fp8_quantize import quantize_fp8
    from fourbit.kernels.mx_quantize import quantize_mx
    from fourbit.kernels.nvfp4_dual import quantize_nvfp4_dual
    from fourbit.kernels.nvfp4_quantize import quantize_nvfp4, quantize_nvfp4_wgrad
    from fourbit.rounding import seed_key
    from fourbit.schemes import resolve_scheme

    def key_of(seed):
        return torch.tensor([seed_key(seed)], dtype=torch.int64).to(torch.int32)[0:1]  # wraps like the kernel's bitcast

    sr = Rounding.STOCHASTIC
    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(8)) * 3
    nv = NVFP4Config()
    pairs = [
        (lambda s: quantize_nvfp4(x, nv, sr, s, None, False, None, tile=256, max_blocks=4)),
        (lambda s: quantize_nvfp4_wgrad(x, nv, sr, s, None, None, None, bf=16, nb=2)),
        (lambda s: quantize_nvfp4_dual(x, (sr, s, None), (sr, s + 1 if isinstance(s, int) else key_of(8), None), None)),
        (lambda s: quantize_mx(x, resolve_scheme("mxfp4", block=None, fmt=None, scale_mode=None, four_over_six=None,
                                                 pow2_scale=None), sr, s, False, None, br=8, nb=2)),  # fmt: skip
        (lambda s: quantize_fp8(x, resolve_scheme("fp8", block=(1, 128), fmt=None, scale_mode=None, four_over_six=None,
                                                  pow2_scale=None), sr, s, None, False, None)),  # fmt: skip
    ]
    for i, run in enumerate(pairs):
        with_int, with_key = run(7), run(key_of(7))
        flat = lambda out: [t for o in out for t in (o if isinstance(o, tuple) else (o,))]  # noqa: E731
        for a, b in zip(flat(with_int), flat(with_key), strict=True):
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), f"kernel {i} differs"
    with pytest.raises(ValueError, match="one int32 element"):
        quantize_nvfp4(x, nv, sr, torch.zeros(2, dtype=torch.int32), None, False, None)
