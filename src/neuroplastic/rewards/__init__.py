"""Reward terms on generated text and their weighted combination.

>>> from neuroplastic.rewards import MultiObjectiveReward
>>> r = MultiObjectiveReward({"unique_word_ratio": 0.5, "distinct_2": 0.5})(["the cat the dog"])
>>> round(r.total, 4), r.terms["unique_word_ratio"]
(0.875, 0.75)

``coherence`` is a deprecated name of ``unique_word_ratio`` (see
:data:`~neuroplastic.rewards.combined.DEPRECATED_TERMS`): it warns once and is reported
as ``unique_word_ratio``.

ROUGE-L needs the optional ``rouge-score`` package (``neuroplastic[metrics]``); it
is imported on first use only. The generation terms (``length``, ``entropy``,
``bleu``, ``meteor``, ``semantic_similarity``) and :func:`output_entropy` live in
:mod:`neuroplastic.rewards.generation`; their optional packages load on first use too.
"""

from neuroplastic.rewards.combined import (
    DEPRECATED_TERMS,
    MultiObjectiveReward,
    RewardConfig,
    RewardResult,
    RewardTerm,
    available_terms,
    canonical_term,
    get_term,
    register_term,
)
from neuroplastic.rewards.generation import (
    bleu,
    length_efficiency,
    load_embedder,
    load_wordnet,
    meteor,
    output_entropy,
    semantic_similarities,
    unigram_entropy,
)
from neuroplastic.rewards.metrics import (
    PERPLEXITY_FORMS,
    coherence,
    distinct_n,
    diversity,
    perplexity_reward,
    rouge_l,
    unique_word_ratio,
    words,
)
from neuroplastic.rewards.requirements import (
    check_reward_requirements,
    missing_reward_requirements,
    reward_requirements,
)

__all__ = [
    "DEPRECATED_TERMS",
    "PERPLEXITY_FORMS",
    "MultiObjectiveReward",
    "RewardConfig",
    "RewardResult",
    "RewardTerm",
    "available_terms",
    "bleu",
    "canonical_term",
    "check_reward_requirements",
    "coherence",
    "distinct_n",
    "diversity",
    "get_term",
    "length_efficiency",
    "load_embedder",
    "load_wordnet",
    "meteor",
    "missing_reward_requirements",
    "output_entropy",
    "perplexity_reward",
    "register_term",
    "reward_requirements",
    "rouge_l",
    "semantic_similarities",
    "unigram_entropy",
    "unique_word_ratio",
    "words",
]
