"""Fused MX quantize (OCP MX v1.0, 1x32 blocks, E8M0 scales), bit-exact with ``fourbit.mx.quantize_mx``.

One pass: program (i, j) loads a (BR rows x NB blocks x 32) tile, and per block::

    amax_b       max |x| as float32 bits (a non-finite block gets the NaN scale 0xFF and zero codes)
    FLOOR        e = clamp(floor_log2(amax_b) - emax_elem, -127, 127), floor_log2 from the exponent field
    RCEIL        d = amax_b * fp32(1 / elem_max); e = biased_exp(d) + (mantissa(d) != 0) - 127, where a
                 float32 subnormal d rounds up only above 0x400000 (it exceeds 2^-127 only there)
    codes        elem(x * 2^-e)  (an exact power-of-two scaling), RNE or stochastic (``encode_exmy``)
    scale code   e + 127

FP4 codes are packed two per byte (element 2i in the low nibble), FP6/FP8 codes one per byte. Stochastic
rounding draws ``random_bits(key, (r + row_off) * row_stride + c + col_off)`` as the reference does.

Checked bit for bit against the reference on an H100 (``tests/test_kernels.py``: every element format,
both scale modes, RNE/SR, bf16/fp16/fp32, edge inputs) and under Triton's CPU interpreter;
``fourbit.quantize`` runs it by default on CUDA.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..rounding import ElementIndex, Rounding
from ..schemes import MXConfig, ScaleMode
from .tiling import row_reader
from .tl_formats import encode_exmy, exmy_constants, random_bits, sr_args

MX_BLOCK = 32


@triton.jit
def _mx_quantize_kernel(
    x_ptr,  # element (r, c) at x_ptr + r * stride_r + c * stride_c
    data_ptr,  # (R, Cp * BITS / 8) uint8
    scales_ptr,  # (R, Cp / 32) uint8 E8M0 codes
    R,
    C,
    Cp,
    stride_r,
    stride_c,
    row_off,
    col_off,
    c_index,
    key,
    INV_ELEM_MAX: tl.constexpr,  # fp32(1 / elem_max) (RCEIL)
    EMAX_ELEM: tl.constexpr,  # floor(log2(elem_max)) (FLOOR)
    RCEIL: tl.constexpr,
    EBITS: tl.constexpr,
    MBITS: tl.constexpr,
    EMIN: tl.constexpr,
    MAX_CODE: tl.constexpr,
    INF_CODE: tl.constexpr,
    NAN_CODE: tl.constexpr,
    PACKED: tl.constexpr,  # FP4: two codes per byte
    STOCHASTIC: tl.constexpr,
    BR: tl.constexpr,
    NB: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    b = tl.program_id(1) * NB + tl.arange(0, NB)
    rows = r[:, None, None]  # (BR, 1, 1)
    cols = b[None, :, None] * 32 + tl.arange(0, 32)[None, None, :]  # (1, NB, 32)
    # int64 offsets: a transposed view's column stride times the column can pass 2^31
    x = tl.load(x_ptr + rows * stride_r + cols.to(tl.int64) * stride_c, mask=(rows < R) & (cols < C), other=0.0).to(tl.float32)

    bmax = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=2)  # (BR, NB) |x| bits
    finite_b = bmax < 0x7F800000
    if RCEIL:
        d = (bmax.to(tl.float32, bitcast=True) * INV_ELEM_MAX).to(tl.int32, bitcast=True)
        biased = (d >> 23) & 0xFF
        mant = d & 0x7FFFFF
        up = tl.where(biased == 0, mant > 0x400000, mant != 0)
        e = biased + up.to(tl.int32) - 127
    else:
        e = tl.minimum(tl.maximum(((bmax >> 23) & 0xFF) - 127 - EMAX_ELEM, -127), 127)
    e = tl.where(finite_b, e, 128)  # 128 + 127 = 0xFF, the NaN scale

    # 2^-e as float32 bits: normal for -e >= -126, the subnormal 2^-127 for e = 127
    k = -e
    inv = tl.where(k >= -126, (k + 127) << 23, 0x00400000).to(tl.float32, bitcast=True)
    scaled = tl.where(finite_b[:, :, None], x * inv[:, :, None], 0.0)
    rbits = 0
    if STOCHASTIC:
        rbits = random_bits(key, (rows + row_off) * c_index + (cols + col_off))
    codes = encode_exmy(scaled, rbits, EBITS, MBITS, EMIN, MAX_CODE, INF_CODE, NAN_CODE, STOCHASTIC)

    ok_rows = r[:, None] < R
    if PACKED:
        pairs = tl.reshape(codes, (BR, NB * 16, 2))
        lo, hi = tl.split(pairs)
        byte = (lo | (hi << 4)).to(tl.uint8)  # (BR, NB * 16)
        bcols = tl.program_id(1) * (NB * 16) + tl.arange(0, NB * 16)[None, :]
        tl.store(data_ptr + r[:, None] * (Cp // 2) + bcols, byte, mask=ok_rows & (bcols < Cp // 2))
    else:
        flat = tl.reshape(codes, (BR, NB * 32)).to(tl.uint8)
        ccols = tl.program_id(1) * (NB * 32) + tl.arange(0, NB * 32)[None, :]
        tl.store(data_ptr + r[:, None] * Cp + ccols, flat, mask=ok_rows & (ccols < Cp))
    tl.store(scales_ptr + r[:, None] * (Cp // 32) + b[None, :], (e + 127).to(tl.uint8), mask=ok_rows & (b[None, :] < Cp // 32))


def covers(config) -> bool:
    """Whether this kernel handles the config: MX with 1x32 blocks and a signed element format."""
    return isinstance(config, MXConfig) and config.block == (1, MX_BLOCK)


def quantize_mx(x: torch.Tensor, config: MXConfig, rounding: Rounding, seed: int | None, pad: bool,
                sr_index: ElementIndex | None = None, *, strided: bool = False, br: int | None = None, nb: int = 4,
                num_warps: int = 4):  # fmt: skip
    """(data uint8, scales float8_e8m0fnu) exactly as ``fourbit.quantize`` builds them for ``config``.

    ``strided``: read a transposed view of a contiguous matrix in place (``tiling.row_reader``), 64 rows
    per program so that loads along the contiguous dim are 64 elements long; other non-contiguous inputs
    are copied first. ``br`` rows per program (default 16, or 64 for a strided read)."""
    if not covers(config):
        raise NotImplementedError(f"the MX kernel covers 1x32 blocks, got {config.block}")
    elem = config.elem
    xc, stride_r, stride_c, transposed = row_reader(x, strided)
    C = x.shape[-1]
    R = x.numel() // C
    br = br or (64 if transposed else 16)
    Cp = C + (-C) % MX_BLOCK
    packed = elem.bits == 4
    data = torch.empty((R, Cp // 2 if packed else Cp), dtype=torch.uint8, device=x.device)
    scales = torch.empty((R, Cp // MX_BLOCK), dtype=torch.uint8, device=x.device)
    stochastic = rounding is Rounding.STOCHASTIC
    row_off, col_off, row_stride, key = sr_args(stochastic, seed, sr_index, C)
    grid = (triton.cdiv(R, br), triton.cdiv(Cp // MX_BLOCK, nb))
    _mx_quantize_kernel[grid](
        xc, data, scales, R, C, Cp, stride_r, stride_c, row_off, col_off, row_stride, key,
        INV_ELEM_MAX=float(torch.tensor(1.0 / elem.max, dtype=torch.float32)), EMAX_ELEM=int(math.floor(math.log2(elem.max))),
        RCEIL=config.scale_mode is ScaleMode.RCEIL, **exmy_constants(elem), PACKED=packed, STOCHASTIC=stochastic,
        BR=br, NB=nb, num_warps=num_warps, **({} if not x.is_cuda else dict(enable_fp_fusion=False)),
    )  # fmt: skip
    lead = x.shape[:-1]
    return data.reshape(*lead, data.shape[-1]), scales.view(torch.float8_e8m0fnu).reshape(*lead, Cp // MX_BLOCK)
