"""The causal LM over every preset: training step, exact cached decoding, streaming, presets, errors."""

import pytest
import torch
from tiers import FAMILIES, every_preset

from deepmemory.models import DeepMemoryCache, DeepMemoryConfig, build, count_parameters, list_presets, preset_config

PRESETS = list_presets()
# small windows, segments and chunks so that a 23-token sequence crosses all of them
SMALL = dict(attention_window=5, segment_size=6)


def small(name, **overrides):
    kw = dict(SMALL, **overrides)
    if preset_config(name).memory and not preset_config(name).rule.decay_first:  # forgetting first is online: chunk 1
        kw["memory"] = dict(chunk_size=4, **kw.get("memory", {}))
    if preset_config(name).kernel:
        kw["kernel"] = dict(chunk_size=4, **kw.get("kernel", {}))
    return kw


def tiny64(name, seed=0, **overrides):
    torch.manual_seed(seed)
    return build(name, **small(name, **overrides)).double().eval()


def test_presets_are_listed():
    assert len(PRESETS) == 17 and "titans-mac" in PRESETS and "atlas-pp" in PRESETS


@pytest.mark.parametrize("name", every_preset())
def test_forward_backward(name):
    torch.manual_seed(0)
    model = build(name).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 19))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 19, model.config.vocab_size)
    assert out.past_key_values is None  # training steps do not build a cache
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", every_preset())
def test_last_position_sees_every_earlier_position(name):
    """No blind spots: at the tiny size, the logits at the last position of a two-chunk input (32
    tokens, chunks of 16) have a non-zero gradient with respect to every earlier position's input
    embedding. (One memory update per chunk leaves the chunk's own positions out of its reads: the
    memory-only Atlas at granularity="chunk" did not see positions 16-24 from position 31.)"""
    torch.manual_seed(0)
    model = build(name).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    x = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=x).logits[0, -1]
    (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    blind = (x.grad[0].abs().sum(-1) == 0).nonzero().flatten().tolist()
    assert not blind, f"{name}: the last position's logits do not depend on positions {blind}"


@pytest.mark.parametrize("name", every_preset())
def test_cached_decoding_matches_full_pass(name):
    model = tiny64(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    out = model(ids[:, :7], use_cache=True)
    steps = [out.logits]
    cache = out.past_key_values
    for t in range(7, ids.shape[1]):
        out = model(ids[:, t : t + 1], past_key_values=cache)
        assert out.past_key_values is cache
        steps.append(out.logits)
    assert cache.get_seq_length() == 23
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", every_preset())
def test_segments_with_cache_match_one_pass(name):
    model = tiny64(name, seed=2)
    ids = torch.randint(0, model.config.vocab_size, (1, 29), generator=torch.Generator().manual_seed(3))
    full = model(ids).logits
    cache, parts, start = None, [], 0
    for n in (5, 1, 11, 3, 9):
        out = model(ids[:, start : start + n], past_key_values=cache, use_cache=True)
        cache, start = out.past_key_values, start + n
        parts.append(out.logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-9)


def test_loss_is_shifted_cross_entropy_with_ignore_index():
    model = tiny64("titans-lmm")
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[0, 5] = labels[1, 9] = -100
    out = model(ids, labels=labels)
    logp = out.logits.log_softmax(-1)[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    expected = -logp[keep].gather(-1, target[keep][:, None]).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)


# state grows with the context, like a KV cache (SWDT and Dot: the Omega rule keeps every token, ATLAS eq. 27)
GLOBAL = ("transformer", "deep-transformer", "swdt", "dot")


@pytest.mark.parametrize("name", every_preset())
def test_state_is_bounded_except_for_global_attention(name):
    model = tiny64(name)
    cache, sizes = None, []
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _ in range(14):
            ids = torch.randint(0, 256, (1, 7), generator=gen)
            cache = model(ids, past_key_values=cache, use_cache=True).past_key_values
            sizes.append(cache.nbytes())
    assert cache.get_seq_length() == 14 * 7
    if name in GLOBAL:
        assert all(b > a for a, b in zip(sizes, sizes[1:]))
    else:  # windows, segments and the unfinished chunk are bounded: 98 tokens need no more than 49
        assert max(sizes[7:]) <= max(sizes[:7])


def test_cache_detach_cuts_the_graph():
    model = tiny64("titans-mac")
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(7))
    cache = model(ids, use_cache=True).past_key_values
    assert any(t.requires_grad for s in cache.states for t in _leaves(s))
    cache.detach()
    assert not any(t.requires_grad for s in cache.states for t in _leaves(s))
    model(ids, past_key_values=cache)  # still usable


def _leaves(state):
    from deepmemory.tree import tensors

    return tensors(state)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_overfits_a_fixed_batch(name):
    torch.manual_seed(0)
    model = build(name, segment_size=16).train()
    ids = torch.randint(0, model.config.vocab_size, (1, 25))
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    first = None
    for _ in range(100):
        loss = model(ids, labels=ids).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.1 * first:
            break
    assert loss.item() < 0.1 * first, f"{name}: loss {first:.3f} -> {loss.item():.3f}"


def test_unknown_preset_and_size_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid presets: transformer, swa, .*titans-mac.*dot"):
        build("titans")
    with pytest.raises(ValueError, match="valid sizes: tiny, tiny-w16, 170m, 340m, 760m, 1.3b"):
        preset_config("atlas", "7b")
    with pytest.raises(ValueError, match="unknown config field.*hiden_size"):
        preset_config("atlas", hiden_size=32)
    with pytest.raises(ValueError, match="memory settings must be one of .*'wndow'"):
        preset_config("atlas", memory={"wndow": 3})


def test_overrides_merge_memory_settings():
    config = preset_config("atlas", memory={"window": 4}, num_layers=3)
    assert config.memory["window"] == 4 and config.memory["optimizer"] == "muon"
    assert config.memory["feature_map"] == "polynomial" and config.num_hidden_layers == 3
    assert config.layer_pattern == ["memory"] * 3
    assert preset_config("swdt", attention_window=7, kernel={"window": "attention"}).kernel["window"] == 7


@pytest.mark.parametrize(
    "ids, error, match",
    [
        (torch.tensor([[1, 2, 256]]), ValueError, r"input_ids must lie in \[0, 256\)"),
        (torch.tensor([[3, -1, 2]]), ValueError, r"input_ids must lie in \[0, 256\)"),
        (torch.zeros(2, 0, dtype=torch.long), ValueError, "input_ids is empty"),
        (torch.tensor([[1.0, 2.0]]), TypeError, "integer token ids"),
        (torch.tensor([1, 2, 3]), ValueError, r"\[batch, seq\]"),
    ],
)
def test_bad_token_ids_fail_clearly(ids, error, match):
    model = build("titans-lmm")
    with pytest.raises(error, match=match):
        model(ids)


def test_other_bad_inputs_fail_clearly():
    model = build("transformer")
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="attention_mask must hold 0"):
        model(ids, attention_mask=torch.tensor([[0, 2, 1]]))
    with pytest.raises(ValueError, match="position_ids must be"):
        model(ids, position_ids=torch.tensor([[0, 1]]))
    with pytest.raises(TypeError, match="the cache must be a DeepMemoryCache"):
        model(ids, past_key_values=[None, None])
    with pytest.raises(ValueError, match="holds 3 layer states"):
        model(ids, past_key_values=DeepMemoryCache(3))
    with pytest.raises(ValueError, match="labels must have the shape"):
        model(ids, labels=ids[:, :2])
    with pytest.raises(TypeError, match="unexpected argument"):
        model(ids, lables=ids)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layer_pattern=["attn", "lstm"]), "layer_pattern entries must be one of"),
        (dict(layer_pattern=["attn"] * 3), "layer_pattern must name 2 blocks"),
        (dict(hidden_size=0), "hidden_size must be >= 1"),
        (dict(num_heads=4, head_dim=15, layer_pattern="attn"), "head_dim must be even"),
        (dict(layer_pattern="memory", memory={"architecture": "conv"}), "memory\\['architecture'\\] must be one of"),
        (
            dict(layer_pattern="memory", memory={"architecture": "linear", "residual": True}),
            "linear memory has no residual",
        ),
        (dict(layer_pattern="memory", memory={"optimizer": "adam"}), "optimizer"),
        (dict(layer_pattern="memory", memory={"window": 0}), "window'\\] must be >= 1"),
        (dict(layer_pattern="kernel", kernel={"window": 0}), "window'\\] must be >= 1"),
        (dict(layer_pattern="kernel", kernel={"loss": "huber"}), "kernel\\['loss'\\]"),
        (dict(attention_window=0, layer_pattern="swa"), "attention_window must be >= 1"),
        (dict(num_persistent=-1), "num_persistent must be >= 0"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps must be a positive number"),
        (dict(layer_pattern="memory", memory={"depth": 0}), "depth'\\] must be >= 1"),
        (dict(layer_pattern="memory", memory={"residual": "yes"}), "residual'\\] must be a bool"),
        (dict(layer_pattern="memory", memory={"max_lr": -1.0}), "max_lr'\\] must be a positive number"),
        (dict(layer_pattern="kernel", kernel={"normalized": 1}), "normalized'\\] must be a bool"),
        (dict(layer_pattern="attn", memory={"wndow": 2}), "memory settings must be one of"),
        (
            dict(layer_pattern="attn", memory={"window": 2}),
            r"memory settings \['window'\] are unused: layer_pattern \['attn'\]",
        ),
        (
            dict(layer_pattern="memory", kernel={"window": 2}),
            r"kernel settings \['window'\] are unused: layer_pattern \['memory'\] has no kernel block",
        ),
    ],
)
def test_invalid_configs_fail_at_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DeepMemoryConfig(vocab_size=256, **kwargs)


