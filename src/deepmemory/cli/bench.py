"""``deepmemory bench {op,mixer,kernel,model,decode,write}``: benchmark tables (and plots) printed to the terminal.

Every mode's options are checked before anything is measured: each integer option is >= 1
(``--threads`` at most ``MAX_THREADS``), ``--device`` names an available device and ``--plot`` a
writable image file; a case that fails in its process ends the command with one line."""

from __future__ import annotations

import argparse

from . import CLIError, add_debug, add_version

HELP = "benchmarks: the op, token mixers, training steps, decoding, memory write strength"


def register(sub) -> None:
    from ..bench import kernel, mixer, model, op, write

    p = sub.add_parser("bench", help=HELP)
    add_version(p)
    modes = p.add_subparsers(dest="mode", metavar="MODE", required=True)
    op_p = modes.add_parser("op", help="neural_memory forward+backward: chunk vs reference")
    op.add_arguments(op_p)
    op_p.set_defaults(func=lambda a: _measured(op.run_cli, a))
    mx = modes.add_parser("mixer", help="one token mixer forward+backward against its peers (T = 1K..64K)")
    mixer.add_arguments(mx)
    mx.set_defaults(func=_mixer)
    kp = modes.add_parser("kernel", help="the Triton kernels' forward+backward against flash-linear-attention, SDPA")
    kernel.add_arguments(kp)
    kp.set_defaults(func=_kernel)
    for mode, decode, text in (
        ("model", False, "a preset's full training step"),
        ("decode", True, "per-token decoding latency and state size across contexts"),
    ):
        mp = modes.add_parser(mode, help=text)
        model.add_arguments(mp, mode)  # each mode lists the options it reads
        mp.set_defaults(func=lambda a, d=decode: _model(a, d))
    wp = modes.add_parser("write", help="each memory preset's write strength at init and with saturated gates")
    write.add_arguments(wp)
    wp.set_defaults(func=lambda a: _measured(write.run_cli, a))
    for mode_parser in (op_p, mx, kp, wp, *(modes.choices[m] for m in ("model", "decode"))):
        _counts_are_positive(mode_parser)
        add_debug(mode_parser)


def _counts_are_positive(parser: argparse.ArgumentParser) -> None:
    """Every integer option of ``parser`` (sizes, counts, repeats) must be >= 1 (``--threads`` at
    most ``MAX_THREADS``), refused by the parser itself with one line; the defaults are left as they are."""
    from ..checks import INT64_MAX, MAX_THREADS, int_argument

    for action in parser._actions:
        if getattr(action.type, "__name__", None) == "int" and action.option_strings:
            action.type = int_argument(1, MAX_THREADS if action.dest == "threads" else INT64_MAX)


def _check_device(device: str) -> None:
    """``--device`` is ``cpu`` or an available ``cuda`` device; ``CLIError`` otherwise."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise CLIError(f"--device must be cpu, cuda or cuda:N; got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise CLIError(f"--device must be cpu or cuda; got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: no CUDA device is available (use --device cpu)")


def _check_plot(path) -> None:
    """``--plot`` names an image file matplotlib writes (by its extension) in an existing, writable
    folder: checked before anything is measured, so that no result is lost at the end."""
    import os

    if path is None:
        return
    if not path:
        raise CLIError("--plot must name an image file such as tokens.png; got ''")
    from matplotlib.backend_bases import FigureCanvasBase

    ext = os.path.splitext(path)[1].lstrip(".").lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if ext not in formats:
        raise CLIError(
            f"--plot {path}: the extension must name an image format ({', '.join(sorted(formats))}); got {ext!r}"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CLIError(f"--plot {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise CLIError(f"--plot {path} is a folder; name an image file")
    if not os.access(folder, os.W_OK):
        raise CLIError(f"--plot {path}: the folder {folder} is not writable")


def _measured(run_cli, args: argparse.Namespace, *extra) -> int:
    """Check ``--device`` and ``--plot`` (where the mode has them), then ``run_cli(args, *extra)``;
    a case whose process failed ends the command with its one line."""
    from ..bench.measure import CaseError

    if getattr(args, "device", None) is not None:
        _check_device(args.device)
    _check_plot(getattr(args, "plot", None))
    try:
        run_cli(args, *extra)
    except CaseError as err:
        raise CLIError(err.line) from err
    return 0


def _mixer(args: argparse.Namespace) -> int:
    from ..bench import mixer

    return _measured(mixer.run_cli, args)


def _kernel(args: argparse.Namespace) -> int:
    from ..bench import kernel

    _check_device(args.device or kernel.default_device())
    return _measured(kernel.run_cli, args)


def _model(args: argparse.Namespace, decode: bool) -> int:
    from ..bench import model
    from ..models import list_presets, list_sizes

    for name in args.models or []:
        if name not in list_presets():
            raise CLIError(f"unknown model {name!r}; valid: {', '.join(list_presets())}")
    if args.size not in list_sizes():
        raise CLIError(f"unknown size {args.size!r}; valid: {', '.join(list_sizes())}")
    return _measured(model.run_cli, args, decode)
