"""The task interface shared by every generator: :class:`Task`, :class:`TaskSample`, the label
convention (``IGNORE_INDEX``) and :func:`recall_accuracy`."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...checks import check_int

IGNORE_INDEX = -100  # the label of a position that is not scored (PyTorch's cross-entropy default)
SEED_LIMIT = 2**62  # batch() draws each row's seed below this


@dataclass(frozen=True)
class TaskSample:
    """One evaluation sample: a prompt and the completion that answers it.

    Attributes:
        prompt_ids: the prompt, ``length`` token ids (ints in ``[0, vocab)``).
        answer_ids: the tokens a model should emit after the prompt (greedy decoding of
            ``len(answer_ids)`` tokens is enough to score it).
        answer: the answer as text: the value or word that is scored (text tasks), or the
            answer ids as a space-separated string (token tasks).
        depth: where the needle or story sits, in ``[0, 1]``, or None (no depth: token tasks, or
            BABILong facts scattered at random).
        needle_positions: the token index in ``prompt_ids`` where each needle or supporting fact
            starts; for S-NIAH the queried needle first, then the distractors in prompt order;
            ``[]`` for token tasks.
    """

    prompt_ids: list[int]
    answer_ids: list[int]
    answer: str
    depth: float | None
    needle_positions: list[int]


def check_depth(depth) -> float | None:
    """None, or a number in ``[0, 1]`` (as a float); anything else is a one-line ``ValueError``."""
    if depth is None:
        return None
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a number in [0, 1]; got {depth!r}")
    return float(depth)


def check_fraction(name: str, value) -> None:
    """A number in ``[0, 1)``; ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1); got {value!r}")


def id_list(ids) -> list[int]:
    """Token ids as a list of ints: a tensor (one row), a sequence, or one int."""
    if isinstance(ids, Tensor):
        ids = ids.reshape(-1).tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


