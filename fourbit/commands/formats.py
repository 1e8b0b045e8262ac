"""``fourbit formats``: value tables of element formats and an error table of the block-scaled schemes."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("formats", help="print format value tables and a scheme error table")
    p.add_argument("--format", action="append", default=None, help="format(s) to tabulate (e2m1, e4m3, e3m2, ...)")
    p.add_argument("--numel", type=int, default=1 << 16, help="samples per distribution in the error table")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def format_table(name: str) -> str:
    from ..formats import get_format

    fmt = get_format(name)
    vals = fmt.values()
    positive = [float(v) for v in vals if v >= 0]
    lines = [
        f"{fmt.name}: {fmt.bits} bits (sign {int(fmt.signed)}, exponent {fmt.ebits}, mantissa {fmt.mbits}, "
        f"bias {fmt.bias}, specials {fmt.specials.value})",
        f"  max {fmt.max:g}   min normal {fmt.min_normal:g}   min subnormal {fmt.min_subnormal:g}   "
        f"{len(vals)} finite values",
    ]
    if len(positive) <= 64:
        lines.append("  non-negative values: " + " ".join(f"{v:g}" for v in positive))
    return "\n".join(lines)


SCHEME_ROWS = (
    ("nvfp4", {}),
    ("nvfp4-2d", {}),
    ("nvfp4 4/6", {"four_over_six": True}),
    ("mxfp4", {}),
    ("mxfp8", {}),
    ("fp8", {}),
)


def test_distributions(rows: int, cols: int, g) -> dict:
    """Gaussian, Laplace and heavy-tailed Student-t(3) samples, all from one seeded generator."""
    import torch

    u = torch.rand(rows, cols, generator=g) - 0.5
    laplace = -torch.sign(u) * torch.log1p(-2 * u.abs())  # inverse CDF
    chi2 = torch.randn(3, rows, cols, generator=g).square().sum(0)
    student_t = torch.randn(rows, cols, generator=g) / torch.sqrt(chi2 / 3)
    return {"gaussian": torch.randn(rows, cols, generator=g), "laplace": laplace, "student-t(3)": student_t}


def error_table(numel: int = 1 << 16, seed: int = 0) -> str:
    import torch

    from ..metrics import flushed_to_zero, sqnr_db
    from ..quantize import quantize

    g = torch.Generator().manual_seed(seed)
    cols = 256
    rows = max(16, numel // cols // 16 * 16)
    dists = test_distributions(rows, cols, g)
    header = f"{'scheme':<11}" + "".join(f"{d + ' SQNR dB':>22}{'zero%':>8}" for d in dists)
    lines = [header, "-" * len(header)]
    for label, kw in SCHEME_ROWS:
        name = label.split()[0]
        row = f"{label:<11}"
        for x in dists.values():
            x_hat = quantize(x, name, **kw).dequantize()
            row += f"{sqnr_db(x, x_hat):>22.2f}{100 * flushed_to_zero(x, x_hat):>8.2f}"
        lines.append(row)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.numel < 1:
        raise ValueError(f"--numel must be a positive number of samples, got {args.numel}")
    for name in args.format or ["e2m1", "e2m3", "e3m2", "e4m3", "e5m2", "e8m0"]:
        print(format_table(name))
    print()
    print(error_table(args.numel, args.seed))
    return 0
