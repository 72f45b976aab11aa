"""Argument checks shared by every layer of the library: one-line errors naming the argument."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Dict, Tuple


def _shown(value) -> str:
    """``type value`` for an error message, the value cut short."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def check_int(name: str, value, minimum: int = 1) -> None:
    """An int (not a bool) >= ``minimum``; ``TypeError`` / ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {_shown(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")


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


def check_settings(settings: Dict[str, Any], checks: Dict[str, Check], group: str, qualify: bool = True) -> None:
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

    FIELD_CHECKS: ClassVar[Dict[str, Check]] = {}

    def __post_init__(self) -> None:
        for name, check in self.FIELD_CHECKS.items():
            check(name, getattr(self, name))

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes: Any):
        """A copy with some fields changed (validated again)."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {unknown}; fields: {', '.join(self.field_names())}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a JSON-ready dict (``type(self)(**d)`` makes the object again)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_settings(cls, settings: Dict[str, Any]):
        """The object from a dict that may hold other settings too (those are ignored)."""
        names = cls.field_names()
        return cls(**{k: v for k, v in settings.items() if k in names})
