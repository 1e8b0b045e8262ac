"""Rowwise and columnwise NVFP4 of one tensor from one read: a linear layer's activation or gradient operand.

A quantized linear layer needs each of ``x`` (tokens M, features F) and ``dy`` twice: rowwise, 1x16 blocks
along the features (fprop's x, dgrad's dy), and columnwise, 1x16 blocks along the tokens of
``rht(pad(t^T))`` (wgrad's operands: transposed, tokens zero-padded to 16, optionally Hadamard-transformed).
``nvfp4_quantize`` builds them with two amax passes and two quantize passes; here one amax pass reads ``t``
once for both amaxes and one quantize pass reads it once more for both outputs::

    program (i, j) loads t[i*BM:(i+1)*BM, j*BF:(j+1)*BF]   (BM = 16*NBM tokens, BF = 16*NBF features)
    rowwise:    (BM, NBF, 16) blocks along features   -> codes, scales (rows = tokens)
    columnwise: tl.trans -> (BF, BM) -> (BF*NBM, 16) blocks along tokens, RHT'd row by row with the same
                butterflies as ``_wgrad_tile`` -> codes, scales (rows = features)

Each output goes through the same scale rule and encoders (``_tensor_scales``, ``_block_scales``,
``_block_codes``) with its own amax, rounding, seed and ``ElementIndex`` as the two separate kernels, so the
results are theirs bit for bit: the rowwise output is ``quantize_nvfp4`` of ``t`` (1x16) and the columnwise
output ``quantize_nvfp4_wgrad`` of ``t``. Features must be a multiple of 16 (a linear layer's K and N are).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats import E2M1_MAX, E4M3_MAX
from ..rounding import Rounding
from .nvfp4_quantize import EXACT_OPTIONS, ONE_SIXTH_F32, _block_codes, _block_scales, _fwht16, _pack8, _tensor_scales
from .tl_formats import decode_e2m1, decode_e4m3, sr_args


@triton.jit
def _tile(t_ptr, signs_ptr, M, F, BM: tl.constexpr, BF: tl.constexpr, HAS_RHT: tl.constexpr):
    """(x (BM, BF) float32 rows = tokens, y (BF * BM / 16, 16) float32 rows = (feature, token block), RHT'd)."""
    m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)[:, None]  # (BM, 1)
    f = tl.program_id(1).to(tl.int64) * BF + tl.arange(0, BF)[None, :]  # (1, BF)
    x = tl.load(t_ptr + m * F + f, mask=(m < M) & (f < F), other=0.0).to(tl.float32)
    y = tl.reshape(tl.trans(x), (BF * (BM // 16), 16))
    if HAS_RHT:
        s = tl.load(signs_ptr + tl.arange(0, 16))
        y = _fwht16(y * s[None, :], BF * (BM // 16)) * 0.25  # as _wgrad_tile: fwht(x * s) / 4
    return x, y


@triton.jit
def _dual_amax_kernel(t_ptr, signs_ptr, out_ptr, M, F, BM: tl.constexpr, BF: tl.constexpr, HAS_RHT: tl.constexpr):
    """out[0] = max |t|, out[1] = max |rht(pad(t^T))| (int32 bits of non-negative floats, atomic max)."""
    x, y = _tile(t_ptr, signs_ptr, M, F, BM, BF, HAS_RHT)
    tl.atomic_max(out_ptr, tl.max(tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1), axis=0))
    tl.atomic_max(out_ptr + 1, tl.max(tl.max(y.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1), axis=0))


_RUNTIME_INTS = ["r_row_off", "r_col_off", "r_c_index", "r_key", "c_row_off", "c_col_off", "c_c_index", "c_key"]


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _dual_kernel(
    t_ptr,  # (M, F) tokens x features, contiguous
    signs_ptr,  # (16,) float32 +-1 (HAS_RHT)
    amax_ptr,  # (2,) float32: rowwise amax, columnwise (transformed) amax
    r_data_ptr,  # PACKED: int32 view of the rowwise codes, (M, F / 8) words
    r_scales_ptr,  # PACKED: (M, F / 16) uint8
    r_deq_ptr,  # DEQUANT: (M, F) bf16
    c_data_ptr,  # PACKED: int32 view of the columnwise codes, (F, Mp / 8)
    c_scales_ptr,  # PACKED: (F, Mp / 16)
    c_deq_ptr,  # DEQUANT: (F, Mp) bf16
    tscale_ptr,  # (2,) float32: the two decode tensor scales
    M,
    F,
    Mp,
    r_row_off,
    r_col_off,
    r_c_index,
    r_key,
    c_row_off,
    c_col_off,
    c_c_index,
    c_key,
    SCALE_BOUND: tl.constexpr,
    ONE_SIXTH_C: tl.constexpr,
    HAS_RHT: tl.constexpr,
    R_STOCHASTIC: tl.constexpr,
    C_STOCHASTIC: tl.constexpr,
    PRECISE_DIV: tl.constexpr,
    BM: tl.constexpr,
    BF: tl.constexpr,
    PACKED: tl.constexpr,
    DEQUANT: tl.constexpr,
):
    NBM: tl.constexpr = BM // 16
    NBF: tl.constexpr = BF // 16
    x, y = _tile(t_ptr, signs_ptr, M, F, BM, BF, HAS_RHT)
    r_enc, r_dec = _tensor_scales(amax_ptr, SCALE_BOUND, PRECISE_DIV)
    c_enc, c_dec = _tensor_scales(amax_ptr + 1, SCALE_BOUND, PRECISE_DIV)
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(tscale_ptr, r_dec)
        tl.store(tscale_ptr + 1, c_dec)

    # rowwise: element (m, f), block (m, f // 16)
    xb = tl.reshape(x, (BM, NBF, 16))
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)[:, None, None]  # (BM, 1, 1) tokens
    rblk = tl.program_id(1) * NBF + tl.arange(0, NBF)[None, :, None]  # (1, NBF, 1)
    cols = rblk * 16 + tl.arange(0, 16)[None, None, :]  # (1, NBF, 16) features
    bmax = tl.max(xb.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=2)  # (BM, NBF) block amax as |x| bits
    s_enc_b, scode = _block_scales(bmax, r_enc, r_dec, ONE_SIXTH_C, PRECISE_DIV)
    codes = _block_codes(xb, s_enc_b[:, :, None], rows, cols, r_row_off, r_col_off, r_c_index, r_key, R_STOCHASTIC)
    ok = (rows < M) & (cols < F)  # (BM, NBF, 16)
    if DEQUANT:
        rvals = decode_e2m1(codes) * decode_e4m3(scode)[:, :, None]
        tl.store(r_deq_ptr + rows * F + cols, rvals.to(tl.bfloat16), mask=ok)
    if PACKED:
        words = _pack8(tl.reshape(codes, (BM, NBF, 2, 8)))  # (BM, NBF, 2)
        wcols = rblk * 2 + tl.arange(0, 2)[None, None, :]
        tl.store(r_data_ptr + rows * (F // 8) + wcols, words, mask=(rows < M) & (wcols < F // 8))
        srows = tl.reshape(rows, (BM, 1))
        sblk = tl.reshape(rblk, (1, NBF))
        tl.store(r_scales_ptr + srows * (F // 16) + sblk, scode.to(tl.uint8), mask=(srows < M) & (sblk < F // 16))

    # columnwise: row i of y is (feature f0 + i // NBM, token block m0 / 16 + i % NBM), as in the wgrad kernel
    i = tl.arange(0, BF * NBM)
    frow = (tl.program_id(1).to(tl.int64) * BF + i // NBM)[:, None]  # (BF * NBM, 1) features
    cblk = (tl.program_id(0) * NBM + i % NBM)[:, None]  # token block
    tcols = cblk * 16 + tl.arange(0, 16)[None, :]  # (BF * NBM, 16) tokens
    cmax = tl.max(y.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)  # (BF * NBM,)
    s_enc_c, ccode = _block_scales(cmax, c_enc, c_dec, ONE_SIXTH_C, PRECISE_DIV)
    ccodes = _block_codes(y, s_enc_c[:, None], frow, tcols, c_row_off, c_col_off, c_c_index, c_key, C_STOCHASTIC)
    cok = (frow < F) & (cblk < Mp // 16)
    if DEQUANT:
        cvals = decode_e2m1(ccodes) * decode_e4m3(ccode)[:, None]
        tl.store(c_deq_ptr + frow * Mp + tcols, cvals.to(tl.bfloat16), mask=cok)
    if PACKED:
        cwords = _pack8(tl.reshape(ccodes, (BF * NBM, 2, 8)))  # (BF * NBM, 2)
        cw = cblk * 2 + tl.arange(0, 2)[None, :]
        tl.store(c_data_ptr + frow * (Mp // 8) + cw, cwords, mask=cok)
        tl.store(c_scales_ptr + frow * (Mp // 16) + cblk, ccode[:, None].to(tl.uint8), mask=cok)


def dual_amax(t: torch.Tensor, signs: torch.Tensor | None, *, bm: int = 64, bf: int = 64, num_warps: int = 4):
    """(max |t|, max |rht(pad(t^T))|) as a float32 (2,) tensor, from one read of ``t`` (tokens, features)."""
    M, F = t.shape
    out = torch.zeros(2, dtype=torch.int32, device=t.device)
    grid = (triton.cdiv(M, bm), triton.cdiv(F, bf))
    _dual_amax_kernel[grid](t, signs if signs is not None else t, out, M, F, BM=bm, BF=bf, HAS_RHT=signs is not None,
                            num_warps=num_warps)  # fmt: skip
    return out.view(torch.float32)


def quantize_nvfp4_dual(
    t: torch.Tensor,
    row: tuple[Rounding, int | None, object],
    col: tuple[Rounding, int | None, object],
    signs: torch.Tensor | None,
    amax: torch.Tensor | None = None,
    *,
    dequantized: bool = False,
    bm: int = 64,
    bf: int = 64,
    num_warps: int = 4,
):
    """NVFP4 1x16 of ``t`` (M tokens, F features, F % 16 == 0) rowwise and of ``rht(pad(t^T))`` columnwise.

    ``row`` and ``col`` are (rounding, seed, ElementIndex or None) of each output; ``signs`` the RHT's sign
    vector (float32, 16) or None; ``amax`` a float32 (2,) tensor (rowwise, columnwise amax, e.g. all-reduced
    from ``dual_amax``) skips the amax pass. Returns ((data (M, F/2), scales (M, F/16) e4m3, s_dec),
    (data (F, Mp/2), scales (F, Mp/16), s_dec)), the outputs of ``quantize_nvfp4`` and
    ``quantize_nvfp4_wgrad``; ``dequantized``: ((values (M, F) bf16, s_dec), (values (F, Mp) bf16, s_dec)).
    """
    if bm % 16 or bf % 16:
        raise ValueError(f"tile sides must be multiples of 16, got {bm} x {bf}")
    interpret = not t.is_cuda
    tc = t.contiguous()
    M, F = tc.shape
    if F % 16:
        raise ValueError(f"quantize_nvfp4_dual: features ({F}) must be a multiple of 16")
    Mp = M + (-M) % 16
    if amax is None:
        amax_t = dual_amax(tc, signs, bm=bm, bf=bf, num_warps=num_warps)
    else:
        amax_t = amax.float().reshape(2).contiguous()
    tscale = torch.empty(2, dtype=torch.float32, device=t.device)
    dev = t.device
    if dequantized:
        r_deq = torch.empty((M, F), dtype=torch.bfloat16, device=dev)
        c_deq = torch.empty((F, Mp), dtype=torch.bfloat16, device=dev)
        r_data = r_scales = c_data = c_scales = tscale  # unused pointers: their stores are compiled out
    else:
        r_data = torch.empty((M, F // 2), dtype=torch.uint8, device=dev)
        r_scales = torch.empty((M, F // 16), dtype=torch.uint8, device=dev)
        c_data = torch.empty((F, Mp // 2), dtype=torch.uint8, device=dev)
        c_scales = torch.empty((F, Mp // 16), dtype=torch.uint8, device=dev)
        r_deq = c_deq = tscale
    r_sr = sr_args(row[0] is Rounding.STOCHASTIC, row[1], row[2], F)
    c_sr = sr_args(col[0] is Rounding.STOCHASTIC, col[1], col[2], Mp)
    grid = (triton.cdiv(Mp, bm), triton.cdiv(F, bf))
    words = (lambda d: d) if dequantized else (lambda d: d.view(torch.int32))
    _dual_kernel[grid](
        tc, signs if signs is not None else tc, amax_t, words(r_data), r_scales, r_deq, words(c_data), c_scales, c_deq,
        tscale, M, F, Mp, *r_sr, *c_sr, SCALE_BOUND=E2M1_MAX * E4M3_MAX, ONE_SIXTH_C=ONE_SIXTH_F32,
        HAS_RHT=signs is not None, R_STOCHASTIC=row[0] is Rounding.STOCHASTIC, C_STOCHASTIC=col[0] is Rounding.STOCHASTIC,
        PRECISE_DIV=not interpret, BM=bm, BF=bf, PACKED=not dequantized, DEQUANT=dequantized, num_warps=num_warps,
        **({} if interpret else EXACT_OPTIONS),
    )  # fmt: skip
    if dequantized:
        return (r_deq, tscale[0]), (c_deq, tscale[1])
    fp8 = torch.float8_e4m3fn
    return (r_data, r_scales.view(fp8), tscale[0]), (c_data, c_scales.view(fp8), tscale[1])

