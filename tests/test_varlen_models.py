"""Packed documents and padding at the model level: every preset reads each document of a packed
or padded batch exactly as it reads that document alone (float64), in a forward pass, its
gradients, the loss, and ``generate`` with left-padded prompts."""

import pytest
import torch
from tiers import every_preset

from deepmemory.models import DeepMemoryCache, build

LENGTHS = (1, 7, 63, 30)  # awkward: inside chunks, MAC segments and attention windows


def _model(name):
    torch.manual_seed(0)
    return build(name, size="tiny").double().eval()


def _docs(model, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.config.vocab_size, (n,), generator=g) for n in lengths]


def _param_grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _mean_loss_alone(model, docs):
    """The next-token loss over every target of ``docs``, each document read alone."""
    nll, count = 0.0, 0
    for doc in docs:
        logp = model(doc[None], use_cache=False).logits[0, :-1].log_softmax(-1)
        nll = nll - logp.gather(1, doc[1:, None]).sum()
        count += len(doc) - 1
    return nll / count


def _close(got, want, tol=1e-6):
    scale = max(want.abs().max().item(), 1e-30)
    assert (got - want).abs().max().item() <= tol * scale, (got - want).abs().max().item() / scale


@pytest.mark.parametrize("name", every_preset(also_long=("atlas",)))  # atlas: a minute of float64 Muon per token
def test_packed_and_padded_rows_equal_each_document_alone(name):
    """Row 0 packs four documents (position ids restart at 0); row 1 holds two documents with
    padding before, between and after them. Logits and every parameter's gradient equal the
    documents run alone (<= 1e-6 relative)."""
    model = _model(name)
    d = _docs(model, LENGTHS + (5, 12))
    row0 = torch.cat(d[:4])
    width = row0.numel()
    pad = lambda n: torch.zeros(n, dtype=torch.long)  # noqa: E731
    row1 = torch.cat([pad(3), d[4], pad(2), d[5]])
    row1 = torch.cat([row1, pad(width - row1.numel())])
    ids = torch.stack([row0, row1])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[1, 3 + 5 : 3 + 5 + 2] = 0
    mask[1, 3 + 5 + 2 + 12 :] = 0
    pos = torch.stack([torch.cat([torch.arange(len(x)) for x in d[:4]]), torch.zeros(width, dtype=torch.long)])
    pos[1, 3:8] = torch.arange(5)
    pos[1, 10:22] = torch.arange(12)  # the second document of row 1 begins after the padding between
    weights = torch.randn(
        2, width, model.config.vocab_size, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )

    logits = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    got = _param_grads(model, (logits * weights).sum())

    places = [
        (0, slice(0, 1)),
        (0, slice(1, 8)),
        (0, slice(8, 71)),
        (0, slice(71, 101)),
        (1, slice(3, 8)),
        (1, slice(10, 22)),
    ]
    total = 0.0
    for doc, (r, where) in zip(d, places):
        alone = model(doc[None], use_cache=False).logits[0]
        _close(logits[r, where].detach(), alone.detach())
        total = total + (alone * weights[r, where]).sum()
    want = _param_grads(model, total)
    for g, w in zip(got, want):
        _close(g, w)
    assert logits[1][mask[1] == 0].abs().max() == 0  # padding: zeros


@pytest.mark.parametrize("name", every_preset())
def test_left_padded_generate_equals_each_prompt_alone(name):
    model = _model(name)
    prompts = _docs(model, (5, 9, 2), seed=3)
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack(
        [
            torch.cat([torch.zeros(width - len(p), dtype=torch.long), torch.ones(len(p), dtype=torch.long)])
            for p in prompts
        ]
    )
    settings = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, **settings)
        for r, p in enumerate(prompts):
            alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **settings)
            assert batch.sequences[r, width:].tolist() == alone.sequences[0, len(p) :].tolist()
            for s_batch, s_alone in zip(batch.scores, alone.scores):
                _close(s_batch[r], s_alone[0])


def test_beam_search_and_several_returns_with_padding():
    """Beam search and num_return_sequences select and repeat the rows of a padded batch's cache."""
    model = _model("titans-mac")
    prompts = _docs(model, (6, 3), seed=4)
    ids = torch.stack([prompts[0], torch.cat([torch.zeros(3, dtype=torch.long), prompts[1]])])
    mask = torch.tensor([[1] * 6, [0] * 3 + [1] * 3])
    settings = dict(max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2, pad_token_id=0)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, **settings)
        first = model.generate(prompts[0][None], attention_mask=torch.ones(1, 6, dtype=torch.long), **settings)
        second = model.generate(prompts[1][None], attention_mask=torch.ones(1, 3, dtype=torch.long), **settings)
    assert batch[:2, 6:].tolist() == first[:, 6:].tolist()
    assert batch[2:, 6:].tolist() == second[:, 3:].tolist()


