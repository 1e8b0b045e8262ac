"""Every ```python block in docs/training.md runs as written, and the error lines it quotes are the ones the
code prints."""

import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "training.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_training_doc_block_runs(code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(DOC), "exec"), {"__name__": "__doc__"})
    out = capsys.readouterr().out
    assert "holds a previous run" in out and out.rstrip().endswith("6")


def test_training_doc_quotes_the_real_refusal(tmp_path, monkeypatch, capsys):
    from fourbit.cli import main

    monkeypatch.chdir(tmp_path)
    argv = ["train", "--recipe", "nvfp4", "--preset", "tiny", "--steps", "1", "--batch-size", "2", "--no-progress"]
    (tmp_path / "runs" / "nvfp4-tiny-seed0").mkdir(parents=True)
    for name in ("run.json", "metrics.jsonl", "ckpt.pt"):
        (tmp_path / "runs" / "nvfp4-tiny-seed0" / name).write_text("")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err in DOC.read_text()