PAPER_SIZES = {"170m": 170e6, "340m": 340e6, "760m": 760e6, "1.3b": 1.3e9}
HYBRIDS = ("titans-mac", "titans-mag", "titans-mal", "atlas-mag", "atlas-mal")


@pytest.mark.slow  # builds every preset at every paper size (on the meta device): ~10 s
def test_paper_sizes_are_matched_within_ten_percent():
    """The papers compare at equal size: at every paper size every preset's count is within 10% of
    Transformer++'s (docs/models/index.md#matched-sizes), counted from the built model."""
    off = []
    for size, target in PAPER_SIZES.items():
        baseline, _ = count_parameters(preset_config("transformer", size))
        assert abs(baseline - target) <= 0.01 * target, f"transformer {size}: {baseline:,}"
        for name in PRESETS:
            total, _ = count_parameters(preset_config(name, size))
            if abs(total / baseline - 1) > 0.10:
                off.append(f"{name} {size}: {total:,} = {total / baseline:.2f} x transformer")
    assert not off, "; ".join(off)


def test_stored_table_is_matched_within_ten_percent():
    # the table `deepmemory models` prints (equal to the presets' count: tests/test_cli_fast.py)
    from deepmemory.cli import models

    for size in PAPER_SIZES:
        column = models.SIZES.index(size)
        baseline = models.PRESETS["transformer"][1][column]
        for name, (_, counts) in models.PRESETS.items():
            assert abs(counts[column] / baseline - 1) <= 0.10, (name, size, counts[column] / baseline)


