"""Real FP8 (and, on Blackwell, NVFP4) tensor-core GEMMs through ``torch.nn.functional.scaled_mm``.

``fp8_mm(a, b)`` computes ``A @ B^T`` for FP8 ``QuantizedTensor``s quantized along K, on cuBLAS:

* per tensor (``"fp8"``): ``ScalingType.TensorWise`` with the float32 decode scales, E4M3 x E4M3 or one
  E5M2 operand (cuBLAS has no E5M2 x E5M2); M, N, K multiples of 16.
* DeepSeek blockwise (``"fp8-blockwise"``), sm90 only: ``BlockWise1x128`` activations/gradients times
  ``BlockWise128x128`` weights, or 1x128 x 1x128. Layouts (checked before the call; anything else returns
  None with the reason in a warning, and the caller falls back to emulation):
  1x128 scales M-major ``[M, K/128]`` (stride ``(1, M)``, M a multiple of 4); 128x128 scales of a (N, K)
  weight stored ``(N/128, round_up(K/128, 4))`` and passed transposed, i.e. ``(round_up(K/128, 4), N/128)``;
  K a multiple of 128, N a multiple of 128 for 128x128.

``nvfp4_mm_native(a, b)`` is the Blackwell path for NVFP4: ``float4_e2m1fn_x2`` operands,
``[BlockWise1x16, TensorWise]`` scales, the E4M3 block scales in the ``SWIZZLE_32_4_4`` layout
(``swizzle.to_blocked``). It is gated strictly on compute capability >= 10: on Hopper the call is
unsupported and a malformed one can crash the process. (Not run here: no sm100 GPU was available.)
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from ..formats import E5M2
from ..schemes import FP8Config, NVFP4Config
from .swizzle import to_blocked

__all__ = ["fp8_mm", "fp8_mm_unsupported", "nvfp4_mm_native", "blockwise_scale_layouts"]


def _fp8_dtype(q) -> torch.dtype:
    return torch.float8_e5m2 if q.config.elem == E5M2 else torch.float8_e4m3fn


def _capability(t: torch.Tensor) -> tuple[int, int]:
    return _device_capability(t.device.index if t.device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def fp8_mm_unsupported(a, b) -> str | None:
    """Why ``fp8_mm`` cannot run ``a @ b^T`` on cuBLAS (None if it can)."""
    from ..qtensor import QuantizedTensor

    if not (isinstance(a, QuantizedTensor) and isinstance(b, QuantizedTensor)):
        return "operands must be QuantizedTensors"
    if not (isinstance(a.config, FP8Config) and isinstance(b.config, FP8Config)):
        return f"operands must be fp8, got {a.config.name} and {b.config.name}"
    if not (a.data.is_cuda and b.data.is_cuda):
        return "scaled_mm needs CUDA tensors"
    if not hasattr(F, "scaled_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.scaled_mm (torch >= 2.10)"
    if len(b.shape) != 2:
        return f"b must be a matrix (N, K), got shape {tuple(b.shape)}"
    K = a.shape[-1]
    M, N = a.shape.numel() // K, b.shape[0]
    if b.shape[-1] != K:
        return f"K differs: a {tuple(a.shape)}, b {tuple(b.shape)}"
    if a.config.elem == E5M2 and b.config.elem == E5M2:
        return "cuBLAS has no E5M2 x E5M2 GEMM"
    if _capability(a.data) < (8, 9):
        return f"FP8 tensor cores need sm89+, got sm{''.join(map(str, _capability(a.data)))}"
    ba, bb = a.config.block, b.config.block
    if ba is None and bb is None:
        if M % 16 or N % 16 or K % 16:
            return f"per-tensor FP8 needs M, N, K multiples of 16, got {M}, {N}, {K}"
        return None
    if ba is None or bb is None:
        return f"mixed per-tensor / blockwise operands ({ba}, {bb})"
    if _capability(a.data) != (9, 0):
        return f"blockwise scaled_mm runs on sm90 only, got sm{''.join(map(str, _capability(a.data)))}"
    if (ba, bb) not in (((1, 128), (128, 128)), ((1, 128), (1, 128))):
        return f"blockwise pair {ba} x {bb} is not wired (supported: (1,128)x(128,128), (1,128)x(1,128))"
    if a.config.elem == E5M2 or b.config.elem == E5M2:
        return "blockwise scaled_mm takes E4M3 operands only"
    if K % 128:
        return f"blockwise FP8 needs K % 128 == 0, got K={K}"
    if M % 4:
        return f"1x128 scales must be M-major with M % 4 == 0, got M={M}"
    if bb == (128, 128) and N % 128:
        return f"128x128 weight scales need N % 128 == 0, got N={N}"
    if bb == (1, 128) and N % 4:
        return f"1x128 scales of b must be N-major with N % 4 == 0, got N={N}"
    return None


def blockwise_scale_layouts(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale tensors ``scaled_mm`` wants for a blockwise pair (see the module docstring)."""
    K = a.shape[-1]
    sa = a.scales.reshape(-1, K // 128).float()  # (M, K/128)
    sa = sa.t().contiguous().t()  # M-major: stride (1, M)
    sb = b.scales.float()
    if b.config.block == (128, 128):
        kb = K // 128
        sb = F.pad(sb, (0, _round_up(kb, 4) - kb))  # (N/128, round_up(K/128, 4))
        sb = sb.t()  # (round_up(K/128, 4), N/128), a transposed view
    else:
        sb = sb.reshape(-1, K // 128).t().contiguous().t()  # (N, K/128), N-major
    return sa, sb


def fp8_mm(a, b, *, out_dtype: torch.dtype = torch.bfloat16, warn: bool = True):
    """``A @ B^T`` on FP8 tensor cores, or None (with a warning saying why) where cuBLAS cannot run it."""
    why = fp8_mm_unsupported(a, b)
    if why is not None:
        if warn:
            warnings.warn(f"fp8_mm: {why}; falling back to emulation", stacklevel=2)
        return None
    K = a.shape[-1]
    a_fp8 = a.data.reshape(-1, K).contiguous().view(_fp8_dtype(a))  # (M, K) row-major
    b_fp8 = b.data.contiguous().view(_fp8_dtype(b)).t()  # (K, N) column-major
    if a.config.block is None:
        sa, sb = a.scales.float().reshape(()), b.scales.float().reshape(())
        ra = rb = F.ScalingType.TensorWise
    else:
        sa, sb = blockwise_scale_layouts(a, b)
        ra = F.ScalingType.BlockWise1x128
        rb = F.ScalingType.BlockWise128x128 if b.config.block == (128, 128) else F.ScalingType.BlockWise1x128
    out = F.scaled_mm(a_fp8, b_fp8, sa, ra, sb, rb, output_dtype=out_dtype)
    return out.reshape(*a.shape[:-1], b.shape[0])


def nvfp4_mm_native(a, b, *, out_dtype: torch.dtype = torch.bfloat16):
    """NVFP4 x NVFP4 on Blackwell tensor cores (``A @ B^T``), or None below compute capability 10."""
    if not (isinstance(getattr(a, "config", None), NVFP4Config) and isinstance(getattr(b, "config", None), NVFP4Config)):
        return None
    if not (a.data.is_cuda and b.data.is_cuda) or _capability(a.data) < (10, 0):
        return None  # never reach scaled_mm's FP4 path on Hopper or older
    if a.config.block != (1, 16) or b.config.block != (1, 16) or not hasattr(torch, "float4_e2m1fn_x2"):
        return None
    kp = a.data.shape[-1] * 2
    a_fp4 = a.data.reshape(-1, kp // 2).contiguous().view(torch.float4_e2m1fn_x2)
    b_fp4 = b.data.reshape(-1, kp // 2).contiguous().view(torch.float4_e2m1fn_x2).t()
    sa = to_blocked(a.scales.view(torch.uint8).reshape(-1, kp // 16)).view(torch.float8_e4m3fn)
    sb = to_blocked(b.scales.view(torch.uint8).reshape(-1, kp // 16)).view(torch.float8_e4m3fn)
    out = F.scaled_mm(
        a_fp4,
        b_fp4,
        [sa, a.tensor_scale.float().reshape(())],
        [F.ScalingType.BlockWise1x16, F.ScalingType.TensorWise],
        [sb, b.tensor_scale.float().reshape(())],
        [F.ScalingType.BlockWise1x16, F.ScalingType.TensorWise],
        swizzle_a=[F.SwizzleType.SWIZZLE_32_4_4, F.SwizzleType.NO_SWIZZLE],
        swizzle_b=[F.SwizzleType.SWIZZLE_32_4_4, F.SwizzleType.NO_SWIZZLE],
        output_dtype=out_dtype,
    )
    return out.reshape(*a.shape[:-1], b.shape[0])
