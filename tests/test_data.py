"""Corpora, tokenizers and the window sampler."""

import collections
import json
import math
import os

import pytest
import torch

from deepmemory.data import (
    ByteTokenizer,
    DataError,
    HFTokenizer,
    WindowSampler,
    build_corpus,
    byte_entropy,
    eval_windows,
    is_validation,
    load_tokenizer,
    stdlib_documents,
    tokenizer_from_info,
)


def write_docs(root, n=12, words=300, seed=0):
    import random

    r = random.Random(seed)
    vocab = "alpha beta gamma delta memory key value read write é 名".split()
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        with open(os.path.join(root, f"doc{i:02d}.txt"), "w", encoding="utf-8") as f:
            f.write(" ".join(r.choice(vocab) for _ in range(words)) + "\n")
    return root


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'é名' * 3\n"
    ids = tok.encode(text)
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids.tolist() + [tok.eos_id]) == text
    assert tok.vocab_size == 257 and tok.encode(b"").numel() == 0


def _hf_tokenizer_file(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "</s>": 1, "alpha": 2, "beta": 3, "gamma": 4, "memory": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer(tmp_path):
    path = _hf_tokenizer_file(tmp_path / "tokenizer.json")
    tok = load_tokenizer(path)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 6 and tok.eos_id == 1
    assert tok.encode("alpha gamma memory zeta").tolist() == [2, 4, 5, 0]
    out = tmp_path / "run"
    out.mkdir()
    tok.save(str(out))
    again = tokenizer_from_info(tok.info(), str(out))
    assert again.encode("beta alpha").tolist() == [3, 2]


def test_bad_tokenizer(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="cannot read"):
        load_tokenizer(str(bad))


def test_stdlib_corpus_excludes_tests_and_site_packages():
    docs = stdlib_documents()
    names = [n for n, _ in docs]
    assert len(names) > 100 and len(set(names)) == len(names)
    assert "os.py" in names and "json/decoder.py" in names
    for n in names:
        parts = n.split("/")
        assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(parts), n
        assert n.endswith(".py")


def test_split_is_deterministic_and_by_document(tmp_path):
    root = write_docs(str(tmp_path / "d"), n=40)
    tok = ByteTokenizer()
    a = build_corpus([root], tok, val_fraction=0.25)
    b = build_corpus([root], tok, val_fraction=0.25)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    names = sorted(os.listdir(root))
    val_names = [n for n in names if is_validation(f"d/{n}", 0.25)]
    assert 0 < len(val_names) < len(names) and a.val_docs == len(val_names)
    expect = []
    for n in val_names:
        expect += list(open(os.path.join(root, n), "rb").read()) + [tok.eos_id]
    assert a.val.tolist() == expect
    total = sum(os.path.getsize(os.path.join(root, n)) for n in names)
    assert a.train_bytes + a.val_bytes == total


def test_byte_entropy_matches_counter(tmp_path):
    root = write_docs(str(tmp_path / "d"), n=20, seed=3)
    c = build_corpus([root], ByteTokenizer(), val_fraction=0.2)
    counts = collections.Counter()
    for n in sorted(os.listdir(root)):
        if not is_validation(f"d/{n}", 0.2):
            counts.update(open(os.path.join(root, n), "rb").read())
    total = sum(counts.values())
    expect = -sum(v / total * math.log2(v / total) for v in counts.values())
    assert c.byte_entropy == pytest.approx(expect, rel=1e-12)
    assert byte_entropy(torch.ones(256)) == pytest.approx(8.0)


def test_single_file_falls_back_to_a_stream_cut(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("abcdefghij" * 100)
    c = build_corpus([str(f)], ByteTokenizer(), val_fraction=0.1)
    assert c.train.numel() + c.val.numel() == 1001 and c.val.numel() == 101


def test_jsonl(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"record {i} " * 20, "id": i}) for i in range(30)) + "\n")
    c = build_corpus([str(f)], ByteTokenizer(), val_fraction=0.2)
    assert c.train_docs + c.val_docs == 30
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 has no string field 'text'"):
        build_corpus([str(bad)], ByteTokenizer())


def test_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_corpus([str(tmp_path / "nope")], ByteTokenizer())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no text"):
        build_corpus([str(tmp_path / "empty")], ByteTokenizer())
    with pytest.raises(DataError, match="hf:|datasets"):
        build_corpus(["hf:some/dataset"], ByteTokenizer())


def test_sampler_visits_every_window_once_per_epoch_and_resumes():
    tokens = torch.arange(7 * 11 + 1).int()  # window j starts with token 7 j
    s = WindowSampler(tokens, seq_len=7, seed=5)
    assert s.num_windows == 11
    epoch = torch.cat([s.next_batch(3) for _ in range(3)] + [s.next_batch(2)])
    assert sorted((epoch[:, 0] // 7).tolist()) == list(range(11))
    assert torch.equal(epoch, epoch[:, :1] + torch.arange(8))  # inputs and the shifted targets
    assert (epoch[:, 0] // 7).tolist() != list(range(11))  # shuffled
    assert s.epoch == 1 and s.cursor == 0
    s.next_batch(5)
    state = s.state_dict()
    ahead = [s.next_batch(4) for _ in range(4)]  # crosses into the next epoch
    r = WindowSampler(tokens, seq_len=7, seed=5)
    r.load_state_dict(state)
    assert all(torch.equal(a, r.next_batch(4)) for a in ahead)
    with pytest.raises(DataError, match="does not fit"):
        WindowSampler(tokens, seq_len=5, seed=5).load_state_dict(state)


def test_eval_windows_are_spread_and_disjoint():
    tokens = torch.arange(1001).int()
    w = eval_windows(tokens, seq_len=10, max_windows=7)
    assert w.shape == (7, 11)
    starts = w[:, 0].tolist()
    assert starts == sorted(starts) and all(b - a >= 10 for a, b in zip(starts, starts[1:])) and starts[-1] > 800
    assert torch.equal(w[:, 1:], w[:, :-1] + 1)


def test_decode_takes_one_id_as_text_streamer_passes_it():
    tok = ByteTokenizer()
    assert tok.decode(10) == "\n" and tok.decode([104, 105]) == tok.decode(torch.tensor([104, 105])) == "hi"
