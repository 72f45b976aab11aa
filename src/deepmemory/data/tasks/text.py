"""What the text tasks (S-NIAH, BABILong) share: a tokenizer, haystacks of pre-tokenized sentences,
and prompts assembled to an exact token length.

Lengths are exact by construction: every piece of a prompt (the header, each haystack sentence,
each needle part, the question) is tokenized on its own and the prompt is the concatenation of
the pieces' ids, so its length is the sum of theirs. The haystack takes whole sentences while
they fit and then the first tokens of the next one, so that the prompt ends the haystack
mid-sentence, just before the question. Pieces begin with their separating space (or newline),
so the joins fall where a whitespace-splitting tokenizer would put them anyway.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate, chain

from ..tokenizers import ByteTokenizer
from .base import Task, id_list
from .essays import ESSAYS, sentences

_SPACE = re.compile(r"\s+")


class Haystack:
    """Pre-tokenized sentences and the order in which a haystack reads them.

    ``groups`` None: the pieces repeat in order from the first (S-NIAH's repeated filler).
    Otherwise ``groups`` are ``(start, stop)`` ranges of pieces (paragraphs): each pass over the
    text reads every paragraph once in a seeded random order, and the first pass starts at a
    random sentence of its first paragraph.
    """

    def __init__(self, ids: list[list[int]], groups: list[tuple[int, int]] | None, what: str):
        if sum(map(len, ids)) == 0:
            raise ValueError(f"the tokenizer encodes the {what} as no tokens")
        self.ids = ids
        self.groups = groups
        self.longest = max(map(len, ids))  # the longest piece, in tokens

    def _order(self, rng) -> Iterator[int]:
        if self.groups is None:
            while True:
                yield from range(len(self.ids))
        first = True
        while True:
            order = list(self.groups)
            rng.shuffle(order)
            for start, stop in order:
                yield from range(rng.randrange(start, stop) if first else start, stop)
                first = False

    def fill(self, rng, budget: int) -> tuple[list[list[int]], list[int]]:
        """Whole pieces totalling at most ``budget`` tokens, and the first tokens of the next
        piece that bring the total to exactly ``budget``."""
        if budget < 0:
            raise AssertionError(
                f"the fixed parts of a prompt exceed its length by {-budget} tokens (min_length is wrong)"
            )
        pieces: list[list[int]] = []
        total = 0
        for index in self._order(rng):
            piece = self.ids[index]
            if total + len(piece) > budget:
                return pieces, piece[: budget - total]
            pieces.append(piece)
            total += len(piece)
        raise AssertionError("unreachable: the order is endless")


def assemble(
    header: list[int],
    pieces: list[list[int]],
    partial: list[int],
    inserts: Sequence[tuple[int, list[int]]],
    question: list[int],
) -> tuple[list[int], list[int]]:
    """``header``, the haystack ``pieces`` with each insert ``(boundary, ids)`` placed before piece
    ``boundary`` (``len(pieces)``: after the last whole piece; inserts at one boundary keep their
    order), ``partial`` and ``question``. Returns the prompt and each insert's start index."""
    at: dict[int, list[int]] = {}
    for n, (boundary, _) in enumerate(inserts):
        at.setdefault(boundary, []).append(n)
    chunks = [header]
    position = len(header)
    starts = [0] * len(inserts)
    for i in range(len(pieces) + 1):
        for n in at.get(i, ()):
            starts[n] = position
            chunks.append(inserts[n][1])
            position += len(inserts[n][1])
        if i < len(pieces):
            chunks.append(pieces[i])
            position += len(pieces[i])
    chunks += [partial, question]
    return list(chain.from_iterable(chunks)), starts


def boundary_at(pieces: list[list[int]], tokens: float) -> int:
    """The boundary between pieces (0 .. ``len(pieces)``) nearest to ``tokens`` haystack tokens."""
    offsets = list(accumulate(map(len, pieces), initial=0))
    i = bisect.bisect_left(offsets, tokens)
    if i == len(offsets) or (i > 0 and tokens - offsets[i - 1] <= offsets[i] - tokens):
        i -= 1
    return i


class TextTask(Task):
    """A task whose prompts are text in the tokens of ``tokenizer`` (a deepmemory tokenizer:
    ``ByteTokenizer`` by default, or ``HFTokenizer``). ``length`` counts those tokens exactly.

    Raises:
        ValueError: ``tokenizer`` has no ``encode``/``decode``, or cannot express the task's
            text (its names, digits, templates do not survive ``decode(encode(text))``).
    """

    kind = "text"
    has_depth = True
    vocab_size = None

    def __init__(self, tokenizer=None, **settings):
        super().__init__(**settings)
        if tokenizer is None:
            tokenizer = ByteTokenizer()
        elif not (callable(getattr(tokenizer, "encode", None)) and callable(getattr(tokenizer, "decode", None))):
            raise ValueError(
                f"{self.name}: tokenizer must be a deepmemory tokenizer (ByteTokenizer, HFTokenizer); "
                f"got {type(tokenizer).__name__}"
            )
        self.tokenizer = tokenizer
        self._ids: dict[str, list[int]] = {}

    # ---- tokens ------------------------------------------------------------------------------

    def encode(self, text: str, remember: bool = True) -> list[int]:
        """The ids of ``text``; remembered when ``remember`` (for the task's finitely many fixed
        pieces: templates, keys, story sentences; not for drawn values)."""
        ids = self._ids.get(text)
        if ids is None:
            ids = id_list(self.tokenizer.encode(text))
            if remember:
                self._ids[text] = ids
        return ids

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """The ids of each text (the tokenizer's batch encoder when it has one)."""
        batch: Callable | None = getattr(self.tokenizer, "encode_batch", None)
        if batch is not None:
            return [list(ids) for ids in batch(list(texts))]
        return [id_list(self.tokenizer.encode(text)) for text in texts]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(id_list(ids))

    def check_expressible(self, what: str, texts: Sequence[str]) -> None:
        """Each text comes back from ``decode(encode(text))``, whitespace and case aside (an
        uncased tokenizer can write every task: the scores ignore case); otherwise a one-line
        ``ValueError`` naming the task, ``what`` and the first text that does not."""
        for text, ids in zip(texts, self.encode_many(texts)):
            back = self.decode(ids)
            if _SPACE.sub("", back).lower() != _SPACE.sub("", text).lower():
                raise ValueError(
                    f"{self.name}: the tokenizer cannot express {what}: {text.strip()[:60]!r} "
                    f"comes back as {back.strip()[:60]!r}"
                )

    def max_tokens(self, texts: Sequence[str]) -> int:
        """The most tokens any of ``texts`` takes."""
        return max(map(len, self.encode_many(texts)))

    # ---- haystacks ---------------------------------------------------------------------------

    def essay_haystack(self) -> Haystack:
        """The embedded essays (``deepmemory.data.tasks.essays``), sentence by sentence; a
        paragraph's first sentence starts with a newline, the others with a space."""
        texts: list[str] = []
        groups: list[tuple[int, int]] = []
        for essay in ESSAYS:
            parts = sentences(essay)
            groups.append((len(texts), len(texts) + len(parts)))
            texts += ["\n" + parts[0]] + [" " + s for s in parts[1:]]
        return Haystack(self.encode_many(texts), groups, "essays")

    def _build(self, length: int, seed: int, depth: float | None, row: bool):
        raise NotImplementedError

    def _row(self, length: int, seed: int) -> tuple[list[int], list[int]]:
        sample = self._build(length, seed, None, row=True)
        ids = sample.prompt_ids + sample.answer_ids
        return ids, self.labels_for(len(sample.prompt_ids), sample.answer_ids, length)

    def _sample(self, length: int, seed: int, depth: float | None):
        return self._build(length, seed, depth, row=False)
