"""Train a chosen list of (recipe, seed) runs of a preset at once, in worker processes.

``fourbit compare`` trains every recipe for seeds 0..N-1; when a device session can only hold part of a
comparison, this trains exactly the runs still missing, into the same ``OUT/<recipe>/seed<k>`` layout, so
``fourbit.harness.compare.summarize`` can read runs made in several sessions together.

    PYTHONPATH=. python benchmarks/evidence_runs.py --preset small --runs nvfp4:2,fp8:0,fp8:1 --jobs 8 --out /tmp/small
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from fourbit.harness.compare import _spread_over_gpus, _train_job, run_dir
from fourbit.harness.data import load_tokens
from fourbit.harness.train import TrainConfig, resolve_recipe, train_config


def parse_runs(text: str) -> list[tuple[str, int]]:
    runs = []
    for item in text.split(","):
        recipe, _, seed = item.strip().rpartition(":")
        if not recipe or not seed.isdigit():
            raise ValueError(f"--runs takes recipe:seed items, got {item!r}")
        resolve_recipe(recipe)  # unknown names fail before any training
        runs.append((recipe, int(seed)))
    return runs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--runs", required=True, help="comma-separated recipe:seed items")
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the config's auto)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile (default: the harness's, reduce-overhead on one CUDA device)")
    args = p.parse_args()
    overrides = {"data_dir": args.data_dir, "device": args.device, "compile": args.compile}
    overrides |= {"steps": args.steps} if args.steps else {}
    base = train_config(args.preset, **overrides)
    load_tokens(base.tokenizer, base.data_dir)  # tokenize once, not in every worker
    cfgs = [(replace(base, recipe=r, seed=s), str(run_dir(args.out, r, s))) for r, s in parse_runs(args.runs)]
    cfgs: list[tuple[TrainConfig, str]] = _spread_over_gpus(cfgs)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_train_job, cfg, path, threads, None): path for cfg, path in cfgs}
        for f, path in futures.items():
            try:
                f.result()
                print("done", path, flush=True)
            except Exception as e:  # report and keep the other runs
                print("failed", path, type(e).__name__, str(e)[:200], flush=True)


if __name__ == "__main__":
    main()
