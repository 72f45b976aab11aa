"""``ablations``: Titans' and ATLAS's components taken out one at a time, at the same budget.

Titans (§5.9, Table 5, on its LMM; Figure 7 for the memory's depth): a linear memory, no momentum,
no forgetting (decay), no persistent memory, no short convolution, memory depth 1, 2 (the preset)
and 3. ATLAS (§6, its ablation table; on Atlas): an Omega window of 1 (the online rule), no
polynomial feature map, no Muon (momentum: OmegaNet's optimizer), one Muon update per chunk
instead of per token, the memory LayerNorm off. Each variant is the preset with one setting
changed (``model_overrides``), trained on two measurements at equal steps and rows: MQAR recall at
``tiny-w16`` (the trainer's validation accuracy at L, and ``deepmemory eval`` at L and 4L) and
language modelling on the default corpus at ``tiny`` (validation bits per byte). Parameter counts
are not re-matched: a variant has what its change leaves it (the tables show them).
"""

from __future__ import annotations

from .length_generalization import TASKS
from .runner import Cell, Experiment, fmt_mean, group_by, mean_std, table

# (family, variant, base preset, overrides); the first of a family is its base
VARIANTS = [
    ("titans-lmm", "base (deep memory, depth 2)", "titans-lmm", {}),
    ("titans-lmm", "linear memory", "titans-lmm", {"memory": {"architecture": "linear", "residual": False}}),
    ("titans-lmm", "no momentum", "titans-lmm", {"memory": {"optimizer": "gd"}}),
    ("titans-lmm", "no decay", "titans-lmm", {"memory": {"use_decay": False}}),
    ("titans-lmm", "no persistent memory", "titans-lmm", {"num_persistent": 0}),
    ("titans-lmm", "no convolution", "titans-lmm", {"memory": {"conv_size": 0}}),
    ("titans-lmm", "depth 1", "titans-lmm", {"memory": {"depth": 1}}),
    ("titans-lmm", "depth 3", "titans-lmm", {"memory": {"depth": 3}}),
    ("atlas", "base (Muon per token, c = 16, polynomial, LN)", "atlas", {}),
    ("atlas", "window 1", "atlas", {"memory": {"window": 1}}),
    ("atlas", "no polynomial map", "atlas", {"memory": {"feature_map": "identity"}}),
    ("atlas", "no Muon (momentum)", "atlas", {"memory": {"optimizer": "momentum"}}),
    ("atlas", "chunk granularity", "atlas", {"memory": {"granularity": "chunk"}}),
    ("atlas", "no memory LayerNorm", "atlas", {"memory": {"layer_norm": False}}),
]
# what the papers report for each change: "worse" (removing it hurts), or the depth ordering
PAPER = {
    "linear memory": "worse",
    "no momentum": "worse",
    "no decay": "worse",
    "no persistent memory": "worse",
    "no convolution": "worse",
    "depth 1": "worse",
    "depth 3": "better",
    "window 1": "worse",
    "no polynomial map": "worse",
    "no Muon (momentum)": "worse",
    "chunk granularity": "worse",
}


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.split(" (")[0].lower()).strip("-")


BUDGETS = {
    "toy": dict(
        families=["titans-lmm"],
        variants=["base (deep memory, depth 2)", "no momentum"],
        measures=["mqar", "text"],
        mqar=dict(size="tiny-w16", seq_len=32, batch_size=2, steps=2, samples=2, multiples=[1, 2]),
        text=dict(size="tiny", seq_len=32, batch_size=2, steps=2, eval_tokens=256),
        lr=3e-3,
        seeds=[0],
    ),
    "cpu": dict(
        families=["titans-lmm", "atlas"],
        variants=[v[1] for v in VARIANTS],
        measures=["mqar", "text"],
        mqar=dict(size="tiny-w16", seq_len=64, batch_size=32, steps=800, samples=100, multiples=[1, 4]),
        text=dict(size="tiny", seq_len=128, batch_size=16, steps=150, eval_tokens=16384),
        lr=3e-3,
        seeds=[0],
    ),
    "gpu": dict(
        families=["titans-lmm", "atlas"],
        variants=[v[1] for v in VARIANTS],
        measures=["mqar", "text"],
        mqar=dict(size="tiny-w16", seq_len=128, batch_size=64, steps=3000, samples=200, multiples=[1, 4]),
        text=dict(size="tiny", seq_len=512, batch_size=64, steps=3000, eval_tokens=262144),
        lr=3e-3,
        seeds=[0, 1, 2],
    ),
}


def _slow(preset: str, overrides: dict) -> bool:
    memory = overrides.get("memory", {})
    return preset == "atlas" and memory.get("optimizer", "muon") == "muon" and memory.get("granularity") != "chunk"


