"""Recipe diagnostics: what each part of a training recipe does to one real training step, layer by layer.

For every ``nn.Linear`` of a model, one fp32 forward and backward pass on held-out text captures the exact
GEMM operands: the input x (M, K), the weight W (N, K) and the output gradient dy (M, N). Then, for each
recipe, the three GEMMs of ``fourbit.nn.QuantLinear`` are recomputed on quantized operands and compared
with the exact products (computed in float64):

    fprop  y  = x W^T      dgrad  dx = dy W      wgrad  dW = dy^T x

Per GEMM, over N trials that differ only in the stochastic-rounding seeds (E_n = quantized_n - exact):

    relative error   ||E_n|| / ||exact||                         (mean over trials)
    cosine           <quantized_n, exact> / (||.|| ||.||)        (mean over trials)
    gain bias        s_n = <E_n, exact> / ||exact||^2,  bias = mean_n s_n,  SE = sd_n(s_n) / sqrt(N)

s_n is the relative error along the exact output: -0.01 means the quantized gradient is 1% shorter along
the true gradient. Stochastic rounding is unbiased element by element (E[Q(v)] = v) and the two operands
are rounded with independent bits, so E[Q(a) Q(b)^T] = a b^T and ``z = bias / SE`` is Student-t with N-1
degrees of freedom: |z| < 2 in about 95% of cases. That makes "unbiased" a tested statement. An operand
rounded to nearest has a deterministic error: a GEMM with no stochastic operand has SE = 0, and any
nonzero bias it has is systematic (reported as z = ±inf). In the NVFP4 recipe only the gradient dy is
rounded stochastically, so wgrad's x (rounded to nearest) contributes a systematic part; ``dy_only``
columns isolate the gradient side: Q(dy) against exact x and W.

Operands: per operand, the fraction of nonzero values that quantize to zero (flush), and for wgrad the
SQNR of both operands with and without the 16-point RHT (the RHT spreads outliers over 16 tokens, so a
block's amax is less extreme and small values keep more of the 4-bit grid). Weights: without 2D blocks
fprop quantizes W along K and dgrad W^T along N, so the two GEMMs see different weights; the mismatch
||Q_f(W) - Q_d(W^T)^T|| / ||W|| is 0 with 16x16 blocks.

The summary gives each metric's mean over layers with a 95% t interval (layers as replicates), and each
recipe part (SR, RHT, 2D weights) as the paired per-layer difference between ``nvfp4`` and the ablation
without that part, with its interval.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gemm import dequantize_operand, qmm, transpose
from .metrics import sqnr_db
from .nn.functional import shares_weight
from .quantize import QuantizedTensor
from .recipes import GemmQuant, OperandQuant, Recipe, get_recipe
from .report import mean_ci
from .rounding import Rounding

__all__ = [
    "DEFAULT_RECIPES",
    "PARTS",
    "LayerOperands",
    "GemmStats",
    "LayerResult",
    "capture",
    "exact_gemm",
    "quantized_gemm",
    "gain_stats",
    "diagnose_layer",
    "diagnose",
    "summary_rows",
    "part_rows",
    "markdown",
    "plot",
]

DEFAULT_RECIPES = ("nvfp4", "nvfp4-no-sr", "nvfp4-no-rht", "nvfp4-no-2d", "nvfp4-none", "mxfp4", "fp8")
GEMMS = ("fprop", "dgrad", "wgrad")
# recipe part -> (full recipe, ablation without it)
PARTS = {"stochastic rounding": ("nvfp4", "nvfp4-no-sr"), "RHT": ("nvfp4", "nvfp4-no-rht"),
         "2D weight blocks": ("nvfp4", "nvfp4-no-2d")}  # fmt: skip
SEED_STRIDE = 1_000_003  # trial t, operand role r -> seed t * SEED_STRIDE + r (distinct for every pair)
ROLES = {"fprop.x": 1, "fprop.w": 2, "dgrad.dy": 3, "dgrad.w": 4, "wgrad.dy": 5, "wgrad.x": 6}


# --- capture -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerOperands:
    """The exact fp32 operands of one Linear in one training step (tokens flattened)."""

    name: str
    x: torch.Tensor  # (M, K)
    w: torch.Tensor  # (N, K)
    dy: torch.Tensor  # (M, N)


def _logits(out):
    if isinstance(out, tuple):
        out = out[0]
    return out.logits if hasattr(out, "logits") else out


def capture(model: nn.Module, batches: list[torch.Tensor], include=None) -> list[LayerOperands]:
    """Run ``model`` in float32 on each (B, T) batch of token ids (loss: mean next-token cross-entropy,
    averaged over batches) and return every selected Linear's x, W and dy, tokens of all batches stacked.
    ``include(name, module)`` selects Linears (default: all but ``lm_head`` and Linears tied to an
    embedding)."""
    if not batches:
        raise ValueError("capture: no batches")
    embeds = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}

    def default(name, m):
        return not name.endswith("lm_head") and id(m.weight) not in embeds

    include = include or default
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and include(n, m)}
    if not linears:
        raise ValueError("capture: the model has no Linear to diagnose")
    xs: dict[str, list] = {n: [] for n in linears}
    dys: dict[str, list] = {n: [] for n in linears}
    hooks = []
    for n, m in linears.items():
        hooks.append(m.register_forward_hook(lambda mod, inp, out, n=n: xs[n].append(inp[0].detach().reshape(-1, inp[0].shape[-1]).float())))
        hooks.append(m.register_full_backward_hook(lambda mod, gin, gout, n=n: dys[n].append(gout[0].detach().reshape(-1, gout[0].shape[-1]).float())))
    model = model.float()
    was_training = model.training
    model.eval()  # no dropout; gradients still flow
    try:
        for ids in batches:
            logits = _logits(model(ids)).float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)) / len(batches)
            model.zero_grad(set_to_none=True)
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    # backward hooks run in reverse layer order but per batch once: stack in batch order
    return [LayerOperands(n, torch.cat(xs[n]), linears[n].weight.detach().float().clone(), torch.cat(dys[n]))
            for n in linears]  # fmt: skip


# --- one GEMM ------------------------------------------------------------------------------------------


def _q(t: torch.Tensor, op: OperandQuant, seed: int):
    """Quantize a (rows, K) operand along K per ``op`` (no RHT here); unquantized if ``op`` has no scheme."""
    from .quantize import quantize

    if op.scheme is None:
        return t
    stochastic = op.rounding is Rounding.STOCHASTIC
    return quantize(t, op.scheme, rounding=op.rounding, seed=seed if stochastic else None, pad=True, check_finite=False)


def _deq(q, shape) -> torch.Tensor:
    v = dequantize_operand(q)
    return v[: shape[0], : shape[1]]


def _seed(trial: int, role: str) -> int:
    return trial * SEED_STRIDE + ROLES[role]


def _pad_tokens(t: torch.Tensor, multiple: int) -> torch.Tensor:
    return F.pad(t, (0, (-t.shape[-1]) % multiple))


def wgrad_operands(dy: torch.Tensor, x: torch.Tensor, recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """dy^T (N, M') and x^T (K, M'), tokens zero-padded and RHT'd as the recipe says (``fourbit.nn``)."""
    from .nn.linear import wgrad_inputs

    return wgrad_inputs(dy, x, recipe)


