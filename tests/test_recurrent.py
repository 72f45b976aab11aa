"""The decode step (``deepmemory.ops.recurrent``): one token as a recurrence, exact against the chunk form.

float64, random data: token by token equals one call over the sequence (outputs and every field of
the state), equals the chunk form read one token at a time (today's path), continues and is
continued by it at any split, has the same gradients, and never writes the state it is given.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from ops_cases import make_inputs, make_params, rel_err, streamed
from tiers import FAMILIES, REPEATS_ATLAS

import deepmemory.ops.api as api
from deepmemory.models import build, list_presets, preset_config
from deepmemory.ops import ARCHITECTURES, neural_memory
from deepmemory.tree import tensors

TOL = 1e-12
NH, DK, DV, HIDDEN = 2, 6, 6, 8

RULES = [
    dict(architecture=a, loss=l, optimizer=o, window=w, chunk_size=4)
    for a, l, o, w in itertools.product(ARCHITECTURES, ("l2", "dot"), ("gd", "momentum", "muon"), (1, 3))
]
RULE_IDS = ["-".join(str(v) for k, v in r.items() if k != "chunk_size") for r in RULES]
EXTRA = {  # the rest of the rule's fields, each once
    "layer-norm": dict(architecture="mlp", optimizer="momentum", window=3, chunk_size=4, layer_norm=True),
    "no-residual": dict(architecture="gated_mlp", optimizer="muon", window=2, chunk_size=5, residual=False),
    "depth-3-silu": dict(architecture="mlp", depth=3, activation="silu", optimizer="momentum", chunk_size=3),
    "decay-first": dict(architecture="linear", optimizer="gd", chunk_size=1, decay_first=True, residual=False),
    "decay-first-mlp": dict(architecture="mlp", optimizer="momentum", window=2, chunk_size=1, decay_first=True),
    "chunk-1-muon": dict(architecture="mlp", optimizer="muon", window=4, chunk_size=1, ns_steps=3),
}


def _inputs(kw, seq, *, channel=False, gate=True, decay=True, seed=0, lr_scale=1.0):
    ins = list(
        make_inputs(2, seq, NH, DK, DV, optimizer=kw["optimizer"], seed=seed, channel=channel, lr_scale=lr_scale)
    )
    if kw["optimizer"] == "gd":
        ins[4] = None
    if not decay:
        ins[5] = None
    if not gate:
        ins[6] = None
    return ins


def _params(kw):
    gen = torch.Generator().manual_seed(1)
    return make_params(kw["architecture"], NH, DK, DV, HIDDEN, depth=kw.get("depth", 2), gen=gen)


def _one_call(ins, params, kw):
    return neural_memory(*ins[:6], params, window_gate=ins[6], output_final_state=True, **kw)


def _same_state(a, b, tol=TOL):
    """Every tensor of two op states (weights, momenta, chunk starts, window, pending gates) within ``tol``."""
    assert a.seen == b.seen and a.pending == b.pending and a.rule == b.rule
    ta, tb = tensors(a), tensors(b)
    assert len(ta) == len(tb)
    for x, y in zip(ta, tb):
        assert x.shape == y.shape and x.dtype == y.dtype
        if x.numel():
            assert rel_err(x, y) <= tol


def _chunk_path_only(monkeypatch):
    monkeypatch.setattr(api, "step_supported", lambda rule: False)


@pytest.mark.parametrize("kw", RULES + list(EXTRA.values()), ids=RULE_IDS + list(EXTRA))
def test_token_by_token_equals_one_call(kw):
    ins, params = _inputs(kw, 11), _params(kw)
    o, st = _one_call(ins, params, kw)
    o_step, st_step = streamed(ins, params, range(1, 11), **kw)
    assert rel_err(o_step, o) <= TOL
    _same_state(st_step, st)


@pytest.mark.parametrize("kw", [RULES[i] for i in (2, 9, 16, 27, 33)] + [EXTRA["decay-first"]])
def test_each_step_equals_the_chunk_form_read_one_token_at_a_time(kw, monkeypatch):
    """State by state against today's path: the chunk form called with one token (no recurrence)."""
    ins, params = _inputs(kw, 9), _params(kw)
    states = []
    for t in range(1, 10):
        states.append(streamed([None if x is None else x[:, :t] for x in ins], params, range(1, t), **kw))
    _chunk_path_only(monkeypatch)
    for t, (o_step, st_step) in enumerate(states, 1):
        o, st = streamed([None if x is None else x[:, :t] for x in ins], params, range(1, t), **kw)
        assert rel_err(o_step, o) <= TOL
        _same_state(st_step, st)


