"""Channel-wise gates (Miras §5.4, "Channel-wise Parameters"): a window gate ``[B, T, H, dv]`` that
weighs each value channel of a token's loss, i.e. the per-channel learning rate ``eta_t = lr_t gamma_t``.

The chunk form against the token loop (float64, every memory, loss, optimizer and granularity,
forward and backward, odd lengths, chunk sizes, streaming), against loops written here from the
equations for the linear memory, and through the layer and a model."""

from __future__ import annotations

import pytest
import torch
from ops_cases import make_inputs, make_params, rel_err, streamed
from test_causality import _poison, _same_before
from test_ops import DK, DV, HIDDEN, _compare

from deepmemory.layers import NeuralMemory
from deepmemory.models import build
from deepmemory.ops import ARCHITECTURES, neural_memory

OPTIMIZERS = ("gd", "momentum", "muon")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("loss", ["l2", "dot"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("granularity", ["token", "chunk"])
@pytest.mark.parametrize("window", [1, 7])
def test_chunk_matches_reference(architecture, loss, optimizer, granularity, window):
    kw = dict(
        architecture=architecture, loss=loss, optimizer=optimizer, granularity=granularity, window=window, chunk_size=4
    )
    _compare(kw, per_sequence=window == 7, all_grads_live=True, channel=True)


@pytest.mark.parametrize("seq", [1, 7, 63, 100, 257])
@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
def test_lengths_and_chunk_sizes(seq, chunk_size):
    kw = dict(architecture="mlp", optimizer="momentum", window=3, chunk_size=chunk_size)
    _compare(kw, bsz=1, seq=seq, grad=seq <= 100, seed=seq, lr_scale=0.5, channel=True)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("impl", ["chunk", "reference"])
def test_streaming_at_any_split(optimizer, impl):
    kw = dict(architecture="mlp", optimizer=optimizer, window=3, chunk_size=4, impl=impl)
    seq = 17
    q, k, v, lr, mom, dec, gam = make_inputs(2, seq, 2, DK, DV, optimizer=optimizer, channel=True)
    params = make_params("mlp", 2, DK, DV, HIDDEN)
    full, st = neural_memory(q, k, v, lr, mom, dec, params, window_gate=gam, output_final_state=True, **kw)
    for cuts in ([1], [6], [3, 4, 13], list(range(1, seq))):
        out, state = streamed((q, k, v, lr, mom, dec, gam), params, cuts, **kw)
        assert rel_err(out, full) <= 1e-10, cuts
        assert state.window_gate.shape[-1] == DV
        for n in st.weights:
            assert rel_err(state.weights[n], st.weights[n]) <= 1e-10
            assert rel_err(state.momentum[n], st.momentum[n]) <= 1e-10


def _linear_loop(q, k, v, eta, mom, dec, w0, *, decay_first):
    """The linear memory ``M(x) = W x`` with a per-channel learning rate, written from the equations:
    Titans eq. 13-14 with Miras §5.4's ``eta_t`` in R^dv (Titans' order: the gradient at
    ``W_{t-1}``), or the gated delta rule (Gated DeltaNet §3.1) with a per-channel ``beta_t``:
    ``S_t = alpha_t S_{t-1} + diag(beta_t) (v_t - alpha_t S_{t-1} k_t) k_t^T``. One (batch, head)
    at a time, all ``[T, ...]``."""
    w, s, outs = w0.clone(), torch.zeros_like(w0), []
    for t in range(q.shape[0]):
        alpha = 1.0 - dec[t]
        if decay_first:
            at = alpha * w
            w = at + (eta[t] * (v[t] - at @ k[t]))[:, None] * k[t][None, :]
        else:
            grad = (w @ k[t] - v[t])[:, None] * k[t][None, :]
            s = mom[t] * s - eta[t][:, None] * grad
            w = alpha * w + s
        outs.append(w @ q[t])
    return torch.stack(outs)


@pytest.mark.parametrize("optimizer,decay_first", [("gd", False), ("momentum", False), ("gd", True)])
def test_linear_memory_equals_the_equations(optimizer, decay_first):
    seq, nh = 23, 2
    q, k, v, lr, mom, dec, gam = make_inputs(2, seq, nh, DK, DV, optimizer=optimizer, seed=3, channel=True)
    w0 = torch.randn(nh, DV, DK, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) / DK**0.5
    o, _ = neural_memory(
        q,
        k,
        v,
        lr,
        None if optimizer == "gd" else mom,
        dec,
        {"w0": w0},
        window_gate=gam,
        architecture="linear",
        optimizer=optimizer,
        chunk_size=1,
        decay_first=decay_first,
    )
    eta = lr.unsqueeze(-1) * gam  # [B, T, H, dv]: Miras's channel-wise learning rate
    zero = torch.zeros_like(mom)
    for b in range(2):
        for h in range(nh):
            want = _linear_loop(
                q[b, :, h],
                k[b, :, h],
                v[b, :, h],
                eta[b, :, h],
                (zero if optimizer == "gd" else mom)[b, :, h],
                dec[b, :, h],
                w0[h],
                decay_first=decay_first,
            )
            assert rel_err(o[b, :, h], want) <= 1e-12, (b, h)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_equal_channels_are_the_per_head_gate(architecture, optimizer):
    q, k, v, lr, mom, dec, gam = make_inputs(2, 19, 2, DK, DV, optimizer=optimizer, seed=5)
    params = make_params(architecture, 2, DK, DV, HIDDEN)
    kw = dict(architecture=architecture, optimizer=optimizer, window=3, chunk_size=4, output_final_state=True)
    per_head, st1 = neural_memory(q, k, v, lr, mom, dec, params, window_gate=gam, **kw)
    per_channel, st2 = neural_memory(
        q, k, v, lr, mom, dec, params, window_gate=gam.unsqueeze(-1).expand(*gam.shape, DV), **kw
    )
    assert rel_err(per_channel, per_head) <= 1e-12
    for n in st1.weights:
        assert rel_err(st2.weights[n], st1.weights[n]) <= 1e-12


def test_channels_change_the_memory():
    """A gate that differs across channels is not a per-head one (the test above could pass with
    the channel dimension ignored)."""
    q, k, v, lr, mom, dec, gam = make_inputs(1, 9, 1, DK, DV, seed=6, channel=True)
    params = make_params("mlp", 1, DK, DV, HIDDEN)
    a, _ = neural_memory(q, k, v, lr, mom, dec, params, window_gate=gam)
    b, _ = neural_memory(q, k, v, lr, mom, dec, params, window_gate=gam.mean(-1))
    assert rel_err(a, b) > 1e-3


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("granularity", ["token", "chunk"])
def test_a_bad_channel_gate_never_reaches_earlier_tokens(optimizer, granularity):
    seq, at = 11, 6
    ins = make_inputs(2, seq, 2, DK, DV, optimizer=optimizer, lr_scale=0.5, channel=True)
    params = make_params("mlp", 2, DK, DV, HIDDEN)
    kw = dict(optimizer=optimizer, granularity=granularity, window=3, chunk_size=4)
    clean, _ = neural_memory(*ins[:6], params, window_gate=ins[6], **kw)
    for value in (float("nan"), 1e30):
        names = ("q", "k", "v", "lr", "momentum", "decay", "window_gate")
        bad = _poison(ins, "window_gate", value, at=at, names=names)
        if value == 1e30:  # out of [0, 1]: refused, naming the gate
            with pytest.raises(ValueError, match=r"^window_gate must be in \[0, 1\]; got 1e\+30"):
                neural_memory(*bad[:6], params, window_gate=bad[6], **kw)
            continue
        o, _ = neural_memory(*bad[:6], params, window_gate=bad[6], **kw)
        _same_before(o, clean, at, f"{kw} channel gate {value}")
        if granularity == "token":
            assert not torch.isfinite(o[0, at:, 1]).all()


def test_errors():
    q, k, v, lr, mom, dec, gam = make_inputs(1, 5, 2, DK, DV, channel=True)
    params = make_params("mlp", 2, DK, DV, HIDDEN)
    with pytest.raises(ValueError, match=r"^window_gate must have shape \[1, 5, 2, 6\]"):
        neural_memory(q, k, v, lr, mom, dec, params, window_gate=gam[..., :3])
    with pytest.raises(
        ValueError,
        match=r"^window_gate must be \[B, T, H\] = \[1, 5, 2\] or channel-wise \[B, T, H, dv\] = \[1, 5, 2, 6\]; "
        r"got shape \[1, 5, 2, 6, 1\]$",
    ):
        neural_memory(q, k, v, lr, mom, dec, params, window_gate=gam[..., None])
    _, st = neural_memory(q, k, v, lr, mom, dec, params, window_gate=gam, output_final_state=True)
    with pytest.raises(ValueError, match="^initial_state was made with a channel-wise window_gate"):
        neural_memory(q, k, v, lr, mom, dec, params, window_gate=gam[..., 0], initial_state=st)
    _, st = neural_memory(q, k, v, lr, mom, dec, params, output_final_state=True)
    with pytest.raises(ValueError, match=r"^initial_state was made with a per-head window_gate \(or none\)"):
        neural_memory(q, k, v, lr, mom, dec, params, window_gate=gam, initial_state=st)
    with pytest.raises(ValueError, match="^channel_lr_rank must be >= 0"):
        NeuralMemory(32, 2, 16, channel_lr_rank=-1)
    with pytest.raises(ValueError, match=r"^channel_lr_rank must be <= hidden_size \(32\)"):
        NeuralMemory(32, 2, 16, channel_lr_rank=10**12)


@pytest.mark.kernels
def test_triton_errors():
    pytest.importorskip("triton", reason="impl='triton' needs the kernels extra (pip install -e '.[kernels]')")
    q, k, v, lr, mom, dec, gam = make_inputs(1, 5, 2, DK, DV, channel=True)
    params = make_params("mlp", 2, DK, DV, HIDDEN)
    with pytest.raises(ValueError, match="^impl='triton' does not support a channel-wise window_gate"):
        neural_memory(q, k, v, lr, mom, dec, params, window_gate=gam, impl="triton")
    with pytest.raises(ValueError, match="^channel_lr_rank needs impl='chunk' or 'reference'"):
        NeuralMemory(32, 2, 16, channel_lr_rank=4, impl="triton")
    for preset in ("swdt", "transformer"):  # no NeuralMemory: the setting would be saved and do nothing
        with pytest.raises(
            ValueError,
            match=r"^memory settings \['channel_lr_rank'\] are unused: layer_pattern \['(kernel|attn)'\] has no "
            r"memory/mac/mag/mal block$",
        ):
            build(preset, memory={"channel_lr_rank": 4})


def test_cu_seqlens_documents_alone():
    q, k, v, lr, mom, dec, gam = make_inputs(1, 20, 2, DK, DV, seed=8, channel=True)
    params = make_params("mlp", 2, DK, DV, HIDDEN)
    kw = dict(window=3, chunk_size=4)
    packed, _ = neural_memory(q, k, v, lr, mom, dec, params, window_gate=gam, cu_seqlens=torch.tensor([0, 7, 20]), **kw)
    for lo, hi in ((0, 7), (7, 20)):
        alone, _ = neural_memory(
            *(x[:, lo:hi] for x in (q, k, v, lr, mom, dec)), params, window_gate=gam[:, lo:hi], **kw
        )
        assert rel_err(packed[:, lo:hi], alone) <= 1e-12


# ---- the layer and a model --------------------------------------------------------------------


def test_layer_rank_zero_is_the_per_head_layer():
    torch.manual_seed(0)
    plain = NeuralMemory(32, 2, 16, window=2)
    assert plain.channel_proj is None
    torch.manual_seed(0)
    channel = NeuralMemory(32, 2, 16, window=2, channel_lr_rank=4)
    assert channel.channel_proj[0].weight.shape == (4, 32) and channel.channel_proj[1].weight.shape == (32, 4)
    params = sum(p.numel() for p in channel.parameters()) - sum(p.numel() for p in plain.parameters())
    assert params == 4 * 32 + 32 * 4 + 32


def test_layer_gates_reach_the_op_per_channel():
    """The layer's channel gate is ``sigmoid(x W_down W_up)`` times gamma: zeroing one channel's gate
    (through its bias) leaves that channel of the memory's targets unlearned."""
    torch.manual_seed(1)
    layer = NeuralMemory(
        16, 1, 8, architecture="linear", optimizer="gd", use_decay=False, conv_size=0, channel_lr_rank=2
    ).double()
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    with torch.no_grad():
        layer.channel_proj[1].bias[3] = -1e4  # sigmoid -> 0: channel 3 never written
        _, state = layer(x, return_state=True)
    w = state.recurrent_state.weights["w0"][0, 0]  # [dv, dk], started at zero
    assert w[3].abs().max() == 0 and w.abs().sum() > 0


def test_model_with_channel_gates_trains_and_decodes_exactly():
    torch.manual_seed(0)
    model = build(
        "titans-lmm",
        memory={"channel_lr_rank": 4},
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=64,
    ).double()
    ids = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(1))
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "channel_proj" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        full = model(ids).logits
        step = model(ids[:, :5], use_cache=True)
        parts, cache = [step.logits], step.past_key_values
        for t in range(5, 21):
            step = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            parts.append(step.logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-9)


def test_linear_loop_helper_can_fail():
    """The loop above is not the op by construction: a per-head rate in it differs from the op's
    channel-wise one."""
    q, k, v, lr, mom, dec, gam = make_inputs(1, 6, 1, DK, DV, optimizer="gd", seed=9, channel=True)
    w0 = torch.zeros(1, DV, DK, dtype=torch.float64)
    o, _ = neural_memory(
        q, k, v, lr, None, dec, {"w0": w0}, window_gate=gam, architecture="linear", optimizer="gd", chunk_size=1
    )
    eta = (lr.unsqueeze(-1) * gam.mean(-1, keepdim=True)).expand_as(gam)
    want = _linear_loop(
        q[0, :, 0],
        k[0, :, 0],
        v[0, :, 0],
        eta[0, :, 0],
        torch.zeros(6, dtype=torch.float64),
        dec[0, :, 0],
        w0[0],
        decay_first=False,
    )
    assert rel_err(o[0, :, 0], want) > 1e-3
