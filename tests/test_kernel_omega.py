"""The kernel-form memory under the Omega rule (``window_rule="omega"``, ATLAS eq. 27–28: SWDT, Dot).

At every step ``t`` the window's gradients, taken at the memory before ``t``'s chunk, are applied
again: ``M_t = M_{t-1} - lr_t Σ_{i=t-c+1}^{t} ∇ loss_i(M_{t'-1})``. Checked here: closed forms of
the linear memory written straight from the equations (independent of the library's code), the
fast form against the step loop (``impl="reference"``) in float64 with gradients, streaming at any
split, and causality for non-finite inputs (also for ``"swa"``).
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from deepmemory.ops import KERNEL_IMPLS, KernelRule, kernel_memory
from deepmemory.tree import tensors

H, D = 2, 3


def _inputs(t, *, depth=2, spread=1, seed=0, b=2, d=D, hidden=4, requires_grad=False):
    """Random float64 op inputs ``[B, T, H, ·]`` (nothing zero). The learning rates are divided by
    ``spread``: a token's gradient is applied up to ``window`` times, and a chunk's tokens write at
    one memory, so ``window + chunk`` keeps the unnormalised l2 rule bounded over 257 tokens."""
    g = torch.Generator().manual_seed(seed)
    q = 0.5 * torch.randn(b, t, H, d, generator=g, dtype=torch.float64)
    k = 0.5 * torch.randn(b, t, H, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, t, H, d, generator=g, dtype=torch.float64)
    lr = (0.3 * torch.rand(b, t, H, generator=g, dtype=torch.float64) + 0.1) / spread
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
    """``max |got - want| <= tol * max |want|`` (the values' scale varies a lot between cases)."""
    assert got.shape == want.shape, what
    assert torch.isfinite(want).all(), what
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol * max(want.abs().max().item() if want.numel() else 0.0, 1e-300), f"{what}: {err}"


# ---- closed forms of the linear memory, straight from ATLAS eq. 20, 26 and 28 ---------------------


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("window,chunk", [(1, 1), (3, 1), (3, 4), (16, 4), (16, 16), (5, 16)])
def test_linear_dot_weights_each_token_by_its_steps_in_the_window(window, chunk, normalized):
    """Linear memory, dot loss: ``M_t = M_{t-1} + lr_t Σ_{i∈I_t} v_i φ*(k_i)^T`` (ATLAS eq. 20 with
    ``φ*``), so ``y_t = Σ_{i≤t} w_{t,i} v_i exp(τ q_t·k_i)`` with ``w_{t,i} = Σ_{s≤t} lr_s [i ∈ I_s]``
    (``min(t - i + 1, c)`` for ``lr = 1``: the steps token ``i`` has spent in the window), divided by
    ``Σ_{i≤t} exp(τ q_t·k_i)`` when normalised, for every chunk size (the gradient does not depend
    on the memory). Retiring tokens (``"swa"``) computes something else."""
    t_len = 40
    (q, k, v, lr, _, scale), _ = _inputs(t_len, depth=1, seed=window + chunk)
    rule = KernelRule(depth=1, residual=False, loss="dot", window=window, normalized=normalized, chunk_size=chunk)
    y, _ = kernel_memory(q, k, v, lr, {}, scale, rule=rule)
    pos = torch.arange(t_len)
    in_window = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)  # [s, i]: i ∈ I_s
    causal = (pos[None, :] <= pos[:, None]).double()  # [t, s]: s <= t
    weights = torch.einsum("ts,bsh,si->bhti", causal, lr, in_window.double())  # Σ_{s<=t} lr_s [i ∈ I_s]
    e = torch.exp(scale[:, None, None] * torch.einsum("bthd,bihd->bhti", q, k)) * causal  # [B, H, t, i], i <= t
    want = torch.einsum("bhti,bihd->bthd", weights * e, v)
    if normalized:
        want = want / e.sum(-1).transpose(1, 2)[..., None]
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    if window > 1:
        swa, _ = kernel_memory(q, k, v, lr, {}, scale, rule=rule.replace(window_rule="swa"))
        assert (swa - want).abs().max() > 0.1 * want.abs().max()


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("window,chunk", [(3, 1), (3, 4), (16, 1), (6, 4)])
def test_linear_l2_is_eq_28_in_kernel_space(window, chunk, normalized):
    """Dot with a linear memory (ATLAS eq. 28): ``M_t = M_{t-1} + lr_t Σ_{i∈I_t} (v_i - M'φ*(k_i))
    φ*(k_i)^T`` with ``M'`` the memory before the chunk. ``M = Σ_j D_j φ*(k_j)^T``, so each step adds
    ``lr_t (v_i - Σ_j D'_j K(k_j, k_i))`` to ``D_i`` for every ``i`` in the window."""
    t_len = 30
    (q, k, v, lr, _, scale), _ = _inputs(t_len, depth=1, seed=7 * window + chunk)
    rule = KernelRule(depth=1, residual=False, loss="l2", window=window, normalized=normalized, chunk_size=chunk)
    y, _ = kernel_memory(q, k, v, lr, {}, scale, rule=rule)
    kern = lambda a, bb: torch.exp(scale[None, :, None] * torch.einsum("bhd,bhnd->bhn", a, bb))  # noqa: E731
    kt, vt, qt, lt = (x.transpose(1, 2) for x in (k, v, q, lr))  # heads first

    def read(x, dd, upto):  # M φ*(x) over keys 0 .. upto-1
        if upto == 0:
            return torch.zeros_like(x)
        e = kern(x, kt[:, :, :upto])
        e = e / e.sum(-1, keepdim=True) if normalized else e
        return torch.einsum("bhn,bhnd->bhd", e, dd[:, :, :upto])

    dd = torch.zeros_like(vt)
    ys = []
    for cs in range(0, t_len, chunk):
        frozen = dd.clone()
        err = {
            i: vt[:, :, i] - read(kt[:, :, i], frozen, cs)
            for i in range(max(0, cs - window + 1), min(cs + chunk, t_len))
        }
        for t in range(cs, min(cs + chunk, t_len)):
            for i in range(max(0, t - window + 1), t + 1):
                dd[:, :, i] = dd[:, :, i] + lt[:, :, t, None] * err[i]
            ys.append(read(qt[:, :, t], dd, t + 1))
    torch.testing.assert_close(y, torch.stack(ys, 1), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("loss", ["dot", "l2"])
def test_window_one_is_window_none(loss):
    """With ``c = 1`` the Omega rule applies each gradient once and keeps it: DeepTransformer."""
    args, _ = _inputs(23, depth=2, seed=3)
    rule = KernelRule(loss=loss, window=None, normalized=False, chunk_size=4)
    want, _ = kernel_memory(*args, rule=rule)
    got, _ = kernel_memory(*args, rule=rule.replace(window=1))
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


# ---- the fast form against the step loop: outputs, final state, gradients ------------------------

LENGTHS, CHUNKS, WINDOWS = (1, 7, 63, 100, 257), (1, 4, 16), (1, 3, 16)
FAST = [  # every length, chunk, window, depth, loss and normalisation in 8 cases
    (1, 4, 3, 2, "dot", False),
    (7, 1, 3, 2, "l2", True),
    (7, 16, 16, 2, "l2", False),
    (63, 4, 16, 2, "dot", True),
    (63, 16, 1, 2, "l2", False),
    (100, 16, 16, 2, "l2", True),
    (100, 4, 1, 1, "l2", True),
    (257, 16, 3, 1, "dot", False),
]
SWEEP = [
    pytest.param(*case, marks=[] if case in FAST else pytest.mark.long)
    for case in itertools.product(LENGTHS, CHUNKS, WINDOWS, (1, 2), ("dot", "l2"), (False, True))
]


@pytest.mark.parametrize("t,chunk,window,depth,loss,normalized", SWEEP)
def test_fast_form_equals_step_loop(t, chunk, window, depth, loss, normalized):
    rule = KernelRule(
        depth=depth,
        residual=depth > 1,
        loss=loss,
        window=window,
        normalized=normalized,
        chunk_size=chunk,
        activation="tanh" if depth > 1 and loss == "dot" else "gelu",
    )
    args, leaves = _inputs(t, depth=depth, spread=window + chunk, seed=t + 3 * chunk + window, requires_grad=True)
    ys, states, grads = [], [], []
    for impl in KERNEL_IMPLS:
        y, st = kernel_memory(*args, rule=rule, impl=impl, output_final_state=True)
        ys.append(y)
        states.append(st)
        grads.append(torch.autograd.grad((y * torch.cos(y)).sum(), leaves))  # a non-trivial cotangent
    assert ys[0].abs().max() > 0
    _close(ys[0], ys[1], 1e-9, "y")
    for a, b in zip(tensors(states[0]), tensors(states[1])):
        _close(a.detach(), b.detach(), 1e-9, "state")
    assert states[0].keys.shape[2] == t - t % chunk and states[0].window_values.shape[2] == min(
        window - 1, t - t % chunk
    )
    for name, a, b in zip(["q", "k", "v", "lr", *args[4], "scale"], *grads):
        _close(a, b, 1e-8, f"grad {name}")


# ---- streaming --------------------------------------------------------------------------------


@pytest.mark.parametrize("window,chunk", [(16, 4), (3, 8), (5, 1)])
@pytest.mark.parametrize("splits", [[1], [3, 4, 11], [2, 9, 10, 21, 30]])
def test_streaming_at_any_split_equals_one_call(window, chunk, splits):
    """Pieces with the carried state give one call's outputs and final state; the two
    implementations continue each other's states."""
    rule = KernelRule(loss="l2", window=window, normalized=False, chunk_size=chunk)
    (q, k, v, lr, w, scale), _ = _inputs(37, spread=window, seed=window)
    full, end = kernel_memory(q, k, v, lr, w, scale, rule=rule, output_final_state=True)
    outs, st = [], None
    for n, (lo, hi) in enumerate(zip([0] + splits, splits + [37])):
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
            impl=KERNEL_IMPLS[n % 2],
        )
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-12, atol=1e-12)
    assert st.seen == 37 and st.pending == 37 % chunk
    for a, b in zip(tensors(st), tensors(end)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_state_with_wrong_window_values_is_rejected():
    (q, k, v, lr, w, scale), _ = _inputs(9, spread=4)
    rule = KernelRule(window=4, chunk_size=2)
    _, st = kernel_memory(q, k, v, lr, w, scale, rule=rule, output_final_state=True)
    bad = dataclasses.replace(st, window_values=st.window_values[:, :, 1:])
    with pytest.raises(ValueError, match="initial_state holds 2 window values but 8 stored keys; expected 3"):
        kernel_memory(q, k, v, lr, w, scale, rule=rule, initial_state=bad)


# ---- causality for non-finite inputs ----------------------------------------------------------


@pytest.mark.parametrize(
    "window_rule,depth,loss,normalized",
    [("omega", 2, "l2", False), ("omega", 1, "dot", True), ("swa", 2, "dot", False), ("swa", 1, "l2", True)],
)
def test_a_bad_token_changes_no_earlier_output(window_rule, depth, loss, normalized):
    """A NaN, an infinity or a huge value at token 6 (inside the chunk 4..7) leaves every earlier
    output bitwise as it was, and the other sequence and head untouched."""
    rule = KernelRule(
        depth=depth,
        residual=depth > 1,
        loss=loss,
        window=3,
        window_rule=window_rule,
        normalized=normalized,
        chunk_size=4,
    )
    ins, _ = _inputs(11, depth=depth, spread=3, seed=1)
    q, k, v, lr, w, scale = ins
    clean, _ = kernel_memory(*ins, rule=rule)
    for n, value in itertools.product(range(4), (float("nan"), float("inf"), 1e30)):
        bad = [x.clone() for x in (q, k, v, lr)]
        bad[n][(0, 6, 1) + (2,) * (bad[n].dim() - 3)] = value
        y, _ = kernel_memory(*bad, w, scale, rule=rule)
        assert (
            torch.equal(y[:, :6], clean[:, :6])
            and torch.equal(y[1], clean[1])
            and torch.equal(y[:, :, 0], clean[:, :, 0])
        )
