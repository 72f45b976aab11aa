"""`deepmemory train` packs documents with boundaries (docs/training.md, "Documents and packing"):
the corpus's document starts, the loader's `starts`, position ids and labels, the packed loss
against each document run alone, what the model is given with and without packing, an exact
resume, and the flags' errors."""

import json
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

from deepmemory.cli import main
from deepmemory.data import (
    ByteTokenizer,
    WindowSampler,
    build_corpus,
    eval_window_starts,
    eval_windows,
    packed_labels,
    packed_position_ids,
    window_starts,
)
from deepmemory.data import corpus as corpus_module

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
LENGTHS = [1, 7, 63, 100, 2, 31, 17, 5, 90, 3, 44, 12]  # bytes per document: awkward, some shorter than a window


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def write_docs(root, lengths, seed=0):
    """Documents of ``lengths`` random letters; returns ``{name: bytes}``."""
    r = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    docs = {}
    for i, n in enumerate(lengths):
        text = "".join(r.choice("abcdefgh ") for _ in range(n)).encode()
        (root / f"doc{i:02d}.txt").write_bytes(text)
        docs[f"{root.name}/doc{i:02d}.txt"] = text
    return docs


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing") / "corpus"
    write_docs(root, LENGTHS * 3, seed=1)
    cfg = root.parent / "tiny.json"
    cfg.write_text(json.dumps({"model_overrides": TINY}))
    return {"data": str(root), "config": str(cfg)}


def pieces(stream, starts):
    """The stream cut at ``starts``: one tensor per document."""
    edges = starts.tolist() + [stream.numel()]
    return [stream[a:b] for a, b in zip(edges[:-1], edges[1:])]


# ---------------------------------------------------------------- the corpus and the loader
def test_corpus_starts_are_its_documents(tmp_path):
    docs = write_docs(tmp_path / "c", LENGTHS, seed=2)
    tok = ByteTokenizer()
    c = build_corpus([str(tmp_path / "c")], tok, val_fraction=0.3)
    eos = tok.eos_id
    want = sorted(tok.encode(text).tolist() + [eos] for text in docs.values())
    got = sorted(
        p.tolist() for split in ("train", "val") for p in pieces(getattr(c, split), getattr(c, f"{split}_starts"))
    )
    assert got == want  # every document exactly once, each piece one whole document and its end id
    assert len(c.train_starts) == c.train_docs and len(c.val_starts) == c.val_docs
    for split in ("train", "val"):
        stream, starts = getattr(c, split), getattr(c, f"{split}_starts")
        assert starts.dtype == torch.int64 and int(starts[0]) == 0
        assert all(int(stream[s - 1]) == eos for s in starts[1:].tolist())  # each begins after an end-of-document id


def test_corpus_starts_when_the_stream_is_cut(tmp_path, monkeypatch):
    docs = write_docs(tmp_path / "c", LENGTHS, seed=3)
    monkeypatch.setattr(corpus_module, "split_documents", lambda *a: None)  # no choice of whole documents fits
    tok = ByteTokenizer()
    c = build_corpus([str(tmp_path / "c")], tok, val_fraction=0.3)
    sizes = [len(docs[n]) + 1 for n in sorted(docs)]  # (the folder is read in name order) + end id
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    cut = c.train.numel()
    assert c.train_starts.tolist() == [o for o in offsets if o < cut]
    assert c.val_starts.tolist() == [0] + [o - cut for o in offsets if o > cut]  # the cut piece counts as a document


def test_window_starts_match_the_documents():
    r = random.Random(4)
    lengths = [r.choice([1, 2, 7, 13, 63, 100]) for _ in range(60)]
    doc_starts = torch.tensor([sum(lengths[:i]) for i in range(len(lengths))])
    tokens = torch.arange(sum(lengths), dtype=torch.int32)  # each token its own offset
    found = set(doc_starts.tolist())
    packed, plain = WindowSampler(tokens, 7, seed=5, doc_starts=doc_starts), WindowSampler(tokens, 7, seed=5)
    for size in (3, 1, 11, 64):  # crosses epochs
        rows, starts = packed.next_packed(size)
        assert torch.equal(rows, plain.next_batch(size))  # the same windows as without packing
        assert starts.tolist() == [[o in found for o in row] for row in rows.tolist()]
    assert packed.state_dict() == plain.state_dict()
    rows = eval_windows(tokens, 9, 20)
    starts = eval_window_starts(doc_starts, tokens.numel(), 9, 20)
    assert starts.tolist() == [[o in found for o in row] for row in rows.tolist()]
    assert window_starts(doc_starts[:0], rows).sum() == 0
    with pytest.raises(ValueError, match="next_packed needs the document starts"):
        plain.next_packed(2)
    with pytest.raises(ValueError, match="must be sorted"):
        WindowSampler(tokens, 7, 0, doc_starts=doc_starts.flip(0))
    with pytest.raises(ValueError, match=r"must lie in \[0, "):
        WindowSampler(tokens, 7, 0, doc_starts=doc_starts + 10**6)


