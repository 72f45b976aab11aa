"""``length-generalization``: train each preset on a recall task at a length ``L``, evaluate it at
``L, 2L, 4L, 8L, 16L`` with ``deepmemory eval``.

The claim checked (Titans §5.2–5.4, ATLAS §6): a memory model keeps its recall beyond the length
it was trained at, where a Transformer (no state beyond its training positions) and sliding-window
attention (a window shorter than the distance to recall) do not. Every preset trains on the same
rows (seeded by the task and the step), for the same steps, batch and learning rate, at matched
parameter counts (the SwiGLU width solved per preset, :func:`~.runner.matched_widths`), at the
``tiny-w16`` size: 16-token attention windows and MAC segments, so that attention cannot span the
task and recall has to come from the memory.
"""

from __future__ import annotations

import math

from .runner import Cell, Experiment, config_widths, figure_writer, fmt_mean, group_by, mean_std, table

PRESETS = [
    "transformer",
    "swa",
    "gated-deltanet",
    "titans-lmm",
    "titans-mac",
    "titans-mag",
    "titans-mal",
    "omeganet",
    "atlas",
]
SLOW = ("atlas", "atlas-pp", "atlas-mag", "atlas-mal")  # Muon per token: ~100 tokens/s on a CPU core
VOCAB = 257  # the byte tokenizer's (a token task's model takes the larger of its ids and the tokenizer's)

TASKS = {
    # MQAR (Zoology): 4 key-value pairs among 32 keys / 32 values, 8 queries; rows of L tokens
    "mqar": {"settings": {"num_pairs": 4, "vocab_size": 64, "num_queries": 8}},
    # RULER's S-NIAH-1 (Titans Table 2's S-NIAH-PK): one 7-digit needle in repeated noise, bytes
    "s-niah-1": {"settings": {}},
}

BUDGETS = {
    "toy": dict(
        presets=["transformer", "titans-lmm"],
        tasks=["mqar", "s-niah-1"],
        size="tiny-w16",
        train_length={"mqar": 32, "s-niah-1": 328},
        multiples=[1, 2],
        steps=2,
        batch_size=2,
        lr=3e-3,
        eval_tokens_rows=2,
        samples={"mqar": 2, "s-niah-1": 1},
        seeds=[0],
        match_sizes=True,
    ),
    "cpu": dict(
        presets=PRESETS,
        tasks=["mqar", "s-niah-1"],
        size="tiny-w16",
        train_length={"mqar": 64, "s-niah-1": 384},
        multiples=[1, 2, 4, 8, 16],
        # MQAR: 800 steps of 32 rows, where tiny gated-deltanet reaches 96% and titans-lmm 78% (a pilot;
        # 400 of 16 taught no model recall)
        steps={"mqar": 800, "s-niah-1": 150},
        batch_size={"mqar": 32, "s-niah-1": 8},
        lr=3e-3,
        eval_tokens_rows=128,
        samples={"mqar": 100, "s-niah-1": 20},
        seeds=[0],
        match_sizes=True,
    ),
    "gpu": dict(
        presets=PRESETS,
        tasks=["mqar", "s-niah-1"],
        size="tiny-w16",
        train_length={"mqar": 128, "s-niah-1": 512},
        multiples=[1, 2, 4, 8, 16],
        steps=3000,
        batch_size={"mqar": 64, "s-niah-1": 32},
        lr=3e-3,
        eval_tokens_rows=512,
        samples={"mqar": 200, "s-niah-1": 50},
        seeds=[0, 1, 2],
        match_sizes=True,
    ),
}


def _per_task(value, task: str):
    return value[task] if isinstance(value, dict) else value


