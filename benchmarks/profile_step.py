"""Where the time of a training step goes: one GPT step of the evidence harness under each recipe, against BF16.

For each recipe: the median step time of the ``gpu`` preset (random tokens; the step is data-independent)
over ``--steps`` steps after warm-up, its ratio to the BF16 step measured in the same run, and a
``torch.profiler`` table of the GPU kernels (grouped: GEMMs, fourbit quantize kernels, dequantize, the rest)
plus the host time of ``fourbit.quantize`` per call. Also: the host-side cost of one ``fourbit.quantize``
call (Python dispatch and launches) against the kernel's own time.

    PYTHONPATH=. python benchmarks/profile_step.py [--recipes bf16 nvfp4 fp8 mxfp4] [--batch 32] [--out DIR]

A mode after the recipe picks how the step runs: ``nvfp4`` eager; ``nvfp4:graph`` captured in a CUDA graph
(``fourbit.harness.graphs.GraphedTrainStep``, the harness's ``--cuda-graph``); ``nvfp4:compile`` under
``torch.compile(model)``; ``nvfp4:compile-graph`` under ``torch.compile(model, mode="reduce-overhead")``
(CUDA graphs through the compiler). Each ratio is against bf16 run the same way in the same process, and
the last column against compiled bf16 (the baseline a user who compiles sees):

    PYTHONPATH=. python benchmarks/profile_step.py --recipes bf16:compile nvfp4:compile fp8-blockwise:compile
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from pathlib import Path

import torch

import fourbit
import fourbit.kernels
from fourbit.harness.model import get_preset
from fourbit.harness.graphs import GraphedTrainStep
from fourbit.harness.train import build_model, make_optimizer, resolve_recipe, train_config, train_step

GROUPS = (  # (group, substrings of kernel names), first match wins
    ("fourbit quantize", ("_quantize_kernel", "_amax_kernel", "_mx_", "_fp8_", "_dual_kernel", "_seed_keys")),
    ("fourbit dequantize", ("_dequant_kernel",)),
    ("GEMM (Triton, NVFP4)", ("_scaled_gemm", "_qmm_kernel")),
    ("GEMM (cuBLAS / cutlass)", ("gemm", "sm90_xmma", "cutlass", "nvjet", "Kernel2")),
    ("attention", ("flash", "fmha", "attention")),
)


def group_of(name: str) -> str:
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return "other (elementwise, reductions, copies, optimizer)"


MODES = ("eager", "graph", "compile", "compile-graph")


def step_times(recipe_name: str, steps: int, batch: int, mode: str = "eager") -> tuple[list[float], object]:
    device = torch.device("cuda")
    graph = mode == "graph"
    cfg = train_config("gpu", recipe=recipe_name, batch_size=batch, cuda_graph=graph)
    model = build_model(get_preset("gpu"), resolve_recipe(recipe_name), device)
    opt = make_optimizer(model, cfg, device)
    step_fn = GraphedTrainStep(model, opt, device) if graph else train_step  # 2 eager steps, then capture
    run = model
    if mode == "compile":
        run = torch.compile(model)
    elif mode == "compile-graph":
        run = torch.compile(model, mode="reduce-overhead")
    T = get_preset("gpu").block_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(0, get_preset("gpu").vocab_size, (batch, T), device=device, generator=gen)
    y = torch.roll(x, -1, 1)
    times = []
    warmup = 3 if mode in ("eager", "graph") else 5  # compiles and cudagraph-tree warm-up runs
    for i in range(steps + warmup):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step_fn(run if not graph else model, opt, x, y, 1e-4, 1.0, device)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step_fn(run if not graph else model, opt, x, y, 1e-4, 1.0, device)
        torch.cuda.synchronize()
    return times, prof


def kernel_groups(prof) -> dict[str, float]:
    totals: dict[str, float] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t and getattr(ev, "device_type", None) is not None and "CUDA" in str(ev.device_type):
            g = group_of(ev.key)
            totals[g] = totals.get(g, 0.0) + t / 1e3
    return totals


def host_time(fn, n: int, warmup: int) -> tuple[float, float]:
    """Seconds per call of ``fn`` on the host (a loop without syncs) and including the final sync (wall)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n
    torch.cuda.synchronize()
    return host, (time.perf_counter() - t0) / n


def quantize_host_overhead(lines: list[str]) -> None:
    """Wall time per ``fourbit.quantize`` call in a loop without syncs vs the kernels' GPU time."""
    x = torch.randn(16384, 768, device="cuda", dtype=torch.bfloat16)
    for label, kw in (("1x16 RNE", {}), ("1x16 SR", dict(rounding="stochastic", seed=1)), ("16x16", dict(block=(16, 16)))):
        n = 200
        host, wall = host_time(lambda: fourbit.quantize(x, "nvfp4", check_finite=False, **kw), n, warmup=10)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):  # GPU time alone: replay the same launches from a graph
                fourbit.quantize(x, "nvfp4", check_finite=False, **kw)
            g.replay()
        except Exception as e:  # capture is a measuring aid; report instead of failing the profile
            lines.append(f"| quantize 16384x768 bf16 {label} | {host * 1e6:.1f} | {wall * 1e6:.1f} | no graph: {type(e).__name__} |")
            continue
        start.record()
        for _ in range(n):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        gpu = start.elapsed_time(end) / n / 1e3
        lines.append(f"| quantize 16384x768 bf16 {label} | {host * 1e6:.1f} | {wall * 1e6:.1f} | {gpu * 1e6:.1f} |")