def test_position_ids_and_labels():
    g = torch.Generator().manual_seed(6)
    starts = torch.rand(5, 37, generator=g) < 0.2
    ids = torch.randint(0, 256, (5, 37), generator=g)
    pos = packed_position_ids(starts)
    for b in range(5):
        count = 0
        for t in range(37):
            count = 0 if (t == 0 or starts[b, t]) else count + 1
            assert pos[b, t] == count
    labels = packed_labels(ids, starts)
    assert torch.equal(labels == -100, starts) and torch.equal(labels[~starts], ids[~starts])
    with pytest.raises(ValueError, match="2-D bool"):
        packed_position_ids(starts.long())


# ---------------------------------------------------------------- the loss
def _model(name):
    from deepmemory.models import build

    torch.manual_seed(0)
    extra = {"segment_size": 8, "attention_window": 8} if name == "titans-mac" else {}
    return build(name, "tiny", vocab_size=64, **TINY, **extra).double().eval()


@pytest.mark.parametrize("name", ["transformer", "gated-deltanet", "titans-mac"])
def test_packed_loss_is_each_document_alone(name):
    """The trainer's packed loss (and the validation mean) equals the sum over the documents, each
    run alone, of their own next-token losses, in float64."""
    from deepmemory.train.distributed import Env
    from deepmemory.train.trainer import next_token_loss, scored_targets, validation_loss

    model = _model(name)
    g = torch.Generator().manual_seed(7)
    L = 40
    rows = torch.randint(0, 64, (3, L + 1), generator=g)
    starts = torch.zeros(3, L + 1, dtype=torch.bool)
    for b, cuts in enumerate(([1, 8, 9, 30], [17], [2, 3, 4, 39, 40])):  # documents of 1, 7, 21, ... tokens
        starts[b, cuts] = True
    with torch.no_grad():
        got = next_token_loss(model, rows, "sum", starts)
        want, count = torch.zeros((), dtype=torch.float64), 0
        for b in range(3):
            edges = [0] + [t for t in range(1, L + 1) if starts[b, t]] + [L + 1]
            for a, e in zip(edges[:-1], edges[1:]):
                if e - a < 2:
                    continue  # a one-token document (or the last token) has no target of its own
                logits = model(input_ids=rows[b : b + 1, a : e - 1], use_cache=False).logits[0]
                want += F.cross_entropy(logits, rows[b, a + 1 : e], reduction="sum")
                count += e - a - 1
    assert count == scored_targets(rows, starts)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    plain = next_token_loss(model, rows, "sum")  # the stream read across the boundaries differs
    assert not torch.allclose(plain, want)
    val = validation_loss(model, rows, 2, Env(), "fp32", starts)
    assert val == pytest.approx(float(want) / count, rel=1e-10)


# ---------------------------------------------------------------- the trainer
def _settings(corpus_dir, out, **extra):
    return dict(
        model="transformer",
        model_overrides=TINY,
        data=[corpus_dir["data"]],
        val_fraction=0.25,
        seq_len=16,
        batch_size=4,
        steps=2,
        eval_every=10,
        eval_tokens=64,
        lr=1e-2,
        out=str(out),
        **extra,
    )


def _inputs_seen(corpus_dir, out, **extra):
    """The keyword arguments of each training forward of one step of a run of ``extra``."""
    from deepmemory.train.config import new_config
    from deepmemory.train.distributed import Env
    from deepmemory.train.trainer import Trainer

    with Trainer(new_config(_settings(corpus_dir, out, **extra)), Env(), quiet=True) as t:
        t.restore()
        seen = []
        t.model.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)
        rows, starts = t.sampler.next_packed(4) if t.cfg.packing else (t.sampler.next_batch(4), None)
        t.train_step((rows, starts) if starts is not None else rows)
        return t.cfg, seen, rows, starts


