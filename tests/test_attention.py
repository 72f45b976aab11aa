import math

import pytest
import torch

from deepmemory.layers.attention import Attention, AttentionState

HID, NH, HD = 32, 2, 16


def make(seed=0, **kw):
    torch.manual_seed(seed)
    attn = Attention(HID, NH, HD, **kw).double()
    if attn.persistent is not None:
        with torch.no_grad():
            attn.persistent.normal_()  # large enough to matter
    return attn


def data(bsz=2, seq=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(bsz, seq, HID, generator=g, dtype=torch.float64)


def naive(attn, x, start=0):
    """Per-query softmax over the visible keys, RoPE by complex rotation, written out plainly."""
    bsz, seq, _ = x.shape
    half = HD // 2
    freq = attn.rope_theta ** (-torch.arange(half, dtype=torch.float64) * 2 / HD)

    def split(t):
        return t.view(t.shape[0], -1, NH, HD)

    def rot(t, pos):
        z = torch.complex(t[..., :half], t[..., half:]) * torch.polar(torch.ones(half, dtype=torch.float64), pos * freq)
        return torch.cat([z.real, z.imag], -1)

    q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
    if attn.persistent is not None:
        kp, vp = split(attn.k_proj(attn.persistent[None]))[0], split(attn.v_proj(attn.persistent[None]))[0]
    out = torch.zeros(bsz, seq, NH, HD, dtype=torch.float64)
    for b in range(bsz):
        for h in range(NH):
            for t in range(seq):
                qt = rot(q[b, t, h], start + t)
                scores, values = [], []
                if attn.persistent is not None:
                    for j in range(attn.num_persistent):
                        scores.append(q[b, t, h] @ kp[j, h])
                        values.append(vp[j, h])
                for s in range(t + 1):
                    if attn.window is not None and t - s >= attn.window:
                        continue
                    scores.append(qt @ rot(k[b, s, h], start + s))
                    values.append(v[b, s, h])
                w = torch.softmax(torch.stack(scores) / math.sqrt(HD), 0)
                out[b, t, h] = (w[:, None] * torch.stack(values)).sum(0)
    return attn.o_proj(out.flatten(2))


CONFIGS = [dict(), dict(window=5), dict(num_persistent=3), dict(window=4, num_persistent=2), dict(window=1)]


@pytest.mark.parametrize("kw", CONFIGS)
def test_matches_naive(kw):
    attn, x = make(**kw), data(seq=23)
    torch.testing.assert_close(attn(x), naive(attn, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kw", CONFIGS)
def test_pieces_and_tokens_equal_one_pass(kw):
    attn, x = make(**kw), data(seq=41)
    full = attn(x)
    for cuts in ([7, 8, 9, 26], list(range(1, 41))):
        outs, state, prev = [], None, 0
        for c in cuts + [41]:
            y, state = attn(x[:, prev:c], state, return_state=True)
            outs.append(y)
            prev = c
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-10)
        assert state.pos == 41
        want = 41 if attn.window is None else attn.window - 1
        assert state.k.shape[2] == want and state.v.shape[2] == want


def test_no_future_leak():
    attn, x = make(window=6, num_persistent=2), data(seq=29)
    y = attn(x)
    for t in (0, 10, 27):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :])
        y2 = attn(x2)
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], rtol=0, atol=1e-12)
        assert (y2[:, t + 1 :] - y[:, t + 1 :]).abs().max() > 1e-3


def test_persistent_used_and_not_positions():
    attn, x = make(num_persistent=3), data(seq=19)
    y, state = attn(x, return_state=True)
    assert state.pos == 19 and state.k.shape[2] == 19
    plain = Attention(HID, NH, HD).double()
    plain.load_state_dict({n: p for n, p in attn.state_dict().items() if n != "persistent"})
    assert (plain(x) - y).abs().max() > 1e-3
    with torch.no_grad():
        attn.persistent.mul_(-1.5)
    assert (attn(x) - y).abs().max() > 1e-3
    # persistent scores take no position: a query's persistent logits do not depend on where it sits
    attn.q_proj.weight.data[:] = 0  # uniform attention: y = mean of visible values
    y0 = attn(x[:, :1])
    y5 = attn(x[:, :1], AttentionState(state.k[:, :, :0], state.v[:, :, :0], 500), return_state=False)
    torch.testing.assert_close(y0, y5, rtol=0, atol=1e-12)


