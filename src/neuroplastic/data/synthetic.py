"""The embedded synthetic curriculum: training text and evaluation items from one knowledge base.

:class:`SyntheticCurriculum` turns the facts of :data:`~neuroplastic.data.knowledge.KNOWLEDGE_BASE`
into three stages of training text,

1. ``"definitions"``: short dictionary-style definitions ("X is a Y that ..."),
2. ``"explanations"``: paragraphs that explain a concept through its properties and relations,
3. ``"dialogues"``: multi-turn question-and-answer dialogues ("Student:"/"Teacher:", "User:"/"Assistant:"),

and, from the same facts, evaluation items: MMLU-style multiple choice, HellaSwag-style
completions and (prompt, reference) pairs for reward-driven recipes.

Everything is a pure function of ``seed`` and ``repeats``: same arguments, same corpus and
items. Evaluation items use phrasings that the training templates never use, so no question
(and no context plus its correct ending) occurs verbatim in the training text.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import replace

from neuroplastic.data.knowledge import KNOWLEDGE_BASE, Concept, capitalize
from neuroplastic.errors import UserError

__all__ = ["STAGES", "SyntheticCurriculum", "EVAL_PHRASES"]

STAGES: tuple[str, str, str] = ("definitions", "explanations", "dialogues")

# SyntheticCurriculum.pairs(stage, split): 1/HELDOUT_PAIR_DIVISOR of the concepts is held out
PAIR_SPLITS: tuple[str, str, str] = ("all", "train", "heldout")
HELDOUT_PAIR_DIVISOR = 5

# Opening phrases that belong to evaluation items only; the training templates never use them.
EVAL_PHRASES: tuple[str, ...] = (
    "Which of the following",
    "Which statement about",
    "Which answer fits this description",
    "Quiz card on",
    "puts up a slide titled",
    "Reading an encyclopedia entry on",
    "the guide stops to talk about",
)

_DOMAIN_PHRASE = {
    "biology": "biology",
    "animals": "the study of animals",
    "physics": "physics",
    "chemistry": "chemistry",
    "astronomy": "astronomy",
    "geography": "geography",
    "computing": "computing",
    "mathematics": "mathematics",
    "history": "history",
    "everyday objects": "everyday life",
}

_ROLES = (("Student", "Teacher"), ("User", "Assistant"))


# --------------------------------------------------------------------------- small phrase helpers


def _domain_phrase(c: Concept) -> str:
    return _DOMAIN_PHRASE.get(c.domain, c.domain)


def _pron(c: Concept) -> str:
    return capitalize(c.pronoun)


def _also(pred: str) -> str:
    """Insert "also" into a predicate: "is big" -> "is also big", "has X" -> "also has X"."""
    head, _, rest = pred.partition(" ")
    if head in {"is", "was", "can", "should", "must", "will", "cannot"}:
        return f"{head} also {rest}"
    return f"also {pred}"


def _what(c: Concept) -> str:
    if c.pronoun != "it":
        return f"Who was {c.subject}?"
    return f"What {c.be} {c.subject}?"


def _what_pron(c: Concept) -> str:
    if c.pronoun != "it":
        return f"Who was {c.pronoun}?"
    return f"What {c.be} it?"


def _which(c: Concept) -> str:
    return "who" if c.pronoun != "it" else "which"


def _core(c: Concept) -> str:
    """ "<category> that <gloss>" without the subject."""
    return f"{c.category} {c.rel} {c.gloss}"


# --------------------------------------------------------------------------- training templates

Template = Callable[[Concept, random.Random, "SyntheticCurriculum"], str]


def _extra_facts(c: Concept, rng: random.Random, k: int) -> str:
    props = rng.sample(c.properties, min(k, len(c.properties)))
    out = []
    for i, p in enumerate(props):
        if i == 0:
            out.append(rng.choice([f"{_pron(c)} {p}.", f"{c.Subject} {p}."]))
        else:
            out.append(f"{_pron(c)} {_also(p)}.")
    return " ".join(out)


def _def_sentence(c: Concept, rng: random.Random) -> str:
    called = "was" if c.pronoun != "it" else "is called"
    variants = [
        c.definition,
        f"{c.Subject} {c.be} {_core(c)}.",
        f"{capitalize(c.name)}: {_core(c)}.",
        f"{capitalize(_core(c))} {called} {c.subject}.",
        f"In {_domain_phrase(c)}, {c.subject} {c.be} {_core(c)}.",
        f'The {"name" if c.pronoun != "it" else "term"} "{c.name}" refers to {_core(c)}.',
        f"{c.Subject} {c.be} {c.category}. {_pron(c)} {c.gloss}.",
        f"{_what(c)} {c.definition}",
        f"{c.Subject}, {_core(c)}, {rng.choice(c.properties)}.",
        f"Definition of {c.subject}: {_core(c)}.",
    ]
    return rng.choice(variants)


def _definition_doc(c: Concept, rng: random.Random, cur: SyntheticCurriculum) -> str:
    first = _def_sentence(c, rng)
    k = rng.choice([0, 1, 1, 2])
    return f"{first} {_extra_facts(c, rng, k)}".strip() if k else first


def _relation_sentence(c: Concept, r: Concept, rng: random.Random, short: bool = True) -> str:
    variants = [
        f"{c.Subject} is closely linked to {r.subject}, {_which(r)} {r.be} {_core(r)}.",
        f"A related topic is {r.subject}. {r.definition}",
        f"It helps to compare {c.object_pronoun} with {r.subject}: {r.subject} {r.be} {_core(r)}.",
    ]
    if short:
        variants.append(
            f"{c.Subject} is often studied together with {r.subject}, "
            f"{_which(r)} {r.be} {r.category}."
        )
    return rng.choice(variants)


def _explanation_doc(c: Concept, rng: random.Random, cur: SyntheticCurriculum) -> str:
    r = cur.concept(rng.choice(c.related))
    openers = [
        c.definition,
        f"Let us look at {c.subject}. {c.definition}",
        f"To understand {c.subject}, start with what {c.pronoun} {c.be}: {_core(c)}.",
        f"{capitalize(_domain_phrase(c))} has many important topics, and {c.subject} is one of them. "
        f"{_pron(c)} {c.be} {_core(c)}.",
        f"Here is an explanation of {c.subject}. {c.definition}",
    ]
    parts = [rng.choice(openers)]
    props = list(c.properties)
    rng.shuffle(props)
    props = props[: rng.choice([2, 2, 3])]
    connectors = [
        "{P} {also}.",
        "In addition, {p} {pred}.",
        "Another important point is that {s} {pred}.",
        "For example, {p} {pred}.",
        "It is also worth knowing that {s} {pred}.",
    ]
    rng.shuffle(connectors)
    for i, pred in enumerate(props):
        if i == 0:
            parts.append(f"{_pron(c)} {pred}.")
        else:
            parts.append(
                connectors[i - 1].format(
                    P=_pron(c), p=c.pronoun, s=c.subject, pred=pred, also=_also(pred)
                )
            )
    because = (
        f"Because {c.pronoun} {c.gloss}, {c.subject} is often discussed together with {r.subject}."
    )
    with_because = rng.random() < 0.5
    rel = _relation_sentence(c, r, rng, short=not with_because)
    tail = [because, rel] if with_because else [rel]
    if rng.random() < 0.5:
        parts.insert(1, tail[0])
        parts.extend(tail[1:])
    else:
        parts.extend(tail)
    closers = [
        "",
        "",
        f"In short, {c.subject} {c.be} {_core(c)}.",
        f"So when you think of {c.subject}, remember that {c.pronoun} {rng.choice(c.properties)}.",
    ]
    closer = rng.choice(closers)
    if closer:
        parts.append(closer)
    return " ".join(parts)


def _dialogue_doc(c: Concept, rng: random.Random, cur: SyntheticCurriculum) -> str:
    q_role, a_role = rng.choice(_ROLES)
    turns: list[tuple[str, str]] = []
    q1 = rng.choice(
        [
            _what(c),
            f"Can you explain what {c.subject} {c.be}?",
            f"I keep hearing about {c.subject}. {_what_pron(c)}",
            f"Tell me about {c.subject}.",
            f"What should I know about {c.subject}?",
        ]
    )
    props = list(c.properties)
    rng.shuffle(props)
    a1 = c.definition
    if rng.random() < 0.4:
        a1 += f" {_pron(c)} {props.pop()}."
    turns.append((q1, a1))
    q2 = rng.choice(
        [
            "What else should I know?",
            f"Can you tell me more about {c.object_pronoun}?",
            "Interesting. Is there anything else?",
            "Could you give me another fact?",
        ]
    )
    a2 = rng.choice(["Sure. ", "Yes. ", "", "Of course. "]) + f"{_pron(c)} {props.pop()}."
    if props and rng.random() < 0.5:
        a2 += f" {_pron(c)} {_also(props.pop())}."
    turns.append((q2, a2))
    r = cur.concept(rng.choice(c.related))
    if rng.random() < 0.55:
        q3 = rng.choice(
            [
                f"How is {c.pronoun} related to {r.subject}?",
                f"Is {c.pronoun} connected to anything else I might know?",
                f"Does {c.subject} have anything to do with {r.subject}?",
            ]
        )
        a3 = f"{c.Subject} is closely linked to {r.subject}. {r.definition}"
        turns.append((q3, a3))
    if rng.random() < 0.5:
        if rng.random() < 0.5:
            pred = rng.choice(c.properties)
            turns.append((f"Is it true that {c.subject} {pred}?", f"Yes. {c.Subject} {pred}."))
        else:
            # A false claim taken from another domain, so it cannot accidentally be true.
            other = rng.choice(cur.other_domain_concepts(c))
            wrong = rng.choice(other.properties)
            right = rng.choice(c.properties)
            turns.append(
                (
                    f"Is it true that {c.subject} {wrong}?",
                    f"No, that describes {other.subject}, not {c.subject}. {c.Subject} {right}.",
                )
            )
    if rng.random() < 0.35:
        turns.append(
            (
                rng.choice(["Thanks, that helps.", "Thank you!", "Great, thanks."]),
                rng.choice(["You're welcome.", "Happy to help.", "Any time."]),
            )
        )
    return "\n".join(f"{q_role}: {q}\n{a_role}: {a}" for q, a in turns)


_GENERATORS: dict[str, Template] = {
    "definitions": _definition_doc,
    "explanations": _explanation_doc,
    "dialogues": _dialogue_doc,
}


# --------------------------------------------------------------------------- the curriculum


class SyntheticCurriculum:
    """Seeded synthetic curriculum over the built-in knowledge base.

    ``repeats``: how many distinct template draws per concept per stage go into the training
    documents (the size knob; the default gives roughly 450 KB of text over the three stages).
    ``concepts``: the knowledge base to use (default: :data:`KNOWLEDGE_BASE`).
    """

    def __init__(self, seed: int = 0, repeats: int = 2, concepts: Sequence[Concept] | None = None):
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise UserError(f"repeats must be a positive integer, got {repeats!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UserError(f"seed must be an integer, got {seed!r}.")
        self.seed = seed
        self.repeats = repeats
        self.concepts: tuple[Concept, ...] = tuple(KNOWLEDGE_BASE if concepts is None else concepts)
        if not self.concepts:
            raise UserError("The synthetic curriculum needs at least one concept.")
        self._by_name = {c.name: c for c in self.concepts}
        self.domains: tuple[str, ...] = tuple(dict.fromkeys(c.domain for c in self.concepts))
        self._train: dict[str, list[str]] = {}
        self._val: dict[str, list[str]] = {}
        self._pairs: dict[str, list[tuple[tuple[str, str], str]]] = {}  # ((prompt, ref), concept)
        self._mc: list[dict] | None = None
        self._hs: list[dict] | None = None

    # ------------------------------------------------------------------ lookups

    def concept(self, name: str) -> Concept:
        try:
            return self._by_name[name]
        except KeyError:
            raise UserError(f"Unknown concept {name!r} in the knowledge base.") from None

    def other_domain_concepts(self, c: Concept) -> list[Concept]:
        others = [d for d in self.concepts if d.domain != c.domain]
        return others or [d for d in self.concepts if d.name != c.name]

    def _rng(self, tag: str) -> random.Random:
        return random.Random(f"neuroplastic-synthetic:{self.seed}:{tag}")

    @staticmethod
    def _check_stage(stage: str) -> str:
        if stage not in STAGES:
            raise UserError(
                f"Unknown curriculum stage {stage!r}; valid stages are {', '.join(STAGES)}."
            )
        return stage

    # ------------------------------------------------------------------ training text

    def _related_ok(self, c: Concept) -> Concept:
        # Concepts passed in by a caller may name related concepts outside the subset.
        kept = tuple(r for r in c.related if r in self._by_name) or (c.name,)
        return c if kept == c.related else replace(c, related=kept)

    def _generate(self, stage: str) -> None:
        gen = _GENERATORS[stage]
        rng = self._rng(f"train:{stage}")
        docs: list[str] = []
        seen: set[str] = set()
        for c in self.concepts:
            c = self._related_ok(c)
            made = 0
            for _ in range(self.repeats * 8):
                d = gen(c, rng, self)
                if d in seen:
                    continue
                seen.add(d)
                docs.append(d)
                made += 1
                if made == self.repeats:
                    break
        rng.shuffle(docs)
        # Held-out documents: fresh template draws for a seeded half of the concepts,
        # never identical to a training document.
        vrng = self._rng(f"val:{stage}")
        pool = list(self.concepts)
        vrng.shuffle(pool)
        val: list[str] = []
        for c in pool[: max(1, len(pool) // 2)]:
            c = self._related_ok(c)
            for _ in range(20):
                d = gen(c, vrng, self)
                if d not in seen:
                    seen.add(d)
                    val.append(d)
                    break
        self._train[stage] = docs
        self._val[stage] = val

    def documents(self, stage: str) -> list[str]:
        """Training documents for one stage (a fresh list; shuffled by the seed)."""
        self._check_stage(stage)
        if stage not in self._train:
            self._generate(stage)
        return list(self._train[stage])

    def all_documents(self) -> dict[str, list[str]]:
        return {s: self.documents(s) for s in STAGES}

    def validation_documents(self, stage: str) -> list[str]:
        """Held-out documents for validation loss: other template draws, never a training document."""
        self._check_stage(stage)
        if stage not in self._val:
            self._generate(stage)
        return list(self._val[stage])

    # ------------------------------------------------------------------ evaluation items

    def _distractor_pool(self, c: Concept) -> list[Concept]:
        """Same-domain concepts that are not related to ``c`` (in either direction)."""
        pool = [
            d
            for d in self.concepts
            if d.domain == c.domain
            and d.name != c.name
            and d.name not in c.related
            and c.name not in d.related
        ]
        if len(pool) < 3:
            pool += [d for d in self.concepts if d.domain != c.domain]
        return pool

    def _wrong_predicates(self, c: Concept, rng: random.Random, k: int) -> list[str] | None:
        own = set(c.properties)
        cands = sorted({p for d in self._distractor_pool(c) for p in d.properties} - own)
        if len(cands) < k:
            return None
        return rng.sample(cands, k)

    def _wrong_names(
        self, c: Concept, rng: random.Random, k: int, pred: str | None = None
    ) -> list[str] | None:
        pool = [d for d in self._distractor_pool(c) if pred is None or pred not in d.properties]
        same_cat = [d for d in pool if d.category == c.category]
        rng.shuffle(same_cat)
        rest = [d for d in pool if d.category != c.category]
        rng.shuffle(rest)
        names: list[str] = []
        for d in same_cat[:2] + rest + same_cat[2:]:
            if d.Subject != c.Subject and d.Subject not in names:
                names.append(d.Subject)
            if len(names) == k:
                return names
        return None

    @staticmethod
    def _place(correct: str, wrong: list[str], pos: int) -> list[str]:
        opts = list(wrong)
        opts.insert(pos, correct)
        return opts

    @staticmethod
    def _positions(n: int, rng: random.Random) -> list[int]:
        """Answer positions balanced in every block of four."""
        out: list[int] = []
        while len(out) < n:
            block = [0, 1, 2, 3]
            rng.shuffle(block)
            out.extend(block)
        return out[:n]

    def _build_mc(self) -> list[dict]:
        rng = self._rng("eval:mc")
        raw: list[tuple[str, str, list[str], str]] = []  # question, correct, wrong, subject
        for c in self.concepts:
            for pred in rng.sample(c.properties, min(2, len(c.properties))):
                wrong = self._wrong_names(c, rng, 3, pred)
                if wrong:
                    raw.append((f"Which of the following {pred}?", c.Subject, wrong, c.domain))
            pred = rng.choice(c.properties)
            wrong_preds = self._wrong_predicates(c, rng, 3)
            if wrong_preds:
                raw.append(
                    (
                        f"Which statement about {c.subject} is true?",
                        f"{_pron(c)} {pred}.",
                        [f"{_pron(c)} {p}." for p in wrong_preds],
                        c.domain,
                    )
                )
            wrong = self._wrong_names(c, rng, 3)
            if wrong:
                raw.append(
                    (f"Which answer fits this description: {_core(c)}?", c.Subject, wrong, c.domain)
                )
        rng.shuffle(raw)
        items = []
        for (question, correct, wrong, subject), pos in zip(raw, self._positions(len(raw), rng)):
            items.append(
                {
                    "question": question,
                    "options": self._place(correct, wrong, pos),
                    "answer": pos,
                    "subject": subject,
                }
            )
        return items

    def _build_completions(self) -> list[dict]:
        rng = self._rng("eval:completion")
        raw: list[tuple[str, str, list[str], str]] = []
        for c in self.concepts:
            for pred in rng.sample(c.properties, min(2, len(c.properties))):
                wrong = self._wrong_predicates(c, rng, 3)
                if not wrong:
                    continue
                ctx = rng.choice(
                    [
                        f"Quiz card on {c.domain}. Complete the sentence about {c.subject}: {_pron(c)}",
                        f'A teacher puts up a slide titled "{capitalize(c.name)}" and tells the class that {c.pronoun}',
                        f"Reading an encyclopedia entry on {c.subject}, you learn that {c.pronoun}",
                        f"On a museum tour about {_domain_phrase(c)}, the guide stops to talk about "
                        f"{c.subject}. The guide explains that {c.pronoun}",
                    ]
                )
                raw.append((ctx, f"{pred}.", [f"{p}." for p in wrong], c.domain))
        rng.shuffle(raw)
        items = []
        for (ctx, correct, wrong, domain), pos in zip(raw, self._positions(len(raw), rng)):
            items.append(
                {
                    "ctx": ctx,
                    "endings": self._place(correct, wrong, pos),
                    "label": pos,
                    "domain": domain,
                }
            )
        return items

    @staticmethod
    def _take(items: list[dict], n: int | None, what: str) -> list[dict]:
        if n is None:
            n = len(items)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise UserError(
                f"The number of {what} items must be a non-negative integer, got {n!r}."
            )
        return [
            {k: list(v) if isinstance(v, list) else v for k, v in it.items()} for it in items[:n]
        ]

    def multiple_choice(self, n: int | None = None) -> list[dict]:
        """MMLU-style items ``{"question", "options" (4), "answer" (0-3), "subject"}``.

        ``n``: the first n items (all when None or when fewer exist); answer positions are
        balanced in every block of four items.
        """
        if self._mc is None:
            self._mc = self._build_mc()
        return self._take(self._mc, n, "multiple-choice")

    def completions(self, n: int | None = None) -> list[dict]:
        """HellaSwag-style items ``{"ctx", "endings" (4), "label" (0-3), "domain"}``.

        The full text of an ending is ``ctx + " " + endings[i]``.
        """
        if self._hs is None:
            self._hs = self._build_completions()
        return self._take(self._hs, n, "completion")

    def _build_pairs(self, stage: str) -> list[tuple[tuple[str, str], str]]:
        rng = self._rng(f"pairs:{stage}")
        out: list[tuple[str, str]] = []
        names: list[str] = []
        for c in self.concepts:
            names.append(c.name)
            c = self._related_ok(c)
            if stage == "definitions":
                out.append((f"Define {c.subject}.", c.definition))
            elif stage == "explanations":
                r = self.concept(c.related[0])
                facts = " ".join(
                    f"{_pron(c)} {p if i == 0 else _also(p)}." for i, p in enumerate(c.properties)
                )
                ref = (
                    f"{c.definition} {facts} "
                    f"{c.Subject} is closely linked to {r.subject}, {_which(r)} {r.be} {_core(r)}."
                )
                out.append((f"Explain {c.subject} in a few sentences.", ref))
            else:
                q_role, a_role = rng.choice(_ROLES)
                ref = f"{c.definition} {_pron(c)} {c.properties[0]}."
                out.append((f"{q_role}: {_what(c)}\n{a_role}:", ref))
        tagged = list(zip(out, names))
        rng.shuffle(tagged)  # the same permutation as shuffling the pairs alone
        return tagged

    def heldout_concepts(self) -> frozenset[str]:
        """Names of the concepts whose pairs are held out of reward training (``split``).

        A seeded fifth of the knowledge base (none when it has fewer than 5 concepts).
        """
        names = [c.name for c in self.concepts]
        self._rng("pairs:heldout").shuffle(names)
        return frozenset(names[: len(names) // HELDOUT_PAIR_DIVISOR])

    def pairs(self, stage: str, split: str = "all") -> list[tuple[str, str]]:
        """(prompt, reference) pairs for one stage, for reward-driven recipes.

        definitions: ("Define X.", definition); explanations: ("Explain X in a few sentences.",
        paragraph); dialogues: ("Student: What is X?\\nTeacher:", answer).

        ``split``: ``"all"``; ``"train"``, the pairs a reward loss may train on; or
        ``"heldout"``, the pairs of :meth:`heldout_concepts`, for evaluating what such
        training did on prompts it never saw. With fewer than 5 concepts nothing can be
        held out and both splits are all pairs.
        """
        self._check_stage(stage)
        if split not in PAIR_SPLITS:
            raise UserError(f"Unknown pair split {split!r}; valid splits are {', '.join(PAIR_SPLITS)}.")
        if stage not in self._pairs:
            self._pairs[stage] = self._build_pairs(stage)
        tagged = self._pairs[stage]
        held = self.heldout_concepts()
        if split == "all" or not held:
            return [p for p, _ in tagged]
        return [p for p, name in tagged if (name in held) == (split == "heldout")]

    # ------------------------------------------------------------------ summary

    def stats(self) -> dict:
        docs = self.all_documents()
        val = {s: self.validation_documents(s) for s in STAGES}
        return {
            "seed": self.seed,
            "repeats": self.repeats,
            "concepts": len(self.concepts),
            "domains": len(self.domains),
            "documents": {s: len(d) for s, d in docs.items()},
            "characters": {s: sum(len(x) for x in d) for s, d in docs.items()},
            "total_characters": sum(len(x) for d in docs.values() for x in d),
            "validation_documents": {s: len(d) for s, d in val.items()},
            "validation_characters": {s: sum(len(x) for x in d) for s, d in val.items()},
            "multiple_choice": len(self.multiple_choice()),
            "completions": len(self.completions()),
            "pairs": {s: len(self.pairs(s)) for s in STAGES},
        }
