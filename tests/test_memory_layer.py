import itertools

import pytest
import torch
import torch.nn.functional as F

from deepmemory.layers import NeuralMemory, NeuralMemoryState
from deepmemory.ops import MemoryState
from deepmemory.tree import tensors

HID, NH, HD = 32, 2, 8


def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("chunk_size", 4)
    layer = NeuralMemory(HID, NH, HD, **kw).double()
    # move gates and the memory away from their init so that every term matters
    with torch.no_grad():
        for name in ("lr_proj", "momentum_proj", "decay_proj", "gamma_proj"):
            lin = getattr(layer, name)
            if lin is not None:
                lin.weight.normal_(std=0.3)
                lin.bias.uniform_(-1.5, 1.5)
        for w in layer.initial_weights.values():
            w.normal_(std=0.7 / w.shape[-1] ** 0.5)
        if hasattr(layer.phi, "coef"):
            layer.phi.coef.mul_(torch.empty_like(layer.phi.coef).uniform_(0.5, 1.5))
    return layer


def _x(t=19, b=2, seed=1):
    torch.manual_seed(seed)
    return torch.randn(b, t, HID, dtype=torch.float64)


def test_benchmark_constructor_shapes():
    layer = NeuralMemory(
        hidden_size=256,
        num_heads=4,
        head_dim=64,
        chunk_size=16,
        architecture="mlp",
        depth=2,
        expansion=4,
        optimizer="momentum",
        granularity="token",
    )
    x = torch.randn(1, 5, 256)
    y, state = layer(x, return_state=True)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert isinstance(state, NeuralMemoryState) and isinstance(state.recurrent_state, MemoryState)
    assert layer.initial_weights["w0"].shape == (4, 256, 64) and layer.initial_weights["w1"].shape == (4, 64, 256)
    assert all(c.shape == (1, 3, 256) for c in state.conv)


def test_only_used_gates_exist():
    assert NeuralMemory(HID, NH, HD, optimizer="gd").momentum_proj is None
    assert NeuralMemory(HID, NH, HD, use_decay=False).decay_proj is None
    assert NeuralMemory(HID, NH, HD, window=1).gamma_proj is None
    assert NeuralMemory(HID, NH, HD, window=3, learned_window_gate=False).gamma_proj is None
    full = NeuralMemory(HID, NH, HD, window=3, optimizer="muon")
    assert all(getattr(full, n) is not None for n in ("lr_proj", "momentum_proj", "decay_proj", "gamma_proj"))


def test_initial_gates():
    layer = NeuralMemory(HID, NH, HD, window=2, max_lr=0.5)
    x = torch.zeros(1, 1, HID)
    torch.testing.assert_close(0.5 * torch.sigmoid(layer.lr_proj(x)), torch.full((1, 1, NH), 0.05))
    torch.testing.assert_close(torch.sigmoid(layer.momentum_proj(x)), torch.full((1, 1, NH), 0.9))
    torch.testing.assert_close(torch.sigmoid(layer.decay_proj(x)), torch.full((1, 1, NH), 0.01))
    torch.testing.assert_close(torch.sigmoid(layer.gamma_proj(x)), torch.full((1, 1, NH), 0.95))


COMBOS = list(
    itertools.product(
        ("linear", "mlp", "gated_mlp"), ("gd", "momentum", "muon"), ("token", "chunk"), ("identity", "polynomial")
    )
)


@pytest.mark.parametrize("memory,optimizer,granularity,feature_map", COMBOS)
def test_every_combination_forward_backward(memory, optimizer, granularity, feature_map):
    layer = NeuralMemory(
        HID,
        NH,
        HD,
        chunk_size=4,
        architecture=memory,
        optimizer=optimizer,
        granularity=granularity,
        feature_map=feature_map,
        window=2,
    )
    x = torch.randn(2, 9, HID, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.pow(2).mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for n, p in layer.named_parameters() if n.startswith("initial_weights"))


