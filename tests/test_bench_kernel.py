"""``deepmemory bench kernel`` on a CPU: the smoke run (Triton kernels under the interpreter), its
one-line argument errors, and how a failed case becomes a row."""

import os
import subprocess
import sys

import pytest
import torch

from deepmemory.bench.kernel import _why, default_impls
from deepmemory.cli import main

IMPLS = ["chunk-linear", "triton-linear", "sdpa", "chunk-mlp", "triton-mlp"]
SMOKE = [
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--seq",
    "64",
    "--batch",
    "1",
    "--heads",
    "2",
    "--head-dim",
    "16",
    "--impl",
    *IMPLS,
    "--repeat",
    "1",
]


def _bench(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1")  # the kernels on CPU tensors
    return subprocess.run(
        [sys.executable, "-m", "deepmemory", "bench", "kernel", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


@pytest.mark.kernels
def test_smoke_run_prints_every_row():
    pytest.importorskip("triton")
    out = _bench(*SMOKE)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["T", "impl"])
    rows = {ln.split()[1]: ln.split() for ln in lines[head + 2 :] if ln.strip()}
    assert list(rows) == IMPLS
    for cells in rows.values():
        assert cells[0] == "64"
        assert cells[2].isdigit(), cells  # every case measured, the Triton kernels under the interpreter
    assert "TFLOP/s" in lines[head] and "x chunk" in lines[head]
    assert "cpu" in out.stdout and "float32" in out.stdout and "B=1 H=2 d=16" in out.stdout


@pytest.mark.slow
def test_bad_argument_exits_2_with_one_line():
    out = _bench("--seq", "64", "0")
    assert out.returncode == 2 and out.stdout == ""
    assert (
        out.stderr.strip()
        == "deepmemory bench kernel: error: argument --seq: must be >= 1; got 0 (see deepmemory bench kernel --help)"
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--head-dim", "0"], "argument --head-dim: must be >= 1; got 0"),
        (["--repeat", "0"], "argument --repeat: must be >= 1; got 0"),
        (["--device", "tpu"], "--device must be cpu, cuda or cuda:N; got 'tpu'"),
        (["--device", "meta"], "--device must be cpu or cuda; got 'meta'"),
    ]
    + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA device is available")]),
)
def test_bad_arguments(args, message, capsys):
    try:
        code = main(["bench", "kernel", *args])
    except SystemExit as exit_:  # (the parser refuses a count below 1 itself)
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("deepmemory bench kernel: error: ") and message in err


def test_failed_case_reasons():
    def failed(stderr):
        return RuntimeError(f"benchmark case {{}} failed:\n{stderr}")

    assert (
        _why(failed("Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB"))
        == "out of memory"
    )
    assert _why(failed("Traceback ...\nValueError: unsupported")) == "ValueError: unsupported"
    assert _why(failed("")) == "the process died without a message"
    assert len(_why(failed("x" * 500))) == 120


def test_default_impls(monkeypatch):
    assert default_impls("cuda") == [
        "triton-linear",
        "chunk-linear",
        "fla-gated-delta",
        "sdpa",
        "triton-mlp",
        "chunk-mlp",
    ]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert default_impls("cpu") == ["chunk-linear", "sdpa", "chunk-mlp"]
