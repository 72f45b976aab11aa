"""S-NIAH: single needle in a haystack, as RULER's ``niah_single_1/2/3`` (Hsieh et al., 2024,
"RULER: What's the Real Context Size of Your Long-Context Language Models?"; Titans Table 2).
The prompt wording is this package's own.

A header announces hidden numbers, a haystack hides one needle (or several, ``num_needles``:
distinct keys and values, one of them queried), and a question at the end asks for the queried
key's value::

    Special magic numbers are hidden in the text below. Remember them: a question about one of
    them follows the text.
     The grass is green. The sky is blue. ... One of the special magic numbers for quiet-harbor
    is: 4821937. ... The sun is yel
    Question: What is the special magic number for quiet-harbor in the text above?
    Answer: The special magic number for quiet-harbor is:            -> answer " 4821937"

``s-niah-1``: the haystack repeats "The grass is green. The sky is blue. The sun is yellow. Here
we go. There and back again."; values are 7-digit numbers. ``s-niah-2``: the haystack is the
embedded essays (natural text); 7-digit numbers. ``s-niah-3``: essays; values are UUIDs (version
4 layout, drawn from the seeded generator) and the text says "UUIDs". Keys are adjective-noun
pairs ("quiet-harbor").

Depth ``d`` puts the queried needle at the sentence boundary nearest ``d`` times the haystack's
token count (0: first in the haystack, 1: after its last whole sentence); distractor needles go
to random boundaries. Scoring: the generated text starts (after spaces) with the value, followed by
anything but a letter or digit.
"""

from __future__ import annotations

import re
import uuid

from ...checks import check_int
from .base import TaskSample
from .text import Haystack, TextTask, assemble, boundary_at

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")

ADJECTIVES = (
    "amber",
    "bitter",
    "bold",
    "brave",
    "bright",
    "calm",
    "clever",
    "cold",
    "curious",
    "dark",
    "distant",
    "eager",
    "empty",
    "fierce",
    "gentle",
    "golden",
    "hidden",
    "hollow",
    "humble",
    "lively",
    "lonely",
    "lucky",
    "misty",
    "narrow",
    "noble",
    "patient",
    "plain",
    "proud",
    "quick",
    "quiet",
    "rapid",
    "rough",
    "silent",
    "silver",
    "steady",
    "swift",
    "tender",
    "wild",
    "wise",
    "young",
)
NOUNS = (
    "anchor",
    "badger",
    "barrel",
    "beacon",
    "blossom",
    "canyon",
    "castle",
    "cedar",
    "comet",
    "copper",
    "falcon",
    "feather",
    "garnet",
    "glacier",
    "harbor",
    "harvest",
    "island",
    "lantern",
    "meadow",
    "mirror",
    "orchid",
    "otter",
    "pebble",
    "pepper",
    "pillar",
    "quarry",
    "raven",
    "river",
    "saddle",
    "shadow",
    "spruce",
    "summit",
    "thistle",
    "thunder",
    "tower",
    "tunnel",
    "valley",
    "willow",
    "window",
    "zephyr",
)
NUMBER_BYTES = 8  # " 1234567": a value's tokens, at most one per byte
UUID_BYTES = 37  # " " + 36 characters


