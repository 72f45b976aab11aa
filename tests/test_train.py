"""`deepmemory train` / `generate`: run directory, exact resume (also after SIGKILL), errors."""

import hashlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from deepmemory.cli import main
from deepmemory.train import TrainConfig, lr_at

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "model_overrides": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import random

    root = tmp_path_factory.mktemp("corpus")
    r = random.Random(0)
    words = "the memory learns to store keys and values while it reads a long sequence".split()
    for i in range(16):
        (root / f"doc{i:02d}.txt").write_text(" ".join(r.choice(words) for _ in range(120)) + "\n")
    cfg = root.parent / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    return {"data": str(root), "config": str(cfg)}


def args(corpus, *extra):
    return [
        "train",
        "--model",
        "transformer",
        "--config",
        corpus["config"],
        "--data",
        corpus["data"],
        "--val-fraction",
        "0.25",
        "--seq-len",
        "16",
        "--batch-size",
        "4",
        "--eval-every",
        "10",
        "--eval-tokens",
        "256",
        "--lr",
        "1e-2",
        *extra,
    ]


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_val(run):
    return [r for r in metrics(run) if "val_loss" in r][-1]["val_loss"]


def one_error_line(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"deepmemory {argv[0]}: error: "), err
    assert match in lines[0], lines[0]
    return lines[0]


def tree(path):
    """``{relative path: sha256}`` of every file below ``path``."""
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def run_a(corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "A")
    assert main(args(corpus, "--steps", "40", "--out", out)) == 0
    return out


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, steps=50, warmup_steps=5, lr_decay_steps=40, min_lr_ratio=0.1)
    got = [lr_at(s, cfg) for s in range(50)]
    for s, lr in enumerate(got):
        if s < 5:
            want = (s + 1) / 6
        elif s < 40:
            want = 0.1 + 0.45 * (1 + math.cos(math.pi * (s - 5) / 35))
        else:
            want = 0.1
        assert lr == pytest.approx(want, abs=1e-12)
    assert max(got) <= 1.0 and got[5] == pytest.approx(1.0)


def test_run_directory(run_a):
    names = set(os.listdir(run_a))
    assert {"config.json", "metrics.jsonl", "model.safetensors", "loss.png", "checkpoints"} <= names
    assert {"run.json", "generation_config.json"} <= names  # the run record; config.json is the Hugging Face config
    assert json.load(open(os.path.join(run_a, "config.json")))["model_type"] == "deepmemory"
    assert sorted(os.listdir(os.path.join(run_a, "checkpoints"))) == ["step-00000030", "step-00000040"]  # keep 2
    for rel in tree(run_a):  # safetensors, JSON and the plot: nothing pickled
        assert rel.endswith((".json", ".jsonl", ".safetensors", ".png")), rel
    config = json.load(open(os.path.join(run_a, "run.json")))
    assert config["format"] == "deepmemory-run" and config["train"]["steps"] == 40
    assert config["model"]["config"]["hidden_size"] == 32 and config["tokenizer"]["kind"] == "bytes"
    rows = metrics(run_a)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 41))
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 10, 20, 30, 40]
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 1.0  # it learns
    assert val[-1]["val_bpb"] == pytest.approx(
        val[-1]["val_loss"] / math.log(2) * config["data"]["val_tokens"] / config["data"]["val_bytes"]
    )


def test_resume_is_exact(corpus, run_a, tmp_path):
    b = str(tmp_path / "B")
    assert main(args(corpus, "--steps", "20", "--lr-decay-steps", "40", "--out", b)) == 0
    assert main(["train", "--resume", b, "--steps", "40"]) == 0
    # bitwise on CPU with the same thread count (docs/training.md, "Determinism")
    assert final_val(b) == final_val(run_a)
    la = [r["loss"] for r in metrics(run_a) if "loss" in r]
    lb = [r["loss"] for r in metrics(b) if "loss" in r]
    assert lb == la
    assert (
        open(os.path.join(b, "model.safetensors"), "rb").read()
        == open(os.path.join(run_a, "model.safetensors"), "rb").read()
    )


