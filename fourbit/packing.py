"""Two FP4 codes per byte.

Layout (the one Blackwell's GEMMs, ModelOpt checkpoints and ``torch.float4_e2m1fn_x2`` use): along the
last dim, element ``2i`` goes to the low nibble of byte ``i`` and element ``2i + 1`` to the high nibble::

    codes  [..., C]     uint8 in [0, 16)    e.g. [0x1, 0x7, 0x8, 0xF]
    packed [..., C/2]   uint8               e.g. [0x71, 0xF8]
"""

from __future__ import annotations

import torch

__all__ = ["pack_fp4", "unpack_fp4", "as_float4_x2"]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack_fp4 expects uint8 codes, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dim, got shape {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > 0xF:
        raise ValueError("pack_fp4: codes must be 4-bit (< 16)")
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_fp4 expects uint8, got {packed.dtype}")
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def as_float4_x2(packed: torch.Tensor) -> torch.Tensor:
    """View packed FP4 bytes as ``torch.float4_e2m1fn_x2`` (same bytes, same layout)."""
    dtype = getattr(torch, "float4_e2m1fn_x2", None)
    if dtype is None:
        raise RuntimeError(f"torch {torch.__version__} has no float4_e2m1fn_x2 dtype")
    return packed.view(dtype)
