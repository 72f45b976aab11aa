"""The training loop behind ``deepmemory train`` and ``torchrun -m deepmemory.train``.

``train(settings)`` resolves the settings, joins the process group and hands the run to a
:class:`Trainer`: ``restore()`` (a fresh start or the latest checkpoint), then ``fit()``, which
drives ``train_step()``, ``evaluate()`` and ``save()`` up to the last step.

One optimizer step consumes a global batch of ``batch_size`` windows of ``seq_len + 1`` tokens:
``grad_accum`` micro-steps, each split evenly over the ranks. The loss is the mean next-token
cross entropy over the scored targets of the global batch, so the step is the same computation for
any (ranks, grad_accum) split. With ``packing`` (the default for a corpus) each window comes with
where its documents begin: the model gets ``position_ids`` that restart at 0 there, and a target
that begins a document is not scored (docs/training.md, "Documents and packing").
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import os_error_line
from ..data import (
    DataError,
    WindowSampler,
    bits_per_byte,
    build_corpus,
    eval_window_starts,
    eval_windows,
    load_tokenizer,
    packed_labels,
    packed_position_ids,
    tokenizer_from_info,
)
from ..data.loader import IGNORE_INDEX
from ..files import atomic_path
from ..threads import set_threads
from . import checkpoint as ck
from . import task_data
from .config import ConfigError, TrainConfig, new_config, resume_config
from .distributed import (
    Env,
    all_sum,
    barrier,
    broadcast_str,
    first_error,
    gather_model_state,
    gather_optimizer_state,
    grad_norm_clip,
    load_optimizer_state,
    setup,
    teardown,
    unused_parameters,
    unwrap,
    wrap,
)
from .footprint import check_fits, check_weights_fit, least_parameters, training_footprint
from .loggers import check_reporters, cut_log

FSDP_MIN_PARAMETERS = 300_000_000  # the 340m size and up: full replicas stop fitting comfortably


class TrainError(Exception):
    """A user error of a training run: one line, no traceback."""


class DivergenceError(TrainError):
    """The run diverged: the training loss, the gradient norm or the validation loss is not finite
    (or the weights about to be saved are not). Raised on every rank together, before anything of
    the diverged state is written: the optimizer has not stepped on it, and the last good
    checkpoint stays on disk as it was. ``deepmemory train`` exits with code 3 on it.

    Attributes: ``step`` (the step that diverged; 0 for the validation before the first step),
    ``reason``, ``run_dir``, ``checkpoint_step`` (the step of the last good checkpoint, ``None``
    when there is none) and ``metrics`` (the diverged ``metrics.jsonl`` row, or ``None``).
    """

    def __init__(
        self,
        step: int,
        reason: str,
        run_dir: str | None,
        checkpoint_step: int | None,
        metrics: dict | None = None,
    ):
        kept = (
            f"the last good checkpoint (step {checkpoint_step}) is kept in {run_dir}"
            if checkpoint_step is not None
            else f"no checkpoint was written (run directory {run_dir})"
        )
        super().__init__(f"training diverged at step {step}: {reason}; {kept}")
        self.step, self.reason, self.run_dir, self.checkpoint_step, self.metrics = (
            step,
            reason,
            run_dir,
            checkpoint_step,
            metrics,
        )


USER_ERRORS = (ConfigError, DataError, ck.CheckpointError, TrainError)


# ---------------------------------------------------------------- pieces
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, cosine down to ``min_lr_ratio * lr`` at
    ``lr_decay_steps``, flat after (where a run extended by ``--resume --steps`` goes on)."""
    warmup, decay, low = cfg.warmup_steps, cfg.lr_decay_steps, cfg.lr * cfg.min_lr_ratio
    if step < warmup:
        return cfg.lr * (step + 1) / (warmup + 1)
    if step >= decay:
        return low
    progress = (step - warmup) / max(1, decay - warmup)
    return low + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - low)


def build_model(cfg: TrainConfig, vocab_size: int) -> nn.Module:
    """The preset ``cfg.model`` at ``cfg.size`` with ``cfg.model_overrides`` and ``vocab_size``.
    ``ConfigError`` (one line) for a bad preset, size or override, or for overrides whose weights
    could not fit in this machine's memory (a lower bound, checked before anything is built)."""
    from ..models import build
    from ..models.presets import SIZES

    fields = {**(SIZES[cfg.size][0] if cfg.size in SIZES else {}), **cfg.model_overrides, "vocab_size": vocab_size}
    check_weights_fit(
        least_parameters(fields), f"--model {cfg.model} --size {cfg.size} with its model_overrides", ConfigError
    )
    try:
        return build(cfg.model, size=cfg.size, **dict(cfg.model_overrides, vocab_size=vocab_size))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--model {cfg.model} --size {cfg.size}: {' '.join(str(err).split())}") from err


def model_from_config(config: dict) -> nn.Module:
    """The model a run record's model config describes (random weights).

    Raises:
        CheckpointError: (one line) the config is not a JSON object, has a key that neither
            :class:`DeepMemoryConfig` nor Hugging Face's config writes, fails the config's checks,
            or describes more float32 weights than this machine's memory holds (counted on the
            meta device before anything is allocated).
    """
    from ..models import DeepMemoryConfig, DeepMemoryForCausalLM, count_parameters

    if not isinstance(config, dict):
        raise ck.CheckpointError(f"the stored model config must be a JSON object; got {type(config).__name__}")
    unknown = sorted(str(k) for k in set(config) - _stored_config_keys())
    if unknown:
        raise ck.CheckpointError(
            f"the stored model config has unknown field(s) {', '.join(unknown)}; "
            f"valid fields: {', '.join(DeepMemoryConfig.own_fields())}"
        )
    check_weights_fit(least_parameters(config), "the stored model config", ck.CheckpointError)
    try:
        model_config = DeepMemoryConfig.from_dict(dict(config))
        parameters = count_parameters(model_config)[0]
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as err:
        raise ck.CheckpointError(f"the stored model config cannot be built: {' '.join(str(err).split())}") from err
    check_weights_fit(parameters, "the stored model config", ck.CheckpointError)
    return DeepMemoryForCausalLM(model_config)


