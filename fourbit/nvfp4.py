"""NVFP4 reference quantizer: the scale rule, written once, in the kernel's float32 operation order.

Two-level scaling (NVFP4 pre-training paper, arXiv 2509.25149, with Transformer Engine >= 2.15's
operation order, which decides last-bit ties):

    s_enc   = min(6 * 448 / amax(x), FLT_MAX)        (1 if amax is 0 or not finite)
    s_dec   = 1 / s_enc                              per-tensor decode scale (``tensor_scale``)
    s_dec_b = e4m3_rne(amax_b * (s_enc * fp32(1/6)))  per-block decode scale, stored as E4M3 (saturating)
    s_enc_b = 1 / (fp32(s_dec_b) * s_dec)             per-block encode scale (codes are 0 where s_dec_b is 0)
    q       = e2m1(x * s_enc_b)                       RNE (or stochastic), saturating to +-6
    x_hat   = e2m1_value(q) * fp32(s_dec_b) * s_dec

Four-over-six (arXiv 2512.02010): the E4M3 bound is 256 instead of 448, and each block picks the
map-to-6 scale ``s_dec_b`` or the map-to-4 scale ``e4m3(1.5 * amax_b * s_enc / 6)``, whichever dequantizes
the block with the lower error (ties: map-to-6).

A non-finite block gets a NaN scale, so it dequantizes to NaN, never to a finite number.
"""

from __future__ import annotations

import torch

from ._fp32 import F32_MAX
from .formats import E2M1, E2M1_MAX, E4M3, E4M3_MAX
from .rounding import Rounding
from .schemes import ErrorMetric, NVFP4Config

FOUR_OVER_SIX_SCALE_MAX = 256.0  # the E4M3 bound with four-over-six: 1.5 * 256 = 384 < 448 never saturates
ONE_SIXTH = torch.tensor(1.0 / E2M1_MAX, dtype=torch.float32)  # fp32(1/6), folded as TE folds it

__all__ = ["global_encode_scale", "quantize_nvfp4", "dequantize_nvfp4"]


def global_encode_scale(amax: torch.Tensor, scale_max: float = E4M3_MAX) -> torch.Tensor:
    """s_enc = min(6 * scale_max / amax, FLT_MAX) in float32; 1 where amax is 0 or not finite."""
    amax = amax.float()
    s_enc = torch.clamp(torch.tensor(E2M1_MAX * scale_max, dtype=torch.float32) / amax, max=F32_MAX)
    return torch.where((amax == 0) | ~torch.isfinite(amax), torch.ones_like(s_enc), s_enc)


def _blocks(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(R, C) -> (R/br, br, C/bc, bc) view."""
    br, bc = block
    R, C = x.shape
    return x.reshape(R // br, br, C // bc, bc)


def _encode_block(xb, s_dec_b, s_dec, rounding, bits):
    """E2M1 codes of blocked x for the given E4M3 block scales (float32)."""
    denom = s_dec_b * s_dec
    # s_enc_b = 1 / (fp32(s_dec_b) * s_dec); a zero (or underflowed) scale encodes the block as zeros
    s_enc_b = torch.where(denom == 0, torch.zeros_like(denom), 1.0 / denom)
    return E2M1.encode(torch.nan_to_num(xb * s_enc_b, nan=0.0), rounding, random_bits=bits, check_nan=False)


def _block_error(codes, s_dec_b, s_dec, xb, metric: ErrorMetric) -> torch.Tensor:
    """Sum over each block of the squared (MSE) or absolute (MAE) error of the dequantized block."""
    diff = E2M1.decode(codes) * s_dec_b * s_dec - xb
    err = diff.square() if metric is ErrorMetric.MSE else diff.abs()
    return err.sum(dim=(1, 3), keepdim=True)


def quantize_nvfp4(
    x: torch.Tensor,
    config: NVFP4Config,
    rounding: Rounding = Rounding.NEAREST,
    random_bits: torch.Tensor | None = None,
    amax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 (R, C) -> (codes uint8 (R, C), scales float8_e4m3fn (R/br, C/bc), tensor_scale float32 ())."""
    x = x.float()
    scale_max = FOUR_OVER_SIX_SCALE_MAX if config.four_over_six else E4M3_MAX
    if amax is None:
        amax = x.abs().amax() if x.numel() else torch.zeros((), dtype=torch.float32)
    s_enc = global_encode_scale(torch.as_tensor(amax, dtype=torch.float32), scale_max)
    s_dec = 1.0 / s_enc

    xb = _blocks(x, config.block)  # (R/br, br, C/bc, bc)
    bits = None if random_bits is None else _blocks(random_bits, config.block)
    amax_b = xb.abs().amax(dim=(1, 3), keepdim=True)  # (R/br, 1, C/bc, 1)
    finite_b = torch.isfinite(amax_b)
    amax_b = torch.where(finite_b, amax_b, torch.zeros_like(amax_b))

    # s_dec_b = e4m3(amax_b * (s_enc * fp32(1/6)))
    base = amax_b * (s_enc * ONE_SIXTH)
    scale_codes = E4M3.encode(base)
    s_dec_b = E4M3.decode(scale_codes)
    codes = _encode_block(xb, s_dec_b, s_dec, rounding, bits)

    if config.four_over_six:
        # map-to-4: e4m3(1.5 * base); keep it where it dequantizes the block strictly better (ties: map-to-6)
        scale_codes4 = E4M3.encode(1.5 * base)
        s_dec_b4 = E4M3.decode(scale_codes4)
        codes4 = _encode_block(xb, s_dec_b4, s_dec, rounding, bits)
        metric = config.four_over_six_error
        take4 = _block_error(codes4, s_dec_b4, s_dec, xb, metric) < _block_error(codes, s_dec_b, s_dec, xb, metric)
        scale_codes = torch.where(take4, scale_codes4, scale_codes)
        codes = torch.where(take4, codes4, codes)

    # a non-finite block: NaN scale (dequantizes to NaN), zero codes
    scale_codes = torch.where(finite_b, scale_codes, E4M3.nan_code)
    codes = torch.where(finite_b, codes, torch.zeros_like(codes))

    R, C = x.shape
    scales = scale_codes.reshape(R // config.block[0], C // config.block[1]).view(torch.float8_e4m3fn)
    return codes.reshape(R, C), scales, s_dec.reshape(())


def dequantize_nvfp4(codes: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor, block) -> torch.Tensor:
    """x_hat = e2m1_value * fp32(s_dec_b) * s_dec, float32 (R, C)."""
    values = _blocks(E2M1.decode(codes), block)
    s_dec_b = scales.float()[:, None, :, None]
    R, C = codes.shape
    return (values * s_dec_b * tensor_scale.float()).reshape(R, C)