@pytest.mark.parametrize("seq", [1, 7, 63, 100, 257])
@pytest.mark.parametrize("chunk_size", [1, 4, 16])
def test_lengths_and_chunk_sizes(seq, chunk_size):
    kw = dict(architecture="mlp", loss="l2", optimizer="momentum", window=1, chunk_size=chunk_size)
    # (stale steps of chunks of 16 at the full rate diverge on random data: a fifth of it stays finite)
    ins, params = _inputs(kw, seq, gate=False, seed=seq, lr_scale=0.2), _params(kw)
    o, st = _one_call(ins, params, kw)
    o_step, st_step = streamed(ins, params, range(1, seq), **kw)
    assert torch.isfinite(o).all() and rel_err(o_step, o) <= TOL
    _same_state(st_step, st)


@pytest.mark.parametrize(
    "kw,cuts",
    [
        (RULES[15], [1, 2, 7, 8, 9, 14]),  # mlp dot momentum window 3: steps inside and across chunks of 4
        (RULES[29], [3, 4, 5, 10, 11, 12, 13]),  # gated_mlp muon window 3: chunk calls resume after steps
        (EXTRA["layer-norm"], [5, 6, 15, 16]),
    ],
    ids=["mlp-dot-momentum-3", "gated_mlp-muon-3", "layer-norm"],
)
def test_steps_and_chunk_calls_continue_each_other(kw, cuts):
    ins, params = _inputs(kw, 19), _params(kw)
    o, st = _one_call(ins, params, kw)
    o_mix, st_mix = streamed(ins, params, cuts, **kw)
    assert rel_err(o_mix, o) <= TOL
    _same_state(st_mix, st)


@pytest.mark.parametrize("optimizer", ["gd", "momentum", "muon"])
def test_without_window_gate_or_decay_and_channel_wise(optimizer):
    for extra in (dict(gate=False), dict(decay=False), dict(channel=True)):
        kw = dict(architecture="mlp", optimizer=optimizer, window=3, chunk_size=4)
        ins, params = _inputs(kw, 13, **extra), _params(kw)
        o, st = _one_call(ins, params, kw)
        o_step, st_step = streamed(ins, params, range(1, 13), **kw)
        assert rel_err(o_step, o) <= TOL, extra
        _same_state(st_step, st)


@pytest.mark.parametrize("kw", [RULES[9], RULES[17], EXTRA["decay-first"]], ids=["mlp-momentum", "mlp-muon", "gdn"])
def test_gradients_equal_one_call(kw):
    ins, params = _inputs(kw, 9), _params(kw)
    leaves = [x.clone().requires_grad_() for x in ins if x is not None]
    weights = {n: p.clone().requires_grad_() for n, p in params.items()}

    def grads(run):
        it = iter(leaves)
        args = [None if x is None else next(it) for x in ins]
        o, st = run(args)
        r = torch.randn(o.shape, dtype=o.dtype, generator=torch.Generator().manual_seed(3))
        loss = (o * r).sum() + sum(t.square().sum() for t in st.weights.values())
        return torch.autograd.grad(loss, leaves + list(weights.values()))

    one = grads(lambda a: _one_call(a, weights, kw))
    step = grads(lambda a: streamed(a, weights, range(1, 9), **kw))
    for g1, g2 in zip(one, step):
        assert rel_err(g2, g1) <= 1e-10


