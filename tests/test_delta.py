"""Gated DeltaNet: the rule option ``decay_first``, the WY form of the delta rule (ops/delta.py) and
the layer's Mamba-2 decay gate, against the token loop and against the gated delta rule written
out here from the paper (S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from ops_cases import make_inputs, make_params, rel_err
from test_causality import _check_op, _op, _poison, _same_before
from test_ops import DK, DV, _compare, _run

from deepmemory.layers import NeuralMemory
from deepmemory.models import DeepMemoryConfig, build, preset_config
from deepmemory.models.presets import SIZES
from deepmemory.ops import ARCHITECTURES, UpdateRule, delta, neural_memory

DELTA = dict(architecture="linear", loss="l2", optimizer="gd", window=1, chunk_size=1)
BLOCKS = (1, 4, 16, 32, 64)


def _inputs(seq, variant, seed=0, bsz=2, nh=2, dk=DK, dv=DV):
    """Random float64 inputs; ``variant`` picks the forgetting: ``none`` (decay 0), ``some``
    (random in [0, 0.2]) or ``extremes`` (also exact 0 and 1: a wiped memory, ``log 0``)."""
    q, k, v, lr, mom, dec, gamma = make_inputs(bsz, seq, nh, dk, dv, optimizer="gd", seed=seed)
    if variant == "none":
        dec = torch.zeros_like(dec)
    elif variant == "extremes":
        g = torch.Generator().manual_seed(seed + 5)
        pick = torch.rand(dec.shape, generator=g, dtype=torch.float64)
        dec = torch.where(pick < 0.1, 1.0, torch.where(pick < 0.3, 0.0, dec))
    return q, k, v, lr, mom, dec, gamma


def _assert_same(got, want, tol=1e-10):
    (o, st, g), (o_ref, st_ref, g_ref) = got, want
    assert rel_err(o, o_ref) <= tol, "outputs"
    for group in ("weights", "momentum", "chunk_weights", "chunk_momentum"):
        assert rel_err(getattr(st, group)["w0"], getattr(st_ref, group)["w0"]) <= tol, f"final_state.{group}"
    for n, want_g in (g_ref or {}).items():
        if want_g is None:  # momentum: gd takes none
            assert g[n] is None or g[n].abs().max() == 0, n
            continue
        assert want_g.abs().max() > 0, f"grad {n} vanished in the reference"
        assert rel_err(g[n], want_g) <= tol, f"grad {n}"


# ---- the WY form against the token loop -----------------------------------------------------------


@pytest.mark.parametrize("seq", [1, 7, 63, 100, 257])
@pytest.mark.parametrize("variant,decay_first", [("none", True), ("some", False), ("some", True), ("extremes", True)])
def test_wy_form_equals_the_token_loop(seq, variant, decay_first, monkeypatch):
    """Outputs, final states and the gradients of q, k, v, lr, decay, the window gate and W_0, at
    every WY block size (the reference is computed once)."""
    kw = dict(DELTA, decay_first=decay_first)
    inputs = _inputs(seq, variant, seed=seq)
    params = make_params("linear", 2, DK, DV, 0, batch=2, gen=torch.Generator().manual_seed(seq + 1))
    want = _run("reference", inputs, params, grad=True, **kw)
    for block in BLOCKS:
        monkeypatch.setattr(delta, "BLOCK", block)
        _assert_same(_run("chunk", inputs, params, grad=True, **kw), want)


@pytest.mark.parametrize("block", [4, 64])
@pytest.mark.parametrize("decay_first", [False, True])
def test_wy_form_streams_at_any_split(block, decay_first, monkeypatch):
    """Pieces with the carried state give one call's outputs and state: cuts inside and on block
    boundaries, and token by token (decoding)."""
    monkeypatch.setattr(delta, "BLOCK", block)
    seq, kw = 19, dict(DELTA, decay_first=decay_first)
    q, k, v, lr, _, dec, gamma = _inputs(seq, "some")
    params = make_params("linear", 2, DK, DV, 0)
    o, st = neural_memory(q, k, v, lr, None, dec, params, window_gate=gamma, output_final_state=True, **kw)
    for cuts in ([1], [4], [8, 9], [3, 11, 12], list(range(1, seq))):
        outs, state, prev = [], None, 0
        for cut in cuts + [seq]:
            sl = slice(prev, cut)
            oi, state = neural_memory(
                q[:, sl],
                k[:, sl],
                v[:, sl],
                lr[:, sl],
                None,
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
        for group in ("weights", "momentum"):
            assert rel_err(getattr(state, group)["w0"], getattr(st, group)["w0"]) <= 1e-10, (cuts, group)


@pytest.mark.parametrize("decay_first", [False, True])
def test_wy_form_streamed_gradients_equal_one_call(decay_first, monkeypatch):
    """The backward through pieces with the carried state (not detached) gives one call's gradients."""
    monkeypatch.setattr(delta, "BLOCK", 4)
    seq, kw = 19, dict(DELTA, decay_first=decay_first)
    base = _inputs(seq, "some")
    params = make_params("linear", 2, DK, DV, 0)

    def grads(cuts):
        q, k, v, lr, dec = (x.detach().requires_grad_() for x in (base[0], base[1], base[2], base[3], base[5]))
        w0 = params["w0"].detach().requires_grad_()
        outs, state, prev = [], None, 0
        for cut in cuts + [seq]:
            sl = slice(prev, cut)
            oi, state = neural_memory(
                q[:, sl],
                k[:, sl],
                v[:, sl],
                lr[:, sl],
                None,
                dec[:, sl],
                {"w0": w0},
                initial_state=state,
                output_final_state=True,
                **kw,
            )
            outs.append(oi)
            prev = cut
        o = torch.cat(outs, 1)
        g = torch.Generator().manual_seed(6)
        loss = (o * torch.randn(o.shape, dtype=o.dtype, generator=g)).sum()
        loss = loss + (state.weights["w0"] * torch.randn(state.weights["w0"].shape, dtype=o.dtype, generator=g)).sum()
        return torch.autograd.grad(loss, (q, k, v, lr, dec, w0))

    want = grads([])
    for cuts in ([5], [3, 11, 12], list(range(1, seq))):
        for name, a, b in zip(("q", "k", "v", "lr", "decay", "w0"), grads(cuts), want):
            assert rel_err(a, b) <= 1e-10, (cuts, name)


