"""The embedded synthetic curriculum and its knowledge base."""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest

from neuroplastic.data.knowledge import KNOWLEDGE_BASE, Concept
from neuroplastic.data.synthetic import EVAL_PHRASES, STAGES, SyntheticCurriculum
from neuroplastic.errors import UserError


@pytest.fixture(scope="module")
def cur() -> SyntheticCurriculum:
    return SyntheticCurriculum(seed=0)


@pytest.fixture(scope="module")
def training_text(cur: SyntheticCurriculum) -> str:
    docs = [d for s in STAGES for d in cur.documents(s)]
    docs += [d for s in STAGES for d in cur.validation_documents(s)]
    return "\n\x00\n".join(docs)  # a separator no eval string contains


# ---------------------------------------------------------------- knowledge base


def test_knowledge_base_size_and_names():
    assert len(KNOWLEDGE_BASE) >= 200
    assert len({c.domain for c in KNOWLEDGE_BASE}) >= 8
    names = [c.name for c in KNOWLEDGE_BASE]
    assert len(names) == len(set(names)), [n for n, k in Counter(names).items() if k > 1]
    subjects = [c.subject.lower() for c in KNOWLEDGE_BASE]
    assert len(subjects) == len(set(subjects))


def test_knowledge_base_related_exist_and_rows_well_formed():
    names = {c.name for c in KNOWLEDGE_BASE}
    for c in KNOWLEDGE_BASE:
        assert isinstance(c, Concept)
        assert c.related, c.name
        for r in c.related:
            assert r in names, f"{c.name}: related {r!r} missing"
            assert r != c.name
        assert 2 <= len(c.properties) <= 4, c.name
        assert len(set(c.properties)) == len(c.properties), c.name
        assert c.category.split()[0] in {"a", "an", "the"}, c.category
        assert c.article in {"", "a", "an", "the"}
        assert c.pronoun in {"it", "he", "she"}
        for text in (c.gloss, c.category, *c.properties):
            assert text == text.strip() and text and not text.endswith("."), (c.name, text)
        assert c.definition.endswith(".") and c.definition[0].isupper()
        assert len(c.facts) == len(c.properties)


def test_concept_is_frozen():
    c = KNOWLEDGE_BASE[0]
    with pytest.raises(AttributeError):
        c.name = "x"  # type: ignore[misc]


# ---------------------------------------------------------------- training text


def test_stages_non_empty_and_sized(cur):
    assert STAGES == ("definitions", "explanations", "dialogues")
    docs = cur.all_documents()
    assert list(docs) == list(STAGES)
    total = 0
    for stage in STAGES:
        d = docs[stage]
        assert d and all(isinstance(x, str) and x.strip() for x in d)
        assert len(d) == len(set(d)), f"duplicate documents in {stage}"
        total += sum(len(x) for x in d)
    assert 300_000 <= total <= 650_000
    # The stages grow in length: definitions are shortest, dialogues multi-turn.
    mean = {s: sum(map(len, docs[s])) / len(docs[s]) for s in STAGES}
    assert mean["definitions"] < mean["explanations"]
    assert all(x.count("\n") >= 3 for x in docs["dialogues"])
    assert all(re.match(r"^(Student|User): ", x) for x in docs["dialogues"])


def test_every_concept_appears_in_every_stage(cur):
    for stage in STAGES:
        text = "\n".join(cur.documents(stage)).lower()
        missing = [c.name for c in KNOWLEDGE_BASE if c.name.lower() not in text]
        assert not missing, (stage, missing[:5])


def test_determinism_by_seed():
    a, b = SyntheticCurriculum(seed=3), SyntheticCurriculum(seed=3)
    assert a.all_documents() == b.all_documents()
    assert a.validation_documents("dialogues") == b.validation_documents("dialogues")
    assert a.multiple_choice() == b.multiple_choice()
    assert a.completions() == b.completions()
    assert a.pairs("explanations") == b.pairs("explanations")
    c = SyntheticCurriculum(seed=4)
    for stage in STAGES:
        assert a.documents(stage) != c.documents(stage)
        assert set(a.documents(stage)) != set(c.documents(stage))  # templates, not just order
    assert a.multiple_choice() != c.multiple_choice()


def test_repeats_is_the_size_knob():
    one, three = SyntheticCurriculum(seed=0, repeats=1), SyntheticCurriculum(seed=0, repeats=3)
    for stage in STAGES:
        assert len(one.documents(stage)) == len(KNOWLEDGE_BASE)
        assert len(three.documents(stage)) == 3 * len(KNOWLEDGE_BASE)


def test_generation_is_fast():
    t = time.perf_counter()
    cur = SyntheticCurriculum(seed=11)
    cur.all_documents()
    for s in STAGES:
        cur.validation_documents(s)
        cur.pairs(s)
    cur.multiple_choice()
    cur.completions()
    assert time.perf_counter() - t < 2.0  # < 1 s on a laptop; slack for busy CI machines


