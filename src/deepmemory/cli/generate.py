"""``deepmemory generate``: sample from a trained run with the recurrent cache."""

from __future__ import annotations

import argparse
import os
import sys

from . import CLIError


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="sample text from a trained run directory",
                              description="Continue a prompt with a model written by `deepmemory train`.")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a run directory, or one of its checkpoints/step-N")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy decoding")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def load_run(path: str):
    """``(model, tokenizer)`` from a run directory or one of its checkpoint directories."""
    from ..data import DataError, tokenizer_from_info
    from ..train import USER_ERRORS, model_from_config, read_run_config
    from ..train.checkpoint import MODEL, read_tensors

    path = os.path.normpath(path)
    run_dir = path
    if os.path.basename(os.path.dirname(path)) == "checkpoints":  # RUN/checkpoints/step-N
        run_dir = os.path.dirname(os.path.dirname(path))
    try:
        config = read_run_config(run_dir)
        weights = os.path.join(path, MODEL)
        if not os.path.isfile(weights):
            raise CLIError(f"--checkpoint {path} has no {MODEL} (has its training saved a checkpoint yet?)")
        model = model_from_config(config["model"]["config"])
        try:
            model.load_state_dict(read_tensors(weights), strict=True)
        except RuntimeError as err:
            raise CLIError(f"--checkpoint {path}: the weights do not fit the run's model: {str(err).splitlines()[0]}") from err
        tokenizer = tokenizer_from_info(config["tokenizer"], run_dir)
    except USER_ERRORS + (DataError,) as err:
        raise CLIError(f"--checkpoint {path}: {' '.join(str(err).split())}") from err
    return model.eval(), tokenizer


def run(args: argparse.Namespace) -> int:
    import torch

    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}")
    if args.temperature < 0:
        raise CLIError(f"--temperature must be >= 0; got {args.temperature}")
    if args.top_k < 0:
        raise CLIError(f"--top-k must be >= 0; got {args.top_k}")
    if not args.prompt:
        raise CLIError("--prompt must not be empty")
    model, tokenizer = load_run(args.checkpoint)
    ids = tokenizer.encode(args.prompt)[None]
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=args.max_new_tokens, do_sample=sample, use_cache=True,
            temperature=args.temperature if sample else None, top_k=(args.top_k or None) if sample else None,
            top_p=None, pad_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id,
        )
    # decode the whole sequence: a piece decoded alone can lose the spacing at its start
    full, prompt = tokenizer.decode(out[0]), tokenizer.decode(ids[0])
    sys.stdout.write((args.prompt + full[len(prompt):] if full.startswith(prompt) else full) + "\n")
    return 0
