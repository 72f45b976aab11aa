"""Which parametrisations run in the fast loop (``pytest -m "not slow"``); CI runs them all."""

import pytest

from deepmemory.models import list_presets

FAMILIES = ["transformer", "gated-deltanet", "titans-mac", "atlas", "deep-transformer"]  # one preset per family


def every_preset():
    """Every preset; the fast loop keeps one per family, the others are marked slow."""
    return [name if name in FAMILIES else pytest.param(name, marks=pytest.mark.slow) for name in list_presets()]


def family_slow_rest_long():
    """Every preset for an expensive test: one per family in the slow tier (CI), the rest opt-in
    (``--runlong``)."""
    return [pytest.param(name, marks=pytest.mark.slow if name in FAMILIES else pytest.mark.long) for name in list_presets()]