def check_config_file(folder: str, config: dict) -> None:
    """The run record's model ``config`` (``run.json``) is the one source of a run's model; the
    ``config.json`` beside it in ``folder`` (a run directory or one of its checkpoints) is what
    ``AutoModelForCausalLM`` reads, written from the record. Nothing when ``folder`` has no
    ``config.json`` (a format-1 run).

    Raises:
        CheckpointError: (one line) ``config.json`` cannot be read or built, or describes another
            model than the record (an edit of one file and not the other): names the first field
            that differs and both values.
    """
    from ..models import DeepMemoryConfig

    path = os.path.join(folder, ck.CONFIG)
    parent = os.path.dirname(os.path.normpath(folder))
    run_dir = os.path.dirname(parent) if os.path.basename(parent) == ck.CHECKPOINTS else folder
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(run_dir, ck.RUN)):
        return
    raw = ck.read_json(path)
    try:
        theirs = DeepMemoryConfig.from_dict(dict(raw)).to_dict()
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as err:
        raise ck.CheckpointError(f"{path} cannot be built: {' '.join(str(err).split())}") from err
    ours = DeepMemoryConfig.from_dict(dict(config)).to_dict()
    for field in DeepMemoryConfig.own_fields():
        if ours.get(field) != theirs.get(field):
            raise ck.CheckpointError(
                f"{path} describes another model than {ck.RUN} ({field}: {theirs.get(field)!r} against "
                f"{ours.get(field)!r}); {ck.RUN} is the run's model and {ck.CONFIG} is written from it: restore "
                f"{ck.CONFIG}, or change the model in a `deepmemory export` copy"
            )


