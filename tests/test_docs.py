"""Every ```python block of README.md and docs/**/*.md runs, in order, one namespace per page
(examples cannot rot)."""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def blocks(page: Path):
    """``(line, code)`` of every python block of a page."""
    text = page.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in BLOCK.finditer(text)]


PAGES = sorted(p for p in [ROOT / "README.md", *DOCS.rglob("*.md")] if blocks(p))


def test_the_pages_with_examples_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/ops.md"} <= names
    assert {f"docs/{n}" for n in ("layers.md", "models/titans.md")} <= names
    assert {"docs/models/titans.md", "docs/models/atlas.md", "docs/models/deep-transformer.md", "docs/models/baselines.md"} <= names


def test_block_extraction():
    page = "text\n```python\nx = 1\n```\n\n```\nnot python\n```\n```python\ny = x + 1\n```\n"
    found = [(m.group(1)) for m in BLOCK.finditer(page)]
    assert found == ["x = 1\n", "y = x + 1\n"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that save files write them here
    torch.manual_seed(0)
    namespace = {"__name__": "__docs__"}
    for line, code in blocks(page):
        try:
            exec(compile(code, f"{page.name}:{line}", "exec"), namespace)
        except Exception as err:
            hint = " (a listing that is not meant to run is fenced ``` or ```text)" if isinstance(err, SyntaxError) else ""
            raise AssertionError(
                f"{page.relative_to(ROOT)} block at line {line} failed: {type(err).__name__}: {err}{hint}"
            ) from err
