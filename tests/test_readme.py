"""The README's set-up line and test command are exactly what CI runs (``.ci/run``), less the pins
and pip's ``-q``, so that a green CI cannot hide a red README again."""

import os
import re
import shlex

import pytest

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


def _documented_commands():
    """``(file, command words)`` of every ``deepmemory ...`` command in the bash blocks of the
    README and docs/ (continuation lines joined, pipes and ``&&`` split, comments dropped)."""
    docs = ["README.md"] + [os.path.join("docs", n) for n in sorted(os.listdir(os.path.join(ROOT, "docs")))]
    docs += [os.path.join("docs", "models", n) for n in sorted(os.listdir(os.path.join(ROOT, "docs", "models")))]
    for name in docs:
        if not name.endswith(".md"):
            continue
        for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", _read(name), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                lexer = shlex.shlex(line.strip().removeprefix("$ "), posix=True, punctuation_chars=True)
                lexer.whitespace_split = True
                words: list[str] = []
                for word in [*lexer, ";"]:
                    if word in ("&&", "||", "|", ";", "&"):
                        if words[:1] == ["deepmemory"]:
                            yield name, words[1:]
                        words = []
                    else:
                        words.append(word)


def test_every_documented_command_parses():
    """Each ``deepmemory`` command of the README and docs is accepted by today's parser (its options
    exist and take the values shown): a renamed or removed option fails here, not for a reader."""
    import contextlib
    import io

    from deepmemory.cli import _command, build_parser

    found = 0
    for name, argv in _documented_commands():
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                build_parser(only=_command(argv)).parse_args(argv)
        except SystemExit as exit:
            assert exit.code == 0, f"{name}: deepmemory {' '.join(argv)}: {err.getvalue().strip()}"
        found += 1
    assert found >= 20, found


@pytest.mark.slow
def test_the_readmes_commands_run_in_order(tmp_path, monkeypatch, capsys):
    """Every ``deepmemory`` command of the README's bash blocks, in the README's order and from one
    working directory (so that each finds what the earlier ones wrote: ``runs/stdlib-mac``,
    ``runs/mqar-gdn``...), as pasted except that a training run takes 2 steps: each exits 0."""
    import io
    import sys

    from deepmemory.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ran = []
    for name, argv in _documented_commands():
        if name != "README.md":
            continue
        argv = list(argv)
        if argv[0] == "train":
            if "--steps" in argv:
                argv[argv.index("--steps") + 1] = "2"
            else:
                argv += ["--steps", "2"]
            argv += ["--no-progress"]
        if "--prompt-file" in argv and argv[argv.index("--prompt-file") + 1] == "-":  # printf '...' | deepmemory ...
            monkeypatch.setattr(sys, "stdin", io.StringIO("import os\nfrom typing import\n"))
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 0, f"deepmemory {' '.join(argv)}: exit {code}\n{err[-2000:]}"
        ran.append(argv[0])
    assert ran.count("train") == 3 and {"generate", "export", "eval"} <= set(ran), ran
