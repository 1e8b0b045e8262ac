"""How kernels walk their operands: tile scheduling of the GEMMs, strided reads of the quantize kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid``, walking GROUP_M row tiles per column of tiles so that consecutive
    programs share operand tiles in L2 (Triton's matmul tutorial, "L2 cache optimizations")."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % group) % size_m, (pid % group) // size_m


def reads_in_place(x: torch.Tensor) -> bool:
    """A transposed view of a contiguous matrix (e.g. wgrad's ``dy.T``, ``x.T``): a quantize kernel reads it
    through its strides, in tiles long along the contiguous dim, instead of copying it to contiguous memory."""
    return x.dim() == 2 and not x.is_contiguous() and x.t().is_contiguous()


def row_reader(x: torch.Tensor, strided: bool) -> tuple[torch.Tensor, int, int, bool]:
    """How a quantize kernel reads ``x`` as (R, C) rows: (tensor, row stride, column stride, in place).

    With ``strided`` a transposed view of a contiguous matrix is read through its own strides; anything
    else is made contiguous first (a copy where it is not) and read row-major."""
    if strided and reads_in_place(x):
        return x, x.stride(0), x.stride(1), True
    return x.contiguous(), x.shape[-1], 1, False
