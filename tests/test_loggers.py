"""Training knobs and loggers: --save-every, --log-every, --time-limit, --report-to
(tensorboard read back, jsonl), loss.png during the run, the whole run's time after a resume,
config-file-relative paths."""

import json
import os

import pytest

from deepmemory.cli import main

TINY = {
    "model_overrides": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import random

    root = tmp_path_factory.mktemp("logcorpus")
    (root / "data").mkdir()
    r = random.Random(1)
    words = "a memory stores keys and values".split()
    for i in range(6):
        (root / "data" / f"d{i}.txt").write_text(" ".join(r.choice(words) for _ in range(80)) + "\n")
    # relative paths of a config file are relative to the file, not to the working directory
    (root / "tiny.json").write_text(json.dumps(dict(TINY, data=["data"])))
    return root


def args(corpus, *extra):
    return [
        "train",
        "--model",
        "transformer",
        "--config",
        str(corpus / "tiny.json"),
        "--seq-len",
        "8",
        "--batch-size",
        "2",
        "--eval-tokens",
        "64",
        *extra,
    ]


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_save_every_log_every_and_loggers(corpus, tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)  # the config's "data" resolves against its own folder
    out = str(tmp_path / "run")
    assert (
        main(
            args(
                corpus,
                "--steps",
                "6",
                "--eval-every",
                "3",
                "--save-every",
                "2",
                "--log-every",
                "2",
                "--report-to",
                "tensorboard",
                "jsonl",
                "--keep-checkpoints",
                "10",
                "--out",
                out,
            )
        )
        == 0
    )
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [f"step-0000000{s}" for s in (2, 4, 6)]
    record = json.load(open(os.path.join(out, "run.json")))
    assert record["train"]["data"] == [str(corpus / "data")]
    assert record["resolved"]["save_every"] == 2
    logged = capsys.readouterr()
    assert sum("| loss " in line for line in logged.out.splitlines() + logged.err.splitlines()) == 3

    log = rows(os.path.join(out, "log.jsonl"))
    assert [r["step"] for r in log if "train/loss" in r] == [2, 4, 6]
    assert [r["step"] for r in log if "eval/bpb" in r] == [0, 3, 6]
    steps = {r["step"]: r["loss"] for r in rows(os.path.join(out, "metrics.jsonl")) if "loss" in r}
    assert log[1]["train/loss"] == pytest.approx((steps[1] + steps[2]) / 2)  # the mean over the interval

    acc = EventAccumulator(os.path.join(out, "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/bpb", "eval/loss", "eval/bpb"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]
    assert [e.step for e in acc.Scalars("eval/bpb")] == [0, 3, 6]
    assert acc.Scalars("eval/loss")[-1].value == pytest.approx(
        record_val := rows(os.path.join(out, "metrics.jsonl"))[-1]["val_loss"], rel=1e-6
    ), record_val


def test_time_limit_stops_resumably_and_the_summary_counts_the_whole_run(corpus, tmp_path, capsys):
    from deepmemory.train import train

    out = str(tmp_path / "timed")
    settings = dict(
        TINY,
        model="transformer",
        data=[str(corpus / "data")],
        seq_len=8,
        batch_size=2,
        eval_tokens=64,
        steps=50,
        eval_every=100,
        out=out,
        time_limit=1e-3,
    )
    first = train(settings, quiet=True)
    assert first["stopped"] == "time limit" and first["steps"] == 1
    assert os.path.isfile(os.path.join(out, "loss.png"))  # drawn at the evaluation, before the end
    assert os.listdir(os.path.join(out, "checkpoints")) == ["step-00000001"]
    second = train({"steps": 3, "time_limit": None}, resume=out, quiet=True)  # (a stored limit applies again)
    assert second["stopped"] is None and second["steps"] == 3
    assert second["wall_time_s"] > second["session_time_s"]  # the resumed part and the first one


def test_loss_png_exists_after_the_first_evaluation(corpus, tmp_path):
    from deepmemory.train.config import new_config
    from deepmemory.train.distributed import setup, teardown
    from deepmemory.train.trainer import Trainer

    cfg = new_config(
        dict(
            TINY,
            model="transformer",
            data=[str(corpus / "data")],
            seq_len=8,
            batch_size=2,
            eval_tokens=64,
            steps=4,
            eval_every=2,
            out=str(tmp_path / "p"),
        )
    )
    env = setup("cpu")
    try:
        with Trainer(cfg, env, quiet=True) as trainer:
            trainer.restore()
            trainer._validate()  # what fit() does at step 0 and every --eval-every steps
            assert os.path.isfile(os.path.join(trainer.run_dir, "loss.png"))
    finally:
        teardown(env)


def test_logger_errors(corpus, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(args(corpus, "--steps", "2", "--report-to", "wandb", "--out", str(tmp_path / "w"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--report-to wandb needs the `wandb` package" in err[0], err
    assert not os.path.exists(tmp_path / "w")  # nothing written
    assert main(args(corpus, "--report-to", "none", "jsonl")) == 2
    assert "excludes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args(corpus, "--time-limit", "soon"))
    assert "duration" in capsys.readouterr().err
