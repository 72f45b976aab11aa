"""The MAD synthetic tasks (Poli et al., 2024, "Mechanistic Design and Scaling of Hybrid
Architectures", Sec. 3 and App. B; the mad-lab benchmark), as prompts with answers.

Each task keeps mad-lab's vocabulary layout and its baseline settings (the defaults below); the
difference is the causal-LM reading that every task here shares: a sample is a prompt whose
answer a model generates, and a training row is prompt + answer with the loss on the answer only.
``length`` is the prompt length in tokens; a ``batch`` row of ``length`` tokens holds prompt and
answer. ``V`` is ``vocab_size``.

``mad-icr`` (in-context recall; ``vocab_size=16``): keys ``[0, V/2)``, values ``[V/2, V)``; a
stream of key–value pairs ``k v k v ...`` in which a key keeps the value it was first shown with;
every value that follows a key already shown is scored (mad-lab's multi-query form). A sample's
prompt ends with a key shown before; the answer is its value (1 token)::

    3 9 5 14 3 9 0 12 5 | 14          (V = 16: keys 0-7, values 8-15)

An even prompt length starts with one value token (the end of a pair cut off by the window).

``mad-noisy-icr`` (``vocab_size=32, noise_vocab_size=16, frac_noise=0.2``): the same with the last
``noise_vocab_size`` ids as noise; each 2-token slot of the stream is two noise tokens with
probability ``frac_noise``; keys and values share the other ``V - noise_vocab_size`` ids.

``mad-fuzzy-icr`` (``vocab_size=16, k_motif_size=3, v_motif_size=3``): keys and values are motifs,
tuples of 1 to ``k_motif_size`` (``v_motif_size``) distinct tokens: keys from
``[0, (V-1)/2)``, values from ``[(V-1)/2, V-1)``; ``V-1`` pads the row on the left to its length.
Training rows draw key motifs of every size; samples (mad-lab's test set) use keys of exactly
``k_motif_size`` tokens. The answer is the value motif of the final key (1 to ``v_motif_size``
tokens)::

    15 15 2 0 4 11 9 6 1 10 7 2 0 4 | 11 9

``mad-selective-copy`` (``vocab_size=16, num_tokens_to_copy=16``): ``num_tokens_to_copy`` tokens of
``[0, V-2)`` scattered among blanks (``V-2``), then the copy token ``V-1``; the answer is the
scattered tokens in order. A row of ``length`` tokens is mad-lab's ``seq_len`` (256 in its
baseline): ``length - num_tokens_to_copy`` prompt tokens, then the copies. In mad-lab the model
reads blanks after the copy token and emits the copies there; here it generates them::

    14 3 14 14 7 14 0 15 | 3 7 0

``mad-compression`` (``vocab_size=16``): ``length - 1`` tokens of ``[0, V-1)`` and the compression
token ``V-1``; the answer repeats the ``length - 1`` tokens. mad-lab decodes the sequence from
the compression token's output alone (an autoencoder); a causal model reproduces it after that
token, so a recurrent model must carry it in its state while attention may look back. A row of
``L`` tokens holds ``(L-1)//2`` tokens, the compression token and their copy (and one more
compression token, unscored, when ``L`` is even). mad-lab's baseline is ``seq_len=32``
(``sample(32)``, a 63-token row). Scored by exact match of the whole copy (mad-lab reports the
per-token accuracy, which ``recall_accuracy`` over ``batch`` labels gives)::

    4 0 13 7 15 | 4 0 13 7

``mad-memorization`` (``vocab_size=256``): a fixed key→value map (a function of ``vocab_size``
alone) from keys ``[0, (V-1)//2)`` to distinct values ``[(V-1)//2, V-1)``; the stream is
``k INS k INS ...`` with the insert token ``INS = V-1``, and the value of each key is predicted at
its ``INS``. As in mad-lab the values never appear in the input, so they must be stored in the
weights: in ``batch`` labels the target at an ``INS`` is the key's value while the next input
token is the next key (the one task whose labels are not the next input tokens). A sample's
prompt ends with ``k INS``; the answer is the value. An odd length starts with a lone ``INS``::

    17 255 90 255 3 255 | 160

Every task's ``score`` is exact match of the answer tokens.
"""

