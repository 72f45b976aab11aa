"""Values wider than keys (``NeuralMemory(expand_v=e)``, Gated DeltaNet's layout: ``e = 2``) and the
``gated-deltanet`` preset's head layout (flash-linear-attention's and the paper's: heads of 256,
queries and keys 0.75 x hidden, values 1.5 x hidden)."""

from __future__ import annotations

import pytest
import torch

from deepmemory.layers import NeuralMemory
from deepmemory.models import build, preset_config

GDN = dict(
    architecture="linear",
    residual=False,
    loss="l2",
    optimizer="gd",
    window=1,
    chunk_size=1,
    decay_first=True,
    use_decay=True,
    decay_gate="mamba2",
)
CASES = [
    GDN,
    dict(architecture="linear", residual=False, loss="l2", optimizer="gd", window=1, chunk_size=4),
    dict(
        architecture="mlp", residual=False, loss="l2", optimizer="momentum", window=3, chunk_size=4, channel_lr_rank=3
    ),
    dict(architecture="linear", residual=False, loss="dot", optimizer="gd", window=4, chunk_size=5),
]


def _pair(kw, seed=0):
    torch.manual_seed(seed)
    fast = NeuralMemory(32, 2, 8, expand_v=2, step_bound=None, **kw).double()
    ref = NeuralMemory(32, 2, 8, expand_v=2, step_bound=None, impl="reference", **kw).double()
    ref.load_state_dict(fast.state_dict())
    with torch.no_grad():  # gates away from their init, so that every path is exercised
        wider = fast.lr_proj.weight * 10
        for m in (fast, ref):
            m.lr_proj.weight.copy_(wider)
    return fast, ref


@pytest.mark.parametrize("t", [1, 7, 63])
@pytest.mark.parametrize("kw", CASES)
def test_wide_values_fast_form_equals_reference(kw, t):
    fast, ref = _pair(kw)
    x = torch.randn(2, t, 32, dtype=torch.float64, requires_grad=True, generator=torch.Generator().manual_seed(t))
    a, b = fast(x), ref(x)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    ga = torch.autograd.grad((a * a.cos()).sum(), [x, *fast.parameters()])
    gb = torch.autograd.grad((b * b.cos()).sum(), [x, *ref.parameters()])
    for p, q in zip(ga, gb):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kw", CASES)
def test_wide_values_stream_and_have_their_shapes(kw):
    fast, _ = _pair(kw)
    assert fast.value_dim == 16 and fast.v_proj.weight.shape == (32, 32) and fast.q_proj.weight.shape == (16, 32)
    assert fast.o_proj.weight.shape == (32, 32) and fast.g_proj.weight.shape == (32, 32)
    assert fast.initial_weights[list(fast.initial_weights)[-1]].shape[-2] == 16  # the last matrix writes values
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    full = fast(x)
    outs, state = [], None
    for lo, hi in ((0, 5), (5, 6), (6, 21)):
        y, state = fast(x[:, lo:hi], state=state, return_state=True)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    q = torch.nn.functional.normalize(torch.randn(1, 3, 2, 8, dtype=torch.float64), dim=-1)
    assert fast.read(q).shape == (1, 3, 2, 16)


def test_wide_values_need_a_memory_without_residual():
    with pytest.raises(ValueError, match="expand_v=2 makes values wider than keys"):
        NeuralMemory(32, 2, 8, expand_v=2)  # the default mlp memory has the residual
    with pytest.raises(TypeError, match="expand_v"):
        NeuralMemory(32, 2, 8, expand_v="2")
    with pytest.raises(ValueError, match="expand_v"):
        NeuralMemory(32, 2, 8, expand_v=0)


@pytest.mark.parametrize(
    "size,heads,head_dim",
    [("tiny", 4, 12), ("170m", 2, 288), ("340m", 3, 256), ("760m", 4, 288), ("1.3b", 6, 256)],
)
def test_gated_deltanet_preset_has_the_papers_head_layout(size, heads, head_dim):
    """Queries and keys ``0.75 hidden`` wide, values twice that; heads of 256 where
    ``0.75 hidden / 256`` is whole (340m, 1.3b: flash-linear-attention's 1.3B layer), else the
    nearest whole number of heads."""
    config = preset_config("gated-deltanet", size)
    assert (config.num_attention_heads, config.head_dim, config.memory["expand_v"]) == (heads, head_dim, 2)
    assert heads * head_dim == 3 * config.hidden_size // 4
    # the old layout stays one override away (and every other preset keeps its values as wide as its keys)
    old = preset_config("gated-deltanet", size, memory={"expand_v": 1}, num_heads=4, head_dim=16)
    assert old.memory["expand_v"] == 1 and old.head_dim == 16
    assert preset_config("titans-lmm", size).memory.get("expand_v", 1) == 1


def test_gated_deltanet_tiny_model_runs():
    model = build("gated-deltanet", vocab_size=64)
    layer = model.model.layers[0].mixer
    assert layer.value_dim == 2 * layer.head_dim and layer.num_heads * layer.head_dim == 48
    ids = torch.randint(0, 64, (2, 19))
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
