"""BABILong-style tasks (Kuratov et al., 2024, "BABILong: Testing the Limits of LLMs with Long
Context Reasoning-in-a-Haystack"): bAbI stories (Weston et al., 2015, tasks 1-5) generated here,
their sentences scattered through natural noise text (the embedded essays), the question at the
end. A small world: four people, six places, three objects; the wording is this package's own.

- ``babilong-qa1`` (single supporting fact): people move; "Where is Mary?" -> a place.
- ``babilong-qa2`` (two supporting facts): people move, pick up and put down objects; "Where is
  the apple?" -> the place of the person carrying it, or where it was put down.
- ``babilong-qa3`` (three supporting facts): the same world; "Where was the apple before the
  kitchen?" -> the place the object was in before it came to the kitchen (asked only of a place
  the object has been in once).
- ``babilong-qa4`` (two-argument relations): two facts about three places on a grid ("The office
  is north of the kitchen."); "What is north of the kitchen?" or "What is the kitchen south of?"
  -> a place.
- ``babilong-qa5`` (three-argument relations): people also hand objects to each other when they
  are in the same place; "Who gave the milk to Fred?", "Who received the milk?", "What did Bill
  give to Fred?", "Who did Bill give the milk to?" -> a person or an object (asked only when the
  story makes the answer unique).

A prompt (``length`` tokens exactly; the story's sentences keep their order)::

    A story is scattered through the text below. Read it, then answer the question that
    follows the text.
    A river is never the same water twice, ... Mary went to the kitchen. Where the current loses
    speed, ... John picked up the apple. ... The smell of it cooling on a rack has ended mo
    Question: Where is Mary?
    Answer:                                                          -> answer " kitchen."

Depth: None scatters each story sentence at a random sentence boundary of the noise (BABILong);
a depth ``d`` puts the whole story, as one block, at the boundary nearest ``d`` times the noise's
token count. ``needle_positions`` are the supporting facts' starts. The shortest prompt
(``min_length``) fits the longest possible story and question with no noise (BABILong's "0k"; a
shorter story leaves a little noise). Scoring: the
answer word appears, as a word and in any case, in the first sentence of the generated text
(up to the first ``.``, ``!``, ``?`` or newline).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ...checks import check_int
from .base import TaskSample
from .text import TextTask, assemble, boundary_at

PLACES = ("kitchen", "garden", "hallway", "bathroom", "bedroom", "office")
OBJECTS = ("apple", "football", "milk")
PEOPLE = ("Mary", "John", "Sandra", "Daniel")  # qa1-qa3
GIVERS = ("Bill", "Fred", "Jeff", "Mary")  # qa5
DIRECTIONS = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}

MOVE = (
    "{p} went to the {l}.",
    "{p} moved to the {l}.",
    "{p} travelled to the {l}.",
    "{p} journeyed to the {l}.",
    "{p} went back to the {l}.",
)
GET = ("{p} picked up the {o}.", "{p} got the {o}.", "{p} grabbed the {o}.", "{p} took the {o}.")
DROP = ("{p} dropped the {o}.", "{p} put down the {o}.", "{p} left the {o}.", "{p} discarded the {o}.")
GIVE = ("{p} gave the {o} to {q}.", "{p} handed the {o} to {q}.", "{p} passed the {o} to {q}.")
RELATION = "The {x} is {d} of the {y}."

HEADER = "A story is scattered through the text below. Read it, then answer the question that follows the text.\n"
QUESTION = "\nQuestion: {q}\nAnswer:"
ANSWER = " {a}."
ATTEMPTS = 1000  # stories drawn until one has a question (a handful are needed in practice)

Story = tuple[list[str], list[int], str, str]  # sentences, supporting sentence indices, question, answer


class World:
    """The state of a bAbI story as its sentences are told: where each person is, who carries
    each object, where an object was put down, each object's trail of places, and the handovers;
    with, for each, the sentences that establish it."""

    def __init__(self, people: Sequence[str]):
        self.people = tuple(people)
        self.sentences: list[str] = []
        self.place: dict[str, str | None] = dict.fromkeys(people)
        self.moved: dict[str, int] = {}  # the sentence that put a person where they are
        self.holder: dict[str, str | None] = dict.fromkeys(OBJECTS)
        self.got: dict[str, int] = {}  # the sentence by which the holder got the object
        self.lying: dict[str, tuple[str, set[int]] | None] = dict.fromkeys(OBJECTS)
        self.trail: dict[str, list[tuple[str, set[int]]]] = {o: [] for o in OBJECTS}
        self.gifts: list[tuple[str, str, str, int]] = []  # giver, object, receiver, sentence

    def _say(self, rng, templates, **names) -> int:
        self.sentences.append(rng.choice(templates).format(**names))
        return len(self.sentences) - 1

    def _arrive(self, obj: str, place: str, causes: set[int]) -> None:
        if not self.trail[obj] or self.trail[obj][-1][0] != place:
            self.trail[obj].append((place, causes))

    def move(self, rng, person: str, place: str) -> None:
        i = self._say(rng, MOVE, p=person, l=place)
        self.place[person], self.moved[person] = place, i
        for obj in OBJECTS:
            if self.holder[obj] == person:
                self._arrive(obj, place, {self.got[obj], i})

    def get(self, rng, person: str, obj: str) -> None:
        i = self._say(rng, GET, p=person, o=obj)
        self.holder[obj], self.got[obj], self.lying[obj] = person, i, None
        self._arrive(obj, self.place[person], {self.moved[person], i})

    def drop(self, rng, person: str, obj: str) -> None:
        i = self._say(rng, DROP, p=person, o=obj)
        self.holder[obj], self.lying[obj] = None, (self.place[person], {self.moved[person], i})

    def give(self, rng, person: str, obj: str, other: str) -> None:
        i = self._say(rng, GIVE, p=person, o=obj, q=other)
        self.holder[obj], self.got[obj] = other, i
        self.gifts.append((person, obj, other, i))

    def location(self, obj: str) -> tuple[str, set[int]] | None:
        """Where the object is and the sentences that say so; None if no sentence does."""
        holder = self.holder[obj]
        if holder is not None:
            return self.place[holder], {self.got[obj], self.moved[holder]}
        return self.lying[obj]

    def act(self, rng, handovers: bool) -> None:
        """One more sentence: a move, or (when the world allows) a pick-up, a put-down or a
        handover (``handovers``)."""
        gets = [
            (p, o)
            for p in self.people
            if self.place[p]
            for o in OBJECTS
            if self.holder[o] is None and (self.lying[o] is None or self.lying[o][0] == self.place[p])
        ]
        drops = [(self.holder[o], o) for o in OBJECTS if self.holder[o]]
        gives = [
            (self.holder[o], o, q)
            for o in OBJECTS
            if handovers and self.holder[o]
            for q in self.people
            if q != self.holder[o] and self.place[q] == self.place[self.holder[o]]
        ]
        kinds = ["move", "get", "drop", "give"]
        weights = [0.5, 0.25 if gets else 0.0, 0.15 if drops else 0.0, 0.4 if gives else 0.0]
        kind = rng.choices(kinds, weights)[0]
        if kind == "get":
            self.get(rng, *rng.choice(gets))
        elif kind == "drop":
            self.drop(rng, *rng.choice(drops))
        elif kind == "give":
            self.give(rng, *rng.choice(gives))
        else:
            person = rng.choice(self.people)
            here = self.place[person]
            others = sorted({self.place[q] for q in self.people if q != person and self.place[q] not in (None, here)})
            if handovers and others and rng.random() < 0.5:  # meet someone, so that handovers happen
                place = rng.choice(others)
            else:
                place = rng.choice([p for p in PLACES if p != here])
            self.move(rng, person, place)


def _questions_qa1(world: World) -> dict[str, tuple[str, set[int]]]:
    return {f"Where is {p}?": (world.place[p], {world.moved[p]}) for p in world.people if world.place[p]}


def _questions_qa2(world: World) -> dict[str, tuple[str, set[int]]]:
    found = {}
    for obj in OBJECTS:
        where = world.location(obj)
        if where is not None:
            found[f"Where is the {obj}?"] = where
    return found


def _questions_qa3(world: World) -> dict[str, tuple[str, set[int]]]:
    found = {}
    for obj in OBJECTS:
        trail = world.trail[obj]
        places = [place for place, _ in trail]
        for i in range(1, len(trail)):
            if places.count(places[i]) == 1:
                found[f"Where was the {obj} before the {places[i]}?"] = (places[i - 1], trail[i - 1][1] | trail[i][1])
    return found


def _questions_qa5(world: World) -> dict[str, tuple[str, set[int]]]:
    found = {}
    gifts = world.gifts

    def unique(question, answer, match):
        events = [g for g in gifts if match(g)]
        if len({g[answer] for g in events}) == 1:
            found[question] = (events[0][answer], {g[3] for g in events})

    for giver, obj, receiver, _ in gifts:
        unique(f"Who gave the {obj} to {receiver}?", 0, lambda g, o=obj, r=receiver: g[1] == o and g[2] == r)
        unique(f"Who received the {obj}?", 2, lambda g, o=obj: g[1] == o)
        unique(f"What did {giver} give to {receiver}?", 1, lambda g, s=giver, r=receiver: g[0] == s and g[2] == r)
        unique(f"Who did {giver} give the {obj} to?", 2, lambda g, s=giver, o=obj: g[0] == s and g[1] == o)
    return found


class BabiLong(TextTask):
    """``babilong-qa1`` .. ``babilong-qa5``; see the module docstring.

    Settings (not qa4, whose stories are two facts): ``num_facts``, the story's sentences (int;
    defaults qa1 10, qa2 20, qa3 30, qa5 20; at least 1, 2, 3, 4: the fewest that can hold a
    question). ``min_length``: the header, ``num_facts`` of the longest sentences and the longest
    question, so that any story fits with no noise; ``min_row_length`` adds the longest answer.
    """

    qa = 0
    people = PEOPLE

    def __init__(self, tokenizer=None, **settings):
        super().__init__(tokenizer, **settings)
        facts, questions, answers = self._texts()
        self.check_expressible("its story sentences", [HEADER] + [" " + f for f in facts])
        self.check_expressible(
            "its questions and answers",
            [QUESTION.format(q=q) for q in questions] + [ANSWER.format(a=a) for a in answers],
        )
        self.noise = self.essay_haystack()
        self.min_length = (
            len(self.encode(HEADER))
            + self._facts() * self.max_tokens([" " + f for f in facts])
            + self.max_tokens([QUESTION.format(q=q) for q in questions])
        )
        self.min_row_length = self.min_length + self.max_tokens([ANSWER.format(a=a) for a in answers])

    def _facts(self) -> int:
        return self.num_facts

    def _texts(self) -> tuple[list[str], list[str], list[str]]:
        """Every sentence, question and answer word the task can produce."""
        ps, ls, os_ = self.people, PLACES, OBJECTS
        facts = [t.format(p=p, l=l) for t in MOVE for p in ps for l in ls]
        if self.qa in (2, 3, 5):
            facts += [t.format(p=p, o=o) for t in GET + DROP for p in ps for o in os_]
        if self.qa == 5:
            facts += [t.format(p=p, o=o, q=q) for t in GIVE for p in ps for o in os_ for q in ps if q != p]
        questions = {
            1: [f"Where is {p}?" for p in ps],
            2: [f"Where is the {o}?" for o in os_],
            3: [f"Where was the {o} before the {l}?" for o in os_ for l in ls],
            5: [
                q
                for p in ps
                for o in os_
                for r in ps
                if r != p
                for q in (
                    f"Who gave the {o} to {r}?",
                    f"Who received the {o}?",
                    f"What did {p} give to {r}?",
                    f"Who did {p} give the {o} to?",
                )
            ],
        }[self.qa]
        answers = list(ls) + (list(ps) + list(os_) if self.qa == 5 else [])
        return facts, questions, answers

    def story(self, rng) -> Story:
        """A story, its supporting sentences, a question about it and the answer word."""
        ask = {1: _questions_qa1, 2: _questions_qa2, 3: _questions_qa3, 5: _questions_qa5}[self.qa]
        for _ in range(ATTEMPTS):
            world = World(self.people)
            for _ in range(self.num_facts):
                if self.qa == 1:  # moves alone
                    person = rng.choice(self.people)
                    world.move(rng, person, rng.choice([p for p in PLACES if p != world.place[person]]))
                else:
                    world.act(rng, handovers=self.qa == 5)
            found = ask(world)
            if found:
                question = rng.choice(sorted(found))
                answer, supporting = found[question]
                return world.sentences, sorted(supporting), question, answer
        raise ValueError(f"{self.name}: no story of {self.num_facts} sentences has a question; use more num_facts")

    def _build(self, length: int, seed: int, depth: float | None, row: bool) -> TaskSample:
        rng = self.rng("row" if row else "sample", length, seed)
        sentences, supporting, question, answer = self.story(rng)
        facts = [self.encode(" " + s) for s in sentences]
        header, asked = self.encode(HEADER), self.encode(QUESTION.format(q=question))
        answer_ids = self.encode(ANSWER.format(a=answer))
        noise_tokens = length - len(header) - sum(map(len, facts)) - len(asked) - (len(answer_ids) if row else 0)
        pieces, partial = self.noise.fill(rng, noise_tokens)
        if depth is None:
            boundaries = sorted(rng.randrange(len(pieces) + 1) for _ in facts)
        else:
            boundaries = [boundary_at(pieces, depth * noise_tokens)] * len(facts)
        prompt, starts = assemble(header, pieces, partial, list(zip(boundaries, facts)), asked)
        return TaskSample(
            prompt_ids=prompt,
            answer_ids=answer_ids,
            answer=answer,
            depth=depth,
            needle_positions=[starts[i] for i in supporting],
        )

    def score(self, sample: TaskSample, output_ids) -> bool:
        """The answer word appears (as a word, any case) in the first sentence of the decoded
        output: the text up to the first ``.``, ``!``, ``?`` or newline after leading spaces."""
        first = re.split(r"[.!?\n]", self.decode(output_ids).lstrip(), maxsplit=1)[0]
        return re.search(rf"(?<![A-Za-z]){re.escape(sample.answer)}(?![A-Za-z])", first, re.IGNORECASE) is not None


def _num_facts(default: int, minimum: int):
    """The ``num_facts`` setting: the fewest sentences that can make a question are ``minimum``."""
    return {"num_facts": (default, lambda label, value: check_int(label, value, minimum))}


class BabiLongQA1(BabiLong):
    """``babilong-qa1``: single supporting fact ("Where is Mary?")."""

    name, qa, SETTINGS = "babilong-qa1", 1, _num_facts(10, 1)


class BabiLongQA2(BabiLong):
    """``babilong-qa2``: two supporting facts ("Where is the apple?")."""

    name, qa, SETTINGS = "babilong-qa2", 2, _num_facts(20, 2)


class BabiLongQA3(BabiLong):
    """``babilong-qa3``: three supporting facts ("Where was the apple before the kitchen?")."""

    name, qa, SETTINGS = "babilong-qa3", 3, _num_facts(30, 3)


class BabiLongQA5(BabiLong):
    """``babilong-qa5``: three-argument relations ("Who gave the milk to Fred?")."""

    name, qa, SETTINGS = "babilong-qa5", 5, _num_facts(20, 4)
    people = GIVERS


class BabiLongQA4(BabiLong):
    """``babilong-qa4``: two-argument relations: two facts placing three places on a grid."""

    name, qa, SETTINGS = "babilong-qa4", 4, {}

    def _facts(self) -> int:
        return 2

    def _texts(self) -> tuple[list[str], list[str], list[str]]:
        facts = [RELATION.format(x=x, d=d, y=y) for x in PLACES for y in PLACES if x != y for d in DIRECTIONS]
        questions = [
            q for x in PLACES for d in DIRECTIONS for q in (f"What is {d} of the {x}?", f"What is the {x} {d} of?")
        ]
        return facts, questions, list(PLACES)

    def story(self, rng) -> Story:
        centre, first, second = rng.sample(PLACES, 3)
        ways = rng.sample(sorted(DIRECTIONS), 2)  # the two places' directions from the centre
        position = {centre: (0, 0)}
        for place, way in zip((first, second), ways):
            position[place] = DIRECTIONS[way]

        def direction(a, b):  # the direction of a as seen from b (adjacent places)
            step = (position[a][0] - position[b][0], position[a][1] - position[b][1])
            return next(d for d, v in DIRECTIONS.items() if v == step)

        sentences, relations = [], []
        for place in (first, second):
            x, y = (place, centre) if rng.random() < 0.5 else (centre, place)
            sentences.append(RELATION.format(x=x, d=direction(x, y), y=y))
            n = len(sentences) - 1
            relations += [(x, direction(x, y), y, n), (y, direction(y, x), x, n)]
        if rng.random() < 0.5:
            sentences.reverse()
            relations = [(x, d, y, 1 - n) for x, d, y, n in relations]
        x, d, y, n = rng.choice(relations)
        if rng.random() < 0.5:
            return sentences, [n], f"What is {d} of the {y}?", x
        return sentences, [n], f"What is the {x} {d} of?", y
