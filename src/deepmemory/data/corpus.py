"""Text corpora as token streams with a deterministic train/validation split.

The default corpus is the Python standard library source of the running interpreter: every
machine with Python has it. Documents are split by a hash of their name (a relative path), so
the split does not depend on the file system's listing order; the share of validation *tokens* is
then kept between ``VAL_MIN_RATIO`` and ``VAL_MAX_RATIO`` times ``val_fraction`` (see
:func:`build_corpus`), so that a few large documents cannot make it lumpy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import DataError
from .tokenizers import ByteTokenizer, Tokenizer

Document = tuple[str, bytes]  # (name, UTF-8 text)

# test suites and anything not shipped as library source
STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib-dynload"}
HF_PREFIX = "hf:"
HF_MAX_BYTES = 256 * 2**20
# the validation split holds between these multiples of val_fraction of the tokens (build_corpus)
VAL_MIN_RATIO, VAL_MAX_RATIO = 0.5, 2.0


@dataclass
class Corpus:
    """Token streams ``train [N]`` and ``val [M]`` (int32) and what they were made from.

    ``train_starts`` and ``val_starts`` (int64, sorted, the first 0) are the
    offsets in each stream where a document begins (each document's tokens are followed by the
    tokenizer's end-of-document id, if it has one, before the next begins); ``None`` when unknown.
    When the split had to cut the stream (:func:`build_corpus`; ``split`` is then ``"stream"``,
    else ``"documents"``), the validation stream begins inside a document, and that piece counts
    as a document beginning at 0; ``val_docs`` is 0 and ``train_docs`` counts every document.

    ``token_entropy`` is the unigram entropy of the training tokens in bits per token, for a
    tokenizer other than bytes (``None`` for bytes, where ``byte_entropy`` is that baseline):
    :meth:`baseline` turns it into bits per byte.
    """

    train: Tensor
    val: Tensor
    train_bytes: int
    val_bytes: int
    train_docs: int
    val_docs: int
    byte_entropy: float  # unigram entropy of the training bytes, bits per byte
    source: str
    train_starts: Tensor | None = None
    val_starts: Tensor | None = None
    split: str = "documents"  # "documents": whole documents; "stream": the token stream cut at 1 - val_fraction
    token_entropy: float | None = None  # unigram entropy of the training tokens, bits per token (not bytes)

    def tokens_per_byte(self, split: str) -> float:
        tokens, nbytes = (
            (self.train.numel(), self.train_bytes) if split == "train" else (self.val.numel(), self.val_bytes)
        )
        return tokens / max(nbytes, 1)

    def baseline(self) -> tuple[str, float]:
        """``(name, bits per byte)`` of what a model that ignores context scores with this
        corpus's tokenizer: the unigram byte entropy for bytes; for another tokenizer the unigram
        token entropy times the training tokens per byte (the byte entropy is no baseline there: a
        token unigram model already beats it)."""
        if self.token_entropy is None:
            return "unigram byte entropy", self.byte_entropy
        return "unigram token entropy", self.token_entropy * self.tokens_per_byte("train")


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_documents() -> list[Document]:
    """Every ``.py`` file of the standard library, test suites and site-packages excluded."""
    root = stdlib_root()
    docs = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(files):
            # _sysconfigdata records how this interpreter was built, not library code
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                path = os.path.join(directory, name)
                with open(path, "rb") as f:
                    data = f.read()
                if data:
                    docs.append((os.path.relpath(path, root).replace(os.sep, "/"), data))
    if not docs:
        raise DataError(f"no Python sources found under the standard library {root}; pass --data")
    return docs


def _jsonl_documents(path: str, name: str, field: str = "text") -> list[Document]:
    """The ``field`` strings of a JSON Lines file, one document per line. Every line must be UTF-8
    (RFC 8259's encoding of JSON text; ``json.loads`` would guess UTF-16 or UTF-32 from bytes) and
    its text encodable as UTF-8 (no lone surrogate escapes such as ``\\ud800``); ``DataError``
    naming ``path:line`` otherwise."""
    docs = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise DataError(
                    f"--data: {path}:{lineno} is not UTF-8 text (byte {err.object[err.start]:#04x} at "
                    f"column {err.start + 1}); a .jsonl file must be UTF-8"
                ) from err
            except json.JSONDecodeError as err:
                raise DataError(f"--data: {path}:{lineno} is not valid JSON ({err.msg})") from err
            except RecursionError as err:
                raise DataError(f"--data: {path}:{lineno} nests JSON too deeply to read") from err
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"--data: {path}:{lineno} has no string field {field!r}")
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise DataError(
                    f"--data: {path}:{lineno}: its {field!r} holds the lone surrogate escape "
                    f"{text[err.start]!r}, which is no character and cannot be encoded as UTF-8"
                ) from err
            if data:
                docs.append((f"{name}:{lineno}", data))
    return docs


def _file_documents(path: str, name: str) -> list[Document]:
    if path.endswith(".jsonl"):
        return _jsonl_documents(path, name)
    with open(path, "rb") as f:
        data = f.read()
    if not data or b"\0" in data[:8192]:  # empty or binary
        return []
    return [(name, data)]


def local_documents(paths: Sequence[str]) -> list[Document]:
    """Text files, folders of them (recursively, hidden entries skipped) and ``.jsonl`` files
    with a ``"text"`` field."""
    docs: list[Document] = []
    for path in paths:
        if not os.path.exists(path):
            raise DataError(f"--data: {path} does not exist")
        if os.path.isfile(path):
            found = _file_documents(path, os.path.basename(path))
        else:
            found = []
            base = os.path.basename(os.path.normpath(path))
            seen = set()  # symbolic links to folders are followed, each real folder read once
            for directory, dirs, files in os.walk(path, followlinks=True):
                real = os.path.realpath(directory)
                if real in seen:
                    dirs[:] = []
                    continue
                seen.add(real)
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
                for fname in sorted(files):
                    if not fname.startswith("."):
                        full = os.path.join(directory, fname)
                        rel = os.path.relpath(full, path).replace(os.sep, "/")
                        found += _file_documents(full, f"{base}/{rel}")
        if not found:
            raise DataError(f"--data: {path} holds no text")
        docs += found
    return docs


def hf_documents(name: str, max_bytes: int = HF_MAX_BYTES) -> list[Document]:
    """The ``text`` field of a Hugging Face dataset's train split, streamed up to ``max_bytes``."""
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            f"--data {HF_PREFIX}{name} needs the `datasets` package (pip install datasets) and network access"
        ) from err
    try:
        stream = datasets.load_dataset(name, split="train", streaming=True)
        docs, total = [], 0
        for i, record in enumerate(stream):
            text = record.get("text")
            if not isinstance(text, str):
                raise DataError(f"--data {HF_PREFIX}{name}: records have no string field 'text'")
            data = text.encode("utf-8")
            docs.append((f"{name}:{i}", data))
            total += len(data)
            if total >= max_bytes:
                break
    except DataError:
        raise
    except Exception as err:  # network and hub errors come in many types
        raise DataError(
            f"--data {HF_PREFIX}{name}: cannot load the dataset ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    if not docs:
        raise DataError(f"--data {HF_PREFIX}{name}: the train split is empty")
    return docs


def _name_hash(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")


def is_validation(name: str, val_fraction: float) -> bool:
    """Deterministic split: the first 8 bytes of ``sha256(name)`` as a fraction of 2^64."""
    return _name_hash(name) < val_fraction * 2**64


def split_documents(names: Sequence[str], sizes: Sequence[int], val_fraction: float) -> list[bool] | None:
    """Which documents are validation, or ``None`` when no choice of whole documents works.

    First the hash split (:func:`is_validation`). When its share of the tokens (``sizes``) falls
    outside ``[VAL_MIN_RATIO, VAL_MAX_RATIO] * val_fraction``, or it leaves a side empty, the
    documents are taken instead in the order of their hashes (the hash split's order), each one
    that keeps the share at most the maximum, until the share reaches ``val_fraction``. ``None``
    when the share stays below the minimum or no document is left for training.
    """
    total = sum(sizes)
    low, high = VAL_MIN_RATIO * val_fraction * total, VAL_MAX_RATIO * val_fraction * total
    chosen = [is_validation(n, val_fraction) for n in names]
    share = sum(s for s, c in zip(sizes, chosen) if c)
    if low <= share <= high and 0 < sum(chosen) < len(names):
        return chosen
    chosen, share = [False] * len(names), 0
    for i in sorted(range(len(names)), key=lambda i: (_name_hash(names[i]), names[i])):
        if share >= val_fraction * total:
            break
        if share + sizes[i] <= high:
            chosen[i], share = True, share + sizes[i]
    if share < low or share == 0 or all(chosen):
        return None
    return chosen


def byte_entropy(counts: Tensor) -> float:
    """``H = -sum_b p_b log2 p_b`` of a histogram ``counts`` (of bytes, ``[256]``, or of token ids)."""
    p = counts.double() / counts.sum().clamp_min(1)
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def _encode(docs: list[Document], tokenizer: Tokenizer) -> Tensor:
    """Concatenate the documents' tokens, each followed by the end-of-document id if any."""
    pieces = _pieces(docs, tokenizer)
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int32)


def _pieces(docs: list[Document], tokenizer: Tokenizer) -> list[Tensor]:
    """Each document's tokens followed by the end-of-document id if any."""
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    if isinstance(tokenizer, ByteTokenizer):
        pieces = [tokenizer.encode(data).int() for _, data in docs]
    else:
        pieces = [
            torch.tensor(ids, dtype=torch.int32)
            for i in range(0, len(docs), 1024)
            for ids in tokenizer.encode_batch([d.decode("utf-8", errors="replace") for _, d in docs[i : i + 1024]])
        ]
    if eos:
        sep = torch.tensor(eos, dtype=torch.int32)
        pieces = [torch.cat([piece, sep]) for piece in pieces]
    return pieces


def document_starts(lengths: Sequence[int]) -> Tensor:
    """The offsets ``[D]`` (int64) where each of the documents of ``lengths`` (tokens, each >= 1)
    begins in their concatenation: ``0, l_1, l_1 + l_2, ...``."""
    sizes = torch.as_tensor(list(lengths), dtype=torch.int64)
    return sizes.cumsum(0) - sizes


def build_corpus(data: Sequence[str] | None, tokenizer: Tokenizer, val_fraction: float = 0.02) -> Corpus:
    """Load ``data`` (``None`` = the standard library; paths; or ``hf:NAME``), split, tokenize.

    Validation is whole documents (:func:`split_documents`): those with ``is_validation(name)``,
    unless their share of the tokens falls outside ``VAL_MIN_RATIO``..``VAL_MAX_RATIO`` times
    ``val_fraction`` (half to twice it) or leaves a side empty; then documents in hash order up to
    ``val_fraction`` of the tokens, none pushing the share past the maximum. When no set of whole
    documents fits (say, a single file, or a few large ones), the token stream is cut instead: the
    last ``val_fraction`` of it is validation.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1); got {val_fraction}")
    if data is None or len(data) == 0:
        docs, source = stdlib_documents(), f"python{sysconfig.get_python_version()} standard library"
    elif len(data) == 1 and data[0].startswith(HF_PREFIX) and not os.path.exists(data[0]):
        docs, source = hf_documents(data[0][len(HF_PREFIX) :]), data[0]
    else:
        docs, source = local_documents(data), ", ".join(data)
    pieces = _pieces(docs, tokenizer)
    chosen = split_documents([n for n, _ in docs], [p.numel() for p in pieces], val_fraction)
    if chosen is not None:
        val_docs = [d for d, c in zip(docs, chosen) if c]
        train_docs = [d for d, c in zip(docs, chosen) if not c]
        cat = lambda ps: torch.cat(ps) if ps else torch.empty(0, dtype=torch.int32)  # noqa: E731
        train = cat([p for p, c in zip(pieces, chosen) if not c])
        val = cat([p for p, c in zip(pieces, chosen) if c])
        train_starts = document_starts([p.numel() for p, c in zip(pieces, chosen) if not c])
        val_starts = document_starts([p.numel() for p, c in zip(pieces, chosen) if c])
        train_bytes, val_bytes = sum(len(d) for _, d in train_docs), sum(len(d) for _, d in val_docs)
        counts = sum(
            torch.bincount(torch.frombuffer(bytearray(d), dtype=torch.uint8).long(), minlength=256)
            for _, d in train_docs
        )
    else:
        stream = torch.cat(pieces)
        cut = int(stream.numel() * (1 - val_fraction))
        train, val = stream[:cut], stream[cut:]
        starts = document_starts([p.numel() for p in pieces])
        train_starts = starts[starts < cut]
        # the validation stream begins inside a document: that piece counts as one
        val_starts = torch.cat([starts.new_zeros(1), starts[starts > cut] - cut])
        total = sum(len(d) for _, d in docs)
        train_bytes = round(total * cut / max(stream.numel(), 1))
        val_bytes = total - train_bytes
        counts = sum(
            torch.bincount(torch.frombuffer(bytearray(d), dtype=torch.uint8).long(), minlength=256) for _, d in docs
        )
        train_docs, val_docs = docs, []
    token_entropy = (
        None
        if isinstance(tokenizer, ByteTokenizer)
        else byte_entropy(torch.bincount(train.long(), minlength=1) if train.numel() else torch.zeros(1))
    )
    return Corpus(
        train=train,
        val=val,
        train_bytes=train_bytes,
        val_bytes=val_bytes,
        train_docs=len(train_docs),
        val_docs=len(val_docs),
        byte_entropy=byte_entropy(counts),
        source=source,
        train_starts=train_starts,
        val_starts=val_starts,
        split="documents" if chosen is not None else "stream",
        token_entropy=token_entropy,
    )


def bits_per_byte(nats_per_token: float, tokens_per_byte: float) -> float:
    return nats_per_token / math.log(2) * tokens_per_byte
