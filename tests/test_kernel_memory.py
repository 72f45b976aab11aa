import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

from deepmemory.layers import KernelMemory, KernelMemoryState
from deepmemory.ops import KERNEL_IMPLS, KernelRule, KernelState, kernel_memory
from deepmemory.tree import State, tensors

B, H, D = 2, 2, 5


def _op(q, k, v, lr, weights, scale, *, initial_state=None, output_final_state=False, impl="chunk", **rule):
    """``kernel_memory`` in the heads-first layout ``[B, H, T, D]`` of the first tests."""
    y, st = kernel_memory(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        lr.transpose(1, 2),
        weights,
        scale,
        rule=KernelRule(**rule),
        initial_state=initial_state,
        output_final_state=output_final_state,
        impl=impl,
    )
    return y.transpose(1, 2), st


def _qkv(t, seed=0, dv=D):
    g = torch.Generator().manual_seed(seed)
    q = 0.6 * torch.randn(B, H, t, D, generator=g, dtype=torch.float64)
    k = 0.6 * torch.randn(B, H, t, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, t, dv, generator=g, dtype=torch.float64)
    lr = torch.rand(B, H, t, generator=g, dtype=torch.float64) + 0.2
    return q, k, v, lr


def _weights(depth, hidden, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for l in range(1, depth):
        rows = D if l == depth - 1 else hidden
        out[f"w{l}"] = torch.randn(H, rows, hidden, generator=g, dtype=torch.float64) / hidden**0.5
    return out


def _band(t, window):
    i = torch.arange(t)
    mask = i[None, :] <= i[:, None]
    return mask if window is None else mask & (i[None, :] > i[:, None] - window)


@pytest.mark.parametrize("window,chunk", [(None, 1), (None, 4), (3, 4), (6, 16)])
def test_linear_dot_is_unnormalised_attention(window, chunk):
    """window=None: causal attention without its normaliser (ATLAS eq. 26); "swa": its sliding window."""
    q, k, v, _ = _qkv(13)
    scale = torch.tensor([0.7, 1.3], dtype=torch.float64)
    y, _ = _op(
        q,
        k,
        v,
        torch.ones(B, H, 13, dtype=torch.float64),
        {},
        scale,
        depth=1,
        residual=False,
        loss="dot",
        window=window,
        window_rule="swa",
        normalized=False,
        chunk_size=chunk,
    )
    s = torch.exp(scale[:, None, None] * (q @ k.transpose(-1, -2))) * _band(13, window)
    torch.testing.assert_close(y, s @ v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window,chunk", [(None, 3), (4, 5), (1, 2)])
def test_linear_dot_normalised_is_softmax_attention(window, chunk):
    q, k, v, _ = _qkv(17, seed=2)
    y, _ = _op(
        q,
        k,
        v,
        torch.ones(B, H, 17, dtype=torch.float64),
        {},
        torch.full((H,), 0.8, dtype=torch.float64),
        depth=1,
        residual=False,
        loss="dot",
        window=window,
        window_rule="swa",
        normalized=True,
        chunk_size=chunk,
    )
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=_band(17, window), scale=0.8)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 3])
def test_linear_l2_is_delta_rule_transformer(chunk):
    """ATLAS eq. 30-31: M_t = M_{t'} ... + lr_t (v_t - M_{t'} phi*(k_t)) phi*(k_t)^T, in kernel space."""
    q, k, v, lr = _qkv(11, seed=3)
    y, _ = _op(
        q,
        k,
        v,
        lr,
        {},
        torch.ones(H, dtype=torch.float64),
        depth=1,
        residual=False,
        loss="l2",
        window=None,
        normalized=False,
        chunk_size=chunk,
    )
    ker = lambda a, b: torch.exp((a * b).sum(-1, keepdim=True))  # noqa: E731
    stored, ys = [], []
    for t in range(11):
        start = t - t % chunk
        pred = sum((ker(k[:, :, j], k[:, :, t]) * stored[j] for j in range(start)), torch.zeros_like(v[:, :, t]))
        stored.append(lr[:, :, t, None] * (v[:, :, t] - pred))
        ys.append(sum(ker(k[:, :, j], q[:, :, t]) * stored[j] for j in range(t + 1)))
    torch.testing.assert_close(y, torch.stack(ys, 2), rtol=1e-11, atol=1e-11)


