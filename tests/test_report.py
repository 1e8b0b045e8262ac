"""fourbit.report: evidence tables regenerate from committed runs, and the docs hold exactly those tables.

The intervals are checked against scipy and closed forms; the tables against values recomputed here from
the fake runs; the check against edits of generated files and document blocks.
"""

import json
import math
import statistics
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fourbit import report as rp

REPO = Path(__file__).resolve().parents[1]


def test_t_quantiles_match_closed_forms_and_scipy():
    assert rp.t_quantile_975(1) == pytest.approx(math.tan(0.475 * math.pi), abs=1e-4)
    assert rp.t_quantile_975(2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), abs=1e-4)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in list(range(1, 41)) + [60, 200, 10_000]:
        assert rp.t_quantile_975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=2e-4), df
    with pytest.raises(ValueError, match="positive int"):
        rp.t_quantile_975(0)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=12))
def test_mean_ci_matches_scipy(xs):
    scipy_stats = pytest.importorskip("scipy.stats")
    m, h = rp.mean_ci(xs)
    assert m == pytest.approx(statistics.fmean(xs), abs=1e-9)
    sem = statistics.stdev(xs) / math.sqrt(len(xs))
    if sem > 1e-9:
        lo, hi = scipy_stats.t.interval(0.95, len(xs) - 1, loc=m, scale=sem)
        assert h == pytest.approx((hi - lo) / 2, rel=1e-4)


def _run(root: Path, recipe: str, seed: int, vals: dict[int, float]) -> None:
    d = root / "runs" / recipe / f"seed{seed}"
    d.mkdir(parents=True)
    rows = [{"step": s, "tokens": s * 10, "train_loss": v + 1, "val_loss": v} for s, v in sorted(vals.items())]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = {"config": {"preset": "tiny", "steps": 20, "tokenizer": "gpt2-4k"}, "params": 1e6, "tokens_per_step": 10,
            "model": {"n_layer": 6, "n_embd": 128, "vocab_size": 10}, "device": "cpu", "torch": "x",
            "val_works": ["hamlet"], "recipe": None if recipe == "bf16" else
            {"high_precision": {"first_blocks": 0, "last_fraction": 0.15, "min_last_blocks": 1}}}  # fmt: skip
    (d / "run.json").write_text(json.dumps(meta))


def _evidence(tmp_path: Path) -> Path:
    root = tmp_path / "evidence"
    s = root / "toy"
    s.mkdir(parents=True)
    (s / "report.json").write_text(json.dumps({"title": "Toy", "recipes": ["bf16", "nvfp4", "mxfp4"], "seeds": 3,
                                               "steps": [10, 20], "train_steps": [20]}))  # fmt: skip
    base = {0: 5.0, 1: 5.2, 2: 4.9}
    for seed, b in base.items():
        _run(s, "bf16", seed, {10: b + 1, 20: b})
        _run(s, "nvfp4", seed, {10: b + 1, 20: b * (1.01 + 0.001 * seed)})  # +1.0..1.2%: resolved
    _run(s, "mxfp4", 0, {10: 6.0, 20: 5.1})
    _run(s, "mxfp4", 1, {10: 6.2, 20: 5.0})  # seed 2 missing; gaps +2% and -3.85%: not resolved
    (root / "ptq").mkdir()
    (root / "ptq" / "toy.json").write_text(json.dumps({"calib_range": [0, 256], "scored_range": [256, 1280], "rows": [
        {"scheme": "bf16", "mode": "-", "perplexity": 10.0, "size_mb": 2.0},
        {"scheme": "nvfp4", "mode": "W", "perplexity": 11.0, "size_mb": 1.0}]}))  # fmt: skip
    return root


def test_gap_table_values_and_resolution(tmp_path):
    root = _evidence(tmp_path)
    blocks, _ = rp.generate(root)
    t = blocks["toy/val20"]
    gaps = [100 * 0.01 + 0.1 * s for s in range(3)]
    m, h = statistics.fmean(gaps), 4.3027 * statistics.stdev(gaps) / math.sqrt(3)
    assert "| nvfp4 | " in t and f"{m:+.2f}% | [{m - h:+.2f}, {m + h:+.2f}]% | worse |" in t
    g2 = [100 * (5.1 - 5.0) / 5.0, 100 * (5.0 - 5.2) / 5.2]
    assert "s0 5.1000, s1 5.0000" in t and f"{statistics.fmean(g2):+.2f}%" in t and "| no |" in t
    assert "| bf16 | 5.0333 ± " in t
    assert "toy/train20" in blocks and "| nvfp4 | W | 11.000 | +10.0% | 1.0 |" in blocks["ptq/toy"]
    assert "| tiny | 6 x 128 | [5] | 16.7% |" in blocks["presets"]


def test_build_then_check_is_clean_and_edits_are_caught(tmp_path):
    root = _evidence(tmp_path)
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- report:toy/val20 -->\nstale\n<!-- /report:toy/val20 -->\nend\n")
    rp.build(root, [doc], plots=False)
    assert rp.check(root, [doc]) == []
    assert "stale" not in doc.read_text() and (root / "toy" / "summary.md").exists()
    assert "Runs not committed (1): mxfp4 s2." in (root / "toy" / "summary.md").read_text()
    doc.write_text(doc.read_text().replace("| nvfp4 |", "| nvfp4* |"))
    (root / "toy" / "runs" / "bf16" / "seed0" / "metrics.jsonl").write_text(
        json.dumps({"step": 20, "tokens": 200, "train_loss": 6.0, "val_loss": 4.0}) + "\n")  # a changed run
    problems = rp.check(root, [doc])
    assert any("summary.md" in p for p in problems) and any("tables.md" in p for p in problems)
    assert any("block 'toy/val20'" in p for p in problems)
    doc.write_text("<!-- report:nope -->\nx\n<!-- /report:nope -->\n")
    assert any("unknown report block 'nope'" in p for p in rp.check(root, [doc]))


def test_ptq_overlap_is_refused():
    with pytest.raises(ValueError, match="overlap"):
        rp.ptq_table({"calib_range": [0, 512], "scored_range": [256, 1280], "rows": []})


def test_committed_evidence_matches_docs():
    """CI: every generated evidence file and every <!-- report:NAME --> block of README.md and
    docs/evidence.md is what `fourbit report` gives from the committed runs."""
    docs = [p for p in (REPO / "README.md", REPO / "docs" / "evidence.md") if p.exists()]
    problems = rp.check(REPO / "docs" / "evidence", docs)
    assert problems == [], "\n".join(problems)