def test_decay_first_changes_the_rule_and_the_dispatch(monkeypatch):
    """decay_first is another rule (unless nothing is forgotten), and impl='chunk' computes the
    delta rule at chunk size 1 in the WY form, without any call of the general form (whose
    per-chunk gradients are made to fail here)."""
    from deepmemory.ops import chunk as chunk_module

    def general_form(*args, **kwargs):
        raise AssertionError("the general chunked form ran")

    monkeypatch.setattr(chunk_module, "token_gradients", general_form)
    q, k, v, lr, _, dec, gamma = _inputs(30, "some")
    params = make_params("linear", 2, DK, DV, 0)
    first, _ = neural_memory(q, k, v, lr, None, dec, params, decay_first=True, **DELTA)
    after, _ = neural_memory(q, k, v, lr, None, dec, params, **DELTA)
    assert rel_err(first, after) > 1e-3
    same_a, _ = neural_memory(q, k, v, lr, None, None, params, decay_first=True, **DELTA)
    same_b, _ = neural_memory(q, k, v, lr, None, None, params, **DELTA)
    assert torch.equal(same_a, same_b)
    assert delta.is_delta_rule(UpdateRule(decay_first=True, **DELTA))
    assert not delta.is_delta_rule(UpdateRule(**dict(DELTA, chunk_size=4)))
    assert not delta.is_delta_rule(UpdateRule(**dict(DELTA, layer_norm=True)))
    with pytest.raises(AssertionError, match="the general chunked form ran"):  # the probe can fail
        neural_memory(q, k, v, lr, None, dec, params, **dict(DELTA, chunk_size=4))


