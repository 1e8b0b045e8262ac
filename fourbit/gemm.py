"""The GEMM dispatch point: ``qmm(a, b) = A @ B^T`` on quantized (or plain) operands.

Both operands are laid out (rows, K) and quantized along K, the reduction dim, which is how block-scaled
tensor cores consume them (every scale block lies inside one K slice):

    a: (M, K)  QuantizedTensor or Tensor
    b: (N, K)  QuantizedTensor or Tensor
    out = a @ b^T  float32 (M, N)

Two quantized operands with float32 accumulation go through the ``fourbit::qmm`` op (``fourbit.ops``): a
kernel on CUDA where one covers the pair (NVFP4, MX, FP8 on ``scaled_mm``), else the reference, which
dequantizes both to float32 and multiplies with float32 accumulation. A limited-precision
``Accumulation`` model, or an unquantized operand, takes that reference here directly.

``transpose(q)`` gives the quantized ``W^T`` of a weight quantized with square 2D blocks (or one scale per
tensor) without quantizing again: the blocks of ``W^T`` are those of ``W`` transposed, so the codes and
scales are the same numbers (this is why the NVFP4 recipe's 16x16 weight blocks let fprop and dgrad share
one quantized weight).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from . import ops
from .packing import pack_fp4
from .qtensor import QuantizedTensor

__all__ = ["qmm", "transpose", "dequantize_operand"]


def dequantize_operand(t: QuantizedTensor | torch.Tensor) -> torch.Tensor:
    """float32 values of an operand: dequantized if quantized, else cast."""
    if isinstance(t, QuantizedTensor):
        return t.dequantize(torch.float32)
    return t.float()


def _check(name: str, t) -> None:
    if not isinstance(t, (QuantizedTensor, torch.Tensor)):
        raise TypeError(f"qmm: {name} must be a QuantizedTensor or a torch.Tensor, got {type(t).__name__}")
    if len(t.shape) != 2:
        raise ValueError(f"qmm: {name} must be 2D (rows, K), got shape {tuple(t.shape)}")
    if isinstance(t, torch.Tensor) and not t.is_floating_point():
        raise TypeError(f"qmm: {name} must be a floating tensor, got {t.dtype}")


def qmm(
    a: QuantizedTensor | torch.Tensor,
    b: QuantizedTensor | torch.Tensor,
    *,
    accumulation=None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``A @ B^T`` for a (M, K) and b (N, K), each quantized along K (or not quantized).

    ``accumulation``: a ``fourbit.accumulation.Accumulation`` (anything with ``matmul(a, b) = a @ b.T``),
    or None for float32 accumulation. The float32 result is rounded once to ``out_dtype`` (a kernel writes
    it in that dtype directly).
    """
    _check("a", a)
    _check("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"qmm: reduction dims differ, a {tuple(a.shape)} vs b {tuple(b.shape)} (both (rows, K))")

    quantized = isinstance(a, QuantizedTensor) and isinstance(b, QuantizedTensor)
    if accumulation is None and quantized:
        return ops.qmm(a, b, out_dtype)  # the kernel on CUDA where one covers the pair, else the reference
    a_hp, b_hp = dequantize_operand(a), dequantize_operand(b)  # (M, K), (N, K) float32
    if accumulation is not None:
        return accumulation.matmul(a_hp, b_hp).to(out_dtype)
    return (a_hp @ b_hp.T).to(out_dtype)  # (M, N), float32 accumulation


def _triton() -> bool:
    from .kernels import triton_available

    return triton_available()


def transpose(q: QuantizedTensor) -> QuantizedTensor:
    """The quantized transpose of a 2D QuantizedTensor with square 2D blocks or a per-tensor scale.

    Equal, code for code and scale for scale, to quantizing the transposed tensor with the same config
    and round-to-nearest (a 1D block along one dim is not a block along the other, so those raise).
    """
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"transpose expects a QuantizedTensor, got {type(q).__name__}")
    if len(q.shape) != 2:
        raise ValueError(f"transpose expects a 2D QuantizedTensor, got shape {tuple(q.shape)}")
    block = q.config.block
    if block is not None and block[0] != block[1]:
        raise ValueError(f"transpose needs square 2D blocks or a per-tensor scale, got block {block}")
    R, C = q.shape
    rows, cols = q.data.shape[0], q.data.shape[-1] * (2 if q.packed else 1)  # (R_pad, C_pad)
    if (rows, cols) != (R, C):
        raise ValueError(f"transpose: padded QuantizedTensor {(rows, cols)} vs shape {(R, C)} is not supported")
    if q.packed and q.data.is_cuda and R % 2 == 0 and _triton():
        from .kernels.fp4_transpose import transpose_packed

        data = transpose_packed(q.data)  # one kernel, no device sync
    else:
        codes_t = q.codes().T.contiguous()  # (C, R)
        data = pack_fp4(codes_t) if q.packed else codes_t
    scales = q.scales if block is None else q.scales.T.contiguous()
    return replace(q, data=data, scales=scales, shape=torch.Size((C, R)))
