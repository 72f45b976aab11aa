"""The kernel-form memory's step bound (``KernelRule.step_bound``): a chunk's summed step along each
matrix's inputs, the implicit first one's ``φ*(k)`` included, is kept below ``tau``.

Checked here: closed forms of the linear memory written from the definition (independent of the
library's code), the fast form against the token and step loops (``impl="reference"``) in float64
with gradients and states, at odd lengths and several chunk sizes, with the bound acting; streaming
at any split; causality for non-finite inputs; and the unnormalised paper form (depth 3, Hebbian,
chunk 1) that the bound keeps finite where the papers' rule overflows.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from deepmemory.layers import KernelMemory
from deepmemory.ops import KERNEL_IMPLS, KernelRule, kernel_memory
from deepmemory.tree import tensors

H, D = 2, 3


def _inputs(t, *, depth=2, seed=0, b=2, d=D, hidden=4, requires_grad=False):
    """Random float64 op inputs ``[B, T, H, ·]``; the learning rates are large enough (0.5 to 1.5
    with keys of norm ~1) that a bound of 0.5 acts on most rows."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, H, d, generator=g, dtype=torch.float64) / d**0.5
    k = torch.randn(b, t, H, d, generator=g, dtype=torch.float64) / d**0.5
    v = torch.randn(b, t, H, d, generator=g, dtype=torch.float64)
    lr = torch.rand(b, t, H, generator=g, dtype=torch.float64) + 0.5
    w = {
        f"w{l}": torch.randn(H, d if l == depth - 1 else hidden, hidden, generator=g, dtype=torch.float64) / hidden**0.5
        for l in range(1, depth)
    }
    scale = torch.rand(H, generator=g, dtype=torch.float64) + 0.5
    leaves = [q, k, v, lr, *w.values(), scale]
    for x in leaves:
        x.requires_grad_(requires_grad)
    return (q, k, v, lr, w, scale), leaves


def _close(got, want, tol, what):
    """``max |got - want| <= tol * max(max |want|, 1e-3)`` (a gradient the bound makes zero is rounding)."""
    assert got.shape == want.shape, what
    assert torch.isfinite(want).all(), what
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol * max(want.abs().max().item() if want.numel() else 0.0, 1e-3), f"{what}: {err}"


# ---- closed forms of the linear memory ----------------------------------------------------------


def _linear_bounded(q, k, v, lr, scale, window, tau, normalized_inputs=False):
    """Linear memory, dot loss, chunk size 1, written from the definition, one (batch, head):
    ``M_t = M_{t-1} + f_t lr_t Σ_{i∈I_t} v_i φ*(k_i)^T`` with ``f_t = min(1, tau / (lr_t ||Σ_{i∈I_t}
    φ*(k_i) φ*(k_i)^T||_F))``, ``||·||_F^2 = Σ_ij exp(scale k_i·k_j)^2``; ``y_t = M_t φ*(q_t)``."""
    t_len = q.shape[0]
    ys, weight = [], torch.zeros(t_len, dtype=q.dtype)  # weight[i]: what token i's write holds now
    for t in range(t_len):
        idx = list(range(max(0, t - window + 1), t + 1))
        gram = torch.exp(scale * (k[idx] @ k[idx].T))
        f = min(1.0, tau / float(lr[t] * gram.pow(2).sum().sqrt()))
        weight[idx] += f * lr[t]
        ys.append(((weight[: t + 1, None] * v[: t + 1]) * torch.exp(scale * (k[: t + 1] @ q[t]))[:, None]).sum(0))
    return torch.stack(ys)


@pytest.mark.parametrize("window", [None, 1, 3])
def test_linear_dot_chunk_one_is_the_bounded_sum(window):
    (q, k, v, lr, _, scale), _ = _inputs(13, depth=1, seed=2)
    rule = KernelRule(
        depth=1, residual=False, loss="dot", window=window, normalized=False, chunk_size=1, step_bound=0.5
    )
    for impl in KERNEL_IMPLS:
        y, _ = kernel_memory(q, k, v, lr, {}, scale, rule=rule, impl=impl)
        for b, h in itertools.product(range(2), range(H)):
            want = _linear_bounded(q[b, :, h], k[b, :, h], v[b, :, h], lr[b, :, h], scale[h], window or 1, 0.5)
            torch.testing.assert_close(y[b, :, h], want, rtol=1e-12, atol=1e-12)
    # the bound acts (rows differ from the papers' rule) and a loose one does nothing
    papers, _ = kernel_memory(q, k, v, lr, {}, scale, rule=rule.replace(step_bound=None))
    assert (y - papers).abs().max() > 0.1
    loose, _ = kernel_memory(q, k, v, lr, {}, scale, rule=rule.replace(step_bound=1e9))
    torch.testing.assert_close(loose, papers, rtol=0, atol=0)


