"""What every GPU benchmark script shares: one timing rule, one header line, one way to write results."""

from __future__ import annotations

import datetime
from pathlib import Path

import torch


def median_ms(fn) -> float:
    """Median milliseconds of ``fn`` (``triton.testing.do_bench``: 25 ms warm-up, 200 ms of repeats)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def device_header() -> str:
    """``# <GPU> | torch <v> | triton <v> | <date>``: the first line of every results table."""
    import triton

    return f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | {datetime.date.today()}"


def emit(lines: list[str], out: Path | None) -> None:
    """Print the results and, with ``--out``, write them to that file too."""
    text = "\n".join(lines)
    print(text)
    if out:
        out.write_text(text + "\n")
