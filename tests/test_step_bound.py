"""The stale-step bound (``UpdateRule.step_bound``): inside a chunk every gradient is taken at the
chunk's start weights, and row ``t``'s learning rates are scaled by ``min(1, tau / F_t)``, ``F_t``
the largest Frobenius norm of ``H_t = sum_i C(t, i) a_i a_i^T`` over the memory's matrices
(``a_i``: a matrix's input for token ``i``; ``C(t, i)``: the weight of token ``i``'s gradient in
row ``t``'s state).

The chunk form against the token loop (float64, every memory, loss, optimizer but Muon and
granularity, forward and backward, odd lengths, chunk sizes, streaming), against loops written here
from the definition for the linear memory, causality for bad values, and the settings' errors (the
Triton kernels for the linear memory: tests/test_triton.py)."""

from __future__ import annotations

import itertools

import pytest
import torch
from ops_cases import make_inputs, make_params, rel_err, streamed
from test_causality import _check_op
from test_ops import DK, DV, HIDDEN, _compare, _run

from deepmemory.layers import NeuralMemory
from deepmemory.models import DeepMemoryConfig, build
from deepmemory.ops import ARCHITECTURES, UpdateRule, neural_memory

BOUND = 0.3  # small enough that the bound acts on many rows of these inputs (checked below)
MATRIX = list(itertools.product(ARCHITECTURES, ("l2", "dot"), ("gd", "momentum"), ("token", "chunk"), (1, 3)))


def _outputs(kw, bound, seq=13, seed=0, impl="chunk"):
    inputs = make_inputs(2, seq, 2, DK, DV, optimizer=kw["optimizer"], seed=seed)
    params = make_params(kw["architecture"], 2, DK, DV, HIDDEN, gen=torch.Generator().manual_seed(seed + 1))
    return _run(impl, inputs, params, step_bound=bound, **kw)[0]


@pytest.mark.parametrize("architecture,loss,optimizer,granularity,window", MATRIX)
def test_chunk_matches_reference(architecture, loss, optimizer, granularity, window):
    kw = dict(
        architecture=architecture, loss=loss, optimizer=optimizer, granularity=granularity, window=window, chunk_size=4
    )
    _compare(dict(kw, step_bound=BOUND), per_sequence=window == 3, all_grads_live=True)
    # the bound acts here (else this would test the unbounded rule again)
    assert rel_err(_outputs(kw, BOUND), _outputs(kw, None)) > 1e-3


@pytest.mark.parametrize("seq", [1, 7, 63, 100, 257])
@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
def test_lengths_and_chunk_sizes(seq, chunk_size):
    kw = dict(architecture="mlp", optimizer="momentum", window=3, chunk_size=chunk_size, step_bound=BOUND)
    _compare(kw, bsz=1, seq=seq, grad=seq <= 100, seed=seq)


@pytest.mark.parametrize(
    "kw",
    [
        dict(layer_norm=True),
        dict(residual=False, activation="tanh"),
        dict(decay_first=True, chunk_size=1),
        dict(architecture="linear", residual=False, optimizer="gd", chunk_size=1),
        dict(architecture="linear", residual=False, optimizer="gd", chunk_size=1, decay_first=True),
    ],
    ids=["layer_norm", "plain-tanh", "decay_first", "delta-rule", "gated-delta-rule"],
)
def test_other_memories_match_reference(kw):
    """The memory LayerNorm, an MLP without residual, and chunk size 1: the WY delta-rule path takes the
    bound as a scale of each token's learning rate."""
    kw = dict(dict(architecture="mlp", optimizer="momentum", window=1, chunk_size=4, step_bound=BOUND), **kw)
    _compare(kw, bsz=2, seq=23, all_grads_live=kw["optimizer"] != "gd")


@pytest.mark.parametrize(
    "kw",
    [
        dict(optimizer="momentum", window=3, chunk_size=4),
        dict(optimizer="gd", window=1, chunk_size=1),
        dict(optimizer="gd", window=2, chunk_size=4, granularity="chunk"),
    ],
    ids=["momentum-w3", "chunk1", "chunk-granularity"],
)
def test_channel_wise_gates_match_reference(kw):
    """With channel-wise window gates the bound is taken with every channel's weight at 1."""
    _compare(dict(kw, architecture="mlp", step_bound=BOUND), channel=True, all_grads_live=kw["optimizer"] != "gd")


