"""Every preset under bfloat16 autocast and in bfloat16/float16 weights: finite and close to float32.

Errors are relative to the float32 run of the same tiny model on the same tokens: logits
``max|l - l32| / max|l32|``, gradients ``||g - g32|| / ||g32||`` over all parameters at once. The
tolerances are 2.5 to 3 times the largest error measured over every preset and five seeds
(docs/numerics.md). The largest are those of the linear memories (gated-deltanet, swla), whose
zero-initialised memory gets a gradient summed over every token; elsewhere the errors are a few
times bfloat16's unit roundoff (2^-9) and about 8 times smaller in float16 (3 more mantissa bits).
"""

import contextlib
import copy
import dataclasses
import os
import sysconfig

import pytest
import torch
import torch.nn.functional as F
from tiers import every_preset, family_slow_rest_long

import deepmemory.layers.kernel_memory as kernel_memory_module
import deepmemory.layers.memory_layer as memory_layer_module
from deepmemory.data.loader import WindowSampler
from deepmemory.data.tokenizers import ByteTokenizer
from deepmemory.layers import KernelMemory, NeuralMemory
from deepmemory.layers.feature_maps import PolynomialFeatureMap
from deepmemory.models import build, preset_config
from deepmemory.ops import MemoryState
from deepmemory.tree import tensors

BF16 = torch.bfloat16
# mode -> (logits tolerance, gradient tolerance); largest measured: autocast (5.4e-2, 8.1e-2),
# bfloat16 weights (7.4e-2, 1.6e-1), float16 weights (8.4e-3, 1.1e-2)
TOLERANCE = {"autocast-bf16": (0.15, 0.25), "bf16": (0.2, 0.4), "fp16": (0.025, 0.03)}


def autocast_bf16():
    return torch.autocast("cpu", dtype=BF16)


def tiny(name, seed=0):
    """The tiny preset with windows, segments and chunks that 32 tokens cross several times."""
    kw = dict(attention_window=5, segment_size=6)
    if preset_config(name).memory and not preset_config(name).rule.decay_first:  # forgetting first is online: chunk 1
        kw["memory"] = dict(chunk_size=4)
    if preset_config(name).kernel:
        kw["kernel"] = dict(chunk_size=4)
    torch.manual_seed(seed)
    return build(name, **kw).train()


