"""``deepmemory bench {op,mixer,kernel,model,decode}``: benchmark tables (and plots) printed to the terminal."""

from __future__ import annotations

import argparse

from . import CLIError, add_version

HELP = "benchmarks: the op, token mixers, training steps, decoding"


def register(sub) -> None:
    from ..bench import kernel, mixer, model, op

    p = sub.add_parser("bench", help=HELP)
    add_version(p)
    modes = p.add_subparsers(dest="mode", metavar="MODE", required=True)
    op_p = modes.add_parser("op", help="neural_memory forward+backward: chunk vs reference")
    op.add_arguments(op_p)
    op_p.set_defaults(func=lambda a: op.run_cli(a))
    mx = modes.add_parser("mixer", help="one token mixer forward+backward against its peers (T = 1K..64K)")
    mixer.add_arguments(mx)
    mx.set_defaults(func=_mixer)
    kp = modes.add_parser("kernel", help="the Triton kernels' forward+backward against flash-linear-attention, SDPA")
    kernel.add_arguments(kp)
    kp.set_defaults(func=_kernel)
    for mode, decode, text in (("model", False, "a preset's full training step"),
                               ("decode", True, "per-token decoding latency and state size across contexts")):
        mp = modes.add_parser(mode, help=text)
        model.add_arguments(mp)
        mp.set_defaults(func=lambda a, d=decode: _model(a, d))


def _check_positive(name: str, values) -> None:
    for v in values if isinstance(values, list) else [values]:
        if v < 1:
            raise CLIError(f"--{name} must be >= 1; got {v}")


def _mixer(args: argparse.Namespace) -> int:
    from ..bench import mixer

    _check_positive("seq", args.seq)
    _check_positive("chunk", args.chunk)
    _check_positive("repeat", args.repeat)
    _check_positive("rounds", args.rounds)
    mixer.run_cli(args)
    return 0


def _kernel(args: argparse.Namespace) -> int:
    import torch

    from ..bench import kernel

    for name in ("seq", "batch", "heads", "head_dim", "threads", "repeat"):
        _check_positive(name.replace("_", "-"), getattr(args, name))
    device = args.device or kernel.default_device()
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise CLIError(f"bad --device {device!r}: {err}") from None
    if dev.type not in ("cpu", "cuda"):
        raise CLIError(f"--device must be cpu or cuda; got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available (use --device cpu)")
    kernel.run_cli(args)
    return 0


def _model(args: argparse.Namespace, decode: bool) -> int:
    from ..bench import model
    from ..models import list_presets, list_sizes

    for name in args.models or []:
        if name not in list_presets():
            raise CLIError(f"unknown model {name!r}; valid: {', '.join(list_presets())}")
    if args.size not in list_sizes():
        raise CLIError(f"unknown size {args.size!r}; valid: {', '.join(list_sizes())}")
    _check_positive("context", args.context)
    _check_positive("seq", args.seq)
    model.run_cli(args, decode)
    return 0
