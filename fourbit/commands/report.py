"""``fourbit report``: rebuild every evidence table, summary and plot under ``docs/evidence/`` from the
committed runs, and refresh the ``<!-- report:NAME -->`` blocks of README.md and docs/evidence.md.

    fourbit report             # write docs/evidence/*/summary.md, loss.png, tables.md; update the blocks
    fourbit report --check     # change nothing; exit 1 and name every file or block that differs
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="rebuild the evidence tables and plots from the committed runs")
    p.add_argument("--root", default="docs/evidence", help="evidence folder (default docs/evidence)")
    p.add_argument("--docs", nargs="*", default=["README.md", "docs/evidence.md"],
                   help="documents whose <!-- report:NAME --> blocks are refreshed / checked")  # fmt: skip
    p.add_argument("--check", action="store_true", help="only compare; exit 1 on any difference")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..report import build, check

    root = Path(args.root)
    if not root.is_dir():
        raise FileNotFoundError(f"no evidence folder {root}")
    docs = [Path(d) for d in args.docs if Path(d).exists()]
    if args.check:
        problems = check(root, docs)
        for p in problems:
            print(p)
        print(f"fourbit report --check: {len(problems)} difference(s)" if problems else "evidence is up to date")
        return 1 if problems else 0
    for path in build(root, docs, plots=not args.no_plots):
        print("wrote", path)
    return 0
