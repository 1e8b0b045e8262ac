"""Quantization error metrics (float64 accumulation so the metric adds no error of its own)."""

from __future__ import annotations

import math

import torch

__all__ = ["sqnr_db", "flushed_to_zero"]


def _pair(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != x_hat.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(x_hat.shape)}")
    return x.double(), x_hat.double()


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(sum x^2 / sum (x - x_hat)^2); +inf when exact."""
    x, x_hat = _pair(x, x_hat)
    noise = float((x - x_hat).square().sum())
    signal = float(x.square().sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def flushed_to_zero(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of the non-zero inputs that dequantize to zero."""
    x, x_hat = _pair(x, x_hat)
    nonzero = x != 0
    n = int(nonzero.sum())
    return float(((x_hat == 0) & nonzero).sum()) / n if n else 0.0
