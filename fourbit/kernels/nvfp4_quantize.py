"""Fused NVFP4 quantize: two passes over the input, bit-exact with ``fourbit.nvfp4.quantize_nvfp4``.

Pass 1 (``_amax_kernel``) reads ``x`` once and folds ``max |x|`` into one int32 with ``atomic_max`` on the
float32 bit pattern of ``|x|`` (non-negative floats order like their bits; NaN's bits sort above Inf, so
a NaN anywhere gives a non-finite amax and ``s_enc = 1``, as in the reference). A grid of 8 programs per SM
strides over ``x`` keeping a running max, so there is one atomic per program. A given ``amax`` skips it.

Pass 2 (``_quantize_kernel``) reads ``x`` once more, tile by tile, and writes packed codes and E4M3 scales::

    program (i, j) owns rows [i*BR, (i+1)*BR) and cols [j*16*NB, (j+1)*16*NB) of the (R, C) matrix view
    x_lo, x_hi (BR, NB, 8): columns 0-7 and 8-15 of each 16-column block, loaded separately with the same
                         layout, so one thread holds a whole block (no shuffles for its max)
                         1x16 blocks: max over the last axis of both halves
                         (16, NB, 8) each for 16x16 blocks: max over axes 0 and 2
    s_enc, s_dec      from amax, every program (a few scalar ops; program (0, 0) stores s_dec)
    s_dec_b = e4m3(amax_b * (s_enc * fp32(1/6)))  ->  s_enc_b = 1 / (s_dec_b * s_dec)  (0 if the product is 0,
                         NaN for a non-finite block, whose codes then all come out +0)
    codes = e2m1(nan_to_num(x * s_enc_b))   RNE by one magic-number add (``encode_e2m1_rne_magic``) or SR
                                            with random_bits(seed, (r + row_off) * row_stride + c + col_off)
    packed: 8 codes -> one int32 word (code k in bits 4k..4k+3, i.e. byte i = code 2i | code 2i+1 << 4),
            two words per block, one 8-byte store; scales (BR, NB) or (1, NB)

Every float32 operation is the reference's, in its order, with IEEE rounding and subnormals kept
(``tl_formats`` says how). Padding (``pad=True``) is done by masked loads: padded elements read as +0.
Non-contiguous inputs are copied to contiguous memory first (one extra pass).

The wgrad kernels at the end of the module (``quantize_nvfp4_wgrad``) share the scale rule
(``_tensor_scales``, ``_block_scales``) and build the transposed, token-padded, Hadamard-transformed operand
on the fly.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..formats import E2M1_MAX, E4M3_MAX
from ..nvfp4 import ONE_SIXTH
from ..rounding import Rounding
from ..schemes import NVFP4Config
from .tl_formats import F32_MAX, decode_e2m1, decode_e4m3, div_ieee, encode_e2m1, encode_e2m1_rne_magic, encode_e4m3, random_bits, sr_args

EXACT_OPTIONS = dict(enable_fp_fusion=False, enable_reflect_ftz=False)  # IEEE float32, as the reference
ONE_SIXTH_F32 = float(ONE_SIXTH)  # fp32(1/6), exactly representable as a Python float
AMAX_BLOCK = 4096
AMAX_PROGRAMS_PER_SM = 8  # the amax pass runs a grid of this many programs per SM, each striding over x


@functools.cache
def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _amax_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
    """Each program folds a strided set of BLOCK-element chunks into a running max, then one atomic."""
    run = tl.zeros((BLOCK,), dtype=tl.int32)
    for chunk in range(tl.program_id(0).to(tl.int64), tl.cdiv(N, BLOCK), tl.num_programs(0)):
        offs = chunk * BLOCK + tl.arange(0, BLOCK)  # a multiple of BLOCK: 16-byte loads
        x = tl.load(x_ptr + offs, mask=offs < N, other=0.0).to(tl.float32)
        run = tl.maximum(run, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF)  # |x| as ordered int bits
    tl.atomic_max(out_ptr, tl.max(run, axis=0))


@triton.jit
def _block_codes(x, s_enc_b, rows, cols, row_off, col_off, c_index, key, STOCHASTIC: tl.constexpr):
    """E2M1 codes (int32) of x * s_enc_b for one half-block (..., 8) of elements at (rows, cols).

    Stochastic rounding draws ``random_bits(key, (r + row_off) * c_index + c + col_off)`` (``ElementIndex``)."""
    y = x * s_enc_b
    if STOCHASTIC:
        y = tl.where(y != y, 0.0, y)  # nan_to_num(nan=0); +-Inf saturates in the encoder as +-FLT_MAX would
        index = (rows + row_off) * c_index + (cols + col_off)
        return encode_e2m1(y, random_bits(key, index), True)
    return encode_e2m1_rne_magic(y)  # NaN -> +0 by itself


@triton.jit
def _pack8(codes):
    """(..., 8) 4-bit codes -> (...,) int32 word, code k in bits 4k..4k+3 (low nibble first, little endian)."""
    shifts = 4 * tl.arange(0, 8)
    return tl.sum(codes << shifts, axis=len(codes.shape) - 1)  # disjoint bits: the sum is an OR


@triton.jit
def _tensor_scales(amax_ptr, SCALE_BOUND: tl.constexpr, PRECISE_DIV: tl.constexpr):
    """s_enc = min(6 * 448 / amax, FLT_MAX), 1 if amax is 0 or not finite; s_dec = 1 / s_enc (float32 scalars)."""
    amax = tl.load(amax_ptr)
    s_enc = div_ieee(tl.full([], SCALE_BOUND, tl.float32), amax, PRECISE_DIV)
    s_enc = tl.where(s_enc > F32_MAX, F32_MAX, s_enc)
    amax_bits = amax.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    s_enc = tl.where((amax == 0) | (amax_bits >= 0x7F800000), 1.0, s_enc)
    s_dec = div_ieee(tl.full([], 1.0, tl.float32), s_enc, PRECISE_DIV)
    return s_enc, s_dec


@triton.jit
def _block_scales(bmax, s_enc, s_dec, ONE_SIXTH_C: tl.constexpr, PRECISE_DIV: tl.constexpr):
    """(s_enc_b float32, E4M3 scale code int32) per block from its amax as |x| bits (int32, any shape).

    s_dec_b = e4m3(amax_b * (s_enc * fp32(1/6))); s_enc_b = 1 / (s_dec_b * s_dec), 0 where that is 0. A
    non-finite block gets s_enc_b = NaN (x * NaN is NaN, which both E2M1 encoders map to +0) and code 0x7F.
    """
    finite_b = bmax < 0x7F800000
    amax_b = tl.where(finite_b, bmax, 0).to(tl.float32, bitcast=True)
    base = amax_b * (s_enc * ONE_SIXTH_C)
    scode = encode_e4m3(base)
    denom = decode_e4m3(scode) * s_dec
    inv = div_ieee(tl.full(denom.shape, 1.0, tl.float32), denom, PRECISE_DIV)
    s_enc_b = tl.where(denom == 0, 0.0, inv)
    s_enc_b = tl.where(finite_b, s_enc_b, float("nan"))
    scode = tl.where(finite_b, scode, 0x7F)
    return s_enc_b, scode


@triton.jit(do_not_specialize=["key", "row_off", "col_off", "c_index"])
def _quantize_kernel(
    x_ptr,
    amax_ptr,
    data_ptr,  # int32 view of the packed codes: (Rp, Cp / 8) words, two per 16-element block
    scales_ptr,
    tscale_ptr,
    deq_ptr,  # DEQUANT: (Rp, Cp) bf16 e2m1(code) * e4m3(block scale), the operand of an emulated GEMM
    R,
    C,
    Rp,
    Cp,
    row_off,
    col_off,
    c_index,
    key,
    SCALE_BOUND: tl.constexpr,  # E2M1_MAX * E4M3_MAX = 6 * 448 (four-over-six has no kernel: _launch refuses it)
    ONE_SIXTH_C: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,  # 1 or 16
    STOCHASTIC: tl.constexpr,
    PRECISE_DIV: tl.constexpr,
    BR: tl.constexpr,  # rows per program (16 for 16x16 blocks)
    NB: tl.constexpr,  # 16-column blocks per program
    SWIZZLE: tl.constexpr = False,  # 1x16 only: scales in Blackwell's SWIZZLE_32_4_4 order (``swizzle.py``)
    PACKED: tl.constexpr = True,  # write the packed codes and the scales
    DEQUANT: tl.constexpr = False,  # write the dequantized values (without the tensor scale) to deq_ptr
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    r = pid_r.to(tl.int64) * BR + tl.arange(0, BR)
    b = pid_c * NB + tl.arange(0, NB)
    rows = r[:, None, None]  # (BR, 1, 1)
    # each block is loaded as two halves of 8 columns with the same layout, so one thread holds all 16
    # elements of a block (16-byte loads for bf16) and block maxima need no cross-thread shuffles
    cols_lo = b[None, :, None] * 16 + tl.arange(0, 8)[None, None, :]  # (1, NB, 8)
    cols_hi = cols_lo + 8
    in_rows = rows < R
    x_lo = tl.load(x_ptr + rows * C + cols_lo, mask=in_rows & (cols_lo < C), other=0.0).to(tl.float32)  # (BR, NB, 8)
    x_hi = tl.load(x_ptr + rows * C + cols_hi, mask=in_rows & (cols_hi < C), other=0.0).to(tl.float32)

    s_enc, s_dec = _tensor_scales(amax_ptr, SCALE_BOUND, PRECISE_DIV)
    if (pid_r == 0) & (pid_c == 0):
        tl.store(tscale_ptr, s_dec)

    # block amax over |x| bits
    hmax = tl.maximum(
        tl.max(x_lo.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=2),
        tl.max(x_hi.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=2),
    )  # (BR, NB)
    if BLOCK_ROWS == 1:
        bmax = hmax
    else:
        bmax = tl.max(hmax, axis=0)[None, :]  # (1, NB)
    s_enc_b, scode = _block_scales(bmax, s_enc, s_dec, ONE_SIXTH_C, PRECISE_DIV)
    s_enc_b = s_enc_b[:, :, None]

    c_lo = _block_codes(x_lo, s_enc_b, rows, cols_lo, row_off, col_off, c_index, key, STOCHASTIC)  # (BR, NB, 8)
    c_hi = _block_codes(x_hi, s_enc_b, rows, cols_hi, row_off, col_off, c_index, key, STOCHASTIC)
    if DEQUANT:  # 16-byte stores of 8 bf16 values per half-block
        s_dec_b = decode_e4m3(scode)[:, :, None]
        in_p = rows < Rp
        tl.store(deq_ptr + rows * Cp + cols_lo, (decode_e2m1(c_lo) * s_dec_b).to(tl.bfloat16), mask=in_p & (cols_lo < Cp))
        tl.store(deq_ptr + rows * Cp + cols_hi, (decode_e2m1(c_hi) * s_dec_b).to(tl.bfloat16), mask=in_p & (cols_hi < Cp))
    if not PACKED:
        return
    words = tl.join(_pack8(c_lo), _pack8(c_hi))  # (BR, NB, 2): one 8-byte store per block
    wcols = b[None, :, None] * 2 + tl.arange(0, 2)[None, None, :]
    tl.store(data_ptr + rows * (Cp // 8) + wcols, words, mask=(rows < Rp) & (wcols < Cp // 8))

    if BLOCK_ROWS == 1:
        srows = r[:, None]  # (BR, 1)
    else:
        srows = pid_r.to(tl.int64) + tl.zeros((1, 1), tl.int64)  # one block row per program
    scols = b[None, :]
    if SWIZZLE:  # 128x4 tiles in row-major tile order; inside a tile (r, c) -> (r % 32) * 16 + (r % 128) // 32 * 4 + c
        tile = (srows // 128) * ((Cp // 16 + 3) // 4) + scols // 4
        soff = tile * 512 + (srows % 32) * 16 + ((srows % 128) // 32) * 4 + scols % 4
    else:
        soff = srows * (Cp // 16) + scols
    tl.store(scales_ptr + soff, scode.to(tl.uint8), mask=(srows < Rp // BLOCK_ROWS) & (scols < Cp // 16))


def measure_amax(x: torch.Tensor, interpret: bool = False) -> torch.Tensor:
    """max |x| as a float32 one-element tensor (NaN/Inf propagate as a non-finite value)."""
    out = torch.zeros(1, dtype=torch.int32, device=x.device)
    n = x.numel()
    programs = 4 if interpret else AMAX_PROGRAMS_PER_SM * _sm_count(x.device)
    _amax_kernel[(min(triton.cdiv(n, AMAX_BLOCK), programs),)](x, out, n, BLOCK=AMAX_BLOCK, num_warps=8)
    return out.view(torch.float32)


def quantize_nvfp4(
    x: torch.Tensor,
    config: NVFP4Config,
    rounding: Rounding,
    seed: int | None,
    amax,
    pad: bool,
    sr_index=None,
    *,
    tile: int = 4096,
    max_blocks: int = 32,
    num_warps: int = 4,
    swizzle: bool = False,
):
    """(data uint8, scales float8_e4m3fn, tensor_scale float32 ()) exactly as ``fourbit.quantize`` builds them.

    The caller has validated shapes and dtypes (``fourbit.quantize`` does, before dispatch). ``swizzle``
    (1x16 blocks): the scales come as the flat, zero-padded SWIZZLE_32_4_4 buffer that Blackwell's
    block-scaled GEMMs read, ``swizzle.to_blocked`` of the (rows, blocks) matrix, written by the kernel.
    """
    if swizzle and config.block != (1, 16):
        raise ValueError(f"swizzled scales are for 1x16 blocks (one scale per row and block), got {config.block}")
    data, scales, tscale, _ = _launch(x, config, rounding, seed, amax, sr_index, tile, max_blocks, num_warps,
                                      swizzle=swizzle, packed=True, dequant=False)  # fmt: skip
    scales = scales.view(torch.float8_e4m3fn)
    if swizzle:
        return data.reshape(*x.shape[:-1], data.shape[-1]), scales, tscale
    if config.block[0] == 1:
        data = data.reshape(*x.shape[:-1], data.shape[-1])
        scales = scales.reshape(*x.shape[:-1], scales.shape[-1])
    return data, scales, tscale


def quantize_nvfp4_dequantized(
    x: torch.Tensor, config: NVFP4Config, rounding: Rounding, seed: int | None, amax, sr_index=None, *,
    tile: int = 4096, max_blocks: int = 32, num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The operand an emulated NVFP4 GEMM multiplies, straight from ``x`` (..., C): (values (Rp, Cp) bf16,
    tensor_scale float32 ()), values = e2m1(code) * e4m3(block scale) of ``quantize_nvfp4``'s codes and
    scales (exact in BF16), zero-padded to whole blocks; ``values * tensor_scale`` is the dequantized
    tensor. No packed codes are written: one pass instead of quantize, then dequantize.
    """
    _, _, tscale, values = _launch(x, config, rounding, seed, amax, sr_index, tile, max_blocks, num_warps,
                                   swizzle=False, packed=False, dequant=True)  # fmt: skip
    return values, tscale


