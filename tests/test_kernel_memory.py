import itertools

import pytest
import torch
import torch.nn.functional as F

from deepmemory.layers import KernelMemory, KernelMemoryState
from deepmemory.layers.kernel_memory import kernel_memory

B, H, D = 2, 2, 5


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
    q, k, v, _ = _qkv(13)
    scale = torch.tensor([0.7, 1.3], dtype=torch.float64)
    y, _ = kernel_memory(q, k, v, torch.ones(B, H, 13, dtype=torch.float64), {}, scale, depth=1, residual=False,
                         loss="dot", window=window, normalized=False, chunk_size=chunk)
    s = torch.exp(scale[:, None, None] * (q @ k.transpose(-1, -2))) * _band(13, window)
    torch.testing.assert_close(y, s @ v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window,chunk", [(None, 3), (4, 5), (1, 2)])
def test_linear_dot_normalised_is_softmax_attention(window, chunk):
    q, k, v, _ = _qkv(17, seed=2)
    y, _ = kernel_memory(q, k, v, torch.ones(B, H, 17, dtype=torch.float64), {}, torch.full((H,), 0.8, dtype=torch.float64),
                         depth=1, residual=False, loss="dot", window=window, normalized=True, chunk_size=chunk)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=_band(17, window), scale=0.8)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 3])
def test_linear_l2_is_delta_rule_transformer(chunk):
    """ATLAS eq. 30-31: M_t = M_{t'} ... + lr_t (v_t - M_{t'} phi*(k_t)) phi*(k_t)^T, in kernel space."""
    q, k, v, lr = _qkv(11, seed=3)
    y, _ = kernel_memory(q, k, v, lr, {}, torch.ones(H, dtype=torch.float64), depth=1, residual=False, loss="l2",
                         window=None, normalized=False, chunk_size=chunk)
    ker = lambda a, b: torch.exp((a * b).sum(-1, keepdim=True))  # noqa: E731
    stored, ys = [], []
    for t in range(11):
        start = t - t % chunk
        pred = sum((ker(k[:, :, j], k[:, :, t]) * stored[j] for j in range(start)), torch.zeros_like(v[:, :, t]))
        stored.append(lr[:, :, t, None] * (v[:, :, t] - pred))
        ys.append(sum(ker(k[:, :, j], q[:, :, t]) * stored[j] for j in range(t + 1)))
    torch.testing.assert_close(y, torch.stack(ys, 2), rtol=1e-11, atol=1e-11)


def _reference(q, k, v, lr, weights, scale, *, depth, activation, residual, loss, window, normalized, chunk_size):
    """M_t = M_init - sum_{i in I_t} lr_i grad loss_i(M_{t'(i)}), token by token: deeper matrices
    materialised, every gradient from autograd (the first layer's as the gradient of its output)."""
    act = {"gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}[activation]
    seq = q.shape[2]
    sc = scale[:, None]
    keys, d0, grads = [], [], []

    def members(t):
        return [i for i in range(len(keys)) if i <= t and (window is None or i > t - window)]

    def first_layer(x, idx):
        if not idx:
            return x.new_zeros(*x.shape[:-1], d0[0].shape[-1] if d0 else weights_w1_cols)
        s = sc * torch.stack([(x * keys[i]).sum(-1) for i in idx], -1)  # [B, H, n]
        w = torch.softmax(s, -1) if normalized else torch.exp(s)
        return torch.einsum("bhn,bhnr->bhr", w, torch.stack([d0[i] for i in idx], 2))

    def rest(x, z, mats):
        for w in mats:
            z = torch.einsum("bhrc,bhc->bhr", w, act(z))
        return z + x if residual else z

    def mats_at(idx):
        return [weights[f"w{l}"].expand(B, -1, -1, -1) + sum((grads[i][l - 1] for i in idx), 0) for l in range(1, depth)]

    weights_w1_cols = weights["w1"].shape[-1] if depth > 1 else v.shape[-1]
    ys = []
    for cs in range(0, seq, chunk_size):
        idx0 = members(cs - 1)
        for i in range(cs, min(cs + chunk_size, seq)):
            z0 = first_layer(k[:, :, i], idx0).detach().requires_grad_()
            mats = [m.detach().requires_grad_() for m in mats_at(idx0)]
            pred = rest(k[:, :, i], z0, mats)
            per = 0.5 * (pred - v[:, :, i]).pow(2).sum(-1) if loss == "l2" else -(pred * v[:, :, i]).sum(-1)
            g = torch.autograd.grad(per.sum(), [z0] + mats)
            keys.append(k[:, :, i])
            d0.append(-lr[:, :, i, None] * g[0])
            grads.append([-lr[:, :, i, None, None] * gw for gw in g[1:]])
        for t in range(cs, min(cs + chunk_size, seq)):
            idx = members(t)
            ys.append(rest(q[:, :, t], first_layer(q[:, :, t], idx), mats_at(idx)))
    return torch.stack(ys, 2)


DEEP = [
    dict(loss="dot", window=None, normalized=True, depth=2, activation="gelu", residual=True, chunk_size=3),
    dict(loss="l2", window=3, normalized=True, depth=2, activation="silu", residual=True, chunk_size=4),
    dict(loss="dot", window=4, normalized=False, depth=3, activation="tanh", residual=True, chunk_size=2),
    dict(loss="l2", window=None, normalized=False, depth=2, activation="gelu", residual=False, chunk_size=1),
    dict(loss="l2", window=2, normalized=True, depth=1, activation="gelu", residual=True, chunk_size=3),
]


@pytest.mark.parametrize("cfg", DEEP)
def test_deep_memory_equals_token_loop(cfg):
    q, k, v, lr = _qkv(11, seed=4)
    w = _weights(cfg["depth"], 6)
    scale = torch.tensor([0.9, 1.4], dtype=torch.float64)
    y, _ = kernel_memory(q, k, v, lr, w, scale, **cfg)
    torch.testing.assert_close(y, _reference(q, k, v, lr, w, scale, **cfg), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg", DEEP)
def test_functional_streaming(cfg):
    q, k, v, lr = _qkv(14, seed=5)
    w = _weights(cfg["depth"], 6)
    scale = torch.tensor([0.9, 1.4], dtype=torch.float64)
    full, _ = kernel_memory(q, k, v, lr, w, scale, **cfg)
    outs, st = [], None
    for lo, hi in ((0, 1), (1, 6), (6, 9), (9, 14)):
        y, st = kernel_memory(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], lr[:, :, lo:hi], w, scale, **cfg,
                              initial_state=st, output_final_state=True)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 2), full, rtol=1e-12, atol=1e-12)
    if cfg["window"] is not None:
        assert st.keys.shape[2] <= cfg["window"]


