"""Tokenizers: raw bytes (the default) and Hugging Face ``tokenizer.json`` files."""

from __future__ import annotations

import os
import shutil
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from .errors import DataError

TOKENIZER_FILE = "tokenizer.json"



def _id_list(ids: Union[Tensor, Sequence[int], int]) -> list:
    """Token ids as a list: a tensor (any shape with one row of ids), a sequence, or one id (what
    Hugging Face's ``TextStreamer`` passes for a single token)."""
    if isinstance(ids, Tensor):
        ids = ids.tolist()
    return [ids] if isinstance(ids, int) else list(ids)

class ByteTokenizer:
    """UTF-8 bytes ``0..255`` plus one end-of-document id ``256`` (vocabulary 257)."""

    kind = "bytes"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: Union[str, bytes]) -> Tensor:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        if not data:
            return torch.empty(0, dtype=torch.long)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

    def decode(self, ids: Union[Tensor, Sequence[int], int]) -> str:
        ids = _id_list(ids)
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def info(self) -> Dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id}

    def save(self, directory: str) -> None:
        """Nothing to write: ``info()`` in the run's config rebuilds it."""


class HFTokenizer:
    """A Hugging Face ``tokenizers`` model loaded from a ``tokenizer.json`` file."""

    kind = "hf"
    EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise DataError("--tokenizer needs the `tokenizers` package (pip install tokenizers)") from err
        if os.path.isdir(path):
            path = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise DataError(f"--tokenizer: {path} does not exist (expected 'bytes' or a tokenizer.json file)")
        try:
            self.tokenizer = Tokenizer.from_file(path)
        except Exception as err:  # the Rust library raises plain Exceptions
            raise DataError(f"--tokenizer: cannot read {path}: {str(err).splitlines()[0]}") from err
        self.path = path
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.eos_id: Optional[int] = next((vocab[t] for t in self.EOS_CANDIDATES if t in vocab), None)

    def encode(self, text: Union[str, bytes]) -> Tensor:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return torch.tensor(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=torch.long)

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Union[Tensor, Sequence[int], int]) -> str:
        ids = _id_list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def info(self) -> Dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "file": TOKENIZER_FILE}

    def save(self, directory: str) -> None:
        shutil.copyfile(self.path, os.path.join(directory, TOKENIZER_FILE))


Tokenizer = Union[ByteTokenizer, HFTokenizer]


def load_tokenizer(spec: str) -> Tokenizer:
    """``"bytes"`` or the path of a ``tokenizer.json`` (or of a folder holding one)."""
    if not isinstance(spec, str) or not spec:
        raise DataError(f"--tokenizer must be 'bytes' or a tokenizer.json path; got {spec!r}")
    return ByteTokenizer() if spec == "bytes" else HFTokenizer(spec)


def tokenizer_from_info(info: Dict, directory: str) -> Tokenizer:
    """Rebuild the tokenizer recorded by ``info()`` in a run directory."""
    kind = info.get("kind") if isinstance(info, dict) else None
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "hf":
        return HFTokenizer(os.path.join(directory, info.get("file", TOKENIZER_FILE)))
    raise DataError(f"unknown tokenizer record {info!r} in {directory}")