from __future__ import annotations

import random

from ...checks import check_int
from .base import IGNORE_INDEX, Task, TaskSample, check_fraction


def _sample_of(prompt: list[int], answer: list[int]) -> TaskSample:
    return TaskSample(
        prompt_ids=prompt, answer_ids=answer, answer=" ".join(map(str, answer)), depth=None, needle_positions=[]
    )


def _labels_at(ids: list[int], scored: list[int]) -> list[int]:
    """Labels predicting ``ids[p]`` (from position ``p - 1``) for every scored position ``p``."""
    labels = [IGNORE_INDEX] * len(ids)
    for p in scored:
        labels[p - 1] = ids[p]
    return labels


class _MADTask(Task):
    """A MAD task: token ids ``[0, vocab_size)`` (its ``vocab_size`` setting), no depth."""

    kind = "tokens"


class InContextRecall(_MADTask):
    """``mad-icr``: in-context recall (mad-lab's multi-query form); see the module docstring.

    Settings: ``vocab_size`` (int >= 2, default 16). ``min_length`` 3, ``min_row_length`` 4.
    """

    name = "mad-icr"
    SETTINGS = {"vocab_size": (16, lambda label, v: check_int(label, v, 2))}
    noise_vocab_size = 0
    frac_noise = 0.0
    min_length = 3
    min_row_length = 4

    def __init__(self, **settings):
        super().__init__(**settings)
        self.usable = self.vocab_size - self.noise_vocab_size  # ids of keys and values
        if self.usable < 2:
            raise ValueError(
                f"{self.name}: vocab_size - noise_vocab_size must be >= 2 (a key and a value); got {self.usable}"
            )
        self.num_keys = self.usable // 2

    def _stream(self, rng: random.Random, total: int) -> tuple[list[int], list[int]]:
        """``total`` tokens of pairs (and noise slots) aligned to the end, the last pair a key
        shown before; and the positions of the values that follow a key shown before."""
        pairs = total // 2
        ids: list[int] = [rng.randrange(self.num_keys, self.usable)] if total % 2 else []
        values: dict[int, int] = {}
        scored: list[int] = []
        kept = rng.randrange(pairs - 1)  # a slot that holds a pair, so that the last one can repeat it
        for i in range(pairs):
            if i == pairs - 1:
                key = rng.choice(list(values))
            elif i != kept and self.frac_noise > 0 and rng.random() < self.frac_noise:
                ids += [rng.randrange(self.usable, self.vocab_size), rng.randrange(self.usable, self.vocab_size)]
                continue
            else:
                key = rng.randrange(self.num_keys)
            if key in values:
                scored.append(len(ids) + 1)
            else:
                values[key] = rng.randrange(self.num_keys, self.usable)
            ids += [key, values[key]]
        return ids, scored

    def _sample(self, length: int, seed: int, depth: float | None) -> TaskSample:
        ids, _ = self._stream(self.rng("sample", length, seed), length + 1)
        return _sample_of(ids[:-1], ids[-1:])

    def _row(self, length: int, seed: int) -> tuple[list[int], list[int]]:
        ids, scored = self._stream(self.rng("row", length, seed), length)
        return ids, _labels_at(ids, scored)


class NoisyInContextRecall(InContextRecall):
    """``mad-noisy-icr``: in-context recall with noise slots; see the module docstring.

    Settings: ``vocab_size`` (default 32), ``noise_vocab_size`` (int >= 1, default 16; the last
    ids), ``frac_noise`` (the probability of a noise slot, in [0, 1), default 0.2).
    """

    name = "mad-noisy-icr"
    SETTINGS = {
        "vocab_size": (32, lambda label, v: check_int(label, v, 3)),
        "noise_vocab_size": (16, check_int),
        "frac_noise": (0.2, check_fraction),
    }