@pytest.mark.parametrize("optimizer", ["gd", "momentum"])
@pytest.mark.parametrize("granularity", ["token", "chunk"])
@pytest.mark.parametrize("impl", ["chunk", "reference"])
def test_streaming_at_any_split(optimizer, granularity, impl):
    kw = dict(
        architecture="mlp",
        optimizer=optimizer,
        granularity=granularity,
        window=3,
        chunk_size=4,
        impl=impl,
        step_bound=BOUND,
    )
    seq = 17
    q, k, v, lr, mom, dec, gam = make_inputs(2, seq, 2, DK, DV, optimizer=optimizer)
    params = make_params("mlp", 2, DK, DV, HIDDEN)
    full, st = neural_memory(q, k, v, lr, mom, dec, params, window_gate=gam, output_final_state=True, **kw)
    for cuts in ([1], [6], [3, 4, 13], list(range(1, seq))):
        out, state = streamed((q, k, v, lr, mom, dec, gam), params, cuts, **kw)
        assert rel_err(out, full) <= 1e-10, cuts
        for group in ("weights", "momentum", "chunk_weights", "chunk_momentum"):
            for n, t in getattr(st, group).items():
                assert rel_err(getattr(state, group)[n], t) <= 1e-10, (cuts, group, n)


# ---- the linear memory, from the definition -------------------------------------------------------


def _linear_loop(q, k, v, lr, mom, dec, w0, chunk, bound, optimizer):
    """The bounded rule for ``M(x) = W x`` with l2, window 1, written from its definition: inside a
    chunk every gradient ``(W_s k_i - v_i) k_i^T`` is taken at the chunk start ``W_s``; the
    unscaled recurrence runs on; row ``t`` reads ``W_t = G_t + s_t (U_t - G_t)`` with ``G_t`` the
    recurrence without gradients and ``s_t = min(1, bound / ||H_t||_F)``, ``H_t`` the same
    recurrence fed ``k_i k_i^T`` instead of the gradients. One sequence and head: ``q, k [T, d]``,
    ``v [T, dv]``, gates ``[T]``, ``w0 [dv, d]``."""
    w, s = w0.clone(), torch.zeros_like(w0)
    ys = []
    for t in range(q.shape[0]):
        if t % chunk == 0:
            w_start, u_w, u_s, g_w, g_s = w, w, s, w, s
            h_w = h_s = torch.zeros(k.shape[1], k.shape[1], dtype=k.dtype)
        grad = torch.outer(w_start @ k[t] - v[t], k[t])
        m = mom[t] if optimizer == "momentum" else 0.0
        u_s = m * u_s - lr[t] * grad
        u_w = (1 - dec[t]) * u_w + u_s
        g_s = m * g_s
        g_w = (1 - dec[t]) * g_w + g_s
        h_s = m * h_s + lr[t] * torch.outer(k[t], k[t])
        h_w = (1 - dec[t]) * h_w + h_s
        f = min(1.0, bound / float(torch.linalg.matrix_norm(h_w)))
        w, s = g_w + f * (u_w - g_w), g_s + f * (u_s - g_s)
        ys.append(w @ q[t])
    return torch.stack(ys), w


@pytest.mark.parametrize("optimizer", ["gd", "momentum"])
@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_linear_memory_equals_the_definition(optimizer, chunk):
    seq, d = 37, DK
    q, k, v, lr, mom, dec, _ = make_inputs(1, seq, 1, d, d, optimizer=optimizer, seed=chunk)
    k[0, 8:20] = k[0, 8:9]  # a run of one key: the stale steps pile up
    w0 = 0.3 * torch.randn(1, d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    o, st = neural_memory(
        q,
        k,
        v,
        lr,
        mom,
        dec,
        {"w0": w0},
        architecture="linear",
        residual=False,
        optimizer=optimizer,
        chunk_size=chunk,
        step_bound=BOUND,
        output_final_state=True,
    )
    want, w_end = _linear_loop(
        q[0, :, 0], k[0, :, 0], v[0, :, 0], lr[0, :, 0], mom[0, :, 0], dec[0, :, 0], w0[0], chunk, BOUND, optimizer
    )
    assert rel_err(o[0, :, 0], want) <= 1e-12
    assert rel_err(st.weights["w0"][0, 0], w_end) <= 1e-12


@pytest.mark.parametrize("repeats", [2, 16, 64])
def test_bound_one_lands_a_chunk_of_one_key_on_its_fit(repeats):
    """``step_bound=1``, plain gd, no forgetting, one unit key repeated through a chunk with a
    large learning rate: the papers' rule overshoots by ``repeats * lr - 1`` times the error; the
    bounded chunk ends exactly on the fit, ``W k = v``."""
    d = DK
    g = torch.Generator().manual_seed(repeats)
    key = torch.nn.functional.normalize(torch.randn(d, dtype=torch.float64, generator=g), dim=0)
    k = key.expand(1, repeats, 1, d).clone()
    q = k.clone()
    v = torch.randn(1, 1, 1, d, dtype=torch.float64, generator=g).expand(1, repeats, 1, d).clone()
    lr = torch.full((1, repeats, 1), 0.9, dtype=torch.float64)
    w0 = torch.randn(1, d, d, dtype=torch.float64, generator=g)
    kw = dict(architecture="linear", residual=False, optimizer="gd", chunk_size=repeats, output_final_state=True)
    _, st = neural_memory(q, k, v, lr, None, None, {"w0": w0}, step_bound=1.0, **kw)
    assert rel_err(st.weights["w0"][0, 0] @ key, v[0, 0, 0]) <= 1e-12
    _, free = neural_memory(q, k, v, lr, None, None, {"w0": w0}, **kw)
    err0 = w0[0] @ key - v[0, 0, 0]
    assert rel_err(free.weights["w0"][0, 0] @ key - v[0, 0, 0], (1 - repeats * 0.9) * err0) <= 1e-12


@pytest.mark.parametrize("impl", ["chunk", "reference"])
@pytest.mark.parametrize("granularity", ["token", "chunk"])
def test_inactive_bound_is_the_papers_rule_bitwise(impl, granularity):
    """Where every row's ``F_t`` is within the bound, nothing changes, to the bit."""
    kw = dict(architecture="mlp", optimizer="momentum", window=3, chunk_size=4, granularity=granularity)
    assert torch.equal(_outputs(kw, 1e6, impl=impl), _outputs(kw, None, impl=impl))


# ---- bad values, Triton, settings ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(architecture=a, loss="l2", optimizer=o, granularity=g, window=w, chunk_size=4)
        for a, o, g, w in [
            ("mlp", "momentum", "token", 3),
            ("gated_mlp", "gd", "token", 1),
            ("linear", "momentum", "token", 1),
            ("mlp", "gd", "chunk", 3),
        ]
    ],
    ids=["mlp-momentum-w3", "gated_mlp-gd", "linear", "mlp-chunk-granularity"],
)
@pytest.mark.parametrize("impl", ["chunk", "reference"])
def test_causal_for_any_input(kw, impl):
    """A NaN, an infinity or 1e30 at one token leaves every earlier output bitwise as it was: the
    bound's norms select a row's zero weights away before they meet a huge input's norm."""
    _check_op(impl, dict(kw, step_bound=BOUND))


