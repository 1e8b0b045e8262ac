"""Train one GPT per (recipe, seed) on the same data and compare: ``loss.png`` and ``summary.md``.

Runs are paired: every recipe trained with seed s starts from the same initial weights and sees the same
batches in the same order (``fourbit.harness.train``), so the gap of a recipe to BF16 is measured seed by
seed, ``gap_s = (L_recipe,s - L_bf16,s) / L_bf16,s``, and the table reports its mean and its spread over
seeds beside the BF16 seed-to-seed spread (how far two BF16 runs differ: the noise floor).

Layout of ``out``: ``<recipe>/seed<s>/{metrics.jsonl, ckpt.pt, run.json}``, then ``loss.png``,
``summary.md`` and ``summary.json``. Every run resumes (a finished run is skipped), so re-running an
interrupted ``compare`` continues where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from .corpus import load_corpus
from .train import TrainConfig, read_metrics, resolve_recipe, train, train_config

__all__ = ["MAIN_RECIPES", "ABLATIONS", "RunResult", "compare", "summarize", "plot", "summary_markdown"]

MAIN_RECIPES = ("bf16", "fp8", "fp8-blockwise", "mxfp4", "nvfp4")
ABLATIONS = ("nvfp4-no-sr", "nvfp4-no-rht", "nvfp4-no-2d", "nvfp4-none", "nvfp4+late-bf16")
BASELINE = "bf16"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run_dir(out: Path, recipe: str, seed: int) -> Path:
    return Path(out) / recipe / f"seed{seed}"


def _train_job(cfg: TrainConfig, path: str, threads: int, position: int | None) -> str:
    """One run in a worker process (picklable for ``ProcessPoolExecutor``)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    train(cfg, path, resume=True, progress=position is not None, position=position)
    return path


def compare(
    recipes: list[str],
    seeds: int = 1,
    preset: str = "tiny",
    out: str | Path = "runs/compare",
    *,
    jobs: int = 0,
    progress: bool = True,
    **overrides,
) -> dict:
    """Train every (recipe, seed) (``seeds`` = 0..seeds-1), then write the plot and tables; returns the
    summary dict. ``overrides`` are ``TrainConfig`` fields (``steps``, ``device``, ...; None is ignored).
    ``jobs > 1`` trains that many runs at once in worker processes with ``cpus // jobs`` threads each
    (small GEMMs use one core better than two); ``jobs=0`` picks one job per core, or 1 on CUDA."""
    if not recipes:
        raise ValueError("no recipes to compare")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if jobs < 0:
        raise ValueError(f"--jobs must be >= 0 (0: one per CPU core), got {jobs}")
    recipes = list(dict.fromkeys(recipes))  # de-duplicate, keep order
    for name in recipes:
        resolve_recipe(name)  # unknown names fail here, before any training
    base = train_config(preset, **overrides)
    out = Path(out)
    from .train import _writable_dir

    _writable_dir(out)
    load_corpus(base.corpus, base.tokenizer, base.data_dir)  # tokenize once here, not in every worker
    if BASELINE not in recipes:
        recipes = [BASELINE] + recipes  # every gap needs the baseline
    runs = [(r, s) for s in range(seeds) for r in recipes]
    cfgs = [(TrainConfig(**{**base.__dict__, "recipe": r, "seed": s}), str(run_dir(out, r, s))) for r, s in runs]
    if jobs == 0:  # CPU: one single-threaded run per core; CUDA: one run at a time owns the GPU
        on_gpu = base.device.startswith("cuda") or (base.device == "auto" and _cuda_available())
        jobs = 1 if on_gpu else min(len(cfgs), os.cpu_count() or 1)
    if base.parallel != "none":
        jobs = 1  # under torchrun every rank trains each run together
    if jobs == 1:
        for cfg, path in cfgs:
            train(cfg, path, resume=True, progress=progress)
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() != 0:
            return {}  # rank 0 writes the tables and the plot
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, (os.cpu_count() or 1) // jobs)
        cfgs = _spread_over_gpus(cfgs)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_train_job, cfg, path, threads, (i % jobs) if progress else None)
                       for i, (cfg, path) in enumerate(cfgs)]  # fmt: skip
            for f in futures:
                f.result()
    summary = summarize(out, recipes, seeds, preset=preset, steps=base.steps)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary))
    plot(out, summary, out / "loss.png")
    return summary


def _spread_over_gpus(cfgs: list[tuple[TrainConfig, str]]) -> list[tuple[TrainConfig, str]]:
    """Worker runs on a machine with several GPUs: run i on ``cuda:(i mod GPUs)`` (device "auto"/"cuda" only)."""
    if not cfgs or cfgs[0][0].device not in ("auto", "cuda") or not _cuda_available():
        return cfgs
    import torch

    n = torch.cuda.device_count()
    if n < 2:
        return cfgs
    return [(replace(cfg, device=f"cuda:{i % n}"), path) for i, (cfg, path) in enumerate(cfgs)]