def exact_gemm(ops: LayerOperands, gemm: str) -> torch.Tensor:
    x, w, dy = ops.x.double(), ops.w.double(), ops.dy.double()
    if gemm == "fprop":
        return x @ w.T
    if gemm == "dgrad":
        return dy @ w
    if gemm == "wgrad":
        return dy.T @ x
    raise ValueError(f"unknown GEMM {gemm!r}; one of {', '.join(GEMMS)}")


def quantized_gemm(ops: LayerOperands, recipe: Recipe, gemm: str, trial: int = 0, dy_only: bool = False) -> torch.Tensor:
    """One GEMM of ``QuantLinear`` under ``recipe`` with trial ``trial``'s seeds (float64 result of the
    float32 quantized product). ``dy_only``: quantize only the gradient operand, the other stays exact."""
    x, w, dy = ops.x, ops.w, ops.dy
    if gemm == "fprop":
        a = _q(x, recipe.fprop.a, _seed(trial, "fprop.x"))
        b = _q(w, recipe.fprop.b, _seed(trial, "fprop.w"))
        return qmm(a, b).double()
    if gemm == "dgrad":
        a = _q(dy, recipe.dgrad.a, _seed(trial, "dgrad.dy"))
        if dy_only:
            b = w.T
        elif shares_weight(recipe):
            b = transpose(_q(w, recipe.fprop.b, _seed(trial, "fprop.w")))
        else:
            b = _q(w.T.contiguous(), recipe.dgrad.b, _seed(trial, "dgrad.w"))
        return qmm(a, b).double()
    if gemm == "wgrad":
        a, b = wgrad_operands(dy, x, recipe)
        qa = _q(a, recipe.wgrad.a, _seed(trial, "wgrad.dy"))
        qb = b if dy_only else _q(b, recipe.wgrad.b, _seed(trial, "wgrad.x"))
        return qmm(qa, qb).double()
    raise ValueError(f"unknown GEMM {gemm!r}; one of {', '.join(GEMMS)}")