def step(model, ids, context=None):
    """Forward and backward on ``ids``: logits and the gradient of every parameter, in float32."""
    model.zero_grad(set_to_none=True)
    with context or contextlib.nullcontext():
        out = model(ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == sum(1 for p in model.parameters() if p.requires_grad)
    return out.logits.detach().float(), torch.cat([g.float().flatten() for g in grads])


def errors(name, mode, seed=0):
    """Relative errors (logits, gradients) of ``mode`` against float32; asserts finiteness."""
    model = tiny(name, seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(seed + 1))
    ref_logits, ref_grads = step(model, ids)
    if mode == "autocast-bf16":
        logits, grads = step(model, ids, autocast_bf16())
    else:
        model = copy.deepcopy(model).to({"bf16": BF16, "fp16": torch.float16}[mode])
        logits, grads = step(model, ids)
    assert torch.isfinite(logits).all() and torch.isfinite(grads).all(), f"{name} {mode}: not finite"
    err_logits = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
    err_grads = ((grads - ref_grads).norm() / ref_grads.norm()).item()
    return err_logits, err_grads


@pytest.mark.parametrize("mode", list(TOLERANCE))
@pytest.mark.parametrize("name", every_preset())
def test_low_precision_is_finite_and_close_to_float32(name, mode):
    """Forward and backward under bfloat16 autocast (``mode="autocast-bf16"``, float32 weights) or
    with the model's weights in bfloat16 / float16: finite, and close to float32."""
    err_logits, err_grads = errors(name, mode)
    tol_logits, tol_grads = TOLERANCE[mode]
    assert err_logits < tol_logits, f"{name} {mode}: logits relative error {err_logits:.2e} >= {tol_logits}"
    assert err_grads < tol_grads, f"{name} {mode}: gradient relative error {err_grads:.2e} >= {tol_grads}"


def test_autocast_gives_bf16_logits_and_a_float32_memory_state():
    model = tiny("atlas")
    ids = torch.randint(0, 256, (1, 9))
    with autocast_bf16():
        out = model(ids, use_cache=True)
    assert out.logits.dtype == BF16
    # the memory op runs outside autocast on bfloat16 inputs: its state is float32 (docs/ops.md)
    memory_states = _find(out.past_key_values.states, MemoryState)
    assert len(memory_states) == 2 and all(t.dtype == torch.float32 for s in memory_states for t in tensors(s.weights))


def _find(state, cls):
    """Every ``cls`` in a nest of dataclasses, dicts, lists and tuples."""
    if isinstance(state, cls):
        return [state]
    if isinstance(state, dict):
        state = list(state.values())
    elif dataclasses.is_dataclass(state):
        state = [getattr(state, f.name) for f in dataclasses.fields(state)]
    return [found for item in state for found in _find(item, cls)] if isinstance(state, (list, tuple)) else []


def test_polynomial_features_keep_the_input_dtype_under_autocast():
    phi = PolynomialFeatureMap(4, 3, 2)
    x = torch.randn(3, 2, 4)
    with autocast_bf16():  # autocast runs prod in float32
        features = phi(x.to(BF16))
        kernel = phi.kernel(x.to(BF16), x.to(BF16))
    assert features.dtype == BF16 and kernel.dtype == BF16
    torch.testing.assert_close(features.float(), phi(x.to(BF16).float()), rtol=2e-2, atol=1e-2)


def _mixers():
    yield "identity", NeuralMemory(16, 2, 8, chunk_size=4)
    yield "polynomial", NeuralMemory(16, 2, 8, chunk_size=4, window=3, feature_map="polynomial")
    yield "muon", NeuralMemory(16, 2, 8, chunk_size=4, optimizer="muon", granularity="chunk")
    yield "kernel", KernelMemory(16, 2, 8, chunk_size=4, window=5)


@pytest.mark.parametrize("normalize_in_float32", [False, True])
@pytest.mark.parametrize("which", ["identity", "polynomial", "muon", "kernel"])
def test_mixers_hand_their_op_one_dtype_with_autocast_off(which, normalize_in_float32, monkeypatch):
    """Under autocast the ops see q, k, v and the gates in autocast's dtype and run with autocast
    off, also where q and k leave their normalisation in float32 and v does not (CUDA's autocast
    runs ``norm`` in float32; simulated here on the CPU)."""
    torch.manual_seed(0)
    layer = dict(_mixers())[which]
    if normalize_in_float32:
        normalize = F.normalize
        monkeypatch.setattr(F, "normalize", lambda t, *a, **kw: normalize(t.float(), *a, **kw))
    module, op = (
        (kernel_memory_module, "kernel_memory") if which == "kernel" else (memory_layer_module, "neural_memory")
    )
    seen = []
    original = getattr(module, op)

    def spy(*args, **kwargs):  # q, k, v, lr (and momentum, decay, window gate); not the weights
        inputs = [a for a in args[: 4 if which == "kernel" else 6] if a is not None]
        inputs += [kwargs["window_gate"]] if kwargs.get("window_gate") is not None else []
        seen.append(({t.dtype for t in inputs}, torch.is_autocast_enabled("cpu")))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, op, spy)
    x = torch.randn(2, 11, 16)
    with autocast_bf16():
        y = layer(x)
    y.float().sum().backward()
    assert seen == [({BF16}, False)]
    assert y.dtype == BF16 and torch.isfinite(y).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


def byte_tokens():
    """Bytes of one standard-library module: real text, on every machine with Python."""
    with open(os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py"), "rb") as f:
        return ByteTokenizer().encode(f.read())


@pytest.mark.parametrize("name", family_slow_rest_long())
def test_trains_200_steps_under_bf16_autocast(name):
    """200 AdamW steps (the trainer's lr, weight decay and clipping) on batches of 2 x 32 bytes of
    real text under bfloat16 autocast, one block (the mixers' numerics, at half the cost of the tiny
    preset's two): loss, gradients and weights stay finite and the loss falls (to about 0.4-0.5 of
    its start; 0.6 is asserted)."""
    torch.manual_seed(0)
    model = build(name, num_hidden_layers=1, attention_window=16, segment_size=16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    data = WindowSampler(byte_tokens(), 32, seed=0)
    losses = []
    for i in range(200):
        ids = data.next_batch(2)[:, :32]
        with autocast_bf16():
            loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        assert torch.isfinite(loss) and torch.isfinite(norm), (
            f"{name}: step {i}: loss {loss.item()}, grad norm {norm.item()}"
        )
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(losses[-20:]) / 20 < 0.6 * losses[0], f"{name}: loss {losses[0]:.3f} -> {sum(losses[-20:]) / 20:.3f}"