@pytest.mark.slow  # builds the configs of every preset at every paper size (on the meta device)
@pytest.mark.parametrize("name", PRESETS)
def test_paper_size_sizing_rule(name):
    """One mixer per block: Table 7's blocks, the SwiGLU width solved; a hybrid: Transformer++'s
    SwiGLU width, the blocks solved; an overridden width or block count is kept."""
    table7 = {"170m": (12, 768), "340m": (24, 1024), "760m": (24, 1536), "1.3b": (18, 2048)}
    for size, (layers, hidden) in table7.items():
        config = preset_config(name, size)
        baseline = preset_config("transformer", size)
        assert config.hidden_size == hidden and config.vocab_size == 32000
        if name in HYBRIDS:
            assert config.intermediate_size == baseline.intermediate_size, (name, size)
            assert config.num_hidden_layers < layers, (name, size)
        else:
            assert config.num_hidden_layers == layers, (name, size)
    given = preset_config(name, "340m", intermediate_size=1000, num_hidden_layers=24)
    assert (given.intermediate_size, given.num_hidden_layers) == (1000, 24)
    assert preset_config(name, "340m", intermediate_size=1024).intermediate_size == 1024
    if name in HYBRIDS:  # the block count given, the width is solved instead
        assert preset_config(name, "340m", num_hidden_layers=24).intermediate_size < 1024


def test_experiment_size_has_short_windows():
    """tiny-w16: tiny's widths, attention windows and MAC segments of 16 tokens (docs/models/index.md)."""
    for name in ("swa", "titans-mac", "titans-mag", "atlas-mal"):
        tiny, short = preset_config(name, "tiny"), preset_config(name, "tiny-w16")
        assert (short.attention_window, short.segment_size) == (16, 16), name
        assert short.to_dict() == dict(tiny.to_dict(), attention_window=16, segment_size=16), name


def test_paper_sizes_keep_table7_heads_without_polynomial_features():
    assert preset_config("titans-mac", "1.3b").num_attention_heads == 8
    assert preset_config("transformer", "340m").num_attention_heads == 16
    assert preset_config("atlas", "1.3b").head_dim == 32  # see presets.POLY_HEAD_DIM