def _blocks_per_program(blocks: int, cap: int) -> int:
    """The power of two <= ``cap`` (and >= min(4, cap)) whose programs pad a row of ``blocks`` 16-column
    blocks least, the widest on a tie: 48 blocks (768 columns) take 16 per program, not 32 and a half-empty
    second program (2.9x faster on an H200, benchmarks/sweep_tiles.py). The bits do not depend on it."""
    cap = min(cap, triton.next_power_of_2(blocks))
    widths = [1 << k for k in range(cap.bit_length()) if (1 << k) >= min(4, cap)]
    return min(widths, key=lambda nb: (-(-blocks // nb) * nb, -nb))


def _launch(x, config, rounding, seed, amax, sr_index, tile, max_blocks, num_warps, *, swizzle, packed, dequant):
    """Run ``_quantize_kernel`` over ``x`` as an (R, C) matrix: (data (Rp, Cp/2) uint8, scale codes uint8,
    tensor scale, dequantized values (Rp, Cp) bf16); outputs not asked for are None."""
    if config.four_over_six:
        raise NotImplementedError("four_over_six has no fused kernel (its error sums depend on reduction order)")
    interpret = not x.is_cuda
    xc = x.contiguous()  # a no-op for contiguous inputs; non-contiguous ones are copied (documented)
    C = x.shape[-1]
    R = x.numel() // C
    br, bc = config.block
    Rp, Cp = R + (-R) % br, C + (-C) % bc
    if amax is None:
        amax_t = measure_amax(xc, interpret)
    else:
        amax_t = torch.as_tensor(amax, dtype=torch.float32, device=x.device).reshape(1).contiguous()

    data = scales = values = None
    if packed:
        data = torch.empty((Rp, Cp // 2), dtype=torch.uint8, device=x.device)  # written as int32 words
        if swizzle:  # padded to (round_up(rows, 128), round_up(blocks, 4)); the padding must read as zero scales
            scales = torch.zeros(-(-Rp // 128) * 128 * (-(-(Cp // 16) // 4) * 4), dtype=torch.uint8, device=x.device)
        else:
            scales = torch.empty((Rp // br, Cp // bc), dtype=torch.uint8, device=x.device)
    if dequant:
        values = torch.empty((Rp, Cp), dtype=torch.bfloat16, device=x.device)
    tscale = torch.empty((), dtype=torch.float32, device=x.device)
    stochastic = rounding is Rounding.STOCHASTIC
    row_off, col_off, row_stride, key = sr_args(stochastic, seed, sr_index, C)

    # a program owns (BR rows) x (NB blocks of 16 columns): ``tile`` elements for 1x16, 16 x NB for 16x16
    NB = _blocks_per_program(Cp // 16, min(max_blocks, max(1, tile // (16 * br))))
    BR = 16 if br == 16 else max(1, tile // (16 * NB))
    grid = (triton.cdiv(Rp, BR), triton.cdiv(Cp // 16, NB))
    options = {} if interpret else EXACT_OPTIONS
    unused = tscale  # a pointer argument whose output is not asked for (its stores are compiled out)
    _quantize_kernel[grid](
        xc, amax_t, unused if data is None else data.view(torch.int32), unused if scales is None else scales, tscale,
        unused if values is None else values, R, C, Rp, Cp, row_off, col_off, row_stride, key,
        SCALE_BOUND=E2M1_MAX * E4M3_MAX, ONE_SIXTH_C=ONE_SIXTH_F32, BLOCK_ROWS=br, STOCHASTIC=stochastic,
        PRECISE_DIV=not interpret, BR=BR, NB=NB, SWIZZLE=swizzle, PACKED=packed, DEQUANT=dequant,
        num_warps=num_warps, **options,
    )  # fmt: skip
    return data, scales, tscale, values


# --- wgrad operands: transposed, zero-padded along tokens, optionally RHT'd, quantized: one kernel ---------
#
# Wgrad reduces over tokens, so its operands are dy^T and x^T (features, tokens'), tokens' = tokens padded to
# a multiple of 16, each 16-token block Hadamard-transformed (``fourbit.hadamard.rht``) and quantized in 1x16
# blocks along tokens'. The reference builds that tensor (transpose, pad, RHT) and quantizes it; here program
# (i, j) loads a (BF features x 16*NB tokens) tile of the untransposed (tokens, features) input, applies
# the sign flips and the same butterflies in the same order, and writes the packed transposed codes and
# scales directly. The amax of the RHT'd tensor needs a pass of its own (``_wgrad_amax_kernel``, the same
# loads and butterflies) unless it is given.


@triton.jit
def _butterfly(y, N: tl.constexpr, D: tl.constexpr):
    """One FWHT stage on the rows of an (N, 16) tensor: elements i and i + D (i's bit D clear) -> (a + b, a - b)."""
    z = tl.permute(tl.reshape(y, (N, 16 // (2 * D), 2, D)), (0, 1, 3, 2))  # the pair index last
    a, b = tl.split(z)
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (N, 16))


@triton.jit
def _fwht16(y, N: tl.constexpr):
    """``fourbit.hadamard.fwht`` on the rows of an (N, 16) float32 tensor: strides 8, 4, 2, 1, in that order."""
    y = _butterfly(y, N, 8)
    y = _butterfly(y, N, 4)
    y = _butterfly(y, N, 2)
    return _butterfly(y, N, 1)


@triton.jit
def _wgrad_tile(t_ptr, signs_ptr, M, F, BF: tl.constexpr, NB: tl.constexpr, HAS_RHT: tl.constexpr):
    """(BF * NB, 16) float32: row r = (feature f0 + r // NB, token block m0/16 + r % NB), RHT'd if asked."""
    f = tl.program_id(0).to(tl.int64) * BF + tl.arange(0, BF)[:, None]  # (BF, 1)
    m = tl.program_id(1).to(tl.int64) * (16 * NB) + tl.arange(0, 16 * NB)[None, :]  # (1, 16 NB)
    x = tl.load(t_ptr + m * F + f, mask=(m < M) & (f < F), other=0.0).to(tl.float32)  # (BF, 16 NB): x^T
    y = tl.reshape(x, (BF * NB, 16))
    if HAS_RHT:
        s = tl.load(signs_ptr + tl.arange(0, 16))
        y = _fwht16(y * s[None, :], BF * NB) * 0.25  # fwht(x * s) / sqrt(16): the sign flips and the 1/4 are exact
    return y


@triton.jit
def _wgrad_amax_kernel(t_ptr, signs_ptr, out_ptr, M, F, BF: tl.constexpr, NB: tl.constexpr, HAS_RHT: tl.constexpr):
    y = _wgrad_tile(t_ptr, signs_ptr, M, F, BF, NB, HAS_RHT)
    tl.atomic_max(out_ptr, tl.max(tl.max(y.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1), axis=0))


@triton.jit(do_not_specialize=["key", "row_off", "col_off", "c_index"])
def _wgrad_quantize_kernel(
    t_ptr,  # (M, F) tokens x features, contiguous
    signs_ptr,  # (16,) float32 +-1
    amax_ptr,
    data_ptr,  # int32 view of the packed codes of the (F, Mp) result: (F, Mp / 8) words
    scales_ptr,  # (F, Mp / 16)
    tscale_ptr,
    deq_ptr,  # DEQUANT: (F, Mp) bf16 e2m1(code) * e4m3(block scale)
    M,
    F,
    Mp,
    row_off,
    col_off,
    c_index,
    key,
    SCALE_BOUND: tl.constexpr,
    ONE_SIXTH_C: tl.constexpr,
    HAS_RHT: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    PRECISE_DIV: tl.constexpr,
    BF: tl.constexpr,
    NB: tl.constexpr,
    PACKED: tl.constexpr = True,
    DEQUANT: tl.constexpr = False,
):
    y = _wgrad_tile(t_ptr, signs_ptr, M, F, BF, NB, HAS_RHT)  # (BF * NB, 16)
    s_enc, s_dec = _tensor_scales(amax_ptr, SCALE_BOUND, PRECISE_DIV)
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(tscale_ptr, s_dec)
    bmax = tl.max(y.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)  # (BF * NB,)
    s_enc_b, scode = _block_scales(bmax, s_enc, s_dec, ONE_SIXTH_C, PRECISE_DIV)

    r = tl.arange(0, BF * NB)
    rows = (tl.program_id(0).to(tl.int64) * BF + r // NB)[:, None]  # output row = feature
    blk = (tl.program_id(1) * NB + r % NB)[:, None]  # output 16-column block = token block
    halves = tl.permute(tl.reshape(y, (BF * NB, 2, 8)), (0, 2, 1))
    y_lo, y_hi = tl.split(halves)  # (BF * NB, 8) each: tokens 0-7 and 8-15 of the block
    cols_lo = blk * 16 + tl.arange(0, 8)[None, :]
    c_lo = _block_codes(y_lo, s_enc_b[:, None], rows, cols_lo, row_off, col_off, c_index, key, STOCHASTIC)
    c_hi = _block_codes(y_hi, s_enc_b[:, None], rows, cols_lo + 8, row_off, col_off, c_index, key, STOCHASTIC)
    ok = (rows < F) & (blk < Mp // 16)
    if DEQUANT:
        s_dec_b = decode_e4m3(scode)[:, None]
        tl.store(deq_ptr + rows * Mp + cols_lo, (decode_e2m1(c_lo) * s_dec_b).to(tl.bfloat16), mask=ok)
        tl.store(deq_ptr + rows * Mp + cols_lo + 8, (decode_e2m1(c_hi) * s_dec_b).to(tl.bfloat16), mask=ok)
    if not PACKED:
        return
    words = tl.join(_pack8(c_lo), _pack8(c_hi))  # (BF * NB, 2)
    wcols = blk * 2 + tl.arange(0, 2)[None, :]
    tl.store(data_ptr + rows * (Mp // 8) + wcols, words, mask=ok)
    tl.store(scales_ptr + rows * (Mp // 16) + blk, scode[:, None].to(tl.uint8), mask=ok)


def quantize_nvfp4_wgrad(
    t: torch.Tensor,
    config: NVFP4Config,
    rounding: Rounding,
    seed: int | None,
    signs: torch.Tensor | None,
    amax=None,
    sr_index=None,
    *,
    bf: int = 64,  # 64 features x 4 token blocks: 1.15x faster than 32 x 4 at 768 features (sweep_tiles.py)
    nb: int = 4,
    num_warps: int = 4,
    dequantized: bool = False,
):
    """NVFP4 (1x16) of ``rht(pad(t^T))`` for ``t`` (tokens, features): (data (F, Mp/2), scales (F, Mp/16), s_dec).

    Bit-exact with ``fourbit.quantize(rht(F.pad(t.T, (0, Mp - M))), config, pad=True, ...)``, Mp = M rounded
    up to 16; ``signs`` is the RHT's sign vector on t's device (float32, 16) or None for no transform.
    ``amax`` (of the transformed tensor) skips the amax pass. ``dequantized``: return (values (F, Mp)
    bf16, s_dec) instead, as ``quantize_nvfp4_dequantized`` does, without writing the packed codes.
    """
    if config.block != (1, 16) or config.four_over_six:
        raise NotImplementedError("the wgrad kernel covers NVFP4 1x16 blocks without four-over-six")
    interpret = not t.is_cuda
    tc = t.reshape(-1, t.shape[-1]).contiguous()
    M, F = tc.shape
    Mp = M + (-M) % 16
    grid = (triton.cdiv(F, bf), triton.cdiv(Mp // 16, nb))
    has_rht = signs is not None
    signs_t = signs if has_rht else tc  # (unused without RHT)
    if amax is None:
        amax_t = wgrad_amax(tc, signs, bf=bf, nb=nb, num_warps=num_warps)
    else:
        amax_t = torch.as_tensor(amax, dtype=torch.float32, device=t.device).reshape(1).contiguous()
    tscale = torch.empty((), dtype=torch.float32, device=t.device)
    if dequantized:
        values = torch.empty((F, Mp), dtype=torch.bfloat16, device=t.device)
        data = scales = tscale  # unused pointers: their stores are compiled out
    else:
        values = tscale
        data = torch.empty((F, Mp // 2), dtype=torch.uint8, device=t.device)
        scales = torch.empty((F, Mp // 16), dtype=torch.uint8, device=t.device)
    stochastic = rounding is Rounding.STOCHASTIC
    row_off, col_off, row_stride, key = sr_args(stochastic, seed, sr_index, Mp)
    _wgrad_quantize_kernel[grid](
        tc, signs_t, amax_t, data if dequantized else data.view(torch.int32), scales, tscale, values, M, F, Mp,
        row_off, col_off, row_stride, key, SCALE_BOUND=E2M1_MAX * E4M3_MAX, ONE_SIXTH_C=ONE_SIXTH_F32,
        HAS_RHT=has_rht, STOCHASTIC=stochastic, PRECISE_DIV=not interpret, BF=bf, NB=nb, PACKED=not dequantized,
        DEQUANT=dequantized, num_warps=num_warps, **({} if interpret else EXACT_OPTIONS),
    )  # fmt: skip
    if dequantized:
        return values, tscale
    return data, scales.view(torch.float8_e4m3fn), tscale


def wgrad_amax(t: torch.Tensor, signs: torch.Tensor | None, *, bf: int = 64, nb: int = 4, num_warps: int = 4) -> torch.Tensor:
    """max |rht(pad(t^T))| (float32, one element): the amax pass alone, for an all-reduce before quantizing."""
    tc = t.reshape(-1, t.shape[-1]).contiguous()
    M, F = tc.shape
    out = torch.zeros(1, dtype=torch.int32, device=t.device)
    grid = (triton.cdiv(F, bf), triton.cdiv((M + (-M) % 16) // 16, nb))
    _wgrad_amax_kernel[grid](tc, signs if signs is not None else tc, out, M, F, BF=bf, NB=nb, HAS_RHT=signs is not None,
                             num_warps=num_warps)  # fmt: skip
    return out.view(torch.float32)
