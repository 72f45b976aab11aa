"""Shared by tests/test_bad_input.py and tests/test_bad_input_properties.py: a small world to throw
bad input at (a corpus, a tiny config, a Hugging Face tokenizer, a trained run directory), the
in-process command line and the checks every refusal must pass (docs/security.md)."""

import contextlib
import hashlib
import io
import json
import os
import random

from deepmemory.cli import main

TINY = {
    "model_overrides": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
}
WORDS = "the memory learns to store keys and values while it reads a long sequence".split()


def tree(*roots):
    """``{path: sha256}`` of every file below ``roots``."""
    out = {}
    for root in roots:
        for d, _, files in os.walk(root):
            for f in files:
                p = os.path.join(d, f)
                with open(p, "rb") as fh:
                    out[p] = hashlib.sha256(fh.read()).hexdigest()
    return out


def unchanged(before, after):
    """The files of ``before`` that were changed or removed in ``after`` (new files are allowed)."""
    return sorted(p for p, h in before.items() if after.get(p) != h)


def run_cli(argv):
    """``deepmemory ARGV`` in this process: ``(exit code, stdout, stderr)``; an exception other than
    ``SystemExit`` propagates (a traceback is what the tests forbid)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def one_error_line(err, command):
    """The single line of ``err``, checked to be ``deepmemory COMMAND...: error: ...`` without a traceback."""
    assert "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"deepmemory {command}".strip()) and ": error: " in lines[0], lines[0]
    return lines[0]


def write_tokenizer(path, words=WORDS):
    """A word-level ``tokenizer.json`` over ``words`` with ``[UNK]`` 0 and ``</s>`` 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(
        models.WordLevel({"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


_WORLDS = {}


def shared_world(tmp_path_factory):
    """:func:`make_world`, made once per test session (with one intra-op thread)."""
    import torch

    key = id(tmp_path_factory)
    if key not in _WORLDS:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _WORLDS[key] = make_world(tmp_path_factory.mktemp("world"))
        finally:
            torch.set_num_threads(before)
    return _WORLDS[key]


def make_world(root):
    """A corpus, the tiny config, a tokenizer and a run trained 2 steps with it (checkpoint step 2);
    beside them an empty folder, a ``.jsonl`` file with an undecodable line and a binary file."""
    (root / "empty").mkdir()
    (root / "bad.jsonl").write_bytes(b'{"text": "ok"}\n\xff\xfe not json\n')
    (root / "binary.bin").write_bytes(bytes(range(256)) * 4)
    r = random.Random(0)
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(r.choice(WORDS) for _ in range(100)) + "\n")
    tiny = root / "tiny.json"
    tiny.write_text(json.dumps(TINY))
    tok = write_tokenizer(root / "tokenizer.json")
    run = root / "run"
    code, _, err = run_cli(
        train_args(str(corpus), str(tiny), str(run), "--steps", "2", "--eval-every", "2", "--tokenizer", tok)
    )
    assert code == 0, err[-3000:]
    return {"corpus": str(corpus), "tiny": str(tiny), "tok": tok, "run": str(run), "root": str(root)}


def train_args(corpus, tiny, out, *extra):
    """``deepmemory train`` of the tiny transformer on ``corpus`` into ``out`` (1 step unless ``extra`` says)."""
    return [
        "train",
        "--model",
        "transformer",
        "--config",
        tiny,
        "--data",
        corpus,
        "--val-fraction",
        "0.25",
        "--seq-len",
        "16",
        "--batch-size",
        "4",
        "--eval-tokens",
        "64",
        "--steps",
        "1",
        "--out",
        out,
        *extra,
    ]
