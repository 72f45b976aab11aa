"""The validation split keeps its share of the tokens between half and twice --val-fraction;
symbolic links to folders are followed."""

import os

import pytest

from deepmemory.data import ByteTokenizer, build_corpus
from deepmemory.data.corpus import VAL_MAX_RATIO, VAL_MIN_RATIO, split_documents


def share(c):
    return c.val.numel() / (c.train.numel() + c.val.numel())


@pytest.mark.parametrize("n, fraction", [(6, 0.02), (6, 0.1), (6, 0.25), (20, 0.05), (3, 0.3)])
def test_share_of_tokens_is_bounded(tmp_path, n, fraction):
    import random

    r = random.Random(n)
    for i in range(n):
        (tmp_path / f"doc{i}.txt").write_text("x" * r.randint(500, 5000))
    c = build_corpus([str(tmp_path)], ByteTokenizer(), val_fraction=fraction)
    assert VAL_MIN_RATIO * fraction - 1e-3 <= share(c) <= VAL_MAX_RATIO * fraction + 1e-3, (c.val_docs, share(c))
    assert c.train.numel() > 0 and c.val.numel() > 0


def test_a_large_document_is_not_validation(tmp_path):
    # one of six documents, a third of the text, picked by the hash would be a third of validation
    names = [f"d/{i}" for i in range(6)]
    sizes = [100, 100, 100, 100, 100, 250]
    for fraction in (0.02, 0.1, 0.2):
        chosen = split_documents(names, sizes, fraction)
        if chosen is not None:
            got = sum(s for s, c in zip(sizes, chosen) if c) / sum(sizes)
            assert VAL_MIN_RATIO * fraction <= got <= VAL_MAX_RATIO * fraction
    assert split_documents(names, sizes, 0.02) is None  # no whole document fits: the stream is cut


def test_stream_cut_when_no_document_fits(tmp_path):
    for i in range(6):
        (tmp_path / f"doc{i}.txt").write_text("y" * 1000)
    c = build_corpus([str(tmp_path)], ByteTokenizer(), val_fraction=0.02)
    assert c.val_docs == 0 and share(c) == pytest.approx(0.02, abs=1e-3)


def test_symlinked_folders_are_read_once(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    for i in range(8):
        (real / f"doc{i}.txt").write_text(f"document {i} " * 50)
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(real, data / "linked")
    os.symlink(data, data / "linked" / "loop")  # a cycle is not followed twice
    direct = build_corpus([str(real)], ByteTokenizer(), val_fraction=0.25)
    linked = build_corpus([str(data)], ByteTokenizer(), val_fraction=0.25)
    assert linked.train_docs + linked.val_docs == 8 and linked.val.numel() > 0
    assert direct.train.numel() + direct.val.numel() == linked.train.numel() + linked.val.numel()
    through = build_corpus([str(data / "linked")], ByteTokenizer(), val_fraction=0.25)
    assert through.train_docs + through.val_docs == 8 and through.val.numel() > 0