def _reference(q, k, v, lr, weights, scale, **cfg):
    """M_t = M_init - sum_{i in I_t} lr_i grad loss_i(M_{t'(i)-1}), token by token (the library's
    reference: deeper matrices materialised, every gradient from autograd)."""
    return _op(q, k, v, lr, weights, scale, impl="reference", **cfg)[0]


DEEP = [
    dict(loss="dot", window=None, normalized=True, depth=2, activation="gelu", residual=True, chunk_size=3),
    dict(
        loss="l2", window=3, window_rule="swa", normalized=True, depth=2, activation="silu", residual=True, chunk_size=4
    ),
    dict(
        loss="dot",
        window=4,
        window_rule="swa",
        normalized=False,
        depth=3,
        activation="tanh",
        residual=True,
        chunk_size=2,
    ),
    dict(loss="l2", window=None, normalized=False, depth=2, activation="gelu", residual=False, chunk_size=1),
    dict(
        loss="l2", window=2, window_rule="swa", normalized=True, depth=1, activation="gelu", residual=True, chunk_size=3
    ),
    dict(
        loss="l2",
        window=3,
        window_rule="omega",
        normalized=True,
        depth=2,
        activation="silu",
        residual=True,
        chunk_size=4,
    ),
    dict(
        loss="dot",
        window=4,
        window_rule="omega",
        normalized=False,
        depth=3,
        activation="tanh",
        residual=True,
        chunk_size=2,
    ),
]


@pytest.mark.parametrize("cfg", DEEP)
def test_deep_memory_equals_token_loop(cfg):
    q, k, v, lr = _qkv(11, seed=4)
    w = _weights(cfg["depth"], 6)
    scale = torch.tensor([0.9, 1.4], dtype=torch.float64)
    y, _ = _op(q, k, v, lr, w, scale, **cfg)
    torch.testing.assert_close(y, _reference(q, k, v, lr, w, scale, **cfg), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg", DEEP)
def test_functional_streaming(cfg):
    q, k, v, lr = _qkv(14, seed=5)
    w = _weights(cfg["depth"], 6)
    scale = torch.tensor([0.9, 1.4], dtype=torch.float64)
    full, _ = _op(q, k, v, lr, w, scale, **cfg)
    outs, st = [], None
    for lo, hi in ((0, 1), (1, 6), (6, 9), (9, 14)):
        y, st = _op(
            q[:, :, lo:hi],
            k[:, :, lo:hi],
            v[:, :, lo:hi],
            lr[:, :, lo:hi],
            w,
            scale,
            **cfg,
            initial_state=st,
            output_final_state=True,
        )
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 2), full, rtol=1e-12, atol=1e-12)
    if cfg["window"] is not None and cfg["window_rule"] == "swa":  # "omega" keeps every key
        assert st.keys.shape[2] <= cfg["window"]


def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("chunk_size", 4)
    layer = KernelMemory(32, 2, 8, **kw).double()
    with torch.no_grad():
        layer.lr_proj.weight.normal_(std=0.3)
        layer.log_temp.uniform_(0.0, 1.0)
    return layer


LAYER_CFGS = [
    dict(),
    dict(window=3),
    dict(loss="l2", window=5),
    dict(depth=1, residual=False, normalized=False),
    dict(depth=3, conv_size=0),
    dict(loss="l2", normalized=False),
    dict(window=3, window_rule="swa"),
    dict(loss="l2", window=4, normalized=False),
]