def test_loss_leaves_out_padding_and_document_starts():
    model = _model("gated-deltanet")
    d = _docs(model, (9, 4, 6))
    ids = torch.stack([torch.cat([d[0], d[1]]), torch.cat([d[2], torch.zeros(7, dtype=torch.long)])])
    mask = torch.tensor([[1] * 13, [1] * 6 + [0] * 7])
    pos = torch.tensor([list(range(9)) + list(range(4)), list(range(13))])
    loss = model(ids, labels=ids, attention_mask=mask, position_ids=pos, use_cache=False).loss
    _close(loss.detach(), _mean_loss_alone(model, d).detach(), 1e-10)


def test_a_padded_cache_continues_row_by_row():
    """A padded call with a cache splits it per row; later calls (all ones, or padding again)
    continue each row, and a row with nothing to read keeps its state."""
    model = _model("titans-lmm")
    a, b = _docs(model, (8, 5), seed=5)
    cache = DeepMemoryCache(model.config)
    ids = torch.stack([a[:4], torch.cat([torch.zeros(2, dtype=torch.long), b[:2]])])
    with torch.no_grad():
        first = model(ids, attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]), cache=cache).logits
        assert cache.rows is not None and cache.batch_size == 2
        second = model(
            torch.stack([a[4:8], torch.cat([b[2:5], b[:1]])]),
            cache=cache,
            attention_mask=torch.tensor([[1] * 8, [0, 0, 1, 1, 1, 1, 1, 0]]),
        ).logits
        whole_a = model(a[None], use_cache=False).logits[0]
        whole_b = model(b[None], use_cache=False).logits[0]
    _close(torch.cat([first[0], second[0]]), whole_a, 1e-9)
    _close(torch.cat([first[1, 2:], second[1, :3]]), whole_b, 1e-9)
    assert second[1, 3].abs().max() == 0


def test_layout_rows_in_place_and_length_groups(monkeypatch):
    """A row whose first document begins at its start and fills more than half of it is read where
    it lies; every other document gets a row of its own, grouped by length in powers of two (the
    block calls' batch shapes show it); a batch of nothing but padding gives zeros."""
    model = _model("gated-deltanet")
    seen = []
    block = model.model.layers[0]
    original = block.forward
    monkeypatch.setattr(block, "forward", lambda x, **k: seen.append(tuple(x.shape[:2])) or original(x, **k))
    d = _docs(model, (30, 4, 2, 8, 3, 21))
    ids = torch.stack([torch.cat([d[0], d[1]]), torch.cat(d[2:])])
    pos = torch.tensor(
        [list(range(30)) + list(range(4)), list(range(2)) + list(range(8)) + list(range(3)) + list(range(21))]
    )
    out = model(ids, position_ids=pos, use_cache=False).logits
    # row 0 in place; then the groups (1, 2] = {2}, (2, 4] = {4, 3}, (4, 8] = {8}, (16, 32] = {21}
    assert seen == [(1, 34), (1, 2), (2, 4), (1, 8), (1, 21)]
    for r, start, doc in ((0, 0, d[0]), (0, 30, d[1]), (1, 0, d[2]), (1, 2, d[3]), (1, 10, d[4]), (1, 13, d[5])):
        _close(out[r, start : start + len(doc)].detach(), model(doc[None], use_cache=False).logits[0].detach())
    empty = model(ids, attention_mask=torch.zeros_like(ids), use_cache=False).logits
    assert empty.abs().max() == 0


@pytest.mark.parametrize("where", ["left", "middle", "right"])
def test_loss_with_padding_equals_the_unpadded_loss(where):
    """Padding is skipped: after padding the next token is predicted from the last token before it."""
    model = _model("titans-lmm")
    [doc] = _docs(model, (10,))
    pad = torch.zeros(3, dtype=torch.long)
    cut = {"left": 0, "middle": 4, "right": 10}[where]
    ids = torch.cat([doc[:cut], pad, doc[cut:]])[None]
    mask = torch.ones_like(ids)
    mask[0, cut : cut + 3] = 0
    want = model(doc[None], labels=doc[None], use_cache=False).loss
    got = model(ids, attention_mask=mask.float() if where == "middle" else mask, labels=ids, use_cache=False).loss
    _close(got.detach(), want.detach(), 1e-12)


