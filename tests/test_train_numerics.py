"""`deepmemory train` refuses to save garbage: a diverged run stops with exit code 3 and keeps
its last good checkpoint; metrics.jsonl is strict JSON; two runs with one seed are bitwise equal."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import test_train
import torch
from safetensors.torch import load_file
from test_train import REPO, TINY, args, metrics

from deepmemory.cli import main
from deepmemory.train import DivergenceError, Trainer
from deepmemory.train import checkpoint as ck
from deepmemory.train.command import main as train_main
from deepmemory.train.config import new_config
from deepmemory.train.distributed import Env

corpus = test_train.corpus  # the same fixture (a module's own copy)
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

DIVERGED = re.compile(
    r"^deepmemory train: error: training diverged at step (\d+): (.+ is (?:nan|inf|-inf))(?: and .+)?; "
    r"the last good checkpoint \(step (\d+)\) is kept in (.+)$"
)


def _no_constant(name):
    raise ValueError(f"not strict JSON: {name}")


def strict_rows(run):
    """The rows of ``metrics.jsonl``, read by a parser that refuses NaN and Infinity."""
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line, parse_constant=_no_constant) for line in f]


def all_finite(path):
    return all(bool(t.isfinite().all()) for t in load_file(path).values() if t.is_floating_point())


def diverging(corpus, out, *extra):
    # a checkpoint every step: step 1 (lr 3e29 in the warmup) is still finite, step 2 is not
    return args(corpus, "--steps", "20", "--lr", "1e30", "--eval-every", "1", "--out", out, *extra)


def check_diverged_run(out, message):
    m = DIVERGED.match(message)
    assert m, message
    step, good, run_dir = int(m.group(1)), int(m.group(3)), m.group(4)
    assert run_dir == out and good == step - 1
    names = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert names == [f"step-{good:08d}"]  # before the divergence, nothing after it, nothing half-written
    ckpt = os.path.join(out, "checkpoints", names[0])
    assert json.load(open(os.path.join(ckpt, "state.json")))["step"] == good
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert all_finite(os.path.join(ckpt, name)), name
    with (
        open(os.path.join(ckpt, "model.safetensors"), "rb") as a,
        open(os.path.join(out, "model.safetensors"), "rb") as b,
    ):
        assert a.read() == b.read()  # the run's weights are the last good checkpoint's
    assert not [n for n in os.listdir(out) if n.startswith(".")]
    rows = strict_rows(out)
    assert rows[-1]["step"] == step and rows[-1]["grad_norm"] is None  # the diverged step, recorded as null
    assert [r["step"] for r in rows[:-1] if "loss" in r] == list(range(1, step))


def test_lr_1e30_exits_3_and_keeps_the_last_good_checkpoint(corpus, tmp_path, capsys):
    out = str(tmp_path / "N")
    assert main(diverging(corpus, out)) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    check_diverged_run(out, err.strip().splitlines()[-1])  # the last line: after the progress bar


def test_weight_decay_1e30_exits_3(corpus, tmp_path, capsys):
    out = str(tmp_path / "W")
    assert main(args(corpus, "--steps", "20", "--weight-decay", "1e30", "--eval-every", "1", "--out", out)) == 3
    check_diverged_run(out, capsys.readouterr().err.strip().splitlines()[-1])


def test_module_entry_exits_3_and_debug_shows_the_traceback(corpus, tmp_path, capsys):
    # `python -m deepmemory.train` (what torchrun starts) and --debug
    out = str(tmp_path / "M")
    assert train_main(diverging(corpus, out, "--debug")[1:]) == 3
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "DivergenceError" in err
    check_diverged_run(out, err.strip().splitlines()[-1])


def test_divergence_before_any_checkpoint(corpus, tmp_path, capsys):
    out = str(tmp_path / "E")
    assert main(args(corpus, "--steps", "5", "--lr", "1e30", "--grad-clip", "0", "--out", out)) == 3
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"deepmemory train: error: training diverged at step \d: .+ is (nan|inf); "
        rf"no checkpoint was written \(run directory {re.escape(out)}\)",
        last,
    ), last
    assert not os.path.exists(os.path.join(out, "checkpoints")) and not os.path.exists(
        os.path.join(out, "model.safetensors")
    )
    strict_rows(out)


def trainer(corpus, tmp_path):
    settings = dict(
        TINY,
        model="transformer",
        data=[corpus["data"]],
        val_fraction=0.25,
        seq_len=16,
        batch_size=4,
        steps=10,
        eval_tokens=256,
        lr=1e-2,
        out=str(tmp_path / "T"),
    )
    t = Trainer(new_config(settings), Env(), quiet=True)
    t.restore()
    return t


def test_a_non_finite_gradient_does_not_step(corpus, tmp_path):
    t = trainer(corpus, tmp_path)
    t.train_step()
    weights = {k: v.clone() for k, v in t.model.state_dict().items()}
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in t.optimizer.state.items()}
    param = next(t.model.parameters())
    hook = param.register_hook(lambda g: g * math.nan)
    with pytest.raises(
        DivergenceError, match=r"^training diverged at step 2: the gradient norm is nan; no checkpoint"
    ) as err:
        t.train_step()
    hook.remove()
    assert err.value.step == 2 and err.value.checkpoint_step is None and math.isnan(err.value.metrics["grad_norm"])
    assert t.step == 1 and math.isfinite(t.train_loss)
    assert all(torch.equal(v, weights[k]) for k, v in t.model.state_dict().items())
    assert all(torch.equal(v, moments[id(p)][k]) for p, s in t.optimizer.state.items() for k, v in s.items())
    assert all(p.grad is None for p in t.model.parameters())
    t.train_step()  # a finite step afterwards goes on as usual
    assert t.step == 2
    t.close()


def test_non_finite_weights_are_neither_evaluated_nor_saved(corpus, tmp_path):
    t = trainer(corpus, tmp_path)
    t.train_step()
    t.save()
    ckpt = os.path.join(t.run_dir, "checkpoints", "step-00000001")
    before = {n: open(os.path.join(ckpt, n), "rb").read() for n in os.listdir(ckpt)}
    t.train_step()
    with torch.no_grad():
        next(t.model.parameters()).fill_(math.inf)
    with pytest.raises(
        DivergenceError,
        match=r"^training diverged at step 2: the validation loss is (nan|inf); "
        r"the last good checkpoint \(step 1\)",
    ):
        t.evaluate()
    assert t.val_loss is None
    with pytest.raises(DivergenceError, match=r"the weight .+ holds non-finite values"):
        t.save()
    assert os.listdir(os.path.join(t.run_dir, "checkpoints")) == ["step-00000001"]
    assert {n: open(os.path.join(ckpt, n), "rb").read() for n in os.listdir(ckpt)} == before
    assert all_finite(os.path.join(t.run_dir, "model.safetensors"))
    t.close()


def test_json_is_strict(tmp_path):
    row = {"step": 3, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3, "val": -math.inf}
    assert ck.finite_or_none(row) == {"step": 3, "loss": None, "grad_norm": None, "lr": 1e-3, "val": None}
    with pytest.raises(ValueError):
        ck.strict_json(row)
    path = str(tmp_path / "state.json")
    ck.write_json(path, {"loss": 1.5})
    with pytest.raises(ValueError):
        ck.write_json(path, {"loss": math.nan})
    assert json.load(open(path)) == {"loss": 1.5} and os.listdir(tmp_path) == ["state.json"]


def test_non_finite_settings_are_user_errors(corpus, capsys):
    # refused by the parser: one line, exit 2 (tests/test_bad_input.py holds the whole table)
    for flag, value in (("--lr", "inf"), ("--lr", "nan"), ("--weight-decay", "inf"), ("--grad-clip", "nan")):
        with pytest.raises(SystemExit) as exit_info:
            main(args(corpus, flag, value))
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and f"argument {flag}: expected a finite number" in lines[0], lines


def test_two_runs_with_one_seed_are_bitwise_equal(corpus, tmp_path):
    runs = [str(tmp_path / name) for name in ("a", "b")]
    for out in runs:
        assert main(args(corpus, "--steps", "4", "--eval-every", "2", "--out", out)) == 0
    # every value but the wall-clock throughput, compared as written (shortest round-trip reprs: bitwise)
    lines = [[json.dumps({k: v for k, v in r.items() if k != "tok_per_s"}) for r in strict_rows(out)] for out in runs]
    assert lines[0] == lines[1] and len(lines[0]) == 4 + 3
    assert metrics(runs[0])[-1]["val_loss"] == metrics(runs[1])[-1]["val_loss"]
    weights = [open(os.path.join(out, "model.safetensors"), "rb").read() for out in runs]
    assert weights[0] == weights[1]


@pytest.mark.slow
def test_exit_code_3_of_the_command(corpus, tmp_path):
    out = str(tmp_path / "S")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(REPO, "src"))
    proc = subprocess.run(
        [sys.executable, "-m", "deepmemory", *diverging(corpus, out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    check_diverged_run(out, proc.stderr.strip().splitlines()[-1])


@pytest.mark.slow
def test_every_rank_stops_together(corpus, tmp_path):
    # two gloo processes: both raise at the same step (no rank left waiting in a collective)
    out = str(tmp_path / "D")
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
        *diverging(corpus, out)[1:],
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    # Each rank prints its line (the other rank's progress bar may precede it on the same terminal
    # line), but torchrun stops the other rank as soon as the first exits, which may come before the
    # second line is written: one or two lines, the same. A rank left waiting in a collective would
    # hang the run past the timeout instead.
    lines = re.findall(r"deepmemory train: error: [^\r\n]*", proc.stderr)
    assert 1 <= len(lines) <= 2 and len(set(lines)) == 1, proc.stderr[-3000:]
    check_diverged_run(out, lines[0])