def test_preset_runs_in_the_wy_form(monkeypatch):
    """The gated-deltanet preset's layers take the WY form: the general form is never entered."""
    from deepmemory.ops import chunk as chunk_module

    calls = []
    monkeypatch.setattr(chunk_module, "delta_rule", lambda p, wy=chunk_module.delta_rule: calls.append(1) or wy(p))
    monkeypatch.setattr(chunk_module, "token_gradients", lambda *a, **k: pytest.fail("the general chunked form ran"))
    torch.manual_seed(0)
    model = build("gated-deltanet", vocab_size=64)
    model(torch.randint(0, 64, (1, 40))).logits.sum().backward()
    assert len(calls) == model.config.num_hidden_layers


# ---- the gated delta rule, written out from the paper ---------------------------------------------


def gated_delta_rule(q, k, v, beta, alpha, s0):
    """Gated DeltaNet token by token: ``S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T``,
    ``o_t = S_t q_t``. ``q, k [B, T, H, dk]``, ``v [B, T, H, dv]``, ``beta, alpha [B, T, H]``,
    ``s0 [B, H, dv, dk]`` -> ``o [B, T, H, dv]``, ``S_T``."""
    eye = torch.eye(k.shape[-1], dtype=k.dtype)
    s, outs = s0, []
    for t in range(q.shape[1]):
        kt, vt, b, a = k[:, t], v[:, t], beta[:, t, :, None, None], alpha[:, t, :, None, None]
        s = a * s @ (eye - b * kt[..., :, None] * kt[..., None, :]) + b * vt[..., :, None] * kt[..., None, :]
        outs.append((s @ q[:, t, ..., None])[..., 0])
    return torch.stack(outs, 1), s


@pytest.mark.parametrize("block", [4, 64])
def test_op_is_the_gated_delta_rule(block, monkeypatch):
    """Outputs, final state and the gradients of every input against the recurrence above."""
    monkeypatch.setattr(delta, "BLOCK", block)
    inputs = _inputs(37, "extremes", seed=3)
    q, k, v, beta, dec = (x.detach().requires_grad_() for x in (inputs[0], inputs[1], inputs[2], inputs[3], inputs[5]))
    s0 = make_params("linear", 2, DK, DV, 0, batch=2, gen=torch.Generator().manual_seed(4))["w0"].requires_grad_()
    want, s_want = gated_delta_rule(q, k, v, beta, 1 - dec, s0)
    got, st = neural_memory(q, k, v, beta, None, dec, {"w0": s0}, decay_first=True, output_final_state=True, **DELTA)
    assert rel_err(got, want) <= 1e-12 and rel_err(st.weights["w0"], s_want) <= 1e-12
    g = torch.Generator().manual_seed(5)
    probe = (
        torch.randn(got.shape, dtype=got.dtype, generator=g),
        torch.randn(s_want.shape, dtype=got.dtype, generator=g),
    )
    leaves = (q, k, v, beta, dec, s0)
    grads_want = torch.autograd.grad((want * probe[0]).sum() + (s_want * probe[1]).sum(), leaves)
    grads_got = torch.autograd.grad((got * probe[0]).sum() + (st.weights["w0"] * probe[1]).sum(), leaves)
    for name, a, b in zip(("q", "k", "v", "beta", "decay", "s0"), grads_got, grads_want):
        assert rel_err(a, b) <= 1e-10, name


def _gdn_layer(seed=0):
    torch.manual_seed(seed)
    layer = NeuralMemory(
        32,
        2,
        8,
        architecture="linear",
        residual=False,
        optimizer="gd",
        loss="l2",
        chunk_size=1,
        decay_first=True,
        decay_gate="mamba2",
    ).double()
    with torch.no_grad():  # away from the initialisation: every term matters
        for lin in (layer.lr_proj, layer.decay_proj):
            lin.weight.normal_(std=0.3)
        layer.initial_weights["w0"].normal_(std=0.3)
    return layer


