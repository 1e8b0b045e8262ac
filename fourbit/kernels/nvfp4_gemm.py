"""NVFP4 GEMMs for Hopper, emulated (no FP4 tensor cores): ``qmm`` (NVFP4 x NVFP4) and ``linear_w4a16``
(BF16 activations x NVFP4 weights, for decode).

Why it is exact up to accumulation: an E2M1 value (at most 2 significant bits) times an E4M3 scale (at
most 4) has at most 5 significant bits and an exponent in [-10, 12], so it is exactly a BF16 number; the
tensor cores multiply BF16 pairs exactly and accumulate in FP32. Only the accumulation order (and the
final tensor-scale multiply) differs from float64 math on the dequantized operands.

``qmm`` dequantizes each operand to BF16 once, then runs a BF16 tensor-core GEMM with the tensor scales in
its epilogue (``dequant_gemm``; ``method="cublas"`` runs the BF16 GEMM on cuBLAS instead). This file holds
the operand unpacking (``_nvfp4_matrix``) and the W4A16 kernels.

W4A16 (``linear_w4a16``, x (B, K) BF16 times W (N, K) NVFP4, B <= 16) has two kernels:

* B <= ``FMA_MAX_BATCH`` (1) by default (``_w4a16_fma_kernel``, CUDA cores): decode is memory-bound, so the
  kernel streams the packed weights as 32-bit words (16-byte loads) and turns each word's 8 nibbles into
  float32 two per multiply (``tl_formats.decode_e2m1_pair``)::

      v  = e2m1 * 2^-126 of nibbles j and j + 4 of each word           4 x (and, multiply, and, shift)
      y += tw * sum_blocks scale * sum_{i in block} (v_i * 2^126) * x_i   float32 FMAs (products exact)

  A program owns BN rows and the whole K (no split-K, no atomics); 28672 rows give 896 programs of 32 rows.
* larger B up to 16 (``_w4a16_kernel``, tensor cores): x padded to 16 rows; each (BN, BK) weight tile is
  dequantized in registers by ``_dequant``, per packed byte ``p`` (element 2i in the low nibble, 2i+1 in
  the high one)::

      e2m1 * 2^-126 of p's two nibbles            decode_e2m1_pair(p, 0), decode_e2m1_pair(p, 4)
      w = bf16(that * (e4m3(scale) * 2^110))      = e2m1 * scale * 2^-16, exact
      y = acc * 2^16 * tensor scale               in the epilogue

  The even (low-nibble) and odd (high-nibble) K indices are never interleaved: the K loop does one dot over
  the even half and one over the odd half of each K tile, which sums the same products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..schemes import NVFP4Config
from .tl_formats import TWO_POW_126, decode_e2m1_pair, decode_e4m3

TWO_POW_110 = tl.constexpr(1.298074214633707e33)  # 2^110: e2m1 * 2^-126 * scale * 2^110 = e2m1 * scale * 2^-16
TWO_POW_16 = tl.constexpr(65536.0)

# (BN, BK, SPLIT_K, num_warps, num_stages) for the tensor-core W4A16 kernel (batches above FMA_MAX_BATCH,
# or any batch given one of these as its config); the first is the default (the fastest at B = 1 and 16 on
# an H100, benchmarks/RESULTS.md)
GEMV_CONFIGS = (
    (128, 256, 1, 8, 3),
    (64, 256, 1, 4, 4),
    (32, 256, 1, 4, 4),
    (64, 128, 1, 4, 5),
    (64, 256, 2, 4, 4),
)
# (BN, BKB, num_warps) for the CUDA-core W4A16 kernel (batch 1 by default, at most 4): BN weight rows per
# program, BKB 16-element blocks per K step (2 * BKB packed 32-bit words per row); the first is the default
# (0.074 ms at 1x8192 . 28672x8192 on an H100, the others 0.10-0.12 ms; benchmarks/RESULTS.md)
GEMV_FMA_CONFIGS = (
    (32, 64, 4),
    (32, 32, 4),
    (64, 32, 4),
    (64, 16, 4),
)
# batches up to this take the CUDA-core kernel by default, larger ones the tensor-core kernel. Measured on an
# H100: at B = 4 the CUDA-core kernel (4 batch rows in registers, 246-255 registers, spills) took 0.27 ms
# against 0.18 ms for the tensor-core one; B = 2 was not measured, so it stays on the tensor cores.
FMA_MAX_BATCH = 1
FMA_BATCH_LIMIT = 4  # the most rows the CUDA-core kernel takes when its config is asked for explicitly


@triton.jit
def _dequant(packed, scale_codes, BR: tl.constexpr, BK: tl.constexpr, DOT_BF16: tl.constexpr):
    """packed (BR, BK/2) uint8, scale codes (BR, BK/16) -> even, odd halves (BR, BK/2) bf16, times 2^-16.

    ``DOT_BF16=False`` (Triton's CPU interpreter, whose bf16 dot is wrong) returns the same values as float32.
    """
    s = decode_e4m3(scale_codes.to(tl.int32)) * TWO_POW_110  # (BR, BK/16)
    s = tl.reshape(tl.broadcast_to(s[:, :, None], (BR, BK // 16, 8)), (BR, BK // 2))
    p = packed.to(tl.int32)
    even, _ = decode_e2m1_pair(p, 0)  # the low nibble, e2m1 * 2^-126
    odd, _ = decode_e2m1_pair(p, 4)  # the high nibble
    even = (even * s).to(tl.bfloat16)
    odd = (odd * s).to(tl.bfloat16)
    if not DOT_BF16:
        even, odd = even.to(tl.float32), odd.to(tl.float32)
    return even, odd


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


@triton.jit
def _fma_batch_row(acc, w, w8, scale, x_ptr, b: tl.constexpr, B, K_X, xk, EVEN_K: tl.constexpr):
    """acc (BN, BKB) += scale * block sums of e2m1(w) * x[b] for one batch row ``b``."""
    BN: tl.constexpr = w.shape[0]
    BKW: tl.constexpr = w.shape[1]
    pw = tl.zeros((BN, BKW), dtype=tl.float32)
    for j in tl.static_range(4):  # nibbles j and j + 4 of every word: elements 8t + j, 8t + j + 4
        if j < 2:
            v_lo, v_hi = decode_e2m1_pair(w, 4 * j)
        else:
            v_lo, v_hi = decode_e2m1_pair(w8, 4 * (j - 2))
        if EVEN_K:  # no column mask: K_X is a multiple of the K step
            x_lo = tl.load(x_ptr + b * K_X + xk + j, mask=b < B, other=0.0).to(tl.float32)
            x_hi = tl.load(x_ptr + b * K_X + xk + j + 4, mask=b < B, other=0.0).to(tl.float32)
        else:
            x_lo = tl.load(x_ptr + b * K_X + xk + j, mask=(b < B) & (xk + j < K_X), other=0.0).to(tl.float32)
            x_hi = tl.load(x_ptr + b * K_X + xk + j + 4, mask=(b < B) & (xk + j + 4 < K_X), other=0.0).to(tl.float32)
        pw += (v_lo * TWO_POW_126) * x_lo[None, :]  # e2m1 * x, exact products
        pw += (v_hi * TWO_POW_126) * x_hi[None, :]
    pb = tl.sum(tl.reshape(pw, (BN, BKW // 2, 2)), axis=2)  # (BN, BKB): the two words of each block
    return acc + pb * scale


@triton.jit
def _w4a16_fma_kernel(
    x_ptr,
    w_ptr,  # packed weights viewed as int32 words (N, K/8): word t holds elements 8t..8t+7, low nibble first
    ws_ptr,
    tw_ptr,
    y_ptr,
    B,
    N,
    KS,  # 16-element blocks per weight row (padded K / 16)
    K_X,  # the activations' K; columns past it read as 0
    W_SROWS: tl.constexpr,
    BB: tl.constexpr,  # batch rows handled: 1, 2 or 4 (>= B)
    BN: tl.constexpr,
    BKB: tl.constexpr,
    EVEN_K: tl.constexpr,  # K_X == 16 * KS and KS a multiple of BKB
):
    """y[b, n] = tw * sum_blocks scale[n, blk] * sum_{i in blk} e2m1(w[n, i]) * x[b, i], in float32.

    A program owns BN weight rows and the whole K: each step loads (BN, 2*BKB) words (16-byte loads),
    turns each word's 8 nibbles into float32 values (mask, multiply, mask, times 2^126), multiplies by x,
    sums each 16-element block, scales it and adds it to (BN, BKB) partial sums per batch row; one
    reduction at the end. CUDA cores only: at batch <= 4 the weight stream (4.5 bits a weight) is the cost.
    """
    pid_n = tl.program_id(0)
    rows = pid_n * BN + tl.arange(0, BN)
    rows64 = rows.to(tl.int64)
    rmask = rows < N
    offs_w = tl.arange(0, 2 * BKB)
    offs_b = tl.arange(0, BKB)
    KW = 2 * KS
    acc0 = tl.zeros((BN, BKB), dtype=tl.float32)
    acc1 = tl.zeros((BN, BKB), dtype=tl.float32)
    acc2 = tl.zeros((BN, BKB), dtype=tl.float32)
    acc3 = tl.zeros((BN, BKB), dtype=tl.float32)
    for kb in range(0, KS, BKB):
        wcol = 2 * kb + offs_w  # (2 BKB,) word columns
        w = tl.load(w_ptr + rows64[:, None] * KW + wcol[None, :], mask=rmask[:, None] & (wcol[None, :] < KW), other=0)
        w = w.to(tl.uint32, bitcast=True)
        w8 = w >> 8
        bcol = kb + offs_b
        sc = tl.load(ws_ptr + (rows64 // W_SROWS)[:, None] * KS + bcol[None, :], mask=rmask[:, None] & (bcol[None, :] < KS), other=0)
        scale = decode_e4m3(sc.to(tl.int32))  # (BN, BKB)
        xk = wcol * 8  # first element of each word
        acc0 = _fma_batch_row(acc0, w, w8, scale, x_ptr, 0, B, K_X, xk, EVEN_K)
        if BB > 1:
            acc1 = _fma_batch_row(acc1, w, w8, scale, x_ptr, 1, B, K_X, xk, EVEN_K)
        if BB > 2:
            acc2 = _fma_batch_row(acc2, w, w8, scale, x_ptr, 2, B, K_X, xk, EVEN_K)
            acc3 = _fma_batch_row(acc3, w, w8, scale, x_ptr, 3, B, K_X, xk, EVEN_K)
    tw = tl.load(tw_ptr)
    tl.store(y_ptr + rows64, (tl.sum(acc0, axis=1) * tw).to(y_ptr.dtype.element_ty), mask=rmask)
    if BB > 1:
        tl.store(y_ptr + N + rows64, (tl.sum(acc1, axis=1) * tw).to(y_ptr.dtype.element_ty), mask=rmask & (1 < B))
    if BB > 2:
        tl.store(y_ptr + 2 * N + rows64, (tl.sum(acc2, axis=1) * tw).to(y_ptr.dtype.element_ty), mask=rmask & (2 < B))
        tl.store(y_ptr + 3 * N + rows64, (tl.sum(acc3, axis=1) * tw).to(y_ptr.dtype.element_ty), mask=rmask & (3 < B))


def _nvfp4_matrix(q, what: str):
    """(packed (Rp, Kp/2), scales (R/br, Kp/16) uint8, tensor_scale (1,), rows R, Kp, block rows) of an operand."""
    from ..qtensor import QuantizedTensor

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


QMM_METHODS = ("dequant", "cublas")


def qmm(a, b, *, out_dtype: torch.dtype = torch.float32, config: tuple | None = None, method: str | None = None):
    """``A @ B^T`` (float32 by default) of NVFP4 operands quantized along K: shapes (*, K) and (N, K).

    Each operand is dequantized to BF16 once; then ``method`` ``"dequant"`` (the default, None too) runs the
    BF16 tensor-core GEMM with the tensor scales in its epilogue (``dequant_gemm.scaled_gemm``; ``config`` one
    of ``dequant_gemm.GEMM_TILES``, autotuned when None) and ``"cublas"`` runs it on cuBLAS. Returns None
    where no kernel applies (not NVFP4, not on CUDA, no triton).
    """
    method = method or "dequant"
    if method not in QMM_METHODS:
        raise ValueError(f"qmm: unknown method {method!r}; known: {', '.join(QMM_METHODS)}")
    ma, mb = _nvfp4_matrix(a, "a"), _nvfp4_matrix(b, "b")
    if ma is None or mb is None or not _usable(a.data, b.data):
        return None
    if a.shape[-1] != b.shape[-1] or ma[4] != mb[4]:
        raise ValueError(f"qmm: K differs: a {tuple(a.shape)} (padded {ma[4]}), b {tuple(b.shape)} (padded {mb[4]})")
    if len(b.shape) != 2:
        raise ValueError(f"qmm: b must be a matrix (N, K), got shape {tuple(b.shape)}")
    from .dequant_gemm import qmm_dequant

    c = qmm_dequant(ma, mb, out_dtype, tile=config, cublas=method == "cublas")
    return c.reshape(*a.shape[:-1], mb[3])


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
    fma = B <= FMA_MAX_BATCH if config is None else len(config) == 3
    if fma and B > FMA_BATCH_LIMIT:
        raise ValueError(f"linear_w4a16: the CUDA-core config {config} takes at most {FMA_BATCH_LIMIT} rows, got {B}")
    if fma and w_p.data_ptr() % 4 == 0:  # (a byte-offset view of the weights takes the tensor-core kernel)
        BN, BKB, warps = config or GEMV_FMA_CONFIGS[0]
        y = torch.empty((B, N), dtype=torch.bfloat16, device=x.device)
        _w4a16_fma_kernel[(triton.cdiv(N, BN),)](
            x2, w_p.view(torch.int32), w_s, tw, y, B, N, kp // 16, K,
            W_SROWS=w_br, BB=triton.next_power_of_2(B), BN=BN, BKB=BKB, EVEN_K=K == kp and (kp // 16) % BKB == 0, num_warps=warps,
        )  # fmt: skip
    else:
        BN, BK, split, warps, stages = config if config is not None and len(config) == 5 else GEMV_CONFIGS[0]
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