class SNIAH(TextTask):
    """S-NIAH (``s-niah-1``, ``-2``, ``-3``); see the module docstring.

    Settings: ``num_needles`` (int >= 1, at most 1600: needles in the haystack, the first one
    queried, default 1). ``min_length``: the header, the needles and the question with the
    longest key and value; ``min_row_length`` adds the longest answer.
    """

    SETTINGS = {"num_needles": (1, check_int)}
    natural = True  # the essays, or the repeated filler
    uuids = False  # UUID values, or 7-digit numbers

    def __init__(self, tokenizer=None, **settings):
        super().__init__(tokenizer, **settings)
        if self.num_needles > len(ADJECTIVES) * len(NOUNS):
            raise ValueError(
                f"{self.name}: num_needles must be <= {len(ADJECTIVES) * len(NOUNS)} (distinct keys); "
                f"got {self.num_needles}"
            )
        singular, plural = ("UUID", "UUIDs") if self.uuids else ("number", "numbers")
        self.header = (
            f"Special magic {plural} are hidden in the text below. Remember them: a question about "
            f"one of them follows the text.\n"
        )
        self.needle_parts = (f" One of the special magic {plural} for", " is:", ".")
        self.question_parts = (
            f"\nQuestion: What is the special magic {singular} for",
            f" in the text above?\nAnswer: The special magic {singular} for",
            " is:",
        )
        alphabet = "0123456789abcdef-" if self.uuids else "0123456789"
        self.check_expressible(
            "its header, needle and question", [self.header, *self.needle_parts, *self.question_parts]
        )
        self.check_expressible("the words of its keys", [" ".join(ADJECTIVES), " ".join(NOUNS), "-"])
        self.check_expressible("the characters of its values", [alphabet])
        if self.natural:
            self.haystack = self.essay_haystack()
        else:
            self.haystack = Haystack(self.encode_many([" " + s for s in FILLER]), None, "filler")
        key_tokens = self.max_tokens([f" {a}-{n}" for a in ADJECTIVES for n in NOUNS])
        value_tokens = UUID_BYTES if self.uuids else NUMBER_BYTES
        needle = sum(len(self.encode(p)) for p in self.needle_parts) + key_tokens + value_tokens
        question = sum(len(self.encode(p)) for p in self.question_parts) + 2 * key_tokens
        self.min_length = len(self.encode(self.header)) + self.num_needles * needle + question
        self.min_row_length = self.min_length + value_tokens

    def _value(self, rng) -> str:
        if self.uuids:
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        return str(rng.randrange(10**6, 10**7))

    def _needle(self, key: str, value: str) -> list[int]:
        prefix, middle, end = self.needle_parts
        return (
            self.encode(prefix)
            + self.encode(" " + key)
            + self.encode(middle)
            + self.encode(" " + value, remember=False)
            + self.encode(end)
        )

    def _question(self, key: str) -> list[int]:
        first, second, end = self.question_parts
        return (
            self.encode(first)
            + self.encode(" " + key)
            + self.encode(second)
            + self.encode(" " + key)
            + self.encode(end)
        )

    def _build(self, length: int, seed: int, depth: float | None, row: bool) -> TaskSample:
        rng = self.rng("row" if row else "sample", length, seed)
        keys = [
            f"{ADJECTIVES[i // len(NOUNS)]}-{NOUNS[i % len(NOUNS)]}"
            for i in rng.sample(range(len(ADJECTIVES) * len(NOUNS)), self.num_needles)
        ]
        values: list[str] = []
        while len(values) < self.num_needles:
            value = self._value(rng)
            if value not in values:
                values.append(value)
        drawn = rng.random()  # drawn always, so that a sample differs across depths by the placement alone
        depth = drawn if depth is None else depth
        needles = [self._needle(k, v) for k, v in zip(keys, values)]
        question = self._question(keys[0])
        answer = self.encode(" " + values[0], remember=False)
        header = self.encode(self.header)
        fixed = len(header) + sum(map(len, needles)) + len(question) + (len(answer) if row else 0)
        pieces, partial = self.haystack.fill(rng, length - fixed)
        haystack_tokens = length - fixed
        inserts: list[tuple[int, int]] = [(boundary_at(pieces, depth * haystack_tokens), 0)]
        inserts += [(rng.randrange(len(pieces) + 1), n) for n in range(1, self.num_needles)]
        inserts.sort()
        prompt, starts = assemble(header, pieces, partial, [(b, needles[n]) for b, n in inserts], question)
        start_of = {n: s for (_, n), s in zip(inserts, starts)}
        positions = [start_of[0]] + sorted(start_of[n] for n in range(1, self.num_needles))
        return TaskSample(
            prompt_ids=prompt, answer_ids=answer, answer=values[0], depth=depth, needle_positions=positions
        )

    def score(self, sample: TaskSample, output_ids) -> bool:
        """Exact match of the value: the decoded output starts (after spaces) with
        ``sample.answer``, spaces between its characters allowed (a tokenizer may decode with
        spaces between tokens), and continues, if at all, with neither a letter nor a digit."""
        pattern = r"\s*".join(map(re.escape, sample.answer)) + r"(?![0-9A-Za-z])"
        return re.match(pattern, self.decode(output_ids).lstrip()) is not None


class SNIAH1(SNIAH):
    """``s-niah-1``: repeated filler, 7-digit numbers."""

    name = "s-niah-1"
    natural = False


class SNIAH2(SNIAH):
    """``s-niah-2``: essay haystack, 7-digit numbers."""

    name = "s-niah-2"


class SNIAH3(SNIAH):
    """``s-niah-3``: essay haystack, UUIDs."""

    name = "s-niah-3"
    uuids = True
