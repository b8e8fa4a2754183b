"""Reward terms on generated text and their weighted combination.

>>> from neuroplastic.rewards import MultiObjectiveReward
>>> r = MultiObjectiveReward({"coherence": 0.5, "distinct_2": 0.5})(["the cat the dog"])
>>> round(r.total, 4), r.terms["coherence"]
(0.875, 0.75)

ROUGE-L needs the optional ``rouge-score`` package (``neuroplastic[metrics]``); it
is imported on first use only.
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
    "coherence",
    "distinct_n",
    "diversity",
    "get_term",
    "perplexity_reward",
    "register_term",
    "rouge_l",
    "unique_word_ratio",
    "words",
]
