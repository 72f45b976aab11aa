"""Inner-loop stability: the library's defaults stay finite with bounded memory state, on random
input and on real text, streamed in pieces (docs/numerics.md)."""

import sysconfig
from pathlib import Path

import pytest
import torch
from tiers import every_preset

from deepmemory.layers import NeuralMemory
from deepmemory.models import DeepMemoryConfig, DeepMemoryForCausalLM, build

HID, NH = 64, 4
BOUND = 1e3  # a memory matrix's Frobenius norm; the divergences this guards against reach 1e15 and NaN


def text_bytes(n: int) -> torch.Tensor:
    """``n`` bytes of the standard library's own source (real text every machine has)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for path in sorted(root.glob("*.py")):
        out += path.read_bytes()
        if len(out) >= n:
            break
    return torch.tensor(list(out[:n]), dtype=torch.long)


def layer_input(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    """``[1, n, HID]``: i.i.d. normal, or text bytes through a fixed random embedding."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(1, n, HID, generator=gen)
    table = torch.randn(256, HID, generator=gen)
    return table[text_bytes(n)][None]


def stream(layer: NeuralMemory, x: torch.Tensor, piece: int):
    """Feed ``x`` in pieces with the state carried; the largest |W| seen and whether all was finite."""
    state, finite, largest = None, True, 0.0
    with torch.no_grad():
        for i in range(0, x.shape[1], piece):
            y, state = layer(x[:, i : i + piece], state, return_state=True)
            finite = finite and bool(torch.isfinite(y).all())
            largest = max(
                [largest] + [float(w.norm(dim=(-2, -1)).max()) for w in state.recurrent_state.weights.values()]
            )
    return finite, largest


def test_default_layer_is_stable_and_the_undamped_one_is_not():
    """NeuralMemory's defaults (max_lr 1, momentum, chunk 16) stay bounded; with the raw momentum
    parametrisation and the papers' rule (no stale-step bound), the same layer on the same input
    diverges (the fault the damping removes); the stale-step bound alone also keeps it bounded."""
    x = layer_input("random", 1024)
    torch.manual_seed(0)
    finite, largest = stream(NeuralMemory(HID, NH, 16), x, 1024)
    assert finite and largest < BOUND, largest
    torch.manual_seed(0)
    finite, largest = stream(NeuralMemory(HID, NH, 16, damped_momentum=False, step_bound=None), x, 1024)
    assert not finite or largest > 1e6, largest
    torch.manual_seed(0)
    finite, largest = stream(NeuralMemory(HID, NH, 16, damped_momentum=False), x, 1024)
    assert finite and largest < BOUND, largest


@pytest.mark.parametrize("pattern", ["memory", "mac", "mag", "mal"])
def test_default_configs_give_finite_logits(pattern):
    torch.manual_seed(0)
    config = DeepMemoryConfig(
        vocab_size=256, hidden_size=HID, num_hidden_layers=2, num_attention_heads=NH, layer_pattern=pattern
    )
    with torch.no_grad():
        logits = DeepMemoryForCausalLM(config)(text_bytes(512)[None]).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", every_preset())
def test_every_preset_is_finite_on_real_text(name):
    torch.manual_seed(0)
    model = build(name, size="tiny", vocab_size=256).eval()
    with torch.no_grad():
        logits = model(text_bytes(1024)[None]).logits
    assert torch.isfinite(logits).all()


# one factor at a time around Titans' memory (head 16, depth 2, chunk 16, window 1, momentum), at
# the layer's defaults otherwise (max_lr 1, damped momentum, step_bound 1 for gd and momentum)
BASE = dict(head_dim=16, depth=2, chunk_size=16, window=1, optimizer="momentum")
SWEEP = [
    {},
    dict(head_dim=64),
    dict(depth=1),
    dict(depth=3),
    dict(chunk_size=1),
    dict(chunk_size=64),
    dict(chunk_size=128),
    dict(window=4),
    dict(window=16),
    dict(chunk_size=64, window=4),
    dict(optimizer="gd"),
    dict(optimizer="gd", chunk_size=64),
    dict(optimizer="muon"),
]


def _sweep_case(change, kind, tokens):
    settings = dict(BASE, **change)
    head_dim = settings.pop("head_dim")
    torch.manual_seed(0)
    layer = NeuralMemory(HID, NH, head_dim, **settings)
    finite, largest = stream(layer, layer_input(kind, tokens), 4096)
    assert finite and largest < BOUND, (change, kind, largest)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["random", "text"])
@pytest.mark.parametrize(
    "change",
    # chunk size 1 walks 8192 one-token chunks (13 s a case): the 64K sweep (--runlong) covers it
    [pytest.param(c, marks=pytest.mark.long) if c == dict(chunk_size=1) else c for c in SWEEP],
    ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()) or "base",
)
def test_default_settings_sweep_8k(change, kind):
    _sweep_case(change, kind, 8192)


@pytest.mark.long
@pytest.mark.parametrize("kind", ["random", "text"])
@pytest.mark.parametrize("change", SWEEP, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()) or "base")
def test_default_settings_sweep_64k(change, kind):
    _sweep_case(change, kind, 65536)


@pytest.mark.parametrize("change", [dict(window=4), dict(chunk_size=64, window=4)], ids=["window4", "chunk64-window4"])
def test_stale_step_bound_keeps_text_finite_where_the_papers_rule_diverges(change):
    """An Omega window of c sums c gradients per token, all taken at the chunk's start weights, so
    on text (runs of one byte give one key many times) a chunk's step is up to c x chunk_size
    gradients of one key: at max_lr 1 the papers' rule (step_bound=None) diverges within 1024
    tokens, and the layer's default bound keeps the same layer, on the same text, bounded."""
    x = layer_input("text", 1024)
    torch.manual_seed(0)
    settings = dict(dict(chunk_size=16), **change)
    finite, largest = stream(NeuralMemory(HID, NH, 16, step_bound=None, **settings), x, 1024)
    assert not finite or largest > 1e6, largest
    torch.manual_seed(0)
    finite, largest = stream(NeuralMemory(HID, NH, 16, **settings), x, 1024)
    assert finite and largest < BOUND, largest
