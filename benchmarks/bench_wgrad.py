"""The fused wgrad-operand kernel (transpose + token padding + RHT + SR + NVFP4 quantize) against a device copy.

Also the dual kernel (``kernels.quantize_dual``: the rowwise operand and the wgrad operand of one tensor from
one amax pass and one quantize pass) against the two separate kernels it replaces, dequantized outputs as
QuantLinear takes them; its bytes count both outputs.

Effective bandwidth = (input bytes read once + packed codes and scales written) / time, as for the quantize
benchmark; the baseline is a device-to-device copy measured in the same run. Also the reference chain it
replaces (``wgrad_inputs`` + ``fourbit.quantize``: transposed copy, pad, RHT in PyTorch, quantize kernel).

    PYTHONPATH=. python benchmarks/bench_wgrad.py [--out FILE.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from common import median_ms, device_header, emit

import fourbit
import fourbit.kernels as K
from fourbit.hadamard import RHT, rht
from fourbit.schemes import NVFP4Config


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_wgrad: needs a CUDA GPU; nothing to do")
        return
    lines = [device_header(), ""]
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    copy_gbs = 2 * src.numel() / copy_ms / 1e6
    del src, dst
    lines += [f"device-to-device copy of 1 GiB: {copy_ms:.3f} ms = {copy_gbs:.0f} GB/s (read + write)", "",
              "| what (tokens x features, bf16) | ms | GB/s | x copy |", "|---|---|---|---|"]  # fmt: skip
    cfg = NVFP4Config()
    transform = RHT()
    for M, Fd in ((16384, 768), (16384, 4096), (8192, 8192)):
        t = torch.randn(M, Fd, device="cuda", dtype=torch.bfloat16)
        nbytes = M * Fd * 2 + M * Fd // 2 + M * Fd // 16  # read once + packed codes + scales
        amax = K.wgrad_amax(t, cfg, transform)
        cases = {
            "fused: RHT + SR, amax measured (two reads)": lambda: K.quantize_wgrad(t, cfg, rounding="stochastic", seed=1, transform=transform),
            "fused: RHT + SR, amax given (one read)": lambda: K.quantize_wgrad(t, cfg, rounding="stochastic", seed=1, transform=transform, amax=amax),
            "fused: RHT + RNE, amax given": lambda: K.quantize_wgrad(t, cfg, rounding="nearest", seed=None, transform=transform, amax=amax),
            "fused: transpose only (no RHT), RNE, amax given": lambda: K.quantize_wgrad(t, cfg, rounding="nearest", seed=None, amax=amax),
            "reference chain: t.T, pad, rht (PyTorch), fourbit.quantize SR": lambda: fourbit.quantize(
                rht(F.pad(t.T, (0, 0)), -1, transform=transform), "nvfp4", rounding="stochastic", seed=1, check_finite=False),
        }  # fmt: skip
        for name, fn in cases.items():
            ms = median_ms(fn)
            gbs = nbytes / ms / 1e6
            lines.append(f"| {M}x{Fd} {name} | {ms:.4f} | {gbs:.0f} | {gbs / copy_gbs:.2f} |")
        row, col = K.DualOperand("nearest"), K.DualOperand("stochastic", 1)
        dual_bytes = M * Fd * 2 + 2 * (M * Fd * 2)  # read once, two bf16 outputs
        dual_cases = {
            "dual: rowwise RNE + wgrad RHT + SR, dequantized, amax measured": lambda: K.quantize_dual(
                t, cfg, row, col, transform=transform, dequantized=True),
            "separate: quantize_dequantized + quantize_wgrad(dequantized=True)": lambda: (
                K.quantize_dequantized(t, cfg, rounding="nearest"),
                K.quantize_wgrad(t, cfg, rounding="stochastic", seed=1, transform=transform, dequantized=True)),
        }  # fmt: skip
        for name, fn in dual_cases.items():
            ms = median_ms(fn)
            gbs = dual_bytes / ms / 1e6
            lines.append(f"| {M}x{Fd} {name} | {ms:.4f} | {gbs:.0f} | {gbs / copy_gbs:.2f} |")
        del t
    emit(lines, args.out)


if __name__ == "__main__":
    main()