def cells(config: dict) -> list[Cell]:
    widths = config_widths(config, VOCAB)
    out = []
    for task in config["tasks"]:
        length = config["train_length"][task]
        steps = _per_task(config["steps"], task)
        for preset in config["presets"]:
            for seed in config["seeds"]:
                train = dict(
                    model=preset,
                    size=config["size"],
                    task=task,
                    task_settings=TASKS[task]["settings"],
                    seq_len=length,
                    batch_size=_per_task(config["batch_size"], task),
                    steps=steps,
                    lr=config["lr"],
                    seed=seed,
                    eval_every=max(1, steps // 5),
                    eval_tokens=config["eval_tokens_rows"] * length,
                    log_every=max(1, steps // 5),
                    keep_checkpoints=1,
                    model_overrides=widths.get(preset, {}),
                )
                evaluation = dict(
                    task=task,
                    lengths=[m * length for m in config["multiples"]],
                    samples=_per_task(config["samples"], task),
                    chunk_size=2048,
                    batch_size=_per_task(config["samples"], task) if task == "mqar" else 4,
                )
                out.append(
                    Cell(
                        key=f"{task}-{preset}-s{seed}",
                        labels={"task": task, "preset": preset, "seed": seed},
                        train=train,
                        eval=evaluation,
                        group="atlas" if preset in SLOW else "main",
                    )
                )
    return sorted(out, key=lambda c: c.group != "main")  # the fast cells first


def _acc(outcome: dict, length: int) -> float | None:
    return ((outcome.get("eval") or {}).get("accuracy") or {}).get(str(length))


def _noise(values_a, values_b, n_a: int, n_b: int) -> float:
    """Two binomial standard errors of the difference of two accuracies measured on ``n_a`` and
    ``n_b`` samples (the evaluation's own sampling noise; training seeds add their own)."""
    pa, _, _ = mean_std(values_a)
    pb, _, _ = mean_std(values_b)
    if pa is None or pb is None:
        return float("nan")
    p = min(max((pa + pb) / 2, 0.05), 0.95)
    return 2 * (p * (1 - p) * (1 / max(n_a, 1) + 1 / max(n_b, 1))) ** 0.5


def report(config: dict, outcomes: list[dict]) -> tuple[str, dict]:
    by = group_by(outcomes, "task", "preset")
    lines: list[str] = []
    figures = {}
    for task in config["tasks"]:
        length = config["train_length"][task]
        lengths = [m * length for m in config["multiples"]]
        presets = [p for p in config["presets"] if (task, p) in by]
        samples = _per_task(config["samples"], task)
        steps, batch = _per_task(config["steps"], task), _per_task(config["batch_size"], task)
        lines += [
            f"## {task}: trained at L = {length} tokens, exact-match accuracy (%) at each length",
            "",
            f"Task settings {TASKS[task]['settings'] or 'the defaults'}; {steps} steps x {batch} rows x {length} "
            f"tokens ({steps * batch * length:,} tokens) per model, "
            f"lr {config['lr']:g}, size `{config['size']}`; {samples} evaluation samples per length; "
            "mean ± standard deviation over seeds where there are several. `val loss` / `val@L`: the trainer's "
            "validation answer loss (nats per answer token) and accuracy (teacher-forced answers at L).",
            "",
        ]
        if not presets:
            lines += ["No cell of this task has finished yet.", ""]
            continue
        header = ["preset", "params", "val loss", "val@L"]
        header += [f"{m}L = {n}" for m, n in zip(config["multiples"], lengths)]
        header += ["train tok/s", "train time", "status"]
        rows = []
        for p in presets:
            group = by[(task, p)]
            rows.append(
                [
                    f"`{p}`",
                    f"{group[0].get('parameters') or 0:,}",
                    fmt_mean([(o.get("train") or {}).get("val_loss") for o in group], 1, 3),
                    fmt_mean([(o.get("train") or {}).get("val_accuracy") for o in group], 100),
                ]
                + [fmt_mean([_acc(o, n) for o in group], 100) for n in lengths]
                + [
                    fmt_mean([(o.get("train") or {}).get("tok_per_s") for o in group], 1, 0),
                    fmt_mean([((o.get("train") or {}).get("wall_time_s") or 0) / 60 for o in group], 1, 1) + " min",
                    ", ".join(sorted({o.get("status", "?") for o in group}))
                    + (f" ({len(group)} seeds)" if len(group) > 1 else ""),
                ]
            )
        lines += [table(header, rows), ""]
        if task == "mqar":
            settings = TASKS["mqar"]["settings"]
            values = settings["vocab_size"] // 2
            lines += [
                f"Reference points: guessing among the {values} value ids scores {100 / values:.1f}% (answer loss "
                f"ln {values} = {math.log(values):.2f} nats); guessing among the {settings['num_pairs']} values shown "
                f"in the prompt (copying without matching the key) {100 / settings['num_pairs']:.0f}% (ln "
                f"{settings['num_pairs']} = {math.log(settings['num_pairs']):.2f} nats). Only accuracy well above "
                "the latter is recall.",
                "",
            ]
        elif task.startswith("s-niah"):
            lines += [
                "Reference point: the answer is a space and 7 random digits (8 tokens); a model that writes the "
                f"format but guesses the digits has an answer loss of 7/8 ln 10 = {7 / 8 * math.log(10):.3f} nats "
                "per token and an exact-match accuracy of 1e-7. Only a loss well below that is retrieval.",
                "",
            ]
        lines += [_memory_settings(by, task, presets), ""]
        lines += _claims(task, by, presets, lengths, samples)
        figures[f"{task}.png"] = _plot(task, by, presets, config["multiples"], lengths)
        lines += [f"![{task}: accuracy against context length]({task}.png)", ""]
    return "\n".join(lines) + "\n", figures


def _memory_settings(by: dict, task: str, presets: list[str]) -> str:
    """The settings the papers leave open, as each model ran them (from its run's config)."""
    parts = []
    for p in presets:
        model = by[(task, p)][0].get("model") or {}
        memory = model.get("memory") or {}
        if not memory:
            continue
        words = [f"max_lr {memory['max_lr']}" if memory.get("max_lr") is not None else "max_lr 1 (the layer's default)"]
        if memory.get("step_bound"):
            words.append(f"step bound {memory['step_bound']:g}")
        words.append("memory LayerNorm" if memory.get("layer_norm") else "no memory LayerNorm")
        parts.append(f"`{p}` " + ", ".join(words))
    widths = ", ".join(
        f"`{p}` {(by[(task, p)][0].get('model') or {}).get('intermediate_size')}"
        for p in presets
        if (by[(task, p)][0].get("model") or {}).get("intermediate_size")
    )
    return (
        "Memory settings as run (what the papers leave open): "
        + "; ".join(parts)
        + "."
        + (f" SwiGLU widths (matched sizes): {widths}." if widths else "")
    )


def _mean_beyond(group: list[dict], lengths: list[int]) -> list[float | None]:
    """Per seed, the mean accuracy over the lengths beyond the training length."""
    out = []
    for o in group:
        accs = [_acc(o, n) for n in lengths[1:]]
        accs = [a for a in accs if a is not None]
        out.append(sum(accs) / len(accs) if accs else None)
    return out


def _claims(task: str, by: dict, presets: list[str], lengths: list[int], samples: int) -> list[str]:
    """The papers' orderings, checked on these numbers, with the noise of each comparison."""

    def acc(p, n):
        return [_acc(o, n) for o in by[(task, p)]]

    def fmt(values):
        return fmt_mean(values, 100)

    lines = ["Checked against the papers' claims (automatically, from the table above):", ""]
    if len(lengths) > 1:
        last = lengths[-1]
        for base in ("transformer", "swa"):
            if base not in presets:
                continue
            memory = [p for p in presets if p not in ("transformer", "swa")]
            kept = [
                p
                for p in memory
                if (mean_std(_mean_beyond(by[(task, p)], lengths))[0] or 0)
                > (mean_std(_mean_beyond(by[(task, base)], lengths))[0] or 0)
                + _noise(
                    _mean_beyond(by[(task, p)], lengths),
                    _mean_beyond(by[(task, base)], lengths),
                    samples * (len(lengths) - 1),
                    samples * (len(lengths) - 1),
                )
            ]
            lines.append(
                f"- `{base}`: {fmt(acc(base, lengths[0]))}% at L, {fmt(acc(base, last))}% at {last} tokens. "
                f"Memory models above it beyond L by more than the evaluation noise: "
                + (", ".join(f"`{p}`" for p in kept) if kept else "none")
                + f" (of {len(memory)})."
            )
    order = [p for p in ("atlas", "omeganet", "titans-lmm", "gated-deltanet") if p in presets]
    if len(order) >= 2:
        at_l = lengths[0]
        parts = []
        for a, b in zip(order, order[1:]):
            va, vb = acc(a, at_l), acc(b, at_l)
            ma, mb = mean_std(va)[0], mean_std(vb)[0]
            if ma is None or mb is None:
                continue
            noise = _noise(va, vb, samples * len(va), samples * len(vb))
            verdict = "within noise" if abs(ma - mb) <= noise else ("holds" if ma > mb else "reversed")
            parts.append(f"`{a}` {100 * ma:.1f}% vs `{b}` {100 * mb:.1f}%: {verdict} (noise ±{100 * noise:.1f} points)")
        if parts:
            lines.append(
                "- Recall at L, ATLAS's order Atlas ≥ OmegaNet ≥ Titans ≥ Gated DeltaNet: " + "; ".join(parts) + "."
            )
    lines += [
        "",
        "The noise is two binomial standard errors of the evaluation samples alone; with one training seed "
        "the seed-to-seed spread is not measured and can be larger.",
        "",
    ]
    return lines


def _plot(task: str, by: dict, presets: list[str], multiples: list[int], lengths: list[int]):
    def draw(plt):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for p in presets:
            ys = [mean_std([_acc(o, n) for o in by[(task, p)]])[0] for n in lengths]
            if all(y is None for y in ys):
                continue
            ax.plot(
                multiples,
                [None if y is None else 100 * y for y in ys],
                marker="o",
                label=p,
                lw=1.5,
                ls="--" if p in ("transformer", "swa") else "-",
            )
        if task == "mqar":
            settings = TASKS["mqar"]["settings"]
            for level, text in (
                (100 / settings["num_pairs"], "one of the values shown"),
                (100 / (settings["vocab_size"] // 2), "any value id"),
            ):
                ax.axhline(level, color="grey", lw=0.8, ls=":")
                ax.text(multiples[-1], level + 1, text, fontsize=7, color="grey", ha="right", va="bottom")
        ax.set_xscale("log", base=2)
        ax.set_xticks(multiples, [f"{m}L\n{n}" for m, n in zip(multiples, lengths)])
        ax.set_ylim(-2, 102)
        ax.set_xlabel("evaluation length (multiple of the training length L, tokens)")
        ax.set_ylabel("exact-match accuracy (%)")
        ax.set_title(f"{task}: recall beyond the training length")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        return fig

    return figure_writer(draw)


EXPERIMENT = Experiment(
    name="length-generalization",
    summary=(
        "Each preset trained on a recall task (MQAR; S-NIAH-1) at a training length L and evaluated with "
        "`deepmemory eval` at L, 2L, 4L, 8L and 16L: does recall hold beyond the length trained at? Equal "
        "steps, rows and learning rate for every preset; parameter counts matched (SwiGLU width solved per "
        "preset); size `tiny-w16` (16-token attention windows and MAC segments), so attention cannot span the task."
    ),
    budgets=BUDGETS,
    make_cells=cells,
    report=report,
    filters={"presets": "presets", "tasks": "tasks"},
)
