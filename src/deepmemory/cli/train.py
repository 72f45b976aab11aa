"""``deepmemory train``: train a preset on a text corpus (by default the Python standard library)."""

from __future__ import annotations

import argparse

from . import CLIError

S = argparse.SUPPRESS  # absent flags stay absent: the config file, the resumed run or the defaults decide


def register(subparsers) -> None:
    from ..train.config import TrainConfig as D

    p = subparsers.add_parser(
        "train", help="train a model; with no arguments, titans-mac (tiny) on the Python standard library",
        description="Train a model and write a run directory (config.json, metrics.jsonl, model.safetensors, "
                    "checkpoints/, loss.png). Under torchrun the global batch is split across processes.",
        argument_default=S,
    )
    p.add_argument("--config", help="a .yaml or .json file of the settings below (flags override it)")
    p.add_argument("--model", help="preset name (see `deepmemory models`); default titans-mac")
    p.add_argument("--size", help="preset size; default tiny")
    p.add_argument("--data", nargs="+", metavar="PATH", help="text files, folders, .jsonl files with a 'text' field, or "
                   "hf:NAME (needs `datasets`); default: the Python standard library source")
    p.add_argument("--tokenizer", help="'bytes' (default) or a Hugging Face tokenizer.json")
    p.add_argument("--val-fraction", type=float, help="share of documents held out for validation; default 0.02")
    p.add_argument("--seq-len", type=int, help=f"tokens per training sequence; default {D.seq_len}")
    p.add_argument("--batch-size", type=int, help=f"global batch: sequences per optimizer step, over all processes; default {D.batch_size}")
    p.add_argument("--grad-accum", type=int, help="micro-steps the global batch is split into")
    p.add_argument("--steps", type=int, help=f"optimizer steps (the total, also when resuming); default {D.steps}")
    p.add_argument("--lr", type=float, help=f"peak learning rate (AdamW, linear warmup, cosine); default {D.lr:g}")
    p.add_argument("--warmup-steps", type=int, help="default 10%% of the decay steps, at most 100")
    p.add_argument("--lr-decay-steps", type=int, help="length of the cosine; default --steps. Set it to the planned "
                   "total when a run is to be extended with --resume")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay of matrices; default 0.1")
    p.add_argument("--grad-clip", type=float, help="clip the global gradient norm (0: off); default 1.0")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto (CUDA when present)")
    p.add_argument("--threads", type=int, help="intra-op threads per process (default: OMP_NUM_THREADS if set, else 1 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute each block's activations in backward")
    p.add_argument("--fsdp", action="store_true", help="under torchrun, shard with FSDP2 (automatic for >= 300M parameters)")
    p.add_argument("--seed", type=int, help="seed of the model init and data order; default 0")
    p.add_argument("--out", help="run directory; default runs/MODEL-SIZE-DATE-TIME")
    p.add_argument("--resume", metavar="DIR", help="continue the run directory DIR from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory at --out")
    p.add_argument("--eval-every", type=int, help=f"validate and checkpoint every N steps (and at the end); default {D.eval_every}")
    p.add_argument("--eval-tokens", type=int, help=f"validation tokens per evaluation; default {D.eval_tokens}")
    p.add_argument("--keep-checkpoints", type=int, help="checkpoints kept (the newest); default 2")
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> dict:
    from ..train.config import load_config_file

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config", "resume", "overwrite")}
    file_settings = load_config_file(args.config) if getattr(args, "config", None) else {}
    return {**file_settings, **given}


def run(args: argparse.Namespace) -> int:
    from ..train import USER_ERRORS, train

    resume = getattr(args, "resume", None)
    if resume and getattr(args, "overwrite", False):
        raise CLIError("--resume and --overwrite exclude each other")
    try:
        train(settings_from_args(args), resume=resume, overwrite=getattr(args, "overwrite", False))
    except USER_ERRORS as err:
        raise CLIError(" ".join(str(err).split())) from err
    return 0
