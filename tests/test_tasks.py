"""The synthetic recall task (MQAR): layout, determinism, scoring, errors."""

import pytest
import torch

from deepmemory.data.tasks import IGNORE_INDEX, MQAR, recall_accuracy


def test_rows_show_pairs_then_queries_of_them():
    task = MQAR(vocab_size=64, seq_len=48, num_pairs=6, num_queries=9)
    ids, labels = task.sample(5, torch.Generator().manual_seed(0))
    assert ids.shape == labels.shape == (5, 48) and ids.dtype == labels.dtype == torch.long
    half = 32
    for row, lab in zip(ids.tolist(), labels.tolist()):
        keys, values = row[0:12:2], row[1:12:2]
        assert len(set(keys)) == 6 and all(1 <= k < half for k in keys) and all(half <= v < 64 for v in values)
        pairs = dict(zip(keys, values))
        scored = [t for t in range(48) if lab[t] != IGNORE_INDEX]
        assert len(scored) == 9 and all(t >= 12 for t in scored)
        for t in scored:  # a query: a key shown before, labelled (and followed) by its value
            assert pairs[row[t]] == lab[t] == row[t + 1]
        others = [row[t] for t in range(12, 48) if t not in scored and t - 1 not in scored]
        assert set(others) <= {0}


def test_same_generator_state_same_rows():
    task = MQAR()
    a = task.sample(3, torch.Generator().manual_seed(7))
    b = task.sample(3, torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert task.queries == (64 - 16) // 4


def test_recall_accuracy_counts_scored_positions_only():
    labels = torch.full((1, 4), IGNORE_INDEX)
    labels[0, 1], labels[0, 3] = 2, 0
    logits = torch.zeros(1, 4, 3)
    logits[0, 1, 2] = 1.0  # right
    logits[0, 3, 1] = 1.0  # wrong
    logits[0, 0, 0] = logits[0, 2, 0] = 5.0  # unscored
    assert recall_accuracy(logits, labels) == 0.5
    with pytest.raises(ValueError, match="no position"):
        recall_accuracy(logits, torch.full((1, 4), IGNORE_INDEX))


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(vocab_size=3), ValueError, "vocab_size must be >= 4"),
    (dict(num_pairs=64), ValueError, r"num_pairs must be <= .* = 63"),
    (dict(seq_len=17), ValueError, r"seq_len must be >= .* = 18; got 17"),
    (dict(num_queries=0), ValueError, "num_queries must be >= 1"),
    (dict(num_queries=25), ValueError, r"num_queries must be <= .* = 24; got 25"),
    (dict(seq_len=64.0), TypeError, "seq_len must be an int"),
])
def test_bad_settings_are_one_line_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        MQAR(**kwargs)