@pytest.mark.parametrize("cfg", LAYER_CFGS)
def test_layer_streaming_equals_one_call(cfg):
    torch.manual_seed(3)
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    layer = _layer(**cfg)
    full = layer(x)
    for splits in ([1, 6, 8, 13], [4, 9, 20], [3, 17]):
        outs, state = [], None
        for lo, hi in zip([0] + splits, splits + [21]):
            y, state = layer(x[:, lo:hi], state=state, return_state=True)
            outs.append(y)
            state = state.detach()
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "loss,window,normalized,depth", list(itertools.product(("dot", "l2"), (None, 3), (True, False), (1, 2)))
)
def test_layer_forward_backward(loss, window, normalized, depth):
    layer = KernelMemory(32, 2, 8, loss=loss, window=window, normalized=normalized, depth=depth, chunk_size=4)
    x = torch.randn(2, 9, 32, requires_grad=True)
    y, state = layer(x, return_state=True)
    assert y.shape == x.shape and isinstance(state, KernelMemoryState)
    y.pow(2).mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_layer_linear_is_attention_on_its_projections():
    """depth=1, no residual, constant lr = 1 (max_lr=2, zero gate), the papers' rule (no step
    bound): softmax attention on q, k, v."""
    layer = _layer(depth=1, residual=False, max_lr=2.0, step_bound=None)
    with torch.no_grad():
        layer.lr_proj.weight.zero_()
        layer.lr_proj.bias.zero_()
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    q, k, v, _ = layer.qkv(x, None)
    heads = [
        F.scaled_dot_product_attention(
            q[:, :, h : h + 1].transpose(1, 2),
            k[:, :, h : h + 1].transpose(1, 2),
            v[:, :, h : h + 1].transpose(1, 2),
            is_causal=True,
            scale=float(layer.log_temp[h].detach().exp()),
        )
        for h in range(2)
    ]
    want = layer.output(x, torch.cat(heads, 1).transpose(1, 2))
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)


def test_state_detach_and_sizes():
    layer = KernelMemory(32, 2, 8, window=5, window_rule="swa", chunk_size=4)
    _, state = layer(torch.randn(1, 18, 32), return_state=True)
    c = state.recurrent_state
    assert c.keys.shape[2] == 5 and c.signals.shape[2] == 5 and c.evict_signals[0].shape[2] == 5
    assert c.pending_k.shape[2] == 2 and c.weights[0].shape == (1, 2, 8, 32) and c.window_values.shape[2] == 0
    # "omega" keeps every finished token's key and signal, and the values of the last window - 1
    _, state = KernelMemory(32, 2, 8, window=5, chunk_size=4)(torch.randn(1, 18, 32), return_state=True)
    c = state.recurrent_state
    assert c.keys.shape[2] == 16 and c.signals.shape[2] == 16 and c.window_values.shape == (1, 2, 4, 8)
    assert c.evict_signals[0].shape[2] == 0 and c.pending_k.shape[2] == 2
    d = state.detach()
    assert not d.recurrent_state.signals.requires_grad and not d.recurrent_state.weights[0].requires_grad
    assert not any(t.requires_grad for t in d.conv)
    # without a window the deeper matrices need no per-token data: the state is keys, signals, matrices
    _, state = KernelMemory(32, 2, 8, chunk_size=4)(torch.randn(1, 18, 32), return_state=True)
    assert state.recurrent_state.keys.shape[2] == 16 and state.recurrent_state.evict_signals[0].shape[2] == 0


def test_state_from_other_settings_is_rejected():
    q, k, v, lr = _qkv(6)
    w, scale = _weights(2, 6), torch.ones(H, dtype=torch.float64)
    _, st = _op(q, k, v, lr, w, scale, window=3, chunk_size=4, output_final_state=True)
    with pytest.raises(ValueError, match="initial_state was made with"):
        _op(q, k, v, lr, w, scale, window=4, chunk_size=4, initial_state=st)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(window=0), ValueError, "window"),
        (dict(window=2.5), TypeError, "window"),
        (dict(loss="huber"), ValueError, "loss"),
        (dict(depth=0), ValueError, "depth"),
        (dict(expansion=0), ValueError, "expansion"),
        (dict(activation="elu"), ValueError, "activation"),
        (dict(normalized=1), TypeError, "normalized"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(max_lr=-1.0), ValueError, "max_lr"),
    ],
)
def test_constructor_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        KernelMemory(32, 2, 8, **kw)


def test_input_errors():
    layer = KernelMemory(32, 2, 8)
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(2, 5))
    with pytest.raises(TypeError, match="state"):
        layer(torch.randn(2, 5, 32), state="cache")


def test_state_map_selects_batch_rows():
    layer = _layer(window=3, loss="l2")
    x = torch.randn(3, 11, 32, dtype=torch.float64)
    _, state = layer(x[:, :6], return_state=True)
    full = layer(x[:, 6:], state=state)
    sub = layer(x[1:, 6:], state=state.map(lambda t: t[1:]))
    torch.testing.assert_close(sub, full[1:], rtol=1e-12, atol=1e-12)


# --- the op: fast form against the reference, streaming, validation -----------------------------

