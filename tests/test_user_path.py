"""The whole user path on the installed package: the `deepmemory` command trains a few steps on its
embedded default corpus, `deepmemory generate` samples from that run directory, and the run's model
generates the same tokens in Python with and without the cache."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # two CLI processes


def _command() -> str:
    """The console script that `pip install` put beside this interpreter (or on PATH)."""
    beside = os.path.join(os.path.dirname(sys.executable), "deepmemory")
    found = beside if os.path.isfile(beside) else shutil.which("deepmemory")
    if not found:
        pytest.fail("the `deepmemory` command is not installed: run `pip install -e .` first")
    return found


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([_command(), *argv], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("user") / "run")
    proc = _run(
        "train",
        "--steps",
        "4",
        "--eval-every",
        "4",
        "--eval-tokens",
        "512",
        "--batch-size",
        "2",
        "--seq-len",
        "64",
        "--threads",
        "1",
        "--out",
        out,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "run directory:" in proc.stdout
    return out


def test_train_then_generate_from_the_command_line(run_dir):
    proc = _run("generate", "--checkpoint", run_dir, "--prompt", "def ", "--max-new-tokens", "24", "--seed", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("def ") and len(proc.stdout) > len("def \n")
    again = _run("generate", "--checkpoint", run_dir, "--prompt", "def ", "--max-new-tokens", "24", "--seed", "1")
    assert again.stdout == proc.stdout  # seeded sampling is reproducible


@pytest.mark.parametrize("sample", [False, True])
def test_the_run_generates_the_same_with_and_without_cache(run_dir, sample):
    from deepmemory.cli.generate import load_run

    model, tokenizer = load_run(run_dir)
    ids = tokenizer.encode("import os\ndef ")[None]
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        with torch.no_grad():
            outs.append(
                model.generate(
                    ids,
                    max_new_tokens=16,
                    do_sample=sample,
                    top_k=20 if sample else None,
                    use_cache=use_cache,
                    pad_token_id=tokenizer.eos_id,
                )
            )
    assert outs[0].shape == (1, ids.shape[1] + 16)
    assert torch.equal(outs[0], outs[1])
