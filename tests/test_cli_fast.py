"""The command line starts fast: `deepmemory --help`, `--version` and `deepmemory models` import
neither torch nor transformers, and the stored table of `deepmemory models` is the presets' count."""

import subprocess
import sys

import pytest

from deepmemory import __version__
from deepmemory.cli import main

PROBE = """
import sys
from deepmemory.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "transformers", "numpy", "matplotlib") if m in sys.modules)
print("HEAVY", heavy)
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        ["models"],
        ["models", "atlas", "--sizes", "tiny"],
        ["train", "--help"],
        ["generate", "--help"],
        ["export", "--help"],
        ["eval", "--help"],
    ],
)
def test_no_heavy_imports(argv):
    proc = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:]


def test_version_everywhere(capsys):
    for argv in (
        ["--version"],
        ["models", "--version"],
        ["train", "--version"],
        ["generate", "--version"],
        ["export", "--version"],
        ["eval", "--version"],
        ["bench", "--version"],
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
        assert capsys.readouterr().out.strip() == f"deepmemory {__version__}", argv


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("models", "train", "generate", "export", "eval", "bench"):
        assert name in out


@pytest.mark.slow
def test_models_table_is_the_presets_count():
    from deepmemory.cli import models
    from deepmemory.models import list_presets, list_sizes

    assert models.SIZES == tuple(list_sizes())
    assert tuple(models.PRESETS) == tuple(list_presets())
    assert models.recount() == models.PRESETS, "the presets changed: `python -m deepmemory.cli.models --recount`"


def _parsers(parser, path=()):
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def test_every_flag_has_help_text():
    import argparse

    from deepmemory.cli import build_parser

    missing = [
        f"{' '.join(path)} {action.option_strings[0]}"
        for path, parser in _parsers(build_parser())
        for action in parser._actions
        if action.option_strings
        and not isinstance(action, (argparse._HelpAction,))
        and (not action.help)
        and action.help is not argparse.SUPPRESS
    ]
    assert not missing, missing


def test_bench_defaults_are_polite():
    from deepmemory.cli import build_parser

    parser = build_parser()
    for mode in ("op", "mixer", "kernel", "model", "decode", "write"):
        args = parser.parse_args(["bench", mode])
        assert args.threads == 1, mode  # one thread by default on a CPU
        assert getattr(args, "plot", None) is None, mode  # no PNG unless asked for


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    from deepmemory.cli import EXIT_INTERRUPTED, main, models

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "run", interrupted)
    assert main(["models"]) == EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "deepmemory models: interrupted\n"


def test_default_outputs_are_ignored_by_git():
    """What the README's and docs' commands write by default (run directories, eval results, export
    copies) is ignored by .gitignore; the package's own eval/ folder is not."""
    import os
    import shutil

    from deepmemory.cli.eval import default_out

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if shutil.which("git") is None or not os.path.exists(os.path.join(root, ".git")):
        pytest.skip("needs git and a git checkout")
    outputs = ["runs/titans-mac-tiny-20260101-120000/run.json", "exports/titans-mac-stdlib/config.json"]
    outputs.append(os.path.join(default_out("runs/mqar-gdn", ["mqar"]), "results.json"))
    sources = ["src/deepmemory/eval/run.py", "src/deepmemory/cli/export.py"]

    def ignored(path):
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=root).returncode == 0

    assert [p for p in outputs if not ignored(p)] == []
    assert [p for p in sources if ignored(p)] == []
