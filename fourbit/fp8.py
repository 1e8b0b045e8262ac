"""FP8 reference quantizer with float32 scales: per tensor, or per tile / block (DeepSeek-V3).

    s_enc = min(elem_max / amax, FLT_MAX)   (1 where amax is 0; NaN where it is not finite)
    codes = elem(x * s_enc)          RNE (or stochastic), saturating
    scale = 1 / s_enc                the stored float32 decode scale, x_hat = value * scale

Per tensor (``block=None``): one scale, ``amax/448`` for E4M3 or ``amax/57344`` for E5M2 (the "hybrid"
FP8 recipe uses E4M3 for weights and activations, E5M2 for gradients). DeepSeek-V3 (arXiv 2412.19437,
section 3.3): 1x128 tiles for activations and gradients, 128x128 blocks for weights.
``pow2_scale=True`` rounds the decode scale up to a power of two, so scaling is exact.
"""

from __future__ import annotations

import torch

from ._fp32 import F32_MAX, exp2i, floor_log2
from .rounding import Rounding
from .schemes import FP8Config
from .nvfp4 import _blocks

__all__ = ["quantize_fp8", "dequantize_fp8"]


def _encode_scale(amax: torch.Tensor, config: FP8Config) -> torch.Tensor:
    # s_enc = min(elem_max / amax, FLT_MAX): an amax below elem_max / FLT_MAX (~1.3e-36 for E4M3) would
    # overflow s_enc to inf and decode every element to 0; clamped, as Transformer Engine clamps it
    s_enc = torch.clamp(torch.tensor(config.elem.max, dtype=torch.float32) / amax, max=F32_MAX)
    if config.pow2_scale:
        # largest power of two <= elem_max / amax, i.e. the decode scale rounded up
        s_enc = exp2i(floor_log2(s_enc))
    s_enc = torch.where(amax == 0, torch.ones_like(s_enc), s_enc)
    return torch.where(torch.isfinite(amax), s_enc, torch.nan)


def quantize_fp8(
    x: torch.Tensor,
    config: FP8Config,
    rounding: Rounding = Rounding.NEAREST,
    random_bits: torch.Tensor | None = None,
    amax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (R, C) -> (codes uint8 (R, C), decode scales float32: () per tensor or (R/br, C/bc)).

    ``amax`` (per tensor only) replaces the measured one."""
    x = x.float()
    R, C = x.shape
    block = config.block or (R, C)
    xb = _blocks(x, block) if x.numel() else x.reshape(1, R, 1, C)
    bits = None if random_bits is None else random_bits.reshape(xb.shape)
    if amax is not None:
        amax_b = amax.float().reshape(1, 1, 1, 1)
    else:
        amax_b = xb.abs().amax(dim=(1, 3), keepdim=True) if x.numel() else torch.zeros(1, 1, 1, 1)
    s_enc = _encode_scale(amax_b, config)
    scaled = torch.nan_to_num(xb * s_enc, nan=0.0)
    codes = config.elem.encode(scaled, rounding, random_bits=bits, check_nan=False)  # NaN removed above
    scales = 1.0 / s_enc
    scales = scales.reshape(()) if config.block is None else scales.reshape(R // block[0], C // block[1])
    return codes.reshape(R, C), scales


def dequantize_fp8(codes: torch.Tensor, scales: torch.Tensor, config: FP8Config) -> torch.Tensor:
    values = config.elem.decode(codes)
    if config.block is None:
        return values * scales
    return (_blocks(values, config.block) * scales[:, None, :, None]).reshape(codes.shape)
