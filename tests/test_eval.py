"""`deepmemory train --task` and `deepmemory eval`: task batches as training data (answer-only loss,
exact resume, the same step for any micro-batch split, validation accuracy), streamed prompts equal
one pass, greedy answers, the three outputs, continuing an interrupted evaluation, one-line errors."""

import io
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from deepmemory.cli import main
from deepmemory.data.tasks import IGNORE_INDEX

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
MQAR = {"num_pairs": 4}


def settings(out, **extra):
    base = dict(
        model="transformer",
        model_overrides=TINY,
        task="mqar",
        task_settings=MQAR,
        seq_len=24,
        batch_size=4,
        steps=4,
        eval_every=2,
        eval_tokens=24 * 16,
        lr=1e-2,
        out=str(out),
    )
    return {**base, **extra}


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def one_error_line(capsys, argv, match):
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"deepmemory {argv[0]}: error: "), lines
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from deepmemory.train import train

    out = tmp_path_factory.mktemp("task") / "run"
    summary = train(settings(out), quiet=True)
    return str(out), summary


# ------------------------------------------------------------------ train --task
def test_task_run_directory(run):
    from deepmemory.train.export import load_run

    out, summary = run
    rows = metrics(out)
    vals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in vals] == [0, 2, 4]
    assert all(0 <= r["val_accuracy"] <= 1 and "val_bpb" not in r for r in vals)
    assert summary["val_accuracy"] == vals[-1]["val_accuracy"] and summary["task"] == "mqar"
    record = json.load(open(os.path.join(out, "run.json")))
    assert record["data"]["task"] == "mqar" and record["data"]["task_settings"] == MQAR
    assert record["train"]["task"] == "mqar"
    model, tokenizer, _ = load_run(out)  # generate / export read it as any run directory
    assert model.config.vocab_size >= 128 and tokenizer.vocab_size == 257
    assert os.path.isfile(os.path.join(out, "loss.png"))


