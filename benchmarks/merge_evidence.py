"""Collect evidence runs made in several sessions into one committed evidence set, then ``fourbit report``.

For every (recipe, seed) the longest run found under the ``--roots`` (each laid out as ``fourbit compare``
writes, ``ROOT/<recipe>/seed<k>/metrics.jsonl``) is copied, metrics and config only (no checkpoint), to
``OUT/runs``; ``OUT/report.json`` is written from the arguments (or kept if it exists and no
``--recipes`` is given), and ``fourbit.report.build`` regenerates every evidence table, summary and plot
from what is committed. Nothing is carried over from an earlier summary: a number that is in no run's
``metrics.jsonl`` is not published.

    PYTHONPATH=. python benchmarks/merge_evidence.py --roots /tmp/a/tiny /tmp/b/tiny --out docs/evidence/tiny \\
        --recipes bf16,fp8,fp8-blockwise,mxfp4,nvfp4 --seeds 3 --steps 120,200 --train-steps 200 --title "tiny"
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from fourbit.harness.compare import run_dir
from fourbit.harness.train import read_metrics
from fourbit.report import SPEC, build


def _last_step(d: Path) -> int:
    return max((r["step"] for r in read_metrics(d) if r.get("val_loss") is not None), default=-1)


def merge(roots: list[Path], out: Path, recipes: list[str], seeds: int) -> list[tuple[str, int]]:
    """Copy the longest copy of every (recipe, seed) under ``roots`` to ``out/runs``; the pairs copied."""
    found = []
    for r in recipes:
        for s in range(seeds):
            cands = [run_dir(root, r, s) for root in roots if (run_dir(root, r, s) / "metrics.jsonl").exists()]
            if not cands:
                continue
            best = max(cands, key=_last_step)
            dst = run_dir(out / "runs", r, s)
            dst.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.jsonl", "run.json"):
                shutil.copy(best / name, dst / name)
            found.append((r, s))
    return found


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--roots", nargs="+", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="the evidence set, e.g. docs/evidence/gpu")
    p.add_argument("--recipes", default=None, help="comma-separated; default: those of OUT/report.json")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", default="600")
    p.add_argument("--train-steps", default="")
    p.add_argument("--title", default="")
    p.add_argument("--docs", nargs="*", default=[], help="documents whose report blocks to refresh")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    spec_path = args.out / SPEC
    if args.recipes:
        spec = {"title": args.title or f"Evidence runs: {args.out.name}", "recipes": args.recipes.split(","),
                "seeds": args.seeds, "steps": [int(s) for s in args.steps.split(",")],
                "train_steps": [int(s) for s in args.train_steps.split(",") if s]}  # fmt: skip
        spec_path.write_text(json.dumps(spec, indent=1) + "\n")
    elif not spec_path.exists():
        raise SystemExit(f"merge_evidence: {spec_path} does not exist; pass --recipes")
    spec = json.loads(spec_path.read_text())
    found = merge(args.roots, args.out, spec["recipes"], spec["seeds"])
    if not found:
        raise SystemExit(f"merge_evidence: no run with metrics.jsonl under {', '.join(map(str, args.roots))}")
    for path in build(args.out.parent, [Path(d) for d in args.docs], plots=not args.no_plots):
        print("wrote", path)
    print((args.out / "summary.md").read_text())


if __name__ == "__main__":
    main()
