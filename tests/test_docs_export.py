"""Every ```python block in docs/export.md runs as written."""

import pathlib
import re

import pytest

pytest.importorskip("transformers")

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "export.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_doc_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_doc_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(DOC), "exec"), {"__name__": "__doc_export__"})