def test_packing_gives_position_ids_and_no_packing_none(corpus_dir, tmp_path):
    cfg, seen, rows, starts = _inputs_seen(corpus_dir, tmp_path / "p")
    assert cfg.packing is True and len(seen) == 1 and starts[:, 1:].any()  # the default, and boundaries in the batch
    assert torch.equal(seen[0]["position_ids"], packed_position_ids(starts[:, :-1]))
    assert torch.equal(seen[0]["input_ids"], rows[:, :-1])
    cfg, seen, rows, _ = _inputs_seen(corpus_dir, tmp_path / "n", packing=False)
    assert cfg.packing is False and "position_ids" not in seen[0] and torch.equal(seen[0]["input_ids"], rows[:, :-1])


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def argv(corpus_dir, *extra):
    return [
        "train",
        "--model",
        "transformer",
        "--config",
        corpus_dir["config"],
        "--data",
        corpus_dir["data"],
        "--val-fraction",
        "0.25",
        "--seq-len",
        "16",
        "--batch-size",
        "4",
        "--eval-every",
        "3",
        "--eval-tokens",
        "64",
        "--lr",
        "1e-2",
        *extra,
    ]


def test_packed_run_resumes_bitwise(corpus_dir, tmp_path):
    a, b = str(tmp_path / "A"), str(tmp_path / "B")
    assert main(argv(corpus_dir, "--steps", "6", "--out", a)) == 0
    assert main(argv(corpus_dir, "--steps", "3", "--lr-decay-steps", "6", "--out", b)) == 0
    assert main(["train", "--resume", b, "--steps", "6"]) == 0
    assert json.load(open(os.path.join(b, "run.json")))["train"]["packing"] is True
    rows = lambda run: [(r["step"], r.get("loss"), r.get("val_loss")) for r in metrics(run)]  # noqa: E731
    assert rows(b) == rows(a) and all(math.isfinite(r[1] if r[1] is not None else r[2]) for r in rows(a))
    assert (
        open(os.path.join(b, "model.safetensors"), "rb").read()
        == open(os.path.join(a, "model.safetensors"), "rb").read()
    )


def one_error_line(capsys, args, match):
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deepmemory train: error: "), lines
    assert match in lines[0], lines[0]


def test_bad_packing_flags_exit_2(corpus_dir, tmp_path, capsys):
    one_error_line(
        capsys,
        ["train", "--task", "mqar", "--packing", "--out", str(tmp_path / "t")],
        "a --task has one sample per row already",
    )
    with pytest.raises(SystemExit) as exit_:  # a malformed option: argparse's exit, one line
        main(["train", "--packing=yes"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and "--packing" in lines[0] and "'yes'" in lines[0], lines
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"packing": "yes"}))
    one_error_line(
        capsys, ["train", "--config", str(bad), "--out", str(tmp_path / "b")], "packing must be true or false"
    )
    run = str(tmp_path / "R")
    assert main(argv(corpus_dir, "--steps", "1", "--out", run)) == 0
    capsys.readouterr()
    one_error_line(
        capsys,
        ["train", "--resume", run, "--steps", "2", "--no-packing"],
        "--no-packing differs from the run's --packing",
    )
    # a run recorded before packing existed read one continuous stream
    record = json.load(open(os.path.join(run, "run.json")))
    del record["train"]["packing"]
    with open(os.path.join(run, "run.json"), "w") as f:
        json.dump(record, f)
    one_error_line(
        capsys, ["train", "--resume", run, "--steps", "2", "--packing"], "--packing differs from the run's --no-packing"
    )


# ---------------------------------------------------------------- the bench
def test_bench_documents_rows_and_table(capsys, monkeypatch):
    from deepmemory.bench import model as bench_model

    starts = bench_model.document_starts(3, 37, 5)
    assert starts.sum(1).tolist() == [5, 5, 5] and starts[:, 0].all()
    assert bench_model.document_starts(3, 37, 5).equal(starts)  # fixed seed: every case packs alike
    with pytest.raises(ValueError, match=r"--documents must be in \[1, --seq 4\]"):
        bench_model.document_starts(1, 4, 5)
    calls = []

    def fake(module, case):
        calls.append(case)
        packed = bool(case.get("documents"))
        return {"tokens_per_s": 250.0 if packed else 1000.0, "peak_mib": 30.0 if packed else 20.0, "params": 1e5}

    monkeypatch.setattr(bench_model, "run_isolated", fake)
    rows = bench_model.run_packing(["titans-mac"], "tiny", 4, seq=37, batch=2)
    assert [c.get("documents") for c in calls] == [None, 4]
    assert [(r["documents/row"], r["x 1 doc"], r["x peak"]) for r in rows] == [
        ("1", "1.00", "1.00"),
        ("4", "0.25", "1.50"),
    ]
    assert "4 documents each" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, match",
    [
        (["model", "--documents", "9", "--seq", "8"], "--documents 9 exceeds --seq 8"),
        (["decode", "--documents", "2"], "unrecognized arguments: --documents 2"),  # decode lists no training flag
        (["model", "--documents", "0"], "must be >= 1"),
    ],
)
def test_bench_bad_documents_exit_2(args, match, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and match in lines[0], lines
