"""The stale-step bound's factor as the chunk form computes it (``deepmemory.ops.step_bound``: the
chunk's Gram matrices, one autograd node with a written-out backward, the key matrices' part for
every chunk at once) against the factor written here from its definition, materialising
``H_t = sum_i C(t, i) a_i a_i^T`` for every row (float64, forward and backward): nothing changes
numerically. The chunk form against the token loop: tests/test_step_bound.py."""

from __future__ import annotations

import itertools

import pytest
import torch
from ops_cases import make_inputs, make_params, rel_err
from test_ops import DK, DV, HIDDEN, _run

from deepmemory.ops import chunk as chunk_module
from deepmemory.ops.step_bound import active_bound_scale, bound_scale, step_norms

BOUND = 0.3  # acts on many rows of these inputs (checked)


def _definition_f2(inputs, coef):
    """``max over the matrices of ||H_t||_F^2``, ``H_t = sum_i C(t, i) a_i a_i^T`` built as a matrix."""
    f2 = None
    for a in inputs:
        h = torch.einsum("...ti,...ic,...id->...tcd", coef, a, a)  # [..., r, cols, cols]
        norm2 = h.pow(2).sum((-2, -1))
        f2 = norm2 if f2 is None else torch.maximum(f2, norm2)
    return f2


def _definition_scale(bound, inputs, coef):
    f2 = _definition_f2(inputs, coef)
    over = f2 > bound**2
    return torch.where(over, bound / torch.where(over, f2, 1.0).sqrt(), 1.0)


def _leaves(*shapes, gen):
    return [torch.randn(*s, dtype=torch.float64, generator=gen).requires_grad_() for s in shapes]


def _grads(out, leaves, gen):
    weights = torch.randn(out.shape, dtype=out.dtype, generator=gen)
    return torch.autograd.grad((out * weights).sum(), leaves, allow_unused=True)


