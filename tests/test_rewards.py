from __future__ import annotations

import math

import pytest

from neuroplastic.errors import UserError
from neuroplastic.rewards import (
    MultiObjectiveReward,
    RewardConfig,
    available_terms,
    distinct_n,
    diversity,
    perplexity_reward,
    register_term,
    rouge_l,
    unique_word_ratio,
    words,
)
from neuroplastic.rewards import combined as combined_mod
from neuroplastic.rewards import metrics as metrics_mod

# ------------------------------------------------------------------ tokenisation


def test_words_lowercase_regex():
    expected = "the cat the dog don't stop now 42".split()
    assert words("The Cat, the DOG!  Don't stop_now 42") == expected
    assert words("") == []
    assert words("  ...  ") == []


# ------------------------------------------------------------------ single terms


def test_unique_word_ratio():
    assert unique_word_ratio("the cat the dog") == pytest.approx(3 / 4)
    assert unique_word_ratio("The the THE") == pytest.approx(1 / 3)
    assert unique_word_ratio("") == 0.0
    assert unique_word_ratio("a b c") == 1.0


BYTE_GARBAGE = "xq7 zzk#1 \x03 9fj_ wq0p 4kd@ mmq2 \xff"


@pytest.fixture
def fresh_deprecation(monkeypatch):
    monkeypatch.setattr(metrics_mod, "_warned", set())


def test_coherence_is_a_deprecated_name_that_warns_once_and_never_labels_garbage(
    fresh_deprecation,
):
    # the unique-word ratio gives byte garbage 1.0 ...
    assert unique_word_ratio(BYTE_GARBAGE) == 1.0
    # ... so asking for "coherence" warns (once) and reports it under its real name
    with pytest.warns(FutureWarning, match="deprecated name of 'unique_word_ratio'"):
        reward = MultiObjectiveReward({"coherence": 1.0})
    res = reward([BYTE_GARBAGE])
    assert "coherence" not in res.terms and "coherence" not in res.as_dict("r")
    assert res.terms == {"unique_word_ratio": 1.0}
    assert reward.weights == {"unique_word_ratio": 1.0}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second use does not warn again
        MultiObjectiveReward({"coherence": 0.5}, options={"coherence": {}})
    with pytest.raises(UserError, match="twice"):
        MultiObjectiveReward({"coherence": 1.0, "unique_word_ratio": 1.0})


def test_coherence_function_is_deprecated(fresh_deprecation):
    from neuroplastic.rewards import coherence

    with pytest.warns(FutureWarning, match="not a measure of coherence"):
        assert coherence("the cat the dog") == pytest.approx(0.75)


def test_diversity_seed_formula():
    ten = "one two three four five six seven eight nine ten"
    assert diversity(ten) == pytest.approx(0.2)
    assert diversity(ten + " " + ten) == pytest.approx(0.2)  # counts unique words
    assert diversity(" ".join(f"w{i}" for i in range(80))) == 1.0  # capped
    assert diversity(ten, cap=20) == pytest.approx(0.5)
    assert diversity("") == 0.0


def test_distinct_n():
    text = "the cat sat the cat ran"
    # bigrams: (the cat) (cat sat) (sat the) (the cat) (cat ran) -> 4 distinct / 5
    assert distinct_n(text, 2) == pytest.approx(4 / 5)
    # unigrams: the cat sat ran -> 4 distinct / 6
    assert distinct_n(text, 1) == pytest.approx(4 / 6)
    assert distinct_n("single", 2) == 0.0
    assert distinct_n("", 1) == 0.0


@pytest.mark.parametrize("ppl,expected", [(1, 1.0), (6, 0.5), (11, 0.0), (50, 0.0), (0.5, 1.0)])
def test_perplexity_linear_seed(ppl, expected):
    assert perplexity_reward(ppl) == pytest.approx(expected)


def test_perplexity_alternatives_and_edge_cases():
    assert perplexity_reward(11, "exp", tau=10) == pytest.approx(math.exp(-1))
    assert perplexity_reward(1, "exp", tau=3) == pytest.approx(1.0)
    assert perplexity_reward(50, "exp", tau=100) > perplexity_reward(60, "exp", tau=100) > 0
    assert perplexity_reward(4, "inverse") == pytest.approx(0.25)
    for form in ("linear", "exp", "inverse"):
        assert perplexity_reward(math.inf, form) == 0.0
        assert perplexity_reward(math.nan, form) == 0.0
    with pytest.raises(UserError, match="positive"):
        perplexity_reward(0.0)
    with pytest.raises(UserError, match="linear, exp, inverse"):
        perplexity_reward(2.0, "log")
    with pytest.raises(UserError, match="tau"):
        perplexity_reward(2.0, "exp", tau=0)


def _lcs(a: list[str], b: list[str]) -> int:
    """Tiny reference LCS length (dynamic programming)."""
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            dp[i + 1][j + 1] = dp[i][j] + 1 if x == y else max(dp[i][j + 1], dp[i + 1][j])
    return dp[-1][-1]


def test_rouge_l_identical_and_hand_computed():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    # Words of <= 3 letters only, so rouge-score's Porter stemming changes nothing.
    pred = "the cat sat on the mat"
    ref = "a big cat was on a red mat too"
    p, r = pred.split(), ref.split()
    lcs = _lcs(p, r)
    assert lcs == 3  # cat, on, mat
    prec, rec = lcs / len(p), lcs / len(r)
    assert rouge_l(pred, ref) == pytest.approx(2 * prec * rec / (prec + rec))
    assert rouge_l("", ref) == 0.0
    assert rouge_l("xyz", ref) == 0.0


