"""Tokenizers: raw bytes (the default) and Hugging Face ``tokenizer.json`` files."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence

import torch
from torch import Tensor

from ..files import atomic_path
from .errors import DataError

TOKENIZER_FILE = "tokenizer.json"


def _id_list(ids: Tensor | Sequence[int] | int) -> list:
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

    def encode(self, text: str | bytes) -> Tensor:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        if not data:
            return torch.empty(0, dtype=torch.long)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

    def decode(self, ids: Tensor | Sequence[int] | int) -> str:
        ids = _id_list(ids)
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def info(self) -> dict:
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
        self.eos_id: int | None = next((vocab[t] for t in self.EOS_CANDIDATES if t in vocab), None)

    def encode(self, text: str | bytes) -> Tensor:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return torch.tensor(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=torch.long)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Tensor | Sequence[int] | int) -> str:
        ids = _id_list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def info(self) -> dict:
        """What a run records of the tokenizer: its kind, size, end-of-document id, file name and
        the file's fingerprint (``sha256``), which :func:`tokenizer_from_info` checks."""
        return {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "file": TOKENIZER_FILE,
            "sha256": file_sha256(self.path),
        }

    def save(self, directory: str) -> None:
        """Copy the ``tokenizer.json`` into ``directory``, atomically: into a hidden file beside
        it, then renamed over it (a crash leaves the old file or the new one)."""
        path = os.path.join(directory, TOKENIZER_FILE)
        if os.path.abspath(path) == os.path.abspath(self.path):
            return
        with atomic_path(path, durable=False) as tmp:
            shutil.copyfile(self.path, tmp)


Tokenizer = ByteTokenizer | HFTokenizer


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's bytes, as 64 hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_tokenizer(spec: str) -> Tokenizer:
    """``"bytes"`` or the path of a ``tokenizer.json`` (or of a folder holding one)."""
    if not isinstance(spec, str) or not spec:
        raise DataError(f"--tokenizer must be 'bytes' or a tokenizer.json path; got {spec!r}")
    return ByteTokenizer() if spec == "bytes" else HFTokenizer(spec)


def tokenizer_from_info(info: dict, directory: str) -> Tokenizer:
    """Rebuild the tokenizer recorded by ``info()`` in a run directory.

    Raises:
        DataError: (one line) an unknown record; a recorded file name that is not a plain name in
            ``directory``; a tokenizer file whose SHA-256 differs from the recorded one (the file
            was replaced after training: ids would mean other text); a file that cannot be read.
    """
    kind = info.get("kind") if isinstance(info, dict) else None
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "hf":
        name = info.get("file", TOKENIZER_FILE)
        if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
            raise DataError(
                f"the tokenizer record in {directory} names the file {name!r}; expected a file name in the run "
                "directory"
            )
        tokenizer = HFTokenizer(os.path.join(directory, name))
        recorded = info.get("sha256")
        if recorded is not None and recorded != file_sha256(tokenizer.path):
            raise DataError(
                f"{tokenizer.path} is not the tokenizer the run was trained with (its sha256 "
                f"{file_sha256(tokenizer.path)[:12]}... differs from the recorded {str(recorded)[:12]}...); "
                "restore the original file"
            )
        return tokenizer
    shown = repr(info)
    raise DataError(f"unknown tokenizer record {shown if len(shown) <= 80 else shown[:77] + '...'} in {directory}")