@dataclass(frozen=True)
class RunResult:
    recipe: str
    seed: int
    final_val: float
    final_train: float
    tokens_per_s: float
    curve: list[dict]
    best_val: float  # the lowest validation loss of the run (after step 0) ...
    best_step: int  # ... and the step it was measured at


def _load_run(out: Path, recipe: str, seed: int) -> RunResult:
    rows = read_metrics(run_dir(out, recipe, seed))
    vals = [r for r in rows if r.get("val_loss") is not None]
    trains = [r for r in rows if r.get("train_loss") is not None]
    rates = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    if not vals or not trains:
        raise FileNotFoundError(f"no metrics in {run_dir(out, recipe, seed)}")
    meta = run_dir(out, recipe, seed) / "run.json"
    steps = json.loads(meta.read_text())["config"]["steps"] if meta.exists() else None
    if steps is not None and vals[-1]["step"] != steps:
        raise ValueError(f"{run_dir(out, recipe, seed)} is incomplete: last evaluation at step {vals[-1]['step']} "
                         f"of {steps} (resume it with the same command)")  # fmt: skip
    best = min((r for r in vals if r["step"] > 0), key=lambda r: r["val_loss"], default=vals[-1])
    return RunResult(recipe, seed, vals[-1]["val_loss"], trains[-1]["train_loss"],
                     statistics.median(rates) if rates else math.nan, rows, best["val_loss"], best["step"])  # fmt: skip


# a final val loss this much above the run's lowest (relative) is reported as overfitting
OVERFIT_REL = 0.005


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(out: str | Path, recipes: list[str], seeds: int, **info) -> dict:
    """Final val loss per recipe (mean, std over seeds), paired gap to BF16 in % (mean, min, max), train
    loss, median tokens/s, the lowest val loss of each run (mean over seeds, median step); and the BF16
    seed-to-seed spread. Pure function of the run directories."""
    out = Path(out)
    runs = {(r, s): _load_run(out, r, s) for r in recipes for s in range(seeds)}
    base = {s: runs[(BASELINE, s)].final_val for s in range(seeds)}
    rows = []
    for r in recipes:
        vals = [runs[(r, s)].final_val for s in range(seeds)]
        gaps = [100.0 * (runs[(r, s)].final_val - base[s]) / base[s] for s in range(seeds)]
        mean, std = _mean_std(vals)
        gmean, gstd = _mean_std(gaps)
        rows.append({
            "recipe": r, "val_loss": mean, "val_loss_std": std, "val_losses": vals,
            "gap_pct": gmean, "gap_pct_std": gstd, "gap_pct_min": min(gaps), "gap_pct_max": max(gaps),
            "train_loss": statistics.fmean(runs[(r, s)].final_train for s in range(seeds)),
            "tokens_per_s": statistics.fmean(runs[(r, s)].tokens_per_s for s in range(seeds)),
            "best_val_loss": statistics.fmean(runs[(r, s)].best_val for s in range(seeds)),
            "best_step": int(statistics.median(runs[(r, s)].best_step for s in range(seeds))),
        })  # fmt: skip
    meta = json.loads((run_dir(out, BASELINE, 0) / "run.json").read_text())
    return {"rows": rows, "seeds": seeds, "recipes": list(recipes), "info": info,
            "model": meta["model"], "params": meta["params"], "tokens_per_step": meta["tokens_per_step"],
            "device": meta["device"], "torch": meta["torch"], "val_works": meta["val_works"],
            "config": meta["config"]}  # fmt: skip


def _val_text(summary: dict) -> str:
    corpus = summary["config"].get("corpus", "shakespeare")  # runs from before --corpus trained on Shakespeare
    if corpus == "shakespeare":
        return f"held-out plays {', '.join(summary['val_works'])}"
    return f"{len(summary['val_works'])} held-out documents of the `{corpus}` corpus"


