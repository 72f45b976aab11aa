"""``deepmemory generate``: sample from a trained run (or an exported folder) with the recurrent cache."""

from __future__ import annotations

import argparse
import math
import sys

from . import CLIError, add_debug, add_version

HELP = "sample text from a trained run directory or an exported model"
MAX_SAMPLES = 1024  # one batch: more would exhaust memory before the first token


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help=HELP,
        description=(
            "Continue one or more prompts with a model written by `deepmemory train` (a run directory or one of its "
            "checkpoints/step-N) or `deepmemory export`. A single sequence streams to the terminal as it is generated."
        ),
    )
    add_version(p)
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="a run directory, one of its checkpoints/step-N, or a folder written by `deepmemory export`",
    )
    p.add_argument("--prompt", action="append", metavar="TEXT", help="text to continue; repeat for several prompts")
    p.add_argument(
        "--prompt-file",
        metavar="PATH",
        help="read prompts from PATH ('-': standard input), one per line "
        "(empty lines skipped; write \\n for a newline inside a prompt)",
    )
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per sample; default 200")
    p.add_argument(
        "--temperature", type=float, default=0.8, help="sampling temperature; 0: greedy decoding; default 0.8"
    )
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (0: all); default 50")
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="nucleus sampling: from the smallest set of tokens whose probability reaches p (1: off); default 1",
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="penalise tokens already in the text: positive logits divided by it, negative ones multiplied "
        "(> 1 discourages repeats; 1: off); default 1",
    )
    p.add_argument(
        "--num-samples",
        type=int,
        default=1,
        help=f"samples per prompt (drawn as one batch, at most {MAX_SAMPLES}); default 1",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling; default 0")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=2048,
        help="prompt tokens read per forward call through the cache (a long prompt in pieces: bounded memory, "
        "the same logits); default 2048",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op CPU threads (default: OMP_NUM_THREADS if set, "
        "else 1: decoding runs many small ops, and extra threads mostly wait on each other)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="cpu",
        help="where the model runs; default cpu (auto: CUDA when present)",
    )
    stream = p.add_mutually_exclusive_group()
    stream.add_argument(
        "--stream",
        dest="stream",
        action="store_true",
        default=None,
        help="print tokens as they are generated (the default for a single sequence)",
    )
    stream.add_argument("--no-stream", dest="stream", action="store_false", help="print each text when it is complete")
    add_debug(p)
    p.set_defaults(func=run)


def load_run(path: str):
    """``(model, tokenizer)`` from a run directory, one of its checkpoint directories or an exported folder."""
    from ..train.export import load_run as load

    try:
        model, tokenizer, _ = load(path)
    except ValueError as err:  # CheckpointError, ConfigError, DataError
        raise CLIError(f"--checkpoint {path}: {' '.join(str(err).split())}") from err
    return model, tokenizer


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            if args.prompt_file == "-":
                text = sys.stdin.read()
            else:
                with open(args.prompt_file, encoding="utf-8") as f:
                    text = f.read()
        except (OSError, UnicodeDecodeError) as err:
            raise CLIError(f"--prompt-file {args.prompt_file}: {err}") from err
        lines = [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
        if not lines:
            raise CLIError(f"--prompt-file {args.prompt_file} holds no prompt")
        prompts += lines
    if not prompts:
        raise CLIError("give a prompt: --prompt TEXT or --prompt-file PATH ('-' for standard input)")
    if any(not p for p in prompts):
        raise CLIError("--prompt must not be empty")
    return prompts


def _check(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}")
    if args.chunk_size < 1:
        raise CLIError(f"--chunk-size must be >= 1; got {args.chunk_size}")
    if not 0 <= args.temperature < math.inf:
        raise CLIError(f"--temperature must be a finite number >= 0; got {args.temperature}")
    if args.top_k < 0:
        raise CLIError(f"--top-k must be >= 0; got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise CLIError(f"--top-p must be in (0, 1]; got {args.top_p}")
    if not 0 < args.repetition_penalty < math.inf:
        raise CLIError(f"--repetition-penalty must be a finite number > 0; got {args.repetition_penalty}")
    if not 1 <= args.num_samples <= MAX_SAMPLES:
        raise CLIError(f"--num-samples must be in [1, {MAX_SAMPLES}]; got {args.num_samples}")
    if not 0 <= args.seed < 2**63:
        raise CLIError(f"--seed must be in [0, 2**63); got {args.seed}")
    check_threads(args.threads)
    if args.stream and args.num_samples > 1:
        raise CLIError("--stream shows one sequence at a time; it needs --num-samples 1")


def check_threads(threads) -> None:
    """``CLIError`` unless ``threads`` is ``None`` or in ``[1, MAX_THREADS]`` (a larger count
    overflows torch's thread pool)."""
    from ..checks import MAX_THREADS

    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise CLIError(f"--threads must be in [1, {MAX_THREADS}]; got {threads}")


def set_threads(threads) -> None:
    """``threads`` intra-op threads; by default ``OMP_NUM_THREADS`` if set, else 1. Raises
    ``CLIError`` for a count outside ``[1, MAX_THREADS]``."""
    from ..threads import set_threads as apply

    check_threads(threads)
    apply(threads)


def finite_scores():
    """A ``LogitsProcessorList`` whose processor raises ``CLIError`` when the next-token scores
    hold NaN or +inf, or a row is all -inf: the weights are damaged (a run never saves non-finite
    ones, but finite garbage can overflow), and sampling would fail inside ``generate``."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class FiniteScores(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if bool(torch.isnan(scores).any() or torch.isposinf(scores).any() or torch.isneginf(scores).all(-1).any()):
                raise CLIError(
                    f"the model's next-token scores are not finite after {input_ids.shape[1]} tokens: "
                    "its weights are damaged"
                )
            return scores

    return LogitsProcessorList([FiniteScores()])


def make_streamer(tokenizer, out=None):
    """A Hugging Face ``TextStreamer`` for our tokenizers (any object with ``decode(ids)``) that
    writes the new text to ``out`` (default ``sys.stdout``) as it comes, the prompt left out. Ids
    that end inside a UTF-8 character (decoded as U+FFFD for now) wait for the rest of it."""
    from transformers import TextStreamer

    class TokenStreamer(TextStreamer):
        def put(self, value):
            if len(value.shape) > 1:
                if value.shape[0] > 1:
                    raise ValueError("the streamer shows one sequence: generate with a batch of 1")
                value = value[0]
            self.token_cache.extend(value.tolist())
            # the whole text is decoded and the new part printed: a piece decoded alone can lose
            # the spacing at its start
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs).rstrip("\ufffd")
            if self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False
                self.print_len = len(text)
                if self.skip_prompt:
                    return
                self.print_len = 0
            printable = text[self.print_len :]
            self.print_len += len(printable)
            self.on_finalized_text(printable)

        def end(self):
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs) if self.token_cache else ""
            printable = text[self.print_len :]
            self.token_cache, self.print_len, self.next_tokens_are_prompt = [], 0, True
            self.on_finalized_text(printable, stream_end=True)

        def on_finalized_text(self, text: str, stream_end: bool = False):
            stream = out or sys.stdout
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    return TokenStreamer(tokenizer, skip_prompt=True)


def run(args: argparse.Namespace) -> int:
    """Generate as ``args`` say; ``CLIError`` (one line, exit code 2) for a user error."""
    _check(args)
    prompts = read_prompts(args)
    import torch

    set_threads(args.threads)
    device = (
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    if device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available (use --device cpu)")
    model, tokenizer = load_run(args.checkpoint)
    model.to(device)
    stream = args.stream if args.stream is not None else args.num_samples == 1
    sample = args.temperature > 0
    options = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=sample,
        use_cache=True,
        prefill_chunk_size=args.chunk_size,
        temperature=args.temperature if sample else None,
        top_k=(args.top_k or None) if sample else None,
        top_p=args.top_p if sample and args.top_p < 1 else None,
        repetition_penalty=args.repetition_penalty if args.repetition_penalty != 1 else None,
        num_return_sequences=args.num_samples,
        pad_token_id=tokenizer.eos_id,
        eos_token_id=tokenizer.eos_id,
        logits_processor=finite_scores(),
    )
    many = len(prompts) * args.num_samples > 1
    torch.manual_seed(args.seed)
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt)[None].to(device)
        if ids.shape[1] == 0:
            raise CLIError(f"prompt {i + 1} encodes to no tokens")
        if many:
            sys.stdout.write(
                ("\n" if i else "") + f"=== prompt {i + 1}" + (", sample 1" if args.num_samples > 1 else "") + " ===\n"
            )
        if stream:
            sys.stdout.write(prompt)
            sys.stdout.flush()
            with torch.no_grad():
                model.generate(ids, streamer=make_streamer(tokenizer), **options)
            continue
        with torch.no_grad():
            out = model.generate(ids, **options).cpu()
        prompt_text = tokenizer.decode(ids[0].cpu())
        for j in range(out.shape[0]):
            if j:
                sys.stdout.write(f"\n=== prompt {i + 1}, sample {j + 1} ===\n")
            # decode the whole sequence: a piece decoded alone can lose the spacing at its start
            full = tokenizer.decode(out[j])
            sys.stdout.write((prompt + full[len(prompt_text) :] if full.startswith(prompt_text) else full) + "\n")
    sys.stdout.flush()
    return 0