@pytest.mark.parametrize("seq", [23, 70])  # one WY block of 32, and three
def test_layer_is_gated_deltanet(seq):
    """The layer's gates in Gated DeltaNet's parametrisation, beta = sigmoid(x W_beta) and
    g = -exp(A_log) softplus(x W_a + dt_bias), run through the recurrence above: the layer's output."""
    layer = _gdn_layer()
    x = torch.randn(2, seq, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    q, k, v, _ = layer.qkv(x, None)
    beta = torch.sigmoid(F.linear(x, layer.lr_proj.weight, layer.lr_proj.bias))
    g = -torch.exp(layer.A_log) * F.softplus(F.linear(x, layer.decay_proj.weight, layer.decay_proj.bias))
    s0 = layer.initial_weights["w0"].expand(2, -1, -1, -1)
    y, _ = gated_delta_rule(q, k, v, beta, torch.exp(g), s0)
    torch.testing.assert_close(layer(x), layer.output(x, y), rtol=1e-10, atol=1e-12)
    assert layer.A_log.shape == (2,) and g.max() < 0


def test_layer_streams_and_its_gates_start_as_mamba2():
    layer = _gdn_layer()
    x = torch.randn(1, 13, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    full = layer(x)
    y1, st = layer(x[:, :6], return_state=True)
    y2 = layer(x[:, 6:], state=st)
    torch.testing.assert_close(torch.cat([y1, y2], 1), full, rtol=1e-10, atol=1e-12)
    fresh = NeuralMemory(32, 4, 8, decay_gate="mamba2")
    retention = torch.exp(-fresh.A_log.exp() * F.softplus(fresh.decay_proj.bias))
    assert (fresh.A_log.exp() >= 1).all() and (fresh.A_log.exp() <= 16).all()
    assert (retention > 0.19).all() and (retention < 1).all()


# ---- the general forms under decay_first (every memory, at chunk size 1) --------------------------


@pytest.mark.parametrize(
    "memory,loss,optimizer,window",
    [
        p if p[0] == "mlp" or p[1:] == ("l2", "momentum", 1) else pytest.param(*p, marks=pytest.mark.slow)
        for p in itertools.product(ARCHITECTURES, ("l2", "dot"), ("gd", "momentum", "muon"), (1, 3))
    ],
)
def test_decay_first_chunk_equals_reference(memory, loss, optimizer, window):
    kw = dict(architecture=memory, loss=loss, optimizer=optimizer, window=window, chunk_size=1, decay_first=True)
    _compare(kw, seq=9, all_grads_live=True)


# ---- causality, settings, precision ------------------------------------------------------------------


@pytest.mark.parametrize("block", [4, 64])
@pytest.mark.parametrize("decay_first", [False, True])
def test_wy_form_is_causal_for_any_input(block, decay_first, monkeypatch):
    monkeypatch.setattr(delta, "BLOCK", block)
    kw = dict(DELTA, granularity="token", decay_first=decay_first)
    _check_op("chunk", kw)
    _check_op("chunk", kw, values=(1e30, -1e30), dtype=torch.float32)  # overflows inside the solve


def test_wy_form_state_before_a_bad_token_is_clean(monkeypatch):
    monkeypatch.setattr(delta, "BLOCK", 4)
    kw = dict(DELTA, granularity="token", decay_first=True)
    ins = [x for x in _inputs(11, "some")]
    params = make_params("linear", 2, DK, DV, 0, gen=torch.Generator().manual_seed(1))
    bad = _poison(ins, "k", float("nan"))
    c1, cst1 = _op("chunk", [x[:, :5] for x in ins], params, kw)
    c2, _ = _op("chunk", [x[:, 5:] for x in ins], params, kw, initial_state=cst1)
    o1, st1 = _op("chunk", [x[:, :5] for x in bad], params, kw)
    o2, st2 = _op("chunk", [x[:, 5:] for x in bad], params, kw, initial_state=st1)
    assert torch.equal(st1.weights["w0"], cst1.weights["w0"]) and torch.equal(st1.momentum["w0"], cst1.momentum["w0"])
    _same_before(torch.cat([o1, o2], 1), torch.cat([c1, c2], 1), 6, "stream cut at 5")
    assert not torch.isfinite(st2.weights["w0"][0, 1]).all() and torch.isfinite(st2.weights["w0"][1]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wy_form_low_precision(dtype):
    inputs = [x.to(dtype).double() for x in _inputs(70, "some")]
    params = make_params("linear", 2, DK, DV, 0)
    kw = dict(DELTA, decay_first=True)
    o64, _ = neural_memory(*inputs[:4], None, inputs[5], params, window_gate=inputs[6], **kw)
    low = [x.to(dtype).requires_grad_() for x in inputs]
    o, st = neural_memory(
        *low[:4], None, low[5], {"w0": params["w0"].float()}, window_gate=low[6], output_final_state=True, **kw
    )
    assert o.dtype == dtype and st.weights["w0"].dtype == torch.float32
    assert rel_err(o.double(), o64) <= (1e-5 if dtype == torch.float32 else 1e-2)
    o.float().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in low if x.grad is not None)


@pytest.mark.parametrize(
    "make,exc,words",
    [
        (
            lambda: UpdateRule(decay_first=True),
            ValueError,
            "decay_first (forget, then take the gradient) is defined "
            "token by token: it needs chunk_size=1 and granularity='token'; got chunk_size=64, granularity='token'",
        ),
        (lambda: UpdateRule(chunk_size=1, granularity="chunk", decay_first=True), ValueError, "granularity='chunk'"),
        (lambda: UpdateRule(chunk_size=1, decay_first=1), TypeError, "decay_first must be a bool; got int 1"),
        (lambda: NeuralMemory(32, 2, 8, decay_first=True), ValueError, "got chunk_size=16"),
        (
            lambda: NeuralMemory(32, 2, 8, decay_gate="softplus"),
            ValueError,
            "decay_gate must be one of 'sigmoid', 'mamba2'; got 'softplus'",
        ),
        (
            lambda: NeuralMemory(32, 2, 8, decay_gate="mamba2", use_decay=False),
            ValueError,
            "decay_gate='mamba2' shapes the forget gate: it needs use_decay=True",
        ),
        (
            lambda: DeepMemoryConfig(layer_pattern="memory", memory={"decay_gate": 2}),
            ValueError,
            "memory['decay_gate']",
        ),
        (lambda: preset_config("gated-deltanet", memory={"chunk_size": 4}), ValueError, "got chunk_size=4"),
    ],
)
def test_bad_settings_raise_one_line(make, exc, words):
    with pytest.raises(exc, match=__import__("re").escape(words)) as err:
        make()
    assert "\n" not in str(err.value)


@pytest.mark.kernels
def test_triton_refuses_decay_first():
    pytest.importorskip("triton", reason="impl='triton' needs the kernels extra")
    q, k, v, lr, _, dec, _ = (x.float() for x in _inputs(5, "some"))
    with pytest.raises(ValueError, match="impl='triton' does not support decay_first"):
        neural_memory(q, k, v, lr, None, dec, {"w0": torch.zeros(2, DV, DK)}, decay_first=True, impl="triton", **DELTA)


# ---- the preset -------------------------------------------------------------------------------------


def test_preset_is_exactly_online_at_every_size():
    for size in SIZES:
        config = preset_config("gated-deltanet", size)
        assert config.rule == UpdateRule(decay_first=True, residual=False, **DELTA), size
        assert config.memory["decay_gate"] == "mamba2" and config.memory.get("max_lr", 1.0) == 1.0
    assert DeepMemoryConfig.from_dict(config.to_dict()).memory == config.memory
    # (cached decoding = one pass: tests/test_models.py runs every preset, gated-deltanet included)


@pytest.mark.slow
def test_wy_form_compiles_without_graph_breaks():
    """torch.compile captures the WY form whole (fullgraph), forward and backward."""
    inputs = [x.requires_grad_() for x in _inputs(45, "some")]
    w0 = make_params("linear", 2, DK, DV, 0)["w0"]

    def f(q, k, v, lr, mom, dec, gamma):
        return neural_memory(q, k, v, lr, None, dec, {"w0": w0}, window_gate=gamma, decay_first=True, **DELTA)[0]

    eager = f(*inputs)
    (g_eager,) = torch.autograd.grad(eager.sum(), inputs[1])
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(*inputs)
    (g_comp,) = torch.autograd.grad(compiled.sum(), inputs[1])
    assert rel_err(compiled, eager) <= 1e-12 and rel_err(g_comp, g_eager) <= 1e-12