RULES = [
    KernelRule(loss="dot", window=None, normalized=True, depth=2, activation="gelu"),
    KernelRule(loss="l2", window=5, window_rule="swa", normalized=True, depth=2, activation="gelu"),
    KernelRule(loss="dot", window=3, window_rule="swa", normalized=False, depth=3, activation="tanh"),
    KernelRule(loss="l2", window=None, normalized=False, depth=1, residual=False),
    KernelRule(loss="l2", window=5, window_rule="omega", normalized=False, depth=2, activation="gelu"),
    KernelRule(loss="dot", window=3, window_rule="omega", normalized=True, depth=3, activation="tanh"),
]


def _inputs(t, seed=0, depth=2, hidden=4, b=1, h=2, d=3, requires_grad=False):
    """Random op inputs ``[B, T, H, D]`` in float64 (gates in [0.1, 0.4), nothing zero; small
    enough that the unnormalised l2 rule stays bounded over 100 tokens)."""
    g = torch.Generator().manual_seed(seed)
    q = 0.5 * torch.randn(b, t, h, d, generator=g, dtype=torch.float64)
    k = 0.5 * torch.randn(b, t, h, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, t, h, d, generator=g, dtype=torch.float64)
    lr = 0.3 * torch.rand(b, t, h, generator=g, dtype=torch.float64) + 0.1
    w = {
        f"w{l}": torch.randn(h, d if l == depth - 1 else hidden, hidden, generator=g, dtype=torch.float64) / hidden**0.5
        for l in range(1, depth)
    }
    scale = torch.rand(h, generator=g, dtype=torch.float64) + 0.5
    leaves = [q, k, v, lr, *w.values(), scale]
    for x in leaves:
        x.requires_grad_(requires_grad)
    return (q, k, v, lr, w, scale), leaves


@pytest.mark.parametrize(
    "t,chunk,r",
    [
        (1, 4, 0),
        (7, 1, 1),
        (7, 3, 2),
        (7, 16, 3),
        (63, 8, 0),
        (63, 5, 2),
        (100, 16, 1),
        (100, 7, 3),
        (7, 2, 4),
        (63, 5, 5),
    ],
)
def test_fast_form_equals_reference_forward_backward(t, chunk, r):
    rule = RULES[r].replace(chunk_size=chunk)
    args, leaves = _inputs(t, seed=t + chunk, depth=rule.depth, requires_grad=True)
    ys, grads = [], []
    for impl in KERNEL_IMPLS:
        y, _ = kernel_memory(*args, rule=rule, impl=impl)
        ys.append(y)
        grads.append(torch.autograd.grad((y * torch.cos(y)).sum(), leaves))  # a non-trivial cotangent
    assert torch.isfinite(ys[0]).all() and ys[0].abs().max() > 0
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-10, atol=1e-10)
    for name, a, b in zip(["q", "k", "v", "lr", *args[4], "scale"], *grads):
        if name in ("q", "v", "lr"):  # the others may get no gradient from one token
            assert a.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("r", range(len(RULES)))
