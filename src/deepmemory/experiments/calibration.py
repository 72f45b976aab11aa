"""``calibration``: the inner learning rate of every memory family, swept and reported.

The papers give no range for the memories' inner learning rate (Titans' θ_t, ATLAS's η_t); the
library's cap ``max_lr`` (and, for the gradient-descent and momentum rules, the step bound) is its
own choice. For each family this sweeps ``max_lr`` and measures, per setting, the write strength
at init (:func:`deepmemory.models.write_strength`: the share of the residual ``v - M(k)`` one write
closes, with the gates at init and saturated) and the recall after training on MQAR at
``tiny-w16`` (the trainer's validation accuracy, and ``deepmemory eval`` at L and 4L), and whether
training stayed finite. ``benchmarks/calibrate.py`` measures more per setting (momentum damping,
the memory LayerNorm, bfloat16 and long-stream stability); this is the sweep through the trainer.
"""

from __future__ import annotations

from .length_generalization import TASKS
from .runner import Cell, Experiment, fmt_mean, group_by, mean_std, table

# preset -> (where its inner rate lives, the settings added to every point of the sweep)
FAMILIES = {
    "gated-deltanet": ("memory", {}),
    "titans-lmm": ("memory", {"step_bound": 1.0}),
    "omeganet": ("memory", {"step_bound": 1.0}),
    "atlas": ("memory", {}),  # Muon's step is orthogonalised: bounded as it is
    "dla": ("memory", {"step_bound": 1.0}),
    "swla": ("memory", {"step_bound": 1.0}),
    "swdt": ("kernel", {}),
    "dot": ("kernel", {}),
}
SLOW = ("atlas",)

