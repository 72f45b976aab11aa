"""Training on a generated task instead of a corpus: ``deepmemory train --task NAME``.

A task of :mod:`deepmemory.data.tasks` (MQAR, S-NIAH, BABILong-style QA, the MAD suite) makes
rows of ``seq_len`` tokens, a prompt and its answer, with labels already shifted and
``IGNORE_INDEX`` everywhere but the answer tokens (``Task.batch``). The trainer reads them where
it would read corpus windows:

- **Training batches** are fresh every step: step ``s`` draws ``Task.batch`` from a generator
  seeded by ``(seed, s)`` alone, so the data position is the number of batches drawn and a
  resumed run reads exactly the batches it would have read (:class:`TaskSampler`).
- **The loss** is the mean cross entropy over the answer tokens of the global batch (the
  positions whose label is not ``IGNORE_INDEX``), the same for any split over micro-steps and
  processes (:func:`answer_loss`).
- **Validation** is a fixed set of rows drawn once from a generator seeded by the run's seed
  (:func:`validation_rows`): the mean answer loss and the *exact-match accuracy*, the share of
  answers whose every token is the model's argmax given the tokens before it
  (:func:`answer_matches`). An answer is a maximal run of consecutive scored positions (one MQAR
  value, a 7-digit S-NIAH number); with teacher forcing, "every token right" is what greedy
  decoding of the answer produces, so the accuracy is the exact match of greedy answers.
  ``deepmemory eval`` scores decoded answers by each task's own rule (``Task.score``).
"""

from __future__ import annotations

import hashlib
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..files import atomic_path
from .config import ConfigError

VALIDATION_STREAM = "validation"  # the validation rows come from their own generator, never from a training step's


def stream_seed(seed: int, stream: str) -> int:
    """A 63-bit generator seed for ``stream`` (a training step number or ``"validation"``) of a run
    seeded ``seed``: the first 8 bytes of ``sha256("seed:stream")``, so nearby seeds and steps give
    unrelated generators."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{stream}".encode()).digest()[:8], "big") >> 1


def make_task(name: str, settings: dict, tokenizer):
    """The task ``name`` with ``settings`` (``get_task(name, tokenizer, **settings)``).

    Raises:
        ConfigError: (one line) an unknown task or a bad setting.
    """
    from ..data.tasks import get_task

    try:
        return get_task(name, tokenizer=tokenizer, **settings)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--task {name}: {' '.join(str(err).split())}") from err


def model_vocab_size(task, tokenizer) -> int:
    """The vocabulary a model trained on ``task`` needs: the tokenizer's, widened to the task's ids
    for a token task (``Task.vocab_size``), so the run's tokenizer still works with it."""
    return max(tokenizer.vocab_size, task.vocab_size or 0)


def check_vocab(task, vocab_size: int, what: str) -> None:
    """Raise ``ConfigError`` when a model of ``vocab_size`` cannot read ``task``'s token ids."""
    if task.vocab_size is not None and vocab_size < task.vocab_size:
        raise ConfigError(
            f"{what} has a vocabulary of {vocab_size} tokens, fewer than the {task.vocab_size} of task {task.name}"
        )