def _stochastic(recipe: Recipe, gemm: str, dy_only: bool = False) -> bool:
    g: GemmQuant = getattr(recipe, gemm)
    ops = (g.a,) if dy_only and gemm != "fprop" else (g.a, g.b)
    if gemm == "dgrad" and not dy_only and shares_weight(recipe):
        ops = (g.a, recipe.fprop.b)
    return any(op.scheme is not None and op.rounding is Rounding.STOCHASTIC for op in ops)


@dataclass(frozen=True)
class GemmStats:
    """One GEMM of one layer under one recipe, over ``trials`` stochastic-rounding seeds."""

    rel_err: float
    cosine: float
    bias: float  # mean relative error along the exact output (gain - 1)
    se: float  # its standard error over trials (0: deterministic)
    trials: int
    noise: float  # sqrt(mean_n ||E_n - mean E||^2) / ||exact||: the seed-to-seed part of the error

    @property
    def z(self) -> float:
        if self.se > 0:
            return self.bias / self.se
        return 0.0 if self.bias == 0 else math.copysign(math.inf, self.bias)


def gain_stats(outputs: list[torch.Tensor], exact: torch.Tensor) -> GemmStats:
    """Statistics of quantized outputs (one per trial) against the exact product (module docstring)."""
    if not outputs:
        raise ValueError("gain_stats: no outputs")
    ex = exact.double().reshape(-1)
    nrm2 = float(ex @ ex)
    if nrm2 == 0:
        raise ValueError("gain_stats: the exact output is zero")
    errs = [o.double().reshape(-1) - ex for o in outputs]
    s = [float(e @ ex) / nrm2 for e in errs]
    rel = [float(e.norm()) / math.sqrt(nrm2) for e in errs]
    cos = [float(F.cosine_similarity((e + ex)[None], ex[None]).item()) for e in errs]
    n = len(outputs)
    mean_err = torch.stack(errs).mean(0)
    noise = math.sqrt(statistics.fmean(float((e - mean_err).square().sum()) for e in errs) / nrm2)
    se = statistics.stdev(s) / math.sqrt(n) if n > 1 else 0.0
    return GemmStats(statistics.fmean(rel), statistics.fmean(cos), statistics.fmean(s), se, n, noise)


def gemm_stats(ops: LayerOperands, recipe: Recipe, gemm: str, trials: int, dy_only: bool = False) -> GemmStats:
    n = trials if _stochastic(recipe, gemm, dy_only) else 1
    return gain_stats([quantized_gemm(ops, recipe, gemm, t, dy_only) for t in range(n)], exact_gemm(ops, gemm))


# --- operands ------------------------------------------------------------------------------------------


def flush_fraction(t: torch.Tensor, q) -> float:
    """Share of the nonzero entries of ``t`` that quantize to exactly zero."""
    v = _deq(q, t.shape) if isinstance(q, QuantizedTensor) else q
    nz = t != 0
    return float(((v == 0) & nz).sum()) / max(1, int(nz.sum()))


def grid_max(q: QuantizedTensor) -> torch.Tensor:
    """The largest magnitude each element of ``q`` could take: its block's (and tensor's) scale times the
    element format's max, from a copy of ``q`` whose every code is the max code."""
    from .packing import pack_fp4

    fmt = q.config.elem
    top = int(fmt.encode(torch.tensor([float(fmt.max)])).reshape(-1)[0])
    codes = torch.full_like(q.codes(), top)
    data = pack_fp4(codes) if q.packed else codes
    return replace(q, data=data.reshape(q.data.shape)).dequantize(torch.float32).abs()


