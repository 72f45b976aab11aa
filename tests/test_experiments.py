"""``deepmemory experiment``: every experiment end to end at the toy budget (RESULTS.md and
results.json written, a second invocation skips the finished cells, an interrupted cell resumes),
the statistics, the matched sizes and the one-line errors."""

import json
import os

import pytest

from deepmemory.cli import main
from deepmemory.experiments import NAMES, get_experiment
from deepmemory.experiments.runner import matched_widths, mean_std, parameter_count, within_noise

# what each experiment's RESULTS.md must show at the toy budget
HEADINGS = {
    "length-generalization": ["## mqar: trained at L = 32", "## s-niah-1: trained at L = 328", "`titans-lmm`"],
    "language-modeling": ["## Validation bits per byte at equal tokens", "`transformer`", "`titans-lmm`"],
    "ablations": ["## titans-lmm: one component out at a time", "no momentum"],
    "calibration": ["## Inner learning rate", "`titans-lmm`", "preset (0.02"],
}


def _cells_mtimes(out):
    folder = os.path.join(out, "cells")
    return {k: os.path.getmtime(os.path.join(folder, k, "cell.json")) for k in sorted(os.listdir(folder))}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_toy_experiment_end_to_end_and_resumable(name, tmp_path, capsys, one_thread):
    out = str(tmp_path / name)
    argv = ["experiment", name, "--budget", "toy", "--out", out, "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{name} (toy): complete" in printed
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    experiment = get_experiment(name)
    expected = experiment.make_cells(experiment.config("toy"))
    assert results["experiment"] == name and results["budget"] == "toy" and results["complete"]
    assert results["cells_finished"] == results["cells_total"] == len(expected)
    assert [c["key"] for c in results["cells"]] == [c.key for c in expected]
    inv = results["invocations"][-1]
    assert inv["command"].startswith(f"deepmemory experiment {name} --budget toy")
    assert inv["machine"]["torch"] and inv["machine"]["deepmemory"] and inv["wall_time_s"] >= 0
    for cell in results["cells"]:
        assert cell["status"] == "done" and cell["seconds"] >= 0 and cell["labels"]["seed"] == 0
        assert cell["parameters"] > 0 and cell["train"]["steps"] == cell["spec"]["train"]["steps"]
        if cell["spec"]["eval"]:
            lengths = cell["spec"]["eval"]["lengths"]
            assert sorted(cell["eval"]["accuracy"]) == sorted(map(str, lengths))
            assert all(0 <= a <= 1 for a in cell["eval"]["accuracy"].values())
    with open(os.path.join(out, "RESULTS.md")) as f:
        text = f.read()
    assert text.startswith(f"# Experiment `{name}` (toy budget)") and "**Complete**" in text
    assert f"`deepmemory experiment {name} --budget toy --out {out}`" in text
    for heading in HEADINGS[name]:
        assert heading in text, heading
    for image in [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]:
        assert os.path.getsize(os.path.join(out, image)) > 1000

    # a second invocation runs nothing: every cell is finished
    before = _cells_mtimes(out)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{len(expected)} finished earlier, 0 to run" in printed
    assert _cells_mtimes(out) == before
    with open(os.path.join(out, "results.json")) as f:
        again = json.load(f)
    assert again["invocations"] == results["invocations"] and again["cells"] == results["cells"]  # (none recorded)


@pytest.mark.slow
def test_interrupted_cell_resumes_and_narrowing_adds_to_the_results(tmp_path, capsys, one_thread):
    out = str(tmp_path / "lg")
    base = ["experiment", "length-generalization", "--budget", "toy", "--out", out, "--no-progress"]
    assert main(base + ["--tasks", "mqar", "--presets", "titans-lmm"]) == 0
    printed = capsys.readouterr().out
    assert "partial: 1 of 4 cells" in printed
    with open(os.path.join(out, "RESULTS.md")) as f:
        assert "**Partial**: 1 of 4 cells finished" in f.read()
    # a cell interrupted after its training (no cell.json yet): the run directory resumes at its
    # last step, nothing is trained again, and only the evaluation is redone
    cell = os.path.join(out, "cells", "mqar-titans-lmm-s0")
    os.remove(os.path.join(cell, "cell.json"))
    with open(os.path.join(cell, "run", "metrics.jsonl")) as f:
        rows = f.read()
    assert main(base + ["--tasks", "mqar"]) == 0
    printed = capsys.readouterr().out
    assert "0 finished earlier, 2 to run" in printed
    with open(os.path.join(cell, "run", "metrics.jsonl")) as f:
        assert f.read() == rows  # no step trained twice
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert [c["key"] for c in results["cells"]] == ["mqar-transformer-s0", "mqar-titans-lmm-s0"]
    assert not results["complete"] and len(results["invocations"]) == 2
    # a seed beyond the budget's joins the results (and stays in them), the budget's count unchanged
    assert main(base + ["--tasks", "mqar", "--presets", "titans-lmm", "--seeds", "1"]) == 0
    assert main(base + ["--tasks", "mqar", "--presets", "titans-lmm"]) == 0
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert [c["key"] for c in results["cells"]][-1] == "mqar-titans-lmm-s1"
    assert results["cells_finished"] == 2 and results["cells_total"] == 4
    with open(os.path.join(out, "RESULTS.md")) as f:
        assert "Seeds: 0, 1." in f.read()


def test_statistics():
    assert mean_std([1.0, 3.0]) == (2.0, 2**0.5, 2)
    assert mean_std([0.5]) == (0.5, None, 1)
    assert mean_std([None, float("nan")]) == (None, None, 0)
    assert within_noise([0.50, 0.52, 0.48], [0.51, 0.49, 0.50]) is True
    assert within_noise([0.90, 0.91, 0.92], [0.10, 0.11, 0.12]) is False
    assert within_noise([0.5], [0.6]) is None  # one seed each: no spread measured
    assert within_noise([0.5], [0.6], floor=0.2) is True


def test_matched_widths_bring_every_preset_to_the_largest_count():
    presets = ["transformer", "gated-deltanet", "titans-mac", "omeganet"]
    widths = matched_widths(presets, "tiny-w16", 257)
    counts = {p: parameter_count(p, "tiny-w16", 257, widths[p]) for p in presets}
    target = max(parameter_count(p, "tiny-w16", 257) for p in presets)
    assert widths["omeganet"] == {}  # the largest keeps its width
    assert widths["transformer"]["intermediate_size"] > 128
    for p in presets:
        assert abs(counts[p] / target - 1) < 0.01, (p, counts[p], target)


def test_cells_of_the_real_budgets():
    lg = get_experiment("length-generalization")
    cells = lg.make_cells(lg.config("cpu"))
    assert len(cells) == 18 and {c.labels["task"] for c in cells} == {"mqar", "s-niah-1"}
    assert [c.group for c in cells][-2:] == ["atlas", "atlas"]  # the slow Atlas cells last
    mqar = [c for c in cells if c.labels["task"] == "mqar"]
    assert {c.train["steps"] for c in mqar} == {800} and {c.train["seq_len"] for c in mqar} == {64}
    assert mqar[0].eval["lengths"] == [64, 128, 256, 512, 1024]
    assert len({(c.train["steps"], c.train["batch_size"], c.train["lr"]) for c in mqar}) == 1  # equal budgets
    for name in NAMES:
        experiment = get_experiment(name)
        for budget in ("toy", "cpu", "gpu"):
            keys = [c.key for c in experiment.make_cells(experiment.config(budget))]
            assert len(keys) == len(set(keys)), (name, budget)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["experiment", "nope"], "invalid choice: 'nope'"),
        (["experiment", "length-generalization", "--budget", "huge"], "invalid choice: 'huge'"),
        (["experiment", "length-generalization", "--presets", "titans-lmm,nope"], "nope not in the toy budget's"),
        (["experiment", "length-generalization", "--tasks", "babilong-qa1"], "babilong-qa1 not in the toy budget's"),
        (["experiment", "language-modeling", "--tasks", "mqar"], "language-modeling has no --tasks"),
        (["experiment", "ablations", "--group", "gpu"], "'gpu' is not among"),
        (["experiment", "calibration", "--seeds", "a,b"], "is not a list of seeds"),
        (["experiment", "calibration", "--threads", "0"], "--threads must be >= 1"),
        (["experiment", "calibration", "--seeds", "0,0"], "names a seed twice"),
        (["experiment", "calibration", "--seeds", "99999999999999999999"], "seeds in [0, 2^63)"),
        (["experiment", "calibration", "--out", " "], "--out is empty"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, message, capsys, tmp_path):
    argv = argv if "--out" in argv else argv + ["--out", str(tmp_path / "x")]
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not os.path.exists(tmp_path / "x" / "results.json")


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exit:  # argparse's own one-line errors
        return exit.code