def summary_markdown(summary: dict) -> str:
    """The comparison table as Markdown (what ``summary.md`` holds)."""
    seeds, cfg, m = summary["seeds"], summary["config"], summary["model"]
    steps, tps = cfg["steps"], summary["tokens_per_step"]
    lines = [
        f"Preset `{cfg['preset']}`: {m['n_layer']} x {m['n_embd']} GPT ({summary['params'] / 1e6:.2f}M params, "
        f"vocab {m['vocab_size']} `{cfg['tokenizer']}`), {steps} steps x {tps} tokens = {steps * tps / 1e6:.2f}M "
        f"tokens, {seeds} seed(s), device {summary['device']}, torch {summary['torch']}. Val: {_val_text(summary)}.",
        "",
        "| recipe | final val loss | gap vs bf16 | seed range of gap | final train loss | lowest val loss (step) | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        pm = f" ± {r['val_loss_std']:.4f}" if seeds > 1 else ""
        gap = "—" if r["recipe"] == BASELINE else f"{r['gap_pct']:+.2f}%"
        rng = "—" if r["recipe"] == BASELINE or seeds == 1 else f"[{r['gap_pct_min']:+.2f}, {r['gap_pct_max']:+.2f}]%"
        lines.append(f"| {r['recipe']} | {r['val_loss']:.4f}{pm} | {gap} | {rng} | {r['train_loss']:.4f} | "
                     f"{r['best_val_loss']:.4f} ({r['best_step']}) | {r['tokens_per_s']:,.0f} |")  # fmt: skip
    base = next(r for r in summary["rows"] if r["recipe"] == BASELINE)
    if seeds > 1:
        noise = 100.0 * base["val_loss_std"] / base["val_loss"]
        lines += ["", f"BF16 seed-to-seed std of the final val loss: {base['val_loss_std']:.4f} "
                      f"({noise:.2f}% of the loss). Gaps smaller than about twice that are within noise."]  # fmt: skip
    else:
        lines += ["", "One seed: no spread measured; run with `--seeds 3` before reading small gaps as real."]
    risen = [r for r in summary["rows"] if r["val_loss"] > r["best_val_loss"] * (1 + OVERFIT_REL)]
    if risen:
        worst = max(risen, key=lambda r: r["val_loss"] / r["best_val_loss"])
        lines += ["", f"Validation loss rose after its lowest point in {len(risen)} of {len(summary['rows'])} recipes "
                      f"(by up to {100 * (worst['val_loss'] / worst['best_val_loss'] - 1):.1f}%, {worst['recipe']}: "
                      f"{worst['best_val_loss']:.4f} at step {worst['best_step']}, {worst['val_loss']:.4f} at the end): "
                      "the runs overfit their training text, so the final gaps measure overfitting as much as "
                      "quantization. Compare the lowest-val column too."]  # fmt: skip
    lines += ["", "Loss is mean next-token cross-entropy in nats per token; gap = (L - L_bf16) / L_bf16, paired "
                  "by seed (same init, same batches). tokens/s is the median over logged intervals: "
                  + ("on CUDA, the NVFP4, MX and FP8 operands are quantized by fused Triton kernels; NVFP4 and "
                     "MXFP4 GEMMs dequantize to BF16 for a tensor-core GEMM, FP8 GEMMs run on scaled_mm."
                     if "cuda" in str(summary.get("device", ""))
                     else "the plain-PyTorch reference quantizers on the CPU, not kernels.")]  # fmt: skip
    return "\n".join(lines) + "\n"


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["tokens"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(out: str | Path, summary: dict, path: str | Path) -> Path:
    """Three panels over training tokens: train loss, val loss (mean over seeds), and the paired val-loss
    gap to BF16 in % (mean line, min-max band over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, seeds = Path(out), summary["seeds"]
    recipes = summary["recipes"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    cmap = plt.get_cmap("tab10")
    base_val = [_series(read_metrics(run_dir(out, BASELINE, s)), "val_loss") for s in range(seeds)]
    lowest = {0: [], 1: []}  # each loss panel's y range starts at its own lowest curve point
    for i, r in enumerate(recipes):
        color, style = cmap(i % 10), ("--" if "nvfp4-" in r or "+" in r else "-")
        runs = [read_metrics(run_dir(out, r, s)) for s in range(seeds)]
        for k, key in enumerate(("train_loss", "val_loss")):
            ax = axes[k]
            xs, _ = _series(runs[0], key)
            ys = [statistics.fmean(v) for v in zip(*(_series(rr, key)[1] for rr in runs))]
            lowest[k].append(min(ys, default=float("inf")))
            ax.plot(xs[: len(ys)], ys, style, color=color, label=r, lw=1.6 if r in MAIN_RECIPES else 1.2)
        if r != BASELINE:
            gaps = []
            for s in range(seeds):
                xs, ys = _series(runs[s], "val_loss")
                bx, by = base_val[s]
                n = min(len(ys), len(by))
                gaps.append([100.0 * (y - b) / b for y, b in zip(ys[:n], by[:n])])
            n = min(len(g) for g in gaps)
            xs = xs[:n]
            mean = [statistics.fmean(g[j] for g in gaps) for j in range(n)]
            axes[2].plot(xs, mean, style, color=color, label=r, marker="o", ms=3)
            if seeds > 1:
                lo = [min(g[j] for g in gaps) for j in range(n)]
                hi = [max(g[j] for g in gaps) for j in range(n)]
                axes[2].fill_between(xs, lo, hi, color=color, alpha=0.15)
    axes[2].axhline(0.0, color=cmap(0), lw=1)
    cfg = summary["config"]
    titles = ("train loss (mean over log interval)", "validation loss (held-out plays)",
              "val loss gap to bf16 (%, paired by seed)")  # fmt: skip
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy (nats/token)")
    axes[1].legend(fontsize=8)
    for k, ax in enumerate(axes[:2]):
        lo = min(lowest[k], default=float("inf"))
        if lo < float("inf"):
            ax.set_ylim(lo - 0.3, lo + 2.5)
    fig.suptitle(f"fourbit compare: preset {cfg.get('preset') or cfg.get('model')}, {cfg['steps']} steps, {seeds} seed(s), "
                 f"{summary['device']}")  # fmt: skip
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