def clip_fraction(t: torch.Tensor, q) -> float:
    """Share of the nonzero entries of ``t`` above their block's largest representable value (saturated:
    the NVFP4 block scale is ``amax_b / 6`` rounded to nearest in E4M3, so it can round below amax_b / 6)."""
    if not isinstance(q, QuantizedTensor):
        return 0.0
    nz = t != 0
    over = t.abs().float() > grid_max(q)[: t.shape[0], : t.shape[1]] * (1 + 1e-6)
    return float((over & nz).sum()) / max(1, int(nz.sum()))


def _rne(op: OperandQuant) -> OperandQuant:
    return replace(op, rounding=Rounding.NEAREST)


def _without_rht(recipe: Recipe) -> Recipe:
    g = recipe.wgrad
    return replace(recipe, wgrad=GemmQuant(replace(g.a, rht=False), replace(g.b, rht=False)))


def operand_stats(ops: LayerOperands, recipe: Recipe) -> dict[str, float]:
    """Flush-to-zero per operand (trial 0 seeds), wgrad SQNR with / without the RHT (round-to-nearest, so
    only the transform differs), and the fprop-vs-dgrad weight mismatch."""
    out: dict[str, float] = {}
    named = {"fprop.x": (ops.x, recipe.fprop.a), "fprop.w": (ops.w, recipe.fprop.b),
             "dgrad.dy": (ops.dy, recipe.dgrad.a), "dgrad.w": (ops.w.T.contiguous(), recipe.dgrad.b)}  # fmt: skip
    a, b = wgrad_operands(ops.dy, ops.x, recipe)
    named |= {"wgrad.dy": (a, recipe.wgrad.a), "wgrad.x": (b, recipe.wgrad.b)}
    for role, (t, op) in named.items():
        q = _q(t, op, _seed(0, role))
        out[f"flush {role}"] = flush_fraction(t, q) if op.scheme is not None else 0.0
        out[f"clip {role}"] = clip_fraction(t, q)
    for rht, rec in (("rht", replace(recipe) if recipe.wgrad.a.rht else None), ("no rht", _without_rht(recipe))):
        if rec is None or recipe.wgrad.a.scheme is None:
            out[f"sqnr wgrad.dy {rht}"] = out[f"sqnr wgrad.x {rht}"] = math.nan
            continue
        a, b = wgrad_operands(ops.dy, ops.x, rec)
        out[f"sqnr wgrad.dy {rht}"] = sqnr_db(a, _deq(_q(a, _rne(rec.wgrad.a), 0), a.shape))
        out[f"sqnr wgrad.x {rht}"] = sqnr_db(b, _deq(_q(b, _rne(rec.wgrad.b), 0), b.shape))
    for side in ("dy", "x"):  # what the transform buys on this layer's operand (nan without an RHT)
        out[f"sqnr wgrad.{side} rht gain"] = out[f"sqnr wgrad.{side} rht"] - out[f"sqnr wgrad.{side} no rht"]
    if recipe.fprop.b.scheme is None:
        out["weight mismatch"] = 0.0
    else:
        wf = _deq(_q(ops.w, recipe.fprop.b, _seed(0, "fprop.w")), ops.w.shape)
        wd = wf if shares_weight(recipe) else _deq(_q(ops.w.T.contiguous(), recipe.dgrad.b, _seed(0, "dgrad.w")), ops.w.T.shape).T
        out["weight mismatch"] = float((wf - wd).norm() / ops.w.norm())
    return out


# --- a layer, a model ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerResult:
    layer: str
    recipe: str
    gemms: dict  # gemm -> GemmStats, plus "dgrad dy_only" / "wgrad dy_only"
    operands: dict  # operand_stats

    def metrics(self) -> dict[str, float]:
        """Flat {metric: value} for tables and summaries."""
        out = {}
        for g, st in self.gemms.items():
            out[f"{g} rel err"] = st.rel_err
            out[f"{g} cosine"] = st.cosine
            if g != "fprop":
                out[f"{g} bias"] = st.bias
                out[f"{g} bias z"] = st.z
                out[f"{g} noise"] = st.noise
        return out | self.operands


