"""Every ```python block in README.md and the topic pages under docs/ runs as written (docs/export.md and
docs/training.md have their own tests, which also check what the blocks print)."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted(
    p for p in (ROOT / "docs").glob("*.md") if p.name not in ("export.md", "training.md")
)
BLOCKS = [(page, code) for page in PAGES for code in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)]


def test_readme_has_examples():
    assert any(page.name == "README.md" for page, _ in BLOCKS)


@pytest.mark.parametrize("page, code", BLOCKS, ids=[f"{p.name}-{i}" for i, (p, _) in enumerate(BLOCKS)])
def test_doc_block_runs(page, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(page), "exec"), {"__name__": "__readme__"})
