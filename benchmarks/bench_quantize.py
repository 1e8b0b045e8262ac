"""NVFP4 quantize bandwidth against a device-to-device copy measured in the same run.

Effective bandwidth = (input bytes + output bytes) / time, the input counted once (as the issue's goal
counts it); the copy baseline moves ``2 * bytes`` per copy (read + write). With the tensor amax measured
the kernel reads the input twice (amax pass, quantize pass), so its ceiling is below 1x copy.
``fourbit.quantize``'s default ``check_finite=True`` adds its own scan of the input (isfinite + sum + a
host sync) in front of the kernel; rows say which setting they use.

    PYTHONPATH=. python benchmarks/bench_quantize.py [--shapes 8192x8192 16384x8192]
"""

from __future__ import annotations

import argparse
import datetime

import torch
import triton

from common import median_ms

import fourbit


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["8192x8192", "16384x16384"])
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    dev = torch.cuda.get_device_name()
    print(f"# {dev} | torch {torch.__version__} | triton {triton.__version__} | {datetime.date.today()}")

    src = torch.randn(1 << 30, device="cuda")  # 4 GiB of float32
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    copy_bw = 2 * src.numel() * 4 / ms / 1e6
    print(f"copy 4 GiB: {ms:.3f} ms -> {copy_bw:.0f} GB/s (read + write)")
    del src, dst

    rows = []
    for shape in args.shapes:
        R, C = map(int, shape.split("x"))
        x = torch.randn(R, C, device="cuda", dtype=dtype)
        amax = x.abs().amax().float()
        out_bytes = R * C // 2 + R * C // 16 + 4
        for block in ((1, 16), (16, 16)):
            for label, kw in (
                ("amax measured (2 reads)", {"check_finite": False}),
                ("amax given (1 read)", {"amax": amax, "check_finite": False}),
                ("stochastic, amax measured", {"rounding": "stochastic", "seed": 1, "check_finite": False}),
                ("amax measured, check_finite=True (default)", {}),
            ):
                ms = median_ms(lambda: fourbit.quantize(x, "nvfp4", block=block, backend="triton", **kw))
                bw = (x.numel() * x.element_size() + out_bytes) / ms / 1e6
                rows.append((shape, f"{block[0]}x{block[1]}", label, ms, bw, bw / copy_bw))
        if R * C == 8192 * 8192:  # tile sweep of the fused kernel, amax given (the quantize pass alone)
            from fourbit.kernels.nvfp4_quantize import quantize_nvfp4
            from fourbit.rounding import Rounding
            from fourbit.schemes import NVFP4Config

            for tile, warps in ((2048, 4), (4096, 4), (8192, 4), (8192, 8), (16384, 8)):
                cfg = NVFP4Config()
                ms = median_ms(lambda: quantize_nvfp4(x, cfg, Rounding.NEAREST, None, amax, False, tile=tile, num_warps=warps))
                bw = (x.numel() * x.element_size() + out_bytes) / ms / 1e6
                rows.append((shape, "1x16", f"tile {tile}, {warps} warps, amax given", ms, bw, bw / copy_bw))
            from fourbit.kernels.nvfp4_quantize import measure_amax

            import fourbit.kernels.nvfp4_quantize as kq

            default_programs = kq.AMAX_PROGRAMS_PER_SM
            for programs in (4, 8, 16):
                kq.AMAX_PROGRAMS_PER_SM = programs
                ms = median_ms(lambda: measure_amax(x))
                bw = x.numel() * x.element_size() / ms / 1e6
                rows.append((shape, "-", f"amax pass alone (read only), {programs} programs/SM", ms, bw, bw / copy_bw))
            kq.AMAX_PROGRAMS_PER_SM = default_programs
        if R * C <= 8192 * 8192:
            ms = median_ms(lambda: fourbit.quantize(x, "nvfp4", backend="reference"))
            bw = (x.numel() * x.element_size() + out_bytes) / ms / 1e6
            rows.append((shape, "1x16", "PyTorch reference on GPU", ms, bw, bw / copy_bw))
        del x

    print(f"\n| shape ({args.dtype}) | block | mode | ms | GB/s | x copy |")
    print("|---|---|---|---|---|---|")
    for shape, block, label, ms, bw, ratio in rows:
        print(f"| {shape} | {block} | {label} | {ms:.3f} | {bw:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
