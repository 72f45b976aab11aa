"""A toy associative recall: does the stale-step bound slow a small memory layer's learning?

    python benchmarks/toy_recall.py

Rows of 6 key-value pairs then 4 queried keys (vocabulary 32, 16 tokens: one chunk of the layer's
default 16), embedding -> NeuralMemory(32, 2, 16) (+ residual) -> linear head; 300 Adam steps
(lr 3e-3, batch 32); recall accuracy on 512 held-out rows, seeds 0, 1, 2, for the layer's default
step_bound (1.0) and the papers' rule (None), at max_lr 1 and 0.1. One thread.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepmemory.layers import NeuralMemory

VOCAB, PAIRS, WIDTH = 32, 6, 32


def batch(rows: int, gen: torch.Generator):
    """``[rows, 16]`` token ids (keys from the lower half of the vocabulary, values from the upper)
    and the ``[rows, 4]`` values the queried keys were paired with."""
    keys = torch.stack([torch.randperm(VOCAB // 2, generator=gen)[:PAIRS] for _ in range(rows)])
    values = torch.randint(VOCAB // 2, VOCAB, (rows, PAIRS), generator=gen)
    asked = torch.randint(0, PAIRS, (rows, 4), generator=gen)
    ids = torch.cat([torch.stack([keys, values], -1).reshape(rows, 2 * PAIRS), keys.gather(1, asked)], 1)
    return ids, values.gather(1, asked)


class Model(nn.Module):
    def __init__(self, **memory):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.memory = NeuralMemory(WIDTH, 2, 16, **memory)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids):
        h = self.embed(ids)
        return self.head(h + self.memory(h))


def train(memory: dict, seed: int, steps: int = 300) -> float:
    """Recall accuracy on 512 held-out rows after ``steps`` Adam steps."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Model(**memory)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(steps):
        ids, answers = batch(32, gen)
        loss = F.cross_entropy(model(ids)[:, 2 * PAIRS :].reshape(-1, VOCAB), answers.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    ids, answers = batch(512, torch.Generator().manual_seed(123))
    with torch.no_grad():
        return (model(ids)[:, 2 * PAIRS :].argmax(-1) == answers).float().mean().item()


if __name__ == "__main__":
    torch.set_num_threads(1)
    for memory in (dict(), dict(step_bound=None), dict(max_lr=0.1), dict(max_lr=0.1, step_bound=None)):
        accs = [train(memory, seed) for seed in (0, 1, 2)]
        print(memory, "recall", " ".join(f"{a:.3f}" for a in accs), f"mean {sum(accs) / 3:.3f}", flush=True)
