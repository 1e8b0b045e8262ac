"""benchmarks/merge_evidence.py: runs of one comparison made in several sessions, collected into a committed
evidence set that ``fourbit report`` tabulates: the longest copy of a run wins, each table uses exactly the
runs that reached its step, and gaps are paired by seed."""

import importlib.util
import json
from pathlib import Path

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
    meta = {"config": {"preset": "tiny", "steps": 20, "tokenizer": "gpt2-4k"}, "params": 1e6, "tokens_per_step": 1,
            "model": {"n_layer": 6, "n_embd": 8, "vocab_size": 10}, "device": "cpu", "torch": "x", "val_works": ["hamlet"]}  # fmt: skip
    (d / "run.json").write_text(json.dumps(meta))
    (d / "ckpt.pt").write_text("not copied")


def test_merge_takes_the_longest_run_and_pairs_gaps_by_seed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(a, "bf16", 0, {10: 5.0, 20: 4.0})
    _run(a, "bf16", 1, {10: 5.2, 20: 4.4})
    _run(a, "nvfp4", 0, {10: 5.1})  # cut at step 10 in session a ...
    _run(b, "nvfp4", 0, {10: 5.1, 20: 4.2})  # ... finished in session b
    _run(b, "nvfp4", 1, {10: 5.0})  # only to step 10
    out = tmp_path / "evidence" / "toy"
    _merge_module().main(["--roots", str(a), str(b), "--out", str(out), "--recipes", "bf16,nvfp4", "--seeds", "2",
                          "--steps", "10,20", "--train-steps", "20", "--no-plots"])  # fmt: skip
    md = (out / "summary.md").read_text()
    step10, step20, train20 = md.split("## ")[1:4]
    gap10 = 100 * ((5.1 - 5.0) / 5.0 + (5.0 - 5.2) / 5.2) / 2
    assert f"| nvfp4 | {(5.1 + 5.0) / 2:.4f} ± " in step10 and f"{gap10:+.2f}%" in step10
    assert "| nvfp4 | 4.2000 ± 0.0000 (1) | s0 4.2000 |" in step20  # session b's copy, paired with bf16 seed 0
    assert f"{100 * (4.2 - 4.0) / 4.0:+.2f}%" in step20
    assert "Training loss" in train20 and "| bf16 | 3.0200 ± 0.0000 (2)" in train20
    assert (run_dir(out / "runs", "nvfp4", 0) / "metrics.jsonl").read_text().count("\n") == 2  # the longer copy
    assert not (run_dir(out / "runs", "nvfp4", 0) / "ckpt.pt").exists()
    assert "<!-- report:toy/val20 -->" in (out.parent / "tables.md").read_text()


def test_merge_says_not_reached(tmp_path):
    a = tmp_path / "a"
    _run(a, "bf16", 0, {10: 5.0, 20: 4.0})
    out = tmp_path / "evidence" / "m"
    _merge_module().main(["--roots", str(a), "--out", str(out), "--recipes", "bf16,mxfp4", "--seeds", "1",
                          "--steps", "20", "--no-plots"])  # fmt: skip
    assert "| mxfp4 | no run reached this step |" in (out / "summary.md").read_text()
