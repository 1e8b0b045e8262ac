"""Tile sweep of the two NVFP4 quantize kernels a training step runs, on the gpu preset's operand shapes.

QuantLinear's emulated NVFP4 path quantizes each fprop/dgrad operand with the rowwise kernel
(``quantize_nvfp4_dequantized``: ``tile``, ``max_blocks``, ``num_warps``) and each wgrad operand with the
fused transpose + RHT + SR kernel (``quantize_nvfp4_wgrad``: ``bf`` features x ``nb`` 16-token blocks per
program, ``num_warps``). Every configuration must give the same bits as the default (each 16-element block
is quantized on its own and the SR bits depend on the element's index only); the sweep checks that, then
prints each configuration's time against the default's and against a device copy of the same bytes.

    PYTHONPATH=. python benchmarks/sweep_tiles.py [--tokens 16384 32768] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from common import device_header, emit, median_ms

from fourbit.hadamard import RHT
from fourbit.kernels import _signs
from fourbit.kernels.nvfp4_quantize import quantize_nvfp4_dequantized, quantize_nvfp4_wgrad, wgrad_amax
from fourbit.rounding import Rounding
from fourbit.schemes import NVFP4Config

FEATURES = (768, 3072)  # the gpu preset's model width and MLP width: every operand is (tokens, one of these)
ROWWISE = dict(tile=(2048, 4096, 8192), max_blocks=(16, 32, 64), num_warps=(4, 8))
WGRAD = dict(bf=(32, 64, 128), nb=(1, 2, 4, 8), num_warps=(4, 8))


def grid(space: dict) -> list[dict]:
    return [dict(zip(space, v)) for v in itertools.product(*space.values())]


def sweep(name: str, fn, space: dict, default: dict, nbytes: int, copy_gbs: float) -> list[str]:
    ref = fn(**default)
    base_ms = median_ms(lambda: fn(**default))
    rows = []
    for kw in grid(space):
        try:
            out = fn(**kw)
        except Exception as e:  # a tile Triton cannot build (shared memory, registers): say so, go on
            rows.append((float("inf"), kw, f"fails: {type(e).__name__}"))
            continue
        same = all(torch.equal(a, b) for a, b in zip(out, ref))
        ms = median_ms(lambda: fn(**kw))
        rows.append((ms, kw, "" if same else "BITS DIFFER"))
    rows.sort(key=lambda r: r[0])
    lines = [f"### {name}: default {default} {base_ms * 1e3:.1f} us = {nbytes / base_ms / 1e6 / copy_gbs:.2f}x copy", "",
             "| config | us | vs default | x copy | bits |", "|---|---|---|---|---|"]  # fmt: skip
    for ms, kw, note in rows[:6] + ([rows[-1]] if len(rows) > 6 else []):
        x_copy = nbytes / ms / 1e6 / copy_gbs if ms != float("inf") else 0.0
        lines.append(f"| {kw} | {ms * 1e3:.1f} | {base_ms / ms:.2f}x | {x_copy:.2f}x | {note or 'same'} |")
    if any(note == "BITS DIFFER" for _, _, note in rows):
        lines.append("**a configuration changed the bits: the kernel is not tile-independent**")
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[16384])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("sweep_tiles: needs a CUDA GPU; nothing to do")
        return
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() / median_ms(lambda: dst.copy_(src)) / 1e6
    del src, dst
    lines = [device_header(), "", f"device copy: {copy_gbs:.0f} GB/s (read + write); bf16 input read once, bf16 "
             "dequantized operand written (the bytes a training step moves)", ""]  # fmt: skip
    cfg, signs = NVFP4Config(), _signs(RHT(), torch.device("cuda"))
    for M, F in itertools.product(args.tokens, FEATURES):
        x = torch.randn(M, F, device="cuda", dtype=torch.bfloat16)
        nbytes = 2 * M * F * 2  # bf16 in, bf16 out
        amax = x.float().abs().amax()

        def rowwise(**kw):
            return quantize_nvfp4_dequantized(x, cfg, Rounding.NEAREST, None, amax, **kw)

        t_amax = wgrad_amax(x, signs)

        def wgrad(**kw):
            return quantize_nvfp4_wgrad(x, cfg, Rounding.STOCHASTIC, 1, signs, t_amax, dequantized=True, **kw)

        lines += sweep(f"rowwise {M}x{F} RNE, amax given", rowwise, ROWWISE, dict(tile=4096, max_blocks=32, num_warps=4),
                       nbytes, copy_gbs)  # fmt: skip
        lines += sweep(f"wgrad {M}x{F} RHT + SR, amax given", wgrad, WGRAD, dict(bf=32, nb=4, num_warps=4), nbytes, copy_gbs)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
