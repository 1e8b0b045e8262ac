"""``fourbit accumulate``: how much error limited tensor-core accumulation adds to an FP8 / NVFP4 GEMM.

For each K, input distribution and trial, two operands ``a`` (M, K) and ``b`` (N, K) are drawn and
quantized: FP8 E4M3 with DeepSeek-V3's scaling (1x128 tiles for ``a``, 128x128 blocks for ``b``) or NVFP4
(1x16 blocks for ``a``, 16x16 for ``b``, NVIDIA's recipe). The reference is the float64 product of the SAME
dequantized operands, so the error measured is accumulation error only; quantization error is shown
beside it (float64 product of the unquantized operands as reference) for scale.

Metric (DeepSeek-V3 reports a "maximum relative error"):

    err(C, C_ref) = max_{m,n} |C[m,n] - C_ref[m,n]| / max_{m,n} |C_ref[m,n]|

the largest error relative to the output's own scale, averaged over trials. Per-element relative error
``|C - C_ref| / |C_ref|`` is not used: with zero-mean inputs some outputs cancel to near zero, and their
ratio measures the cancellation, not the accumulator (it reaches 10-100 at K = 4096 for every model here,
FP32 included reaching 1e-3).

Inputs: standard Gaussian; Student-t with 3 degrees of freedom (heavy tails); uniform on [0, 1), whose
products all have one sign, so the toward-zero truncation bias of the limited accumulator adds up instead
of cancelling (the worst case for it; DeepSeek-V3 does not say which "random matrices" it used).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

DEFAULT_KS = (256, 512, 1024, 2048, 4096, 8192, 16384)
DISTRIBUTIONS = ("gaussian", "student-t(3)", "uniform[0,1)")
SCHEMES = ("fp8-blockwise", "nvfp4")
SIZE = 64  # M = N: 4096 outputs per trial, enough for a stable maximum, small enough for 2 CPU cores


def accumulations():
    """Label -> Accumulation: the columns of the table, FP32 first."""
    from ..accumulation import Accumulation

    return {
        "fp32": Accumulation(),
        "acc14": Accumulation(bits=14),
        "acc14+promote32": Accumulation(bits=14, promote_every=32),
        "acc14+promote128": Accumulation(bits=14, promote_every=128),
        "acc14+promote512": Accumulation(bits=14, promote_every=512),
    }


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("accumulate", help="GEMM error of limited tensor-core accumulation vs K (PNG + table)")
    p.add_argument("--out", type=Path, default=Path("docs"), help="folder for accumulation.png and .md")
    p.add_argument("--ks", type=_parse_ks, default=DEFAULT_KS, help="comma-separated K values")
    p.add_argument("--trials", type=int, default=3, help="random operand pairs per point")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=SIZE, help="M = N of each product")
    p.set_defaults(func=run)


def _check_out_dir(out: Path) -> None:
    """Create ``out`` (a folder) or raise naming it: it is a file, or it cannot be created or written."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder (accumulation.md and .png go in it)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {str(out)!r} cannot be created ({e.strerror or e})") from None


def _parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ks must be comma-separated ints, got {text!r}") from None
    if not ks or any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"--ks must be positive, got {text!r}")
    return ks


def max_relative_error(c, c_ref) -> float:
    """max |c - c_ref| / max |c_ref|, in float64 (see the module docstring for why this metric)."""
    c, c_ref = c.double(), c_ref.double()
    scale = float(c_ref.abs().max())
    return float((c - c_ref).abs().max()) / scale if scale > 0 else float((c - c_ref).abs().max())


def draw(dist: str, rows: int, cols: int, g):
    """One (rows, cols) float32 sample of a named distribution from a seeded generator."""
    import torch

    if dist == "gaussian":
        return torch.randn(rows, cols, generator=g)
    if dist == "student-t(3)":  # N(0,1) / sqrt(chi2_3 / 3)
        chi2 = torch.randn(3, rows, cols, generator=g).square().sum(0)
        return torch.randn(rows, cols, generator=g) / torch.sqrt(chi2 / 3)
    if dist == "uniform[0,1)":
        return torch.rand(rows, cols, generator=g)
    raise ValueError(f"unknown distribution {dist!r}; known: {', '.join(DISTRIBUTIONS)}")


def quantized_operands(a, b, scheme: str):
    """Dequantized (a, b) under a scheme: 1D blocks along K for the activation a, 2D blocks for the weight b."""
    from ..quantize import quantize

    if scheme == "fp8-blockwise":
        return (
            quantize(a, "fp8", block=(1, 128), pad=True).dequantize(),
            quantize(b, "fp8", block=(128, 128), pad=True).dequantize(),
        )
    if scheme == "nvfp4":
        return quantize(a, "nvfp4", pad=True).dequantize(), quantize(b, "nvfp4-2d", pad=True).dequantize()
    raise ValueError(f"unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}")


