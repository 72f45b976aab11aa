import pytest
import torch

import deepmemory
from deepmemory.threads import default_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_set_threads_sets_and_returns_the_count(restore_threads):
    assert deepmemory.set_threads(2) == 2 == torch.get_num_threads()
    assert deepmemory.set_threads(1) == 1 == torch.get_num_threads()


def test_default_is_one_thread_unless_omp_num_threads(restore_threads, monkeypatch):
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert default_threads() is None
    assert deepmemory.set_threads() == 2  # the environment's count is kept
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == 1
    assert deepmemory.set_threads() == 1 == torch.get_num_threads()


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (0, ValueError, "threads must be >= 1; got 0"),
        (2.0, TypeError, "threads must be an int"),
        (True, TypeError, "threads must be an int"),
        (10**6, ValueError, "threads must be <= 1024"),
    ],
)
def test_bad_thread_counts(bad, error, match):
    with pytest.raises(error, match=match):
        deepmemory.set_threads(bad)
