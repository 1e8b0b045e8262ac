"""Quantization error metrics (float64 accumulation so the metric adds no error of its own)."""

from __future__ import annotations

import math

import torch

__all__ = ["mse", "sqnr_db", "max_abs_error", "flushed_to_zero", "error_report"]


def _pair(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != x_hat.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(x_hat.shape)}")
    return x.double(), x_hat.double()


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = _pair(x, x_hat)
    return float((x - x_hat).square().mean())


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(sum x^2 / sum (x - x_hat)^2); +inf when exact."""
    x, x_hat = _pair(x, x_hat)
    noise = float((x - x_hat).square().sum())
    signal = float(x.square().sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def max_abs_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = _pair(x, x_hat)
    return float((x - x_hat).abs().max()) if x.numel() else 0.0


def flushed_to_zero(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of the non-zero inputs that dequantize to zero."""
    x, x_hat = _pair(x, x_hat)
    nonzero = x != 0
    n = int(nonzero.sum())
    return float(((x_hat == 0) & nonzero).sum()) / n if n else 0.0


def error_report(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
    return {
        "mse": mse(x, x_hat),
        "sqnr_db": sqnr_db(x, x_hat),
        "max_abs_error": max_abs_error(x, x_hat),
        "flushed_to_zero": flushed_to_zero(x, x_hat),
    }
