"""The synthetic recall task (MQAR): layout, determinism, scoring, errors."""

import pytest
import torch

from deepmemory.data.tasks import IGNORE_INDEX, MQAR, recall_accuracy


def test_rows_show_pairs_then_queries_of_them():
    task = MQAR(vocab_size=64, seq_len=48, num_pairs=6, num_queries=9)
    ids, labels = task.sample(5, torch.Generator().manual_seed(0))
    assert ids.shape == labels.shape == (5, 48) and ids.dtype == labels.dtype == torch.long
    half = 32
    for row, lab in zip(ids.tolist(), labels.tolist()):
        keys, values = row[0:12:2], row[1:12:2]
        assert len(set(keys)) == 6 and all(1 <= k < half for k in keys) and all(half <= v < 64 for v in values)
        pairs = dict(zip(keys, values))
        scored = [t for t in range(48) if lab[t] != IGNORE_INDEX]
        assert len(scored) == 9 and all(t >= 12 for t in scored)
        for t in scored:  # a query: a key shown before, labelled (and followed) by its value
            assert pairs[row[t]] == lab[t] == row[t + 1]
        others = [row[t] for t in range(12, 48) if t not in scored and t - 1 not in scored]
        assert set(others) <= {0}


def test_same_generator_state_same_rows():
    task = MQAR()
    a = task.sample(3, torch.Generator().manual_seed(7))
    b = task.sample(3, torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert task.queries == (64 - 16) // 4


def test_recall_accuracy_counts_scored_positions_only():
    labels = torch.full((1, 4), IGNORE_INDEX)
    labels[0, 1], labels[0, 3] = 2, 0
    logits = torch.zeros(1, 4, 3)
    logits[0, 1, 2] = 1.0  # right
    logits[0, 3, 1] = 1.0  # wrong
    logits[0, 0, 0] = logits[0, 2, 0] = 5.0  # unscored
    assert recall_accuracy(logits, labels) == 0.5
    with pytest.raises(ValueError, match="no position"):
        recall_accuracy(logits, torch.full((1, 4), IGNORE_INDEX))


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(vocab_size=3), ValueError, "vocab_size must be >= 4"),
        (dict(num_pairs=64), ValueError, r"num_pairs must be <= .* = 63"),
        (dict(seq_len=17), ValueError, r"seq_len must be >= .* = 18; got 17"),
        (dict(num_queries=0), ValueError, "num_queries must be >= 1"),
        (dict(num_queries=25), ValueError, r"num_queries must be <= .* = 24; got 25"),
        (dict(seq_len=64.0), TypeError, "seq_len must be an int"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        MQAR(**kwargs)


# ---- the task generators (deepmemory.data.tasks.get_task) ------------------------------------

import itertools  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402

from deepmemory.data import ByteTokenizer, HFTokenizer  # noqa: E402
from deepmemory.data.tasks import TASKS, Task, TaskSample, get_task  # noqa: E402
from deepmemory.data.tasks.babilong import HEADER  # noqa: E402
from deepmemory.data.tasks.essays import ESSAYS  # noqa: E402

TEXT_TASKS = (
    "s-niah-1",
    "s-niah-2",
    "s-niah-3",
    "babilong-qa1",
    "babilong-qa2",
    "babilong-qa3",
    "babilong-qa4",
    "babilong-qa5",
)
TOKEN_TASKS = (
    "mqar",
    "mad-icr",
    "mad-noisy-icr",
    "mad-fuzzy-icr",
    "mad-selective-copy",
    "mad-compression",
    "mad-memorization",
)
BYTES = ByteTokenizer()


def _train_bpe(path, texts, byte_level: bool):
    """A small BPE tokenizer trained here (no download): byte-level (it can write anything), or
    character-level over the training text's characters alone (unknown characters -> [UNK])."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if byte_level:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=512,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=["</s>"],
            show_progress=False,
        )
    else:
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]", "</s>"], show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return HFTokenizer(str(path))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return _train_bpe(tmp_path_factory.mktemp("bpe") / "tokenizer.json", list(ESSAYS), byte_level=True)


_BUILT = {}


def task_for(name, tokenizer=None, **settings):
    """Tasks are built once per (name, tokenizer, settings) for the whole module."""
    key = (name, id(tokenizer), tuple(sorted(settings.items())))
    if key not in _BUILT:
        _BUILT[key] = get_task(name, tokenizer, **settings)
    return _BUILT[key]


def test_the_registry_is_the_agreed_interface():
    assert TASKS == TEXT_TASKS + TOKEN_TASKS
    for name in TASKS:
        task = task_for(name)
        assert isinstance(task, Task) and task.name == name
        assert task.kind == ("text" if name in TEXT_TASKS else "tokens")
        assert task.has_depth == (name in TEXT_TASKS)
        assert (task.vocab_size is None) == (name in TEXT_TASKS)
        assert 1 <= task.min_length <= task.min_row_length
        sample = task.sample(task.min_length, 0)
        assert isinstance(sample, TaskSample) and len(sample.prompt_ids) == task.min_length
        assert sample.answer_ids and isinstance(sample.answer, str)
    # the published baselines: MAD (mad-lab's task configs), MQAR as deepmemory.data.tasks.MQAR
    assert [task_for(n).vocab_size for n in TOKEN_TASKS] == [128, 16, 32, 16, 16, 16, 256]


# ---- determinism --------------------------------------------------------------------------


@pytest.mark.parametrize("name", TASKS)
def test_same_seed_same_sample_other_seeds_differ(name):
    task = task_for(name)
    length = max(task.min_length, 300 if name in TEXT_TASKS else 64)
    again = get_task(name)  # a fresh object: nothing is carried between calls
    a, b = task.sample(length, 5), again.sample(length, 5)
    assert a == b
    others = [task.sample(length, seed) for seed in range(6, 10)]
    assert all(o.prompt_ids != a.prompt_ids or o.answer_ids != a.answer_ids for o in others)
    row_length = max(task.min_row_length, length)
    x = task.batch(3, row_length, torch.Generator().manual_seed(1))
    y = again.batch(3, row_length, torch.Generator().manual_seed(1))
    z = task.batch(3, row_length, torch.Generator().manual_seed(2))
    assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and not torch.equal(x[0], z[0])


def test_depth_moves_the_needle_and_nothing_else():
    task = task_for("s-niah-2")
    a, b = task.sample(3000, 4, depth=0.1), task.sample(3000, 4, depth=0.9)
    assert (a.answer, a.depth, b.depth) == (b.answer, 0.1, 0.9) and a.needle_positions[0] < b.needle_positions[0]
    needle = a.prompt_ids[a.needle_positions[0] :].index(ord(".")) + 1  # the needle ends at its first period

    def without_needle(s):
        return s.prompt_ids[: s.needle_positions[0]] + s.prompt_ids[s.needle_positions[0] + needle :]

    assert without_needle(a) == without_needle(b)
    drawn = task.sample(3000, 4)  # no depth: one drawn from the seed, recorded
    assert 0.0 <= drawn.depth <= 1.0 and drawn.answer == a.answer


# ---- exact lengths ------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
@pytest.mark.parametrize("name", TEXT_TASKS)
def test_text_prompts_have_exactly_the_length_asked(name, tokenizer, bpe):
    tok = BYTES if tokenizer == "bytes" else bpe
    task = task_for(name, tok)
    for length in (task.min_length, task.min_length + 1, task.min_length + 63, 2000, 4097):
        for depth in (None, 0.0, 0.5, 1.0):
            sample = task.sample(length, length % 7, depth)
            assert len(sample.prompt_ids) == length, (length, depth)
            assert all(0 <= i < tok.vocab_size for i in sample.prompt_ids + sample.answer_ids)
            assert tok.decode(sample.answer_ids).strip().rstrip(".") == sample.answer
    for length in (task.min_row_length, task.min_row_length + 1001):
        ids, labels = task.batch(2, length, torch.Generator().manual_seed(length))
        assert ids.shape == labels.shape == (2, length)
        for row, lab in zip(ids.tolist(), labels.tolist()):
            scored = [t for t in range(length) if lab[t] != IGNORE_INDEX]
            # one answer, at the end of the row, labels shifted: label[t] is input[t + 1]
            assert scored == list(range(scored[0], length - 1)) and all(lab[t] == row[t + 1] for t in scored)


@pytest.mark.parametrize("name", TOKEN_TASKS)
def test_token_prompts_and_rows_have_exactly_the_length_asked(name):
    task = task_for(name)
    for length in sorted({task.min_length, task.min_length + 1, 127, 128, 257, 1024}):
        sample = task.sample(length, 3)
        assert len(sample.prompt_ids) == length and sample.depth is None and sample.needle_positions == []
        assert all(0 <= i < task.vocab_size for i in sample.prompt_ids + sample.answer_ids)
        assert sample.answer == " ".join(map(str, sample.answer_ids))
    for length in sorted({task.min_row_length, task.min_row_length + 1, 128, 129}):
        ids, labels = task.batch(4, length, torch.Generator().manual_seed(length))
        assert ids.shape == labels.shape == (4, length) and ids.dtype == labels.dtype == torch.long
        assert int(ids.min()) >= 0 and int(ids.max()) < task.vocab_size
        assert bool((labels != IGNORE_INDEX).any(dim=1).all())  # every row scores something


def test_sixty_four_thousand_and_a_million_tokens_are_quick_and_exact():
    import time

    for name in ("s-niah-2", "babilong-qa2"):
        task = task_for(name)
        for length in (65_536, 1_000_000):
            start = time.perf_counter()
            sample = task.sample(length, 0, depth=0.5 if name.startswith("s-niah") else None)
            assert len(sample.prompt_ids) == length and time.perf_counter() - start < 5.0
            assert _oracle(task, BYTES, sample) == sample.answer


@pytest.mark.long
def test_a_million_tokens_of_a_bpe_tokenizer(bpe):
    for name in TEXT_TASKS:
        task = task_for(name, bpe)
        sample = task.sample(1_000_000, 1, depth=0.75)
        assert len(sample.prompt_ids) == 1_000_000 and _oracle(task, bpe, sample) == sample.answer


# ---- oracles: the answer is always in the prompt ------------------------------------------

NEEDLE = re.compile(r"One of the special magic (?:numbers|UUIDs) for ([a-z]+-[a-z]+) is: ([0-9a-f-]+)\.")
ASKED_KEY = re.compile(r"Question: What is the special magic (?:number|UUID) for ([a-z]+-[a-z]+) in the text above\?")
PERSON = r"([A-Z][a-z]+)"
STORY = [  # each bAbI sentence form, as docs/tasks.md lists them
    ("move", re.compile(PERSON + r" (?:went|moved|travelled|journeyed|went back) to the (\w+)\.")),
    ("get", re.compile(PERSON + r" (?:picked up|got|grabbed|took) the (\w+)\.")),
    ("drop", re.compile(PERSON + r" (?:dropped|put down|left|discarded) the (\w+)\.")),
    ("give", re.compile(PERSON + r" (?:gave|handed|passed) the (\w+) to " + PERSON + r"\.")),
    ("relation", re.compile(r"The (\w+) is (north|south|east|west) of the (\w+)\.")),
]
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}


def _story_events(text):
    """The story's sentences found in a text, in order: (kind, names)."""
    found = []
    for kind, pattern in STORY:
        found += [(m.start(), kind, m.groups()) for m in re.finditer(r"(?:^|(?<=\s))" + pattern.pattern, text)]
    return [(kind, names) for _, kind, names in sorted(found)]


def _babi_oracle(text):
    """Replays the story (written from the bAbI task definitions, not from the generator) and
    answers the question at the end; a set of answers, so that ambiguity shows."""
    story, question = text.rsplit("\nQuestion: ", 1)
    question = question.split("\n")[0]
    place, holder, lying, trail, gifts, relations = {}, {}, {}, {}, [], set()

    def arrive(obj, where):
        if not trail.setdefault(obj, []) or trail[obj][-1] != where:
            trail[obj].append(where)

    for kind, names in _story_events(story):
        if kind == "move":
            person, where = names
            place[person] = where
            for obj in [o for o, h in holder.items() if h == person]:
                arrive(obj, where)
        elif kind == "get":
            person, obj = names
            holder[obj] = person
            lying.pop(obj, None)
            arrive(obj, place[person])
        elif kind == "drop":
            person, obj = names
            del holder[obj]
            lying[obj] = place[person]
        elif kind == "give":
            giver, obj, receiver = names
            assert holder[obj] == giver and place[giver] == place[receiver]
            holder[obj] = receiver
            gifts.append(names)
        else:
            x, d, y = names
            relations |= {(x, d, y), (y, OPPOSITE[d], x)}
    patterns = [
        (r"Where is the (\w+)\?", lambda o: {place[holder[o]]} if o in holder else {lying[o]}),
        (r"Where is (\w+)\?", lambda p: {place[p]}),
        (r"Where was the (\w+) before the (\w+)\?", lambda o, l: {trail[o][trail[o].index(l) - 1]}),
        (r"What is (\w+) of the (\w+)\?", lambda d, y: {a for a, dd, b in relations if dd == d and b == y}),
        (r"What is the (\w+) (\w+) of\?", lambda x, d: {b for a, dd, b in relations if a == x and dd == d}),
        (r"Who gave the (\w+) to (\w+)\?", lambda o, r: {g for g, oo, rr in gifts if oo == o and rr == r}),
        (r"Who received the (\w+)\?", lambda o: {r for _, oo, r in gifts if oo == o}),
        (r"What did (\w+) give to (\w+)\?", lambda g, r: {o for gg, o, rr in gifts if gg == g and rr == r}),
        (r"Who did (\w+) give the (\w+) to\?", lambda g, o: {r for gg, oo, r in gifts if gg == g and oo == o}),
    ]
    for pattern, answer in patterns:
        m = re.fullmatch(pattern, question)
        if m:
            return answer(*m.groups())
    raise AssertionError(f"unknown question {question!r}")


def _oracle(task, tokenizer, sample):
    """A trivial solver per family: a regex for S-NIAH, a replay for BABILong, a lookup for MQAR
    and MAD. Returns the answer it reads off the prompt (or asserts when it cannot)."""
    p = sample.prompt_ids
    if task.kind == "text":
        text = tokenizer.decode(p)
        if task.name.startswith("s-niah"):
            needles = dict(NEEDLE.findall(text))
            return needles[ASKED_KEY.findall(text)[-1]]
        answers = _babi_oracle(text)
        assert len(answers) == 1, answers
        return answers.pop()
    name, V = task.name, task.vocab_size
    if name == "mqar":
        n = task.num_pairs
        return str(dict(zip(p[0 : 2 * n : 2], p[1 : 2 * n : 2]))[p[-1]])
    if name in ("mad-icr", "mad-noisy-icr"):
        keys = (V - (task.noise_vocab_size if name == "mad-noisy-icr" else 0)) // 2
        pairs = [(p[t], p[t + 1]) for t in range((len(p) + 1) % 2, len(p) - 1, 2) if p[t] < keys]  # noise skipped
        shown = {}
        for k, v in pairs:
            assert shown.setdefault(k, v) == v  # a key keeps its value
        return str(shown[p[-1]])
    if name == "mad-fuzzy-icr":
        keys = (V - 1) // 2
        runs = [tuple(g) for _, g in itertools.groupby([t for t in p if t != V - 1], key=lambda t: t < keys)]
        shown = dict(zip(runs[0::2], runs[1::2]))
        assert runs[-1] in shown and len(runs) % 2 == 1
        return " ".join(map(str, shown[runs[-1]]))
    if name == "mad-selective-copy":
        assert p[-1] == V - 1
        return " ".join(str(t) for t in p[:-1] if t != V - 2)
    if name == "mad-compression":
        assert p[-1] == V - 1
        return " ".join(map(str, p[:-1]))
    if name == "mad-memorization":
        assert p[-1] == V - 1 and all(t == V - 1 for t in p[len(p) % 2 + 1 :: 2])
        return str(task.kv_map[p[-2]])
    raise AssertionError(name)


@pytest.mark.parametrize("name", TASKS)
def test_a_trivial_oracle_solves_every_sample(name, bpe):
    for tokenizer in (BYTES, bpe) if name in TEXT_TASKS else (None,):
        task = task_for(name, tokenizer)
        for seed in range(12):
            length = task.min_length + [0, 1, 37, 500, 1500, 3000][seed % 6]
            sample = task.sample(length, seed, depth=[None, 0.0, 0.3, 1.0][seed % 4])
            assert _oracle(task, tokenizer, sample) == sample.answer, (seed, length)
            assert task.score(sample, sample.answer_ids)


@pytest.mark.parametrize("name", TASKS)
def test_training_rows_label_what_the_oracle_reads(name):
    """Each scored label of a ``batch`` row is the answer that the oracle reads off the row's
    prefix (multi-query rows: every query)."""
    task = task_for(name)
    length = max(task.min_row_length, 600 if name in TEXT_TASKS else 96)
    ids, labels = task.batch(4, length, torch.Generator().manual_seed(3))
    for row, lab in zip(ids.tolist(), labels.tolist()):
        scored = [t for t in range(length) if lab[t] != IGNORE_INDEX]
        if name in TEXT_TASKS or name in ("mad-selective-copy", "mad-compression"):
            prompt, answer = row[: scored[0] + 1], [lab[t] for t in scored]
            sample = TaskSample(prompt, answer, "", None, [])
            expected = _oracle(task, BYTES, sample)
            got = BYTES.decode(answer).strip().rstrip(".") if name in TEXT_TASKS else " ".join(map(str, answer))
            assert got == expected
            continue
        for t in scored:  # every query of the row, in the prompt that ends with its key
            if name == "mad-fuzzy-icr":
                if t > 0 and lab[t - 1] != IGNORE_INDEX:
                    continue  # inside a value motif: checked from its first token
                end = next((u for u in range(t, length) if lab[u] == IGNORE_INDEX), length)
                sample = TaskSample(row[: t + 1], [lab[u] for u in range(t, end)], "", None, [])
                assert _oracle(task, None, sample) == " ".join(str(lab[u]) for u in range(t, end))
            elif name == "mqar":
                n = task.num_pairs
                assert dict(zip(row[0 : 2 * n : 2], row[1 : 2 * n : 2]))[row[t]] == lab[t]
            else:
                assert _oracle(task, None, TaskSample(row[: t + 1], [lab[t]], "", None, [])) == str(lab[t])


def test_needles_never_collide(bpe):
    for name in ("s-niah-1", "s-niah-2", "s-niah-3"):
        task = task_for(name, num_needles=8)
        for seed in range(10):
            sample = task.sample(task.min_length + 400 * seed, seed)
            text = BYTES.decode(sample.prompt_ids)
            needles = NEEDLE.findall(text)
            keys, values = [k for k, _ in needles], [v for _, v in needles]
            assert len(needles) == 8 and len(set(keys)) == 8 and len(set(values)) == 8
            assert text.count(sample.answer) == 1 and ASKED_KEY.findall(text)[-1] == keys[values.index(sample.answer)]
            # needle_positions: the queried needle first, then the others in prompt order
            starts = [len(text[: m.start()].encode()) - 1 for m in NEEDLE.finditer(text)]  # each needle's leading space
            queried = starts[values.index(sample.answer)]
            assert sample.needle_positions[0] == queried and sample.needle_positions[1:] == [
                s for s in starts if s != queried
            ]
            assert all(len(v) == (36 if name == "s-niah-3" else 7) for v in values)
            if name == "s-niah-3":  # a UUID's layout: version 4, RFC variant
                assert all(
                    re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", v)
                    for v in values
                )


# ---- depth --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["s-niah-1", "s-niah-2", "s-niah-3"])
def test_the_needle_sits_at_its_depth(name):
    task = task_for(name)
    header = len(BYTES.encode(task.header))
    for length in (2000, 16384):
        for depth in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
            sample = task.sample(length, 2, depth)
            text = BYTES.decode(sample.prompt_ids)
            needle = len(NEEDLE.search(text).group(0)) + 1  # with its leading space
            haystack = text.rindex("\nQuestion:") - header - needle
            position = sample.needle_positions[0]
            # within one sentence of depth * haystack tokens, counted from the haystack's start
            assert abs(position - header - depth * haystack) <= task.haystack.longest, (length, depth)
            fixed = length - haystack
            assert abs(position / length - depth) <= (task.haystack.longest + fixed) / length
            if depth == 0.0:
                assert position == header
            if depth == 1.0:  # after the last whole sentence: only a cut sentence and the question follow
                assert text[position + needle :].count(". ") <= 1


@pytest.mark.parametrize("name", ["babilong-qa1", "babilong-qa3", "babilong-qa4"])
def test_a_story_at_a_depth_is_one_block_there(name):
    task = task_for(name)
    head = len(BYTES.encode(HEADER))
    for depth in (0.0, 0.3, 0.7, 1.0):
        sample = task.sample(8000, 1, depth)
        text = BYTES.decode(sample.prompt_ids)
        events = [m for kind, pattern in STORY for m in re.finditer(pattern, text)]
        start, end = min(m.start() for m in events) - 1, max(m.end() for m in events)
        story = text[start:end]
        assert len(_story_events(story)) == len(_story_events(text)) and len(story.split(". ")) == len(events)
        noise = text.rindex("\nQuestion:") - head - len(story)
        assert abs(start - head - depth * noise) <= task.noise.longest
        assert all(start <= p < end for p in sample.needle_positions)
    scattered = task.sample(8000, 1)  # no depth: the facts spread through the noise
    assert scattered.depth is None


def test_needle_positions_point_at_the_supporting_facts():
    for name in ("babilong-qa1", "babilong-qa2", "babilong-qa3", "babilong-qa4", "babilong-qa5"):
        task = task_for(name)
        for seed in range(6):
            sample = task.sample(3000, seed)
            text = BYTES.decode(sample.prompt_ids)
            facts = [_story_events(text[p : p + 60].split(".")[0] + ".") for p in sample.needle_positions]
            assert all(len(f) == 1 for f in facts), facts
            assert sample.needle_positions == sorted(sample.needle_positions)
            if name in ("babilong-qa1", "babilong-qa4"):
                assert len(sample.needle_positions) == 1
                assert sample.answer in text[sample.needle_positions[0] : sample.needle_positions[0] + 60]


def test_the_essays_hold_no_needle_or_story():
    text = "\n".join(ESSAYS)
    assert not re.search(r"[0-9]|magic", text) and text.isascii()
    assert not _story_events(text)
    for name in ("Mary", "John", "Sandra", "Daniel", "Bill", "Fred", "Jeff"):
        assert not re.search(rf"\b{name}\b", text)
    assert 20_000 < len(text.encode()) < 200_000


# ---- scoring ------------------------------------------------------------------------------


def test_scoring_rules(bpe):
    niah = task_for("s-niah-1")
    sample = niah.sample(400, 0)
    value = sample.answer
    for output, right in [
        (" " + value, True),
        (value + ".", True),
        (f" {value}\nQuestion", True),
        (f" {value}1", False),
        (" " + value[:-1], False),
        (f" x{value}", False),
        ("", False),
    ]:
        assert niah.score(sample, BYTES.encode(output).tolist()) is right, output
    with_bpe = task_for("s-niah-3", bpe)
    sample = with_bpe.sample(500, 0)
    assert with_bpe.score(sample, sample.answer_ids) and not with_bpe.score(sample, bpe.encode(" 1234").tolist())
    babi = task_for("babilong-qa1")
    sample = babi.sample(600, 0)
    word = sample.answer
    for output, right in [
        (f" {word}.", True),
        (f" The answer is {word.upper()}. Next", True),
        (f" {word}", True),
        (f" garden or {word}!", True),
        (f" nowhere. {word}.", False),
        (f"\n{word}.", True),
        (f" {word}s.", False),
        (" ", False),
    ]:
        assert babi.score(sample, BYTES.encode(output).tolist()) is right, output
    mqar = task_for("mqar")
    sample = mqar.sample(40, 0)
    assert mqar.score(sample, sample.answer_ids + [5]) and mqar.score(sample, torch.tensor(sample.answer_ids))
    assert not mqar.score(sample, [sample.answer_ids[0] + 1]) and not mqar.score(sample, [])


# ---- bad input ----------------------------------------------------------------------------


def _one_line(err):
    return "\n" not in str(err.value)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: get_task("s-niah-9"), r"unknown task 's-niah-9'; tasks: s-niah-1, .*mad-memorization"),
        (lambda: get_task(None), "unknown task None"),
        (lambda: get_task("mqar", num_pairs=0), "^mqar: num_pairs must be >= 1; got 0$"),
        (lambda: get_task("mqar", vocab_size=16, num_pairs=8), r"^mqar: num_pairs must be <= .* = 7"),
        (lambda: get_task("mad-icr", vocab_size="16"), "mad-icr: vocab_size must be an int"),
        (
            lambda: get_task("mad-icr", frac_noise=0.5),
            "mad-icr has no setting 'frac_noise'; its settings: 'vocab_size'",
        ),
        (lambda: get_task("babilong-qa4", num_facts=3), "babilong-qa4 has no setting 'num_facts'; its settings: none"),
        (lambda: get_task("mad-noisy-icr", frac_noise=1.0), r"^mad-noisy-icr: frac_noise must be a number in \[0, 1\)"),
        (
            lambda: get_task("mad-noisy-icr", vocab_size=17, noise_vocab_size=16),
            "vocab_size - noise_vocab_size must be >= 2",
        ),
        (lambda: get_task("mad-fuzzy-icr", vocab_size=6), "fewer than the motif sizes"),
        (lambda: get_task("s-niah-1", num_needles=0), "^s-niah-1: num_needles must be >= 1"),
        (lambda: get_task("babilong-qa5", num_facts=3), "^babilong-qa5: num_facts must be >= 4; got 3$"),
        (lambda: get_task("babilong-qa1", num_facts=True), "^babilong-qa1: num_facts must be an int; got bool True$"),
        (lambda: get_task("s-niah-1", tokenizer="bytes"), "tokenizer must be a deepmemory tokenizer"),
        (
            lambda: task_for("s-niah-1").sample(100, 0),
            r"s-niah-1: length 100 is below the task's minimum of \d+ tokens",
        ),
        (lambda: task_for("mqar").sample(16, 0), r"mqar: length 16 is below the task's minimum of 17 tokens"),
        (
            lambda: task_for("mad-selective-copy").batch(2, 32, torch.Generator()),
            r"row length 32 is below .* 33 tokens",
        ),
        (lambda: task_for("s-niah-1").sample(400, 0, depth=1.5), r"depth must be a number in \[0, 1\]; got 1.5"),
        (lambda: task_for("babilong-qa1").sample(600, 0, depth=-0.1), r"depth must be a number in \[0, 1\]"),
        (lambda: task_for("s-niah-2").sample(400, 0, depth=math.nan), r"depth must be a number in \[0, 1\]; got nan"),
        (lambda: task_for("mad-icr").sample(64, 0, depth="0.5"), r"depth must be a number in \[0, 1\]"),
        (lambda: task_for("mad-icr").sample(64, -1), "seed must be >= 0"),
        (lambda: task_for("mqar").sample(64, 0.5), "seed must be an int"),
        (lambda: task_for("mad-icr").batch(0, 64, torch.Generator()), "batch_size must be >= 1"),
        (lambda: task_for("s-niah-1").batch(2, 400, 0), "generator must be a torch.Generator"),
        (
            lambda: task_for("mqar", num_queries=30).sample(40, 0),
            "mqar: num_queries 30 does not fit a prompt of 40 tokens",
        ),
    ],
)
def test_bad_input_is_one_line(call, match):
    with pytest.raises((ValueError, TypeError), match=match) as err:
        call()
    assert _one_line(err)
    if "get_task" in call.__code__.co_names:  # the interface: get_task raises ValueError alone
        assert err.type is ValueError