@dataclass(frozen=True)
class Point:
    scheme: str
    dist: str
    k: int
    errors: dict  # accumulation label -> mean error over trials
    quantization: float  # mean error of the quantized float64 product vs the unquantized one


def measure(
    ks=DEFAULT_KS, trials: int = 3, seed: int = 0, size: int = SIZE, schemes=SCHEMES, dists=DISTRIBUTIONS,
    progress: bool = True,
) -> list[Point]:
    import torch
    from tqdm import tqdm

    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    accs = accumulations()
    jobs = [(s, d, k) for s in schemes for d in dists for k in ks]
    points = []
    bar = tqdm(total=len(jobs) * trials, desc="accumulate", unit="gemm", disable=not progress)
    for scheme, dist, k in jobs:
        sums = dict.fromkeys(accs, 0.0)
        quant = 0.0
        for t in range(trials):
            # one generator per (distribution, K, trial): every scheme sees the same operands
            g = torch.Generator().manual_seed(seed * 1_000_003 + DISTRIBUTIONS.index(dist) * 10_007 + k * 101 + t)
            a, b = draw(dist, size, k, g), draw(dist, size, k, g)
            a_q, b_q = quantized_operands(a, b, scheme)
            c_ref = a_q.double() @ b_q.double().T  # (M, N) exact to ~1e-16
            for label, acc in accs.items():
                sums[label] += max_relative_error(acc.matmul(a_q, b_q), c_ref)
            quant += max_relative_error(c_ref, a.double() @ b.double().T)
            bar.update()
        points.append(Point(scheme, dist, k, {l: v / trials for l, v in sums.items()}, quant / trials))
    bar.close()
    return points


def markdown(points: list[Point], trials: int, size: int, seed: int) -> str:
    labels = list(points[0].errors)
    lines = [
        "# Accumulation error of FP8 / NVFP4 GEMMs vs K",
        "",
        "Generated by `fourbit accumulate` (do not edit by hand). "
        f"M = N = {size}, {trials} trial(s) per point, seed {seed}.",
        "",
        "Error = max |C - C_ref| / max |C_ref| (mean over trials), C_ref the float64 product of the same "
        "dequantized operands: accumulation error only. `acc14`: the `fourbit.accumulation` model of Hopper's "
        "FP8 tensor cores (groups of 32 products aligned to the largest exponent, accumulator included, each "
        "addend and the running sum truncated toward zero to 14 significant bits, implicit one included); "
        "`+promoteN`: the partial sum added into FP32 every N elements of K and reset (DeepSeek-V3: N = 128). "
        "`quant.`: quantization error of the same GEMM (float64 product of unquantized operands as reference), "
        "for scale.",
        "",
    ]
    header = "| scheme | inputs | K | " + " | ".join(labels) + " | quant. |"
    sep = "|" + "---|" * 3 + "---:|" * (len(labels) + 1)
    lines += [header, sep]
    for p in points:
        cells = " | ".join(f"{p.errors[l]:.2e}" for l in labels)
        lines.append(f"| {p.scheme} | {p.dist} | {p.k} | {cells} | {p.quantization:.2e} |")
    return "\n".join(lines) + "\n"


def plot(points: list[Point], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schemes = list(dict.fromkeys(p.scheme for p in points))
    dists = list(dict.fromkeys(p.dist for p in points))
    labels = list(points[0].errors)
    fig, axes = plt.subplots(len(schemes), len(dists), figsize=(4.2 * len(dists), 3.4 * len(schemes)),
                             squeeze=False, sharex=True, sharey=True)
    for i, s in enumerate(schemes):
        for j, d in enumerate(dists):
            ax = axes[i][j]
            pts = [p for p in points if p.scheme == s and p.dist == d]
            ks = [p.k for p in pts]
            for label in labels:
                ax.plot(ks, [max(p.errors[label], 1e-9) for p in pts], marker="o", ms=3, label=label)
            ax.plot(ks, [p.quantization for p in pts], ls=":", color="gray", label="quantization (for scale)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{s}, {d}", fontsize=10)
            if i == len(schemes) - 1:
                ax.set_xlabel("K")
            if j == 0:
                ax.set_ylabel("max|C - C_ref| / max|C_ref|")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("GEMM accumulation error vs K (C_ref: float64 product of the same quantized operands)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    _check_out_dir(args.out)  # before minutes of measuring, not after
    points = measure(args.ks, args.trials, args.seed, args.size)
    table = markdown(points, args.trials, args.size, args.seed)
    (args.out / "accumulation.md").write_text(table)
    plot(points, args.out / "accumulation.png")
    print(table)
    print(f"wrote {args.out / 'accumulation.md'} and {args.out / 'accumulation.png'}")
    return 0
