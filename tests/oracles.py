"""Independent references for the tests: ml_dtypes casts and float64 re-derivations of the scale rules.

Nothing here imports fourbit's quantizers: the point is to check them against a second derivation.
float32 arithmetic is re-derived as float64 math rounded to float32 (exact for + - * /: a double holds the
exact product of two floats, and double rounding is innocuous for these operations).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

ML_DTYPES = {
    "E2M1": ml_dtypes.float4_e2m1fn,
    "E2M3": ml_dtypes.float6_e2m3fn,
    "E3M2": ml_dtypes.float6_e3m2fn,
    "E4M3": ml_dtypes.float8_e4m3fn,
    "E5M2": ml_dtypes.float8_e5m2,
    "E8M0": ml_dtypes.float8_e8m0fnu,
}


def f32(x):
    return np.asarray(x, dtype=np.float64).astype(np.float32)


def cast_codes(x: np.ndarray, name: str, saturate: bool = True) -> np.ndarray:
    """float -> codes through ml_dtypes (which does not saturate: clip first when asked)."""
    dt = ML_DTYPES[name]
    x = np.asarray(x, dtype=np.float32)
    if saturate:
        m = float(ml_dtypes.finfo(dt).max)
        x = np.where(np.isfinite(x), np.clip(x, -m, m), x)
    return x.astype(dt).view(np.uint8)


def decode(codes: np.ndarray, name: str) -> np.ndarray:
    return np.asarray(codes, dtype=np.uint8).view(ML_DTYPES[name]).astype(np.float64)


def nvfp4_reference(x: np.ndarray, block=(1, 16), scale_max: float = 448.0):
    """NVFP4 by the issue's rule, float64 math rounded to float32 at each step. x: (R, C) float32."""
    x = f32(x).astype(np.float64)
    R, C = x.shape
    br, bc = block
    amax = np.abs(x).max() if x.size else 0.0
    s_enc = 1.0 if (amax == 0 or not np.isfinite(amax)) else min(float(f32(6 * scale_max / amax)), float(np.finfo(np.float32).max))
    s_enc = float(f32(s_enc))
    s_dec = float(f32(1.0 / s_enc))
    xb = x.reshape(R // br, br, C // bc, bc)
    amax_b = np.abs(xb).max(axis=(1, 3), keepdims=True)
    one_sixth = float(f32(1.0 / 6.0))
    base = f32(amax_b * float(f32(s_enc * one_sixth)))
    scale_codes = cast_codes(base, "E4M3")
    s_dec_b = decode(scale_codes, "E4M3")
    denom = f32(s_dec_b * s_dec).astype(np.float64)
    with np.errstate(divide="ignore"):
        s_enc_b = np.where(denom == 0, 0.0, f32(1.0 / np.where(denom == 0, 1.0, denom)).astype(np.float64))
    scaled = f32(xb * s_enc_b)
    codes = cast_codes(scaled, "E2M1")
    x_hat = f32(f32(decode(codes, "E2M1") * s_dec_b).astype(np.float64) * s_dec)
    return (
        codes.reshape(R, C),
        scale_codes.reshape(R // br, C // bc),
        np.float32(s_dec),
        x_hat.reshape(R, C),
    )
