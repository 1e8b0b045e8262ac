"""``fourbit compare``: train the harness GPT under several recipes (paired by seed) and compare them."""

from __future__ import annotations

import argparse
from pathlib import Path

from .train import add_training_args, overrides


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train under several recipes and write loss.png and summary.md")
    p.add_argument("--recipes", default="bf16,fp8,fp8-blockwise,mxfp4,nvfp4", help="comma-separated recipe names")
    p.add_argument("--ablations", action="store_true",
                   help="add nvfp4-no-sr, nvfp4-no-rht, nvfp4-no-2d, nvfp4-none, nvfp4+late-bf16")  # fmt: skip
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per recipe (paired across recipes)")
    p.add_argument("--out", default=None, help="output directory (default runs/compare-<preset>)")
    p.add_argument("--jobs", type=int, default=0, help="runs trained at once in worker processes "
                   "(default 0: one per CPU core, each single-threaded)")  # fmt: skip
    add_training_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from ..harness.compare import ABLATIONS, compare

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if args.ablations:
        recipes += [r for r in ABLATIONS if r not in recipes]
    out = args.out or f"runs/compare-{args.preset}"
    try:
        compare(recipes, args.seeds, args.preset, out, jobs=args.jobs, progress=not args.no_progress,
                **overrides(args))  # fmt: skip
    except KeyboardInterrupt:
        print("\nfourbit compare: interrupted; checkpoints saved, rerun the same command to resume", file=sys.stderr)
        return 130
    from ..harness.parallel import finish

    if not finish():
        return 0  # ranks other than 0 of a torchrun job print nothing
    print((Path(out) / "summary.md").read_text())
    print(f"plot: {out}/loss.png")
    return 0