def test_task_resume_is_exact(run, tmp_path):
    from deepmemory.train import train

    out, _ = run
    part = tmp_path / "part"
    train(settings(part, steps=2, lr_decay_steps=4), quiet=True)
    train({"steps": 4}, resume=str(part), quiet=True)
    whole = tmp_path / "whole"
    train(settings(whole, lr_decay_steps=4), quiet=True)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "tok_per_s"} for r in rows]

    assert strip(metrics(str(part))) == strip(metrics(str(whole)))
    a, b = load_file(os.path.join(part, "model.safetensors")), load_file(os.path.join(whole, "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_answer_loss_is_the_mean_over_answers_for_any_split(tmp_path):
    """One step with grad_accum 2 equals one step with grad_accum 1 (the loss is the mean over the
    answer tokens of the whole batch, not a mean of micro-batch means), and its reported loss is
    the cross entropy of the answers recomputed here from the batch."""
    from deepmemory.train.config import new_config
    from deepmemory.train.distributed import setup
    from deepmemory.train.trainer import Trainer

    def one_step(name, accum):
        cfg = new_config(settings(tmp_path / name, steps=1, grad_accum=accum, batch_size=4))
        trainer = Trainer(cfg, setup("cpu"), quiet=True)
        trainer.restore()
        ids, labels = trainer.sampler.next_batch(4)
        labels = labels.clone()
        labels[0, labels[0] != IGNORE_INDEX] = IGNORE_INDEX  # rows with unequal answer counts
        labels[1, (labels[1] != IGNORE_INDEX).nonzero()[0]] = IGNORE_INDEX
        with torch.no_grad():
            logits = trainer.model(input_ids=ids).logits
        want = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        row = trainer.train_step((ids, labels))
        trainer.close()
        return row["loss"], float(want), {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    loss1, want, w1 = one_step("a", 1)
    loss2, _, w2 = one_step("b", 2)
    assert loss1 == pytest.approx(want, rel=1e-5) and loss2 == pytest.approx(want, rel=1e-5)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)


def test_answer_matches_counts_whole_answers():
    from deepmemory.train.task_data import answer_matches

    labels = torch.full((2, 8), IGNORE_INDEX)
    labels[0, 1], labels[0, 3:5] = 5, torch.tensor([6, 7])  # two answers in row 0: [1], [3, 4]
    labels[1, 6:8] = torch.tensor([2, 3])  # one in row 1: [6, 7]
    logits = torch.zeros(2, 8, 10)
    for b, t in ((0, 1), (0, 3), (0, 4), (1, 6), (1, 7)):
        logits[b, t, labels[b, t]] = 1.0
    assert answer_matches(logits, labels) == (3, 3)
    logits[0, 4, 9] = 2.0  # the second token of row 0's second answer wrong
    assert answer_matches(logits, labels) == (2, 3)
    logits[1, 0, 0] = 5.0  # an unscored position changes nothing
    assert answer_matches(logits, labels) == (2, 3)


def test_train_task_errors(capsys, tmp_path):
    base = ["train", "--model", "transformer", "--task", "mqar", "--steps", "1", "--out", str(tmp_path / "x")]
    one_error_line(
        capsys, ["train", "--task", "no-such-task", "--steps", "1", "--out", str(tmp_path / "y")], "no-such-task"
    )
    one_error_line(capsys, base + ["--task-settings", "num_pairs=4", "--seq-len", "6"], "--seq-len 6")
    one_error_line(capsys, base + ["--task-settings", "nonsense=1"], "nonsense")
    one_error_line(capsys, base + ["--data", str(tmp_path)], "excludes --data")
    one_error_line(capsys, ["train", "--task-settings", "num_pairs=4", "--out", str(tmp_path / "z")], "needs --task")
    with pytest.raises(SystemExit) as exit_:  # argparse: not KEY=VALUE
        main(["train", "--task", "mqar", "--task-settings", "num_pairs"])
    assert exit_.value.code == 2 and "KEY=VALUE" in capsys.readouterr().err


# ------------------------------------------------------------------ streaming and decoding
@pytest.mark.parametrize("preset", ["titans-lmm", "swa", "transformer"])
def test_chunked_prompt_and_greedy_answer_equal_one_pass(preset):
    """Reading a prompt in chunks through the cache gives the next-token logits of one pass
    (float64, to 1e-12), and the greedy answer equals argmax decoding without any cache."""
    from deepmemory.eval import answer_batch, read_prompt
    from deepmemory.models import DeepMemoryCache, build

    torch.manual_seed(0)
    model = build(preset, size="tiny", vocab_size=40, **TINY, attention_window=8).double().eval()
    prompts = torch.randint(0, 40, (2, 37))
    with torch.no_grad():
        want = model(input_ids=prompts).logits[:, -1]
        for chunk in (1, 7, 16, 37, 100):
            got = read_prompt(model, prompts, DeepMemoryCache(model.config), chunk)
            assert got.dtype == torch.float64 and (got - want).abs().max() <= 1e-12 * want.abs().max(), chunk
        seq = prompts.clone()
        for _ in range(5):  # greedy without a cache: the whole sequence each step
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    got = answer_batch(model, prompts.tolist(), 5, chunk_size=7, device=torch.device("cpu"))
    assert got == seq[:, 37:].tolist()


def test_growing_blocks():
    from deepmemory.eval import growing_blocks
    from deepmemory.models import preset_config

    assert growing_blocks(preset_config("transformer", "tiny")) == ["attn", "attn"]
    # the whole DeepTransformer family keeps every key: the Omega window does not retire tokens
    for kernel in ("deep-transformer", "swdt", "dot"):
        assert growing_blocks(preset_config(kernel, "tiny")) == ["kernel", "kernel"], kernel
    swa_kernel = preset_config("swdt", "tiny", kernel=dict(window="attention", window_rule="swa"))
    for bounded in ("swa", "titans-lmm", "titans-mac", "gated-deltanet"):
        assert growing_blocks(preset_config(bounded, "tiny")) == [], bounded
    assert growing_blocks(swa_kernel) == []


def test_growing_blocks_are_the_caches_that_grow():
    """``growing_blocks`` names a block exactly where the model's cache grows with the context
    (measured: every preset, and the kernel memory that retires tokens, at windows and segments of
    16 tokens, after 48 and 96 tokens)."""
    from deepmemory.eval import growing_blocks
    from deepmemory.models import DeepMemoryCache, build, list_presets

    cases = [(name, {}) for name in list_presets()]
    cases.append(("swdt", dict(kernel=dict(window="attention", window_rule="swa"))))
    ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(0))
    for name, overrides in cases:
        torch.manual_seed(0)
        model = build(name, "tiny", attention_window=16, segment_size=16, **overrides).eval()
        cache, sizes = DeepMemoryCache(model.config), []
        with torch.no_grad():
            for piece in ids.split(48, 1):
                model(piece, cache=cache)
                sizes.append(cache.nbytes())
        assert bool(growing_blocks(model.config)) == (sizes[1] > sizes[0]), (name, overrides, sizes)


def test_parse_lengths_and_depths():
    from deepmemory.eval import EvalError, parse_depths, parse_lengths

    assert parse_lengths("1k,2K, 64k,1m,100,1k") == [1024, 2048, 65536, 1048576, 100]
    assert parse_lengths("0.5k") == [512]
    assert parse_depths("0,0.25,1") == [0.0, 0.25, 1.0]
    for bad in ("", "x", "0", "-1k", "1.5", "nan", "1g"):
        with pytest.raises(EvalError, match="--lengths"):
            parse_lengths(bad)
    for bad in ("1.5", "-0.1", "a"):
        with pytest.raises(EvalError, match="--depths"):
            parse_depths(bad)


# ------------------------------------------------------------------ deepmemory eval
def eval_args(run_dir, out, *extra):
    return [
        "eval",
        "mqar",
        "--checkpoint",
        run_dir,
        "--lengths",
        "16,33",
        "--samples",
        "3",
        "--batch-size",
        "2",
        "--task-settings",
        "num_pairs=4",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def test_eval_writes_three_outputs(run, tmp_path, capsys):
    from deepmemory.eval import Evaluation

    out = tmp_path / "ev"
    assert main(eval_args(run[0], out)) == 0
    printed = capsys.readouterr().out
    assert "results.json" in printed and "33" in printed
    results = json.load(open(out / "results.json"))
    assert results["settings"]["samples"] == 3 and results["model"]["preset"] == "transformer"
    assert [(c["length"], c["samples"], c["complete"]) for c in results["cells"]] == [(16, 3, True), (33, 3, True)]
    table = (out / "results.md").read_text()
    assert "| 16 |" in table and "| 33 |" in table and "mqar" in table
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the outcome is the task's score of the greedy answer, recomputed here
    evaluation = Evaluation(["mqar"], run[0], [16], samples=3, out=str(tmp_path / "again"))
    assert evaluation.task_settings == {"mqar": MQAR}  # the task the run was trained on keeps its settings
    task = evaluation.tasks[0]
    with torch.no_grad():
        for seed, stored in enumerate(results["cells"][0]["correct"]):
            sample = task.sample(16, seed=seed)
            answer = evaluation.model(input_ids=torch.tensor([sample.prompt_ids])).logits[0, -1].argmax()
            assert task.score(sample, [int(answer)]) == stored


class Terminal(io.StringIO):
    """A stderr that says it is a terminal (where tqdm draws its bar)."""

    def isatty(self):
        return True


def test_eval_progress_bar_only_on_a_terminal(run, tmp_path, monkeypatch, capsys):
    from deepmemory.eval import Evaluation

    def evaluate(name, progress):
        Evaluation(["mqar"], run[0], [16], samples=1, out=str(tmp_path / name), task_settings=MQAR).run(progress)

    evaluate("piped", True)  # capsys is not a terminal: no bar, no carriage return
    assert "\r" not in capsys.readouterr().err
    for progress in (True, False):
        terminal = Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        evaluate(f"terminal-{progress}", progress)
        assert ("\r" in terminal.getvalue()) == progress


def test_eval_continues_an_interrupted_run(run, tmp_path, monkeypatch):
    from deepmemory.eval import EvalError, Evaluation

    full = tmp_path / "full"
    Evaluation(["mqar"], run[0], [16, 33], samples=3, out=str(full), task_settings=MQAR, batch_size=2).run(
        progress=False
    )
    # interrupted: the second cell has one sample of three, and nothing after it
    part = tmp_path / "part"
    part.mkdir()
    results = json.load(open(full / "results.json"))
    cut = results["cells"][1]
    cut.update(samples=1, complete=False, correct=cut["correct"][:1], outputs=cut["outputs"][:1])
    (part / "results.json").write_text(json.dumps(results))
    read = []  # the prompt lengths the rerun reads
    import deepmemory.eval.decode as decode

    original = decode.answer_batch
    monkeypatch.setattr(
        decode,
        "answer_batch",
        lambda m, prompts, *a, **k: read.append(len(prompts[0])) or original(m, prompts, *a, **k),
    )
    again = Evaluation(["mqar"], run[0], [16, 33], samples=3, out=str(part), task_settings=MQAR, batch_size=2).run(
        progress=False
    )
    assert read == [33]  # only the two missing samples of the 33-token cell, in one batch
    assert [c["correct"] for c in again["cells"]] == [
        c["correct"] for c in json.load(open(full / "results.json"))["cells"]
    ]
    with pytest.raises(EvalError, match="other settings"):
        Evaluation(["mqar"], run[0], [16], samples=5, out=str(part), task_settings=MQAR)


def test_eval_errors(run, tmp_path, capsys):
    ckpt, out = run[0], str(tmp_path / "e")
    base = ["eval", "mqar", "--checkpoint", ckpt, "--out", out, "--no-progress", "--task-settings", "num_pairs=4"]
    one_error_line(
        capsys, ["eval", "no-such-task", "--checkpoint", ckpt, "--lengths", "64", "--out", out], "no-such-task"
    )
    one_error_line(capsys, base + ["--lengths", "8"], "length 8 is below its minimum of 9 tokens")
    one_error_line(
        capsys,
        ["eval", "mqar", "--checkpoint", ckpt, "--lengths", "64", "--out", out, "--task-settings", "vocab_size=4096"],
        "reads only",
    )
    one_error_line(capsys, base + ["--lengths", "64", "--depths", "0,1.5"], "outside [0, 1]")
    one_error_line(capsys, base + ["--lengths", "64", "--depths", "0.5"], "depth")
    one_error_line(capsys, base + ["--lengths", "2k,128k"], "65,536")
    one_error_line(capsys, base + ["--lengths", "4x"], "--lengths")
    one_error_line(capsys, base + ["--lengths", "64", "--samples", "0"], "--samples")
    # settings that do not fit the length are the settings' error, not the tokenizer's
    line = one_error_line(capsys, base + ["--lengths", "64", "--task-settings", "num_queries=40"], "at length 64")
    assert "tokenizer" not in line
    one_error_line(
        capsys,
        ["eval", "mqar", "--checkpoint", str(tmp_path / "none"), "--lengths", "64", "--out", out],
        "--checkpoint",
    )


def test_eval_notes_a_task_vocabulary_other_than_the_trained_one(run, tmp_path):
    from deepmemory.eval import Evaluation

    same = Evaluation(["mqar"], run[0], [64], samples=1, out=str(tmp_path / "a"))
    assert same.notes == []
    other = Evaluation(["mqar"], run[0], [64], samples=1, out=str(tmp_path / "b"), task_settings={"vocab_size": 64})
    assert len(other.notes) == 1 and "ids 0..63" in other.notes[0] and "trained on task mqar" in other.notes[0]


def test_eval_first_seed_draws_other_samples(run, tmp_path, capsys):
    from deepmemory.data.tasks import get_task
    from deepmemory.eval import EvalError, Evaluation

    args = dict(samples=2, task_settings=MQAR)
    default = Evaluation(["mqar"], run[0], [64], out=str(tmp_path / "a"), **args).run(progress=False)
    assert "first_seed" not in default["settings"]
    shifted = Evaluation(["mqar"], run[0], [64], out=str(tmp_path / "b"), first_seed=1, **args).run(progress=False)
    assert shifted["settings"]["first_seed"] == 1
    # sample i of first_seed 1 is sample i + 1 of the default: the prompts are those of seeds 1 and 2
    task = get_task("mqar", **MQAR)
    assert task.sample(64, seed=1).prompt_ids != task.sample(64, seed=0).prompt_ids
    assert shifted["cells"][0]["outputs"][0] == default["cells"][0]["outputs"][1]
    # a folder of one first seed is not continued with another (either way)
    for out, seed in (("a", 3), ("b", 0)):
        with pytest.raises(EvalError, match="first_seed"):
            Evaluation(["mqar"], run[0], [64], out=str(tmp_path / out), first_seed=seed, **args)
    one_error_line(
        capsys,
        ["eval", "mqar", "--checkpoint", run[0], "--lengths", "64", "--first-seed", "-1", "--out", str(tmp_path / "c")],
        "--first-seed",
    )


@pytest.mark.slow
def test_eval_command_in_a_process(run, tmp_path):
    out = tmp_path / "proc"
    proc = subprocess.run(
        [sys.executable, "-m", "deepmemory", *eval_args(run[0], out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"results.json", "results.md", "heatmap.png"} <= set(os.listdir(out))


def test_eval_text_tasks_by_depth(run, tmp_path):
    """A needle task over depths (a length x depth table) and a BABILong task (answers decoded to
    the end of a sentence) on the byte tokenizer of a token-task run."""
    from deepmemory.data.tasks import get_task
    from deepmemory.eval import Evaluation

    niah = get_task("s-niah-1")
    length = max(niah.min_length, 200)
    out = tmp_path / "niah"
    evaluation = Evaluation(["s-niah-1"], run[0], [length], depths=[0.0, 1.0], samples=1, out=str(out), batch_size=1)
    results = evaluation.run(progress=False)
    assert [(c["length"], c["depth"], c["samples"]) for c in results["cells"]] == [(length, 0.0, 1), (length, 1.0, 1)]
    assert "| length \\ depth (s-niah-1) | 0 | 1 |" in (out / "results.md").read_text()
    babi = get_task("babilong-qa1")
    out = tmp_path / "babi"
    results = Evaluation(
        ["babilong-qa1", "s-niah-1"], run[0], [max(babi.min_length, length)], samples=1, out=str(out)
    ).run(progress=False)
    assert {c["task"] for c in results["cells"]} == {"babilong-qa1", "s-niah-1"}
    assert "| length \\ task | babilong-qa1 | s-niah-1 |" in (out / "results.md").read_text()
