"""``deepmemory export RUN OUT``: a clean Hugging Face model folder with a model card."""

from __future__ import annotations

import argparse

from . import CLIError, add_debug, add_version

HELP = "write a run's model as a clean Hugging Face folder (with a model card), ready for push_to_hub"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help=HELP,
        description=(
            "Write the model of a run directory (its latest weights) or of one of its checkpoints/step-N to OUT: "
            "config.json, generation_config.json, model.safetensors, the tokenizer files of a Hugging Face tokenizer "
            "and README.md (preset, size, data, steps, validation bits/byte). Load it with "
            "AutoModelForCausalLM.from_pretrained(OUT) after `import deepmemory.models`."
        ),
    )
    add_version(p)
    p.add_argument("run", metavar="RUN", help="a run directory, or one of its checkpoints/step-N")
    p.add_argument("out", metavar="OUT", help="the folder to write (must not exist, or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder written by `deepmemory export`")
    add_debug(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.export import export_run

    try:
        export_run(args.run, args.out, overwrite=args.overwrite)
    except ValueError as err:  # CheckpointError and the other user errors are ValueErrors; OSErrors: main's line
        raise CLIError(" ".join(str(err).split())) from err
    print(f"exported {args.run} to {args.out}")
    return 0
