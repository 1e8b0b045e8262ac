"""benchmarks/merge_evidence.py: runs of one comparison made in several sessions, merged and tabulated.

The evidence tables in README and benchmarks/RESULTS.md come from it, so: the longest copy of a run wins,
each table uses exactly the runs that reached its step, and gaps are paired by seed.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fourbit.harness.compare import run_dir

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "merge_evidence.py"


def _merge_module():
    spec = importlib.util.spec_from_file_location("merge_evidence", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(root: Path, recipe: str, seed: int, vals: dict[int, float], train: float = 3.0) -> None:
    d = run_dir(root, recipe, seed)
    d.mkdir(parents=True)
    rows = [{"step": s, "tokens": s, "train_loss": train + s / 1000, "val_loss": v} for s, v in sorted(vals.items())]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = {"config": {"preset": "tiny", "steps": 20}, "params": 1e6, "tokens_per_step": 1, "model": {},
            "device": "cpu", "torch": "x", "val_works": ["hamlet"]}  # fmt: skip
    (d / "run.json").write_text(json.dumps(meta))


def test_merge_takes_the_longest_run_and_pairs_gaps_by_seed(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(a, "bf16", 0, {10: 5.0, 20: 4.0})
    _run(a, "bf16", 1, {10: 5.2, 20: 4.4})
    _run(a, "nvfp4", 0, {10: 5.1})  # cut at step 10 in session a ...
    _run(b, "nvfp4", 0, {10: 5.1, 20: 4.2})  # ... finished in session b
    _run(b, "nvfp4", 1, {10: 5.0})  # only to step 10
    out = tmp_path / "merged"
    monkeypatch.setattr(sys, "argv", ["merge_evidence", "--roots", str(a), str(b), "--out", str(out),
                                      "--recipes", "bf16,nvfp4", "--seeds", "2", "--steps", "10,20",
                                      "--train-steps", "20"])  # fmt: skip
    _merge_module().main()
    md = (out / "summary.md").read_text()
    step10, step20, train20 = md.split("### ")[1:4]
    # step 10: both seeds; gap mean of (5.1-5.0)/5.0 and (5.0-5.2)/5.2
    gap10 = 100 * ((5.1 - 5.0) / 5.0 + (5.0 - 5.2) / 5.2) / 2
    assert f"| nvfp4 | {(5.1 + 5.0) / 2:.4f} ± " in step10 and f"{gap10:+.2f}%" in step10
    # step 20: nvfp4 has only seed 0 there (session b's copy), paired with bf16 seed 0
    assert "| nvfp4 | 4.2000 ± 0.0000 (1 seeds) | s0 4.2000 |" in step20
    assert f"{100 * (4.2 - 4.0) / 4.0:+.2f}%" in step20
    assert "Training loss" in train20 and "| bf16 | 3.0200 ± 0.0000 (2 seeds)" in train20
    assert (run_dir(out / "runs", "nvfp4", 0) / "metrics.jsonl").read_text().count("\n") == 2  # the longer copy


def test_merge_says_not_reached(tmp_path, monkeypatch):
    a = tmp_path / "a"
    _run(a, "bf16", 0, {10: 5.0, 20: 4.0})
    _run(a, "mxfp4", 0, {10: 5.3})
    monkeypatch.setattr(sys, "argv", ["merge_evidence", "--roots", str(a), "--out", str(tmp_path / "m"),
                                      "--recipes", "bf16,mxfp4", "--seeds", "1", "--steps", "20"])  # fmt: skip
    _merge_module().main()
    assert "| mxfp4 | not reached |" in (tmp_path / "m" / "summary.md").read_text()


@pytest.fixture(autouse=True)
def _no_plot(monkeypatch):
    """The plot needs full run metadata; these tests check the tables only."""
    import fourbit.harness.compare as hc

    monkeypatch.setattr(hc, "plot", lambda *a, **k: None)


def test_previous_summary_fills_missing_runs_and_new_runs_replace_theirs(tmp_path, monkeypatch):
    """``--previous``: runs whose metrics are gone come back from an earlier summary's per-seed values; a run
    found under a root replaces its (recipe, seed) at every step, val and train alike."""
    a, b = tmp_path / "a", tmp_path / "b"
    _run(a, "bf16", 0, {10: 5.0, 20: 4.0})
    _run(a, "bf16", 1, {10: 5.2, 20: 4.4})
    _run(a, "nvfp4", 0, {10: 5.1, 20: 4.2})
    _run(a, "nvfp4", 1, {10: 5.3})  # cut at step 10
    argv = ["merge_evidence", "--recipes", "bf16,nvfp4", "--seeds", "2", "--steps", "10,20", "--train-steps", "20"]
    monkeypatch.setattr(sys, "argv", argv + ["--roots", str(a), "--out", str(tmp_path / "old")])
    _merge_module().main()
    _run(b, "nvfp4", 1, {10: 5.25, 20: 4.3}, train=2.0)  # seed 1 redone in a later session
    monkeypatch.setattr(sys, "argv", argv + ["--roots", str(b), "--out", str(tmp_path / "new"),
                                             "--previous", str(tmp_path / "old" / "summary.md")])  # fmt: skip
    _merge_module().main()
    md = (tmp_path / "new" / "summary.md").read_text()
    step10, step20, train20 = md.split("### ")[1:4]
    assert "| nvfp4 | 5.1750 ± " in step10 and "s0 5.1000, s1 5.2500" in step10  # new seed 1 replaced 5.3
    assert "| nvfp4 | 4.2500 ± " in step20 and "(2 seeds)" in step20.split("| nvfp4")[1]
    gap20 = 100 * ((4.2 - 4.0) / 4.0 + (4.3 - 4.4) / 4.4) / 2
    assert f"{gap20:+.2f}%" in step20
    assert "| bf16 | 4.2000 ± " in step20  # both bf16 seeds only from the earlier tables
    assert "s0 3.0200, s1 2.0200" in train20  # train: earlier value for seed 0, the new run's for seed 1
    assert "The values of the other 3 runs" in md
    assert not run_dir(tmp_path / "new" / "runs", "bf16", 0).exists()