def host_cost_breakdown(lines: list[str]) -> None:
    """Host microseconds per call of the pieces of one ``fourbit.quantize`` (loops without syncs)."""
    from fourbit.kernels import nvfp4_quantize as nq
    from fourbit.rounding import Rounding
    from fourbit.schemes import NVFP4Config

    x = torch.randn(16384, 768, device="cuda", dtype=torch.bfloat16)
    cfg = NVFP4Config()
    amax = nq.measure_amax(x)
    pieces = {
        "torch.empty (one allocation)": lambda: torch.empty((16384, 384), dtype=torch.uint8, device="cuda"),
        "torch.zeros(1) (allocation + fill launch)": lambda: torch.zeros(1, dtype=torch.int32, device="cuda"),
        "x.abs().amax() (two torch launches)": lambda: x.abs().amax(),
        "measure_amax (zeros + one Triton launch)": lambda: nq.measure_amax(x),
        "kernels' quantize_nvfp4, amax given (3 allocations + one Triton launch)": lambda: nq.quantize_nvfp4(x, cfg, Rounding.NEAREST, None, amax, False),
        "fourbit.quantize, amax given": lambda: fourbit.quantize(x, "nvfp4", amax=amax, check_finite=False),
        "fourbit.quantize (amax measured)": lambda: fourbit.quantize(x, "nvfp4", check_finite=False),
    }  # fmt: skip
    lines += ["", "| piece of one quantize call (16384x768 bf16) | host us per call |", "|---|---|"]
    for name, fn in pieces.items():
        host, _ = host_time(fn, 500, warmup=20)
        lines.append(f"| {name} | {host * 1e6:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recipes", nargs="+", default=[f"{r}:compile" for r in ("bf16", "nvfp4", "fp8", "fp8-blockwise", "mxfp4")])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("profile_step: needs a CUDA GPU; nothing to do")
        return
    lines = [f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
             "", f"gpu preset, batch {args.batch} x 512 tokens, median of {args.steps} steps after 3 warm-up steps "
             "(graphed runs: 2 eager steps, then capture; compiled runs: 5 warm-up steps)", "",
             "| recipe:mode | step ms | vs bf16 (same mode) | vs compiled bf16 | GPU ms by kernel group (profiled step) |",
             "|---|---|---|---|---|"]  # fmt: skip
    base: dict[str, float] = {}  # bf16's step time per mode
    tables = []
    for name in args.recipes:
        recipe, _, mode = name.partition(":")
        mode = mode or "eager"
        if mode not in MODES:
            raise SystemExit(f"profile_step: unknown mode {mode!r} in {name!r}; known: {', '.join(MODES)}")
        try:
            times, prof = step_times(recipe, args.steps, args.batch, mode)
        except Exception as e:  # report and go on with the other recipes
            lines.append(f"| {name} | failed: {type(e).__name__}: {str(e)[:120]} | | | |")
            print(lines[-1], flush=True)
            torch._dynamo.reset()
            continue
        ms = statistics.median(times) * 1e3
        if recipe == "bf16":
            base.setdefault(mode, ms)
        groups = kernel_groups(prof)
        gtxt = "; ".join(f"{g} {t:.1f}" for g, t in sorted(groups.items(), key=lambda kv: -kv[1]))
        ratio = f"{ms / base[mode]:.2f}x" if mode in base else "-"
        vs_compiled = f"{ms / base['compile']:.2f}x" if "compile" in base else "-"
        lines.append(f"| {name} | {ms:.1f} | {ratio} | {vs_compiled} | {gtxt} (sum {sum(groups.values()):.1f}) |")
        print(lines[-1], flush=True)
        tables.append(f"\n## {name}: top kernels and ops\n\n```\n"
                      + prof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70)
                      + "\n```\n")  # fmt: skip
        del prof
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    lines += ["", "Host cost of one `fourbit.quantize` call (microseconds): loop without syncs / with the final sync / "
              "GPU time of the same launches replayed from a CUDA graph", "",
              "| call | host us per call | wall us per call | GPU us per call |", "|---|---|---|---|"]  # fmt: skip
    quantize_host_overhead(lines)
    host_cost_breakdown(lines)
    text = "\n".join(lines) + "\n" + "".join(tables)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_step.md").write_text(text)


if __name__ == "__main__":
    main()
