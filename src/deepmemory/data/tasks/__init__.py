"""Synthetic tasks with known answers, generated here (nothing is downloaded): the instruments of
the Titans and ATLAS experiments — needle-in-a-haystack retrieval, BABILong-style reasoning over
long noise, associative recall and the MAD suite.

``get_task(name, tokenizer=None, **settings)`` builds one of ``TASKS``:

====================  ======  =================================================================
name                  kind    prompt -> answer
====================  ======  =================================================================
``s-niah-1``          text    repeated filler hiding "One of the special magic numbers for
                              {key} is: {value}."; question at the end -> the 7-digit value
``s-niah-2``          text    the same in natural text (embedded essays)
``s-niah-3``          text    natural text, UUID values
``babilong-qa1..5``   text    a bAbI story scattered through natural text, a question -> a word
``mqar``              tokens  Zoology key-value pairs, then queries -> the queried value
``mad-icr``           tokens  MAD in-context recall -> the value of a key shown before
``mad-noisy-icr``     tokens  the same with noise tokens between the pairs
``mad-fuzzy-icr``     tokens  recall of multi-token key and value motifs -> the value motif
``mad-selective-copy`` tokens tokens scattered among blanks, a copy token -> the tokens in order
``mad-compression``   tokens  a random sequence and a compression token -> the sequence again
``mad-memorization``  tokens  ``k INS`` pairs of a fixed map (values never shown) -> the value
====================  ======  =================================================================

Each :class:`Task` has ``sample(length, seed, depth=None) -> TaskSample`` (a prompt of exactly
``length`` tokens and its answer; deterministic in settings, length, seed and depth),
``batch(batch_size, length, generator) -> (input_ids, labels)`` (training rows: prompt + answer,
labels only at the answer tokens, shifted) and ``score(sample, output_ids) -> bool`` (exact match
of the value for S-NIAH, MQAR and MAD; the answer word in the first output sentence for
BABILong). Text tasks count tokens of their tokenizer (bytes by default); token tasks use their
own ids ``[0, vocab_size)``. The formats, with examples, are in the modules' docstrings
(``niah``, ``babilong``, ``mqar``, ``mad``) and in docs/tasks.md.
"""

from __future__ import annotations

from .babilong import BabiLong, BabiLongQA1, BabiLongQA2, BabiLongQA3, BabiLongQA4, BabiLongQA5
from .base import IGNORE_INDEX, Task, TaskSample, recall_accuracy
from .mad import Compression, FuzzyInContextRecall, InContextRecall, Memorization, NoisyInContextRecall, SelectiveCopy
from .mqar import MQAR, MQARTask
from .niah import SNIAH, SNIAH1, SNIAH2, SNIAH3

_TEXT = {
    cls.name: cls for cls in (SNIAH1, SNIAH2, SNIAH3, BabiLongQA1, BabiLongQA2, BabiLongQA3, BabiLongQA4, BabiLongQA5)
}
_TOKENS = {
    cls.name: cls
    for cls in (
        MQARTask,
        InContextRecall,
        NoisyInContextRecall,
        FuzzyInContextRecall,
        SelectiveCopy,
        Compression,
        Memorization,
    )
}
TASKS = tuple(_TEXT) + tuple(_TOKENS)


def get_task(name: str, tokenizer=None, **settings) -> Task:
    """The task ``name`` (one of ``TASKS``) with ``settings`` (each task's are listed in its
    class docstring; unset ones take the published defaults).

    Args:
        name: a task name, e.g. ``"s-niah-1"``, ``"babilong-qa2"``, ``"mqar"``, ``"mad-icr"``.
        tokenizer: a deepmemory tokenizer (``ByteTokenizer``, the default, or ``HFTokenizer``)
            for the text tasks; the token tasks ignore it.
        settings: the task's settings, e.g. ``num_needles=4`` or ``vocab_size=64``.

    Raises:
        ValueError: one line, for an unknown name (listing the tasks), an unknown or bad setting,
            or a tokenizer that cannot express the task (e.g. has no digits for S-NIAH).
    """
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    try:
        if name in _TEXT:
            return _TEXT[name](tokenizer, **settings)
        return _TOKENS[name](**settings)
    except (TypeError, ValueError) as err:  # one ValueError, naming the task, for every bad setting
        message = str(err)
        raise ValueError(message if message.startswith(name) else f"{name}: {message}") from None


__all__ = [
    "IGNORE_INDEX",
    "MQAR",
    "TASKS",
    "BabiLong",
    "Compression",
    "FuzzyInContextRecall",
    "InContextRecall",
    "MQARTask",
    "Memorization",
    "NoisyInContextRecall",
    "SNIAH",
    "SelectiveCopy",
    "Task",
    "TaskSample",
    "get_task",
    "recall_accuracy",
]