def test_out_holding_another_experiment_is_refused(tmp_path, capsys):
    out = tmp_path / "x"
    out.mkdir()
    (out / "results.json").write_text(
        json.dumps({"experiment": "ablations", "budget": "toy", "config_sha": "0", "cells": []})
    )
    assert main(["experiment", "calibration", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds results of another experiment" in err


def _outcome(task, preset, accuracy, params=1000):
    lengths = [64, 128, 256, 512, 1024]
    return {
        "labels": {"task": task, "preset": preset, "seed": 0},
        "status": "done",
        "parameters": params,
        "train": {"val_accuracy": accuracy[0], "val_loss": 1.0, "tok_per_s": 100.0, "wall_time_s": 60.0},
        "eval": {"accuracy": {str(n): a for n, a in zip(lengths, accuracy)}},
        "model": {"memory": {"max_lr": 0.02}, "intermediate_size": 128},
    }


def test_length_generalization_report_checks_the_papers_claims():
    experiment = get_experiment("length-generalization")
    config = experiment.config("cpu", presets=["transformer", "gated-deltanet", "titans-lmm", "omeganet"])
    outcomes = [
        _outcome("mqar", "transformer", [0.95, 0.40, 0.10, 0.05, 0.02]),  # collapses beyond L
        _outcome("mqar", "gated-deltanet", [0.60, 0.58, 0.55, 0.50, 0.45]),
        _outcome("mqar", "titans-lmm", [0.90, 0.88, 0.85, 0.80, 0.75]),  # holds: above the transformer
        _outcome("mqar", "omeganet", [0.50, 0.50, 0.45, 0.40, 0.40]),  # below Titans: the order reversed
    ]
    text, figures = experiment.report(config, outcomes)
    assert "| `titans-lmm` | 1,000 | 1.000 | 90.0 | 90.0 | 88.0 | 85.0 | 80.0 | 75.0 |" in text
    assert "Memory models above it beyond L by more than the evaluation noise: `gated-deltanet`, `titans-lmm`" in text
    assert "`omeganet` 50.0% vs `titans-lmm` 90.0%: reversed" in text
    assert "`titans-lmm` 90.0% vs `gated-deltanet` 60.0%: holds" in text
    assert "No cell of this task has finished yet." in text  # s-niah-1
    assert set(figures) == {"mqar.png"}  # no plot for a task without results


@pytest.mark.parametrize("name", ["length-generalization", "language-modeling"])
def test_narrowed_presets_keep_the_budgets_matched_sizes(name):
    # the sizes are solved over the budget's presets: a cell run alone is the cell of the whole budget
    experiment = get_experiment(name)
    whole = {c.key: c.spec() for c in experiment.make_cells(experiment.config("toy"))}
    alone = experiment.make_cells(experiment.config("toy", presets=["transformer"]))
    assert alone and all(c.spec() == whole[c.key] for c in alone)


def test_a_run_trained_with_other_settings_is_not_continued(tmp_path):
    from deepmemory.experiments.runner import _clear_stale

    cell = tmp_path / "cell"
    (cell / "run").mkdir(parents=True)
    (cell / "eval").mkdir()
    train = {"model": "transformer", "steps": 2, "model_overrides": {"intermediate_size": 200}, "out": "x"}
    (cell / "run" / "run.json").write_text(json.dumps({"train": dict(train, out="elsewhere", device="cpu")}))
    _clear_stale(str(cell), train)  # the same settings (where it ran aside): kept
    assert (cell / "run" / "run.json").exists() and (cell / "eval").exists()
    _clear_stale(str(cell), dict(train, model_overrides={}))  # another width: both removed
    assert not (cell / "run").exists() and not (cell / "eval").exists()


def test_an_interrupted_invocation_says_so(tmp_path, monkeypatch, one_thread):
    from deepmemory.experiments import runner

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_cell", stop)
    out = str(tmp_path / "lm")
    assert main(["experiment", "language-modeling", "--out", out, "--no-progress"]) == 130
    with open(os.path.join(out, "results.json")) as f:
        invocation = json.load(f)["invocations"][-1]
    assert invocation["running"] is False and invocation["stopped"] == "interrupted"
    with open(os.path.join(out, "RESULTS.md")) as f:
        text = f.read()
    assert "(interrupted)" in text and "still running" not in text


@pytest.mark.slow
def test_a_moved_output_folder_resumes(tmp_path, capsys, one_thread):
    # the evaluation folder names its checkpoint by path: after a move it is evaluated anew, not refused
    first, moved = str(tmp_path / "a"), str(tmp_path / "b")
    base = ["experiment", "length-generalization", "--no-progress", "--tasks", "mqar", "--presets", "transformer"]
    assert main(base + ["--out", first]) == 0
    os.rename(first, moved)
    os.remove(os.path.join(moved, "cells", "mqar-transformer-s0", "cell.json"))  # stopped after its evaluation
    assert main(base + ["--out", moved]) == 0
    assert "1 to run" in capsys.readouterr().out
    with open(os.path.join(moved, "results.json")) as f:
        assert [c["key"] for c in json.load(f)["cells"]] == ["mqar-transformer-s0"]