class TaskSampler:
    """Training batches of a task: ``next_batch(size)`` returns ``(input_ids, labels)``, both
    ``[size, seq_len]`` int64, the ``n``-th call drawing from a generator seeded by
    ``stream_seed(seed, n)``. ``state_dict`` is the number of batches drawn.

    Raises:
        ConfigError: (from ``next_batch``) the task cannot make rows of ``seq_len`` tokens.
    """

    def __init__(self, task, seq_len: int, seed: int):
        self.task, self.seq_len, self.seed = task, seq_len, seed
        self.batches = 0

    def next_batch(self, size: int) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(stream_seed(self.seed, str(self.batches)))
        ids, labels = task_rows(self.task, size, self.seq_len, generator)
        self.batches += 1
        return ids, labels

    def state_dict(self) -> dict:
        return {"task": self.task.name, "batches": self.batches, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        from ..data import DataError

        if state.get("task") != self.task.name or state.get("seq_len") != self.seq_len:
            raise DataError(f"the data position {state} does not fit task {self.task.name} at --seq-len {self.seq_len}")
        self.batches = int(state["batches"])


def task_rows(task, size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``task.batch(size, seq_len, generator)``, checked: two int64 tensors ``[size, seq_len]``
    with at least one scored position.

    Raises:
        ConfigError: the task refuses the length (``--seq-len`` below its minimum) or returned
            rows of another shape, or scores nothing.
    """
    from ..data.tasks import IGNORE_INDEX

    try:
        ids, labels = task.batch(size, seq_len, generator)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--task {task.name} --seq-len {seq_len}: {' '.join(str(err).split())}") from err
    if tuple(ids.shape) != (size, seq_len) or tuple(labels.shape) != (size, seq_len):
        raise ConfigError(
            f"--task {task.name} made rows {list(ids.shape)} / {list(labels.shape)}, not [{size}, {seq_len}]"
        )
    if not bool((labels != IGNORE_INDEX).any()):
        raise ConfigError(f"--task {task.name} --seq-len {seq_len}: the rows score no answer token")
    return ids.long(), labels.long()


def validation_rows(task, count: int, seq_len: int, seed: int) -> tuple[Tensor, Tensor]:
    """The fixed validation set of a run: ``count`` rows from the generator ``stream_seed(seed,
    "validation")`` (disjoint from every training step's stream)."""
    generator = torch.Generator().manual_seed(stream_seed(seed, VALIDATION_STREAM))
    return task_rows(task, count, seq_len, generator)


def answer_loss(model: nn.Module, ids: Tensor, labels: Tensor) -> Tensor:
    """The summed cross entropy (nats, float32 scalar) of the scored positions of ``labels``
    (``[B, T]``, ``IGNORE_INDEX`` elsewhere) given ``ids`` ``[B, T]``; ``0`` when none is scored."""
    from ..data.tasks import IGNORE_INDEX

    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def answer_matches(logits: Tensor, labels: Tensor) -> tuple[int, int]:
    """``(exact, answers)``: how many answers of ``labels`` ``[B, T]`` the argmax of ``logits``
    ``[B, T, V]`` gets entirely right, out of how many. An answer is a maximal run of consecutive
    scored positions (``labels != IGNORE_INDEX``) within a row."""
    from ..data.tasks import IGNORE_INDEX

    scored = labels != IGNORE_INDEX
    before = torch.zeros_like(scored)
    before[:, 1:] = scored[:, :-1]
    starts = scored & ~before
    answers = int(starts.sum())
    if answers == 0:
        return 0, 0
    run = torch.cumsum(starts.flatten(), 0) - 1  # the answer each position belongs to (rows are flattened in order)
    wrong = (scored & (logits.argmax(-1) != labels)).flatten()
    missed = torch.zeros(answers, dtype=torch.long).index_add_(
        0, run[wrong].cpu(), torch.ones(int(wrong.sum()), dtype=torch.long)
    )
    return int((missed == 0).sum()), answers


def plot_task(run_dir: str, rows) -> None:
    """``loss.png`` of a task run: the training and validation answer loss (nats) and the
    validation exact-match accuracy against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    acc = [(r["step"], r["val_accuracy"]) for r in rows if r.get("val_accuracy") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.8, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("answer loss (nats)")
    ax.grid(alpha=0.3)
    right = ax.twinx()
    if acc:
        right.plot(*zip(*acc), "s-", color="tab:green", label="validation accuracy")
    right.set_ylim(-0.02, 1.02)
    right.set_ylabel("exact-match accuracy")
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="center right")
    fig.tight_layout()
    with atomic_path(os.path.join(run_dir, "loss.png"), durable=False) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def describe(task, settings: dict, seq_len: int, val_rows: int) -> str:
    """The run's ``data:`` line for a task."""
    given = ", ".join(f"{k}={v}" for k, v in sorted(settings.items()))
    vocab = f", {task.vocab_size} token ids" if task.vocab_size is not None else ""
    return (
        f"task {task.name}" + (f" ({given})" if given else "") + f"{vocab}: fresh rows of {seq_len} tokens every step, "
        f"loss at the answers; {val_rows} fixed validation rows"
    )


def record(task, settings: dict, val_rows: int) -> dict:
    """The ``data`` entry of a task run's ``run.json``."""
    return {
        "source": f"task:{task.name}",
        "task": task.name,
        "task_settings": dict(settings),
        "kind": task.kind,
        "task_vocab_size": task.vocab_size,
        "validation_rows": val_rows,
    }


@torch.no_grad()
def task_validation(
    model: nn.Module, rows: tuple[Tensor, Tensor], micro: int, env, precision: str
) -> tuple[float, float]:
    """``(loss, accuracy)`` over the validation ``rows`` (``(input_ids, labels)``, split over the
    ranks, each rank taking the same number of forward calls): the mean cross entropy of the
    answer tokens (nats) and the exact-match accuracy of the answers (:func:`answer_matches`)."""
    from ..data.tasks import IGNORE_INDEX
    from .distributed import all_sum
    from .trainer import autocast

    was_training = model.training
    model.eval()
    ids, labels = rows[0][env.rank :: env.world], rows[1][env.rank :: env.world]
    loss = scored = exact = answers = 0.0
    for i in range(0, ids.shape[0], micro):
        x, y = ids[i : i + micro].to(env.device), labels[i : i + micro].to(env.device)
        with autocast(env, precision):
            logits = model(input_ids=x, use_cache=False).logits.float()
        loss += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"))
        scored += float((y != IGNORE_INDEX).sum())
        right, total = answer_matches(logits, y)
        exact, answers = exact + right, answers + total
    model.train(was_training)
    loss, scored, exact, answers = all_sum(env, [loss, scored, exact, answers])
    return loss / max(scored, 1.0), exact / max(answers, 1.0)