def test_prefix_is_always_visible():
    attn, x = make(window=3), data(seq=17)
    prefix = data(bsz=1, seq=2, seed=5)
    ref = make(window=3, num_persistent=2)
    ref.load_state_dict({**attn.state_dict(), "persistent": prefix[0]})
    torch.testing.assert_close(attn(x, prefix=prefix), ref(x), rtol=0, atol=1e-12)


def test_backward_finite():
    attn, x = make(window=5, num_persistent=2), data(seq=13)
    x.requires_grad_(True)
    attn(x).square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())


def test_bad_arguments():
    with pytest.raises(ValueError, match="window"):
        Attention(HID, NH, HD, window=0)
    with pytest.raises(ValueError, match="num_persistent"):
        Attention(HID, NH, HD, num_persistent=-1)
    with pytest.raises(ValueError, match="head_dim"):
        Attention(HID, NH, 15)
    with pytest.raises(ValueError, match="rope_theta"):
        Attention(HID, NH, HD, rope_theta=0.0)
    with pytest.raises(TypeError, match="window"):
        Attention(HID, NH, HD, window=2.5)
    attn = Attention(HID, NH, HD)
    with pytest.raises(ValueError, match="x must be"):
        attn(torch.randn(2, 5, HID + 1))
    with pytest.raises(TypeError, match="state"):
        attn(torch.randn(2, 5, HID), state=(1, 2))


def _window_and_masked(attn, x, state=None, prefix=None):
    """The blocked sliding window and the masked path on the same keys (float64)."""
    start = 0 if state is None else state.pos
    pos = torch.arange(start, start + x.shape[1])
    k, v = attn.keys_values(x, pos)
    if state is not None:
        k, v = torch.cat([state.k, k], 2), torch.cat([state.v, v], 2)
    n_old = k.shape[2] - x.shape[1]
    return attn.attend_window(x, pos, k, v, n_old, prefix), attn._attend_masked(x, pos, k, v, start, n_old, prefix)


@pytest.mark.parametrize(
    "window, seq, num_persistent",
    [(1, 7, 0), (3, 1, 2), (3, 63, 0), (8, 7, 2), (8, 100, 2), (5, 100, 0), (1, 63, 2)],
)
def test_window_blocks_equal_masked(window, seq, num_persistent):
    attn = make(window=window, num_persistent=num_persistent)
    x = data(seq=seq, seed=seq).requires_grad_(True)
    prefix = data(bsz=1, seq=3, seed=9) if num_persistent else None
    blocked, masked = _window_and_masked(attn, x, prefix=prefix)
    torch.testing.assert_close(blocked, masked, rtol=0, atol=1e-12)
    g = torch.randn_like(masked)
    params = [x, *attn.parameters()]
    grads = [torch.autograd.grad(y, params, g, retain_graph=True, allow_unused=True) for y in (blocked, masked)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_old", [1, 4])
def test_window_blocks_continue_a_state(n_old):
    attn = make(window=5, num_persistent=2)
    x = data(seq=n_old + 37, seed=3)
    _, state = attn(x[:, :n_old], return_state=True)
    blocked, masked = _window_and_masked(attn, x[:, n_old:], state)
    torch.testing.assert_close(blocked, masked, rtol=0, atol=1e-12)
    torch.testing.assert_close(attn(x)[:, n_old:], attn(x[:, n_old:], state), rtol=0, atol=1e-10)


def test_window_blocks_poison_exactly_the_rows_that_see_a_nan():
    attn = make(window=4, num_persistent=1)
    x = data(seq=30, seed=4)
    x[0, 9, 3] = float("nan")
    x[1, 0, 0] = float("inf")
    blocked, masked = _window_and_masked(attn, x)
    torch.testing.assert_close(blocked, masked, rtol=0, atol=1e-12, equal_nan=True)
    nan_rows = blocked.isnan().any(-1)
    assert nan_rows[0, 9:13].all() and not nan_rows[0, :9].any() and not nan_rows[0, 13:].any()
    assert nan_rows[1, :4].all() and not nan_rows[1, 4:].any()
