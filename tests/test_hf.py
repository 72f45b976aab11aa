"""Hugging Face integration: Auto classes, safetensors round trip, generate() with the recurrent cache."""

import json
import os

import pytest
import torch
from tiers import every_preset
from transformers import AutoConfig, AutoModelForCausalLM

from deepmemory.models import (
    DeepMemoryCache,
    DeepMemoryConfig,
    DeepMemoryForCausalLM,
    build,
    list_presets,
    preset_config,
)
from deepmemory.models.modeling import CACHE_NAME

PRESETS = list_presets()
SMALL = dict(attention_window=5, segment_size=6)


def tiny(name, seed=0):
    torch.manual_seed(seed)
    return build(name, **SMALL).double().eval()


def _fields(config):
    return {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "dtype", "transformers_version")}


@pytest.mark.parametrize("name", every_preset())
def test_save_load_round_trip(name, tmp_path):
    model = tiny(name)
    ids = torch.randint(0, 256, (2, 15), generator=torch.Generator().manual_seed(1))
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "deepmemory"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert type(loaded) is DeepMemoryForCausalLM
    assert _fields(loaded.config) == _fields(model.config)
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # bitwise-equal weights; the logits may differ in the last bit where loading changed strides
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-12)


def test_auto_config_and_from_config(tmp_path):
    config = preset_config("titans-mag", vocab_size=97)
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(again, DeepMemoryConfig) and again.layer_pattern == ["mag", "mag"]
    assert again.memory == config.memory and again.vocab_size == 97
    model = AutoModelForCausalLM.from_config(again)
    assert isinstance(model, DeepMemoryForCausalLM)
    assert AutoConfig.for_model("deepmemory", num_layers=3).num_hidden_layers == 3


def test_tied_embeddings_survive_loading(tmp_path):
    model = build("transformer")
    assert model.lm_head.weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    untied = build("transformer", tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.get_input_embeddings().weight


@pytest.mark.parametrize("name", every_preset())
def test_generate_with_cache_equals_without(name):
    model = tiny(name, seed=3)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(4))
    cached = model.generate(ids, max_new_tokens=8, do_sample=False)
    uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (2, 19)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("name", ["titans-mac", "atlas", "swa"])
def test_generate_with_chunked_prefill_and_beams(name):
    model = tiny(name, seed=5)
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(6))
    greedy = model.generate(ids, max_new_tokens=6, do_sample=False)
    chunked = model.generate(ids, max_new_tokens=6, do_sample=False, prefill_chunk_size=4)
    assert torch.equal(greedy, chunked)
    beams = model.generate(ids, max_new_tokens=4, do_sample=False, num_beams=3)
    beams_uncached = model.generate(ids, max_new_tokens=4, do_sample=False, num_beams=3, use_cache=False)
    assert torch.equal(beams, beams_uncached)


def test_generate_continues_a_user_cache():
    model = tiny("titans-lmm", seed=7)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(8))
    out = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, DeepMemoryCache)
    assert out.past_key_values.get_seq_length() == 12 + 5 - 1
    # the returned state continues the sequence: the next step's logits equal a full pass
    seq = out.sequences
    step = model(seq[:, -1:], past_key_values=out.past_key_values).logits[:, -1]
    torch.testing.assert_close(step, model(seq).logits[:, -1], rtol=0, atol=1e-9)


def test_gradient_checkpointing_enable_changes_nothing():
    import warnings

    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(9))

    def loss_and_grads(checkpointing):
        torch.manual_seed(0)
        model = build("titans-mac").double().train()
        assert model.supports_gradient_checkpointing
        calls = []  # a pre-hook: the recompute stops early, before a forward hook would run
        model.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
        with warnings.catch_warnings():  # newer releases name it activation_checkpointing_enable and warn
            warnings.simplefilter("ignore", FutureWarning)
            if checkpointing:
                model.gradient_checkpointing_enable()
            assert model.is_gradient_checkpointing is checkpointing
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # the block ran again in the backward
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss, grads = loss_and_grads(False)
    ckpt_loss, ckpt_grads = loss_and_grads(True)
    assert ckpt_loss == loss
    assert ckpt_grads.keys() == grads.keys() and all(g is not None for g in grads.values())
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name], rtol=1e-12, atol=1e-14, msg=name)


def test_a_cache_is_left_alone_without_use_cache_and_misuse_is_one_line():
    model = tiny("titans-mac", seed=9)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(10))
    plain = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
    cache = DeepMemoryCache(model.config)
    with_cache = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False, cache=cache)
    assert torch.equal(plain, with_cache) and cache.get_seq_length() == 0 and cache.batch_size == -1
    out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    used = out[CACHE_NAME]
    assert used.batch_size == 1
    for prompt in (out.sequences[:, : used.get_seq_length()], ids[:, :3]):  # nothing new to read
        with pytest.raises(ValueError, match="the cache has already read 14 tokens"):
            model.generate(prompt, max_new_tokens=2, cache=used)
    with pytest.raises(ValueError, match="the cache holds 1 sequence\\(s\\) but the input has a batch of 2"):
        model(torch.randint(0, 256, (2, 1)), cache=used)


def test_checkpoint_saved_before_the_renames_loads(tmp_path):
    """A run saved when the rule field was ``memory`` and ``W_0`` was ``memory_init`` still loads
    (CHANGELOG.md): the config by itself, the weights with ``key_mapping``."""
    from safetensors.torch import load_file, save_file

    model = tiny("titans-mac")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["memory"]["memory"] = config["memory"].pop("architecture")
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = load_file(tmp_path / "model.safetensors")
    assert any("initial_weights" in k for k in weights)
    save_file(
        {k.replace("initial_weights", "memory_init"): t.contiguous() for k, t in weights.items()},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float64, key_mapping={"memory_init": "initial_weights"}
    ).eval()
    assert loaded.config.memory == model.config.memory
    want, got = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