def test_chunk_rows_see_their_own_factor():
    """Window None, chunk 4, linear dot memory: row ``t`` of a chunk reads the chunk's writes up to
    ``t`` times ``f_t`` (``H_t`` summed over them), the next chunk reads them times the last row's."""
    (q, k, v, lr, _, scale), _ = _inputs(8, depth=1, seed=5, b=1)
    rule = KernelRule(depth=1, residual=False, loss="dot", normalized=False, chunk_size=4, step_bound=0.7)
    y, _ = kernel_memory(q, k, v, lr, {}, scale, rule=rule)
    for h in range(H):
        qq, kk, vv, ll, s = q[0, :, h], k[0, :, h], v[0, :, h], lr[0, :, h], scale[h]
        held = torch.zeros(8, dtype=qq.dtype)
        for t in range(8):
            c0 = t - t % 4
            idx = list(range(c0, t + 1))
            gram = torch.exp(s * (kk[idx] @ kk[idx].T))
            f = min(1.0, 0.7 / float((ll[idx, None] * ll[None, idx] * gram.pow(2)).sum().sqrt()))
            weight = held.clone()
            weight[idx] = f * ll[idx]
            want = ((weight[: t + 1, None] * vv[: t + 1]) * torch.exp(s * (kk[: t + 1] @ qq[t]))[:, None]).sum(0)
            torch.testing.assert_close(y[0, t, h], want, rtol=1e-12, atol=1e-12)
            if t % 4 == 3:
                held = weight


# ---- the fast form against the loops -------------------------------------------------------------

RULES = [
    dict(window=None, loss="dot", normalized=False, depth=2),
    dict(window=None, loss="l2", normalized=True, depth=3, activation="tanh"),
    dict(window=3, loss="dot", normalized=False, depth=3),
    dict(window=5, loss="l2", normalized=False, depth=2),
    dict(window=4, loss="dot", normalized=True, depth=1, residual=False),
    dict(window=3, window_rule="swa", loss="dot", normalized=False, depth=2),
    dict(window=4, window_rule="swa", loss="l2", normalized=True, depth=2),
]
CASES = [(1, 4, 0), (7, 1, 2), (7, 3, 5), (63, 16, 3), (63, 5, 1), (100, 4, 4), (100, 16, 6), (257, 16, 2)]


@pytest.mark.parametrize("t,chunk,r", CASES)
def test_fast_form_equals_loops(t, chunk, r):
    rule = KernelRule(**RULES[r], chunk_size=chunk, step_bound=0.5)
    args, leaves = _inputs(t, depth=rule.depth, seed=t + chunk + r, requires_grad=True)
    ys, states, grads = [], [], []
    for impl in KERNEL_IMPLS:
        y, st = kernel_memory(*args, rule=rule, impl=impl, output_final_state=True)
        ys.append(y)
        states.append(st)
        grads.append(torch.autograd.grad((y * torch.cos(y)).sum(), leaves))  # a non-trivial cotangent
    assert torch.isfinite(ys[0]).all() and ys[0].abs().max() > 0
    _close(ys[0], ys[1], 1e-9, "y")
    for a, b in zip(tensors(states[0]), tensors(states[1])):
        _close(a.detach(), b.detach(), 1e-9, "state")
    for name, a, b in zip(["q", "k", "v", "lr", *args[4], "scale"], *grads):
        _close(a, b, 1e-8, f"grad {name}")
    if t > 1:  # the bound acts (the papers' rule may overflow where it does: the Hebbian depth-3 memory)
        papers, _ = kernel_memory(*args, rule=rule.replace(step_bound=None))
        assert (ys[0] - papers).abs().nan_to_num(nan=1.0).max() > 1e-3


@pytest.mark.parametrize("r", range(len(RULES)))
@pytest.mark.parametrize("splits", [[1], [3, 4, 11], [2, 9, 10, 21]])
def test_streaming_at_any_split_equals_one_call(r, splits):
    rule = KernelRule(**RULES[r], chunk_size=4, step_bound=0.5)
    (q, k, v, lr, w, scale), _ = _inputs(25, depth=rule.depth, seed=r)
    full, end = kernel_memory(q, k, v, lr, w, scale, rule=rule, output_final_state=True)
    outs, st = [], None
    for n, (lo, hi) in enumerate(zip([0] + splits, splits + [25])):
        piece = [x[:, lo:hi] for x in (q, k, v, lr)]
        y, st = kernel_memory(
            *piece, w, scale, rule=rule, initial_state=st, output_final_state=True, impl=KERNEL_IMPLS[n % 2]
        )
        outs.append(y)
    _close(torch.cat(outs, 1), full, 1e-11, "y")
    assert st.seen == 25 and st.pending == 25 % 4
    for a, b in zip(tensors(st), tensors(end)):
        _close(a, b, 1e-11, "state")