def test_eval_mode_reads_packed_and_padded_batches_without_a_cache():
    model = _model("titans-lmm")
    ids = torch.randint(0, 50, (2, 6))
    out = model(ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]))  # [1, T] position ids are shared by the rows
    assert getattr(out, "cache", None) is None and getattr(out, "past_key_values", None) is None
    _close(out.logits[1, 3:].detach(), model(ids[1:, 3:], use_cache=False).logits[0].detach())
    out = model(ids, attention_mask=torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]]))
    _close(out.logits[1, 2:].detach(), model(ids[1:, 2:], use_cache=False).logits[0].detach())
    with pytest.raises(ValueError, match="read packed documents with use_cache=False"):
        model(ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]), use_cache=True)


@pytest.mark.parametrize("name", ["transformer", "titans-lmm", "gated-deltanet"])
def test_non_finite_padding_reaches_no_gradient(name):
    model = _model(name)
    embeds = torch.randn(2, 40, model.config.hidden_size, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 30:] = 0
    with torch.no_grad():
        embeds[1, 30:] = float("nan")
    model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits.mul(mask[..., None]).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.isfinite(embeds.grad[mask.bool()]).all()


def test_one_label_with_a_cache():
    model = _model("titans-lmm")
    ids = torch.randint(0, 50, (2, 6))
    cache = DeepMemoryCache(model.config)
    model(ids[:, :5], cache=cache)
    out = model(ids[:, 5:], labels=ids[:, 5:], attention_mask=torch.ones(2, 6), cache=cache)
    assert torch.isnan(out.loss)  # no target inside the call: the mean of nothing, as without a mask
    assert torch.isnan(model(ids[:, :1], labels=ids[:, :1], use_cache=False).loss)


def test_packing_arguments_of_the_collator():
    """DataCollatorWithFlattening's other outputs (flash-attention's cu_seq_lens, seq_idx) without
    position_ids give the same documents."""
    from transformers import DataCollatorWithFlattening

    model = _model("titans-mac")
    docs = [{"input_ids": x.tolist()} for x in _docs(model, (17, 1, 40))]
    want = model(**DataCollatorWithFlattening(return_tensors="pt")(docs), use_cache=False).loss
    for settings in (
        dict(return_flash_attn_kwargs=True, return_position_ids=False),
        dict(return_seq_idx=True, return_position_ids=False),
    ):
        batch = DataCollatorWithFlattening(return_tensors="pt", **settings)(docs)
        assert "position_ids" not in batch
        _close(model(**batch, use_cache=False).loss.detach(), want.detach(), 1e-12)


def test_hugging_face_packing_collator():
    """A batch from transformers' DataCollatorWithFlattening (input_ids [1, total], labels with
    -100 at document starts, position_ids) trains as the documents would alone."""
    from transformers import DataCollatorWithFlattening

    model = _model("titans-mac")
    d = _docs(model, (17, 1, 40))
    batch = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": x.tolist()} for x in d])
    loss = model(**batch, use_cache=False).loss
    _close(loss.detach(), _mean_loss_alone(model, d).detach(), 1e-10)


@pytest.mark.parametrize("name", ["transformer", "titans-lmm", "titans-mag", "titans-mal", "titans-mac", "swdt"])
def test_blocks_take_cu_seqlens(name):
    """Every block kind (attention, memory with persistent tokens, MAG, MAL, MAC, kernel memory):
    a packed row with cu_seqlens equals each document alone, outputs and input gradients."""
    block = _model(name).model.layers[0]
    lengths = (1, 7, 40, 13)
    x = torch.randn(1, sum(lengths), block.hidden_size, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 1, 8, 48, 61])
    weights = torch.randn(1, sum(lengths), block.hidden_size, dtype=torch.float64)
    packed = block(x, cu_seqlens=cu)
    (grad,) = torch.autograd.grad((packed * weights).sum(), x)
    alone = torch.cat([block(x[:, a:b]) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    (want,) = torch.autograd.grad((alone * weights).sum(), x)
    _close(packed.detach(), alone.detach(), 1e-10)
    _close(grad, want, 1e-10)
    with pytest.raises(ValueError, match="cu_seqlens starts every document empty"):
        block(x, return_state=True, cu_seqlens=cu)