CONFIGS = [
    dict(),
    dict(loss="dot", optimizer="gd", feature_map="polynomial"),
    dict(window=3, feature_map="polynomial"),
    dict(window=2, feature_map="polynomial", poly_constant=True, layer_norm=True),
    dict(optimizer="muon", window=2, architecture="gated_mlp"),
    dict(granularity="chunk", optimizer="muon", feature_map="polynomial"),
    dict(architecture="linear", use_decay=False, optimizer="gd", window=3, learned_window_gate=False),
    dict(depth=3, activation="silu", conv_size=0),
    dict(window=2, channel_lr_rank=3),
    dict(architecture="linear", optimizer="gd", chunk_size=1, decay_first=True, channel_lr_rank=2),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_chunk_equals_reference_through_layer(cfg):
    x = _x(t=11, b=1)
    fast = _layer(**cfg)
    slow = _layer(**cfg, impl="reference")
    y_fast, s_fast = fast(x, return_state=True)
    y_slow, s_slow = slow(x, return_state=True)
    torch.testing.assert_close(y_fast, y_slow, rtol=1e-9, atol=1e-10)
    for n in s_fast.recurrent_state.weights:
        torch.testing.assert_close(
            s_fast.recurrent_state.weights[n], s_slow.recurrent_state.weights[n], rtol=1e-9, atol=1e-10
        )


@pytest.mark.parametrize("cfg", CONFIGS)
def test_streaming_equals_one_call(cfg):
    x = _x(t=21)
    layer = _layer(**cfg)
    full = layer(x)
    for splits in ([1, 6, 8, 13], [4, 9, 20], [2, 3, 17]):  # ends inside chunks and on boundaries
        outs, state = [], None
        for lo, hi in zip([0] + splits, splits + [x.shape[1]]):
            y, state = layer(x[:, lo:hi], state=state, return_state=True)
            outs.append(y)
            state = state.detach()
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


def _mlp(weights, x, act):
    """h(x) = W1 act(W0 x) for weights [B, H, rows, cols] and x [B, H, dk]."""
    z = torch.einsum("bhrc,bhc->bhr", weights["w0"], x)
    return torch.einsum("bhrc,bhc->bhr", weights["w1"], act(z))


@pytest.mark.parametrize(
    "loss,optimizer,window,degree",
    [("l2", "momentum", 1, 2), ("l2", "gd", 3, 3), ("dot", "momentum", 2, 2), ("l2", "momentum", 2, 1)],
)
def test_feature_map_residual_equals_direct_computation(loss, optimizer, window, degree):
    """M(x) = x + W1 gelu(W0 phi(x)) trained token by token with autograd on the loss written out."""
    layer = _layer(
        loss=loss,
        optimizer=optimizer,
        window=window,
        feature_map="polynomial",
        poly_degree=degree,
        chunk_size=3,
        step_bound=None,
    )  # the papers' rule (the layer's stale-step bound off)
    assert layer.outer_residual
    x = _x(t=10)
    bsz, seq = x.shape[:2]
    with torch.no_grad():
        q, k, v, _ = layer.qkv(x, None)
        fq, fk = layer.phi(q), layer.phi(k)
        lr = torch.sigmoid(layer.lr_proj(x))
        mom = torch.sigmoid(layer.momentum_proj(x)) if layer.momentum_proj is not None else torch.zeros_like(lr)
        dec = torch.sigmoid(layer.decay_proj(x))
        gam = torch.sigmoid(layer.gamma_proj(x)) if layer.gamma_proj is not None else torch.ones_like(lr)
        if optimizer == "momentum":  # damped momentum (the default): theta_t = lr_t (1 - momentum_t)
            lr = lr * (1 - mom)
    w = {n: p.detach().expand(bsz, *p.shape).clone() for n, p in layer.initial_weights.items()}
    s = {n: torch.zeros_like(t) for n, t in w.items()}
    ys = []
    for t in range(seq):
        if t % layer.rule.chunk_size == 0:
            w_start = {n: t_.detach().clone().requires_grad_() for n, t_ in w.items()}
        total = 0
        for i in range(max(0, t - window + 1), t + 1):
            pred = k[:, i] + _mlp(w_start, fk[:, i], F.gelu)
            per = 0.5 * (pred - v[:, i]).pow(2).sum(-1) if loss == "l2" else -(pred * v[:, i]).sum(-1)
            total = total + (gam[:, i] * per).sum()
        grads = dict(zip(w_start, torch.autograd.grad(total, list(w_start.values()))))
        for n in w:
            s[n] = mom[:, t, :, None, None] * s[n] - lr[:, t, :, None, None] * grads[n]
            w[n] = (1 - dec[:, t, :, None, None]) * w[n] + s[n]
        ys.append(q[:, t] + _mlp(w, fq[:, t], F.gelu))
    want = layer.output(x, torch.stack(ys, 1))
    torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "cfg", [dict(), dict(feature_map="polynomial"), dict(architecture="linear", feature_map="polynomial")]
)
def test_read_equals_memory_applied_to_q(cfg):
    layer = _layer(**cfg)
    x = _x(t=9)
    _, state = layer(x, return_state=True)
    torch.manual_seed(5)
    q = F.normalize(torch.randn(2, 6, NH, HD, dtype=torch.float64), dim=-1)
    fq = layer.phi(q).transpose(1, 2)  # [B, H, T, D]
    for weights, st in (
        (state.recurrent_state.weights, state),
        ({n: p.expand(2, *p.shape) for n, p in layer.initial_weights.items()}, None),
    ):
        if layer.rule.architecture == "linear":
            want = torch.einsum("bhrc,bhtc->bhtr", weights["w0"], fq)
        else:
            z = torch.einsum("bhrc,bhtc->bhtr", weights["w0"], fq)
            want = torch.einsum("bhrc,bhtc->bhtr", weights["w1"], F.gelu(z)) + q.transpose(1, 2)
        torch.testing.assert_close(layer.read(q, st), want.transpose(1, 2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "dtype,autocast",
    [(torch.float32, False), (torch.float64, False), (torch.float32, True)],
    ids=["float32", "float64", "autocast-bfloat16"],
)
def test_gates_in_the_op_ranges_by_construction(monkeypatch, dtype, autocast):
    """The layer's gates are sigmoids (``lr = max_lr * sigmoid``): inside the op's ranges (lr >= 0;
    momentum, decay, window_gate in [0, 1]) for any input, however large: they saturate at exactly
    0 and 1 (max_lr) and never pass them, so the op's range check never fires from the layer."""
    from deepmemory.layers import memory_layer

    seen = []
    op = memory_layer.neural_memory

    def spy(q, k, v, lr, momentum, decay, weights, **kw):
        seen.append(dict(lr=lr, momentum=momentum, decay=decay, window_gate=kw["window_gate"]))
        return op(q, k, v, lr, momentum, decay, weights, **kw)

    monkeypatch.setattr(memory_layer, "neural_memory", spy)
    torch.manual_seed(0)
    layer = NeuralMemory(HID, NH, HD, chunk_size=4, window=3, optimizer="momentum", max_lr=0.5).to(dtype)
    with torch.no_grad():
        for name in ("lr_proj", "momentum_proj", "decay_proj", "gamma_proj"):
            getattr(layer, name).weight.normal_(std=10.0)
            getattr(layer, name).bias.uniform_(-50.0, 50.0)
    x = 1e6 * torch.randn(2, 64, HID, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        layer(x)  # the op checks the ranges: a gate outside them would raise here
    (gates,) = seen
    for name, g in gates.items():
        high = 0.5 if name == "lr" else 1.0
        assert g is not None and not g.isnan().any(), name
        assert ((g >= 0) & (g <= high)).all(), name
        assert (g == 0).any() and (g == high).any(), f"{name} did not saturate: the test inputs are not large enough"


def test_state_detach():
    layer = NeuralMemory(HID, NH, HD, chunk_size=4)
    _, state = layer(torch.randn(1, 6, HID), return_state=True)
    assert state.recurrent_state.weights["w0"].requires_grad
    d = state.detach()
    assert not any(t.requires_grad for t in tensors(d.recurrent_state))
    assert not any(c.requires_grad for c in d.conv)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(architecture="tree"), ValueError, "architecture"),
        (dict(depth=0), ValueError, "depth"),
        (dict(window=0), ValueError, "window"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(loss="l1"), ValueError, "loss"),
        (dict(optimizer="adam"), ValueError, "optimizer"),
        (dict(granularity="seq"), ValueError, "granularity"),
        (dict(feature_map="exp"), ValueError, "feature_map"),
        (dict(poly_degree=0), ValueError, "poly_degree"),
        (dict(max_lr=0.0), ValueError, "max_lr"),
        (dict(conv_size=-1), ValueError, "conv_size"),
        (dict(activation="elu"), ValueError, "activation"),
        (dict(impl="fast"), ValueError, "impl"),
        (dict(residual="yes"), TypeError, "residual"),
        (dict(ns_steps=1.5), TypeError, "ns_steps"),
    ],
)
def test_constructor_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        NeuralMemory(HID, NH, HD, **kw)


def test_input_errors():
    layer = NeuralMemory(HID, NH, HD)
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(2, 5, HID + 1))
    with pytest.raises(TypeError, match="state"):
        layer(torch.randn(2, 5, HID), state=object())
    with pytest.raises(ValueError, match="q must be"):
        layer.read(torch.randn(2, 5, NH, HD + 1))
    with pytest.raises(TypeError, match="hidden_size"):
        NeuralMemory(32.0, NH, HD)


def test_state_map_selects_batch_rows():
    layer = _layer(window=2)
    x = _x(t=10, b=3)
    _, state = layer(x[:, :6], return_state=True)
    full = layer(x[:, 6:], state=state)
    sub = layer(x[1:, 6:], state=state.map(lambda t: t[1:]))
    torch.testing.assert_close(sub, full[1:], rtol=1e-12, atol=1e-12)
