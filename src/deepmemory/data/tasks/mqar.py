"""MQAR: multi-query associative recall in the Zoology format (Arora et al., 2023, "Zoology:
Measuring and Improving Recall in Efficient Language Models", Sec. 3).

A row shows ``num_pairs`` key–value pairs, then queries: keys seen before, each followed by its
value. Only the value after a query key is scored, so a model must recall the pair from context;
a model without recall scores ``1 / num_values``::

    k1 v1 k2 v2 ... kn vn  0 0 k3 v3 0 k1 v1 0 ...
                                  ^^        ^^      scored (predicting v3 from k3, v1 from k1)

Keys are drawn from ``[1, vocab_size // 2)``, values from ``[vocab_size // 2, vocab_size)``,
distinct keys per row; token 0 fills the gaps. Queries sit at random non-overlapping
positions after the pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...checks import Settings, check_int
from .base import IGNORE_INDEX, Task, TaskSample


@dataclass(frozen=True)
class MQAR(Settings):
    """Multi-query associative recall (Zoology).

    Args:
        vocab_size: tokens 0 .. vocab_size-1 (int >= 4; half keys, half values).
        seq_len: tokens per row (int >= 2 * num_pairs + 2).
        num_pairs: key–value pairs shown (int >= 1, at most ``vocab_size // 2 - 1`` distinct keys).
        num_queries: queries after the pairs (int >= 1, at most ``(seq_len - 2 * num_pairs) // 2``;
            None: half that many, so queries are spread out with gaps between them).

    Raises:
        TypeError / ValueError: a one-line message naming the bad field.
    """

    vocab_size: int = 128
    seq_len: int = 64
    num_pairs: int = 8
    num_queries: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.vocab_size < 4:
            raise ValueError(f"vocab_size must be >= 4; got {self.vocab_size}")
        if self.num_pairs > self.vocab_size // 2 - 1:
            raise ValueError(
                f"num_pairs must be <= vocab_size // 2 - 1 = {self.vocab_size // 2 - 1} (distinct keys); "
                f"got {self.num_pairs}"
            )
        room = (self.seq_len - 2 * self.num_pairs) // 2
        if room < 1:
            raise ValueError(f"seq_len must be >= 2 * num_pairs + 2 = {2 * self.num_pairs + 2}; got {self.seq_len}")
        if self.num_queries is not None and self.num_queries > room:
            raise ValueError(f"num_queries must be <= (seq_len - 2 * num_pairs) // 2 = {room}; got {self.num_queries}")

    @property
    def queries(self) -> int:
        """Queries per row."""
        if self.num_queries is not None:
            return self.num_queries
        return max(1, (self.seq_len - 2 * self.num_pairs) // 4)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(input_ids, labels)``, both ``[batch_size, seq_len]`` int64 on the CPU. ``labels[b, t]``
        is the token to predict after ``input_ids[b, :t+1]`` (already shifted, as a causal LM's
        targets) where that is a recalled value, ``IGNORE_INDEX`` elsewhere. Rows are a function
        of the generator's state alone.

        Raises:
            ValueError: ``batch_size`` < 1.
        """
        check_int("batch_size", batch_size)
        n, half, t = self.num_pairs, self.vocab_size // 2, self.seq_len
        keys = torch.argsort(torch.rand(batch_size, half - 1, generator=generator), 1)[:, :n] + 1
        values = torch.randint(half, self.vocab_size, (batch_size, n), generator=generator)
        ids = torch.zeros(batch_size, t, dtype=torch.long)
        ids[:, 0 : 2 * n : 2], ids[:, 1 : 2 * n : 2] = keys, values
        labels = torch.full((batch_size, t), IGNORE_INDEX, dtype=torch.long)
        # queries on disjoint 2-token slots after the pairs
        slots = (t - 2 * n) // 2
        which_slot = torch.argsort(torch.rand(batch_size, slots, generator=generator), 1)[:, : self.queries]
        which_pair = torch.randint(0, n, (batch_size, self.queries), generator=generator)
        rows = torch.arange(batch_size)[:, None]
        pos = 2 * n + 2 * which_slot
        ids[rows, pos] = keys.gather(1, which_pair)
        ids[rows, pos + 1] = values.gather(1, which_pair)
        labels[rows, pos] = values.gather(1, which_pair)
        return ids, labels


MQAR.FIELD_CHECKS = {
    "vocab_size": check_int,
    "seq_len": check_int,
    "num_pairs": check_int,
    "num_queries": lambda label, v: v is None or check_int(label, v),
}


def _optional_count(label, value) -> None:
    if value is not None:
        check_int(label, value)


class MQARTask(Task):
    """``mqar``: the Zoology rows of :class:`MQAR` behind the :class:`Task` interface.

    Settings: ``vocab_size`` (int >= 4, default 128; Zoology uses 8192), ``num_pairs`` (int >= 1,
    at most ``vocab_size // 2 - 1``, default 8), ``num_queries`` (queries per row, int >= 1 or
    None for ``max(1, (row length - 2 num_pairs) // 4)``).

    ``sample(length, seed)``: the pairs, then ``num_queries - 1`` answered queries at random
    2-token slots, then the last query's key as the prompt's final token; the answer is its value
    (one token). ``batch`` rows are :meth:`MQAR.sample` rows of ``length`` tokens with every
    query scored. ``min_length = 2 num_pairs + 1``, ``min_row_length = 2 num_pairs + 2``.
    """

    name = "mqar"
    kind = "tokens"
    SETTINGS = {
        "vocab_size": (128, check_int),
        "num_pairs": (8, check_int),
        "num_queries": (None, _optional_count),
    }

    def __init__(self, **settings):
        super().__init__(**settings)
        # MQAR checks the vocabulary against the pairs (one-line errors naming the field)
        MQAR(vocab_size=self.vocab_size, seq_len=2 * self.num_pairs + 2, num_pairs=self.num_pairs)
        self.min_length = 2 * self.num_pairs + 1
        self.min_row_length = 2 * self.num_pairs + 2

    def _queries(self, row_length: int) -> int:
        if self.num_queries is not None:
            return self.num_queries
        return max(1, (row_length - 2 * self.num_pairs) // 4)

    def _sample(self, length: int, seed: int, depth: float | None) -> TaskSample:
        rng = self.rng("sample", length, seed)
        n, half = self.num_pairs, self.vocab_size // 2
        keys = rng.sample(range(1, half), n)
        values = [rng.randrange(half, self.vocab_size) for _ in range(n)]
        ids: list[int] = [0] * length
        ids[0 : 2 * n : 2], ids[1 : 2 * n : 2] = keys, values
        slots = (length - 1 - 2 * n) // 2  # 2-token slots between the pairs and the last query
        others = self._queries(length + 1) - 1
        if others > slots:
            raise ValueError(
                f"mqar: num_queries {others + 1} does not fit a prompt of {length} tokens (at most {slots + 1})"
            )
        for slot in rng.sample(range(slots), others):
            pair = rng.randrange(n)
            ids[2 * n + 2 * slot], ids[2 * n + 2 * slot + 1] = keys[pair], values[pair]
        pair = rng.randrange(n)
        ids[length - 1] = keys[pair]
        return TaskSample(
            prompt_ids=ids, answer_ids=[values[pair]], answer=str(values[pair]), depth=None, needle_positions=[]
        )

    def batch(self, batch_size: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        check_int("batch_size", batch_size)
        self.check_length(length, row=True)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}")
        task = MQAR(vocab_size=self.vocab_size, seq_len=length, num_pairs=self.num_pairs, num_queries=self.num_queries)
        return task.sample(batch_size, generator)

    batch.__doc__ = Task.batch.__doc__