def cells(config: dict) -> list[Cell]:
    out = []
    for family, variant, preset, overrides in VARIANTS:
        if family not in config["families"] or variant not in config["variants"]:
            continue
        for measure in config["measures"]:
            m = config[measure]
            for seed in config["seeds"]:
                train = dict(
                    model=preset,
                    size=m["size"],
                    seq_len=m["seq_len"],
                    batch_size=m["batch_size"],
                    steps=m["steps"],
                    lr=config["lr"],
                    seed=seed,
                    eval_every=max(1, m["steps"] // 3),
                    log_every=max(1, m["steps"] // 3),
                    keep_checkpoints=1,
                    model_overrides=overrides,
                )
                evaluation = None
                if measure == "mqar":
                    train.update(task="mqar", task_settings=TASKS["mqar"]["settings"], eval_tokens=128 * m["seq_len"])
                    evaluation = dict(
                        task="mqar",
                        lengths=[k * m["seq_len"] for k in m["multiples"]],
                        samples=m["samples"],
                        batch_size=m["samples"],
                    )
                else:
                    train.update(eval_tokens=m["eval_tokens"])
                out.append(
                    Cell(
                        key=f"{measure}-{family}-{_slug(variant)}-s{seed}",
                        labels={"family": family, "variant": variant, "measure": measure, "seed": seed},
                        train=train,
                        eval=evaluation,
                        group="atlas" if _slow(preset, overrides) else "main",
                    )
                )
    return sorted(out, key=lambda c: c.group != "main")


# a text difference below this is within noise: two seed deviations of a tiny memory model's validation
# bits per byte at this scale (titans-lmm: 0.044 over three seeds, experiments/results/language-modeling)
TEXT_NOISE = 0.1


def _direction(diff: float | None, noise: float, higher_better: bool) -> str:
    if diff is None:
        return "–"
    if abs(diff) <= noise:
        return "within noise"
    return "better" if (diff > 0) == higher_better else "worse"


def report(config: dict, outcomes: list[dict]) -> tuple[str, dict]:
    by = group_by(outcomes, "family", "variant", "measure")
    lines = []
    for family in config["families"]:
        variants = [v for f, v, _, _ in VARIANTS if f == family and v in config["variants"]]
        if not variants:
            continue
        base = variants[0]
        mq, tx = config["mqar"], config["text"]
        lengths = [k * mq["seq_len"] for k in mq["multiples"]]
        lines += [
            f"## {family}: one component out at a time",
            "",
            f"MQAR: `{mq['size']}`, {mq['steps']} steps x {mq['batch_size']} rows x {mq['seq_len']} tokens; accuracy "
            f"in % (`val@L`: the trainer's validation; then `deepmemory eval` with {mq['samples']} samples). Text: "
            f"`{tx['size']}`, {tx['steps']} steps x {tx['batch_size']} x {tx['seq_len']} bytes of the default corpus; "
            f"validation bits per byte (lower is better). lr {config['lr']:g}. `vs base`: the change's direction on "
            "MQAR at L and on text, `within noise` when the difference is below two binomial standard "
            f"errors of the evaluation (MQAR) or {TEXT_NOISE:g} bits/byte (text: two seed deviations measured "
            "by the language-modeling experiment); `paper`: what the paper reports for removing the "
            "component. With one seed, MQAR's seed-to-seed spread is not measured and can be all of the "
            "scale (a model learns recall with one seed and not another: the length-generalization "
            "experiment).",
            "",
        ]
        header = ["variant", "params", "val@L"] + [f"eval {n}" for n in lengths]
        header += ["bits/byte", "vs base (MQAR, text)", "paper", "time (min)"]
        rows = []
        for v in variants:
            mqar, text = by.get((family, v, "mqar"), []), by.get((family, v, "text"), [])
            if not mqar and not text:
                continue
            acc = [((o.get("eval") or {}).get("accuracy") or {}).get(str(lengths[0])) for o in mqar]
            bpb = [(o.get("train") or {}).get("val_bpb") for o in text]
            verdict = "–"
            if v != base:
                base_acc = [
                    ((o.get("eval") or {}).get("accuracy") or {}).get(str(lengths[0]))
                    for o in by.get((family, base, "mqar"), [])
                ]
                base_bpb = [(o.get("train") or {}).get("val_bpb") for o in by.get((family, base, "text"), [])]
                a, b = mean_std(acc)[0], mean_std(base_acc)[0]
                p = min(max(((a or 0) + (b or 0)) / 2, 0.05), 0.95)
                noise = 2 * (2 * p * (1 - p) / max(mq["samples"], 1)) ** 0.5
                x, y = mean_std(bpb)[0], mean_std(base_bpb)[0]
                verdict = (
                    _direction(None if a is None or b is None else a - b, noise, True)
                    + ", "
                    + _direction(None if x is None or y is None else x - y, TEXT_NOISE, False)
                )
            seconds = sum(o.get("seconds", 0) for o in mqar + text)
            rows.append(
                [
                    v,
                    f"{(mqar or text)[0].get('parameters') or 0:,}",
                    fmt_mean([(o.get("train") or {}).get("val_accuracy") for o in mqar], 100),
                ]
                + [
                    fmt_mean([((o.get("eval") or {}).get("accuracy") or {}).get(str(n)) for o in mqar], 100)
                    for n in lengths
                ]
                + [fmt_mean(bpb, 1, 3), verdict, PAPER.get(v, "–"), f"{seconds / 60:.1f}"]
            )
        lines += [table(header, rows), ""]
    return "\n".join(lines) + "\n", {}


EXPERIMENT = Experiment(
    name="ablations",
    summary=(
        "Titans' and ATLAS's components taken out one at a time (Titans: linear memory, no momentum, no decay, "
        "no persistent memory, no convolution, memory depth 1/2/3; ATLAS: window 1, no polynomial map, no Muon, "
        "chunk instead of token granularity, no memory LayerNorm), each trained at the same budget on MQAR recall "
        "and on text."
    ),
    budgets=BUDGETS,
    make_cells=cells,
    report=report,
    filters={"presets": "families", "tasks": "measures"},
)
