"""The README's set-up line and test command are exactly what CI runs (``.ci/run``), less the pins
and pip's ``-q``, so that a green CI cannot hide a red README again."""

import os
import re
import shlex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def _readme_setup() -> list[str]:
    """The commands of the first bash block after the README's "Set up and run" heading."""
    text = _read("README.md")
    section = text[text.index("## Set up and run") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the README's 'Set up and run' section has no bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def _normal(command: str) -> list[str]:
    """A command's words, with what CI adds for itself taken out: ``python -m``, pip's ``-q``, the
    constraints file and pytest's ``-q``/``--durations``."""
    words, out = shlex.split(command), []
    skip = False
    for i, w in enumerate(words):
        if skip:
            skip = False
        elif w == "python" and words[i + 1 : i + 2] == ["-m"]:
            skip = True
        elif w == "-c" and i > 0 and words[i + 1 : i + 2] == ["constraints/ci.txt"]:
            skip = True
        elif w == "-q" or w.startswith("--durations"):
            continue
        else:
            out.append(w)
    return out


def test_ci_runs_the_readmes_install_line_and_test_command():
    readme = _readme_setup()
    install = next(c for c in readme if c.startswith("pip install"))
    ci = [line.strip() for line in _read(".ci/run").splitlines() if not line.lstrip().startswith("#")]
    ci_install = next(c for c in ci if "pip install" in c and "kernels" not in c)
    assert _normal(ci_install) == _normal(install), (ci_install, install)
    assert "-c constraints/ci.txt" in ci_install  # CI is pinned
    tests = [c for c in ci if "-m pytest" in c and "-m kernels" not in c]
    assert len(tests) == 1 and _normal(tests[0]) == ["pytest"], tests
    assert "pytest" in _read("README.md").split("Run the tests:", 1)[1].split("```", 2)[1].split()


def test_ci_runs_the_style_gate_and_the_kernels_extra():
    ci = _read(".ci/run")
    for command in ("ruff check .", "ruff format --check .", "mypy", "-m kernels", '".[dev,kernels]"'):
        assert command in ci, command
    hooks = _read(".pre-commit-config.yaml")
    for entry in ("ruff check", "ruff format", "mypy"):
        assert f"entry: {entry}" in hooks, entry
