"""Evaluation: ``deepmemory eval`` (generated tasks over context lengths and depths, streamed
through the recurrent cache) and the lm-evaluation-harness adapter (``deepmemory.eval.lm_eval``,
imported only when asked for). See docs/evaluation.md."""

from .decode import MAX_GROWING_CONTEXT, answer_batch, greedy_decode, growing_blocks, read_prompt
from .run import EvalError, Evaluation, parse_depths, parse_lengths

__all__ = [
    "EvalError",
    "Evaluation",
    "MAX_GROWING_CONTEXT",
    "answer_batch",
    "greedy_decode",
    "growing_blocks",
    "parse_depths",
    "parse_lengths",
    "read_prompt",
]