@pytest.mark.parametrize("splits", [[1], [4, 5], [3, 11, 12], [2, 9, 16, 22]])
def test_streaming_at_split_points_equals_one_call(r, splits):
    rule = RULES[r].replace(chunk_size=4)
    (q, k, v, lr, w, scale), _ = _inputs(23, seed=r, depth=rule.depth)
    full, end = kernel_memory(q, k, v, lr, w, scale, rule=rule, output_final_state=True)
    outs, st = [], None
    for lo, hi in zip([0] + splits, splits + [23]):
        y, st = kernel_memory(
            q[:, lo:hi],
            k[:, lo:hi],
            v[:, lo:hi],
            lr[:, lo:hi],
            w,
            scale,
            rule=rule,
            initial_state=st,
            output_final_state=True,
        )
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-12, atol=1e-12)
    assert st.seen == 23 and st.pending == 23 % 4 and st.rule == rule
    for a, b in zip(tensors(st), tensors(end)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("r", range(len(RULES)))
def test_reference_streams_and_shares_the_state(r):
    """The reference continues from its own states and from the fast form's (and vice versa)."""
    rule = RULES[r].replace(chunk_size=3)
    (q, k, v, lr, w, scale), _ = _inputs(17, seed=10 + r, depth=rule.depth)
    full, end = kernel_memory(q, k, v, lr, w, scale, rule=rule, impl="reference", output_final_state=True)
    outs, st = [], None
    for (lo, hi), impl in zip([(0, 5), (5, 6), (6, 13), (13, 17)], ["reference", "chunk", "reference", "reference"]):
        y, st = kernel_memory(
            q[:, lo:hi],
            k[:, lo:hi],
            v[:, lo:hi],
            lr[:, lo:hi],
            w,
            scale,
            rule=rule,
            initial_state=st,
            output_final_state=True,
            impl=impl,
        )
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    _, fast_end = kernel_memory(q, k, v, lr, w, scale, rule=rule, output_final_state=True)
    for a, b, c in zip(tensors(st), tensors(end), tensors(fast_end)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


def test_state_is_a_tree_state_with_its_rule():
    rule = KernelRule(window=2, chunk_size=3)
    (q, k, v, lr, w, scale), _ = _inputs(8)
    _, st = kernel_memory(q, k, v, lr, w, scale, rule=rule, output_final_state=True)
    assert isinstance(st, KernelState) and isinstance(st, State) and st.rule is rule
    moved = st.map(lambda t: t[:, :1])
    assert moved.rule is rule and moved.keys.shape[1] == 1 and moved.weights[0].shape[1] == 1
    assert kernel_memory(q, k, v, lr, w, scale, rule=rule)[1] is None


def test_low_precision_computes_in_float32():
    (q, k, v, lr, w, scale), _ = _inputs(9)
    y, st = kernel_memory(
        *(t.to(torch.bfloat16) for t in (q, k, v, lr)), w, scale, rule=KernelRule(chunk_size=4), output_final_state=True
    )
    want, _ = kernel_memory(
        *(t.to(torch.bfloat16).float() for t in (q, k, v, lr)), w, scale, rule=KernelRule(chunk_size=4)
    )
    assert y.dtype == torch.bfloat16 and st.keys.dtype == torch.float32
    torch.testing.assert_close(y, want.to(torch.bfloat16), rtol=0, atol=0)


def test_rule_is_frozen_and_validated():
    rule = KernelRule(window=4, loss="l2")
    assert KernelRule(**rule.to_dict()) == rule and rule.replace(window=None).window is None
    assert KernelRule.from_settings(dict(window=4, loss="l2", max_lr=2.0)) == rule
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.window = 3
    with pytest.raises(TypeError, match="no field"):
        rule.replace(windw=3)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(depth=0), ValueError, "depth must be >= 1; got 0"),
        (dict(depth=2.0), TypeError, "depth must be an int; got float"),
        (dict(activation="elu"), ValueError, "activation must be one of .*; got 'elu'"),
        (dict(residual=1), TypeError, "residual must be a bool; got int"),
        (dict(loss="huber"), ValueError, "loss must be one of 'l2', 'dot'; got 'huber'"),
        (dict(window=0), ValueError, "window must be >= 1; got 0"),
        (dict(window=2.5), TypeError, "window must be an int; got float"),
        (dict(window_rule="sliding"), ValueError, "window_rule must be one of 'omega', 'swa'; got 'sliding'"),
        (dict(normalized="yes"), TypeError, "normalized must be a bool; got str"),
        (dict(chunk_size=0), ValueError, "chunk_size must be >= 1; got 0"),
    ],
)
def test_rule_errors(kw, exc, match):
    with pytest.raises(exc, match=match) as err:
        KernelRule(**kw)
    assert "\n" not in str(err.value)


