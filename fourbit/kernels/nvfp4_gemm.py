"""NVFP4 GEMMs for Hopper, emulated: packed FP4 + E4M3 scales dequantized in registers, BF16 tensor cores.

Why it is exact up to accumulation: an E2M1 value (at most 2 significant bits) times an E4M3 scale (at
most 4) has at most 5 significant bits and an exponent in [-10, 12], so it is exactly a BF16 number; the
tensor cores multiply BF16 pairs exactly and accumulate in FP32. Only the accumulation order (and the
final tensor-scale multiply) differs from float64 math on the dequantized operands.

Dequantization, per packed byte ``p`` (two codes: ``p & 0xF`` is element 2i, ``p >> 4`` element 2i+1)::

    bits  = (code & 7) << 22 | (code & 8) << 28   float32 whose value is e2m1(code) * 2^-126 (exact; a
                                                  float32 subnormal for |code| < 2, just as E2M1's 0.5)
    w     = bf16(bits * (e4m3(scale) * 2^110))    = e2m1 * scale * 2^-16, exact
    out   = acc * 2^16 (* 2^16) * tensor scales   in the epilogue

The even (low-nibble) and odd (high-nibble) K indices are never interleaved: the K loop does one dot over
the even half and one over the odd half of each K tile, which sums the same products.

Tiling (``_qmm_kernel``): program (m, n) owns a (BM, BN) output tile and walks K in steps of BK::

    A packed (BM, BK/2) uint8, scales (BM, BK/16) --dequant--> A_even, A_odd (BM, BK/2) bf16
    B packed (BN, BK/2) uint8, scales (BN, BK/16) --dequant--> B_even, B_odd (BN, BK/2) bf16
    acc (BM, BN) fp32 += A_even @ B_even^T + A_odd @ B_odd^T
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..schemes import NVFP4Config
from .tl_formats import decode_e4m3

TWO_POW_110 = tl.constexpr(1.298074214633707e33)  # 2^110: e2m1 * 2^-126 * scale * 2^110 = e2m1 * scale * 2^-16
TWO_POW_16 = tl.constexpr(65536.0)

# (BM, BN, BK, num_warps, num_stages); the benchmark tries each, qmm uses the first unless told
GEMM_CONFIGS = (
    (128, 128, 128, 8, 3),
    (128, 256, 128, 8, 3),
    (128, 128, 64, 4, 4),
    (64, 128, 128, 4, 4),
)
# (BN, BK, SPLIT_K, num_warps, num_stages) for the skinny W4A16 kernel
GEMV_CONFIGS = (
    (64, 256, 1, 4, 4),
    (32, 256, 1, 4, 4),
    (64, 128, 1, 4, 5),
    (128, 256, 1, 8, 3),
    (64, 256, 2, 4, 4),
)


@triton.jit
def _dequant(packed, scale_codes, BR: tl.constexpr, BK: tl.constexpr, DOT_BF16: tl.constexpr):
    """packed (BR, BK/2) uint8, scale codes (BR, BK/16) -> even, odd halves (BR, BK/2) bf16, times 2^-16.

    ``DOT_BF16=False`` (Triton's CPU interpreter, whose bf16 dot is wrong) returns the same values as float32.
    """
    s = decode_e4m3(scale_codes.to(tl.int32)) * TWO_POW_110  # (BR, BK/16)
    s = tl.reshape(tl.broadcast_to(s[:, :, None], (BR, BK // 16, 8)), (BR, BK // 2))
    p = packed.to(tl.int32)
    lo = p & 0xF
    hi = p >> 4
    even = ((((lo & 7) << 22) | ((lo & 8) << 28)).to(tl.float32, bitcast=True) * s).to(tl.bfloat16)
    odd = ((((hi & 7) << 22) | ((hi & 8) << 28)).to(tl.float32, bitcast=True) * s).to(tl.bfloat16)
    if not DOT_BF16:
        even, odd = even.to(tl.float32), odd.to(tl.float32)
    return even, odd


@triton.jit
def _qmm_kernel(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    ta_ptr,
    tb_ptr,
    c_ptr,
    M,
    N,
    K,  # padded K (a multiple of 16)
    A_SROWS: tl.constexpr,  # 1 for 1x16 blocks, 16 for 16x16
    B_SROWS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_p = tl.arange(0, BK // 2)
    offs_s = tl.arange(0, BK // 16)
    KP = K // 2
    KS = K // 16
    a_rows = offs_m.to(tl.int64)
    b_rows = offs_n.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        pk = k // 2 + offs_p
        sk = k // 16 + offs_s
        a_p = tl.load(a_ptr + a_rows[:, None] * KP + pk[None, :], mask=(offs_m[:, None] < M) & (pk[None, :] < KP), other=0)
        a_s = tl.load(as_ptr + (a_rows // A_SROWS)[:, None] * KS + sk[None, :], mask=(offs_m[:, None] < M) & (sk[None, :] < KS), other=0)
        b_p = tl.load(b_ptr + b_rows[:, None] * KP + pk[None, :], mask=(offs_n[:, None] < N) & (pk[None, :] < KP), other=0)
        b_s = tl.load(bs_ptr + (b_rows // B_SROWS)[:, None] * KS + sk[None, :], mask=(offs_n[:, None] < N) & (sk[None, :] < KS), other=0)
        a_even, a_odd = _dequant(a_p, a_s, BM, BK, DOT_BF16)
        b_even, b_odd = _dequant(b_p, b_s, BN, BK, DOT_BF16)
        acc = tl.dot(a_even, tl.trans(b_even), acc)
        acc = tl.dot(a_odd, tl.trans(b_odd), acc)
    ta = tl.load(ta_ptr)
    tb = tl.load(tb_ptr)
    out = acc * TWO_POW_16 * TWO_POW_16 * ta * tb
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptr + a_rows[:, None] * N + offs_n[None, :], out.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _w4a16_kernel(
    x_ptr,
    w_ptr,
    ws_ptr,
    tw_ptr,
    y_ptr,
    B,
    N,
    K,  # padded K of the weights
    K_X,  # the activations' K (the unpadded K); columns past it read as 0
    W_SROWS: tl.constexpr,
    BB: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_BF16: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_b = tl.arange(0, BB)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_p = tl.arange(0, BK // 2)
    offs_s = tl.arange(0, BK // 16)
    KP = K // 2
    KS = K // 16
    w_rows = offs_n.to(tl.int64)
    acc = tl.zeros((BB, BN), dtype=tl.float32)
    for k in range(pid_k * BK, K, BK * SPLIT_K):
        pk = k // 2 + offs_p
        sk = k // 16 + offs_s
        w_p = tl.load(w_ptr + w_rows[:, None] * KP + pk[None, :], mask=(offs_n[:, None] < N) & (pk[None, :] < KP), other=0)
        w_s = tl.load(ws_ptr + (w_rows // W_SROWS)[:, None] * KS + sk[None, :], mask=(offs_n[:, None] < N) & (sk[None, :] < KS), other=0)
        w_even, w_odd = _dequant(w_p, w_s, BN, BK, DOT_BF16)
        xk = 2 * pk
        x_mask = offs_b[:, None] < B
        x_even = tl.load(x_ptr + offs_b[:, None] * K_X + xk[None, :], mask=x_mask & (xk[None, :] < K_X), other=0.0)
        x_odd = tl.load(x_ptr + offs_b[:, None] * K_X + xk[None, :] + 1, mask=x_mask & (xk[None, :] + 1 < K_X), other=0.0)
        if not DOT_BF16:
            x_even, x_odd = x_even.to(tl.float32), x_odd.to(tl.float32)
        acc = tl.dot(x_even, tl.trans(w_even), acc)
        acc = tl.dot(x_odd, tl.trans(w_odd), acc)
    out = acc * TWO_POW_16 * tl.load(tw_ptr)
    y_mask = (offs_b[:, None] < B) & (offs_n[None, :] < N)
    y_ptrs = y_ptr + offs_b[:, None] * N + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tl.atomic_add(y_ptrs, out, mask=y_mask)


def _nvfp4_matrix(q, what: str):
    """(packed (Rp, Kp/2), scales (R/br, Kp/16) uint8, tensor_scale (1,), rows R, Kp, block rows) of an operand."""
    from ..quantize import QuantizedTensor

    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"{what} must be a QuantizedTensor, got {type(q).__name__}")
    if not isinstance(q.config, NVFP4Config):
        return None
    kp = q.data.shape[-1] * 2
    packed = q.data.reshape(-1, kp // 2)
    scales = q.scales.view(torch.uint8).reshape(-1, kp // 16)
    rows = q.shape.numel() // q.shape[-1] if len(q.shape) else 1
    return packed.contiguous(), scales.contiguous(), q.tensor_scale.reshape(1).float(), rows, kp, q.config.block[0]


def _usable(*tensors) -> bool:
    from . import triton_available

    return all(t.is_cuda for t in tensors) and triton_available()


def qmm(a, b, *, out_dtype: torch.dtype = torch.float32, config: tuple | None = None):
    """``A @ B^T`` (float32 by default) of NVFP4 operands quantized along K: shapes (*, K) and (N, K).

    Returns None where the kernel does not apply (not NVFP4, not on CUDA, no triton).
    """
    ma, mb = _nvfp4_matrix(a, "a"), _nvfp4_matrix(b, "b")
    if ma is None or mb is None or not _usable(a.data, b.data):
        return None
    return _qmm(a, b, ma, mb, out_dtype, config)


def _qmm(a, b, ma, mb, out_dtype, config):
    a_p, a_s, ta, M, ka, a_br = ma
    b_p, b_s, tb, N, kb, b_br = mb
    if a.shape[-1] != b.shape[-1] or ka != kb:
        raise ValueError(f"qmm: K differs: a {tuple(a.shape)} (padded {ka}), b {tuple(b.shape)} (padded {kb})")
    if len(b.shape) != 2:
        raise ValueError(f"qmm: b must be a matrix (N, K), got shape {tuple(b.shape)}")
    BM, BN, BK, warps, stages = config or GEMM_CONFIGS[0]
    c = torch.empty((M, N), dtype=out_dtype, device=a.data.device)
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    _qmm_kernel[grid](
        a_p, a_s, b_p, b_s, ta, tb, c, M, N, ka,
        A_SROWS=a_br, B_SROWS=b_br, BM=BM, BN=BN, BK=BK, GROUP_M=8, DOT_BF16=a_p.is_cuda, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return c.reshape(*a.shape[:-1], N)


def linear_w4a16(x: torch.Tensor, w, bias: torch.Tensor | None = None, *, config: tuple | None = None):
    """``x @ W^T (+ bias)`` for BF16 ``x`` (..., K) with at most 16 rows and NVFP4 weights (N, K); BF16 out.

    Returns None where the kernel does not apply (not NVFP4, not CUDA, x not BF16, more than 16 rows).
    """
    mw = _nvfp4_matrix(w, "w")
    if mw is None or not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16 or not _usable(x, w.data):
        return None
    return _linear_w4a16(x, w, mw, bias, config)


def _linear_w4a16(x, w, mw, bias, config):
    w_p, w_s, tw, N, kp, w_br = mw
    K = x.shape[-1]
    if K != w.shape[-1]:
        raise ValueError(f"linear_w4a16: x has K={K}, weights {tuple(w.shape)}")
    x2 = x.reshape(-1, K).contiguous()
    B = x2.shape[0]
    if B > 16:
        return None
    BN, BK, split, warps, stages = config or GEMV_CONFIGS[0]
    y = torch.zeros((B, N), dtype=torch.float32, device=x.device) if split > 1 else torch.empty((B, N), dtype=torch.bfloat16, device=x.device)
    grid = (triton.cdiv(N, BN), split)
    _w4a16_kernel[grid](
        x2, w_p, w_s, tw, y, B, N, kp, K,
        W_SROWS=w_br, BB=16, BN=BN, BK=BK, SPLIT_K=split, DOT_BF16=x2.is_cuda, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    y = y.to(torch.bfloat16)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], N)