def test_rouge_scorer_is_cached():
    assert metrics_mod.rouge_l_scorer() is metrics_mod.rouge_l_scorer()


# ------------------------------------------------------------------ combination


PREDS = ["the cat the dog", "the cat sat on the mat"]
REFS = ["the cat sat", "a big cat was on a red mat too"]


def test_weighted_sum_matches_hand_combination():
    weights = {"rouge_l": 0.4, "unique_word_ratio": 0.2, "diversity": 0.2, "perplexity": 0.2}
    ppl = [6.0, 1.0]
    res = MultiObjectiveReward(weights)(PREDS, REFS, ppl=ppl)
    expected = []
    for p, r, q in zip(PREDS, REFS, ppl):
        expected.append(
            0.4 * rouge_l(p, r)
            + 0.2 * unique_word_ratio(p)
            + 0.2 * diversity(p)
            + 0.2 * perplexity_reward(q)
        )
    # item 0 by hand: unique-word ratio 3/4, diversity 3/50, perplexity 0.5
    assert res.item_terms["unique_word_ratio"][0] == pytest.approx(0.75)
    assert res.item_terms["diversity"][0] == pytest.approx(3 / 50)
    assert res.item_terms["perplexity"] == pytest.approx([0.5, 1.0])
    assert res.per_item == pytest.approx(expected)
    assert res.total == pytest.approx(sum(expected) / 2)
    assert set(res.terms) == set(weights)
    assert res.terms["unique_word_ratio"] == pytest.approx((0.75 + 5 / 6) / 2)
    logged = res.as_dict()
    assert logged["reward"] == res.total and "reward/rouge_l" in logged


def test_default_config_and_weights_not_normalised():
    assert MultiObjectiveReward().weights == RewardConfig().weights
    one = MultiObjectiveReward({"unique_word_ratio": 1.0})(["the cat the dog"])
    two = MultiObjectiveReward({"unique_word_ratio": 2.0})(["the cat the dog"])
    assert one.total == pytest.approx(0.75)
    assert two.total == pytest.approx(1.5)


def test_scalar_ppl_broadcast_and_config_options():
    cfg = RewardConfig(weights={"perplexity": 1.0}, perplexity_form="exp", tau=5.0)
    res = MultiObjectiveReward(cfg)(["a", "b"], ppl=6.0)
    assert res.per_item == pytest.approx([math.exp(-1.0)] * 2)
    res = MultiObjectiveReward({"perplexity": 1.0}, perplexity_form="inverse")(["a"], ppl=[4.0])
    assert res.total == pytest.approx(0.25)
    res = MultiObjectiveReward({"diversity": 1.0}, options={"diversity": {"cap": 2}})(["a b c"])
    assert res.total == 1.0


def test_weight_zero_term_logged_but_not_counted():
    res = MultiObjectiveReward({"unique_word_ratio": 1.0, "distinct_2": 0.0})(["the cat the dog"])
    assert res.terms["distinct_2"] == pytest.approx(1.0)
    assert res.total == pytest.approx(0.75)


def test_register_custom_term():
    name = "test_length_ratio"

    def length_ratio(pred, ref, ppl, scale=1.0):
        return scale * len(words(pred)) / max(len(words(ref)), 1)

    register_term(name, length_ratio, needs_reference=True)
    try:
        assert name in available_terms()
        with pytest.raises(ValueError, match="already registered"):
            register_term(name, length_ratio)
        res = MultiObjectiveReward({name: 1.0}, options={name: {"scale": 2.0}})(
            ["a b"], ["a b c d"]
        )
        assert res.total == pytest.approx(1.0)
        with pytest.raises(UserError, match="does not accept"):
            MultiObjectiveReward({name: 1.0}, options={name: {"bogus": 1}})
    finally:
        combined_mod._TERMS.pop(name, None)


# ------------------------------------------------------------------ errors


def test_errors():
    with pytest.raises(UserError, match=r"did you mean 'rouge_l'.*valid terms: .*unique_word_ratio"):
        MultiObjectiveReward({"rogue_l": 1.0})
    with pytest.raises(UserError, match="valid terms"):
        MultiObjectiveReward({})
    with pytest.raises(UserError, match="finite number"):
        MultiObjectiveReward({"unique_word_ratio": math.nan})
    with pytest.raises(UserError, match="perplexity_form"):
        MultiObjectiveReward({"perplexity": 1.0}, perplexity_form="log")
    reward = MultiObjectiveReward()
    with pytest.raises(UserError, match="no predictions"):
        reward([], [], ppl=1.0)
    with pytest.raises(UserError, match="2 predictions but 1 references"):
        reward(PREDS, REFS[:1], ppl=1.0)
    with pytest.raises(UserError, match="2 predictions but 3 perplexities"):
        reward(PREDS, REFS, ppl=[1.0, 2.0, 3.0])
    with pytest.raises(UserError, match="need perplexities"):
        reward(PREDS, REFS)
    with pytest.raises(UserError, match="need reference texts"):
        reward(PREDS, ppl=1.0)
    with pytest.raises(UserError, match="single string"):
        reward("the cat", "the cat", ppl=1.0)
    # message is one sentence
    try:
        MultiObjectiveReward({"nope": 1.0})
    except UserError as e:
        assert str(e).count(". ") == 0 and str(e).endswith(".")
