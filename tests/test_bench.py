"""The CPU benchmark harness: tables come out with every case, rounds take medians, bad input exits 2."""

import subprocess
import sys

import pytest

from deepmemory.bench import mixer


def test_mixer_rounds_report_the_median(capsys, monkeypatch):
    calls = []

    def fake(module, case):  # tokens/s 100, 300, 200 over three rounds: the median is 200
        calls.append(case)
        tps = (100.0, 300.0, 200.0)[sum(c["mixer"] == case["mixer"] for c in calls) - 1]
        return {
            "tokens_per_s": tps,
            "peak_mib": 1.0,
            "saved_mib": 2.0,
            "flops_per_s": tps * 1e9 if case["flops"] else 0.0,
            "user_us": 1e4 / tps,
            "sys_us": 0.0,
        }

    monkeypatch.setattr(mixer, "run_isolated", fake)
    monkeypatch.setattr(mixer, "matmul_peak_flops", lambda device: 1e12)
    rows = mixer.run([32], [8], ["memory-token", "gated-deltanet"], rounds=3)
    assert [c["mixer"] for c in calls] == ["memory-token", "gated-deltanet"] * 3  # round-robin
    assert [c["flops"] for c in calls] == [True, True] + [False] * 4
    assert [r["tokens/s"] for r in rows] == ["200", "200"] and rows[0]["min-max"] == "100-300"
    assert rows[0]["user us/tok"] == "50"  # the median round's CPU time
    assert rows[0]["GFLOP/s"] == "200.0"  # counted in round 1 (100 GFLOP/s at 100 tokens/s), at the median rate
    assert "median of 3 rounds" in capsys.readouterr().out


def test_keep_freed_memory_reaches_every_case(capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(
        mixer,
        "run_isolated",
        lambda module, case: (
            calls.append(case)
            or {
                "tokens_per_s": 1.0,
                "peak_mib": 1.0,
                "saved_mib": 1.0,
                "flops_per_s": 0.0,
                "user_us": 1.0,
                "sys_us": 0.0,
            }
        ),
    )
    mixer.run([32, 64], [8], ["memory-token"], flops=False, keep_freed_memory=True)
    assert len(calls) == 2 and all(c["keep_freed_memory"] for c in calls)
    assert "freed memory kept for reuse" in capsys.readouterr().out


def _mode_parsers():
    from deepmemory.cli import build_parser

    bench = build_parser(only="bench")._subparsers._group_actions[0].choices["bench"]
    return bench._subparsers._group_actions[0].choices


def test_every_bench_mode_states_its_defaults():
    """Each option of every mode names its default in its help line: the value itself where the parser
    holds one (a list as its items separated by spaces), the word "default" where it is worked out."""
    import argparse

    for mode, parser in _mode_parsers().items():
        for action in parser._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction)):
                continue
            if action.dest in ("version", "debug"):
                continue
            text = " ".join(action.help.split())
            value = action.default
            shown = " ".join(map(str, value)) if isinstance(value, list) else str(value)
            assert "default" in text, (mode, action.dest, text)
            if (mode, action.dest) == ("mixer", "mixers"):  # "default all but ...": the slow ones named
                assert value == [m for m in mixer.MIXERS if m not in mixer.SLOW_MIXERS], value
                assert all(f" {m} " in text for m in mixer.SLOW_MIXERS), text
                continue
            assert value is None or f"default {shown}" in text, (mode, action.dest, text)


def test_model_and_decode_list_only_their_options():
    parsers = _mode_parsers()
    model_options = {a.dest for a in parsers["model"]._actions}
    decode_options = {a.dest for a in parsers["decode"]._actions}
    training_only, decoding_only = {"seq", "batch", "documents", "repeat"}, {"context", "steps", "plot"}
    assert training_only <= model_options and not training_only & decode_options
    assert decoding_only | {"max_attention_context"} <= decode_options and not decoding_only & model_options
    help_text = parsers["decode"].format_help()
    assert "depends on the mode" not in help_text and "training:" not in help_text
    assert "default titans-lmm gated-deltanet atlas transformer" in " ".join(help_text.split())


@pytest.mark.parametrize("threads, heading", [(1, "1 thread,"), (3, "3 threads,")])
def test_table_headings_count_threads(threads, heading, capsys, monkeypatch):
    from deepmemory.bench import model

    train = {"tokens_per_s": 10.0, "peak_mib": 1.0, "params": 1e6}
    decode = {"latency_ms": 1.0, "state_kib": 1.0, "prefill_tokens_per_s": 1.0}
    monkeypatch.setattr(model, "run_isolated", lambda module, case: decode if case.get("decode") else train)
    model.run_train(["transformer"], "tiny", threads=threads)
    model.run_decode(["transformer"], "tiny", [16], threads=threads)
    headings = [line for line in capsys.readouterr().out.splitlines() if "thread" in line]
    assert len(headings) == 2 and all(heading in line for line in headings), headings


@pytest.mark.slow
def test_mixer_table_from_real_cases():
    names = ["memory-token", "gated-deltanet"]
    rows = mixer.run([24], [8], names, hidden=32, heads=2, head_dim=16, repeat=1, flops=False)
    assert [r["mixer"] for r in rows] == names
    assert all(float(r["tokens/s"]) > 0 and r["saved MiB"] != "n/a" for r in rows)
    # a step this small may take less CPU time than the clock resolves
    assert all(float(r["user us/tok"]) >= 0 and float(r["sys us/tok"]) >= 0 for r in rows)


@pytest.mark.long  # some 20 s a case: each runs in its own process
def test_atlas_mixer_rows_from_real_cases():
    rows = mixer.run([24], [8], ["atlas-token", "atlas-chunk"], hidden=32, heads=2, head_dim=16, repeat=1, flops=False)
    assert [r["mixer"] for r in rows] == ["atlas-token", "atlas-chunk"]
    assert all(float(r["tokens/s"]) > 0 and r["saved MiB"] != "n/a" for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--rounds", "0"], ["--seq", "0"], ["--repeat", "-1"]])
def test_bad_mixer_arguments_exit_2(args):
    r = subprocess.run([sys.executable, "-m", "deepmemory", "bench", "mixer", *args], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "must be >= 1" in r.stderr