def _stored_config_keys() -> set:
    """The keys a stored model config may hold: what ``DeepMemoryConfig.to_dict()`` writes
    (Hugging Face's keys among them) and the aliases of :meth:`DeepMemoryConfig.own_fields`."""
    from ..models import DeepMemoryConfig

    return set(DeepMemoryConfig().to_dict()) | set(DeepMemoryConfig.own_fields())


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices (dim >= 2) decay, gains and biases do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def resolved_precision(env: Env, precision: str) -> str:
    """The precision ``precision`` means on ``env``'s device: ``"bf16"`` or ``"fp32"``."""
    use_bf16 = precision == "bf16" or (
        precision == "auto" and env.device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    return "bf16" if use_bf16 else "fp32"


def autocast(env: Env, precision: str):
    use_bf16 = resolved_precision(env, precision) == "bf16"
    return torch.autocast(env.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


def grad_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-step."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync") and not enabled:  # DDP
        return model.no_sync()
    return contextlib.nullcontext()


def next_token_loss(
    model: nn.Module, rows: torch.Tensor, reduction: str = "mean", starts: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross entropy of ``rows[:, 1:]`` given ``rows[:, :-1]``; ``rows [B, L + 1]``.

    ``starts [B, L + 1]`` (bool, True where a document begins; the loader's ``next_packed``): the
    documents are read as if alone, the model given ``position_ids`` (:func:`packed_position_ids`
    of the inputs, Hugging Face's packing convention), and a target that begins a document is not
    scored (``-100``, :func:`packed_labels`): ``reduction="mean"`` is then over the scored targets
    (NaN when none is), ``"sum"`` their sum."""
    if starts is None:
        logits = model(input_ids=rows[:, :-1], use_cache=False).logits
        return F.cross_entropy(_upcast(logits).flatten(0, 1), rows[:, 1:].flatten(), reduction=reduction)
    logits = model(input_ids=rows[:, :-1], position_ids=packed_position_ids(starts[:, :-1]), use_cache=False).logits
    targets = packed_labels(rows, starts)[:, 1:]
    return F.cross_entropy(
        _upcast(logits).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction
    )


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits as float32 for the softmax; float32 and float64 as they are."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def scored_targets(rows: torch.Tensor, starts: torch.Tensor | None) -> int:
    """The targets :func:`next_token_loss` scores in ``rows [B, L + 1]``: ``B * L``, less those that
    begin a document when ``starts`` is given."""
    total = rows[:, 1:].numel()
    return total if starts is None else total - int(starts[:, 1:].sum())


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward, through Hugging Face's public switch
    (``activation_checkpointing_enable``, or ``gradient_checkpointing_enable`` in releases that
    predate that name), with the non-reentrant checkpoint."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@torch.no_grad()
def validation_loss(
    model: nn.Module, windows: torch.Tensor, micro: int, env: Env, precision: str, starts: torch.Tensor | None = None
) -> float:
    """Mean next-token loss (nats) over the scored targets of ``windows [n, L + 1]``, split over
    ranks, each rank taking the same number of forward calls (FSDP needs them in step). With
    ``starts [n, L + 1]`` the documents are packed with boundaries, as in training
    (:func:`next_token_loss`)."""
    was_training = model.training
    model.eval()
    total = 0.0
    mine = windows[env.rank :: env.world]
    mine_starts = None if starts is None else starts[env.rank :: env.world]
    for i in range(0, mine.shape[0], micro):
        part = None if mine_starts is None else mine_starts[i : i + micro].to(env.device)
        with autocast(env, precision):
            total += float(next_token_loss(model, mine[i : i + micro].to(env.device), reduction="sum", starts=part))
    model.train(was_training)
    total, count = all_sum(env, [total, float(scored_targets(mine, mine_starts))])
    return total / max(count, 1.0)


def _default_out(cfg: TrainConfig) -> str:
    base = os.path.join("runs", f"{cfg.model}-{cfg.size}-{time.strftime('%Y%m%d-%H%M%S')}")
    out, i = base, 1
    while os.path.exists(out):
        out, i = f"{base}-{i}", i + 1
    return out


def _create_run_dir(out: str, overwrite: bool, write: Callable[[str], None]) -> None:
    """Build the run directory beside ``out`` and rename it in; an existing ``out`` is only
    replaced with ``overwrite``, and only if it is a run directory or empty; ``TrainError`` when
    the nearest existing folder above ``out`` is a file or not writable."""
    ck.check_writable_parent(out, "--out", TrainError)
    if os.path.exists(out) and not (
        os.path.isdir(out) and not os.listdir(out)
    ):  # an empty folder holds nothing to lose
        if not overwrite:
            raise TrainError(f"{out} already exists; pass --overwrite to replace it or --resume {out} to continue it")
        if not os.path.isdir(out) or (os.listdir(out) and not ck.is_run_dir(out)):
            raise TrainError(f"--overwrite refuses to replace {out}: it is not a deepmemory run directory")
    ck.write_dir(out, write)


def _read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, ck.METRICS)
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, "rb") as f:  # (bytes: a garbled line is a decode error of its own, not of the file)
        for line in f:
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):  # a line cut short by a crash (or garbled)
                break
            if (
                not isinstance(row, dict)
                or isinstance(row.get("step"), bool)
                or not isinstance(row.get("step", 0), int)
            ):
                break
            rows.append(row)
    return rows


def data_line(corpus, cfg: TrainConfig) -> str:
    """What the run prints of its corpus after ``data: SOURCE: ``: the split (whole documents, or
    the token stream cut when no set of whole documents fits ``val_fraction``), the token counts,
    the packing and the context-free baseline (:meth:`~deepmemory.data.Corpus.baseline`)."""
    from ..data.corpus import VAL_MAX_RATIO, VAL_MIN_RATIO

    if corpus.split == "stream":
        low, high = 100 * VAL_MIN_RATIO * cfg.val_fraction, 100 * VAL_MAX_RATIO * cfg.val_fraction
        split = (
            f"{corpus.train_docs} documents, validation the last {100 * cfg.val_fraction:g}% of the token stream "
            f"(no set of whole documents holds {low:g}-{high:g}% of the tokens), "
        )
    else:
        split = f"{corpus.train_docs} train / {corpus.val_docs} validation documents, "
    name, bits = corpus.baseline()
    return (
        split
        + f"{corpus.train.numel():,} / {corpus.val.numel():,} tokens, "
        + ("packed with boundaries" if cfg.packing else "one continuous stream (--no-packing)")
        + f"; {name} {bits:.3f} bits/byte"
    )


def plot_losses(run_dir: str, tokens_per_byte: float, baseline: tuple[str, float]) -> None:
    """``loss.png``: train and validation bits per byte against the step, and the corpus's
    context-free ``baseline`` (``(name, bits per byte)``, :meth:`~deepmemory.data.Corpus.baseline`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_metrics(run_dir)  # a diverged row holds null: left out
    train = [(r["step"], bits_per_byte(r["loss"], tokens_per_byte)) for r in rows if r.get("loss") is not None]
    val = [(r["step"], r["val_bpb"]) for r in rows if r.get("val_bpb") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.8, label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.axhline(baseline[1], color="gray", ls="--", lw=1, label=f"{baseline[0]} ({baseline[1]:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(os.path.join(run_dir, "loss.png"), durable=False) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _metrics_line(row: dict) -> str:
    """A ``metrics.jsonl`` line: strict JSON, a non-finite value (a diverged loss) written as ``null``."""
    return ck.strict_json(ck.finite_or_none(row)) + "\n"


def model_files(model_config, tokenizer) -> Callable[[str], None]:
    """A writer of the files that make a folder beside ``model.safetensors`` a Hugging Face model
    folder: ``config.json`` (``model_type`` "deepmemory"), ``generation_config.json`` and the
    tokenizer (``tokenizer.json`` + ``tokenizer_config.json`` for a Hugging Face tokenizer)."""
    from transformers import GenerationConfig

    eos = tokenizer.eos_id
    config_text = model_config.to_json_string(use_diff=True)
    generation_text = GenerationConfig(
        eos_token_id=eos,
        pad_token_id=eos,
        bos_token_id=model_config.bos_token_id,
    ).to_json_string(use_diff=True)
    tokenizer_config = None
    backend = getattr(tokenizer, "tokenizer", None)  # a Hugging Face `tokenizers` model
    if backend is not None:
        eos_token = backend.id_to_token(eos) if eos is not None else None
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "eos_token": eos_token,
            "pad_token": eos_token,
            "model_max_length": 1_000_000_000,
        }

    def write(directory: str) -> None:
        ck.write_text(os.path.join(directory, ck.CONFIG), config_text)
        ck.write_text(os.path.join(directory, ck.GENERATION_CONFIG), generation_text)
        tokenizer.save(directory)
        if tokenizer_config is not None:
            ck.write_json(os.path.join(directory, "tokenizer_config.json"), tokenizer_config)

    return write


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


# ---------------------------------------------------------------- the run
def train(
    settings: dict, resume: str | None = None, overwrite: bool = False, quiet: bool = False, progress: bool = True
) -> dict:
    """Train from ``settings`` (``TrainConfig`` fields), or continue the run directory ``resume``.
    Returns the summary (on every rank). ``quiet`` prints nothing; ``progress=False`` drops the
    progress bar and keeps the log lines (the bar is drawn only when stderr is a terminal anyway).

    Raises:
        DivergenceError: the run diverged (see :class:`DivergenceError`).
        ConfigError, DataError, CheckpointError, TrainError: the other user errors (``USER_ERRORS``).
    """
    started = time.time()
    stored = ck.read_run_config(resume) if resume else None
    cfg = resume_config(stored["train"], settings, resume) if resume else new_config(settings)
    try:
        env = setup(cfg.device)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if settings.get("fsdp") and not env.distributed:
        raise ConfigError(
            "--fsdp shards the model over the processes of a torchrun job, and this is a single process; "
            "start it with `torchrun --nproc-per-node N -m deepmemory.train ...` or leave --fsdp out"
        )
    if cfg.threads is not None or env.device.type == "cpu":
        # by default one thread on CPU (OMP_NUM_THREADS when set): the memory models run many small
        # ops, and extra intra-op threads mostly wait on each other (deepmemory.threads)
        set_threads(cfg.threads)
    try:
        with Trainer(
            cfg, env, stored=stored, resume=resume, overwrite=overwrite, quiet=quiet, progress=progress, started=started
        ) as trainer:
            return trainer.fit()
    finally:
        teardown(env)


class Trainer:
    """One training run on one rank (every rank of a ``torchrun`` job builds its own).

    ``Trainer(cfg, env)`` builds the tokenizer, the model (seeded with ``cfg.seed``) and the data;
    :meth:`restore` opens the run directory and sets the state, fresh or from the latest checkpoint;
    :meth:`fit` drives :meth:`train_step`, :meth:`evaluate` and :meth:`save` up to ``cfg.steps``
    with the progress bar, the log lines and ``metrics.jsonl``. Used as a context manager it closes
    ``metrics.jsonl`` on the way out (:meth:`close`).

    Args:
        cfg: the resolved settings (``new_config`` or ``resume_config``).
        env: the process group, from :func:`~deepmemory.train.distributed.setup`.
        stored: the run directory's ``config.json`` when resuming (read from ``resume`` if omitted).
        resume: the run directory to continue; ``None`` starts the one at ``cfg.out``.
        overwrite: replace an existing run directory at ``cfg.out``.
        quiet: print nothing (rank 0 alone prints in any case).
        progress: draw the progress bar, on rank 0 and only when stderr is a terminal (a pipe or a
            file gets the log lines without the bar's carriage returns); ``False``: never.
        started: the run's start (``time.time()``), for the wall time; default now.

    Raises:
        ConfigError: the batch does not split over the ranks; a bad ``--model``/``--size``.
        DataError: the corpus or the tokenizer cannot be read, or the validation data is too short.
        CheckpointError: the resumed run's stored tokenizer or model config cannot be built.

    Attributes: ``model`` (the bare model), ``optimizer``, ``step`` (optimizer steps done),
    ``run_dir``, ``train_loss`` and ``val_loss`` (the latest finite ones, or ``None``),
    ``checkpoint_step`` (the step of the newest checkpoint on disk, or ``None``), ``corpus``, ``sampler``.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        env: Env,
        *,
        stored: dict | None = None,
        resume: str | None = None,
        overwrite: bool = False,
        quiet: bool = False,
        progress: bool = True,
        started: float | None = None,
    ):
        from tqdm.auto import tqdm

        if resume and stored is None:
            stored = ck.read_run_config(resume)
        self.cfg, self.env, self.stored, self.resume, self.overwrite, self.quiet = (
            cfg,
            env,
            stored,
            resume,
            overwrite,
            quiet,
        )
        self.progress = progress
        self.started = time.time() if started is None else started
        self._say = (lambda *a: None) if quiet or not env.is_main else tqdm.write
        self.micro_global = cfg.batch_size // cfg.grad_accum
        if self.micro_global % env.world:
            raise ConfigError(
                f"--batch-size {cfg.batch_size} / --grad-accum {cfg.grad_accum} = {self.micro_global} sequences "
                f"per micro-step does not split over {env.world} processes"
            )
        self.micro = self.micro_global // env.world
        self.tokens_per_step = cfg.batch_size * cfg.seq_len

        self.tokenizer = tokenizer_from_info(stored["tokenizer"], resume) if resume else load_tokenizer(cfg.tokenizer)
        # a task (--task) replaces the corpus; a token task widens a new model's vocabulary to its ids
        self.task = task_data.make_task(cfg.task, cfg.task_settings, self.tokenizer) if cfg.task else None
        vocab = task_data.model_vocab_size(self.task, self.tokenizer) if self.task else self.tokenizer.vocab_size
        torch.manual_seed(cfg.seed)
        if resume:
            check_config_file(resume, stored["model"]["config"])
        self.model = model_from_config(stored["model"]["config"]) if resume else build_model(cfg, vocab)
        if self.task:
            task_data.check_vocab(self.task, self.model.config.vocab_size, "the run's model")
        # what a Hugging Face loader of the run directory needs: the architecture and the token ids
        self.model.config.architectures = [type(self.model).__name__]
        self.model.config.eos_token_id = self.model.config.pad_token_id = self.tokenizer.eos_id
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.use_fsdp = env.distributed and (cfg.fsdp or self.n_params >= FSDP_MIN_PARAMETERS)
        # a batch that cannot fit is refused before any data is read or any batch drawn (a lower bound)
        mc = self.model.config
        check_fits(
            training_footprint(
                self.n_params,
                mc.hidden_size,
                mc.num_hidden_layers,
                mc.vocab_size,
                self.micro,
                cfg.seq_len,
                cfg.batch_size,
                env.world if self.use_fsdp else 1,
            ),
            env.device,
            cfg.batch_size,
            cfg.seq_len,
            self.n_params,
            self.micro,
        )
        if env.is_main:
            check_reporters(cfg.report_to)  # a missing tensorboard/wandb fails before anything is written
        self.val_starts: torch.Tensor | None = None  # where documents begin in the validation windows (packing)
        if self.task is None:
            self.corpus = build_corpus(cfg.data, self.tokenizer, cfg.val_fraction)
            self.sampler = WindowSampler(
                self.corpus.train, cfg.seq_len, cfg.seed, doc_starts=self.corpus.train_starts if cfg.packing else None
            )
            max_windows = max(1, cfg.eval_tokens // cfg.seq_len)
            val = eval_windows(self.corpus.val, cfg.seq_len, max_windows)
            if val.shape[0] < env.world:
                raise DataError(
                    f"the validation data holds {val.shape[0]} windows of --seq-len {cfg.seq_len}, fewer than "
                    f"{env.world} processes"
                )
            keep = val.shape[0] // env.world * env.world  # every rank evaluates as many windows
            self.val_windows = val[:keep]
            if cfg.packing:
                self.val_starts = eval_window_starts(
                    self.corpus.val_starts, self.corpus.val.numel(), cfg.seq_len, max_windows
                )[:keep]
            self.tpb_val, self.tpb_train = self.corpus.tokens_per_byte("val"), self.corpus.tokens_per_byte("train")
        else:  # (input_ids, labels) rows: fresh ones every step, a fixed validation set
            self.corpus, self.tpb_val, self.tpb_train = None, None, None
            self.sampler = task_data.TaskSampler(self.task, cfg.seq_len, cfg.seed)
            count = -(-max(1, cfg.eval_tokens // cfg.seq_len) // env.world) * env.world  # as many rows on every rank
            self.val_windows = task_data.validation_rows(self.task, count, cfg.seq_len, cfg.seed)

        self.run_dir: str | None = resume
        self.checkpoint_path: str | None = None  # the checkpoint resumed from
        self.checkpoint_step: int | None = None  # the newest checkpoint on disk: what a divergence leaves
        self.step, self.elapsed_before = 0, 0.0
        self.train_loss: float | None = None
        self.val_loss: float | None = None
        self.val_accuracy: float | None = None  # a task run's latest validation exact-match accuracy
        self.wrapped: nn.Module | None = None  # DDP's wrapper, or the (FSDP-sharded) model itself
        self.optimizer: torch.optim.Optimizer | None = None
        self._step_model: nn.Module | None = None  # the wrapped model, compiled with --compile
        self._eval_model: nn.Module | None = None  # DDP's forward would sync buffers; the bare module does not
        self._metrics_file = None
        self._reporters: list = []
        self._interval: list[dict] = []  # the train rows since the last report
        self.stopped: str | None = None  # why fit() ended before cfg.steps ("time limit")
        self._write_model_files = model_files(self.model.config, self.tokenizer)

    def resolved(self) -> dict:
        """What ``auto`` and the defaults became on this machine (stored in ``run.json``)."""
        return {
            "device": str(self.env.device),
            "precision": resolved_precision(self.env, self.cfg.precision),
            "processes": self.env.world,
            "threads": torch.get_num_threads(),
            "fsdp": self.use_fsdp,
            "save_every": self.save_every,
            "torch": torch.__version__,
        }

    @property
    def save_every(self) -> int:
        return self.cfg.save_every or self.cfg.eval_every

    # ------------------------------------------------------------ state
    def restore(self) -> int:
        """Open the run directory and set the training state.

        A fresh run (no ``resume``) gets its directory at ``cfg.out`` (default ``runs/MODEL-SIZE-DATE-TIME``)
        with ``config.json`` and the tokenizer, built beside it and renamed in. A resumed run drops
        any half-written checkpoint and loads the latest complete one: weights, optimizer moments,
        the RNG state, the data order and the step. Then the model goes to the device (gradient
        checkpointing and DDP/FSDP applied), ``metrics.jsonl`` is cut back to the restored step and
        opened for appending. Rank 0 writes; every rank learns the outcome. Call it once.

        Returns:
            the step the run continues from (``0`` for a fresh run).

        Raises:
            TrainError: the run directory cannot be created (it exists without ``overwrite``, it is
                not a run directory, an ``OSError``), or the resumed one has no complete checkpoint;
                raised on every rank.
            CheckpointError: the checkpoint cannot be read or does not fit the model.
            ConfigError: the resumed run is at ``cfg.steps`` already.
            RuntimeError: ``restore`` ran before.
        """
        if self.optimizer is not None:
            raise RuntimeError("Trainer.restore() runs once")
        cfg, env, model = self.cfg, self.env, self.model
        self._open_run_dir()

        optim_sd = rng = None
        if self.resume:
            model_sd, optim_sd, rng, state = ck.load_checkpoint(self.checkpoint_path)
            try:
                model.load_state_dict(model_sd, strict=True)
            except RuntimeError as err:
                raise ck.CheckpointError(
                    f"{self.checkpoint_path} does not fit the run's model: {str(err).splitlines()[0]}"
                ) from err
            try:
                self.sampler.load_state_dict(state["data"])
            except DataError:
                raise
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                raise ck.CheckpointError(
                    f"{self.checkpoint_path}/state.json is damaged: the data position "
                    f"{state['data']!r:.80} does not load ({type(err).__name__})"
                ) from err
            self.step, self.elapsed_before = state["step"], state.get("elapsed", 0.0)
            self.checkpoint_step = self.step
            if cfg.steps <= self.step:
                raise ConfigError(
                    f"--resume {self.resume}: the run is at step {self.step} already; pass --steps greater than "
                    f"{self.step}"
                )
            # (a run directory of an older deepmemory may hold a NaN here, which strict JSON cannot write back)
            losses = ck.finite_or_none({"train": state.get("train_loss"), "val": state.get("val_loss")})
            self.train_loss, self.val_loss = losses["train"], losses["val"]
        model.to(env.device)
        if cfg.grad_checkpointing:
            enable_grad_checkpointing(model)
        # DDP needs to know of parameters a step leaves without gradient (a sequence shorter than a
        # chunk of a per-chunk memory never updates it): one probe step finds them
        unused = unused_parameters(model, cfg.seq_len, env.device) if env.distributed and not self.use_fsdp else []
        if unused:
            self._say(
                f"note: {len(unused)} parameter tensors get no gradient at --seq-len {cfg.seq_len} (e.g. {unused[0]}); "
                "DDP looks for unused parameters at every step"
            )
        self.wrapped = wrap(model, env, self.use_fsdp, find_unused=bool(unused))
        self.optimizer = make_optimizer(model, cfg)
        if self.resume:
            try:
                load_optimizer_state(model, self.optimizer, optim_sd)
                torch.set_rng_state(rng["torch"])
                if env.device.type == "cuda" and "cuda" in rng:
                    torch.cuda.set_rng_state(rng["cuda"])
            except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
                raise ck.CheckpointError(
                    f"{self.checkpoint_path}: its optimizer or RNG state does not fit the run ({ck._one_line(err)})"
                ) from err
        self._step_model = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self._eval_model = unwrap(self.wrapped)

        if env.is_main:
            metrics = [r for r in _read_metrics(self.run_dir) if r.get("step", 0) <= self.step]
            ck.write_text(os.path.join(self.run_dir, ck.METRICS), "".join(_metrics_line(r) for r in metrics))
            if self.resume:
                record = dict(
                    self.stored,
                    version=ck.VERSION,
                    train=dict(cfg.to_dict(), out=os.path.abspath(self.run_dir)),
                    resolved=self.resolved(),
                )
                record["model"] = dict(record["model"], config=self.model.config.to_dict())
                ck.write_json(os.path.join(self.run_dir, ck.RUN), record)
                self._write_model_files(self.run_dir)  # (a format-1 run directory gains its Hugging Face files)
                cut_log(self.run_dir, self.step)
        barrier(env)
        self._metrics_file = open(os.path.join(self.run_dir, ck.METRICS), "a") if env.is_main else None
        return self.step

    def _open_run_dir(self) -> None:
        """Create the fresh run's directory, or find the resumed run's checkpoint (rank 0), and
        share the outcome: ``run_dir`` and ``checkpoint_path`` on every rank, or one error."""
        cfg, env = self.cfg, self.env
        run_dir, error, ckpt = self.resume, None, None
        if env.is_main:
            try:
                if self.resume:
                    if not os.access(self.resume, os.W_OK):  # (a read-only file system, or no permission)
                        raise TrainError(
                            f"--resume {self.resume}: the run directory is not writable (a read-only file "
                            "system or no permission); copy it to a writable place and resume the copy"
                        )
                    ck.remove_partial(self.resume)
                    ckpt = ck.latest_checkpoint(self.resume)
                    if ckpt is None:
                        raise ck.CheckpointError(
                            f"{self.resume} has no complete checkpoint to resume from (it stopped "
                            "before its first; start it again with --out "
                            f"{self.resume} --overwrite)"
                        )
                else:
                    run_dir = cfg.out or _default_out(cfg)
                    _create_run_dir(run_dir, self.overwrite, self._new_run_files(run_dir))
            except USER_ERRORS + (OSError,) as err:
                error = str(err) if not isinstance(err, OSError) else os_error_line(err)
        error = first_error(env, error)
        if error:
            raise TrainError(error)
        self.run_dir = broadcast_str(env, run_dir)
        self.checkpoint_path = broadcast_str(env, ckpt)

    def _new_run_files(self, run_dir: str) -> Callable[[str], None]:
        """What a fresh run directory starts with: ``config.json`` (settings, model, tokenizer, data) and the
        tokenizer."""
        cfg, corpus = self.cfg, self.corpus
        data = (
            task_data.record(self.task, cfg.task_settings, self.val_windows[0].shape[0])
            if self.task
            else {
                "source": corpus.source,
                "train_tokens": corpus.train.numel(),
                "val_tokens": corpus.val.numel(),
                "train_bytes": corpus.train_bytes,
                "val_bytes": corpus.val_bytes,
                "train_documents": corpus.train_docs,
                "val_documents": corpus.val_docs,
                "split": corpus.split,
                "byte_entropy": corpus.byte_entropy,
                **({"token_entropy_bpb": corpus.baseline()[1]} if corpus.token_entropy is not None else {}),
            }
        )
        record = {
            "format": ck.FORMAT,
            "version": ck.VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "train": dict(cfg.to_dict(), out=os.path.abspath(run_dir)),
            "resolved": self.resolved(),
            "model": {
                "preset": cfg.model,
                "size": cfg.size,
                "parameters": self.n_params,
                "config": self.model.config.to_dict(),
            },
            "tokenizer": self.tokenizer.info(),
            "data": data,
        }

        def write(tmp: str) -> None:
            ck.write_json(os.path.join(tmp, ck.RUN), record)
            self._write_model_files(tmp)

        return write

    def _require_restored(self, name: str) -> None:
        if self.optimizer is None:
            raise RuntimeError(f"Trainer.{name}() needs the state: call restore() first")

    # ------------------------------------------------------------ steps
    def train_step(self, batch: torch.Tensor | None = None) -> dict[str, float]:
        """One optimizer step at learning rate ``lr_at(step)``: the global batch in ``grad_accum``
        micro-steps (each split over the ranks, gradients synchronised on the last), the global
        gradient norm clipped to ``grad_clip`` (``0``: measured only), AdamW, ``step += 1``.

        Args:
            batch: the global batch ``[batch_size, seq_len + 1]`` of token ids, the same on every
                rank; default the sampler's next one (what makes a resumed run exact). With
                ``packing``, ``(rows, starts)``, both ``[batch_size, seq_len + 1]``, ``starts``
                bool, True where a document begins (a bare ``rows`` tensor: each row one
                document); the loss is the mean over the targets that do not begin a document, in
                the whole global batch. With a task, ``(input_ids, labels)``, both
                ``[batch_size, seq_len]``, and the loss is the mean over the scored (answer)
                positions of the whole global batch.

        Returns:
            ``{"step", "loss", "lr", "grad_norm"}``: the step just done, its mean next-token loss over
            the global batch (nats, also in ``train_loss``), its learning rate and the gradient norm
            before clipping.

        Raises:
            DivergenceError: the loss or the gradient norm is not finite; decided on values reduced
                over the ranks, so every rank raises. The optimizer has not stepped, the gradients
                are cleared and ``step`` is unchanged.
            ValueError: ``batch`` is not ``[batch_size, seq_len + 1]`` (with packing: nor a pair
                of such tensors, the second bool; with a task: not two ``[batch_size, seq_len]``
                tensors).
            RuntimeError: :meth:`restore` has not run.
        """
        self._require_restored("train_step")
        cfg, env = self.cfg, self.env
        packed = self.task is None and cfg.packing
        starts = None
        if batch is None:
            batch = self.sampler.next_packed(cfg.batch_size) if packed else self.sampler.next_batch(cfg.batch_size)
        elif self.task is not None:
            if not (
                isinstance(batch, (tuple, list))
                and len(batch) == 2
                and all(tuple(t.shape) == (cfg.batch_size, cfg.seq_len) for t in batch)
            ):
                raise ValueError(
                    f"a task batch must be (input_ids, labels), both [batch_size, seq_len] = [{cfg.batch_size}, "
                    f"{cfg.seq_len}]"
                )
        else:
            shape = (cfg.batch_size, cfg.seq_len + 1)
            if packed and isinstance(batch, (tuple, list)):
                if not (
                    len(batch) == 2
                    and all(isinstance(t, torch.Tensor) and tuple(t.shape) == shape for t in batch)
                    and batch[1].dtype == torch.bool
                ):
                    raise ValueError(
                        f"a packed batch must be (rows, starts), both [batch_size, seq_len + 1] = {list(shape)}, "
                        "starts bool"
                    )
            elif not isinstance(batch, torch.Tensor) or tuple(batch.shape) != shape:
                raise ValueError(
                    f"the batch must be [batch_size, seq_len + 1] = {list(shape)}; got "
                    f"{list(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__}"
                )
        if packed:
            batch, starts = (
                batch if isinstance(batch, (tuple, list)) else (batch, torch.zeros(batch.shape, dtype=torch.bool))
            )
            # each micro-step's summed loss, scaled so that the ranks' mean over grad_accum
            # micro-steps is the mean over the scored targets of the whole global batch
            scale = env.world * cfg.grad_accum / max(1, scored_targets(batch, starts))
        if self.task is not None:
            # each micro-step's summed answer loss, scaled so that the ranks' mean over grad_accum
            # micro-steps is the mean over the answer tokens of the whole global batch
            from ..data.tasks import IGNORE_INDEX

            answers = max(1, int((batch[1] != IGNORE_INDEX).sum()))
            scale = env.world * cfg.grad_accum / answers
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._step_model.train()
        loss_sum = torch.zeros((), device=env.device)
        for m in range(cfg.grad_accum):
            start = m * self.micro_global + env.rank * self.micro
            with grad_sync(self.wrapped, m == cfg.grad_accum - 1):
                with autocast(env, cfg.precision):
                    if packed:
                        loss = (
                            next_token_loss(
                                self._step_model,
                                batch[start : start + self.micro].to(env.device),
                                reduction="sum",
                                starts=starts[start : start + self.micro].to(env.device),
                            )
                            * scale
                        )
                    elif self.task is None:
                        loss = next_token_loss(self._step_model, batch[start : start + self.micro].to(env.device))
                    else:
                        ids, labels = (t[start : start + self.micro].to(env.device) for t in batch)
                        loss = task_data.answer_loss(self._step_model, ids, labels) * scale
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        norm = float(grad_norm_clip(self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
        # the norm is global already; summing it with the loss makes one value every rank decides on
        loss, norm_sum = all_sum(env, [float(loss_sum) / cfg.grad_accum, norm])
        loss /= env.world
        row = {"step": self.step + 1, "loss": loss, "lr": lr, "grad_norm": norm}
        if not (math.isfinite(loss) and math.isfinite(norm_sum)):
            self.optimizer.zero_grad(set_to_none=True)  # (clipping by a NaN norm made them NaN too)
            reasons = ([f"the training loss is {loss}"] if not math.isfinite(loss) else []) + (
                [f"the gradient norm is {norm_sum / env.world}"] if not math.isfinite(norm_sum) else []
            )
            raise self._diverged(self.step + 1, " and ".join(reasons), row)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.train_loss = loss
        return row

    def evaluate(self) -> dict[str, float]:
        """The mean next-token loss over the validation windows (split over the ranks; a collective:
        every rank calls it), in eval mode and without gradients; the train/eval mode is restored.
        With ``packing`` the windows are read as in training: documents apart, and the targets
        that begin a document left out of the mean (and so of the bits per byte).

        Returns:
            ``{"step", "val_loss", "val_bpb"}``: the current step, the loss in nats (also in
            ``val_loss``) and in bits per byte of the validation text. With a task,
            ``{"step", "val_loss", "val_accuracy"}``: the mean answer loss over the fixed validation
            rows and the share of their answers matched exactly (also in ``val_accuracy``).

        Raises:
            DivergenceError: the validation loss is not finite (reduced over the ranks: every rank raises).
            RuntimeError: :meth:`restore` has not run.
        """
        self._require_restored("evaluate")
        if self.task is not None:
            loss, accuracy = task_data.task_validation(
                self._eval_model, self.val_windows, self.micro, self.env, self.cfg.precision
            )
            row = {"step": self.step, "val_loss": loss, "val_accuracy": accuracy}
            self.val_accuracy = accuracy
        else:
            loss = validation_loss(
                self._eval_model, self.val_windows, self.micro, self.env, self.cfg.precision, self.val_starts
            )
            row = {"step": self.step, "val_loss": loss, "val_bpb": bits_per_byte(loss, self.tpb_val)}
        if not math.isfinite(loss):
            raise self._diverged(self.step, f"the validation loss is {loss}", row)
        self.val_loss = loss
        return row

    def save(self) -> None:
        """Checkpoint the current step: ``checkpoints/step-N/`` (weights, optimizer, RNG, and
        ``state.json`` with the data order, schedule, latest losses and elapsed time), written
        atomically; ``model.safetensors`` of the run directory refreshed; only the newest
        ``keep_checkpoints`` kept. Full tensors are gathered from every rank (a collective: every
        rank calls it); rank 0 writes, and all ranks leave together.

        Raises:
            DivergenceError: a weight is not finite (checked by rank 0, raised on every rank);
                nothing is written.
            OSError: writing failed (the previous checkpoints stay complete).
            RuntimeError: :meth:`restore` has not run.
        """
        self._require_restored("save")
        cfg, env = self.cfg, self.env
        model_state = gather_model_state(self.model)
        bad = None
        if env.is_main:
            bad = next(
                (name for name, t in model_state.items() if t.is_floating_point() and not bool(t.isfinite().all())),
                None,
            )
        bad = broadcast_str(env, bad)
        if bad:
            raise self._diverged(self.step, f"the weight {bad} holds non-finite values")
        optim_state = gather_optimizer_state(self.model, self.optimizer)
        if env.is_main:
            rng = {"torch": torch.get_rng_state()}
            if env.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state()
            ck.save_checkpoint(
                self.run_dir,
                self.step,
                model_state,
                optim_state,
                rng,
                {
                    "data": self.sampler.state_dict(),
                    "scheduler": {"step": self.step, "lr": lr_at(self.step, cfg)},
                    "train_loss": self.train_loss,
                    "val_loss": self.val_loss,
                    "elapsed": self.elapsed_before + time.time() - self.started,
                },
                cfg.keep_checkpoints,
                model_files=self._write_model_files,
            )
        self.checkpoint_step = self.step
        barrier(env)

    # ------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Run to ``cfg.steps``: :meth:`restore` (unless done), a validation at step 0, then
        :meth:`train_step` with the progress bar and a ``metrics.jsonl`` row per step; every
        ``log_every`` steps a log line and the ``report_to`` loggers; every ``eval_every`` steps
        :meth:`evaluate` (and ``loss.png`` redrawn), every ``save_every`` steps (default
        ``eval_every``) :meth:`save`, and both at the last step. With ``time_limit`` the run stops
        after the first step that ends past it (this process's time since it started), evaluated
        and saved, so ``--resume`` continues it. Rank 0 prints the run's lines, ends with the
        summary and closes ``metrics.jsonl`` and the loggers.

        Returns:
            the summary (on every rank): ``run_dir``, ``steps``, ``tokens``, ``wall_time_s`` (the
            whole run, resumed parts included), ``session_time_s`` (this process), ``stopped``
            (``"time limit"`` or ``None``), ``train_loss``, ``val_loss``, ``val_bpb``,
            ``train_bpb``, ``byte_entropy``, ``parameters``.

        Raises:
            what :meth:`restore`, :meth:`train_step`, :meth:`evaluate` and :meth:`save` raise
            (``DivergenceError``, with its row written to ``metrics.jsonl``; ``TrainError``,
            ``CheckpointError``, ``ConfigError``, ``OSError``).
        """
        from tqdm.auto import tqdm

        cfg, env, corpus, say = self.cfg, self.env, self.corpus, self._say
        try:
            if self.optimizer is None:
                self.restore()
            if self.task is not None:
                say(
                    "data: "
                    + task_data.describe(self.task, cfg.task_settings, cfg.seq_len, self.val_windows[0].shape[0])
                )
            else:
                say(f"data: {corpus.source}: " + data_line(corpus, cfg))
            say(
                f"model: {cfg.model} ({cfg.size}), {self.n_params:,} parameters; {env.world} process(es) on "
                f"{env.device.type}" + (", FSDP" if self.use_fsdp else ", DDP" if env.distributed else "")
            )
            say(
                f"run: {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens, lr {cfg.lr:g}, "
                + (f"resuming from {os.path.basename(self.checkpoint_path)} in " if self.resume else "directory ")
                + self.run_dir
            )

            if env.is_main:
                from .loggers import make_reporters

                self._reporters = make_reporters(
                    cfg.report_to, self.run_dir, self.stored or {}, cfg.to_dict(), self.step
                )
            if self.step == 0:
                self._validate()
            bar = tqdm(
                total=cfg.steps,
                initial=self.step,
                # None: tqdm draws the bar only on a terminal (a notebook's bar stays)
                disable=True if self.quiet or not self.progress or not env.is_main else None,
                unit="step",
                dynamic_ncols=True,
            )
            loop_start, first_step = time.time(), self.step
            deadline = self.started + cfg.time_limit if cfg.time_limit else None
            try:
                while self.step < cfg.steps:
                    row = self.train_step()
                    tok_s = (self.step - first_step) * self.tokens_per_step / max(time.time() - loop_start, 1e-9)
                    row = dict(row, tokens=self.step * self.tokens_per_step, tok_per_s=tok_s)
                    self._log(row)
                    self._interval.append(row)
                    bar.set_postfix_str(f"loss {self.train_loss:.3f} | {tok_s:,.0f} tok/s", refresh=False)
                    bar.update(1)
                    if self.step % cfg.log_every == 0:
                        self._report_train()
                    # every rank stops at the same step: the slowest one's clock decides
                    late = deadline is not None and all_sum(env, [float(time.time() >= deadline)])[0] > 0
                    last = self.step == cfg.steps or late
                    if self.step % cfg.eval_every == 0 or last:
                        self._validate()
                    if self.step % self.save_every == 0 or last:
                        self.save()
                    if late and self.step < cfg.steps:
                        self.stopped = "time limit"
                        break
            finally:
                bar.close()
        except DivergenceError as err:
            if err.metrics:
                self._log(err.metrics)
            raise
        finally:
            self.close()
        return self._finish(loop_start, first_step)

    def close(self) -> None:
        """Close ``metrics.jsonl`` and the loggers (rank 0); safe to call again."""
        if self._metrics_file:
            self._metrics_file.close()
        self._metrics_file = None
        reporters, self._reporters = self._reporters, []
        for reporter in reporters:
            reporter.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _log(self, row: dict) -> None:
        if self._metrics_file:
            self._metrics_file.write(_metrics_line(row))
            self._metrics_file.flush()

    def _diverged(self, step: int, reason: str, row: dict | None = None) -> DivergenceError:
        return DivergenceError(step, reason, self.run_dir, self.checkpoint_step, row)

    def _report(self, scalars: dict[str, float]) -> None:
        for reporter in self._reporters:
            reporter.log(scalars, self.step)

    def _report_train(self) -> None:
        """The log line and the loggers' train scalars: the mean loss since the last report, the
        latest learning rate, gradient norm and throughput."""
        rows, self._interval = self._interval, []
        if not rows:
            return
        loss = sum(r["loss"] for r in rows) / len(rows)
        last = rows[-1]
        if self.task is not None:
            self._report(
                {
                    "train/loss": loss,
                    "train/lr": last["lr"],
                    "train/grad_norm": last["grad_norm"],
                    "train/tokens_per_s": last["tok_per_s"],
                    "train/tokens": float(last["tokens"]),
                }
            )
            self._say(
                f"step {self.step:>6} | answer loss {loss:.4f} | lr {last['lr']:.2e} | "
                f"grad norm {last['grad_norm']:.3f} | {last['tok_per_s']:,.0f} tok/s"
            )
            return
        bpb = bits_per_byte(loss, self.tpb_train)
        self._report(
            {
                "train/loss": loss,
                "train/bpb": bpb,
                "train/lr": last["lr"],
                "train/grad_norm": last["grad_norm"],
                "train/tokens_per_s": last["tok_per_s"],
                "train/tokens": float(last["tokens"]),
            }
        )
        self._say(
            f"step {self.step:>6} | loss {loss:.4f} | {bpb:.3f} bits/byte | lr {last['lr']:.2e} | "
            f"grad norm {last['grad_norm']:.3f} | {last['tok_per_s']:,.0f} tok/s"
        )

    def _validate(self) -> None:
        row = self.evaluate()
        self._log(row)
        if self.task is not None:
            self._report({"eval/loss": row["val_loss"], "eval/accuracy": row["val_accuracy"]})
            self._say(
                f"step {self.step:>6} | validation answer loss {row['val_loss']:.4f} | accuracy "
                f"{row['val_accuracy']:.3f}"
            )
            if self.env.is_main:
                task_data.plot_task(self.run_dir, _read_metrics(self.run_dir))
            return
        self._report({"eval/loss": row["val_loss"], "eval/bpb": row["val_bpb"]})
        self._say(f"step {self.step:>6} | validation loss {row['val_loss']:.4f} | {row['val_bpb']:.3f} bits/byte")
        if self.env.is_main:  # a run killed at any point keeps a current plot
            plot_losses(self.run_dir, self.tpb_train, self.corpus.baseline())

    def _finish_task(self, loop_start: float, first_step: int, tokens: int, session: float, wall: float) -> dict:
        """The summary of a task run: ``val_accuracy`` where a corpus run has bits per byte."""
        step = self.step
        summary = {
            "run_dir": self.run_dir,
            "steps": step,
            "tokens": tokens,
            "wall_time_s": wall,
            "session_time_s": session,
            "stopped": self.stopped,
            "task": self.task.name,
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "val_accuracy": self.val_accuracy,
            "parameters": self.n_params,
        }
        if self.env.is_main:
            task_data.plot_task(self.run_dir, _read_metrics(self.run_dir))
            resumed = f"; this session {step - first_step} steps in {_fmt_time(session)}" if self.resume else ""
            stopped = (
                f" (stopped by --time-limit; --resume {self.run_dir} continues to step {self.cfg.steps})"
                if self.stopped
                else ""
            )
            self._say(
                f"done: {step} steps, {tokens:,} tokens in {_fmt_time(wall)}{resumed} "
                f"({(step - first_step) * self.tokens_per_step / max(time.time() - loop_start, 1e-9):,.0f} "
                f"tokens/s){stopped}"
            )
            self._say(
                f"validation: exact-match accuracy {self.val_accuracy:.3f}, answer loss {self.val_loss:.4f}"
                + (f"; train answer loss {self.train_loss:.4f}" if self.train_loss is not None else "")
            )
            self._say(f"run directory: {self.run_dir}")
        return summary

    def _finish(self, loop_start: float, first_step: int) -> dict:
        corpus, step, last_loss, last_val = self.corpus, self.step, self.train_loss, self.val_loss
        tokens = step * self.tokens_per_step
        session = time.time() - self.started
        wall = self.elapsed_before + session  # the whole run: the resumed checkpoint's time plus this process's
        if self.task is not None:
            return self._finish_task(loop_start, first_step, tokens, session, wall)
        summary = {
            "run_dir": self.run_dir,
            "steps": step,
            "tokens": tokens,
            "wall_time_s": wall,
            "session_time_s": session,
            "stopped": self.stopped,
            "train_loss": last_loss,
            "val_loss": last_val,
            "val_bpb": bits_per_byte(last_val, self.tpb_val),
            "train_bpb": bits_per_byte(last_loss, self.tpb_train) if last_loss is not None else None,
            "byte_entropy": corpus.byte_entropy,
            "parameters": self.n_params,
        }
        if self.env.is_main:
            say = self._say
            plot_losses(self.run_dir, self.tpb_train, corpus.baseline())
            resumed = f"; this session {step - first_step} steps in {_fmt_time(session)}" if self.resume else ""
            stopped = (
                f" (stopped by --time-limit; --resume {self.run_dir} continues to step {self.cfg.steps})"
                if self.stopped
                else ""
            )
            say(
                f"done: {step} steps, {tokens:,} tokens in {_fmt_time(wall)}{resumed} "
                f"({(step - first_step) * self.tokens_per_step / max(time.time() - loop_start, 1e-9):,.0f} "
                f"tokens/s){stopped}"
            )
            name, bits = corpus.baseline()
            say(
                f"validation: {bits_per_byte(last_val, self.tpb_val):.3f} bits/byte (loss {last_val:.4f}) vs {name} "
                f"{bits:.3f} bits/byte"
                + (f"; train {summary['train_bpb']:.3f} bits/byte" if last_loss is not None else "")
            )
            say(f"run directory: {self.run_dir}")
        return summary
