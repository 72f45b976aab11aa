"""An lm-evaluation-harness model for deepmemory checkpoints: ``--model deepmemory``.

Importing this module registers :class:`DeepMemoryLM` under the name ``"deepmemory"`` in
``lm_eval``'s model registry (it needs the ``lm-eval`` package: ``pip install "deepmemory[eval]"``).
lm-eval finds models only among its own or those registered in the running process, so its own
``lm_eval`` command does not see this one; run the harness through this module instead, with the
arguments of ``lm_eval``::

    python -m deepmemory.eval.lm_eval --model deepmemory --model_args checkpoint=RUN --tasks lambada_openai
    python -m deepmemory.eval.lm_eval --model deepmemory --model_args checkpoint=RUN \
        --include_path examples/lm_eval --tasks deepmemory_python    # local data: runs offline

or from Python: ``import deepmemory.eval.lm_eval`` and then ``lm_eval.simple_evaluate(model="deepmemory",
model_args="checkpoint=RUN", ...)``.

The model reads every sequence left to right through its recurrent cache: prompts of any length
are read in chunks of ``chunk_size`` tokens, so ``loglikelihood_rolling`` scores a whole document
in one stream without windows. ``loglikelihood`` reads each distinct context once and continues a
copy of its cache for each continuation (the answer choices of a multiple-choice question); with
``batch_size`` above 1 the requests no longer than ``chunk_size`` tokens are scored instead in
right-padded batches of ``batch_size``, one forward pass each (padding enters no state,
docs/packing.md). ``generate_until`` decodes greedily until a stop string, the end-of-document
token or ``max_gen_toks``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import lm_eval.models  # noqa: F401 (the harness's own models, registered first: its registry fills itself only when empty)
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

DEFAULT_MAX_GEN_TOKS = 256
AUTO_BATCH_SIZE = 32  # what batch_size="auto" means
PROG = "python -m deepmemory.eval.lm_eval"
HARNESS_DEVICE = "cuda:0"  # the device lm_eval's command passes when its command line names none
# set by main(): whether the command line left --device to the harness (then HARNESS_DEVICE was not asked for)
_harness_chose_device = False
# what a failure to reach the Hugging Face Hub raises, by class name (datasets raises the builtin
# ConnectionError; requests, httpx and huggingface_hub their own)
HUB_ERRORS = frozenset(
    {"ConnectionError", "ConnectError", "ConnectTimeout", "OfflineModeIsEnabled", "LocalEntryNotFoundError"}
)


class DeepMemoryLMError(ValueError):
    """A bad ``--model_args`` setting or checkpoint of the ``deepmemory`` model (one line)."""


def _positive_int(name: str, value) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive integer; got {value!r}") from None
    if number < 1 or str(number) != str(value).strip():
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return number


def _device(device: str | None) -> torch.device:
    """The device of ``device`` (see :class:`DeepMemoryLM`): ``auto`` resolved, an unavailable CUDA
    device replaced by the CPU (with a warning unless the harness chose it by default)."""
    name = "cpu" if device is None else str(device).strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise DeepMemoryLMError(f"device must be cpu, cuda, cuda:N or auto; got {device!r} ({err})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        if not (_harness_chose_device and name == HARNESS_DEVICE):  # asked for: say so
            warnings.warn(f"device {device}: no CUDA device is available; running on the CPU", stacklevel=3)
        return torch.device("cpu")
    return dev


@register_model("deepmemory")
class DeepMemoryLM(TemplateLM):
    """A deepmemory checkpoint as an lm-evaluation-harness ``LM``.

    Args (``--model_args key=value,...``):
        checkpoint: a run directory of ``deepmemory train``, one of its ``checkpoints/step-N``, or
            a folder written by ``deepmemory export``.
        device: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"``, or ``"auto"`` (CUDA when present);
            a CUDA device on a machine without one means the CPU, with a warning when it was asked
            for. The harness passes its ``--device`` here; ``python -m deepmemory.eval.lm_eval``
            without ``--device`` gets ``"auto"``'s choice, silently (the harness's own default,
            ``cuda:0``, was not asked for). A ``device`` in ``--model_args`` wins over ``--device``.
        batch_size: requests ``loglikelihood`` scores per forward pass (positive int; default 1,
            one request at a time through the cache; ``"auto"`` means 32); lm-eval passes its
            ``--batch_size`` here.
        chunk_size: prompt tokens read per forward call (positive int; default 2048).
        max_gen_toks: the most tokens ``generate_until`` makes when a request does not say
            (positive int; default 256).

    Raises:
        DeepMemoryLMError: (a ``ValueError``, one line) an unreadable checkpoint, a bad
            ``batch_size``/``chunk_size``/``max_gen_toks``/``device``.
    """

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """The harness's constructor from ``--model_args``, where the settings of ``--model_args``
        win over the harness's own (``--device``, ``--batch_size``) instead of clashing with them."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        extra.pop("max_batch_size", None)  # (batch_size "auto" is a fixed batch here)
        return cls(**arg_dict, **extra)

    def __init__(
        self,
        checkpoint: str,
        device: str | None = None,
        batch_size=1,
        chunk_size=2048,
        max_gen_toks=DEFAULT_MAX_GEN_TOKS,
    ):
        super().__init__()
        from ..train.export import load_run

        try:
            # lm-eval's "auto" (and "auto:N") searches the largest batch that fits; here it is a fixed one
            auto = str(batch_size).strip().startswith("auto")
            self.batch_size = AUTO_BATCH_SIZE if auto else _positive_int("batch_size", batch_size)
            self.chunk_size = _positive_int("chunk_size", chunk_size)
            self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
            self._device = _device(device)
            model, tokenizer, _ = load_run(checkpoint)  # CheckpointError is a ValueError, one line
        except DeepMemoryLMError:
            raise
        except ValueError as err:
            raise DeepMemoryLMError(" ".join(str(err).split())) from err
        self.model = model.to(self._device).eval()
        self.dm_tokenizer = tokenizer

    # ------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        """The end-of-document id (the context of an empty prompt); 0 for a tokenizer without one."""
        eos = self.dm_tokenizer.eos_id
        return 0 if eos is None else eos

    @property
    def max_length(self) -> int:
        """No limit of the model's own: the cache reads any length (lm-eval asks for this number)."""
        return 2**31 - 1

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        info = self.dm_tokenizer.info()
        return str(info.get("kind"))

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """``string`` as token ids (the checkpoint's tokenizer adds no special tokens)."""
        return self.dm_tokenizer.encode(string).tolist()

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.dm_tokenizer.decode(list(tokens))

    # ------------------------------------------------------------ the model
    def _new_cache(self):
        from ..models import DeepMemoryCache

        return DeepMemoryCache(self.model.config)

    @torch.no_grad()
    def _read(self, tokens: Sequence[int], cache, all_logits: bool) -> torch.Tensor:
        """Read ``tokens`` through ``cache`` in chunks; the log-probabilities ``[n, V]`` after each
        token (``all_logits``) or ``[1, V]`` after the last one."""
        out = []
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self._device)
        for start in range(0, ids.shape[1], self.chunk_size):
            piece = ids[:, start : start + self.chunk_size]
            logits = self.model(
                input_ids=piece, cache=cache, use_cache=True, logits_to_keep=0 if all_logits else 1
            ).logits
            out.append(F.log_softmax(logits[0].float(), dim=-1))
        return torch.cat(out) if all_logits else out[-1]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), whether greedy decoding gives the continuation)`` for
        each ``((context, continuation), context_ids, continuation_ids)``. Requests sharing a
        context read it once; each continuation continues a copy of its cache."""
        from tqdm.auto import tqdm

        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="deepmemory loglikelihood")
        single = range(len(requests))
        if self.batch_size > 1:
            single = self._loglikelihood_batched(requests, results, bar)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in single:
            groups.setdefault(tuple(requests[i][1]), []).append(i)
        for context, members in groups.items():
            cache = self._new_cache()
            first = self._read(context, cache, all_logits=False)  # [1, V]: predicts the continuation's first token
            for i in members:
                (strings, _, continuation) = requests[i]
                continuation = list(continuation)
                if len(continuation) > 1:
                    rest = self._read(continuation[:-1], copy.deepcopy(cache), all_logits=True)
                    logprobs = torch.cat([first, rest])
                else:
                    logprobs = first[: len(continuation)]
                target = torch.tensor(continuation, dtype=torch.long, device=logprobs.device)
                total = float(logprobs.gather(1, target[:, None]).sum()) if continuation else 0.0
                greedy = bool((logprobs.argmax(-1) == target).all())
                results[i] = (total, greedy)
                self.cache_hook.add_partial("loglikelihood", strings, results[i])
                bar.update(1)
        bar.close()
        return results

    @torch.no_grad()
    def _loglikelihood_batched(self, requests, results, bar) -> list[int]:
        """Score the requests of at most ``chunk_size`` tokens (context and continuation) in
        right-padded batches of ``batch_size``, longest first, into ``results``; returns the
        indices of the others, for the cache."""
        short = [i for i, (_, ctx, cont) in enumerate(requests) if len(ctx) + len(cont) - 1 <= self.chunk_size and cont]
        short.sort(key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        for start in range(0, len(short), self.batch_size):
            members = short[start : start + self.batch_size]
            seqs = [(list(requests[i][1]) + list(requests[i][2]))[:-1] for i in members]
            width = max(len(q) for q in seqs)
            ids = torch.zeros(len(seqs), width, dtype=torch.long, device=self._device)
            mask = torch.zeros_like(ids)
            for row, q in enumerate(seqs):
                ids[row, : len(q)] = torch.tensor(q, dtype=torch.long)
                mask[row, : len(q)] = 1
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for row, i in enumerate(members):
                strings, context, continuation = requests[i]
                n = len(continuation)
                logprobs = F.log_softmax(logits[row, len(context) - 1 : len(context) - 1 + n].float(), dim=-1)
                target = torch.tensor(list(continuation), dtype=torch.long, device=logprobs.device)
                results[i] = (
                    float(logprobs.gather(1, target[:, None]).sum()),
                    bool((logprobs.argmax(-1) == target).all()),
                )
                self.cache_hook.add_partial("loglikelihood", strings, results[i])
                bar.update(1)
        chosen = set(short)
        return [i for i in range(len(requests)) if i not in chosen]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole string (``Instance.args == (string,)``), every token
        predicted once from everything before it, the first from the end-of-document token: one
        stream through the cache, no windows."""
        from tqdm.auto import tqdm

        out = []
        for (string,) in tqdm(
            [r.args for r in requests], disable=disable_tqdm, desc="deepmemory loglikelihood_rolling"
        ):
            tokens = self.tok_encode(string)
            if not tokens:
                out.append(0.0)
                continue
            logprobs = self._read([self.prefix_token_id] + tokens[:-1], self._new_cache(), all_logits=True)
            target = torch.tensor(tokens, dtype=torch.long, device=logprobs.device)
            total = float(logprobs.gather(1, target[:, None]).sum())
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations of ``(context, gen_kwargs)`` requests: until the first of the
        ``until`` strings (cut off), the end-of-document token, or ``max_gen_toks`` tokens.

        Raises:
            ValueError: ``gen_kwargs`` asks for sampling (``do_sample`` true, or a temperature
                above 0): the adapter decodes greedily.
        """
        from tqdm.auto import tqdm

        out = []
        for context, gen_kwargs in tqdm(
            [r.args for r in requests], disable=disable_tqdm, desc="deepmemory generate_until"
        ):
            kwargs = dict(gen_kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError("the deepmemory model decodes greedily: drop do_sample / temperature from gen_kwargs")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = _positive_int(
                "max_gen_toks", kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", self.max_gen_toks))
            )
            text = self._greedy(self.tok_encode(context) or [self.prefix_token_id], until, budget)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out

    def _greedy(self, prompt: list[int], until: list[str], budget: int) -> str:
        cache = self._new_cache()
        logprobs = self._read(prompt, cache, all_logits=False)
        tokens: list[int] = []
        eos = self.dm_tokenizer.eos_id
        for _ in range(budget):
            token = int(logprobs[-1].argmax())
            if eos is not None and token == eos:
                break
            tokens.append(token)
            text = self.tok_decode(tokens)
            cut = min((text.find(s) for s in until if s and s in text), default=-1)
            if cut >= 0:
                return text[:cut]
            logprobs = self._read([token], cache, all_logits=False)
        return self.tok_decode(tokens)


def _hub_failure(err: BaseException | None) -> BaseException | None:
    """The error in ``err``'s chain (``raise ... from``, or raised while handling) that says the
    Hugging Face Hub could not be reached, or ``None``."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if any(c.__name__ in HUB_ERRORS for c in type(err).__mro__):
            return err
        err = err.__cause__ or err.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m deepmemory.eval.lm_eval [lm_eval arguments] [--debug]``: the ``lm_eval`` command
    with the ``deepmemory`` model registered. Returns ``0``; ``2`` after a failure to reach the
    Hugging Face Hub (a task's data set, offline and not cached) or a bad ``deepmemory`` model
    argument, printed as one line (after the traceback with ``--debug``)."""
    import sys
    import traceback

    from lm_eval.__main__ import cli_evaluate

    global _harness_chose_device
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    _harness_chose_device = not any(a == "--device" or a.startswith("--device=") for a in args)
    sys.argv = [sys.argv[0]] + args
    try:
        cli_evaluate()
    except Exception as err:
        hub = _hub_failure(err)
        if hub is None and not isinstance(err, DeepMemoryLMError):
            raise
        if debug:
            traceback.print_exc()
        if hub is not None:
            line = (
                f"cannot reach the Hugging Face Hub for a task's data set ({' '.join(str(hub).split())}); offline, "
                "a task runs only from data in the cache or on disk, as the local example does: "
                "--include_path examples/lm_eval --tasks deepmemory_python (docs/evaluation.md)"
            )
        else:
            line = f"--model_args: {err}"
        print(f"{PROG}: error: {line}", file=sys.stderr)
        return 2
    return 0


__all__ = ["DeepMemoryLM", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
