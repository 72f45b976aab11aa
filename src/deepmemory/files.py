"""Atomic file writes, the one implementation every part of the package uses.

A file is written under a hidden temporary name beside its target (``.NAME.tmp``) and renamed over
it only once complete, so a reader (or a crash) sees the old file or the new one, never a part.
With ``durable`` (the default) the file and its folder are fsynced around the rename, as a run
directory's checkpoints need; the file gets the mode a plain ``open()`` gives (0644 under the
usual umask), whatever the writer created it with (safetensors creates 0600).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager


def fsync_path(path: str) -> None:
    """fsync a file or a folder by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plain_mode() -> int:
    """The mode a plain ``open()`` gives a new file under the process's umask (0644 usually)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _replace(tmp: str, path: str) -> None:
    """The rename that publishes a complete file (one place, where a test can stop a writer)."""
    os.replace(tmp, path)


@contextmanager
def atomic_path(path: str, durable: bool = True) -> Iterator[str]:
    """A temporary path beside ``path`` for a writer (``savefig``, ``save_file``, ``copyfile``...)
    to write the whole file to; when the block ends without an error the file replaces ``path``.
    On an error the temporary file is removed and ``path`` is left as it was."""
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp")
    try:
        yield tmp
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.chmod(tmp, plain_mode())
    if durable:
        fsync_path(tmp)
    _replace(tmp, path)
    if durable:
        fsync_path(os.path.dirname(os.path.abspath(path)))


def write_text_atomic(path: str, text: str, durable: bool = True) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path, durable) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json_atomic(path: str, obj, indent: int = 1, sort_keys: bool = False, default=None) -> None:
    """Write ``obj`` to ``path`` as strict JSON (``allow_nan=False``: a NaN or infinity raises
    ``ValueError`` before anything is written), atomically."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=False, default=default) + "\n"
    write_text_atomic(path, text)
