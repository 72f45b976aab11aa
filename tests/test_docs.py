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
    assert {
        "docs/models/titans.md",
        "docs/models/atlas.md",
        "docs/models/deep-transformer.md",
        "docs/models/baselines.md",
    } <= names


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
            hint = (
                " (a listing that is not meant to run is fenced ``` or ```text)" if isinstance(err, SyntaxError) else ""
            )
            raise AssertionError(
                f"{page.relative_to(ROOT)} block at line {line} failed: {type(err).__name__}: {err}{hint}"
            ) from err


# ---- the project stands on its own: citations are the papers or docs/, links resolve ------------

SPEC = re.compile(r"\bSPEC\b")  # a document outside the repository: cite the papers or docs/ instead
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^[ \t]*\[(?!\^)[^\]]+\]:[ \t]*<?([^\s>]+)>?", re.M)
EXTERNAL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # http:, https:, mailto:, ...


def project_text_files():
    """README.md, every page under docs/ and every source file or page under src/ (build metadata
    such as ``*.egg-info`` is not the project's text)."""
    src = [p for ext in ("*.py", "*.md") for p in (ROOT / "src").rglob(ext)]
    files = [ROOT / "README.md", *DOCS.rglob("*.md"), *src]
    return sorted(p for p in files if not any(part.endswith(".egg-info") for part in p.parts))


def relative_links(text: str):
    """``(line, target)`` of every relative Markdown link outside code (fenced blocks, code spans);
    anchors stay on the target, links to a place on the same page and URLs are left out."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    text = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), text)
    found = sorted([*INLINE_LINK.finditer(text), *REFERENCE_LINK.finditer(text)], key=lambda m: m.start())
    return [
        (text[: m.start()].count("\n") + 1, m.group(1))
        for m in found
        if not m.group(1).startswith("#") and not EXTERNAL.match(m.group(1))
    ]


def test_link_extraction():
    page = (
        '[a](ops.md) [b](ops.md#the-rule) ![c](img/x.png "plot") [d](https://x.org/y.md) [e](#here)\n'
        "`[f](code.md)` [g](<angle.md>)\n```\n[h](fenced.md)\n```\n[i]: ../ref.md\n"
    )
    assert relative_links(page) == [
        (1, "ops.md"),
        (1, "ops.md#the-rule"),
        (1, "img/x.png"),
        (2, "angle.md"),
        (6, "../ref.md"),
    ]


def test_no_citation_of_an_outside_spec():
    """Code and docs cite the papers ("Titans eq. 13–14", "ATLAS App. E") or the project's docs/,
    never a "SPEC" document that is not part of the repository."""
    bad = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in project_text_files()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if SPEC.search(line)
    ]
    assert not bad, "cites SPEC (cite the paper's equation/section or a docs/ page):\n" + "\n".join(bad)


def test_relative_links_resolve():
    """Every relative Markdown link of a page (README.md, docs/, src/) names a file that exists."""
    bad = []
    for path in project_text_files():
        if path.suffix != ".md":
            continue  # Python's ``a[i](x)`` reads like a link; docstrings name files in plain text
        for n, target in relative_links(path.read_text()):
            file = target.split("#", 1)[0].split("?", 1)[0]
            resolved = ROOT / file.lstrip("/") if file.startswith("/") else path.parent / file
            if not resolved.exists():
                bad.append(f"{path.relative_to(ROOT)}:{n}: {target}")
    assert not bad, "links to files that do not exist:\n" + "\n".join(bad)