class Task:
    """A deterministic generator of prompts with known answers (see ``deepmemory.data.tasks``).

    Subclasses set ``name``, ``kind`` (``"text"`` or ``"tokens"``), ``vocab_size`` (the ids a
    token task uses; None for text tasks, which use their tokenizer), ``has_depth``, and
    ``min_length`` / ``min_row_length`` (the shortest prompt of :meth:`sample` and the shortest
    row of :meth:`batch`, in tokens), and implement ``_sample`` and ``_row``.

    ``SETTINGS`` maps each setting to ``(default, check)``; ``check(name, value)`` raises a
    one-line error. The settings in use are ``task.settings`` (a dict) and attributes.
    """

    SETTINGS: ClassVar[dict[str, tuple[Any, Callable[[str, Any], None]]]] = {}
    name: str = ""
    kind: str = ""
    has_depth: bool = False
    vocab_size: int | None = None
    min_length: int = 1
    min_row_length: int = 2

    def __init__(self, **settings: Any):
        for key in settings:
            if key not in self.SETTINGS:
                known = ", ".join(map(repr, self.SETTINGS)) or "none"
                raise ValueError(f"{self.name} has no setting {key!r}; its settings: {known}")
        values = {key: default for key, (default, _) in self.SETTINGS.items()}
        values.update(settings)
        for key, (_, check) in self.SETTINGS.items():
            check(key, values[key])
            setattr(self, key, values[key])
        self.settings: dict[str, Any] = values

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"{type(self).__name__}({self.name!r}{', ' + shown if shown else ''})"

    # ---- the interface ---------------------------------------------------------------------

    def sample(self, length: int, seed: int, depth: float | None = None) -> TaskSample:
        """The sample for ``(settings, length, seed, depth)``: the same inputs give the same
        sample on every machine (``random.Random`` seeded by a string of them).

        Args:
            length: prompt length in tokens (int >= ``min_length``); exact.
            seed: int >= 0.
            depth: where the needle sits, in ``[0, 1]`` (tasks with ``has_depth``); None draws
                it from the seed (S-NIAH) or scatters the facts (BABILong). Ignored by tasks
                without depth, but still checked.

        Raises:
            TypeError: ``length`` or ``seed`` not an int.
            ValueError: ``length`` below ``min_length``, ``seed`` < 0, ``depth`` outside [0, 1].
        """
        self.check_length(length)
        check_int("seed", seed, 0)
        depth = check_depth(depth)
        return self._sample(length, seed, depth if self.has_depth else None)

    def batch(self, batch_size: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Training rows: ``(input_ids, labels)``, both ``[batch_size, length]`` int64 on the CPU.

        Each row is a prompt and its answer (``length`` tokens in all); ``labels[b, t]`` is the
        token to predict after ``input_ids[b, :t+1]`` at answer positions and ``IGNORE_INDEX``
        elsewhere (multi-query tasks score every query of the row). Rows are a function of the
        generator's state alone (one seed per row is drawn from it).

        Raises:
            TypeError / ValueError: ``batch_size`` < 1, ``length`` below ``min_row_length``, a
                generator that is not a ``torch.Generator``.
        """
        check_int("batch_size", batch_size)
        self.check_length(length, row=True)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}")
        seeds = torch.randint(0, SEED_LIMIT, (batch_size,), generator=generator).tolist()
        ids = torch.empty(batch_size, length, dtype=torch.long)
        labels = torch.empty(batch_size, length, dtype=torch.long)
        for b, seed in enumerate(seeds):
            row, row_labels = self._row(length, seed)
            ids[b] = torch.as_tensor(row, dtype=torch.long)
            labels[b] = torch.as_tensor(row_labels, dtype=torch.long)
        return ids, labels

    def score(self, sample: TaskSample, output_ids: Sequence[int]) -> bool:
        """Whether ``output_ids`` (the tokens generated after ``sample.prompt_ids``) answer the
        sample: exact match of ``answer_ids`` for token tasks (text tasks override this)."""
        out = id_list(output_ids)
        return out[: len(sample.answer_ids)] == list(sample.answer_ids)

    # ---- helpers for the subclasses ---------------------------------------------------------

    def check_length(self, length, row: bool = False) -> None:
        """``length`` is an int >= ``min_length`` (or ``min_row_length`` for a training row)."""
        what = "row length" if row else "length"
        check_int(what, length)
        minimum = self.min_row_length if row else self.min_length
        if length < minimum:
            raise ValueError(f"{self.name}: {what} {length} is below the task's minimum of {minimum} tokens")

    def rng(self, purpose: str, length: int, seed: int) -> random.Random:
        """A ``random.Random`` seeded by the task, its settings, ``purpose``, ``length`` and
        ``seed`` (a string seed is hashed with SHA-512: the same on every platform and run)."""
        settings = ",".join(f"{k}={v!r}" for k, v in sorted(self.settings.items()))
        return random.Random(f"{self.name}|{settings}|{purpose}|{length}|{seed}")

    @staticmethod
    def labels_for(prompt_length: int, answer: Sequence[int], total: int) -> list[int]:
        """Labels of a row ``prompt + answer (+ filler)`` of ``total`` tokens: the answer tokens at
        the positions that predict them (shifted by one), ``IGNORE_INDEX`` elsewhere."""
        labels = [IGNORE_INDEX] * total
        labels[prompt_length - 1 : prompt_length - 1 + len(answer)] = list(answer)
        return labels

    def _sample(self, length: int, seed: int, depth: float | None) -> TaskSample:
        raise NotImplementedError

    def _row(self, length: int, seed: int) -> tuple[list[int], list[int]]:
        raise NotImplementedError


def recall_accuracy(logits: Tensor, labels: Tensor) -> float:
    """The fraction of scored positions (``labels != IGNORE_INDEX``) whose argmax is the label.

    ``logits [B, T, V]`` (float), ``labels [B, T]`` (int). Raises ``ValueError`` if nothing is scored."""
    scored = labels != IGNORE_INDEX
    if not bool(scored.any()):
        raise ValueError("labels score no position")
    return float((logits.argmax(-1)[scored] == labels[scored]).float().mean())