@pytest.mark.parametrize("n", [1, 7, 16, 63])
@pytest.mark.parametrize("bound", [0.5, 4.0, 1e6])
def test_factor_matches_the_definition(n, bound):
    """Two matrices of different widths, causal weights with zeros inside, a zero input; alone and
    with the first matrix's part given as ``base``; the bound inactive (1e6) gives the factor 1."""
    gen = torch.Generator().manual_seed(n)
    a1, a2 = _leaves((2, 3, n, 5), (2, 3, n, 11), gen=gen)
    with torch.no_grad():
        a2[0, 0, n // 2] = 0.0
    coef = torch.rand(2, 3, n, n, dtype=torch.float64, generator=gen).tril()
    coef = (coef * (torch.rand(n, n, generator=gen) > 0.2)).requires_grad_()  # zeros inside the causal part too
    want = _definition_scale(bound, [a1, a2], coef)
    assert bool((want < 1).any()) == (bound < 1e6)  # the bound acts (or not) on these inputs
    g_want = _grads(want, [a1, a2, coef], torch.Generator().manual_seed(1))
    for got in (bound_scale(bound, [a1, a2], coef), bound_scale(bound, [a2], coef, step_norms([a1], coef))):
        assert rel_err(got, want) <= 1e-13
        for g, w in zip(_grads(got, [a1, a2, coef], torch.Generator().manual_seed(1)), g_want):
            if g is None:  # no row active: nothing flows back
                assert w is None or not w.any()
            else:
                assert rel_err(g, w) <= 1e-12


def test_repeated_input_counts_once():
    """``gated_mlp`` gives two matrices the same input (the key): the factor and its gradient are
    those of the definition, where the maximum splits the gradient between the equal norms."""
    gen = torch.Generator().manual_seed(3)
    a, h = _leaves((2, 2, 9, 4), (2, 2, 9, 7), gen=gen)
    coef = torch.rand(2, 2, 9, 9, dtype=torch.float64, generator=gen).tril().requires_grad_()
    want = _definition_scale(BOUND, [h, a, a], coef)
    got = bound_scale(BOUND, [h, a, a], coef)
    assert rel_err(got, want) <= 1e-13
    g_got = _grads(got, [a, h, coef], torch.Generator().manual_seed(5))
    g_want = _grads(want, [a, h, coef], torch.Generator().manual_seed(5))
    for g, w in zip(g_got, g_want):
        assert rel_err(g, w) <= 1e-12


def test_active_factor_is_none_only_where_no_row_is_over():
    """What the chunk form asks per chunk: None where every row's factor is 1 (its learning rates are
    then left as they are), else the factor and its gradient."""
    gen = torch.Generator().manual_seed(4)
    (a,) = _leaves((2, 2, 8, 5), gen=gen)
    coef = torch.rand(2, 2, 8, 8, dtype=torch.float64, generator=gen).tril().requires_grad_()
    f = _definition_f2([a], coef).detach().sqrt()
    assert active_bound_scale(float(f.max()) * 1.01, [a], coef) is None
    tau = float(f.max()) * 0.99  # one row over
    got, want = active_bound_scale(tau, [a], coef), _definition_scale(tau, [a], coef)
    assert int((want < 1).sum()) == 1 and rel_err(got, want) <= 1e-13
    g_got = _grads(got, [a, coef], torch.Generator().manual_seed(2))
    g_want = _grads(want, [a, coef], torch.Generator().manual_seed(2))
    for g, w in zip(g_got, g_want):
        assert w.abs().max() > 0 and rel_err(g, w) <= 1e-12


def _definition_chunk_scale(bound, coef, grads, keys, key_f2):
    return _definition_scale(bound, [a for _, a in grads.values()], coef)


def _op(kw, seq, seed):
    inputs = make_inputs(1, seq, 2, DK, DV, optimizer=kw["optimizer"], seed=seed)
    params = make_params(kw["architecture"], 2, DK, DV, HIDDEN, gen=torch.Generator().manual_seed(seed + 1))
    return _run("chunk", inputs, params, grad=True, **kw)


# CI keeps one case of each length, chunk size, granularity and memory (about 2 s); the slow tier the rest
FAST = {(1, 16, "token", "linear"), (7, 1, "token", "mlp"), (63, 16, "token", "mlp"), (100, 64, "chunk", "mlp")}
FAST |= {(257, 64, "token", "linear"), (100, 16, "chunk", "linear")}


@pytest.mark.parametrize(
    "seq,chunk_size,granularity,architecture",
    [
        case if case in FAST else pytest.param(*case, marks=pytest.mark.slow)
        for case in itertools.product([1, 7, 63, 100, 257], [1, 16, 64], ["token", "chunk"], ["mlp", "linear"])
    ],
)
def test_chunk_form_matches_the_definition(seq, chunk_size, granularity, architecture, monkeypatch):
    """The op's outputs, final states and every gradient with the factor computed as the chunk form
    does, against the same op with each chunk's factor from the definition (all of the chunk's
    matrices, no part computed beforehand), at 1e-12."""
    kw = dict(
        architecture=architecture,
        optimizer="momentum",
        granularity=granularity,
        window=3 if architecture == "mlp" else 1,
        chunk_size=chunk_size,
        step_bound=BOUND,
    )
    o, st, g = _op(kw, seq, seq)
    with monkeypatch.context() as m:
        m.setattr(chunk_module, "_chunk_scale", _definition_chunk_scale)
        o_def, st_def, g_def = _op(kw, seq, seq)
    assert rel_err(o, o_def) <= 1e-12
    for group in ("weights", "momentum", "chunk_weights", "chunk_momentum"):
        for n, t in getattr(st_def, group).items():
            assert rel_err(getattr(st, group)[n], t) <= 1e-12, (group, n)
    for n, t in g_def.items():
        if t is None:  # (an input nothing reads: at chunk granularity a call shorter than a chunk updates nothing)
            assert g[n] is None, n
        else:
            assert rel_err(g[n], t) <= 1e-12, n
    if granularity == "token" and seq > 1:  # the bound acts here (else this would compare the unbounded rule)
        o_free, _, _ = _op(dict(kw, step_bound=None), seq, seq)
        assert (o - o_free).abs().nan_to_num(1.0).max() > 1e-3  # (the papers' rule may diverge: NaN)


@pytest.mark.parametrize("gate", ["lr", "window_gate"])
@pytest.mark.parametrize(
    "kw",
    [
        dict(architecture="mlp", optimizer="momentum", window=3, chunk_size=4),
        dict(architecture="linear", optimizer="momentum", window=3, chunk_size=4, granularity="chunk"),
        dict(architecture="linear", optimizer="gd", window=1, chunk_size=1, residual=False),
    ],
    ids=["mlp", "linear-chunk-granularity", "delta-rule"],
)
def test_gate_of_zero_has_the_token_loops_gradient(kw, gate, impl="chunk"):
    """A gate of exactly 0 gives its token's weights ``C(t, i) = 0``, which the factor selects away;
    the token loop still differentiates the bound with respect to that gate, and so does the chunk form."""
    kw = dict(kw, step_bound=BOUND)
    q, k, v, lr, mom, dec, gam = make_inputs(2, 13, 2, DK, DV, optimizer=kw["optimizer"], seed=3)
    if gate == "lr":
        lr = lr.clone()
        lr[:, 5] = 0.0
    else:
        gam = gam.clone()
        gam[:, 5] = 0.0
    params = make_params(kw["architecture"], 2, DK, DV, HIDDEN, gen=torch.Generator().manual_seed(1))
    _, _, g_ref = _run("reference", [q, k, v, lr, mom, dec, gam], params, grad=True, **kw)
    _, _, g_chk = _run(impl, [q, k, v, lr, mom, dec, gam], params, grad=True, **kw)
    assert g_ref[gate][:, 5].abs().max() > 1e-6  # the zero gate has a gradient
    for n, t in g_ref.items():
        if t is None:  # (gd reads no momentum)
            assert g_chk[n] is None, n
        else:
            assert rel_err(g_chk[n], t) <= 1e-10, n


@pytest.mark.kernels
def test_gate_of_zero_has_the_token_loops_gradient_triton():
    """The same for ``impl="triton"`` (the linear memory; its factor is built by the same node)."""
    pytest.importorskip("triton", reason="impl='triton' needs the kernels extra")
    test_gate_of_zero_has_the_token_loops_gradient(
        dict(architecture="linear", optimizer="momentum", window=3, chunk_size=4), "lr", impl="triton"
    )
