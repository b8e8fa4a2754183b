"""Reward terms on generated text and their weighted combination.

>>> from neuroplastic.rewards import MultiObjectiveReward
>>> r = MultiObjectiveReward({"coherence": 0.5, "distinct_2": 0.5})(["the cat the dog"])
>>> round(r.total, 4), r.terms["coherence"]
(0.875, 0.75)

ROUGE-L needs the optional ``rouge-score`` package (``neuroplastic[metrics]``); it
is imported on first use only. The generation terms (``length``, ``entropy``,
``bleu``, ``meteor``, ``semantic_similarity``) and :func:`output_entropy` live in
:mod:`neuroplastic.rewards.generation`; their optional packages load on first use too.
"""

from neuroplastic.rewards.combined import (
    MultiObjectiveReward,
    RewardConfig,
    RewardResult,
    RewardTerm,
    available_terms,
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

__all__ = [
    "PERPLEXITY_FORMS",
    "MultiObjectiveReward",
    "RewardConfig",
    "RewardResult",
    "RewardTerm",
    "available_terms",
    "bleu",
    "coherence",
    "distinct_n",
    "diversity",
    "get_term",
    "length_efficiency",
    "load_embedder",
    "load_wordnet",
    "meteor",
    "output_entropy",
    "perplexity_reward",
    "register_term",
    "rouge_l",
    "semantic_similarities",
    "unigram_entropy",
    "unique_word_ratio",
    "words",
]
