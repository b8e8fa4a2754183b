"""Text metrics for rewards: one prediction (and maybe its reference) -> one float.

Every function here is pure and cheap; :mod:`neuroplastic.rewards.combined` turns
them into named, weighted reward terms.

Word tokenisation
-----------------
All word-based terms (unique-word ratio, diversity, distinct-n) share :func:`words`: the text
is lowercased and split into runs of Unicode letters and digits, keeping an inner
apostrophe (``"Don't stop!"`` -> ``["don't", "stop"]``). Punctuation, underscores and
whitespace separate words and are dropped. There is no stemming.

ROUGE-L is the exception: it uses the ``rouge-score`` package's own tokeniser
(ASCII ``[a-z0-9]`` runs, Porter-stemmed when longer than 3 characters), so that its
numbers are the standard ROUGE numbers.
"""

from __future__ import annotations

import functools
import math
import re
import warnings

from neuroplastic.errors import UserError

# Runs of letters/digits (Unicode-aware, no underscore), with inner apostrophes kept.
_WORD_RE = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")

PERPLEXITY_FORMS = ("linear", "exp", "inverse")


@functools.lru_cache(maxsize=8192)
def _words(text: str) -> tuple[str, ...]:
    return tuple(_WORD_RE.findall(text.lower()))


def words(text: str) -> list[str]:
    """Lowercased words of ``text`` (see the module docstring for the exact rule)."""
    return list(_words(text))


def unique_word_ratio(text: str) -> float:
    """Unique words / total words; 0 for text with no words.

    This is what the seed system called "coherence". It measures only lexical
    non-repetition: ``"the cat the dog"`` scores 3/4, any sequence of distinct words
    (even word salad or byte garbage) scores 1. It says nothing about whether text
    makes sense, hence its name here.
    """
    w = _words(text)
    return len(set(w)) / len(w) if w else 0.0


_warned: set[str] = set()


def warn_deprecated_once(old: str, new: str, what: str = "reward term") -> None:
    """One FutureWarning per process that ``old`` is a deprecated name of ``new``."""
    if old in _warned:
        return
    _warned.add(old)
    warnings.warn(
        f"The {what} {old!r} is a deprecated name of {new!r}: it is the unique-word ratio "
        "(lexical non-repetition; byte garbage scores 1.0), not a measure of coherence. "
        f"Use {new!r}; results are reported under {new!r}.",
        FutureWarning,
        stacklevel=3,
    )


def coherence(text: str) -> float:
    """Deprecated name of :func:`unique_word_ratio` (warns once); not a coherence measure."""
    warn_deprecated_once("coherence", "unique_word_ratio", "function")
    return unique_word_ratio(text)


def diversity(text: str, cap: int = 50) -> float:
    """``min(unique words / cap, 1)`` (seed: ``cap=50``); 0 for empty text.

    This rewards *length* as much as variety: any text with ``cap`` distinct words
    scores 1. :func:`distinct_n` is the length-normalised alternative.
    """
    if cap <= 0:
        raise UserError(f"The diversity cap must be a positive integer, got {cap}.")
    return min(len(set(_words(text))) / cap, 1.0)


def distinct_n(text: str, n: int = 2) -> float:
    """Distinct n-grams / total n-grams of the words of ``text`` (Li et al., 2016).

    0 when the text has fewer than ``n`` words. Unlike :func:`diversity` it does not
    grow with length; unlike :func:`unique_word_ratio` (which equals distinct-1) it can
    look at phrases (``n=2``) to catch repeated word pairs.
    """
    if n < 1:
        raise UserError(f"distinct-n needs n >= 1, got {n}.")
    w = _words(text)
    total = len(w) - n + 1
    if total <= 0:
        return 0.0
    return len({w[i : i + n] for i in range(total)}) / total


def perplexity_reward(ppl: float, form: str = "linear", tau: float = 10.0) -> float:
    """Map a perplexity (>= 1, lower is better) to a reward in [0, 1].

    - ``"linear"`` (default, the seed formula): ``clip(1 - (ppl - 1) / 10, 0, 1)``.
      It is 1 at ppl 1, 0.5 at ppl 6 and **0 for every ppl >= 11**, so it gives no
      signal at all for an untrained or small model (a byte-level model starts near
      ppl 256, a GPT-2-sized vocabulary near 50k).
    - ``"exp"``: ``exp(-(ppl - 1) / tau)``; smooth and never exactly 0. Choose ``tau``
      on the scale of the perplexities you expect (e.g. around the current ppl).
    - ``"inverse"``: ``1 / ppl``; scale-free, no knob.

    A ppl below 1 is treated as 1 (reward 1). A non-finite ppl (inf from an
    overflowing loss, or NaN) gives 0. ``ppl <= 0`` is an error.
    """
    if form not in PERPLEXITY_FORMS:
        raise UserError(
            f"Unknown perplexity reward form {form!r}; use one of {', '.join(PERPLEXITY_FORMS)}."
        )
    ppl = float(ppl)
    if not math.isfinite(ppl):
        return 0.0
    if ppl <= 0:
        raise UserError(f"A perplexity must be positive, got {ppl}; pass exp(mean token loss).")
    ppl = max(ppl, 1.0)
    if form == "linear":
        return min(max(1.0 - (ppl - 1.0) / 10.0, 0.0), 1.0)
    if form == "exp":
        if not tau > 0:
            raise UserError(f"The perplexity reward tau must be > 0, got {tau}.")
        return math.exp(-(ppl - 1.0) / tau)
    return 1.0 / ppl


@functools.lru_cache(maxsize=1)
def rouge_l_scorer():
    """The shared ``RougeScorer(["rougeL"], use_stemmer=True)`` (built once, imported lazily)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:  # optional dependency
        raise UserError(
            "ROUGE-L needs the rouge-score package; install it with "
            "pip install 'neuroplastic[metrics]' or drop rouge_l from the reward weights."
        ) from e
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of ``prediction`` against ``reference`` (0 if either has no tokens)."""
    return float(rouge_l_scorer().score(reference, prediction)["rougeL"].fmeasure)