def test_settings_errors():
    with pytest.raises(ValueError, match="step_bound must be a positive number"):
        UpdateRule(step_bound=0.0)
    with pytest.raises(ValueError, match="step_bound must be a positive number"):
        UpdateRule(step_bound=float("nan"))
    with pytest.raises(ValueError, match="Muon's step is orthogonalised"):
        UpdateRule(optimizer="muon", step_bound=1.0)


@pytest.mark.kernels
def test_triton_settings_errors():
    pytest.importorskip("triton", reason="impl='triton' needs the kernels extra (pip install -e '.[kernels]')")
    with pytest.raises(ValueError, match="impl='triton' computes step_bound only for architecture='linear'"):
        NeuralMemory(32, 2, 16, impl="triton")
    assert NeuralMemory(32, 2, 16, impl="triton", step_bound=None).rule.step_bound is None
    q, k, v, lr, mom, dec, _ = make_inputs(1, 5, 2, DK, DV)
    params = make_params("mlp", 2, DK, DV, HIDDEN)
    with pytest.raises(ValueError, match="impl='triton' supports step_bound only for architecture='linear'"):
        neural_memory(
            q.float(),
            k.float(),
            v.float(),
            lr.float(),
            mom.float(),
            dec.float(),
            {n: t.float() for n, t in params.items()},
            impl="triton",
            step_bound=1.0,
        )


def test_layer_and_config_defaults_and_old_configs():
    """The layer bounds gd and momentum by default (Muon: no bound); a new config records the bound
    it was made with; a stored config from before the bound existed loads with ``step_bound=None``;
    the presets are the papers' rule."""
    assert NeuralMemory(32, 2, 16).rule.step_bound == 1.0
    assert NeuralMemory(32, 2, 16, optimizer="gd").rule.step_bound == 1.0
    assert NeuralMemory(32, 2, 16, optimizer="muon").rule.step_bound is None
    config = DeepMemoryConfig(vocab_size=256, layer_pattern="memory")
    assert config.memory["step_bound"] == 1.0 and config.rule.step_bound == 1.0
    assert DeepMemoryConfig.from_dict(config.to_dict()).rule.step_bound == 1.0
    old = config.to_dict()
    old["memory"] = {k: v for k, v in old["memory"].items() if k != "step_bound"}
    assert DeepMemoryConfig.from_dict(old).rule.step_bound is None
    assert DeepMemoryConfig.from_dict(dict(old, layer_pattern="attn", memory={})).memory == {}
    for empty in (None, "absent"):  # a memory model saved with no memory settings at all
        stored = {k: v for k, v in old.items() if k != "memory"} if empty == "absent" else dict(old, memory=None)
        assert DeepMemoryConfig.from_dict(stored).rule.step_bound is None, empty
    for name in ("titans-mac", "omeganet", "gated-deltanet", "atlas"):
        assert build(name, size="tiny", vocab_size=256).config.rule.step_bound is None, name