def test_the_state_given_is_not_written_and_continues_twice():
    kw = RULES[9]
    ins, params = _inputs(kw, 6), _params(kw)
    _, st = streamed([None if x is None else x[:, :5] for x in ins], params, range(1, 5), **kw)
    before = [t.clone() for t in tensors(st)]
    last = [None if x is None else x[:, 5:] for x in ins]
    with torch.no_grad():
        first = neural_memory(*last[:6], params, window_gate=last[6], initial_state=st, output_final_state=True, **kw)
        again = neural_memory(*last[:6], params, window_gate=last[6], initial_state=st, output_final_state=True, **kw)
    assert all(torch.equal(a, b) for a, b in zip(tensors(st), before))
    assert torch.equal(first[0], again[0])


def test_lower_precision_matches_the_chunk_form(monkeypatch):
    kw = RULES[17]  # mlp momentum... (l2 muon window 3)
    ins, params = _inputs(kw, 7), _params(kw)
    ins = [None if x is None else x.float() for x in ins]
    params = {n: p.float() for n, p in params.items()}
    o_step, st_step = streamed(ins, params, range(1, 7), **kw)
    _chunk_path_only(monkeypatch)
    o, st = streamed(ins, params, range(1, 7), **kw)
    assert o_step.dtype == torch.float32 and rel_err(o_step, o) <= 1e-5
    _same_state(st_step, st, tol=1e-5)


def _preset_tol(name):
    """1e-12, or 1e-11 where Muon orthogonalises: its Newton-Schulz iterations amplify rounding, and today's
    chunk form read one token at a time is itself up to 5e-12 from one pass there (atlas-pp, 37 tokens)."""
    return 1e-11 if preset_config(name).rule.optimizer == "muon" else TOL


def _memory_presets(fast=FAMILIES):
    """The presets with a neural memory: ``fast`` in the fast loop, the Atlas repeats opt-in, the rest slow."""
    return [
        name
        if name in fast
        else pytest.param(name, marks=pytest.mark.long if name in REPEATS_ATLAS else pytest.mark.slow)
        for name in list_presets()
        if preset_config(name).memory
    ]


@pytest.mark.parametrize("name", _memory_presets())
def test_preset_decodes_token_by_token_like_one_pass(name):
    """Every memory preset, float64: a 7-token prompt, then one token a call to 23, against one forward."""
    torch.manual_seed(0)
    kw = dict(attention_window=5, segment_size=6)
    if not preset_config(name).rule.decay_first:
        kw["memory"] = dict(chunk_size=4)
    model = build(name, **kw).double().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :7], use_cache=True)
        cache, logits = out.past_key_values, [out.logits]
        for t in range(7, 23):
            logits.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
    assert rel_err(torch.cat(logits, 1), full) <= _preset_tol(name)


@pytest.mark.parametrize("name", _memory_presets(fast=("gated-deltanet", "titans-mac")))
def test_preset_prompt_in_pieces_equals_one_pass(name):
    """Prefill: a 37-token prompt read through the cache in pieces (the evaluator's ``read_prompt`` at
    several chunk sizes, and uneven cuts at and next to chunk and segment ends) gives the logits of
    one pass, float64."""
    from deepmemory.eval import read_prompt
    from deepmemory.models import DeepMemoryCache

    torch.manual_seed(0)
    kw = dict(attention_window=5, segment_size=6)
    if not preset_config(name).rule.decay_first:
        kw["memory"] = dict(chunk_size=4)
    model = build(name, **kw).double().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        for size in (1, 4, 7, 16, 37):
            got = read_prompt(model, ids, DeepMemoryCache(model.config), size)
            assert rel_err(got, full[:, -1]) <= _preset_tol(name), size
        for cuts in ([1, 2, 3, 4, 5, 12, 13, 24, 30], [11, 12, 23, 36]):
            cache, pieces = DeepMemoryCache(model.config), []
            for lo, hi in zip([0, *cuts], [*cuts, 37]):
                pieces.append(model(ids[:, lo:hi], past_key_values=cache, use_cache=True).logits)
            assert rel_err(torch.cat(pieces, 1), full) <= _preset_tol(name), cuts
