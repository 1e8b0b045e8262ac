"""A quantized Linear layer's forward + backward (three GEMMs and every quantization) against ``nn.Linear`` BF16.

Hidden size 8192 (K = N = 8192), BF16 input and weights, no bias; the baseline, cuBLAS BF16 through
``nn.Linear``, is measured in the same run. One timed call = forward, then backward with a fixed output
gradient (input and weight gradients both computed). FLOPs = 3 GEMMs x 2 M N K.

Then a breakdown of the ``fp8-blockwise`` layer (DeepSeek-V3: 1x128 tiles for x and dy, 128x128 blocks for
W, E4M3) into its quantizations and its three ``scaled_mm`` GEMMs, each timed alone. FP8 and MX layers are
timed twice: as ``backend="auto"`` runs them (wgrad's transposed operands read in place by the quantize
kernels), and with those operands copied to contiguous memory first (``strided=False``, the old way).

    PYTHONPATH=. python benchmarks/bench_linear.py [--tokens 8192 16384] [--recipes fp8-blockwise fp8 nvfp4] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

from common import median_ms, device_header, emit

import fourbit
from fourbit.kernels import fp8_mm
from fourbit.nn import QuantLinear

HIDDEN = 8192


def fwd_bwd(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor):
    def step():
        x.grad = None
        layer.weight.grad = None
        layer(x).backward(dy)

    return step


def breakdown(M: int) -> list[str]:
    """Each piece of the fp8-blockwise layer alone: the quantizations and the three scaled_mm GEMMs."""
    x = torch.randn(M, HIDDEN, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(HIDDEN, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02
    dy = torch.randn(M, HIDDEN, device="cuda", dtype=torch.bfloat16)

    def tile(t):
        return fourbit.quantize(t, "fp8-blockwise", check_finite=False, pad=True)

    def block(t):
        return fourbit.quantize(t, "fp8-blockwise", block=(128, 128), check_finite=False, pad=True)

    qx, qw, qdy = tile(x), block(w), tile(dy)
    qwt, qdyt, qxt = block(w.T), tile(dy.T), tile(x.T)
    pieces = {
        "quantize x (1x128)": lambda: tile(x),
        "quantize W and W^T (128x128)": lambda: (block(w), block(w.T)),
        "quantize dy, dy^T, x^T (1x128)": lambda: (tile(dy), tile(dy.T), tile(x.T)),
        "fprop GEMM x W^T": lambda: fp8_mm(qx, qw),
        "dgrad GEMM dy W": lambda: fp8_mm(qdy, qwt),
        "wgrad GEMM dy^T x": lambda: fp8_mm(qdyt, qxt),
    }
    lines = [f"| {M} | {name} | {median_ms(fn):.4f} |" for name, fn in pieces.items()]
    return ["", f"fp8-blockwise layer, M = {M}, pieces timed alone:", "", "| M | piece | ms |", "|---|---|---|", *lines]


@contextlib.contextmanager
def copied_reads():
    """The MX and FP8 kernels copy wgrad's transposed views to contiguous memory before quantizing them
    (``strided=False``, what ``backend="auto"`` did before in-place reads) for the duration of the block."""
    from fourbit.kernels import fp8_quantize, mx_quantize

    def forced(fn):
        return lambda *args, **kwargs: fn(*args, **(kwargs | {"strided": False}))  # over the caller's strided=

    saved = fp8_quantize.quantize_fp8, mx_quantize.quantize_mx
    fp8_quantize.quantize_fp8, mx_quantize.quantize_mx = forced(saved[0]), forced(saved[1])
    try:
        yield
    finally:
        fp8_quantize.quantize_fp8, mx_quantize.quantize_mx = saved


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--recipes", nargs="+", default=["fp8-blockwise", "fp8", "nvfp4", "mxfp4"])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_linear: needs a CUDA GPU; nothing to do")
        return
    lines = [
        device_header(),
        "",
        f"Linear {HIDDEN} -> {HIDDEN}, forward + backward, BF16 input and weights, no bias",
        "",
        "| tokens M | layer | ms | TFLOP/s | speed-up vs BF16 |",
        "|---|---|---|---|---|",
    ]
    for M in args.tokens:
        torch.manual_seed(0)
        x = torch.randn(M, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(M, HIDDEN, device="cuda", dtype=torch.bfloat16)
        base = torch.nn.Linear(HIDDEN, HIDDEN, bias=False, device="cuda", dtype=torch.bfloat16)
        flops = 3 * 2 * M * HIDDEN * HIDDEN
        base_ms = median_ms(fwd_bwd(base, x, dy))
        lines.append(f"| {M} | nn.Linear BF16 (cuBLAS) | {base_ms:.4f} | {flops / base_ms / 1e9:.1f} | 1.00 |")
        for name in args.recipes:
            layer = QuantLinear.from_linear(base, name)
            variants = [("", contextlib.nullcontext)]
            if name.startswith(("fp8", "mx")):
                variants.append((", transposed operands copied first", copied_reads))
            for label, mode in variants:
                with mode():
                    ms = median_ms(fwd_bwd(layer, x, dy))
                lines.append(f"| {M} | QuantLinear {name}{label} | {ms:.4f} | {flops / ms / 1e9:.1f} | {base_ms / ms:.2f} |")
                print(lines[-1], flush=True)
        del x, dy, base
    for M in args.tokens:
        lines += breakdown(M)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