def _fits(recipe: Recipe, ops: LayerOperands) -> bool:
    from .nn.linear import check_features

    try:
        check_features(recipe, ops.w.shape[1], ops.w.shape[0], ops.name)
    except ValueError:
        return False
    return True


def diagnose_layer(ops: LayerOperands, recipe: Recipe | str, trials: int = 8) -> LayerResult:
    recipe = get_recipe(recipe)
    if trials < 1:
        raise ValueError(f"diagnose: trials must be >= 1, got {trials}")
    gemms = {g: gemm_stats(ops, recipe, g, trials) for g in GEMMS}
    gemms |= {f"{g} dy_only": gemm_stats(ops, recipe, g, trials, dy_only=True) for g in ("dgrad", "wgrad")}
    return LayerResult(ops.name, recipe.name, gemms, operand_stats(ops, recipe))


def diagnose(layers: list[LayerOperands], recipes=DEFAULT_RECIPES, trials: int = 8, progress: bool = False) -> list[LayerResult]:
    """Every (layer, recipe) whose shapes the recipe's blocks tile."""
    from tqdm.auto import tqdm

    recs = [get_recipe(r) for r in recipes]
    jobs = [(ops, r) for r in recs for ops in layers if _fits(r, ops)]
    return [diagnose_layer(ops, r, trials) for ops, r in tqdm(jobs, disable=not progress, desc="diagnose")]


# --- summaries -----------------------------------------------------------------------------------------

SUMMARY_METRICS = ("fprop rel err", "dgrad rel err", "wgrad rel err", "dgrad cosine", "wgrad cosine",
                   "dgrad bias", "wgrad bias", "wgrad dy_only bias", "wgrad dy_only bias z", "wgrad noise",
                   "sqnr wgrad.dy rht", "sqnr wgrad.dy no rht", "sqnr wgrad.dy rht gain", "sqnr wgrad.x rht gain",
                   "flush wgrad.dy", "flush dgrad.dy", "clip wgrad.dy", "clip fprop.x", "weight mismatch")  # fmt: skip


def _fmt(v: float, metric: str) -> str:
    if math.isnan(v):
        return "—"
    if math.isinf(v):
        return "+inf" if v > 0 else "-inf"
    if "sqnr" in metric or metric.endswith(" z"):
        return f"{v:.2f}"
    return f"{v:.4g}"


def summary_rows(results: list[LayerResult], metrics=SUMMARY_METRICS) -> list[dict]:
    """Per recipe and metric: mean over layers and the half-width of its 95% t interval."""
    rows = []
    for recipe in dict.fromkeys(r.recipe for r in results):
        mine = [r.metrics() for r in results if r.recipe == recipe]
        for m in metrics:
            vals = [d[m] for d in mine if m in d and math.isfinite(d[m])]
            if vals:
                mean, half = mean_ci(vals)
                rows.append({"recipe": recipe, "metric": m, "mean": mean, "ci": half, "layers": len(vals)})
    return rows


def part_rows(results: list[LayerResult], metrics=SUMMARY_METRICS) -> list[dict]:
    """Per recipe part: mean over layers of (full recipe - ablation), paired by layer, with its 95% CI."""
    by = {(r.recipe, r.layer): r.metrics() for r in results}
    rows = []
    for part, (full, abl) in PARTS.items():
        layers = [layer for (rec, layer) in by if rec == full and (abl, layer) in by]
        for m in metrics:
            d = [by[(full, l)][m] - by[(abl, l)][m] for l in layers
                 if m in by[(full, l)] and m in by[(abl, l)] and math.isfinite(by[(full, l)][m] - by[(abl, l)][m])]  # fmt: skip
            if d:
                mean, half = mean_ci(d)
                rows.append({"part": part, "metric": m, "mean": mean, "ci": half, "layers": len(d),
                             "resolved": bool(math.isfinite(half) and abs(mean) > half)})  # fmt: skip
    return rows