@pytest.mark.parametrize("r", [0, 2, 5])
def test_a_bad_token_changes_no_earlier_output(r):
    """A NaN, an infinity or a huge value at token 6 (inside the chunk 4..7) leaves every earlier
    output bitwise as it was: the bound's Gram matrices leave a flagged token out."""
    rule = KernelRule(**RULES[r], chunk_size=4, step_bound=0.5)
    ins, _ = _inputs(11, depth=rule.depth, seed=1)
    q, k, v, lr, w, scale = ins
    clean, _ = kernel_memory(*ins, rule=rule)
    for n, value in itertools.product(range(4), (float("nan"), float("inf"), 1e30)):
        bad = [x.clone() for x in (q, k, v, lr)]
        bad[n][(0, 6, 1) + (2,) * (bad[n].dim() - 3)] = value
        y, _ = kernel_memory(*bad, w, scale, rule=rule)
        assert torch.equal(y[:, :6], clean[:, :6]), (n, value)
        assert torch.equal(y[1], clean[1]) and torch.equal(y[0, :, 0], clean[0, :, 0]), (n, value)


def test_rule_field_is_checked():
    for bad, exc in ((0.0, ValueError), (-1.0, ValueError), (math.inf, ValueError), ("1", ValueError)):
        with pytest.raises(exc, match="step_bound"):
            KernelRule(step_bound=bad)


# ---- the unnormalised paper form at the layer's defaults ---------------------------------------------


def _paper_form(seed=0, **kw):
    torch.manual_seed(seed)
    return KernelMemory(64, 4, 16, window=4, loss="dot", depth=3, chunk_size=1, normalized=False, **kw).double()


def test_paper_form_stays_finite_with_the_layer_defaults():
    """ATLAS's unnormalised Hebbian deep memory (SWDT's loss, depth 3, online): under the papers'
    rule its read overflows within a few tokens (the loss has no minimum and each layer's step
    grows with the others'); the layer's default bound keeps it finite and writing."""
    x = torch.randn(1, 256, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unbounded = _paper_form(step_bound=None)(x[:, :32])
        layer = _paper_form()
        y = layer(x)
    assert not torch.isfinite(unbounded).all()
    assert torch.isfinite(y).all()
    assert layer.step_bound == 1.0


def test_config_records_the_bound_and_old_configs_keep_the_papers_rule():
    from deepmemory.models import DeepMemoryConfig, DeepMemoryForCausalLM

    cfg = DeepMemoryConfig(layer_pattern="kernel", kernel=dict(window=4))
    assert cfg.kernel["step_bound"] == 1.0
    assert DeepMemoryConfig.from_dict(cfg.to_dict()).kernel["step_bound"] == 1.0
    saved = cfg.to_dict()
    del saved["kernel"]["step_bound"]  # a config saved before the kernel memory's bound
    old = DeepMemoryConfig.from_dict(saved)
    assert old.kernel["step_bound"] is None
    assert DeepMemoryForCausalLM(old).model.layers[0].mixer.step_bound is None
    assert "step_bound" not in DeepMemoryConfig(layer_pattern="attn").kernel  # no kernel block, nothing recorded


# ---- the presets: a write that writes, and finite on text ---------------------------------------------


def _text(n: int) -> torch.Tensor:
    """``n`` bytes of real text (this library's own source), as token ids."""
    import deepmemory.ops.kernel as source

    data = open(source.__file__, "rb").read()[:n]
    return torch.tensor(list(data), dtype=torch.long)[None]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deep-transformer", "swdt", "dot"])
def test_kernel_presets_write_and_stay_finite_on_text(name):
    """Each kernel preset's first layer: one write adds at least a tenth of ``v`` along ``v`` at init
    (the former ``swdt`` added 0.07%), and 2,048 bytes of text stream through the model finite. At
    ``max_lr`` 1 without the bound, ``swdt`` and ``dot`` turn non-finite on the same text."""
    from deepmemory.models import DeepMemoryCache, build

    def stream(model) -> bool:
        cache, ids = DeepMemoryCache(model.config), _text(2048)
        with torch.no_grad():
            return all(torch.isfinite(model(piece, cache=cache).logits).all() for piece in ids.split(512, 1))

    torch.manual_seed(0)
    model = build(name, vocab_size=256).eval()
    layer = model.model.layers[0].mixer
    assert layer.step_bound == 1.0 and layer.max_lr == 1.0
    with torch.no_grad():
        x = torch.randn(64, 1, 64, generator=torch.Generator().manual_seed(1))
        _, k, v, _ = layer.qkv(x, None)
        lr = layer.max_lr * torch.sigmoid(layer.lr_proj(x))
        w, scale = dict(layer.initial_weights), layer.log_temp.exp()
        m0, _ = kernel_memory(k, k, v, torch.zeros_like(lr), w, scale, rule=layer.rule)
        m1, _ = kernel_memory(k, k, v, lr, w, scale, rule=layer.rule)
    along_v = ((m1 - m0) * v).sum(-1) / v.pow(2).sum(-1)
    assert along_v.mean() > 0.1
    assert stream(model)
    if name != "deep-transformer":
        torch.manual_seed(0)
        assert not stream(build(name, vocab_size=256, kernel={"step_bound": None}).eval())
