"""Transpose of packed FP4 codes in one pass: (R, C/2) bytes -> (C, R/2) bytes, codes unchanged.

``fourbit.gemm.transpose`` reuses a 16x16-block NVFP4 weight for dgrad as ``Q(W)^T``. The reference unpacks,
transposes and repacks with several PyTorch ops (and ``pack_fp4`` validates its codes with a device sync);
this kernel loads a (BR, BC/2) tile of bytes, splits each byte into its two codes (element 2i is the low
nibble), transposes the (BR, BC) code tile and packs adjacent rows of the input into the bytes of the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import on_operand_device


@triton.jit
def _fp4_transpose_kernel(src_ptr, dst_ptr, R, C, BR: tl.constexpr, BC: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)[:, None]  # (BR, 1) input rows
    p = tl.program_id(1).to(tl.int64) * (BC // 2) + tl.arange(0, BC // 2)[None, :]  # input byte columns
    packed = tl.load(src_ptr + r * (C // 2) + p, mask=(r < R) & (p < C // 2), other=0).to(tl.int32)
    codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BR, BC))  # codes[i, 2j], codes[i, 2j + 1]
    pairs = tl.reshape(tl.trans(codes), (BC, BR // 2, 2))  # (out row c, out byte, which input row)
    even, odd = tl.split(pairs)
    out = (even | (odd << 4)).to(tl.uint8)  # (BC, BR/2)
    c = tl.program_id(1).to(tl.int64) * BC + tl.arange(0, BC)[:, None]
    q = tl.program_id(0).to(tl.int64) * (BR // 2) + tl.arange(0, BR // 2)[None, :]
    tl.store(dst_ptr + c * (R // 2) + q, out, mask=(c < C) & (q < R // 2))


@on_operand_device
def transpose_packed(data: torch.Tensor, *, br: int = 64, bc: int = 64) -> torch.Tensor:
    """(R, C/2) packed FP4 -> (C, R/2) packed FP4 of the transposed code matrix (R even)."""
    R, half = data.shape
    C = 2 * half
    if R % 2:
        raise ValueError(f"transpose_packed: the row count must be even to pack the transpose, got {R}")
    src = data.contiguous()
    dst = torch.empty((C, R // 2), dtype=torch.uint8, device=data.device)
    _fp4_transpose_kernel[(triton.cdiv(R, br), triton.cdiv(C, bc))](src, dst, R, C, BR=br, BC=bc, num_warps=4)
    return dst