def markdown(results: list[LayerResult], title: str = "Recipe diagnostics", setup: str = "") -> str:
    lines = [f"# {title}", ""] + ([setup, ""] if setup else [])
    lines += ["## Recipe parts (nvfp4 minus the ablation without the part; mean over layers, 95% CI)", "",
              "| part | metric | difference | 95% CI | resolved |", "|---|---|---|---|---|"]  # fmt: skip
    for r in part_rows(results):
        ci = "—" if math.isnan(r["ci"]) else f"[{_fmt(r['mean'] - r['ci'], r['metric'])}, {_fmt(r['mean'] + r['ci'], r['metric'])}]"
        lines.append(f"| {r['part']} | {r['metric']} | {_fmt(r['mean'], r['metric'])} | {ci} | {'yes' if r['resolved'] else 'no'} |")
    lines += ["", "## Per recipe (mean over layers ± 95% CI half-width)", "", "| recipe | metric | mean | ± | layers |",
              "|---|---|---|---|---|"]  # fmt: skip
    for r in summary_rows(results):
        lines.append(f"| {r['recipe']} | {r['metric']} | {_fmt(r['mean'], r['metric'])} | {_fmt(r['ci'], r['metric'])} | {r['layers']} |")
    cols = ("fprop rel err", "dgrad rel err", "wgrad rel err", "wgrad cosine", "dgrad bias z", "wgrad bias z",
            "wgrad dy_only bias z", "sqnr wgrad.dy rht", "sqnr wgrad.dy no rht", "flush wgrad.dy", "clip wgrad.dy",
            "weight mismatch")  # fmt: skip
    lines += ["", "## Per layer", "", "| recipe | layer | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in results:
        m = r.metrics()
        lines.append(f"| {r.recipe} | {r.layer} | " + " | ".join(_fmt(m.get(c, math.nan), c) for c in cols) + " |")
    lines += ["", "rel err = ||Q - exact|| / ||exact||; bias = mean over seeds of <Q - exact, exact> / ||exact||^2 "
              "(relative shrinkage along the exact output); bias z = bias / its standard error over seeds (±inf: "
              "no stochastic operand, the error is deterministic); dy_only = only the gradient operand quantized; "
              "sqnr in dB with round-to-nearest; flush = share of nonzero entries quantized to 0; weight mismatch "
              "= ||Q_fprop(W) - Q_dgrad(W^T)^T|| / ||W||."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(results: list[LayerResult], path: str | Path) -> Path:
    """Four panels over layers: wgrad relative error, wgrad gain bias z (dy only), wgrad.dy SQNR with and
    without the RHT, and the flush-to-zero share of wgrad's dy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = list(dict.fromkeys(r.recipe for r in results))
    layers = list(dict.fromkeys(r.layer for r in results))
    panels = (("wgrad rel err", "wgrad relative error"), ("wgrad dy_only bias z", "wgrad bias / SE (dy only)"),
              ("sqnr wgrad.dy", "wgrad dy SQNR (dB): solid RHT, dashed none"), ("flush wgrad.dy", "wgrad dy flushed to 0"))  # fmt: skip
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
    cmap = plt.get_cmap("tab10")
    for i, rec in enumerate(recipes):
        by = {r.layer: r.metrics() for r in results if r.recipe == rec}
        xs = [j for j, l in enumerate(layers) if l in by]
        for ax, (key, _) in zip(axes, panels):
            if key == "sqnr wgrad.dy":
                for suffix, style in ((" rht", "-"), (" no rht", "--")):
                    ys = [by[layers[j]].get(key + suffix, math.nan) for j in xs]
                    ax.plot(xs, ys, style, color=cmap(i % 10), marker=".", label=rec if suffix == " rht" else None)
                continue
            ys = [by[layers[j]].get(key, math.nan) for j in xs]
            ys = [max(-50.0, min(50.0, y)) for y in ys]  # ±inf (deterministic) drawn at the edge
            ax.plot(xs, ys, color=cmap(i % 10), marker=".", label=rec)
    axes[1].axhspan(-2, 2, color="grey", alpha=0.2)
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer index")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def results_json(results: list[LayerResult]) -> list[dict]:
    return [{"layer": r.layer, "recipe": r.recipe, **{k: (v if math.isfinite(v) else str(v)) for k, v in r.metrics().items()}}
            for r in results]  # fmt: skip
