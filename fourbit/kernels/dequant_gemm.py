"""NVFP4 (and MXFP4) GEMMs on Hopper in two steps: dequantize each operand to BF16, then a BF16 tensor-core GEMM.

Why two steps. Hopper has no FP4 tensor cores, so the FP4 operands must become BF16 somewhere before the
MMA. Doing it inside the GEMM's main loop puts ~8 integer/float instructions per element on the warps that
should be feeding the tensor cores, and the dequantized tile must then be written to shared memory for
``wgmma``: such a kernel measured 0.30x cuBLAS BF16 at 8192^3 (it was removed). Writing the dequantized operand to
global memory once costs (0.5 + 1/16 + 2) bytes per element, a few microseconds for training-size
operands, and leaves an ordinary BF16 GEMM that runs at tensor-core speed.

Exactness (as in ``nvfp4_gemm``): ``e2m1(code) * e4m3(scale)`` has at most 5 significant bits and an
exponent in [-10, 12], so it is exactly a BF16 number; the tensor cores multiply BF16 pairs exactly and
accumulate in FP32. The per-tensor scales are applied once, in FP32, in the epilogue::

    A' = e2m1(A codes) * e4m3(A block scales)          (M, K') bf16, exact       (_dequant_kernel)
    B' = e2m1(B codes) * e4m3(B block scales)          (N, K') bf16, exact
    C  = (A' @ B'^T) * (s_dec_A * s_dec_B)             fp32 accumulation, stored as ``out_dtype``

K' is K rounded up to the GEMM's K step with zero columns (zeros add nothing to a dot product), so the
GEMM's K loop needs no masks. Only the accumulation order differs from float64 math on the dequantized
operands, as on Blackwell's native NVFP4 GEMM.

MXFP4 (``qmm_mx``) takes the same path: ``e2m1 * 2^(e - 127)`` is exact in BF16 (same exponent range as
FP32), and the tensor scales are 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiling import grouped_tile
from .tl_formats import decode_e2m1, decode_e4m3

K_ALIGN = 64  # the dequantized operands' K is padded to this (the largest BK below)


@triton.jit
def _decode_e8m0(code):
    """E8M0 scale code (int32) -> float32 2^(code - 127), exact (2^-127 is a float32 subnormal); 255 -> NaN."""
    bits = tl.where(code == 0, 0x00400000, code << 23)
    return tl.where(code == 255, 0x7FC00000, bits).to(tl.float32, bitcast=True)


@triton.jit
def _dequant_kernel(
    p_ptr,  # (R, KP) uint8: two codes per byte, element 2i in the low nibble
    s_ptr,  # (R / SROWS, 2 KP / BLOCK) uint8 scale codes: E4M3 (NVFP4) or E8M0 (MXFP4)
    out_ptr,  # (R, KOUT) bf16, KOUT >= 2 * KP; columns past 2 * KP are written as zeros
    R,
    KP,
    KOUT,
    SROWS: tl.constexpr,
    BLOCK: tl.constexpr,  # elements per scale along K: 16 (NVFP4) or 32 (MX)
    E8M0: tl.constexpr,
    BR: tl.constexpr,
    BP: tl.constexpr,  # packed bytes per program row-tile
):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)[:, None]  # (BR, 1)
    p = tl.program_id(1) * BP + tl.arange(0, BP)[None, :]  # (1, BP) packed byte index
    mask = (rows < R) & (p < KP)
    packed = tl.load(p_ptr + rows * KP + p, mask=mask, other=0).to(tl.int32)
    sc = tl.load(s_ptr + (rows // SROWS) * (KP // (BLOCK // 2)) + p // (BLOCK // 2), mask=mask, other=0).to(tl.int32)
    if E8M0:
        scale = _decode_e8m0(sc)
    else:
        scale = decode_e4m3(sc)
    lo, hi = packed & 0xF, packed >> 4
    v_lo, v_hi = decode_e2m1(lo) * scale, decode_e2m1(hi) * scale  # exact
    vals = tl.reshape(tl.join(v_lo, v_hi), (BR, 2 * BP))  # interleave: element 2i, 2i+1
    cols = tl.program_id(1) * (2 * BP) + tl.arange(0, 2 * BP)[None, :]
    tl.store(out_ptr + rows * KOUT + cols, vals.to(tl.bfloat16), mask=(rows < R) & (cols < KOUT))


def dequantize_bf16(data: torch.Tensor, scales: torch.Tensor, block_rows: int, k_out: int, *, mx: bool = False) -> torch.Tensor:
    """(R, K/2) packed FP4 codes + uint8 scale codes -> (R, k_out) bf16 ``e2m1 * scale``, zero-padded along K.

    NVFP4: E4M3 scales per 16 elements ((R/br, K/16)); ``mx=True``: E8M0 scales per 32 ((R, K/32)). Both
    products are exact in BF16 (E8M0 scales are powers of two within BF16's exponent range)."""
    R, KP = data.shape
    out = torch.empty((R, k_out), dtype=torch.bfloat16, device=data.device)
    BR, BP = 16, 128
    grid = (triton.cdiv(R, BR), triton.cdiv(k_out // 2, BP))
    _dequant_kernel[grid](data, scales, out, R, KP, k_out, SROWS=block_rows, BLOCK=32 if mx else 16, E8M0=mx,
                          BR=BR, BP=BP, num_warps=4)  # fmt: skip
    return out


# (BM, BN, BK, GROUP_M, num_warps, num_stages): Triton's Hopper-friendly BF16 GEMM tiles; autotuned per shape
GEMM_TILES = (
    (128, 256, 64, 8, 8, 3),
    (128, 128, 64, 8, 8, 4),
    (128, 128, 64, 8, 4, 4),
    (64, 256, 64, 8, 4, 4),
    (128, 64, 64, 8, 4, 4),
    (64, 128, 64, 8, 4, 4),
)


def _configs():
    return [
        triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": g}, num_warps=w, num_stages=s)
        for bm, bn, bk, g, w, s in GEMM_TILES
    ]


@triton.jit
def _scaled_gemm_body(a_ptr, b_ptr, ta_ptr, tb_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bn, stride_bk,
                      BM, BN, BK, GROUP_M, DOT_BF16):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rows_a = (offs_m % M).to(tl.int64)  # rows past the edge re-read valid rows; their results are not stored
    rows_b = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BK)
    a_ptrs = a_ptr + rows_a[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + rows_b[:, None] * stride_bn + offs_k[None, :] * stride_bk
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, K, BK):  # K is a multiple of BK (zero-padded by the dequantization)
        a, b = tl.load(a_ptrs), tl.load(b_ptrs)
        if not DOT_BF16:  # Triton's CPU interpreter: its bf16 dot is wrong; the products are exact in fp32 too
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc)
        a_ptrs += BK * stride_ak
        b_ptrs += BK * stride_bk
    out = acc * (tl.load(ta_ptr) * tl.load(tb_ptr))
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], out.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.autotune(configs=_configs(), key=["M", "N", "K", "stride_ak", "stride_bk"])
@triton.jit
def _scaled_gemm_kernel(a_ptr, b_ptr, ta_ptr, tb_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bn, stride_bk,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, DOT_BF16: tl.constexpr):  # fmt: skip
    _scaled_gemm_body(a_ptr, b_ptr, ta_ptr, tb_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bn, stride_bk,
                      BM, BN, BK, GROUP_M, DOT_BF16)  # fmt: skip


