"""Every published evidence number, regenerated from committed run data.

An *evidence set* is a folder ``docs/evidence/<name>/`` holding ``report.json`` (what to tabulate) and
``runs/<recipe>/seed<k>/{metrics.jsonl, run.json}`` (each run's logged losses and its config; no
checkpoints). ``build(root)`` turns every set into ``summary.md`` (all tables), ``loss.png`` and the marked
blocks of ``root/tables.md``; ``check(root, docs)`` rebuilds them in memory and lists every committed file
or ``<!-- report:NAME -->`` block of a document that differs. ``fourbit report`` runs both.

The statistics are paired by seed. Runs of one seed share initial weights and batches, so recipe r's gap
to BF16 on seed s is ``g_s = 100 (L_r,s - L_bf16,s) / L_bf16,s`` (%) and seeds are the independent
replicates. Over n seeds the 95% confidence interval of the mean gap is Student's

    mean(g) ± t_{0.975, n-1} · sd(g) / sqrt(n)

(t_{0.975,1} = 12.71, t_{0.975,2} = 4.30: with 3 seeds an interval is 4.3 standard errors wide each side).
A gap is *resolved* when its interval excludes 0; the tables say so per recipe instead of leaving the
reader to compare a mean with a spread.

PTQ sets are ``docs/evidence/ptq/<name>.json`` (``fourbit.report.ptq_rows`` writes them): one row per
(scheme, weights / weights+activations) with its perplexity, and the token ranges used for calibration
and for scoring, which must not overlap (checked when the table is built).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "T975",
    "t_quantile_975",
    "mean_ci",
    "EvidenceSpec",
    "load_spec",
    "load_runs",
    "value_at",
    "gap_rows",
    "gap_table",
    "preset_table",
    "ptq_table",
    "blocks_for",
    "render_set",
    "build",
    "check",
    "replace_blocks",
    "find_blocks",
]

BASELINE = "bf16"
SPEC = "report.json"
RUNS = "runs"
TABLES = "tables.md"
SUMMARY = "summary.md"
PLOT = "loss.png"
PTQ_DIR = "ptq"
BLOCK_RE = re.compile(r"<!-- report:(?P<name>[\w./+-]+) -->\n(?P<body>.*?)<!-- /report:(?P=name) -->", re.S)

# Student t 0.975 quantiles for 1..30 degrees of freedom (two-sided 95%); tested against scipy and the
# closed forms t_1 = tan(0.475 pi), t_2 = 0.95 / sqrt(2 * 0.975 * 0.025).
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
        2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
        2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)  # fmt: skip
Z975 = 1.959964


def t_quantile_975(df: int) -> float:
    """Student t 0.975 quantile; beyond the table the Cornish-Fisher expansion (error < 1e-4 for df > 30)."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"t_quantile_975: df must be a positive int, got {df!r}")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% t interval); the half-width is nan for one value."""
    if not xs:
        raise ValueError("mean_ci: no values")
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, math.nan
    return m, t_quantile_975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