BUDGETS = {
    "toy": dict(
        presets=["titans-lmm"],
        max_lr=[None, 1.0],
        size="tiny-w16",
        seq_len=32,
        batch_size=2,
        steps=2,
        samples=2,
        multiples=[1],
        lr=3e-3,
        seeds=[0],
    ),
    "cpu": dict(
        presets=list(FAMILIES),
        # three points a family within the hour: 7 families x 3 rates x 300 steps of 32 rows (the Atlas
        # cells apart); rows of 32 learn MQAR where rows of 16 did not (the length-generalization pilot)
        max_lr=[None, 0.1, 1.0],
        size="tiny-w16",
        seq_len=64,
        batch_size=32,
        steps=300,
        samples=100,
        multiples=[1, 4],
        lr=3e-3,
        seeds=[0],
    ),
    "gpu": dict(
        presets=list(FAMILIES),
        max_lr=[None, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
        size="tiny-w16",
        seq_len=128,
        batch_size=64,
        steps=3000,
        samples=200,
        multiples=[1, 4],
        lr=3e-3,
        seeds=[0, 1, 2],
    ),
}


def _setting(preset: str, max_lr: float | None) -> dict:
    """The overrides of one point: None is the preset as shipped."""
    if max_lr is None:
        return {}
    where, extra = FAMILIES[preset]
    return {where: dict(extra, max_lr=max_lr)}


def _label(max_lr: float | None) -> str:
    return "preset" if max_lr is None else f"{max_lr:g}"


def cells(config: dict) -> list[Cell]:
    out = []
    for preset in config["presets"]:
        for max_lr in config["max_lr"]:
            overrides = _setting(preset, max_lr)
            for seed in config["seeds"]:
                train = dict(
                    model=preset,
                    size=config["size"],
                    task="mqar",
                    task_settings=TASKS["mqar"]["settings"],
                    seq_len=config["seq_len"],
                    batch_size=config["batch_size"],
                    steps=config["steps"],
                    lr=config["lr"],
                    seed=seed,
                    eval_every=max(1, config["steps"] // 3),
                    eval_tokens=128 * config["seq_len"],
                    log_every=max(1, config["steps"] // 3),
                    keep_checkpoints=1,
                    model_overrides=overrides,
                )
                out.append(
                    Cell(
                        key=f"{preset}-lr{_label(max_lr)}-s{seed}",
                        labels={"preset": preset, "max_lr": _label(max_lr), "seed": seed},
                        train=train,
                        eval=dict(
                            task="mqar",
                            lengths=[k * config["seq_len"] for k in config["multiples"]],
                            samples=config["samples"],
                            batch_size=config["samples"],
                        ),
                        probe={"write_strength": {"preset": preset, "size": config["size"], "overrides": overrides}},
                        group="atlas" if preset in SLOW else "main",
                    )
                )
    return sorted(out, key=lambda c: c.group != "main")


def _shipped(outcome: dict) -> str:
    """The preset's own ``max_lr`` (and step bound), from the run's model config."""
    model = outcome.get("model") or {}
    rule = model.get("memory") or model.get("kernel") or {}
    bound = rule.get("step_bound")
    return f"{rule.get('max_lr')}" + (f", bound {bound:g}" if bound else "")


def report(config: dict, outcomes: list[dict]) -> tuple[str, dict]:
    by = group_by(outcomes, "preset", "max_lr")
    lengths = [k * config["seq_len"] for k in config["multiples"]]
    gdn = [
        ((o.get("probe") or {}).get("write_strength") or {}).get("init")
        for o in by.get(("gated-deltanet", "preset"), [])
    ]
    gdn_init = mean_std(gdn)[0]
    lines = [
        "## Inner learning rate: write strength at init and MQAR recall after training",
        "",
        f"MQAR {TASKS['mqar']['settings']} at `{config['size']}`: {config['steps']} steps x "
        f"{config['batch_size']} rows x {config['seq_len']} tokens, lr {config['lr']:g}. "
        "`max_lr`: the cap on the memory's inner rate (`preset`: as shipped; the other points add "
        "the step bound 1.0 to the gradient-descent and momentum rules, Muon and the kernel "
        "memories keep theirs). `write@init` / `saturated`: the share of the residual one write "
        "closes (1 = all of it); `/ GDN`: that share over Gated DeltaNet's at init. `val loss`: the "
        "validation answer loss at the end (nats per answer token; ln 4 = 1.39 is the level of picking one of the "
        "four values shown, below it is recall being learned), a measure that moves before accuracy does. "
        "Accuracy in %.",
        "",
    ]
    header = ["preset", "max_lr", "write@init", "saturated", "/ GDN", "val loss", "val@L"]
    header += [f"eval {n}" for n in lengths] + ["status"]
    rows = []
    for preset in config["presets"]:
        for max_lr in config["max_lr"]:
            group = by.get((preset, _label(max_lr)))
            if not group:
                continue
            ws = [((o.get("probe") or {}).get("write_strength") or {}) for o in group]
            init = mean_std([w.get("init") for w in ws])[0]
            rows.append(
                [
                    f"`{preset}`",
                    _label(max_lr) + (f" ({_shipped(group[0])})" if max_lr is None else ""),
                    "–" if init is None else f"{init:.3g}",
                    fmt_mean([w.get("saturated") for w in ws], 1, 3),
                    "–" if init is None or not gdn_init else f"{init / gdn_init:.2f}",
                    fmt_mean([(o.get("train") or {}).get("val_loss") for o in group], 1, 3),
                    fmt_mean([(o.get("train") or {}).get("val_accuracy") for o in group], 100),
                ]
                + [
                    fmt_mean([((o.get("eval") or {}).get("accuracy") or {}).get(str(n)) for o in group], 100)
                    for n in lengths
                ]
                + [", ".join(sorted({o.get("status", "?") for o in group}))]
            )
    lines += [table(header, rows), ""]
    return "\n".join(lines) + "\n", {}


EXPERIMENT = Experiment(
    name="calibration",
    summary=(
        "The memories' inner learning-rate cap (`max_lr`, which the papers leave open) swept per family: the "
        "write strength at init and with saturated gates, and MQAR recall after training at equal steps."
    ),
    budgets=BUDGETS,
    make_cells=cells,
    report=report,
    filters={"presets": "presets"},
)
