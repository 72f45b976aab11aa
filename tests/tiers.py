"""Which parametrisations run in the fast loop (``pytest -m "not slow"``); CI runs them all."""

import pytest

from deepmemory.models import list_presets

# one preset per family; the ATLAS family's is OmegaNet: the Atlas presets orthogonalise a momentum
# per token (Muon at token granularity, docs/ops.md), some ten times the cost of the others at the
# tiny size, so atlas runs in the slow tier and the variants that repeat its memory only opt-in
FAMILIES = ["transformer", "gated-deltanet", "titans-mac", "omeganet", "deep-transformer"]
REPEATS_ATLAS = ("atlas-pp", "atlas-mag", "atlas-mal")  # atlas's Muon in another memory or block


def every_preset(also_long=()):
    """Every preset; the fast loop keeps one per family, the Atlas variants (and ``also_long``) are
    opt-in (``--runlong``), the others are marked slow."""
    opt_in = REPEATS_ATLAS + tuple(also_long)
    return [
        name if name in FAMILIES else pytest.param(name, marks=pytest.mark.long if name in opt_in else pytest.mark.slow)
        for name in list_presets()
    ]


def family_slow_rest_long():
    """Every preset for an expensive test: one per family in the slow tier (CI), the rest opt-in
    (``--runlong``)."""
    return [
        pytest.param(name, marks=pytest.mark.slow if name in FAMILIES else pytest.mark.long) for name in list_presets()
    ]