def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("chunk_size", 4)
    layer = KernelMemory(32, 2, 8, **kw).double()
    with torch.no_grad():
        layer.lr_proj.weight.normal_(std=0.3)
        layer.log_temp.uniform_(0.0, 1.0)
    return layer


LAYER_CFGS = [dict(), dict(window=3), dict(loss="l2", window=5), dict(depth=1, residual=False, normalized=False),
              dict(depth=3, conv_size=0), dict(loss="l2", normalized=False)]


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


@pytest.mark.parametrize("loss,window,normalized,depth", list(itertools.product(("dot", "l2"), (None, 3), (True, False), (1, 2))))
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
    """depth=1, no residual, constant lr = 1 (max_lr=2, zero gate): softmax attention on q, k, v."""
    layer = _layer(depth=1, residual=False, max_lr=2.0)
    with torch.no_grad():
        layer.lr_proj.weight.zero_()
        layer.lr_proj.bias.zero_()
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    q, k, v, _ = layer.qkv(x, None)
    heads = [F.scaled_dot_product_attention(q[:, :, h:h + 1].transpose(1, 2), k[:, :, h:h + 1].transpose(1, 2),
                                            v[:, :, h:h + 1].transpose(1, 2), is_causal=True,
                                            scale=float(layer.log_temp[h].detach().exp())) for h in range(2)]
    want = layer.output(x, torch.cat(heads, 1).transpose(1, 2))
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)


def test_state_detach_and_sizes():
    layer = KernelMemory(32, 2, 8, window=5, chunk_size=4)
    _, state = layer(torch.randn(1, 18, 32), return_state=True)
    c = state.cache
    assert c.keys.shape[2] == 5 and c.signals.shape[2] == 5 and c.evict_signals[0].shape[2] == 5
    assert c.pending_k.shape[2] == 2 and c.weights[0].shape == (1, 2, 8, 32)
    d = state.detach()
    assert not d.cache.signals.requires_grad and not d.cache.weights[0].requires_grad
    assert not any(t.requires_grad for t in d.conv)
    # without a window the deeper matrices need no per-token data: the state is keys, signals, matrices
    _, state = KernelMemory(32, 2, 8, chunk_size=4)(torch.randn(1, 18, 32), return_state=True)
    assert state.cache.keys.shape[2] == 16 and state.cache.evict_signals[0].shape[2] == 0


def test_state_from_other_settings_is_rejected():
    q, k, v, lr = _qkv(6)
    w, scale = _weights(2, 6), torch.ones(H, dtype=torch.float64)
    _, st = kernel_memory(q, k, v, lr, w, scale, window=3, chunk_size=4, output_final_state=True)
    with pytest.raises(ValueError, match="initial_state was made with"):
        kernel_memory(q, k, v, lr, w, scale, window=4, chunk_size=4, initial_state=st)


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
