"""Corpora, tokenizers and the training-window sampler."""

from .corpus import Corpus, bits_per_byte, build_corpus, byte_entropy, is_validation, stdlib_documents
from .errors import DataError
from .loader import WindowSampler, eval_window_starts, eval_windows, packed_labels, packed_position_ids, window_starts
from .tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer, tokenizer_from_info

__all__ = [
    "ByteTokenizer",
    "Corpus",
    "DataError",
    "HFTokenizer",
    "WindowSampler",
    "bits_per_byte",
    "build_corpus",
    "byte_entropy",
    "eval_window_starts",
    "eval_windows",
    "is_validation",
    "load_tokenizer",
    "packed_labels",
    "packed_position_ids",
    "stdlib_documents",
    "tokenizer_from_info",
    "window_starts",
]