@triton.jit
def _scaled_gemm_fixed(a_ptr, b_ptr, ta_ptr, tb_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bn, stride_bk,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, DOT_BF16: tl.constexpr):  # fmt: skip
    _scaled_gemm_body(a_ptr, b_ptr, ta_ptr, tb_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bn, stride_bk,
                      BM, BN, BK, GROUP_M, DOT_BF16)  # fmt: skip


def scaled_gemm(a16, b16, ta, tb, out_dtype, *, tile: tuple | None = None) -> torch.Tensor:
    """``(a16 @ b16^T) * ta * tb`` for bf16 (M, K), (N, K) with K a multiple of ``K_ALIGN``; FP32 accumulation.

    Either operand may be any strided 2D view (e.g. ``w16.T``, a transposed weight for dgrad): the kernel
    reads it through its strides. ``tile`` = one ``GEMM_TILES`` entry skips the autotuner (the benchmark
    and the interpreter use it).
    """
    M, K = a16.shape
    N = b16.shape[0]
    if K % K_ALIGN or b16.shape[1] != K:
        raise ValueError(f"scaled_gemm: K must match and be a multiple of {K_ALIGN}, got {tuple(a16.shape)}, {tuple(b16.shape)}")
    c = torch.empty((M, N), dtype=out_dtype, device=a16.device)
    strides = (*a16.stride(), *b16.stride())
    if tile is None and not a16.is_cuda:
        tile = (32, 32, 64, 2, 4, 1)  # Triton's interpreter cannot time configs
    if tile is None:
        grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)  # noqa: E731
        _scaled_gemm_kernel[grid](a16, b16, ta, tb, c, M, N, K, *strides, DOT_BF16=True)
    else:
        bm, bn, bk, g, w, s = tile
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        _scaled_gemm_fixed[grid](a16, b16, ta, tb, c, M, N, K, *strides, BM=bm, BN=bn, BK=bk, GROUP_M=g,
                                 DOT_BF16=a16.is_cuda, num_warps=w, num_stages=s)
    return c


