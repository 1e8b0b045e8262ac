"""float32 bit helpers shared by the reference quantizers (exact powers of two, exponents from bits)."""

from __future__ import annotations

import torch

F32_MAX = torch.finfo(torch.float32).max


def exp2i(k: torch.Tensor | int) -> torch.Tensor:
    """2^k as float32, built from its bits (exact for every k in [-149, 127]; 0 below, Inf above)."""
    k = torch.as_tensor(k, dtype=torch.int64)
    normal = ((k.clamp(-126, 127) + 127) << 23).to(torch.int32).view(torch.float32)
    subnormal = (torch.ones_like(k) << (k.clamp(-149, -127) + 149)).to(torch.int32).view(torch.float32)
    v = torch.where(k >= -126, normal, subnormal)
    v = torch.where(k < -149, 0.0, v)
    return torch.where(k > 127, torch.inf, v)


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """floor(log2 |x|) read from the float32 exponent field (subnormals and zero give -127)."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64)
    return ((bits >> 23) & 0xFF) - 127