def test_validation_documents_held_out(cur):
    for stage in STAGES:
        val = cur.validation_documents(stage)
        assert val
        assert not set(val) & set(cur.documents(stage))


def test_results_are_copies(cur):
    cur.documents("definitions").clear()
    assert cur.documents("definitions")
    item = cur.multiple_choice(1)[0]
    item["options"].append("x")
    assert len(cur.multiple_choice(1)[0]["options"]) == 4


def test_unknown_stage_is_user_error(cur):
    for call in (cur.documents, cur.validation_documents, cur.pairs):
        with pytest.raises(UserError) as e:
            call("lectures")
        for s in STAGES:
            assert s in str(e.value)
    with pytest.raises(UserError):
        SyntheticCurriculum(repeats=0)
    with pytest.raises(UserError):
        cur.multiple_choice(-1)


# ---------------------------------------------------------------- evaluation items


def test_multiple_choice_well_formed(cur):
    items = cur.multiple_choice()
    assert len(items) >= 2 * len(KNOWLEDGE_BASE)
    domains = {c.domain for c in KNOWLEDGE_BASE}
    for it in items:
        assert set(it) == {"question", "options", "answer", "subject"}
        assert isinstance(it["question"], str) and it["question"].endswith("?")
        assert len(it["options"]) == 4 and len(set(it["options"])) == 4
        assert all(isinstance(o, str) and o for o in it["options"])
        assert it["answer"] in range(4)
        assert it["subject"] in domains
    assert len(cur.multiple_choice(10)) == 10
    assert cur.multiple_choice(10) == items[:10]


def test_multiple_choice_answers_are_right(cur):
    by_subject = {c.Subject: c for c in KNOWLEDGE_BASE}
    for it in cur.multiple_choice():
        q, right = it["question"], it["options"][it["answer"]]
        if q.startswith("Which of the following "):
            pred = q[len("Which of the following ") : -1]
            assert pred in by_subject[right].properties
            for o in it["options"]:
                if o != right:
                    assert pred not in by_subject[o].properties


def test_answer_positions_balanced(cur):
    for items, key in ((cur.multiple_choice(), "answer"), (cur.completions(), "label")):
        counts = Counter(it[key] for it in items)
        assert set(counts) == {0, 1, 2, 3}
        assert max(counts.values()) - min(counts.values()) <= 1
        first = Counter(it[key] for it in items[:40])
        assert min(first.values()) == 10


def test_completions_well_formed(cur):
    items = cur.completions()
    assert len(items) >= len(KNOWLEDGE_BASE)
    props = {p for c in KNOWLEDGE_BASE for p in c.properties}
    for it in items:
        assert set(it) == {"ctx", "endings", "label", "domain"}
        assert len(it["endings"]) == 4 and len(set(it["endings"])) == 4
        assert it["label"] in range(4)
        for e in it["endings"]:
            assert e.endswith(".") and e[:-1] in props  # wrong endings: other concepts' facts
    assert len(cur.completions(5)) == 5


def test_no_eval_item_verbatim_in_training_text(cur, training_text):
    for phrase in EVAL_PHRASES:
        assert phrase not in training_text, phrase
    for it in cur.multiple_choice():
        assert it["question"] not in training_text
    for it in cur.completions():
        right = it["endings"][it["label"]]
        assert it["ctx"] + " " + right not in training_text
        assert it["ctx"] + right not in training_text


def test_eval_items_stay_held_out_for_other_seeds():
    cur = SyntheticCurriculum(seed=7, repeats=3)
    text = "\n\x00\n".join(d for s in STAGES for d in cur.documents(s))
    assert not any(it["question"] in text for it in cur.multiple_choice())
    assert not any(it["ctx"] + " " + it["endings"][it["label"]] in text for it in cur.completions())


def test_pairs_per_stage(cur):
    for stage in STAGES:
        pairs = cur.pairs(stage)
        assert len(pairs) == len(KNOWLEDGE_BASE)
        for prompt, ref in pairs:
            assert isinstance(prompt, str) and isinstance(ref, str) and prompt and ref
    assert (
        "Define photosynthesis.",
        next(c.definition for c in KNOWLEDGE_BASE if c.name == "photosynthesis"),
    ) in cur.pairs("definitions")
    assert all(p.endswith(("Teacher:", "Assistant:")) for p, _ in cur.pairs("dialogues"))


def test_stats(cur):
    st = cur.stats()
    assert st["concepts"] == len(KNOWLEDGE_BASE)
    assert st["domains"] >= 8
    for stage in STAGES:
        assert st["documents"][stage] == len(cur.documents(stage))
        assert st["characters"][stage] == sum(map(len, cur.documents(stage)))
    assert st["total_characters"] == sum(st["characters"].values())
    assert st["multiple_choice"] == len(cur.multiple_choice())
    assert st["completions"] == len(cur.completions())
