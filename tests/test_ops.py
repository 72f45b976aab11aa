"""The chunk-parallel op against the token-by-token reference (float64), streaming, errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from ops_cases import make_inputs, make_params, rel_err

from deepmemory.ops import ARCHITECTURES, MemoryState, memory_read, neural_memory, newton_schulz

TOL = 1e-8
DK = DV = 6
HIDDEN = 8


def _run(impl, inputs, params, *, grad=False, state=None, **kw):
    q, k, v, lr, mom, dec, gamma = inputs
    if grad:
        inputs = [x.detach().requires_grad_() for x in inputs]
        params = {n: p.detach().requires_grad_() for n, p in params.items()}
        q, k, v, lr, mom, dec, gamma = inputs
    o, st = neural_memory(
        q,
        k,
        v,
        lr,
        mom,
        dec,
        params,
        window_gate=gamma,
        impl=impl,
        output_final_state=True,
        initial_state=state,
        **kw,
    )
    if not grad:
        return o, st, None
    g = torch.Generator().manual_seed(7)
    loss = (o * torch.randn(o.shape, dtype=o.dtype, generator=g)).sum()
    for n in sorted(st.weights):
        loss = loss + (st.weights[n] * torch.randn(st.weights[n].shape, dtype=o.dtype, generator=g)).sum()
        loss = loss + (st.momentum[n] * torch.randn(st.momentum[n].shape, dtype=o.dtype, generator=g)).sum()
    loss.backward()
    names = ["q", "k", "v", "lr", "momentum", "decay", "window_gate"]
    grads = {n: x.grad for n, x in zip(names, inputs)}
    grads.update({f"params.{n}": p.grad for n, p in params.items()})
    return o, st, grads


def _compare(
    kw, bsz=2, seq=13, nh=2, per_sequence=False, grad=True, seed=0, lr_scale=1.0, all_grads_live=False, channel=False
):
    # a long window sums many gradients per step: keep the step moderate so the memory stays bounded
    inputs = make_inputs(
        bsz,
        seq,
        nh,
        DK,
        DV,
        optimizer=kw.get("optimizer", "momentum"),
        seed=seed,
        lr_scale=lr_scale * min(1.0, 2.0 / kw.get("window", 1)),
        channel=channel,
    )
    params = make_params(
        kw.get("architecture", "mlp"),
        nh,
        DK,
        DV,
        HIDDEN,
        batch=bsz if per_sequence else None,
        gen=torch.Generator().manual_seed(seed + 1),
    )
    o_ref, st_ref, g_ref = _run("reference", inputs, params, grad=grad, **kw)
    o_chk, st_chk, g_chk = _run("chunk", inputs, params, grad=grad, **kw)
    assert torch.isfinite(o_ref).all()
    assert rel_err(o_chk, o_ref) <= TOL, "outputs"
    for group in ("weights", "momentum", "chunk_weights", "chunk_momentum"):
        for n, t in getattr(st_ref, group).items():
            assert rel_err(getattr(st_chk, group)[n], t) <= TOL, f"final_state.{group}[{n}]"
    if grad:
        for n, g in g_ref.items():
            if g is None:  # an input the configuration does not use (momentum under gd)
                assert g_chk[n] is None or g_chk[n].abs().max() == 0, n
                continue
            if all_grads_live:
                assert g.abs().max() > 0, f"grad {n} vanished in the reference"
            assert rel_err(g_chk[n], g) <= TOL, f"grad {n}"


MATRIX = list(itertools.product(ARCHITECTURES, ("l2", "dot"), ("gd", "momentum", "muon"), ("token", "chunk")))


@pytest.mark.parametrize("memory,loss,optimizer,granularity", MATRIX)
@pytest.mark.parametrize("window", [1, 7])
def test_chunk_matches_reference_every_combination(memory, loss, optimizer, granularity, window):
    kw = dict(architecture=memory, loss=loss, optimizer=optimizer, granularity=granularity, window=window, chunk_size=4)
    _compare(kw, per_sequence=(window == 7), all_grads_live=True)


@pytest.mark.parametrize("seq", [1, 7, 63, 100, 257])
@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
@pytest.mark.parametrize(
    "kw",
    [
        dict(architecture="mlp", loss="l2", optimizer="momentum", granularity="token", window=1),
        pytest.param(
            dict(architecture="gated_mlp", loss="dot", optimizer="gd", granularity="token", window=70),
            marks=pytest.mark.slow,
        ),
        pytest.param(
            dict(architecture="linear", loss="l2", optimizer="muon", granularity="chunk", window=5),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["titans", "omega-window70", "muon-chunk"],
)
def test_lengths_and_chunk_sizes(seq, chunk_size, kw):
    _compare(dict(kw, chunk_size=chunk_size), bsz=1, seq=seq, nh=2, grad=seq <= 100, seed=seq)


def test_grads_long_sequence_multiple_chunks():
    kw = dict(architecture="mlp", loss="l2", optimizer="momentum", granularity="token", window=3, chunk_size=16)
    _compare(kw, bsz=1, seq=257, nh=1, grad=True, lr_scale=0.3, all_grads_live=True)


@pytest.mark.parametrize("memory,loss,optimizer,granularity", MATRIX)
@pytest.mark.parametrize("impl", ["chunk", pytest.param("reference", marks=pytest.mark.slow)])
def test_streaming_equals_one_call(memory, loss, optimizer, granularity, impl):
    kw = dict(
        architecture=memory, loss=loss, optimizer=optimizer, granularity=granularity, window=6, chunk_size=4, impl=impl
    )
    seq = 19
    q, k, v, lr, mom, dec, gamma = make_inputs(2, seq, 2, DK, DV, optimizer=optimizer)
    params = make_params(memory, 2, DK, DV, HIDDEN)
    o, st = neural_memory(q, k, v, lr, mom, dec, params, window_gate=gamma, output_final_state=True, **kw)
    for cuts in ([1], [5], [8], [3, 4, 11], list(range(1, seq))):
        outs, state, prev = [], None, 0
        for cut in cuts + [seq]:
            sl = slice(prev, cut)
            oi, state = neural_memory(
                q[:, sl],
                k[:, sl],
                v[:, sl],
                lr[:, sl],
                mom[:, sl],
                dec[:, sl],
                params,
                window_gate=gamma[:, sl],
                initial_state=state,
                output_final_state=True,
                **kw,
            )
            outs.append(oi)
            prev = cut
        assert rel_err(torch.cat(outs, 1), o) <= 1e-10, cuts
        assert state.seen == seq
        for n in st.weights:
            assert rel_err(state.weights[n], st.weights[n]) <= 1e-10
            assert rel_err(state.momentum[n], st.momentum[n]) <= 1e-10


def test_state_is_shared_between_implementations():
    kw = dict(architecture="mlp", optimizer="momentum", window=5, chunk_size=4)
    q, k, v, lr, mom, dec, gamma = make_inputs(2, 17, 2, DK, DV)
    params = make_params("mlp", 2, DK, DV, HIDDEN)
    o, _ = neural_memory(q, k, v, lr, mom, dec, params, window_gate=gamma, impl="chunk", **kw)
    a = slice(0, 6)
    b = slice(6, 17)
    o1, st = neural_memory(
        q[:, a],
        k[:, a],
        v[:, a],
        lr[:, a],
        mom[:, a],
        dec[:, a],
        params,
        window_gate=gamma[:, a],
        impl="reference",
        output_final_state=True,
        **kw,
    )
    o2, _ = neural_memory(
        q[:, b],
        k[:, b],
        v[:, b],
        lr[:, b],
        mom[:, b],
        dec[:, b],
        params,
        window_gate=gamma[:, b],
        impl="chunk",
        initial_state=st,
        **kw,
    )
    assert rel_err(torch.cat([o1, o2], 1), o) <= 1e-10


def test_gradient_flows_through_carried_state():
    kw = dict(architecture="mlp", optimizer="momentum", window=3, chunk_size=4)
    q, k, v, lr, mom, dec, gamma = make_inputs(1, 10, 1, DK, DV)
    params = {n: p.requires_grad_() for n, p in make_params("mlp", 1, DK, DV, HIDDEN).items()}
    _, st = neural_memory(
        q[:, :6],
        k[:, :6],
        v[:, :6],
        lr[:, :6],
        mom[:, :6],
        dec[:, :6],
        params,
        window_gate=gamma[:, :6],
        output_final_state=True,
        **kw,
    )
    o2, _ = neural_memory(
        q[:, 6:],
        k[:, 6:],
        v[:, 6:],
        lr[:, 6:],
        mom[:, 6:],
        dec[:, 6:],
        params,
        window_gate=gamma[:, 6:],
        initial_state=st,
        **kw,
    )
    o2.sum().backward()
    assert params["w0"].grad is not None and params["w0"].grad.abs().max() > 0


def test_every_position_written_for_ragged_lengths():
    """The last, partial chunk is padded internally: its real positions must come back finite and exact."""
    for gran, opt in itertools.product(("token", "chunk"), ("momentum", "muon")):
        for seq in (1, 7, 13):
            inputs = make_inputs(2, seq, 2, DK, DV)
            params = make_params("mlp", 2, DK, DV, HIDDEN)
            kw = dict(chunk_size=4, granularity=gran, optimizer=opt, window_gate=inputs[6])
            o, _ = neural_memory(*inputs[:6], params, **kw)
            o_ref, _ = neural_memory(*inputs[:6], params, impl="reference", **kw)
            assert o.shape == (2, seq, 2, DV) and torch.isfinite(o).all()
            assert rel_err(o, o_ref) <= TOL


def test_delta_rule_by_hand():
    """linear memory, l2 loss, gd, window 1, chunk 1: W_t = (1-a_t) W_{t-1} - lr_t (W_{t-1} k_t - v_t) k_t^T."""
    q, k, v, lr, _, dec, _ = make_inputs(1, 9, 1, DK, DV)
    w0 = make_params("linear", 1, DK, DV, HIDDEN)["w0"]
    o, st = neural_memory(
        q, k, v, lr, None, dec, {"w0": w0}, architecture="linear", optimizer="gd", chunk_size=1, output_final_state=True
    )
    w = w0[0]
    for t in range(9):
        kt, vt = k[0, t, 0], v[0, t, 0]
        w = (1 - dec[0, t, 0]) * w - lr[0, t, 0] * torch.outer(w @ kt - vt, kt)
        assert torch.allclose(o[0, t, 0], w @ q[0, t, 0], atol=1e-12)
    assert torch.allclose(st.weights["w0"][0, 0], w, atol=1e-12)


def test_hebbian_by_hand():
    """dot loss, momentum, window 2: S_t = eta S - lr (-(v_t k_t^T) - g_{t-1} v_{t-1} k_{t-1}^T) ...
    read after write."""
    q, k, v, lr, mom, dec, gamma = make_inputs(1, 8, 1, DK, DV)
    w0 = make_params("linear", 1, DK, DV, HIDDEN)["w0"]
    o, _ = neural_memory(
        q, k, v, lr, mom, dec, {"w0": w0}, architecture="linear", loss="dot", window=2, window_gate=gamma, chunk_size=3
    )
    w, s = w0[0], torch.zeros_like(w0[0])
    for t in range(8):
        u = -sum(gamma[0, i, 0] * torch.outer(v[0, i, 0], k[0, i, 0]) for i in range(max(0, t - 1), t + 1))
        s = mom[0, t, 0] * s - lr[0, t, 0] * u
        w = (1 - dec[0, t, 0]) * w + s
        assert torch.allclose(o[0, t, 0], w @ q[0, t, 0], atol=1e-12)


def test_newton_schulz_orthogonalises_wide_and_tall():
    g = torch.Generator().manual_seed(3)
    for shape in [(4, 9), (9, 4), (6, 6)]:
        x = torch.randn(shape, dtype=torch.float64, generator=g)
        y = newton_schulz(x, 5)
        sv = torch.linalg.svdvals(y)
        assert y.shape == x.shape
        assert sv.min() > 0.5 and sv.max() < 1.3, sv
        u, _, vh = torch.linalg.svd(x, full_matrices=False)
        assert torch.nn.functional.cosine_similarity((u @ vh).flatten(), y.flatten(), dim=0) > 0.95


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs(dtype):
    # round the inputs to the low precision first: the test measures the computation, not the input rounding
    inputs = [x.to(dtype).double() for x in make_inputs(2, 21, 2, DK, DV)]
    params = make_params("mlp", 2, DK, DV, HIDDEN)
    o64, _ = neural_memory(*inputs[:6], params, window_gate=inputs[6], chunk_size=8, window=3)
    low = [x.to(dtype).requires_grad_() for x in inputs]
    o, st = neural_memory(
        *low[:6],
        {n: p.float() for n, p in params.items()},
        window_gate=low[6],
        chunk_size=8,
        window=3,
        output_final_state=True,
    )
    assert o.dtype == dtype and st.weights["w0"].dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(o.double(), o64) <= tol
    o.float().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in low)


def test_memory_read_matches_state():
    q, k, v, lr, mom, dec, gamma = make_inputs(2, 12, 2, DK, DV)
    params = make_params("gated_mlp", 2, DK, DV, HIDDEN)
    o, st = neural_memory(
        q, k, v, lr, mom, dec, params, architecture="gated_mlp", chunk_size=4, output_final_state=True
    )
    # the last token reads the memory after its own write: the state's weights
    last = memory_read(q[:, -1:], st.weights, architecture="gated_mlp")
    assert rel_err(last, o[:, -1:]) <= 1e-12


# ---------------------------------------------------------------- bad input


def _good():
    q, k, v, lr, mom, dec, gamma = make_inputs(2, 5, 2, DK, DV)
    return dict(q=q, k=k, v=v, lr=lr, momentum=mom, decay=dec, params=make_params("mlp", 2, DK, DV, HIDDEN))


def _gate(index, value, at=(1, 3, 0)):
    """Gate ``index`` of :func:`make_inputs` (3 lr, 4 momentum, 5 decay, 6 window_gate) with
    ``value`` at ``at`` = (batch, token, head)."""
    x = make_inputs(2, 5, 2, DK, DV)[index].clone()
    x[at] = value
    return x


def _call(**over):
    args = _good()
    kw = {n: over.pop(n) for n in list(over) if n not in args}
    args.update(over)
    return neural_memory(
        args["q"], args["k"], args["v"], args["lr"], args["momentum"], args["decay"], args["params"], **kw
    )


@pytest.mark.parametrize(
    "over,exc,words",
    [
        (dict(q=torch.randn(2, 5, 2)), ValueError, "q must have 4 dims"),
        (dict(k=torch.randn(2, 5, 2, DK + 1, dtype=torch.float64)), ValueError, "k must have shape"),
        (dict(v=torch.randn(2, 4, 2, DV, dtype=torch.float64)), ValueError, "v must have shape"),
        (dict(lr=torch.rand(2, 5, 3, dtype=torch.float64)), ValueError, "lr must have shape"),
        (dict(lr=torch.rand(2, 5, 2, 1, dtype=torch.float64)), ValueError, "lr must have 3 dims"),
        (dict(v=torch.randn(2, 5, 2, DV, dtype=torch.float32)), TypeError, "v has dtype"),
        (dict(decay=torch.rand(2, 5, 2, dtype=torch.float32)), TypeError, "decay has dtype"),
        (dict(q=torch.randn(2, 0, 2, DK, dtype=torch.float64)), ValueError, "at least one token"),
        (dict(architecture="conv"), ValueError, "architecture must be one of"),
        (dict(loss="l1"), ValueError, "loss must be one of"),
        (dict(optimizer="adam"), ValueError, "optimizer must be one of"),
        (dict(granularity="segment"), ValueError, "granularity must be one of"),
        (dict(impl="triton2"), ValueError, "impl must be one of"),
        (dict(activation="swish"), ValueError, "activation must be one of"),
        (dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
        (dict(chunk_size=2.0), TypeError, "chunk_size must be an int"),
        (dict(window=0), ValueError, "window must be >= 1"),
        (dict(momentum=None), ValueError, "momentum gates are required"),
        (dict(params={"w0": torch.randn(2, HIDDEN, DK, dtype=torch.float64)}), ValueError, "missing ['w1']"),
        (
            dict(
                params={"w0": torch.randn(2, HIDDEN, DK), "w1": torch.randn(2, DV, HIDDEN), "w2": torch.randn(2, 3, 3)}
            ),
            ValueError,
            "unexpected ['w2']",
        ),
        (
            dict(params={"w0": torch.randn(2, HIDDEN, DK + 1), "w1": torch.randn(2, DV, HIDDEN)}),
            ValueError,
            "weights['w0'] must be",
        ),
        (dict(params={"w0": torch.randn(3, HIDDEN, DK), "w1": torch.randn(3, DV, HIDDEN)}), ValueError, "leading dims"),
        (dict(params=[torch.randn(2, HIDDEN, DK)]), TypeError, "weights must be a dict"),
        (
            dict(v=torch.randn(2, 5, 2, DV + 1, dtype=torch.float64), params=make_params("mlp", 2, DK, DV + 1, HIDDEN)),
            ValueError,
            "needs dk == dv",
        ),
        (dict(window_gate=torch.rand(2, 5, 1, dtype=torch.float64)), ValueError, "window_gate must have shape"),
        (dict(initial_state="state"), TypeError, "initial_state must be a MemoryState"),
        # gate ranges: one line naming the gate, the range, the value and its [batch, token, head]
        (dict(lr=_gate(3, -0.3)), ValueError, "lr must be >= 0; got -0.3 at [batch 1, token 3, head 0]"),
        (
            dict(lr=_gate(3, -float("inf"), at=(0, 0, 1))),
            ValueError,
            "lr must be >= 0; got -inf at [batch 0, token 0, head 1]",
        ),
        (dict(momentum=_gate(4, 1.5)), ValueError, "momentum must be in [0, 1]; got 1.5 at [batch 1, token 3, head 0]"),
        (
            dict(momentum=_gate(4, -0.25, at=(0, 4, 1))),
            ValueError,
            "momentum must be in [0, 1]; got -0.25 at [batch 0, token 4, head 1]",
        ),
        (dict(decay=_gate(5, -0.5)), ValueError, "decay must be in [0, 1]; got -0.5 at [batch 1, token 3, head 0]"),
        (
            dict(decay=_gate(5, 1.0 + 2**-40)),
            ValueError,
            "decay must be in [0, 1]; got 1.0000000000009095 at [batch 1, token 3, head 0]",
        ),
        (
            dict(window_gate=_gate(6, 2.0)),
            ValueError,
            "window_gate must be in [0, 1]; got 2 at [batch 1, token 3, head 0]",
        ),
        (
            dict(window_gate=_gate(6, -1e-9, at=(0, 1, 0))),
            ValueError,
            "window_gate must be in [0, 1]; got -1e-09 at [batch 0, token 1, head 0]",
        ),
        (dict(momentum=_gate(4, float("inf")), optimizer="gd"), ValueError, "momentum must be in [0, 1]; got inf"),
        (
            dict(lr=_gate(3, -1.0), decay=_gate(5, 2.0)),
            ValueError,
            "lr must be >= 0; got -1 at",
        ),  # the first gate named
        (
            dict(lr=_gate(3, -1.0, at=(1, 4, 1)), decay=_gate(5, 2.0, at=(0, 2, 0))),
            ValueError,
            "lr must be >= 0; got -1 at [batch 1, token 4",
        ),
    ],
)
def test_bad_input(over, exc, words):
    with pytest.raises(exc, match=__import__("re").escape(words)):
        _call(**over)


@pytest.mark.parametrize("name,index", [("lr", 3), ("momentum", 4), ("decay", 5), ("window_gate", 6)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nan_gate_passes_the_range_check(name, index, dtype):
    """NaN is not out of range ((x < low) | (x > high) is False for it): a NaN gate reaches the op,
    which runs; the other sequence of the batch is untouched. So does an lr far above 1 (no upper
    bound in the op) and the bounds themselves."""
    args = {
        n: (x.to(dtype) if isinstance(x, torch.Tensor) else {m: w.to(dtype) for m, w in x.items()})
        for n, x in _good().items()
    }
    gate = _gate(index, float("nan"), at=(0, 2, 1)).to(dtype)
    args["window_gate" if name == "window_gate" else name] = gate
    kw = {"window_gate": args.pop("window_gate")} if name == "window_gate" else {}
    o, _ = neural_memory(
        args["q"], args["k"], args["v"], args["lr"], args["momentum"], args["decay"], args["params"], window=2, **kw
    )
    assert torch.isfinite(o[1]).all()
    edges = {
        n: _gate(i, b, at=(1, 1, 1)).to(dtype) for n, i, b in (("lr", 3, 50.0), ("momentum", 4, 1.0), ("decay", 5, 1.0))
    }
    neural_memory(
        args["q"],
        args["k"],
        args["v"],
        edges["lr"],
        edges["momentum"],
        edges["decay"],
        args["params"],
        window=2,
        window_gate=_gate(6, 0.0, at=(0, 0, 0)).to(dtype),
    )


def test_state_from_other_settings_rejected():
    args = _good()
    _, st = neural_memory(
        args["q"],
        args["k"],
        args["v"],
        args["lr"],
        args["momentum"],
        args["decay"],
        args["params"],
        chunk_size=4,
        output_final_state=True,
    )
    assert isinstance(st, MemoryState)
    with pytest.raises(ValueError, match="initial_state was made with settings"):
        _call(chunk_size=8, initial_state=st)


@pytest.mark.slow
@pytest.mark.parametrize(
    "optimizer,granularity",
    [("momentum", "token"), ("muon", "chunk"), pytest.param("muon", "token", marks=pytest.mark.long)],
)  # ~1 min
def test_compiles_without_graph_breaks(optimizer, granularity):
    """torch.compile captures the whole chunked op (fullgraph: no graph breaks), forward and backward."""
    inputs = [x.requires_grad_() for x in make_inputs(1, 21, 2, DK, DV)]
    params = make_params("mlp", 2, DK, DV, HIDDEN)

    def f(q, k, v, lr, mom, dec, gamma, w0, w1):
        return neural_memory(
            q,
            k,
            v,
            lr,
            mom,
            dec,
            {"w0": w0, "w1": w1},
            window_gate=gamma,
            chunk_size=8,
            window=3,
            optimizer=optimizer,
            granularity=granularity,
        )[0]

    eager = f(*inputs, params["w0"], params["w1"])
    (g_eager,) = torch.autograd.grad(eager.sum(), inputs[1])
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(*inputs, params["w0"], params["w1"])
    (g_comp,) = torch.autograd.grad(compiled.sum(), inputs[1])
    assert rel_err(compiled, eager) <= 1e-12
    assert rel_err(g_comp, g_eager) <= 1e-12


# ---- Muon at token granularity (ATLAS eq. 32-33 per token) ------------------------------------------

MUON_FAST = {(63, 16, "mlp", 3), (7, 4, "gated_mlp", 1)}
# a length shorter than a chunk, one token per chunk (a window reaching back 2 chunks), ragged ends
MUON_SLOW = {
    (1, 16, "mlp", 3),
    (7, 16, "gated_mlp", 3),
    (63, 1, "mlp", 3),
    (100, 1, "gated_mlp", 3),
    (100, 4, "mlp", 1),
    (100, 16, "gated_mlp", 1),
}


def _muon_tier(*case):
    """Two cases in the fast loop, six in the slow tier, the rest of the sweep opt-in (--runlong;
    257 tokens through the reference's token loop with autograd take a minute each)."""
    return () if case in MUON_FAST else (pytest.mark.slow,) if case in MUON_SLOW else (pytest.mark.long,)


@pytest.mark.parametrize(
    "seq,chunk_size,memory,window",
    [
        pytest.param(*case, marks=_muon_tier(*case))
        for case in itertools.product([1, 7, 63, 100, 257], [1, 4, 16], ["mlp", "gated_mlp"], [1, 3])
        if case[0] < 257 or case[2] == "mlp"
    ],
)
def test_muon_token_lengths_and_chunk_sizes(seq, chunk_size, memory, window):
    """The chunk form of token-granularity Muon against the token loop (float64, 1e-8): outputs,
    final states, and gradients with respect to every input and the initial weights. The steps are
    a quarter of the other tests': a hundred orthogonalised steps in a row at the full step length
    amplify rounding by up to 1e8 in the gated memory, in either implementation (a property of
    the recurrence, not of its evaluation; at a quarter, by about 1e6). Over 257 steps the gated
    memory's recurrence amplifies it past 1e-8 at any step length tried (outputs 1e-5, gradients
    O(1) apart between the token loop and either chunk form, the one before this one included), so
    that length runs the mlp memory only."""
    kw = dict(
        architecture=memory, loss="l2", optimizer="muon", granularity="token", window=window, chunk_size=chunk_size
    )
    _compare(kw, bsz=1, seq=seq, nh=2, per_sequence=seq % 2 == 1, seed=seq, lr_scale=0.25)


@pytest.mark.parametrize("memory", ["mlp", "gated_mlp"])
def test_muon_token_streamed_gradients_equal_one_call(memory):
    """Streaming resumes a carried state after its pending tokens (ops/chunk.py: only the new rows
    are orthogonalised): outputs, final state and every gradient equal one call's (float64)."""
    kw = dict(architecture=memory, optimizer="muon", granularity="token", window=3, chunk_size=4)
    inputs = make_inputs(2, 15, 2, DK, DV, optimizer="muon")
    params = make_params(memory, 2, DK, DV, HIDDEN)

    def run(cuts):
        leaves = [x.detach().requires_grad_() for x in inputs]
        weights = {n: p.detach().requires_grad_() for n, p in params.items()}
        q, k, v, lr, mom, dec, gamma = leaves
        outs, state, prev = [], None, 0
        for cut in cuts + [15]:
            sl = slice(prev, cut)
            o, state = neural_memory(
                q[:, sl],
                k[:, sl],
                v[:, sl],
                lr[:, sl],
                mom[:, sl],
                dec[:, sl],
                weights,
                window_gate=gamma[:, sl],
                initial_state=state,
                output_final_state=True,
                **kw,
            )
            outs.append(o)
            prev = cut
        o = torch.cat(outs, 1)
        g = torch.Generator().manual_seed(3)
        loss = (o * torch.randn(o.shape, dtype=o.dtype, generator=g)).sum()
        for n in sorted(state.weights):
            loss = loss + (state.weights[n] * torch.randn(state.weights[n].shape, dtype=o.dtype, generator=g)).sum()
        loss.backward()
        return o.detach(), [x.grad for x in leaves] + [weights[n].grad for n in sorted(weights)]

    o, grads = run([])
    for cuts in ([5], [1, 2, 3, 9], [6, 7, 13, 14]):
        o_s, grads_s = run(cuts)
        assert rel_err(o_s, o) <= 1e-10, cuts
        for g_s, g in zip(grads_s, grads):
            assert rel_err(g_s, g) <= 1e-10, cuts


def test_muon_token_checkpointed_chunks_equal_the_reference(monkeypatch):
    """Under torch.compile the chunks are recomputed through torch.utils.checkpoint rather than the
    one-node Function (ops/chunk.py, _recomputed); run eagerly, that path equals the token loop too."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    _compare(
        dict(architecture="gated_mlp", optimizer="muon", granularity="token", window=3, chunk_size=4),
        seq=13,
        all_grads_live=True,
    )


def _saved_bytes(seq, chunk_size):
    """Bytes of distinct storage that autograd keeps for the backward of one token-granularity Muon
    call (d = 16, hidden 64), and the bytes of one copy of the memory's matrices."""
    inputs = [x.requires_grad_() for x in make_inputs(1, seq, 1, 16, 16, optimizer="muon")]
    params = {n: p.requires_grad_() for n, p in make_params("mlp", 1, 16, 16, 64).items()}
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        neural_memory(
            *inputs[:6],
            params,
            window_gate=inputs[6],
            optimizer="muon",
            granularity="token",
            window=3,
            chunk_size=chunk_size,
            output_final_state=True,
        )
    return sum(storages.values()), sum(p.numel() * p.element_size() for p in params.values())


def test_muon_token_keeps_no_per_token_matrices_for_the_backward():
    """What the backward keeps grows linearly in T (the same per token from 64 to 128 tokens as from
    128 to 256) by the chunk-start states (2 copies of the memory's matrices per chunk) and less than
    0.15 of a copy per token besides (inputs, gates, coefficient rows): each chunk's b momenta,
    their orthogonalised copies and the Newton-Schulz intermediates are recomputed in the backward,
    not kept (kept, they were about 13 copies per token). Per token it falls with the chunk size."""
    per_token = {}
    for chunk_size in (4, 16):
        (s64, copy), (s128, _), (s256, _) = (_saved_bytes(seq, chunk_size) for seq in (64, 128, 256))
        growth = [(s128 - s64) / 64, (s256 - s128) / 128]
        assert abs(growth[1] - growth[0]) <= 0.02 * growth[0], (chunk_size, growth)
        assert growth[1] <= (2 / chunk_size + 0.15) * copy, (chunk_size, growth, copy)
        per_token[chunk_size] = growth[1]
    assert per_token[16] <= per_token[4], per_token


def test_newton_schulz_batched_matches_the_iteration():
    """The chunk form's batched Newton-Schulz (the Gram-space iteration for wide matrices, the fused
    one for nearly square ones) is Muon's iteration: values and gradients (float64)."""
    from deepmemory.ops.chunk import newton_schulz_batched

    g = torch.Generator().manual_seed(5)
    for shape in [(3, 4, 9), (3, 9, 4), (3, 6, 6), (3, 5, 7), (3, 7, 5), (2, 3, 1, 12)]:
        for steps in (0, 1, 5):
            x = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
            proj = torch.randn(shape, dtype=torch.float64, generator=g)
            ref = newton_schulz(x, steps)
            (g_ref,) = torch.autograd.grad((ref * proj).sum(), x)
            out = newton_schulz_batched(x, steps)
            (g_out,) = torch.autograd.grad((out * proj).sum(), x)
            assert out.shape == ref.shape and rel_err(out, ref) <= 1e-12, (shape, steps)
            assert rel_err(g_out, g_ref) <= 1e-10, (shape, steps)
