"""The UpdateRule object (validation, round trips, the op/layer/config/presets sharing it) and the
memory LayerNorm option (ATLAS App. E) in every implementation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from ops_cases import make_inputs, make_params, rel_err
from test_ops import DK, DV, HIDDEN, _compare

from deepmemory.layers import NeuralMemory
from deepmemory.models import DeepMemoryConfig, preset_config
from deepmemory.ops import ARCHITECTURES, MemorySpec, UpdateRule, memory_read, neural_memory
from deepmemory.ops.memory import dense_apply, memory_forward


def test_rule_validates_at_construction():
    with pytest.raises(ValueError, match="optimizer must be one of 'gd', 'momentum', 'muon'; got 'adam'"):
        UpdateRule(optimizer="adam")
    with pytest.raises(ValueError, match="window must be >= 1; got 0"):
        UpdateRule(window=0)
    with pytest.raises(TypeError, match="layer_norm must be a bool; got int"):
        UpdateRule(layer_norm=1)
    with pytest.raises(TypeError, match="has no field"):
        UpdateRule().replace(windw=3)
    rule = UpdateRule(architecture="gated_mlp", window=4, layer_norm=True)
    with pytest.raises(dataclasses_frozen_error()):
        rule.window = 5  # frozen
    assert UpdateRule(**json.loads(json.dumps(rule.to_dict()))) == rule
    assert rule.spec == MemorySpec("gated_mlp", 2, "gelu", True, True)


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_op_takes_a_rule_or_its_keywords():
    rule = UpdateRule(architecture="mlp", optimizer="muon", window=3, chunk_size=4)
    q, k, v, lr, mom, dec, gamma = make_inputs(1, 9, 2, DK, DV, optimizer="muon")
    params = make_params("mlp", 2, DK, DV, HIDDEN)
    a, sa = neural_memory(q, k, v, lr, mom, dec, params, rule=rule, window_gate=gamma, output_final_state=True)
    b, sb = neural_memory(
        q,
        k,
        v,
        lr,
        mom,
        dec,
        params,
        architecture="mlp",
        optimizer="muon",
        window=3,
        chunk_size=4,
        window_gate=gamma,
        output_final_state=True,
    )
    assert torch.equal(a, b) and sa.rule == sb.rule == rule
    with pytest.raises(ValueError, match="not both"):
        neural_memory(q, k, v, lr, mom, dec, params, rule=rule, window=3)
    with pytest.raises(TypeError, match="rule must be an UpdateRule"):
        neural_memory(q, k, v, lr, mom, dec, params, rule={"window": 3})
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['windw'\]"):
        neural_memory(q, k, v, lr, mom, dec, params, windw=3)
    with pytest.raises(ValueError, match="initial_state was made with settings window=3, not window=2"):
        neural_memory(q, k, v, lr, mom, dec, params, rule=rule.replace(window=2), initial_state=sa)


def test_layer_config_and_presets_share_the_rule():
    layer = NeuralMemory(32, 2, 16, chunk_size=8, optimizer="gd", layer_norm=True)
    # the layer's own default: the stale-step bound on (gd, momentum), off for Muon
    assert layer.rule == UpdateRule(chunk_size=8, optimizer="gd", layer_norm=True, step_bound=1.0)
    assert NeuralMemory(32, 2, 16, optimizer="muon").rule.step_bound is None
    assert NeuralMemory(32, 2, 16, rule=layer.rule).rule == layer.rule
    with pytest.raises(ValueError, match="not both"):
        NeuralMemory(32, 2, 16, rule=layer.rule, window=2)
    with pytest.raises(ValueError, match="NeuralMemory settings must be one of"):
        NeuralMemory(32, 2, 16, windw=2)
    config = preset_config("atlas", memory={"layer_norm": True})
    assert config.rule.optimizer == "muon" and config.rule.layer_norm
    again = DeepMemoryConfig.from_dict(config.to_dict())
    assert again.rule == config.rule
    with pytest.raises(TypeError, match=r"memory\['layer_norm'\] must be a bool"):
        DeepMemoryConfig(layer_pattern="memory", memory={"layer_norm": "yes"})


@pytest.mark.parametrize("memory", ARCHITECTURES)
def test_layer_norm_read_is_the_papers_function(memory):
    # an independent check: M(x) = x + LN(h(x)) with torch's own layer_norm, written out per kind
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 5, DK, dtype=torch.float64, generator=g)
    w = {n: t.expand(2, *t.shape) for n, t in make_params(memory, 2, DK, DV, HIDDEN, gen=g).items()}
    if memory == "linear":
        h = torch.einsum("bhrc,bhnc->bhnr", w["w0"], x)
        want = F.layer_norm(h, (DV,), eps=1e-5)
    elif memory == "mlp":
        h = torch.einsum("bhrc,bhnc->bhnr", w["w1"], F.gelu(torch.einsum("bhrc,bhnc->bhnr", w["w0"], x)))
        want = x + F.layer_norm(h, (DV,), eps=1e-5)
    else:
        gate = F.gelu(torch.einsum("bhrc,bhnc->bhnr", w["w_gate"], x)) * torch.einsum("bhrc,bhnc->bhnr", w["w_up"], x)
        want = x + F.layer_norm(torch.einsum("bhrc,bhnc->bhnr", w["w_out"], gate), (DV,), eps=1e-5)
    rule = UpdateRule(architecture=memory, layer_norm=True)
    got = memory_forward(rule.spec, dense_apply(w), x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    read = memory_read(x.transpose(1, 2), w, rule=rule)
    torch.testing.assert_close(read, want.transpose(1, 2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("memory", ARCHITECTURES)
@pytest.mark.parametrize(
    "optimizer,granularity",
    [("gd", "token"), ("momentum", "token"), ("muon", "token"), ("momentum", "chunk"), ("muon", "chunk")],
)
def test_layer_norm_chunk_equals_reference(memory, optimizer, granularity):
    kw = dict(
        architecture=memory,
        loss="l2",
        optimizer=optimizer,
        granularity=granularity,
        window=3,
        chunk_size=4,
        layer_norm=True,
    )
    _compare(kw, seq=11, all_grads_live=True)


@pytest.mark.parametrize("seq,chunk_size", [(1, 4), (7, 1), (63, 16), (100, 16)])
def test_layer_norm_odd_lengths_dot_loss(seq, chunk_size):
    kw = dict(architecture="mlp", loss="dot", optimizer="momentum", window=2, chunk_size=chunk_size, layer_norm=True)
    _compare(kw, bsz=1, seq=seq, nh=1, grad=seq <= 63, seed=seq)


def test_layer_norm_streams_at_any_split():
    rule = UpdateRule(architecture="mlp", optimizer="momentum", window=3, chunk_size=4, layer_norm=True)
    seq = 15
    q, k, v, lr, mom, dec, gamma = make_inputs(2, seq, 2, DK, DV)
    params = make_params("mlp", 2, DK, DV, HIDDEN)
    o, st = neural_memory(q, k, v, lr, mom, dec, params, rule=rule, window_gate=gamma, output_final_state=True)
    for cut in (1, 6, 9):
        a, b = slice(0, cut), slice(cut, seq)
        o1, s1 = neural_memory(
            q[:, a],
            k[:, a],
            v[:, a],
            lr[:, a],
            mom[:, a],
            dec[:, a],
            params,
            rule=rule,
            window_gate=gamma[:, a],
            output_final_state=True,
        )
        o2, s2 = neural_memory(
            q[:, b],
            k[:, b],
            v[:, b],
            lr[:, b],
            mom[:, b],
            dec[:, b],
            params,
            rule=rule,
            window_gate=gamma[:, b],
            initial_state=s1,
            output_final_state=True,
        )
        assert rel_err(torch.cat([o1, o2], 1), o) <= 1e-10
        assert all(rel_err(s2.weights[n], st.weights[n]) <= 1e-10 for n in st.weights)


def test_layer_norm_changes_the_output():
    q, k, v, lr, mom, dec, gamma = make_inputs(1, 8, 2, DK, DV)
    params = make_params("mlp", 2, DK, DV, HIDDEN)
    with_ln, _ = neural_memory(q, k, v, lr, mom, dec, params, chunk_size=4, layer_norm=True)
    without, _ = neural_memory(q, k, v, lr, mom, dec, params, chunk_size=4)
    assert (with_ln - without).abs().max() > 1e-3


@pytest.mark.kernels
def test_triton_refuses_layer_norm():
    pytest.importorskip("triton", reason="impl='triton' needs the kernels extra")
    q, k, v, lr, mom, dec, gamma = make_inputs(1, 8, 2, DK, DV)
    params = make_params("mlp", 2, DK, DV, HIDDEN)
    with pytest.raises(ValueError, match="no layer_norm"):
        neural_memory(
            q.float(),
            k.float(),
            v.float(),
            lr.float(),
            mom.float(),
            dec.float(),
            {n: p.float() for n, p in params.items()},
            chunk_size=4,
            layer_norm=True,
            impl="triton",
        )


def test_reads_and_layers_name_their_bad_inputs():
    rule = UpdateRule(architecture="mlp")
    w = make_params("mlp", 2, DK, DV, HIDDEN)
    q = torch.randn(1, 3, 2, DK, dtype=torch.float64)
    with pytest.raises(TypeError, match="q must be float16, bfloat16, float32 or float64; got torch.int64"):
        memory_read(q.long(), w, rule=rule)
    with pytest.raises(TypeError, match="weights must be a dict of tensors; got list"):
        memory_read(q, [w["w0"]], rule=rule)
    with pytest.raises(TypeError, match="x must be a floating-point tensor; got torch.int64"):
        NeuralMemory(32, 2, 16)(torch.zeros(1, 3, 32, dtype=torch.long))
    assert preset_config("transformer").rule is None and preset_config("deep-transformer").rule is None


def test_check_messages_show_the_value_and_refuse_inf():
    with pytest.raises(TypeError, match="depth must be an int; got float 2.0"):
        UpdateRule(depth=2.0)
    with pytest.raises(TypeError, match="residual must be a bool; got str 'yes'"):
        UpdateRule(residual="yes")
    for bad in (float("inf"), float("nan"), 0.0):
        with pytest.raises(ValueError, match=r"max_lr'\] must be a positive number"):
            DeepMemoryConfig(layer_pattern="memory", memory={"max_lr": bad})


def test_renamed_settings_say_their_new_name():
    q = torch.randn(1, 3, 2, 4)
    with pytest.raises(TypeError, match="'memory' was renamed 'architecture'"):
        neural_memory(q, q, q, torch.rand(1, 3, 2), torch.rand(1, 3, 2), None, {}, memory="mlp")
    with pytest.raises(ValueError, match="'memory' was renamed 'architecture'"):
        NeuralMemory(16, 2, 8, memory="linear")
