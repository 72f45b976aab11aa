"""``language-modeling``: every preset trained on the same bytes of text for the same steps:
validation bits per byte, training tokens per second and peak memory.

The corpus is ``deepmemory train``'s default (the running Python's standard library, read as bytes,
documents packed with boundaries; docs/training.md), so the experiment needs no download; its
source and size are recorded with the results. Every preset reads the same windows in the same
order (the data order depends on the seed alone) at matched parameter counts (the SwiGLU width
solved per preset, :func:`~.runner.matched_widths`).
"""

from __future__ import annotations

from .length_generalization import SLOW
from .runner import Cell, Experiment, config_widths, figure_writer, fmt_mean, group_by, mean_std, table, within_noise

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
    "atlas-pp",
    "atlas-mag",
    "atlas-mal",
    "dla",
    "swla",
    "deep-transformer",
    "swdt",
    "dot",
]
VOCAB = 257

BUDGETS = {
    "toy": dict(
        presets=["transformer", "titans-lmm"],
        size="tiny",
        seq_len=32,
        batch_size=2,
        steps=2,
        lr=3e-3,
        eval_tokens=256,
        seeds=[0],
        match_sizes=True,
    ),
    "cpu": dict(
        presets=PRESETS,
        size="tiny",
        seq_len=128,
        batch_size=16,
        steps=200,
        lr=3e-3,
        eval_tokens=16384,
        seeds=[0],
        match_sizes=True,
    ),
    "gpu": dict(
        presets=PRESETS,
        size="tiny",
        seq_len=512,
        batch_size=64,
        steps=3000,
        lr=3e-3,
        eval_tokens=262144,
        seeds=[0, 1, 2],
        match_sizes=True,
    ),
}


def cells(config: dict) -> list[Cell]:
    widths = config_widths(config, VOCAB)
    out = []
    for preset in config["presets"]:
        for seed in config["seeds"]:
            train = dict(
                model=preset,
                size=config["size"],
                seq_len=config["seq_len"],
                batch_size=config["batch_size"],
                steps=config["steps"],
                lr=config["lr"],
                seed=seed,
                eval_every=max(1, config["steps"] // 4),
                eval_tokens=config["eval_tokens"],
                log_every=max(1, config["steps"] // 4),
                keep_checkpoints=1,
                model_overrides=widths.get(preset, {}),
            )
            out.append(
                Cell(
                    key=f"{preset}-s{seed}",
                    labels={"preset": preset, "seed": seed},
                    train=train,
                    group="atlas" if preset in SLOW else "main",
                )
            )
    return sorted(out, key=lambda c: c.group != "main")


def _train(o: dict, name: str):
    return (o.get("train") or {}).get(name)


def report(config: dict, outcomes: list[dict]) -> tuple[str, dict]:
    by = group_by(outcomes, "preset")
    presets = [p for p in config["presets"] if (p,) in by]
    tokens = config["steps"] * config["batch_size"] * config["seq_len"]
    lines = [
        "## Validation bits per byte at equal tokens",
        "",
        f"{config['steps']} steps x {config['batch_size']} windows x {config['seq_len']} bytes ({tokens:,} tokens) "
        f"per model, lr {config['lr']:g}, size `{config['size']}`, parameter counts matched; validation on "
        f"{config['eval_tokens']:,} held-out tokens. Tokens/s is the training loop's (forward, backward, AdamW; "
        "validation included), peak memory the process's peak resident set during the run (CPU) or CUDA's "
        "peak allocation. Mean ± standard deviation over seeds where there are several.",
        "",
    ]
    if not presets:
        return "\n".join(lines + ["No cell has finished yet.", ""]) + "\n", {}
    ranked = sorted(presets, key=lambda p: mean_std([_train(o, "val_bpb") for o in by[(p,)]])[0] or float("inf"))
    best = ranked[0]
    rows = []
    for p in ranked:
        group = by[(p,)]
        bpb = [_train(o, "val_bpb") for o in group]
        noise = within_noise(bpb, [_train(o, "val_bpb") for o in by[(best,)]])
        rows.append(
            [
                f"`{p}`",
                f"{group[0].get('parameters') or 0:,}",
                fmt_mean(bpb, 1, 3),
                "–" if p == best else {True: "within noise", False: "worse", None: "one seed"}[noise],
                fmt_mean([_train(o, "tok_per_s") for o in group], 1, 0),
                fmt_mean([_train(o, "peak_memory_mib") for o in group], 1, 0),
                fmt_mean([(_train(o, "wall_time_s") or 0) / 60 for o in group], 1, 1),
                ", ".join(sorted({o.get("status", "?") for o in group})),
            ]
        )
    header = ["preset", "params", "val bits/byte", f"vs `{best}`", "tokens/s", "peak MiB", "time (min)", "status"]
    lines += [table(header, rows), "", "![validation bits per byte against tokens](bpb.png)", ""]
    return "\n".join(lines) + "\n", {"bpb.png": _plot(by, presets, config)}


def _plot(by: dict, presets: list[str], config: dict):
    per_step = config["batch_size"] * config["seq_len"]

    def draw(plt):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for p in presets:
            curve = (by[(p,)][0].get("train") or {}).get("curve") or []
            pts = [(r["step"] * per_step, r["val_bpb"]) for r in curve if r.get("val_bpb") is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=p)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("validation bits per byte")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        ax.set_title("language modelling at equal tokens (seed of the first run)")
        fig.tight_layout()
        return fig

    return figure_writer(draw)


EXPERIMENT = Experiment(
    name="language-modeling",
    summary=(
        "Every preset trained on the same bytes of text (the default corpus of `deepmemory train`: the "
        "Python standard library's source) for the same steps at matched parameter counts: validation bits "
        "per byte, training tokens per second and peak memory."
    ),
    budgets=BUDGETS,
    make_cells=cells,
    report=report,
    filters={"presets": "presets"},
)