def qmm_dequant(
    ma, mb, out_dtype: torch.dtype, *, tile: tuple | None = None, cublas: bool = False, mx: bool = False
) -> torch.Tensor:
    """``A @ B^T`` from ``nvfp4_gemm._nvfp4_matrix`` tuples (``mx``: ``mx_matrix`` ones): dequantize both to
    BF16, then one GEMM.

    ``cublas=True`` runs the BF16 GEMM on cuBLAS (``torch.mm``, FP32 accumulation with reduced-precision
    split-K reductions disabled) and applies the tensor scales in a separate pass (the benchmark compares).
    """
    a_p, a_s, ta, M, kp, a_br = ma
    b_p, b_s, tb, N, _, b_br = mb
    k_out = -(-kp // K_ALIGN) * K_ALIGN
    a16 = dequantize_bf16(a_p, a_s, a_br, k_out, mx=mx)
    b16 = dequantize_bf16(b_p, b_s, b_br, k_out, mx=mx)
    a16, b16 = a16[:M], b16[:N]  # operands padded to 16 rows (2D blocks) carry zero rows past M / N
    if not cublas:
        return scaled_gemm(a16, b16, ta, tb, out_dtype, tile=tile)
    flag = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        c = torch.mm(a16, b16.T, out_dtype=torch.float32)
    except (TypeError, RuntimeError):  # no fp32-output mm in this torch: a bf16 result, rounded once more
        c = torch.mm(a16, b16.T).float()
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = flag
    return (c * (ta * tb)).to(out_dtype)


def mx_matrix(q):
    """``_nvfp4_matrix``'s tuple for an MXFP4 operand with 1x32 blocks (tensor scale 1), or None otherwise."""
    from ..formats import E2M1
    from ..schemes import MXConfig

    if not isinstance(q.config, MXConfig) or q.config.elem != E2M1 or q.config.block != (1, 32):
        return None
    kp = q.data.shape[-1] * 2
    packed = q.data.reshape(-1, kp // 2)
    scales = q.scales.view(torch.uint8).reshape(-1, kp // 32)
    rows = q.shape.numel() // q.shape[-1] if len(q.shape) else 1
    one = torch.ones(1, dtype=torch.float32, device=q.data.device)
    return packed.contiguous(), scales.contiguous(), one, rows, kp, 1


def qmm_mx(a, b, *, out_dtype: torch.dtype = torch.float32):
    """``A @ B^T`` for MXFP4 (1x32) operands through the dequantize-to-BF16 GEMM, or None where it does not apply."""
    ma, mb = mx_matrix(a), mx_matrix(b)
    if ma is None or mb is None or not (a.data.is_cuda and b.data.is_cuda) or ma[4] != mb[4] or len(b.shape) != 2:
        return None
    return qmm_dequant(ma, mb, out_dtype, mx=True).reshape(*a.shape[:-1], mb[3])
