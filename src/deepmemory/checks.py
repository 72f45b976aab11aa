"""Argument checks shared by every layer of the library: one-line errors naming the argument."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

INT64_MAX = 2**63 - 1  # the largest count, size or seed a tensor (and torch's generators) can hold
MAX_THREADS = 1024  # the most intra-op threads a command accepts (torch's own limit overflows far above)


def os_error_line(err: OSError) -> str:
    """One line for an ``OSError`` of a file operation: ``PATH: reason`` (``PATH -> PATH2: reason``
    for a rename), e.g. ``/data/run/metrics.jsonl: Read-only file system``; the bare message when
    no path is attached. Never raises."""
    reason = err.strerror or " ".join(str(err).split()) or type(err).__name__
    paths = [p if isinstance(p, str) else repr(p) for p in (err.filename, err.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is the process running out of memory: ``MemoryError`` (Python),
    ``torch.OutOfMemoryError`` (an accelerator; recognised by name, without importing torch) or the
    ``RuntimeError`` of torch's CPU allocator (``DefaultCPUAllocator: can't allocate memory``)."""
    if isinstance(err, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(err).__mro__):
        return True
    return isinstance(err, RuntimeError) and "DefaultCPUAllocator" in str(err)


def _shown(value) -> str:
    """``type value`` for an error message, the value cut short."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def check_int(name: str, value, minimum: int = 1, maximum: int = INT64_MAX) -> None:
    """An int (not a bool) in ``[minimum, maximum]`` (by default up to ``INT64_MAX``: a larger one
    overflows the tensor or the generator it goes into); ``TypeError`` / ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {_shown(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be <= {maximum}; got {_shown(value).split(' ', 1)[1]}")


def int_argument(minimum: int = 1, maximum: int = INT64_MAX) -> Callable[[str], int]:
    """An ``argparse`` ``type=``: the option's text as an int in ``[minimum, maximum]``, else
    ``argparse.ArgumentTypeError`` with a one-line reason (which the parser reports as
    ``argument --seq: must be >= 1; got 0``, exit code 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
        if not minimum <= value <= maximum:
            shown = text if len(text) <= 30 else text[:27] + "..."
            bound = f">= {minimum}" if value < minimum else f"<= {maximum}"
            raise argparse.ArgumentTypeError(f"must be {bound}; got {shown}")
        return value

    parse.__name__ = "int"  # argparse names the type in its own messages
    return parse


def _int_option(text: str) -> int:
    """An option's int, within the int64 range (a larger one overflows the tensor or generator it goes into)."""
    value = int(text)
    if not -(2**63) <= value < 2**63:
        raise argparse.ArgumentTypeError(
            f"expected an integer below 2**63; got {text[:30]}{'...' if len(text) > 30 else ''}"
        )
    return value


def _float_option(text: str) -> float:
    """An option's float, finite (NaN would pass every later ``value < low`` check)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number; got {text!r}")
    return value


_int_option.__name__, _float_option.__name__ = "int", "float"  # argparse names the type in "invalid int value: ..."


class OneLineParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with a one-line error, ``PROG: error: ... (see PROG --help)``,
    exit code 2, instead of the usage block first. Options of ``type=int`` are kept within the
    int64 range and options of ``type=float`` must be finite (each command checks its own ranges
    after that). The parser of ``deepmemory`` and of every subcommand, and of ``python -m deepmemory.train``."""

    def add_argument(self, *args, **kwargs):
        kind = kwargs.get("type")
        if kind is int or kind is float:
            kwargs["type"] = _int_option if kind is int else _float_option
        return super().add_argument(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def check_choice(name: str, value, options) -> None:
    """One of ``options``; ``ValueError`` listing them."""
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")


def check_bool(name: str, value) -> None:
    """A bool; ``TypeError`` naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {_shown(value)}")


def check_positive(name: str, value) -> None:
    """A finite number > 0 (NaN and inf refused); ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive number (finite); got {value!r}")


# one check per setting: ``check(label, value)`` raises a one-line error naming ``label``
Check = Callable[[str, Any], None]


# settings renamed without an alias (CHANGELOG.md): an old name gets a hint, not just "unknown"
RENAMED = {"memory": "architecture", "params": "weights", "memory_init": "initial_weights"}


def check_settings(settings: dict[str, Any], checks: dict[str, Check], group: str, qualify: bool = True) -> None:
    """Every key of ``settings`` is known to ``checks`` and its value passes. Errors name an
    unknown key as one of ``group settings`` and a bad value as ``group['key']`` (``key`` alone
    when not ``qualify``)."""
    if not isinstance(settings, dict):
        raise TypeError(f"{group} must be a dict of settings; got {type(settings).__name__}")
    for key, value in settings.items():
        if key in RENAMED and key not in checks:
            raise ValueError(f"{group} setting {key!r} was renamed {RENAMED[key]!r} (CHANGELOG.md)")
        check_choice(f"{group} settings", key, tuple(checks))
        checks[key](f"{group}[{key!r}]" if qualify else key, value)


class Settings:
    """Base of the frozen settings dataclasses (the rule objects): each field is checked by
    ``FIELD_CHECKS[name]`` when the object is made, with a one-line error naming it."""

    FIELD_CHECKS: ClassVar[dict[str, Check]] = {}

    def __post_init__(self) -> None:
        for name, check in self.FIELD_CHECKS.items():
            check(name, getattr(self, name))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]  # (subclasses are dataclasses)

    def replace(self, **changes: Any):
        """A copy with some fields changed (validated again)."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {unknown}; fields: {', '.join(self.field_names())}")
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]  # (subclasses are dataclasses)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``type(self)(**d)`` makes the object again)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]  # (every subclass is a dataclass)

    @classmethod
    def from_settings(cls, settings: dict[str, Any]):
        """The object from a dict that may hold other settings too (those are ignored)."""
        names = cls.field_names()
        return cls(**{k: v for k, v in settings.items() if k in names})
