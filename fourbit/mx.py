"""OCP Microscaling (MX v1.0) reference quantizer: blocks of 32 share a power-of-two E8M0 scale.

FLOOR (OCP MX v1.0 section 6.3):  X = 2^(floor(log2 amax_b) - emax_elem), with floor(log2 .) read exactly
                                   from the float32 exponent bits; clamped to E8M0's range [-127, 127].
RCEIL (cuBLAS / Blackwell, TE's MXFP8):  X = 2^ceil(log2(amax_b * fp32(1/elem_max))), from the bits.
Elements: ``elem(x * (1/X))`` (the reciprocal is an exact power of two), RNE or stochastic, saturating.
A non-finite block gets the NaN scale 0xFF. Matches torchao's ``to_mx`` for both modes.
"""

from __future__ import annotations

import torch

from ._fp32 import exp2i, floor_log2
from .rounding import Rounding
from .schemes import MXConfig, ScaleMode
from .nvfp4 import _blocks

E8M0_BIAS = 127
E8M0_NAN = 0xFF

__all__ = ["quantize_mx", "dequantize_mx"]


def _scale_exponent(amax_b: torch.Tensor, config: MXConfig) -> torch.Tensor:
    """Unbiased E8M0 exponent per block (int64); +128 marks NaN."""
    if config.scale_mode is ScaleMode.FLOOR:
        emax_elem = int(floor_log2(torch.tensor(config.elem.max)))
        e = torch.clamp(floor_log2(amax_b) - emax_elem, -E8M0_BIAS, E8M0_BIAS)
    else:
        # descale = amax_b * fp32(1/elem_max); round its exponent up when any mantissa bit is set
        descale = amax_b * torch.tensor(1.0 / config.elem.max, dtype=torch.float32)
        bits = descale.contiguous().view(torch.int32).to(torch.int64)
        biased, mant = (bits >> 23) & 0xFF, bits & 0x7FFFFF
        # a float32 subnormal only exceeds 2^-127 (code 0) above 0x400000
        up = torch.where(biased == 0, mant > 0x400000, mant != 0)
        e = biased + up.to(torch.int64) - E8M0_BIAS
    return torch.where(torch.isfinite(amax_b), e, E8M0_NAN - E8M0_BIAS)


def quantize_mx(
    x: torch.Tensor,
    config: MXConfig,
    rounding: Rounding = Rounding.NEAREST,
    random_bits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (R, C) -> (codes uint8 (R, C), scales float8_e8m0fnu (R/br, C/bc))."""
    x = x.float()
    xb = _blocks(x, config.block)
    bits = None if random_bits is None else _blocks(random_bits, config.block)
    amax_b = xb.abs().amax(dim=(1, 3), keepdim=True)
    e = _scale_exponent(amax_b, config)
    nan_b = e == E8M0_NAN - E8M0_BIAS
    # data * 2^-e: an exact power of two (2^-127 .. 2^127)
    scaled = torch.where(nan_b, torch.zeros_like(xb), xb * exp2i(-e))
    codes = config.elem.encode(scaled, rounding, random_bits=bits, check_nan=False)  # NaN blocks zeroed above
    R, C = x.shape
    scale_codes = (e + E8M0_BIAS).to(torch.uint8).reshape(R // config.block[0], C // config.block[1])
    return codes.reshape(R, C), scale_codes.view(torch.float8_e8m0fnu)


def dequantize_mx(codes: torch.Tensor, scales: torch.Tensor, config: MXConfig) -> torch.Tensor:
    values = _blocks(config.elem.decode(codes), config.block)
    e = scales.view(torch.uint8).to(torch.int64)[:, None, :, None]
    scale = torch.where(e == E8M0_NAN, torch.nan, exp2i(e - E8M0_BIAS))
    return (values * scale).reshape(codes.shape)
