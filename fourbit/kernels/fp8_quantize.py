"""Fused FP8 quantize: per tensor, 1x128 tiles and 128x128 blocks (DeepSeek-V3), bit-exact with
``fourbit.fp8.quantize_fp8``.

Program (i, j) loads a (TR x 128) tile (TR = 128 for 128x128 blocks and for transposed inputs read in
place, else 32) and computes, per scale group
(the whole tensor, a row of the tile, or the whole tile)::

    amax         max |x| as float32 bits (per tensor: given, or from ``nvfp4_quantize.measure_amax``)
    s_enc        min(elem_max / amax, FLT_MAX) (IEEE division); pow2_scale: 2^floor(log2 s_enc) from the exponent bits;
                 1 where amax is 0; NaN where amax is not finite
    codes        elem(nan_to_num(x * s_enc)): NaN -> 0, +-Inf -> +-FLT_MAX (then saturated), RNE or SR
    scale        1 / s_enc (float32, IEEE division)

Checked bit for bit against the reference on an H100 (``tests/test_kernels.py``: codes and scale bits,
E4M3/E5M2, fp32/pow2 scales, RNE/SR, padded shapes, edge inputs) and under Triton's CPU interpreter;
``fourbit.quantize`` runs it by default on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..rounding import ElementIndex, Rounding
from ..schemes import FP8Config
from .tiling import row_reader
from .tl_formats import F32_MAX, div_ieee, encode_exmy, exmy_constants, random_bits, sr_args

TILE_C = 128  # columns per program, and the width of a 1x128 / 128x128 block
_TILE_C = tl.constexpr(TILE_C)  # the same, as a constant the kernel can read


@triton.jit
def _exp2i(k):
    """2^k as float32 from bits, for int32 k: exact in [-149, 127], 0 below, Inf above (``fourbit._fp32.exp2i``)."""
    normal = ((tl.minimum(tl.maximum(k, -126), 127) + 127) << 23).to(tl.float32, bitcast=True)
    sub = (1 << (tl.minimum(tl.maximum(k, -149), -127) + 149)).to(tl.float32, bitcast=True)
    v = tl.where(k >= -126, normal, sub)
    v = tl.where(k < -149, 0.0, v)
    return tl.where(k > 127, float("inf"), v)


@triton.jit
def _encode_scale(amax, ELEM_MAX: tl.constexpr, POW2: tl.constexpr, PRECISE_DIV: tl.constexpr):
    """s_enc from a float32 amax: elem_max / amax, pow2-rounded down, 1 where amax is 0, NaN where not finite."""
    s_enc = div_ieee(tl.full(amax.shape, ELEM_MAX, tl.float32), amax, PRECISE_DIV)
    s_enc = tl.where(s_enc > 3.4028234663852886e38, 3.4028234663852886e38, s_enc)  # min(., FLT_MAX); NaN kept
    if POW2:
        s_enc = _exp2i(((s_enc.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127)
    s_enc = tl.where(amax == 0, 1.0, s_enc)
    finite = (amax.to(tl.int32, bitcast=True) & 0x7FFFFFFF) < 0x7F800000
    return tl.where(finite, s_enc, float("nan"))


@triton.jit
def _fp8_quantize_kernel(
    x_ptr,  # element (r, c) at x_ptr + r * stride_r + c * stride_c
    amax_ptr,  # per tensor: float32 amax (given or measured); unused otherwise
    data_ptr,  # (Rp, Cp) uint8
    scales_ptr,  # float32: one, or (Rp / BLOCK_R, Cp / 128)
    R,
    C,
    Rp,
    Cp,
    stride_r,
    stride_c,
    row_off,
    col_off,
    c_index,
    key,
    ELEM_MAX: tl.constexpr,
    PER_TENSOR: tl.constexpr,
    BLOCK_R: tl.constexpr,  # 1 (1x128 tiles) or 128 (128x128 blocks); ignored per tensor
    POW2: tl.constexpr,
    EBITS: tl.constexpr,
    MBITS: tl.constexpr,
    EMIN: tl.constexpr,
    MAX_CODE: tl.constexpr,
    INF_CODE: tl.constexpr,
    NAN_CODE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    PRECISE_DIV: tl.constexpr,
    TR: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * TR + tl.arange(0, TR)[:, None]  # (TR, 1)
    c = tl.program_id(1) * _TILE_C + tl.arange(0, _TILE_C)[None, :]  # (1, 128)
    # int64 offsets: a transposed view's column stride times the column can pass 2^31
    x = tl.load(x_ptr + r * stride_r + c.to(tl.int64) * stride_c, mask=(r < R) & (c < C), other=0.0).to(tl.float32)
    bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    if PER_TENSOR:
        s = _encode_scale(tl.load(amax_ptr) + tl.zeros((TR, 1), tl.float32), ELEM_MAX, POW2, PRECISE_DIV)
    elif BLOCK_R == 1:
        s = _encode_scale(tl.max(bits, axis=1)[:, None].to(tl.float32, bitcast=True), ELEM_MAX, POW2, PRECISE_DIV)
    else:
        bmax = tl.max(tl.max(bits, axis=1), axis=0) + tl.zeros((1, 1), tl.int32)
        s = _encode_scale(bmax.to(tl.float32, bitcast=True), ELEM_MAX, POW2, PRECISE_DIV)  # (1, 1)
    y = x * s
    y = tl.where(y != y, 0.0, y)  # nan_to_num: NaN -> 0, +-Inf -> +-FLT_MAX
    y = tl.where(y == float("inf"), F32_MAX, tl.where(y == float("-inf"), -F32_MAX, y))
    rbits = 0
    if STOCHASTIC:
        rbits = random_bits(key, (r + row_off) * c_index + (c + col_off))
    codes = encode_exmy(y, rbits, EBITS, MBITS, EMIN, MAX_CODE, INF_CODE, NAN_CODE, STOCHASTIC)
    tl.store(data_ptr + r * Cp + c, codes.to(tl.uint8), mask=(r < Rp) & (c < Cp))
    dec = div_ieee(tl.full(s.shape, 1.0, tl.float32), s, PRECISE_DIV)
    if PER_TENSOR:
        rows0 = tl.arange(0, TR)[:, None]  # every row holds the same scale: row 0 of program (0, 0) stores it
        first = (rows0 == 0) & (tl.program_id(0) == 0) & (tl.program_id(1) == 0)
        tl.store(scales_ptr + rows0 * 0, dec, mask=first)
    elif BLOCK_R == 1:
        tl.store(scales_ptr + r * (Cp // _TILE_C) + tl.program_id(1), dec, mask=r < Rp)
    else:
        tl.store(scales_ptr + tl.program_id(0) * (Cp // _TILE_C) + tl.program_id(1) + tl.zeros((1, 1), tl.int32), dec)


def covers(config) -> bool:
    """FP8 per tensor, 1x128 tiles or 128x128 blocks."""
    return isinstance(config, FP8Config) and config.block in (None, (1, TILE_C), (TILE_C, TILE_C))


def quantize_fp8(x: torch.Tensor, config: FP8Config, rounding: Rounding, seed: int | None, amax, pad: bool,
                 sr_index: ElementIndex | None = None, *, strided: bool = False):  # fmt: skip
    """(codes uint8, float32 decode scales) exactly as ``fourbit.quantize`` builds them for ``config``.

    ``strided``: read a transposed view of a contiguous matrix in place (``tiling.row_reader``), in tiles of
    128 rows so that each program's loads along the contiguous dim are 128 elements long; other
    non-contiguous inputs are copied first."""
    if not covers(config):
        raise NotImplementedError(f"the FP8 kernel covers per-tensor, 1x128 and 128x128 scaling, got {config.block}")
    elem = config.elem
    interpret = not x.is_cuda
    xc, stride_r, stride_c, transposed = row_reader(x, strided)
    C = x.shape[-1]
    R = x.numel() // C
    per_tensor = config.block is None
    br = 1 if per_tensor else config.block[0]
    Rp = R + (-R) % br
    Cp = C if per_tensor else C + (-C) % TILE_C
    if per_tensor:
        if amax is None:
            from .nvfp4_quantize import measure_amax

            amax_t = measure_amax(xc.t() if transposed else xc, interpret)  # the same elements
        else:
            amax_t = torch.as_tensor(amax, dtype=torch.float32, device=x.device).reshape(1).contiguous()
        scales = torch.empty((), dtype=torch.float32, device=x.device)
    else:
        scales = torch.empty((Rp // br, Cp // TILE_C), dtype=torch.float32, device=x.device)
        amax_t = scales  # a float32 pointer the kernel never reads without PER_TENSOR (no fill launch)
    data = torch.empty((Rp, Cp), dtype=torch.uint8, device=x.device)
    stochastic = rounding is Rounding.STOCHASTIC
    row_off, col_off, row_stride, key = sr_args(stochastic, seed, sr_index, C)
    tr = 128 if br == 128 or transposed else 32
    grid = (triton.cdiv(Rp, tr), triton.cdiv(Cp, TILE_C))
    _fp8_quantize_kernel[grid](
        xc, amax_t, data, scales, R, C, Rp, Cp, stride_r, stride_c, row_off, col_off, row_stride, key,
        ELEM_MAX=float(elem.max), PER_TENSOR=per_tensor, BLOCK_R=br, POW2=config.pow2_scale, **exmy_constants(elem),
        STOCHASTIC=stochastic, PRECISE_DIV=not interpret,
        TR=tr, num_warps=8 if tr == 128 else 4, **({} if interpret else dict(enable_fp_fusion=False)),
    )  # fmt: skip
    if per_tensor or br == 1:
        data = data.reshape(*x.shape[:-1], Cp)
    if br == 1 and not per_tensor:
        scales = scales.reshape(*x.shape[:-1], Cp // TILE_C)
    return data, scales