class FuzzyInContextRecall(_MADTask):
    """``mad-fuzzy-icr``: recall of variable-length key and value motifs; see the module docstring.

    Settings: ``vocab_size`` (default 16), ``k_motif_size`` and ``v_motif_size`` (the longest key
    and value motifs, ints >= 1, default 3; the key ids ``(V-1)//2`` must hold ``k_motif_size``
    distinct tokens and the value ids ``v_motif_size``). ``min_length = 2 k + v``,
    ``min_row_length = 2 (k + v)``.
    """

    name = "mad-fuzzy-icr"
    SETTINGS = {
        "vocab_size": (16, lambda label, v: check_int(label, v, 3)),
        "k_motif_size": (3, check_int),
        "v_motif_size": (3, check_int),
    }

    def __init__(self, **settings):
        super().__init__(**settings)
        self.pad_id = self.vocab_size - 1
        self.num_keys = (self.vocab_size - 1) // 2
        num_values = self.vocab_size - 1 - self.num_keys
        if self.k_motif_size > self.num_keys or self.v_motif_size > num_values:
            raise ValueError(
                f"{self.name}: vocab_size {self.vocab_size} gives {self.num_keys} key and {num_values} "
                f"value ids, fewer than the motif sizes {self.k_motif_size} and {self.v_motif_size}"
            )
        self.min_length = 2 * self.k_motif_size + self.v_motif_size
        self.min_row_length = 2 * (self.k_motif_size + self.v_motif_size)

    def _key(self, rng: random.Random, training: bool) -> tuple[int, ...]:
        size = rng.randint(1, self.k_motif_size) if training else self.k_motif_size
        return tuple(rng.sample(range(self.num_keys), size))

    def _value(self, rng: random.Random) -> tuple[int, ...]:
        return tuple(rng.sample(range(self.num_keys, self.vocab_size - 1), rng.randint(1, self.v_motif_size)))

    def _stream(self, rng: random.Random, budget: int, training: bool):
        """Pads and pairs filling ``budget`` tokens, the probe pair among them at a random place;
        returns ``(ids, scored value positions, probe key, probe value)``."""
        probe_key, probe_value = self._key(rng, training), self._value(rng)
        values = {probe_key: probe_value}
        room = budget - len(probe_key) - len(probe_value)
        pairs: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        while True:
            key = self._key(rng, training)
            value = values.get(key) or self._value(rng)
            if len(key) + len(value) > room:
                break
            values[key] = value
            pairs.append((key, value))
            room -= len(key) + len(value)
        pairs.insert(rng.randrange(len(pairs) + 1), (probe_key, probe_value))
        ids = [self.pad_id] * room
        scored: list[int] = []
        seen = set()
        for key, value in pairs:
            ids += key
            if key in seen:
                scored += range(len(ids), len(ids) + len(value))
            seen.add(key)
            ids += value
        return ids, scored, probe_key, probe_value

    def _sample(self, length: int, seed: int, depth: float | None) -> TaskSample:
        rng = self.rng("sample", length, seed)
        ids, _, key, value = self._stream(rng, length - self.k_motif_size, training=False)
        return _sample_of(ids + list(key), list(value))

    def _row(self, length: int, seed: int) -> tuple[list[int], list[int]]:
        rng = self.rng("row", length, seed)
        # the probe's own size is drawn inside _stream; reserve the largest pair for it at the end
        ids, scored, key, value = self._stream(rng, length - self.k_motif_size - self.v_motif_size, training=True)
        spare = self.k_motif_size + self.v_motif_size - len(key) - len(value)
        ids = [self.pad_id] * spare + ids
        scored = [p + spare for p in scored]
        scored += range(len(ids) + len(key), len(ids) + len(key) + len(value))
        ids += list(key) + list(value)
        return ids, _labels_at(ids, scored)


