"""Where the host time of a training step goes (CUDA): device syncs and Python hot spots, per recipe.

For each recipe, on the ``gpu`` preset with random tokens: the time ``train_step`` takes to return (host:
Python, launches, any sync) against the time until the GPU is done (wall); then one step under
``torch.cuda.set_sync_debug_mode("warn")``, each synchronizing call reported once with the fourbit/harness
frames that made it; then one step under cProfile (the functions with the most own time).

    PYTHONPATH=. python3 benchmarks/host_profile.py --recipes nvfp4 fp8-blockwise --batch 32
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import io
import pstats
import statistics
import time
import traceback
import warnings

import torch

from fourbit.harness.model import get_preset
from fourbit.harness.train import build_model, make_optimizer, resolve_recipe, train_config, train_step


def _setup(recipe: str, batch: int):
    device = torch.device("cuda")
    cfg = train_config("gpu", recipe=recipe, batch_size=batch)
    model = build_model(get_preset("gpu"), resolve_recipe(recipe), device)
    opt = make_optimizer(model, cfg, device)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(0, get_preset("gpu").vocab_size, (batch, get_preset("gpu").block_size), device=device, generator=gen)
    return model, opt, x, torch.roll(x, -1, 1), device


def _syncs(step) -> list[str]:
    """Each distinct synchronizing call site (fourbit frames of its stack) with its count in one step."""
    sites: collections.Counter = collections.Counter()

    def show(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "fourbit" in f.filename or "torch/optim" in f.filename]
        where = " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))
        sites[f"{str(message).splitlines()[0][:80]} @ {where or filename + ':' + str(lineno)}"] += 1

    with warnings.catch_warnings():  # restores showwarning and the filters on exit
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{n} x {site}" for site, n in sites.most_common()]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recipes", nargs="+", default=["bf16", "nvfp4", "fp8-blockwise"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    for recipe in args.recipes:
        model, opt, x, y, device = _setup(recipe, args.batch)

        def step():
            train_step(model, opt, x, y, 1e-4, 1.0, device)

        host, wall = [], []
        for i in range(args.steps + 3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            if i >= 3:
                host.append(t1 - t0)
                wall.append(time.perf_counter() - t0)
        print(f"## {recipe}: host {1e3 * statistics.median(host):.1f} ms until train_step returns, "
              f"wall {1e3 * statistics.median(wall):.1f} ms until the GPU is done (median of {args.steps})")  # fmt: skip
        sites = _syncs(step)
        torch.cuda.synchronize()
        print(f"device syncs in one step: {sum(int(s.split(' x ')[0]) for s in sites)}")
        for s in sites[:15]:
            print("  ", s)
        prof = cProfile.Profile()
        prof.enable()
        step()
        torch.cuda.synchronize()
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.top)
        pstats.Stats(prof, stream=buf).sort_stats("cumtime").print_stats("fourbit", args.top)
        print("\n".join(line for line in buf.getvalue().splitlines() if line.strip())[:12000])
        del model, opt
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
