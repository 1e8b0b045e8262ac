"""CPU throughput of fourbit's reference quantizers, as a ratio to torchao's where it has one.

    python benchmarks/quantize_cpu.py [--rows 2048 --cols 2048 --repeats 5]

Both sides run eager PyTorch on the same float32 input in the same process; the figure is the median
wall time of ``repeats`` runs after one warm-up. torchao (``to_mx``, ``nvfp4_quantize``) is optional.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fourbit


def bench(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def torchao_baselines(x: torch.Tensor) -> dict:
    try:
        from torchao.prototype.mx_formats.config import ScaleCalculationMode
        from torchao.prototype.mx_formats.mx_tensor import to_mx
        from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale
    except ImportError:
        return {}
    amax = lambda: per_tensor_amax_to_scale(x.abs().amax())  # noqa: E731
    return {
        "nvfp4": lambda: nvfp4_quantize(x, 16, amax()),
        "mxfp4": lambda: to_mx(x, torch.float4_e2m1fn_x2, 32, ScaleCalculationMode.FLOOR),
        "mxfp8": lambda: to_mx(x, torch.float8_e4m3fn, 32, ScaleCalculationMode.FLOOR),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--cols", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    x = torch.randn(args.rows, args.cols)
    cases = {
        "nvfp4": dict(scheme="nvfp4"),
        "nvfp4 16x16": dict(scheme="nvfp4", block=(16, 16)),
        "nvfp4 sr": dict(scheme="nvfp4", rounding="stochastic", seed=0),
        "mxfp4": dict(scheme="mxfp4"),
        "mxfp8": dict(scheme="mxfp8"),
        "fp8": dict(scheme="fp8"),
        "fp8 1x128": dict(scheme="fp8", block=(1, 128)),
    }
    ref = torchao_baselines(x)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input {args.rows}x{args.cols} float32")
    print(f"{'scheme':<14}{'fourbit ms':>12}{'Melem/s':>10}{'torchao ms':>12}{'fourbit/torchao speed':>24}")
    for name, kw in cases.items():
        t = bench(lambda: fourbit.quantize(x, backend="reference", **kw), args.repeats)
        line = f"{name:<14}{t * 1e3:>12.1f}{x.numel() / t / 1e6:>10.1f}"
        if name in ref:
            tr = bench(ref[name], args.repeats)
            line += f"{tr * 1e3:>12.1f}{tr / t:>23.2f}x"
        print(line)


if __name__ == "__main__":
    main()
