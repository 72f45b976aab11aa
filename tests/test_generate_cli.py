"""`deepmemory generate`: top-p, repetition penalty, several samples and prompts (flags, a file,
standard input), streaming, threads, errors."""

import io
import os

import pytest
import torch

from deepmemory.cli import main

TINY = {
    "model_overrides": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from deepmemory.train import train

    root = tmp_path_factory.mktemp("gen")
    (root / "data").mkdir()
    for i in range(4):
        (root / "data" / f"d{i}.txt").write_text("the memory stores keys and values. " * 30)
    out = str(root / "run")
    train(
        dict(
            TINY,
            model="transformer",
            data=[str(root / "data")],
            seq_len=8,
            batch_size=2,
            eval_tokens=64,
            steps=2,
            out=out,
        ),
        quiet=True,
    )
    return out


def gen(run, *extra):
    return ["generate", "--checkpoint", run, "--max-new-tokens", "12", *extra]


def test_streaming_prints_what_the_batch_output_prints(run, capsys):
    assert main(gen(run, "--prompt", "the ", "--temperature", "0", "--stream")) == 0
    streamed = capsys.readouterr().out
    assert main(gen(run, "--prompt", "the ", "--temperature", "0", "--no-stream")) == 0
    assert capsys.readouterr().out == streamed
    assert streamed.startswith("the ")


def test_a_prompt_read_in_pieces_continues_as_in_one(run, capsys, monkeypatch):
    from deepmemory.models import DeepMemoryForCausalLM

    lengths = []
    forward = DeepMemoryForCausalLM.forward

    def spy(self, input_ids=None, **kw):
        lengths.append(input_ids.shape[1])
        return forward(self, input_ids, **kw)

    monkeypatch.setattr(DeepMemoryForCausalLM, "forward", spy)
    prompt = "the memory stores keys "  # 23 bytes
    assert main(gen(run, "--prompt", prompt, "--temperature", "0", "--no-stream")) == 0
    whole = capsys.readouterr().out
    assert lengths[0] == 23
    for size, pieces in ((1, [1] * 23), (5, [5, 5, 5, 5, 3])):
        lengths.clear()
        assert main(gen(run, "--prompt", prompt, "--temperature", "0", "--no-stream", "--chunk-size", str(size))) == 0
        assert capsys.readouterr().out == whole
        assert lengths[: len(pieces)] == pieces


def test_samples_prompts_and_sampling_options(run, capsys, tmp_path, monkeypatch):
    assert (
        main(
            gen(
                run,
                "--prompt",
                "the ",
                "--prompt",
                "keys ",
                "--num-samples",
                "2",
                "--top-p",
                "0.9",
                "--repetition-penalty",
                "1.3",
                "--seed",
                "3",
            )
        )
        == 0
    )
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("=== ")]
    assert headers == [
        "=== prompt 1, sample 1 ===",
        "=== prompt 1, sample 2 ===",
        "=== prompt 2, sample 1 ===",
        "=== prompt 2, sample 2 ===",
    ]
    assert (
        main(
            gen(
                run,
                "--prompt",
                "the ",
                "--prompt",
                "keys ",
                "--num-samples",
                "2",
                "--top-p",
                "0.9",
                "--repetition-penalty",
                "1.3",
                "--seed",
                "3",
            )
        )
        == 0
    )
    assert capsys.readouterr().out == out  # seeded

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the \n\nkeys \n")
    assert main(gen(run, "--prompt-file", str(prompts), "--temperature", "0")) == 0
    from_file = capsys.readouterr().out
    assert [line for line in from_file.splitlines() if line.startswith("===")] == [
        "=== prompt 1 ===",
        "=== prompt 2 ===",
    ]
    monkeypatch.setattr("sys.stdin", io.StringIO("the \nkeys \n"))
    assert main(gen(run, "--prompt-file", "-", "--temperature", "0")) == 0
    assert capsys.readouterr().out == from_file


def test_threads(run, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(gen(run, "--prompt", "a", "--no-stream")) == 0
        assert torch.get_num_threads() == 1  # one thread by default on a CPU
        assert main(gen(run, "--prompt", "a", "--threads", "2", "--no-stream")) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--repetition-penalty", "0"], "--repetition-penalty must be a finite number > 0"),
        (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
        (["--num-samples", "0"], "--num-samples must be in [1, 1024]"),
        (["--num-samples", "100000000000"], "--num-samples must be in [1, 1024]"),
        (["--seed", "-1"], "--seed must be in [0, 2**63)"),
        (["--num-samples", "2", "--stream"], "--stream shows one sequence"),
        (["--threads", "0"], "--threads must be in [1, 1024]"),
        (["--chunk-size", "0"], "--chunk-size must be >= 1"),
        ([], "give a prompt"),
        (["--prompt-file", os.devnull], "holds no prompt"),
    ],
)
def test_errors_are_one_line(run, capsys, extra, match):
    assert main(gen(run, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepmemory generate: error: ") and match in err[0], err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["generate", "--checkpoint", "x", "--top-p", "abc"], "argument --top-p: invalid float value: 'abc'"),
        (["train", "--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
        # every float option is finite and every int option within int64, on every subcommand
        (
            ["generate", "--checkpoint", "x", "--repetition-penalty", "inf"],
            "argument --repetition-penalty: expected a finite number",
        ),
        (["generate", "--checkpoint", "x", "--temperature", "nan"], "argument --temperature: expected a finite number"),
        (
            ["generate", "--checkpoint", "x", "--seed", "99999999999999999999999"],
            "argument --seed: expected an integer below 2**63",
        ),
        (["bogus"], "argument COMMAND: invalid choice: 'bogus'"),
    ],
)
def test_argparse_errors_are_one_line(capsys, argv, match):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepmemory") and match in err[0] and "--help" in err[0], err
