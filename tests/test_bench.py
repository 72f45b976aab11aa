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
