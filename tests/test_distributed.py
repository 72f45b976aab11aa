"""`torchrun --nproc-per-node 2 -m deepmemory.train` on CPU (gloo) equals one process."""

import json
import os
import subprocess
import sys

import pytest
import torch

from deepmemory.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # torchrun in subprocesses

TINY = {
    "model_overrides": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import random

    root = tmp_path_factory.mktemp("dist")
    data = root / "data"
    data.mkdir()
    r = random.Random(1)
    words = "one process or two processes read the same global batch".split()
    for i in range(12):
        (data / f"d{i}.txt").write_text(" ".join(r.choice(words) for _ in range(150)) + "\n")
    (root / "tiny.json").write_text(json.dumps(TINY))
    common = [
        "--model",
        "transformer",
        "--config",
        str(root / "tiny.json"),
        "--data",
        str(data),
        "--val-fraction",
        "0.3",
        "--seq-len",
        "16",
        "--batch-size",
        "8",
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--eval-tokens",
        "256",
        "--lr",
        "1e-2",
    ]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", *common, "--out", str(root / "single")]) == 0
    finally:
        torch.set_num_threads(before)
    return root, common


def rows(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def torchrun(args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(REPO, "src"))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "deepmemory.train",
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def check_same(single, multi):
    a, b = rows(single), rows(multi)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        key = "loss" if "loss" in ra else "val_loss"
        assert rb[key] == pytest.approx(ra[key], abs=1e-5), (ra, rb)
    from safetensors.torch import load_file

    wa, wb = load_file(os.path.join(single, "model.safetensors")), load_file(os.path.join(multi, "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


def test_ddp_two_processes_match_one(setup):
    root, common = setup
    out = root / "ddp"
    # 2 ranks x 2 micro-steps x 2 sequences = the single process's 8 sequences per step
    proc = torchrun([*common, "--grad-accum", "2", "--out", str(out)])
    check_same(root / "single", out)
    assert proc.stderr.count("run directory:") + proc.stdout.count("run directory:") == 1  # rank 0 alone reports
    assert "DDP" in proc.stderr + proc.stdout


@pytest.mark.long
def test_fsdp_two_processes_match_one_and_resume(setup):
    root, common = setup
    out = root / "fsdp"
    proc = torchrun([*common, "--fsdp", "--out", str(out)])
    assert "FSDP" in proc.stderr + proc.stdout
    check_same(root / "single", out)
    # checkpoints hold full (unsharded) tensors: a single process continues the sharded run
    assert main(["train", "--resume", str(out), "--steps", "8"]) == 0