def test_grad_checkpointing_changes_nothing(corpus, tmp_path):
    plain, ckpt = str(tmp_path / "plain"), str(tmp_path / "ckpt")
    assert main(args(corpus, "--steps", "3", "--out", plain)) == 0
    assert main(args(corpus, "--steps", "3", "--grad-checkpointing", "--out", ckpt)) == 0
    # the same rows (training steps and evaluations), with the same losses
    rows = lambda run: [(r["step"], "loss" in r) for r in metrics(run)]  # noqa: E731
    assert rows(ckpt) == rows(plain)
    losses = lambda run: [r["loss"] for r in metrics(run) if "loss" in r]  # noqa: E731
    assert losses(ckpt) == pytest.approx(losses(plain), rel=1e-6)
    assert "model.layers.0.mlp.down.weight" in load_file(os.path.join(ckpt, "model.safetensors"))  # plain names


def test_grad_accum_is_the_same_step(corpus, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert main(args(corpus, "--steps", "4", "--out", one)) == 0
    assert main(args(corpus, "--steps", "4", "--grad-accum", "2", "--out", two)) == 0
    assert final_val(two) == pytest.approx(final_val(one), rel=1e-5)


KILLER = """
import os, signal, sys
from deepmemory import files

replace, seen = files._replace, []

def dying_replace(tmp, path):
    seen.append(path)
    kill_at = os.environ["KILL_AT"]
    if path.endswith(kill_at) and len([p for p in seen if p.endswith(kill_at)]) == int(os.environ["KILL_NTH"]):
        with open(tmp, "r+b") as f:  # half a file written, then the process is gone
            f.truncate(os.path.getsize(tmp) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    replace(tmp, path)

files._replace = dying_replace
from deepmemory.cli import main
sys.exit(main(sys.argv[1:]))
"""


def killed_then_resumed(corpus, run_a, tmp_path, kill_at, nth, resumes_from):
    b = str(tmp_path / "B")
    env = dict(
        os.environ, KILL_AT=kill_at, KILL_NTH=str(nth), OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(REPO, "src")
    )
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, *args(corpus, "--steps", "40", "--keep-checkpoints", "5", "--out", b)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert os.path.isfile(os.path.join(b, "config.json"))  # the run directory survives
    assert [s for s in sorted(os.listdir(os.path.join(b, "checkpoints"))) if not s.startswith(".")][
        -1
    ] == f"step-{resumes_from:08d}"
    assert main(["train", "--resume", b]) == 0
    assert final_val(b) == pytest.approx(final_val(run_a), rel=1e-6)
    assert not [s for s in os.listdir(os.path.join(b, "checkpoints")) if s.startswith(".")]
    assert not [s for s in os.listdir(b) if s.startswith(".")]
    assert [r["step"] for r in metrics(b) if "loss" in r] == list(range(1, 41))


@pytest.mark.slow
def test_sigkill_inside_a_checkpoint_then_resume(corpus, run_a, tmp_path):
    killed_then_resumed(corpus, run_a, tmp_path, os.path.join(".tmp-step-00000020", "optimizer.safetensors"), 1, 10)


@pytest.mark.long
def test_sigkill_refreshing_the_model_file_then_resume(corpus, run_a, tmp_path):
    # the second refresh of RUN/model.safetensors follows the complete step-20 checkpoint
    killed_then_resumed(corpus, run_a, tmp_path, os.path.join("B", "model.safetensors"), 2, 20)


def test_generate(run_a, capsys):
    from deepmemory.cli.generate import load_run

    argv = ["generate", "--checkpoint", run_a, "--prompt", "the memory", "--max-new-tokens", "12", "--seed", "3"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first and first.startswith("the memory")
    # greedy decoding with the recurrent cache equals argmax over full forward passes
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                os.path.join(run_a, "checkpoints", "step-00000040"),
                "--prompt",
                "the memory",
                "--max-new-tokens",
                "12",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    greedy = capsys.readouterr().out.rstrip("\n")
    model, tok = load_run(run_a)
    ids = tok.encode("the memory")[None]
    with torch.no_grad():
        for _ in range(12):
            nxt = model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
    assert greedy == tok.decode(ids[0])


def test_hugging_face_tokenizer_run(corpus, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "the memory learns to store keys and values while it reads a long sequence".split()
    tok = Tokenizer(
        models.WordLevel({"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    out = str(tmp_path / "H")
    assert main(args(corpus, "--steps", "2", "--tokenizer", str(tmp_path / "tokenizer.json"), "--out", out)) == 0
    config = json.load(open(os.path.join(out, "run.json")))
    fingerprint = hashlib.sha256(open(tmp_path / "tokenizer.json", "rb").read()).hexdigest()
    assert config["tokenizer"] == {
        "kind": "hf",
        "vocab_size": 16,
        "eos_id": 1,
        "file": "tokenizer.json",
        "sha256": fingerprint,
    }
    assert config["model"]["config"]["vocab_size"] == 16 and os.path.isfile(os.path.join(out, "tokenizer.json"))
    # the baseline is the unigram entropy of the tokenizer's tokens, in bits per byte: not the byte entropy
    printed = capsys.readouterr().out
    data = config["data"]
    assert "byte entropy" not in printed
    assert f"unigram token entropy {data['token_entropy_bpb']:.3f} bits/byte" in printed.splitlines()[0]
    assert f"vs unigram token entropy {data['token_entropy_bpb']:.3f} bits/byte" in printed
    from collections import Counter

    from deepmemory.data import build_corpus, load_tokenizer

    train = build_corpus([corpus["data"]], load_tokenizer(str(tmp_path / "tokenizer.json")), 0.25).train.tolist()
    entropy = -sum(n / len(train) * math.log2(n / len(train)) for n in Counter(train).values())  # bits per token
    assert data["token_entropy_bpb"] == pytest.approx(entropy * len(train) / data["train_bytes"], rel=1e-9)
    assert main(["export", out, str(tmp_path / "exported")]) == 0  # the model card names the same baseline
    card = (tmp_path / "exported" / "README.md").read_text()
    assert f"(unigram token entropy {data['token_entropy_bpb']:.3f})" in card and "byte entropy" not in card
    capsys.readouterr()
    assert main(["generate", "--checkpoint", out, "--prompt", "the memory", "--max-new-tokens", "3"]) == 0
    assert set(capsys.readouterr().out.split()) <= set(words) | {"[UNK]"}


def test_data_line_says_how_validation_was_split(corpus, run_a, tmp_path, capsys):
    # 16 documents of about 1/16 of the tokens each: none fits 1-4% of them, so the stream is cut
    out = str(tmp_path / "S")
    assert main(args(corpus, "--steps", "1", "--val-fraction", "0.02", "--out", out)) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(
        f"data: {corpus['data']}: 16 documents, validation the last 2% of the token stream (no set "
        "of whole documents holds 1-4% of the tokens), "
    ), line
    assert line.endswith(" bits/byte") and "unigram byte entropy" in line
    assert json.load(open(os.path.join(out, "run.json")))["data"]["split"] == "stream"
    # a quarter: whole documents, counted on each side
    data = json.load(open(os.path.join(run_a, "run.json")))["data"]
    assert data["split"] == "documents" and data["val_documents"] > 0 and "token_entropy_bpb" not in data


def test_config_file_and_flags(corpus, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "model: transformer\nseq-len: 8\nsteps: 3\nmodel_overrides:\n  hidden_size: 16\n  num_hidden_layers: 1\n"
        f"data: {corpus['data']}\nval_fraction: 0.25\nbatch_size: 2\neval_tokens: 64\n"
    )
    out = str(tmp_path / "C")
    assert main(["train", "--config", str(cfg), "--steps", "2", "--out", out]) == 0
    stored = json.load(open(os.path.join(out, "run.json")))["train"]
    assert stored["seq_len"] == 8 and stored["steps"] == 2 and stored["model_overrides"]["hidden_size"] == 16


def test_user_errors(corpus, run_a, tmp_path, capsys):
    one_error_line(capsys, ["train", "--data", str(tmp_path / "missing")], "does not exist")
    (tmp_path / "empty").mkdir()
    one_error_line(capsys, ["train", "--data", str(tmp_path / "empty")], "holds no text")
    one_error_line(
        capsys, ["train", "--model", "no-such-preset", "--data", corpus["data"]], "unknown preset 'no-such-preset'"
    )
    one_error_line(capsys, args(corpus, "--batch-size", "3", "--grad-accum", "2"), "not divisible")
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("learning_rate: 1\n")
    one_error_line(capsys, ["train", "--config", str(bad_cfg)], "unknown settings learning_rate")

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    one_error_line(capsys, ["train", "--resume", str(foreign)], "not a deepmemory run directory")
    (foreign / "config.json").write_text('{"model_type": "llama"}')
    one_error_line(capsys, ["train", "--resume", str(foreign)], "was not written by `deepmemory train`")
    one_error_line(
        capsys, ["generate", "--checkpoint", str(foreign), "--prompt", "x"], "was not written by `deepmemory train`"
    )

    before = tree(run_a)
    one_error_line(capsys, args(corpus, "--steps", "2", "--out", run_a), "already exists")
    one_error_line(capsys, ["train", "--resume", run_a, "--seq-len", "32"], "--seq-len 32 differs from the run's 16")
    one_error_line(capsys, ["train", "--resume", run_a, "--steps", "40"], "at step 40 already")
    one_error_line(capsys, args(corpus, "--steps", "2", "--out", str(foreign), "--overwrite"), "refuses to replace")
    assert tree(run_a) == before and (foreign / "notes.txt").read_text() == "mine"

    broken = str(tmp_path / "broken")
    shutil.copytree(run_a, broken)
    with open(os.path.join(broken, "checkpoints", "step-00000040", "model.safetensors"), "wb") as f:
        f.write(b"\x00garbage")
    one_error_line(capsys, ["train", "--resume", broken, "--steps", "50"], "cannot read")
    one_error_line(
        capsys,
        ["generate", "--checkpoint", os.path.join(broken, "checkpoints", "step-00000040"), "--prompt", "x"],
        "cannot read",
    )


def test_overwrite_replaces_a_run(corpus, tmp_path):
    out = str(tmp_path / "R")
    assert main(args(corpus, "--steps", "2", "--out", out)) == 0
    assert main(args(corpus, "--steps", "3", "--out", out, "--overwrite")) == 0
    assert json.load(open(os.path.join(out, "run.json")))["train"]["steps"] == 3
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


class Terminal(io.StringIO):
    """A stderr that says it is a terminal (where tqdm draws its bar)."""

    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal(corpus, tmp_path, monkeypatch, capsys):
    # piped (capsys is not a terminal): the log lines, no bar and no carriage return
    assert main(args(corpus, "--steps", "3", "--log-every", "1", "--out", str(tmp_path / "piped"))) == 0
    captured = capsys.readouterr()
    assert "step      3 | loss" in captured.out and "\r" not in captured.out + captured.err
    # a terminal: the bar, redrawn with carriage returns
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(args(corpus, "--steps", "3", "--out", str(tmp_path / "terminal"))) == 0
    assert "\r" in terminal.getvalue() and "3/3" in terminal.getvalue()
    # --no-progress: no bar even on a terminal; the log lines stay
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    capsys.readouterr()
    assert main(args(corpus, "--steps", "3", "--log-every", "1", "--no-progress", "--out", str(tmp_path / "np"))) == 0
    out = capsys.readouterr().out
    assert "\r" not in terminal.getvalue() + out and "step      3 | loss" in out
    assert "progress" not in json.load(open(tmp_path / "np" / "run.json"))["train"]  # not a training setting


@pytest.mark.slow
def test_exit_code_of_the_command():
    proc = subprocess.run(
        [sys.executable, "-m", "deepmemory", "train", "--data", "/nonexistent/corpus"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(REPO, "src")),
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["deepmemory train: error: --data: /nonexistent/corpus does not exist"]


@pytest.mark.long
def test_default_run_learns_within_ten_minutes(tmp_path):
    import time

    out = str(tmp_path / "default")
    start = time.time()
    assert main(["train", "--out", out]) == 0
    assert time.time() - start < 600
    config = json.load(open(os.path.join(out, "run.json")))
    assert config["model"]["preset"] == "titans-mac" and config["data"]["source"].endswith("standard library")
    assert [r for r in metrics(out) if "val_bpb" in r][-1]["val_bpb"] < config["data"]["byte_entropy"] - 1.5
