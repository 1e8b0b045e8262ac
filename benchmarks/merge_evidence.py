"""Merge evidence runs made in several device sessions and tabulate them at matched steps.

For every (recipe, seed) the longest run found under the ``--roots`` (each laid out as ``fourbit compare``
writes, ``ROOT/<recipe>/seed<k>/metrics.jsonl``) is copied, metrics and config only, to ``OUT/runs``; then
``OUT/summary.md`` gets one table per ``--steps`` value with the validation loss of every run that reached
that step (mean, std and per-seed values, gap to BF16 paired by seed), and ``OUT/loss.png`` the curves
(``fourbit.harness.compare.plot``; a mean over seeds stops where its shortest run stops).

    PYTHONPATH=. python benchmarks/merge_evidence.py --roots /tmp/a/small /tmp/b/small --out docs/evidence/small \\
        --recipes bf16,fp8,fp8-blockwise,mxfp4,nvfp4 --seeds 3 --steps 400,600

``--previous OLD/summary.md`` fills in the per-seed values of runs that are not under any root from the
tables of an earlier summary (for runs whose metrics were not kept); a new run replaces its (recipe, seed)
at every step. The plot then shows only the runs whose curves are at hand, so it is not redrawn.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
from pathlib import Path

from fourbit.harness.compare import BASELINE, plot, run_dir
from fourbit.harness.train import read_metrics


def _vals(d: Path, key: str = "val_loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(d) if r.get(key) is not None}


def merge(roots: list[Path], out: Path, recipes: list[str], seeds: int) -> dict[tuple[str, int], dict[int, float]]:
    found = {}
    for r in recipes:
        for s in range(seeds):
            cands = [run_dir(root, r, s) for root in roots if (run_dir(root, r, s) / "metrics.jsonl").exists()]
            if not cands:
                continue
            best = max(cands, key=lambda d: max(_vals(d), default=-1))
            dst = run_dir(out / "runs", r, s)
            dst.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.jsonl", "run.json"):
                shutil.copy(best / name, dst / name)
            found[(r, s)] = _vals(dst)
    return found


def previous_values(summary: Path) -> dict[str, dict[tuple[str, int], dict[int, float]]]:
    """Per-seed values in the tables of an earlier ``summary.md``: {"val"|"train": {(recipe, seed): {step: loss}}}."""
    out: dict[str, dict] = {"val": {}, "train": {}}
    what, step = None, None
    for line in summary.read_text().splitlines():
        if m := re.match(r"### (Validation|Training) loss.* at step (\d+)", line):
            what, step = ("val" if m[1] == "Validation" else "train"), int(m[2])
        elif what and line.startswith("| ") and not line.startswith(("| recipe", "|---")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            for s, v in re.findall(r"s(\d+) ([0-9.]+)", cells[2]):
                out[what].setdefault((cells[0], int(s)), {})[step] = float(v)
    return out


def table(found, recipes: list[str], seeds: int, step: int, what: str = "val") -> list[str]:
    title = "Validation loss" if what == "val" else "Training loss (mean over the last logging interval)"
    lines = [f"### {title} at step {step}", "",
             f"| recipe | {what} loss (mean ± std) | per seed | gap vs bf16 (mean, paired) | gap range |", "|---|---|---|---|---|"]  # fmt: skip
    base = {s: found[(BASELINE, s)][step] for s in range(seeds) if step in found.get((BASELINE, s), {})}
    for r in recipes:
        ss = [s for s in range(seeds) if step in found.get((r, s), {}) and s in base]
        if not ss:
            lines.append(f"| {r} | not reached | | | |")
            continue
        v = [found[(r, s)][step] for s in ss]
        gaps = [100.0 * (found[(r, s)][step] - base[s]) / base[s] for s in ss]
        std = statistics.stdev(v) if len(v) > 1 else 0.0
        per = ", ".join(f"s{s} {x:.4f}" for s, x in zip(ss, v))
        gap = "—" if r == BASELINE else f"{statistics.fmean(gaps):+.2f}%"
        rng = "—" if r == BASELINE else f"[{min(gaps):+.2f}, {max(gaps):+.2f}]%"
        lines.append(f"| {r} | {statistics.fmean(v):.4f} ± {std:.4f} ({len(ss)} seeds) | {per} | {gap} | {rng} |")
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--roots", nargs="+", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--recipes", required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", default="600")
    p.add_argument("--train-steps", default="", help="also tabulate the training loss at these steps")
    p.add_argument("--title", default="")
    p.add_argument("--previous", type=Path, help="an earlier summary.md: per-seed values of runs not under --roots")
    args = p.parse_args()
    recipes = args.recipes.split(",")
    found = merge(args.roots, args.out, recipes, args.seeds)
    old = previous_values(args.previous) if args.previous else {"val": {}, "train": {}}
    kept = {k for k in old["val"] if k not in found}  # runs known only from the earlier tables
    found.update({k: old["val"][k] for k in kept})
    here = sorted((k for k in found if k not in kept), key=lambda k: (k[0] != BASELINE, k))  # bf16 first
    if not here:
        raise SystemExit(f"merge_evidence: no run with metrics.jsonl under {', '.join(map(str, args.roots))}")
    meta_dir = run_dir(args.out / "runs", *here[0])
    meta = json.loads((meta_dir / "run.json").read_text())
    lines = [f"# {args.title or 'Evidence runs'}", "",
             f"Preset `{meta['config']['preset']}` ({meta['params'] / 1e6:.2f}M params), {meta['config']['steps']} steps x "
             f"{meta['tokens_per_step']} tokens, device {meta['device']}, torch {meta['torch']}; runs merged from "
             f"{len(args.roots) + bool(args.previous)} session(s) by `benchmarks/merge_evidence.py`. Loss: mean next-token cross-entropy "
             "(nats/token) on held-out plays.", ""]  # fmt: skip
    if kept:
        lines += [f"Runs under `runs/`: {', '.join(f'{r} s{s}' for r, s in sorted(set(found) - kept))}. The values of the "
                  f"other {len(kept)} runs are their per-seed values (4 decimals) in the earlier summary (`--previous`), "
                  "whose metrics files were not kept; `loss.png` is that summary's plot.", ""]  # fmt: skip
    for step in (int(s) for s in args.steps.split(",")):
        lines += table(found, recipes, args.seeds, step)
    if args.train_steps:
        train = {k: old["train"].get(k, {}) if k in kept else _vals(run_dir(args.out / "runs", *k), "train_loss") for k in found}
        for step in (int(s) for s in args.train_steps.split(",")):
            lines += table(train, recipes, args.seeds, step, what="train")
    (args.out / "summary.md").write_text("\n".join(lines))
    complete = [r for r in recipes if all((r, s) in found for s in range(args.seeds))]
    last = max(int(s) for s in args.steps.split(","))
    rows = [{"recipe": r, "val_loss": statistics.fmean(v for s in range(args.seeds) for st, v in found[(r, s)].items() if st == max(found[(r, s)]))}
            for r in complete]  # fmt: skip
    summary = {"seeds": args.seeds, "recipes": complete, "rows": rows, "config": meta["config"], "info": {"steps": last},
               **{k: meta[k] for k in ("model", "params", "tokens_per_step", "device", "torch", "val_works")}}  # fmt: skip
    if kept:
        print(f"not redrawing {args.out / 'loss.png'}: {len(kept)} runs have no curves here")
    else:
        try:
            plot(args.out / "runs", summary, args.out / "loss.png")
        except Exception as e:  # the tables are the record; a plot that cannot be drawn is reported
            print(f"no plot: {type(e).__name__}: {e}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