def test_a_tokenizer_that_cannot_express_the_task(tmp_path):
    # a character BPE trained on the task's own words but on no digit: it writes every template
    # and name, and turns digits into [UNK]
    niah = task_for("s-niah-1")
    babi = [task_for(f"babilong-qa{i}") for i in range(1, 6)]
    from deepmemory.data.tasks.niah import ADJECTIVES, NOUNS

    words = [niah.header, *niah.needle_parts, *niah.question_parts, " ".join(ADJECTIVES), "-".join(NOUNS), *ESSAYS]
    for task in babi:
        words += [" ".join(texts) for texts in task._texts()]
    tok = _train_bpe(tmp_path / "tokenizer.json", words, byte_level=False)
    with pytest.raises(
        ValueError,
        match=r"s-niah-1: the tokenizer cannot express the characters of its values: "
        r"'0123456789' comes back as ''",
    ) as err:  # [UNK] is special
        get_task("s-niah-1", tok)
    assert _one_line(err)
    for i in range(1, 6):  # the stories need no digit: this tokenizer writes them
        task = get_task(f"babilong-qa{i}", tok)
        sample = task.sample(task.min_length + 300, 0)
        assert len(sample.prompt_ids) == task.min_length + 300 and task.score(sample, sample.answer_ids)
    words_only = _train_bpe(tmp_path / "words.json", list(ESSAYS), byte_level=False)  # no names, no digits
    with pytest.raises(ValueError, match="babilong-qa1: the tokenizer cannot express its story sentences") as err:
        get_task("babilong-qa1", words_only)
    assert _one_line(err)


def test_token_tasks_ignore_the_tokenizer_and_depth():
    task = get_task("mad-icr", BYTES)
    assert task.sample(64, 1, depth=0.5) == task.sample(64, 1) == task_for("mad-icr").sample(64, 1)
