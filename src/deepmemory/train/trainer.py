"""The training loop behind ``deepmemory train`` and ``torchrun -m deepmemory.train``.

One optimizer step consumes a global batch of ``batch_size`` windows of ``seq_len + 1`` tokens:
``grad_accum`` micro-steps, each split evenly over the ranks. The loss is the mean next-token
cross entropy, so the step is the same computation for any (ranks, grad_accum) split.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data import DataError, WindowSampler, bits_per_byte, build_corpus, eval_windows, load_tokenizer, tokenizer_from_info
from . import checkpoint as ck
from .config import ConfigError, TrainConfig, new_config, resume_config
from .distributed import (Env, all_sum, barrier, blocks, broadcast_str, first_error, gather_model_state,
                          gather_optimizer_state, grad_norm_clip, load_optimizer_state, setup, teardown, unwrap, wrap)

FSDP_MIN_PARAMETERS = 300_000_000  # the 340m size and up: full replicas stop fitting comfortably


class TrainError(Exception):
    """A user error of a training run: one line, no traceback."""


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
    from ..models import build

    try:
        return build(cfg.model, size=cfg.size, **dict(cfg.model_overrides, vocab_size=vocab_size))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--model {cfg.model} --size {cfg.size}: {err}") from err


def model_from_config(config: Dict) -> nn.Module:
    """The model a run directory's ``config.json`` describes (random weights)."""
    from ..models import DeepMemoryConfig, DeepMemoryForCausalLM

    try:
        return DeepMemoryForCausalLM(DeepMemoryConfig.from_dict(dict(config)))
    except (ValueError, TypeError) as err:
        raise ck.CheckpointError(f"the stored model config cannot be built: {err}") from err


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices (dim >= 2) decay, gains and biases do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def autocast(env: Env, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and env.device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(env.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


def grad_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-step."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync") and not enabled:  # DDP
        return model.no_sync()
    return contextlib.nullcontext()


def next_token_loss(model: nn.Module, rows: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of ``rows[:, 1:]`` given ``rows[:, :-1]``; ``rows [B, L + 1]``."""
    logits = model(input_ids=rows[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten(), reduction=reduction)


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, micro: int, env: Env, precision: str) -> float:
    """Mean next-token loss (nats) over ``windows``, split over ranks, each rank taking the same
    number of forward calls (FSDP needs them in step)."""
    was_training = model.training
    model.eval()
    total = 0.0
    mine = windows[env.rank::env.world]
    for i in range(0, mine.shape[0], micro):
        with autocast(env, precision):
            total += float(next_token_loss(model, mine[i:i + micro].to(env.device), reduction="sum"))
    model.train(was_training)
    total, count = all_sum(env, [total, float(mine[:, 1:].numel())])
    return total / count


def _default_out(cfg: TrainConfig) -> str:
    base = os.path.join("runs", f"{cfg.model}-{cfg.size}-{time.strftime('%Y%m%d-%H%M%S')}")
    out, i = base, 1
    while os.path.exists(out):
        out, i = f"{base}-{i}", i + 1
    return out


def _create_run_dir(out: str, overwrite: bool, write: Callable[[str], None]) -> None:
    """Build the run directory beside ``out`` and rename it in; an existing ``out`` is only
    replaced with ``overwrite``, and only if it is a run directory or empty."""
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):  # an empty folder holds nothing to lose
        if not overwrite:
            raise TrainError(f"{out} already exists; pass --overwrite to replace it or --resume {out} to continue it")
        if not os.path.isdir(out) or (os.listdir(out) and not ck.is_run_dir(out)):
            raise TrainError(f"--overwrite refuses to replace {out}: it is not a deepmemory run directory")
    parent, name = os.path.split(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    write(tmp)
    ck.fsync_path(tmp)
    old = os.path.join(parent, f".{name}.old-{os.getpid()}")
    if os.path.exists(out):
        os.rename(out, old)
    os.rename(tmp, out)
    ck.fsync_path(parent)
    if os.path.exists(old):
        shutil.rmtree(old)


def _read_metrics(run_dir: str) -> List[Dict]:
    path = os.path.join(run_dir, ck.METRICS)
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut short by a crash
                break
    return rows


def plot_losses(run_dir: str, tokens_per_byte: float, byte_entropy: float) -> None:
    """``loss.png``: train and validation bits per byte against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_metrics(run_dir)
    train = [(r["step"], bits_per_byte(r["loss"], tokens_per_byte)) for r in rows if "loss" in r]
    val = [(r["step"], r["val_bpb"]) for r in rows if "val_bpb" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.8, label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.axhline(byte_entropy, color="gray", ls="--", lw=1, label=f"unigram byte entropy ({byte_entropy:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = os.path.join(run_dir, ".loss.png.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, os.path.join(run_dir, "loss.png"))


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


# ---------------------------------------------------------------- the run
def train(settings: Dict, resume: Optional[str] = None, overwrite: bool = False, quiet: bool = False) -> Dict:
    """Train from ``settings`` (``TrainConfig`` fields), or continue the run directory ``resume``.
    Returns the summary (on every rank)."""
    started = time.time()
    stored = ck.read_run_config(resume) if resume else None
    cfg = resume_config(stored["train"], settings, resume) if resume else new_config(settings)
    try:
        env = setup(cfg.device)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    elif env.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # the memory models run many small ops: extra intra-op threads mostly wait on each other,
        # and on a machine shared with other jobs every op then waits for a descheduled thread
        torch.set_num_threads(1)
    try:
        return _run(cfg, env, stored, resume, overwrite, started, quiet)
    finally:
        teardown(env)


def _run(cfg: TrainConfig, env: Env, stored: Optional[Dict], resume: Optional[str], overwrite: bool,
         started: float, quiet: bool) -> Dict:
    from tqdm.auto import tqdm

    say = (lambda *a: None) if quiet or not env.is_main else tqdm.write
    micro_global = cfg.batch_size // cfg.grad_accum
    if micro_global % env.world:
        raise ConfigError(f"--batch-size {cfg.batch_size} / --grad-accum {cfg.grad_accum} = {micro_global} sequences "
                          f"per micro-step does not split over {env.world} processes")
    micro = micro_global // env.world

    tokenizer = tokenizer_from_info(stored["tokenizer"], resume) if resume else load_tokenizer(cfg.tokenizer)
    torch.manual_seed(cfg.seed)
    model = model_from_config(stored["model"]["config"]) if resume else build_model(cfg, tokenizer.vocab_size)
    n_params = sum(p.numel() for p in model.parameters())
    use_fsdp = env.distributed and (cfg.fsdp or n_params >= FSDP_MIN_PARAMETERS)
    corpus = build_corpus(cfg.data, tokenizer, cfg.val_fraction)
    sampler = WindowSampler(corpus.train, cfg.seq_len, cfg.seed)
    val = eval_windows(corpus.val, cfg.seq_len, max(1, cfg.eval_tokens // cfg.seq_len))
    if val.shape[0] < env.world:
        raise DataError(f"the validation data holds {val.shape[0]} windows of --seq-len {cfg.seq_len}, fewer than {env.world} processes")
    val = val[: val.shape[0] // env.world * env.world]  # every rank evaluates as many windows
    tpb_val, tpb_train = corpus.tokens_per_byte("val"), corpus.tokens_per_byte("train")

    # ---- run directory (rank 0 writes; every rank learns the outcome)
    run_dir, error, ckpt = resume, None, None
    if env.is_main:
        try:
            if resume:
                ck.remove_partial(resume)
                ckpt = ck.latest_checkpoint(resume)
                if ckpt is None:
                    raise ck.CheckpointError(f"{resume} has no complete checkpoint to resume from")
            else:
                run_dir = cfg.out or _default_out(cfg)
                record = {"format": ck.FORMAT, "version": ck.VERSION, "train": dict(cfg.to_dict(), out=os.path.abspath(run_dir)),
                          "model": {"preset": cfg.model, "size": cfg.size, "parameters": n_params, "config": model.config.to_dict()},
                          "tokenizer": tokenizer.info(),
                          "data": {"source": corpus.source, "train_tokens": corpus.train.numel(), "val_tokens": corpus.val.numel(),
                                   "train_bytes": corpus.train_bytes, "val_bytes": corpus.val_bytes,
                                   "train_documents": corpus.train_docs, "val_documents": corpus.val_docs,
                                   "byte_entropy": corpus.byte_entropy}}

                def write(tmp: str) -> None:
                    ck.write_json(os.path.join(tmp, ck.CONFIG), record)
                    tokenizer.save(tmp)

                _create_run_dir(run_dir, overwrite, write)
        except USER_ERRORS + (OSError,) as err:
            error = str(err) if not isinstance(err, OSError) else f"{type(err).__name__}: {err}"
    error = first_error(env, error)
    if error:
        raise TrainError(error)
    run_dir = broadcast_str(env, run_dir)
    ckpt = broadcast_str(env, ckpt)

    # ---- state: fresh or from the checkpoint
    step, elapsed_before, state = 0, 0.0, None
    if resume:
        model_sd, optim_sd, rng, state = ck.load_checkpoint(ckpt)
        try:
            model.load_state_dict(model_sd, strict=True)
        except RuntimeError as err:
            raise ck.CheckpointError(f"{ckpt} does not fit the run's model: {str(err).splitlines()[0]}") from err
        sampler.load_state_dict(state["data"])
        step, elapsed_before = state["step"], state.get("elapsed", 0.0)
        if cfg.steps <= step:
            raise ConfigError(f"--resume {resume}: the run is at step {step} already; pass --steps greater than {step}")
    model.to(env.device)
    if cfg.grad_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        repeated = set(blocks(model))
        apply_activation_checkpointing(model, check_fn=lambda m: m in repeated)
    wrapped = wrap(model, env, use_fsdp)
    optimizer = make_optimizer(model, cfg)
    if resume:
        load_optimizer_state(model, optimizer, optim_sd)
        torch.set_rng_state(rng["torch"])
        if env.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])
    step_model = torch.compile(wrapped) if cfg.compile else wrapped
    eval_model = unwrap(wrapped)  # DDP's forward would sync buffers; the bare module does not

    if env.is_main:
        metrics = [r for r in _read_metrics(run_dir) if r.get("step", 0) <= step]
        ck.write_text(os.path.join(run_dir, ck.METRICS), "".join(json.dumps(r) + "\n" for r in metrics))
        if resume:
            ck.write_json(os.path.join(run_dir, ck.CONFIG), dict(stored, train=dict(cfg.to_dict(), out=os.path.abspath(run_dir))))
    barrier(env)
    metrics_file = open(os.path.join(run_dir, ck.METRICS), "a") if env.is_main else None

    def log(row: Dict) -> None:
        if metrics_file:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()

    say(f"data: {corpus.source}: {corpus.train_docs} train / {corpus.val_docs} validation documents, "
        f"{corpus.train.numel():,} / {corpus.val.numel():,} tokens; unigram byte entropy {corpus.byte_entropy:.3f} bits/byte")
    say(f"model: {cfg.model} ({cfg.size}), {n_params:,} parameters; {env.world} process(es) on {env.device.type}"
        + (", FSDP" if use_fsdp else ", DDP" if env.distributed else ""))
    say(f"run: {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens, lr {cfg.lr:g}, "
        f"{'resuming from ' + os.path.basename(ckpt) + ' in ' if resume else 'directory '}{run_dir}")

    last_val: Optional[float] = state.get("val_loss") if state else None
    last_loss: Optional[float] = state.get("train_loss") if state else None

    def validate() -> float:
        loss = evaluate(eval_model, val, micro, env, cfg.precision)
        log({"step": step, "val_loss": loss, "val_bpb": bits_per_byte(loss, tpb_val)})
        say(f"step {step:>6} | validation loss {loss:.4f} | {bits_per_byte(loss, tpb_val):.3f} bits/byte")
        return loss

    def save() -> None:
        model_state = gather_model_state(model)
        optim_state = gather_optimizer_state(model, optimizer)
        if env.is_main:
            rng = {"torch": torch.get_rng_state()}
            if env.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state()
            ck.save_checkpoint(run_dir, step, model_state, optim_state, rng,
                               {"data": sampler.state_dict(), "scheduler": {"step": step, "lr": lr_at(step, cfg)},
                                "train_loss": last_loss, "val_loss": last_val,
                                "elapsed": elapsed_before + time.time() - started}, cfg.keep_checkpoints)
        barrier(env)

    if step == 0:
        last_val = validate()
    bar = tqdm(total=cfg.steps, initial=step, disable=quiet or not env.is_main, unit="step", dynamic_ncols=True)
    loop_start, first_step, tokens_per_step = time.time(), step, cfg.batch_size * cfg.seq_len
    try:
        step_model.train()
        while step < cfg.steps:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = sampler.next_batch(cfg.batch_size)
            loss_sum = torch.zeros((), device=env.device)
            for m in range(cfg.grad_accum):
                start = m * micro_global + env.rank * micro
                rows = batch[start:start + micro].to(env.device)
                with grad_sync(wrapped, m == cfg.grad_accum - 1):
                    with autocast(env, cfg.precision):
                        loss = next_token_loss(step_model, rows)
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach()
            norm = grad_norm_clip(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_loss = all_sum(env, [float(loss_sum) / cfg.grad_accum])[0] / env.world
            if not math.isfinite(last_loss):
                raise TrainError(f"the training loss is {last_loss} at step {step} (run directory {run_dir}); "
                                 "try a lower --lr or check the model's settings")
            done = time.time() - loop_start
            tok_s = (step - first_step) * tokens_per_step / max(done, 1e-9)
            log({"step": step, "loss": last_loss, "lr": lr, "grad_norm": float(norm), "tokens": step * tokens_per_step,
                 "tok_per_s": tok_s})
            bar.set_postfix_str(f"loss {last_loss:.3f} | {tok_s:,.0f} tok/s", refresh=False)
            bar.update(1)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                last_val = validate()
                save()
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()

    wall = time.time() - started
    summary = {"run_dir": run_dir, "steps": step, "tokens": step * tokens_per_step, "wall_time_s": wall,
               "train_loss": last_loss, "val_loss": last_val, "val_bpb": bits_per_byte(last_val, tpb_val),
               "train_bpb": bits_per_byte(last_loss, tpb_train) if last_loss is not None else None,
               "byte_entropy": corpus.byte_entropy, "parameters": n_params}
    if env.is_main:
        plot_losses(run_dir, tpb_train, corpus.byte_entropy)
        say(f"done: {step} steps, {step * tokens_per_step:,} tokens in {_fmt_time(wall)} "
            f"({(step - first_step) * tokens_per_step / max(time.time() - loop_start, 1e-9):,.0f} tokens/s)")
        say(f"validation: {bits_per_byte(last_val, tpb_val):.3f} bits/byte (loss {last_val:.4f}) vs unigram byte entropy "
            f"{corpus.byte_entropy:.3f} bits/byte" + (f"; train {summary['train_bpb']:.3f} bits/byte" if last_loss is not None else ""))
        say(f"run directory: {run_dir}")
    return summary