class SelectiveCopy(_MADTask):
    """``mad-selective-copy``: copy the tokens scattered among blanks; see the module docstring.

    Settings: ``vocab_size`` (int >= 3, default 16), ``num_tokens_to_copy`` (int >= 1, default 16).
    ``min_length = num_tokens_to_copy + 1``, ``min_row_length = 2 num_tokens_to_copy + 1``.
    """

    name = "mad-selective-copy"
    SETTINGS = {
        "vocab_size": (16, lambda label, v: check_int(label, v, 3)),
        "num_tokens_to_copy": (16, check_int),
    }

    def __init__(self, **settings):
        super().__init__(**settings)
        self.blank_id, self.copy_id = self.vocab_size - 2, self.vocab_size - 1
        self.min_length = self.num_tokens_to_copy + 1
        self.min_row_length = 2 * self.num_tokens_to_copy + 1

    def _make(self, rng: random.Random, length: int) -> tuple[list[int], list[int]]:
        ids = [self.blank_id] * (length - 1) + [self.copy_id]
        tokens = [rng.randrange(self.vocab_size - 2) for _ in range(self.num_tokens_to_copy)]
        for position, token in zip(sorted(rng.sample(range(length - 1), self.num_tokens_to_copy)), tokens):
            ids[position] = token
        return ids, tokens

    def _sample(self, length: int, seed: int, depth: float | None) -> TaskSample:
        return _sample_of(*self._make(self.rng("sample", length, seed), length))

    def _row(self, length: int, seed: int) -> tuple[list[int], list[int]]:
        prompt, answer = self._make(self.rng("row", length, seed), length - self.num_tokens_to_copy)
        return prompt + answer, self.labels_for(len(prompt), answer, length)


class Compression(_MADTask):
    """``mad-compression``: reproduce a random sequence after a compression token; see the module
    docstring. Settings: ``vocab_size`` (int >= 2, default 16). ``min_length`` 2,
    ``min_row_length`` 3."""

    name = "mad-compression"
    SETTINGS = {"vocab_size": (16, lambda label, v: check_int(label, v, 2))}
    min_length = 2
    min_row_length = 3

    def _make(self, rng: random.Random, count: int) -> list[int]:
        return [rng.randrange(self.vocab_size - 1) for _ in range(count)]

    def _sample(self, length: int, seed: int, depth: float | None) -> TaskSample:
        tokens = self._make(self.rng("sample", length, seed), length - 1)
        return _sample_of(tokens + [self.vocab_size - 1], tokens)

    def _row(self, length: int, seed: int) -> tuple[list[int], list[int]]:
        count = (length - 1) // 2
        tokens = self._make(self.rng("row", length, seed), count)
        prompt = tokens + [self.vocab_size - 1]
        ids = prompt + tokens + [self.vocab_size - 1] * (length - 2 * count - 1)
        return ids, self.labels_for(len(prompt), tokens, length)


class Memorization(_MADTask):
    """``mad-memorization``: a fixed key→value map learned in the weights; see the module docstring.

    Settings: ``vocab_size`` (int >= 4, default 256). ``kv_map`` is the map (keys
    ``[0, (V-1)//2)`` to distinct values), the same for every sample and row of a vocabulary.
    ``min_length`` 2, ``min_row_length`` 2.
    """

    name = "mad-memorization"
    SETTINGS = {"vocab_size": (256, lambda label, v: check_int(label, v, 4))}
    min_length = 2
    min_row_length = 2

    def __init__(self, **settings):
        super().__init__(**settings)
        self.insert_id = self.vocab_size - 1
        num_keys = (self.vocab_size - 1) // 2
        rng = random.Random(f"{self.name}|map|{self.vocab_size}")
        keys, values = list(range(num_keys)), list(range(num_keys, self.vocab_size - 1))
        rng.shuffle(keys)
        rng.shuffle(values)
        self.kv_map: dict[int, int] = dict(zip(keys, values))

    def _stream(self, rng: random.Random, length: int) -> tuple[list[int], list[int]]:
        """``length`` tokens ``k INS k INS ...`` aligned to the end, and the keys in order."""
        keys = [rng.randrange(len(self.kv_map)) for _ in range(length // 2)]
        ids = [self.insert_id] * (length % 2)
        for key in keys:
            ids += [key, self.insert_id]
        return ids, keys

    def _sample(self, length: int, seed: int, depth: float | None) -> TaskSample:
        ids, keys = self._stream(self.rng("sample", length, seed), length)
        return _sample_of(ids, [self.kv_map[keys[-1]]])

    def _row(self, length: int, seed: int) -> tuple[list[int], list[int]]:
        ids, keys = self._stream(self.rng("row", length, seed), length)
        labels = [IGNORE_INDEX] * length
        first = length % 2 + 1  # the first INS after a key
        labels[first::2] = [self.kv_map[k] for k in keys]
        return ids, labels