def _bad(name):
    """Op arguments with one thing wrong, and the error it must raise."""
    (q, k, v, lr, w, scale), _ = _inputs(5)
    args = dict(q=q, k=k, v=v, lr=lr, weights=w, scale=scale)
    kw = {}
    if name == "q list":
        args["q"], want = q.tolist(), (TypeError, "q must be a torch.Tensor; got list")
    elif name == "q rank":
        args["q"], want = q[0], (ValueError, r"q must have 4 dims \[B, T, H, dk\]; got shape \[5, 2, 3\]")
    elif name == "q int":
        args = {n: t.long() if n in "qkv" else t for n, t in args.items()}
        want = (TypeError, "q must be float16, bfloat16, float32 or float64; got torch.int64")
    elif name == "empty":
        args = {n: t[:, :0] if n in ("q", "k", "v", "lr") else t for n, t in args.items()}
        want = (ValueError, r"q must hold at least one token \(T >= 1\)")
    elif name == "k shape":
        args["k"], want = (
            k[:, :4],
            (ValueError, r"k must have shape \[1, 5, 2, 3\] \(None = any\); got \[1, 4, 2, 3\] \(dim 1\)"),
        )
    elif name == "v dtype":
        args["v"], want = v.float(), (TypeError, "v has dtype torch.float32 but q has torch.float64")
    elif name == "lr rank":
        args["lr"], want = (
            lr[..., None],
            (ValueError, r"lr must have 3 dims \[1, 5, 2\] \(None = any\); got shape \[1, 5, 2, 1\]"),
        )
    elif name == "lr heads":
        args["lr"], want = (
            lr[..., :1],
            (ValueError, r"lr must have shape \[1, 5, 2\] \(None = any\); got \[1, 5, 1\] \(dim 2\)"),
        )
    elif name == "scale shape":
        args["scale"], want = (
            scale[:1],
            (ValueError, r"scale must have shape \[2\] \(one temperature per head\); got \[1\]"),
        )
    elif name == "params names":
        args["weights"], want = (
            {"w0": w["w1"]},
            (ValueError, r"weights for depth=2 must be exactly \['w1'\]; missing \['w1'\], unexpected \['w0'\]"),
        )
    elif name == "params shape":
        args["weights"], want = (
            {"w1": w["w1"][:, :2]},
            (ValueError, r"weights\['w1'\] must be \[\.\.\., 3, 4\] for dv=3, hidden=4; got \[2, 2, 4\]"),
        )
    elif name == "residual dims":
        args["v"] = torch.cat([v, v], -1)
        want = (ValueError, "a residual kernel memory needs dk == dv; got dk=3, dv=6")
    elif name == "rule":
        kw["rule"], want = dict(window=3), (TypeError, "rule must be a KernelRule; got dict")
    elif name == "impl":
        kw["impl"], want = "triton", (ValueError, "impl must be one of 'chunk', 'reference'; got 'triton'")
    elif name == "state type":
        kw["initial_state"], want = "cache", (TypeError, "initial_state must be a KernelState .*; got str")
    elif name == "state rule":
        _, kw["initial_state"] = kernel_memory(**args, rule=KernelRule(window=3), output_final_state=True)
        want = (ValueError, r"initial_state was made with settings window=3, not window=None")
    elif name == "state batch":
        _, st = kernel_memory(**args, output_final_state=True)
        kw["initial_state"] = st.map(lambda t: torch.cat([t, t]))
        want = (ValueError, r"initial_state.keys has shape \[2, 2, 0, 3\]; expected \[1, 2, n, 3\] \(n = any\)")
    return args, kw, want


@pytest.mark.parametrize(
    "name",
    [
        "q list",
        "q rank",
        "q int",
        "empty",
        "k shape",
        "v dtype",
        "lr rank",
        "lr heads",
        "scale shape",
        "params names",
        "params shape",
        "residual dims",
        "rule",
        "impl",
        "state type",
        "state rule",
        "state batch",
    ],
)
def test_op_input_errors(name):
    args, kw, (exc, match) = _bad(name)
    with pytest.raises(exc, match=match) as err:
        kernel_memory(**args, **kw)
    assert "\n" not in str(err.value)


def test_layer_carries_its_rule():
    layer = KernelMemory(32, 2, 8, window=3, loss="l2", chunk_size=5)
    # the layer bounds a chunk's summed step by default (the rule's own default is the papers')
    assert layer.rule == KernelRule(window=3, loss="l2", chunk_size=5, step_bound=1.0)
    assert KernelRule().step_bound is None
    assert (layer.window, layer.loss, layer.chunk_size, layer.depth, layer.step_bound) == (3, "l2", 5, 2, 1.0)
    _, state = layer(torch.randn(1, 7, 32), return_state=True)
    assert state.recurrent_state.rule == layer.rule


@pytest.mark.xfail(
    raises=RuntimeError,
    strict=False,
    reason="aten::silu_backward has no derivative in this torch, and the fast form's hand-written "
    "backward (deepmemory.ops.memory.activation_backward) uses it: silu trains no outer loop",
)
def test_silu_layer_backward():
    layer = KernelMemory(32, 2, 8, activation="silu", chunk_size=4)
    layer(torch.randn(1, 6, 32)).pow(2).mean().backward()
    assert torch.isfinite(layer.initial_weights["w1"].grad).all()