# --- evidence sets -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvidenceSpec:
    """What ``report.json`` asks for: recipes (bf16 first), seeds 0..n-1, the steps whose validation (and
    training) loss is tabulated, and a title. ``main_step`` is the step of the set's headline table."""

    name: str
    title: str
    recipes: tuple[str, ...]
    seeds: int
    steps: tuple[int, ...]
    train_steps: tuple[int, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.recipes or self.recipes[0] != BASELINE:
            raise ValueError(f"evidence set {self.name!r}: recipes must start with {BASELINE!r}, got {self.recipes}")
        if self.seeds < 1 or not self.steps:
            raise ValueError(f"evidence set {self.name!r}: needs seeds >= 1 and at least one step")

    @property
    def main_step(self) -> int:
        return self.steps[-1]


def load_spec(folder: Path) -> EvidenceSpec:
    d = json.loads((Path(folder) / SPEC).read_text())
    return EvidenceSpec(
        name=Path(folder).name, title=d["title"], recipes=tuple(d["recipes"]), seeds=int(d["seeds"]),
        steps=tuple(d["steps"]), train_steps=tuple(d.get("train_steps", ())), notes=tuple(d.get("notes", ())),
    )  # fmt: skip


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_runs(folder: Path, spec: EvidenceSpec) -> dict[tuple[str, int], list[dict]]:
    """{(recipe, seed): metrics rows} for every run of the spec found under ``folder/runs``."""
    out = {}
    for r in spec.recipes:
        for s in range(spec.seeds):
            path = Path(folder) / RUNS / r / f"seed{s}" / "metrics.jsonl"
            if path.exists():
                out[(r, s)] = _read_jsonl(path)
    return out


def value_at(rows: list[dict], step: int, key: str = "val_loss") -> float | None:
    for row in rows:
        if row["step"] == step and row.get(key) is not None:
            return float(row[key])
    return None


@dataclass(frozen=True)
class GapRow:
    recipe: str
    seeds: tuple[int, ...]
    values: tuple[float, ...]
    gaps: tuple[float, ...]  # paired, % of BF16 (empty for BF16)

    @property
    def resolved(self) -> str:
        if self.recipe == BASELINE or len(self.gaps) < 2:
            return "—"
        m, h = mean_ci(list(self.gaps))
        return "no" if abs(m) <= h else ("worse" if m > 0 else "better")


def gap_rows(runs: dict[tuple[str, int], list[dict]], spec: EvidenceSpec, step: int, key: str = "val_loss") -> list[GapRow]:
    """Per recipe: the seeds that reached ``step`` (and whose BF16 twin did), their losses and paired gaps."""
    base = {s: value_at(runs[(BASELINE, s)], step, key) for s in range(spec.seeds) if (BASELINE, s) in runs}
    base = {s: v for s, v in base.items() if v is not None}
    rows = []
    for r in spec.recipes:
        got = {s: value_at(runs[(r, s)], step, key) for s in range(spec.seeds) if (r, s) in runs}
        ss = tuple(s for s, v in sorted(got.items()) if v is not None and s in base)
        vals = tuple(got[s] for s in ss)
        gaps = () if r == BASELINE else tuple(100.0 * (got[s] - base[s]) / base[s] for s in ss)
        rows.append(GapRow(r, ss, vals, gaps))
    return rows


def gap_table(rows: list[GapRow], what: str = "val") -> list[str]:
    lines = [f"| recipe | {what} loss (mean ± std) | per seed | gap vs bf16 (paired mean) | 95% CI of the gap | resolved |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for g in rows:
        if not g.values:
            lines.append(f"| {g.recipe} | no run reached this step | | | | |")
            continue
        std = statistics.stdev(g.values) if len(g.values) > 1 else 0.0
        per = ", ".join(f"s{s} {v:.4f}" for s, v in zip(g.seeds, g.values))
        head = f"| {g.recipe} | {statistics.fmean(g.values):.4f} ± {std:.4f} ({len(g.values)}) | {per} |"
        if g.recipe == BASELINE:
            lines.append(f"{head} — | — | — |")
            continue
        m, h = mean_ci(list(g.gaps))
        ci = "—" if math.isnan(h) else f"[{m - h:+.2f}, {m + h:+.2f}]%"
        lines.append(f"{head} {m:+.2f}% | {ci} | {g.resolved} |")
    return lines


def _metas(folder: Path, runs: dict) -> list[dict]:
    out = []
    for (r, s) in sorted(runs):
        path = Path(folder) / RUNS / r / f"seed{s}" / "run.json"
        if path.exists():
            out.append(json.loads(path.read_text()))
    return out


def _meta(folder: Path, runs: dict) -> dict | None:
    metas = _metas(folder, runs)
    return metas[0] if metas else None


def _setup_line(metas: list[dict]) -> str:
    """One sentence: preset, size, tokens, device, and the high-precision share the runs actually used."""
    if not metas:
        return "No runs committed yet."
    from .recipes import HighPrecision

    meta = metas[0]
    if meta.get("kind") == "cpt":
        return _cpt_setup_line(metas)
    cfg, m = meta["config"], meta["model"]
    hps = {json.dumps(d["recipe"]["high_precision"], sort_keys=True) for d in metas if (d.get("recipe") or {}).get("high_precision")}
    kept = []
    for h in sorted(hps):
        hp = HighPrecision(**json.loads(h))
        kept.append(f"blocks {sorted(hp.blocks(m['n_layer']))} of {m['n_layer']} ({100 * hp.fraction(m['n_layer']):.1f}%)")
    return (f"Preset `{cfg['preset']}`: {m['n_layer']} x {m['n_embd']} GPT ({meta['params'] / 1e6:.2f}M params, vocab "
            f"{m['vocab_size']} `{cfg['tokenizer']}`), {cfg['steps']} steps x {meta['tokens_per_step']:,} tokens, "
            f"device {meta['device']}, torch {meta['torch']}. Quantized recipes keep the Linears of "
            f"{' / '.join(kept) or 'no block'} in high precision. Loss: next-token cross-entropy (nats/token) on "
            f"held-out text ({', '.join(meta.get('val_works', []))}).")  # fmt: skip


def _cpt_setup_line(metas: list[dict]) -> str:
    """The setup sentence of a continued-pre-training set (``fourbit.cpt`` runs)."""
    meta = metas[0]
    cfg, m = meta["config"], meta["model"]
    kept = {(tuple(d["high_precision"]["hp_blocks"]), d["high_precision"]["hp_fraction"]) for d in metas
            if d.get("recipe") and d.get("high_precision", {}).get("hp_fraction") is not None}  # fmt: skip
    kept_text = " / ".join(f"blocks {list(b)} of {m['n_layer']} ({100 * f:.1f}%)" for b, f in sorted(kept)) or "no block"
    return (f"Continued pre-training of `{m['name']}` ({m['architecture']}, {m['n_layer']} x {m['n_embd']}, "
            f"{meta['params'] / 1e6:.1f}M params, vocab {m['vocab_size']}) from its pretrained weights: "
            f"{cfg['steps']} steps x {meta['tokens_per_step']:,} tokens (batch {cfg['batch_size']} x {cfg['seq_len']}), "
            f"AdamW lr {cfg['lr']:g} ({cfg['schedule']}, warmup {cfg['warmup']}), device {meta['device']}, torch "
            f"{meta['torch']}. Quantized recipes keep the Linears of {kept_text} in high precision; embedding and "
            f"LM head are never quantized. Step 0 is the pretrained model under each recipe. Loss: next-token "
            f"cross-entropy (nats/token) on {meta['eval_windows']} held-out windows"
            + (f" ({', '.join(meta['val_works'])})" if meta.get("val_works") else "") + f"; data: {meta['data']}.")


def blocks_for(folder: Path, spec: EvidenceSpec) -> dict[str, str]:
    """The named Markdown blocks of one evidence set: ``<name>/val<step>`` and ``<name>/train<step>``."""
    runs = load_runs(folder, spec)
    out = {}
    for step in spec.steps:
        out[f"{spec.name}/val{step}"] = "\n".join(gap_table(gap_rows(runs, spec, step))) + "\n"
    for step in spec.train_steps:
        out[f"{spec.name}/train{step}"] = "\n".join(gap_table(gap_rows(runs, spec, step, "train_loss"), "train")) + "\n"
    return out


def render_set(folder: Path, spec: EvidenceSpec) -> str:
    """``summary.md`` of one evidence set."""
    runs = load_runs(folder, spec)
    blocks = blocks_for(folder, spec)
    missing = [f"{r} s{s}" for r in spec.recipes for s in range(spec.seeds) if (r, s) not in runs]
    lines = [f"# {spec.title}", "", "Generated by `fourbit report` from `runs/*/seed*/metrics.jsonl`; do not edit.", "",
             _setup_line(_metas(folder, runs)), ""]  # fmt: skip
    if missing:
        lines += [f"Runs not committed ({len(missing)}): {', '.join(missing)}.", ""]
    lines += [*spec.notes, ""] if spec.notes else []
    for name, body in blocks.items():
        step = int(re.sub(r"\D", "", name.rsplit("/", 1)[1]))
        title = "Validation loss" if "/val" in name else "Training loss (mean over the last logging interval)"
        lines += [f"## {title} at step {step}", "", body]
    lines += ["Gap = 100 (L - L_bf16) / L_bf16, paired by seed; 95% CI = mean ± t_{0.975,n-1} sd/sqrt(n) over "
              "seeds; *resolved* says whether that interval excludes zero."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_set(folder: Path, spec: EvidenceSpec, path: Path) -> Path | None:
    """``fourbit.harness.compare.plot`` over the recipes whose every seed is committed; None if BF16 is not."""
    from .harness.compare import plot

    runs = load_runs(folder, spec)
    recipes = [r for r in spec.recipes if all((r, s) in runs for s in range(spec.seeds))]
    meta = _meta(folder, runs)
    if BASELINE not in recipes or meta is None:
        return None
    summary = {"seeds": spec.seeds, "recipes": recipes, "config": meta["config"], "device": meta["device"]}
    return plot(Path(folder) / RUNS, summary, path)


# --- presets and PTQ -----------------------------------------------------------------------------------


def preset_table() -> str:
    """Each harness preset's depth and the share of its Linears ``HighPrecision()`` keeps in BF16."""
    from .harness.model import PRESETS
    from .recipes import HighPrecision

    hp = HighPrecision()
    lines = ["| preset | blocks x width | high-precision blocks | share of the blocks' Linears in BF16 |", "|---|---|---|---|"]
    for name, cfg in PRESETS.items():
        kept = sorted(hp.blocks(cfg.n_layer))
        lines.append(f"| {name} | {cfg.n_layer} x {cfg.n_embd} | {kept} | {100 * hp.fraction(cfg.n_layer):.1f}% |")
    lines.append(f"| NVFP4 paper, 12B | 62 x 5120 | first 2, last 8 | {100 * 10 / 62:.1f}% |")
    return "\n".join(lines) + "\n"


def ptq_table(data: dict) -> str:
    """Markdown table of a PTQ result file; raises if calibration and scored tokens overlap."""
    (c0, c1), (s0, s1) = data["calib_range"], data["scored_range"]
    if c0 < s1 and s0 < c1:
        raise ValueError(f"PTQ evidence: calibration tokens [{c0}, {c1}) overlap scored tokens [{s0}, {s1})")
    lines = ["| scheme | quantized | perplexity | vs bf16 | size MB |", "|---|---|---|---|---|"]
    ref = data["rows"][0]["perplexity"]
    for row in data["rows"]:
        rel = "—" if row["scheme"] == "bf16" else f"{100 * (row['perplexity'] / ref - 1):+.1f}%"
        lines.append(f"| {row['scheme']} | {row['mode']} | {row['perplexity']:.3f} | {rel} | {row['size_mb']:.1f} |")
    return "\n".join(lines) + "\n"


# --- build and check -----------------------------------------------------------------------------------


def _sets(root: Path) -> list[Path]:
    return sorted(p.parent for p in Path(root).glob(f"*/{SPEC}"))


def generate(root: Path) -> tuple[dict[str, str], dict[Path, str]]:
    """(every named block, every generated text file) for the evidence root."""
    root = Path(root)
    blocks: dict[str, str] = {"presets": preset_table()}
    files: dict[Path, str] = {}
    for folder in _sets(root):
        spec = load_spec(folder)
        blocks.update(blocks_for(folder, spec))
        files[folder / SUMMARY] = render_set(folder, spec)
    for path in sorted((root / PTQ_DIR).glob("*.json")):
        blocks[f"ptq/{path.stem}"] = ptq_table(json.loads(path.read_text()))
    body = ["# Evidence tables", "", "Generated by `fourbit report` from the committed runs under `docs/evidence/`; "
            "README.md and docs/evidence.md include these blocks verbatim (a test checks it).", ""]  # fmt: skip
    for name, text in blocks.items():
        body += [f"<!-- report:{name} -->", text.rstrip("\n"), f"<!-- /report:{name} -->", ""]
    files[root / TABLES] = "\n".join(body)
    return blocks, files


def find_blocks(text: str) -> dict[str, str]:
    return {m["name"]: m["body"] for m in BLOCK_RE.finditer(text)}


def replace_blocks(text: str, blocks: dict[str, str], strict: bool = True) -> str:
    """``text`` with the body of every ``<!-- report:NAME -->`` block set to ``blocks[NAME]``; an unknown
    NAME raises (``strict``) or is left as it is (``check`` still reports it)."""

    def sub(m: re.Match) -> str:
        name = m["name"]
        if name not in blocks:
            if not strict:
                return m[0]
            raise ValueError(f"unknown report block {name!r}; known: {', '.join(sorted(blocks))}")
        return f"<!-- report:{name} -->\n{blocks[name]}<!-- /report:{name} -->"

    return BLOCK_RE.sub(sub, text)


def build(root: Path, docs: list[Path] = (), plots: bool = True) -> list[Path]:
    """Write every generated file, refresh the marked blocks of ``docs``, draw the plots; the paths written."""
    blocks, files = generate(root)
    written = []
    for path, text in files.items():
        path.write_text(text)
        written.append(path)
    for doc in docs:
        doc = Path(doc)
        new = replace_blocks(doc.read_text(), blocks, strict=False)
        if new != doc.read_text():
            doc.write_text(new)
            written.append(doc)
    if plots:
        for folder in _sets(root):
            if (p := plot_set(folder, load_spec(folder), folder / PLOT)) is not None:
                written.append(p)
    return written


def check(root: Path, docs: list[Path] = ()) -> list[str]:
    """Every generated file or document block that differs from what the committed runs give ([] if none)."""
    blocks, files = generate(root)
    problems = [f"{p} differs from the committed runs (run `fourbit report`)" for p, text in files.items()
                if not p.exists() or p.read_text() != text]  # fmt: skip
    for doc in docs:
        for name, body in find_blocks(Path(doc).read_text()).items():
            if name not in blocks:
                problems.append(f"{doc}: unknown report block {name!r}")
            elif body != blocks[name]:
                problems.append(f"{doc}: block {name!r} differs from the committed runs (run `fourbit report`)")
    return problems