def test_atlas_family_rows():
    rows = {
        "titans-lmm": ("l2", 1, "momentum", "mlp", "identity"),
        "omeganet": ("l2", 16, "momentum", "mlp", "polynomial"),
        "atlas": ("l2", 16, "muon", "mlp", "polynomial"),
        "atlas-pp": ("l2", 16, "muon", "gated_mlp", "polynomial"),
        "dla": ("dot", 1, "gd", "mlp", "polynomial"),
        "swla": ("dot", 16, "gd", "linear", "identity"),
        "gated-deltanet": ("l2", 1, "gd", "linear", "identity"),
    }
    for name, row in rows.items():
        m = preset_config(name).memory
        assert (m["loss"], m["window"], m["optimizer"], m["architecture"], m["feature_map"]) == row, name
    # Muon per token (ATLAS §5.1); the "w/o Muon" ablation changes the optimizer, not the granularity
    assert preset_config("atlas").memory["granularity"] == "token"
    assert preset_config("atlas", memory={"optimizer": "momentum"}).memory["granularity"] == "token"
    assert preset_config("deep-transformer").kernel["window"] is None
    assert preset_config("swdt").kernel["loss"] == "dot" and preset_config("dot").kernel["loss"] == "l2"
    for name in ("swdt", "dot"):  # the Omega rule of ATLAS eq. 27, unnormalised, c = 16 at every size
        k = preset_config(name, "340m").kernel
        assert (k["window"], k["window_rule"], k["normalized"]) == (16, "omega", False), name
    for name in ("atlas-mag", "atlas-mal"):
        assert preset_config(name).memory == preset_config("atlas").memory


def test_memory_options_are_on_where_the_papers_have_them():
    """docs/fidelity.md A1, A2, H1, C1: the memory LayerNorm (ATLAS App. E) on every deep (MLP)
    memory alike, Titans' and dla's included (docs/fidelity.md#calibration); the degree-0
    polynomial term (ATLAS eq. 5) wherever the features are polynomial;
    persistent tokens (Titans eq. 19) on the Titans models and the Atlas hybrids at every size
    (H1: the memory-only ATLAS models have none); channel-wise gates (Miras §5.4) on none."""
    for name in PRESETS:
        config = preset_config(name)
        m = config.memory
        if not m:
            continue
        deep = m["architecture"] != "linear"
        assert m.get("layer_norm", False) == deep, name
        if m.get("feature_map") == "polynomial":
            assert m["poly_constant"] is True, name
        assert m.get("channel_lr_rank", 0) == 0, name
        for size in ("tiny", "340m"):
            persistent = name.startswith("titans-") or name in ("atlas-mag", "atlas-mal")
            assert (preset_config(name, size).num_persistent > 0) == persistent, (name, size)


def test_models_cli_table_and_errors(capsys):
    from deepmemory.cli import main

    assert main(["models", "transformer", "atlas", "--sizes", "tiny,1.3b"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["preset", "blocks", "tiny", "1.3b"]
    assert lines[1].split()[:2] == ["transformer", "attn"] and lines[1].endswith("1.30B")
    assert lines[2].split()[:2] == ["atlas", "memory"]
    assert main(["models", "titans"]) == 2
    assert "valid presets: transformer" in capsys.readouterr().err
    assert main(["models", "--sizes", "7b"]) == 2
    assert "valid sizes: tiny, tiny-w16, 170m" in capsys.readouterr().err
    assert main(["models", "transformer", "titans-mac", "--sizes", "340m", "--ratio"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].endswith("341M (1.00)") and lines[2].endswith("345M (1.01)")


def test_tuple_outputs_and_hidden_states():
    model = tiny64("titans-mal")
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(9))
    out = model(ids, labels=ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)
    loss, logits = model(ids, labels=ids, return_dict=False)[:2]
    torch.testing.assert_close(loss, out.loss)
    torch.testing.assert_close(logits, out.logits)
    # only the last position's logits, as generate() asks for
    torch.testing.assert_close(model(ids, logits_to_keep=1).logits, out.logits[:, -1:])


def test_inputs_embeds_equal_token_ids():
    model = tiny64("titans-lmm")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(10))
    embeds = model.get_input_embeddings()(ids)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(ids, inputs_embeds=embeds)
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        model(inputs_embeds=embeds[..., :5])


@pytest.mark.parametrize("name", list_presets())
def test_presets_stay_finite_on_real_text(name):
    """At initialisation every preset reads real text (bytes of this library's own source) over
    several chunks and segments without its memory diverging."""
    import pathlib

    import deepmemory.ops.api as api

    text = pathlib.Path(api.__file__).read_bytes()[: 2 * 200]
    ids = torch.tensor(list(text)).view(2, 200)
    torch.manual_seed(0)
    model = build(name, "tiny")
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss), name
