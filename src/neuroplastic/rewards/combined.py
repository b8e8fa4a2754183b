"""Named reward terms and their weighted combination.

A *term* is a function ``fn(pred, ref, ppl, **options) -> float`` registered under a
name, with flags saying whether it needs a reference text and/or a perplexity::

    register_term("length", my_length_fn, needs_reference=True)

A term may also give ``batch_fn(preds, refs, ppls, **options) -> list[float]`` that
scores a whole batch in one call (e.g. one batched forward pass of an embedding
model); :class:`MultiObjectiveReward` then calls it instead of ``fn`` per item. ``fn``
stays required, so a term can always score one item on its own.

:class:`MultiObjectiveReward` takes weights per term name and scores a batch::

    reward = MultiObjectiveReward({"rouge_l": 0.4, "unique_word_ratio": 0.2,
                                   "diversity": 0.2, "perplexity": 0.2})
    r = reward(predictions, references, ppl=[12.3, 8.1])
    r.total, r.per_item, r.terms   # mean total, per-item totals, mean of each term

The total is the plain weighted sum ``sum_k w_k * term_k``; weights are **not**
normalised. With the default weights (which sum to 1) and the built-in terms (each in
[0, 1]) the total is in [0, 1]; other weights give other ranges, on purpose (a
negative weight makes a penalty).

Built-in terms (see :mod:`neuroplastic.rewards.metrics`):

=====================  ======  =====  ==============================================
name                   ref?    ppl?   value
=====================  ======  =====  ==============================================
``rouge_l``            yes     no     ROUGE-L F1 vs the reference
``unique_word_ratio``  no      no     unique words / words (lexical non-repetition)
``diversity``          no      no     min(unique words / ``diversity_cap``, 1) (seed)
``distinct_1``         no      no     distinct unigrams / unigrams
``distinct_2``         no      no     distinct bigrams / bigrams
``perplexity``         no      yes    ``perplexity_form`` of ppl: linear (seed), exp, inverse
=====================  ======  =====  ==============================================

Deprecated names (:data:`DEPRECATED_TERMS`): ``coherence`` is the seed system's name
of ``unique_word_ratio``. It is accepted in weights and options, warns once per
process (FutureWarning), and is scored and reported as ``unique_word_ratio``: that
term gives byte garbage 1.0, so no result is ever labelled "coherence".
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from neuroplastic.errors import UserError
from neuroplastic.rewards import metrics

TermFn = Callable[..., float]
BatchFn = Callable[..., Sequence[float]]


@dataclass(frozen=True)
class RewardTerm:
    """A registered reward term."""

    name: str
    fn: TermFn
    needs_reference: bool = False
    needs_ppl: bool = False
    description: str = ""
    batch_fn: BatchFn | None = None  # (preds, refs, ppls, **options) -> one float per item


_TERMS: dict[str, RewardTerm] = {}

# old name -> registered name; accepted in weights/options, warned about once, reported
# under the new name
DEPRECATED_TERMS: dict[str, str] = {"coherence": "unique_word_ratio"}


def canonical_term(name: str) -> str:
    """``name``, or the registered name a deprecated one stands for (warns once)."""
    new = DEPRECATED_TERMS.get(name) if isinstance(name, str) else None
    if new is None or name in _TERMS:
        return name
    metrics.warn_deprecated_once(name, new)
    return new


def _canonical_mapping(mapping: Mapping[str, Any], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in mapping.items():
        new = canonical_term(name)
        if new in out:
            raise UserError(
                f"{what} names {new!r} twice (once as its deprecated name {name!r}); keep one."
            )
        out[new] = value
    return out


def register_term(
    name: str,
    fn: TermFn | None = None,
    *,
    needs_reference: bool = False,
    needs_ppl: bool = False,
    description: str = "",
    overwrite: bool = False,
    batch_fn: BatchFn | None = None,
):
    """Register ``fn(pred, ref, ppl, **options) -> float`` as reward term ``name``.

    ``ref`` is None unless ``needs_reference``; ``ppl`` is None unless ``needs_ppl``.
    Options come from ``RewardConfig.options[name]``. Usable as a decorator when
    ``fn`` is omitted. Re-registering a name raises ValueError unless ``overwrite``.
    The optional ``batch_fn(preds, refs, ppls, **options)`` scores a whole batch (the
    same lists, with None entries where ``fn`` would get None) and returns one float
    per item; it must accept the same options as ``fn``.
    """

    def _register(f: TermFn) -> TermFn:
        if not name or not isinstance(name, str):
            raise ValueError(f"A reward term name must be a non-empty string, got {name!r}.")
        if name in _TERMS and not overwrite:
            raise ValueError(f"Reward term {name!r} is already registered; pass overwrite=True.")
        _TERMS[name] = RewardTerm(
            name=name,
            fn=f,
            needs_reference=needs_reference,
            needs_ppl=needs_ppl,
            description=description or (f.__doc__ or "").strip().split("\n")[0],
            batch_fn=batch_fn,
        )
        return f

    return _register if fn is None else _register(fn)


def available_terms() -> list[str]:
    """Names of all registered reward terms, sorted."""
    return sorted(_TERMS)


def get_term(name: str) -> RewardTerm:
    """The registered term ``name`` (or of a deprecated name); UserError naming the valid terms otherwise."""
    try:
        return _TERMS[canonical_term(name)]
    except KeyError:
        names = available_terms()
        close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(
            f"Unknown reward term {name!r}; {hint}valid terms: {', '.join(names)}."
        ) from None


# ------------------------------------------------------------------ built-in terms


def _rouge_l(pred: str, ref: str | None, ppl: float | None) -> float:
    """ROUGE-L F1 of the prediction against the reference."""
    return metrics.rouge_l(pred, ref or "")


def _unique_word_ratio(pred: str, ref: str | None, ppl: float | None) -> float:
    """Unique words / words (lexical non-repetition; the seed called it 'coherence')."""
    return metrics.unique_word_ratio(pred)


def _diversity(pred: str, ref: str | None, ppl: float | None, cap: int = 50) -> float:
    """min(unique words / cap, 1) (the seed's 'diversity')."""
    return metrics.diversity(pred, cap)


def _distinct_1(pred: str, ref: str | None, ppl: float | None) -> float:
    """Distinct unigrams / unigrams."""
    return metrics.distinct_n(pred, 1)


def _distinct_2(pred: str, ref: str | None, ppl: float | None) -> float:
    """Distinct bigrams / bigrams."""
    return metrics.distinct_n(pred, 2)


def _perplexity(
    pred: str, ref: str | None, ppl: float | None, form: str = "linear", tau: float = 10.0
) -> float:
    """Perplexity mapped to [0, 1] (linear seed form by default; exp or inverse)."""
    return metrics.perplexity_reward(ppl if ppl is not None else math.inf, form, tau)


register_term("rouge_l", _rouge_l, needs_reference=True)
register_term("unique_word_ratio", _unique_word_ratio)
register_term("diversity", _diversity)
register_term("distinct_1", _distinct_1)
register_term("distinct_2", _distinct_2)
register_term("perplexity", _perplexity, needs_ppl=True)


# ------------------------------------------------------------------ combination


def _default_weights() -> dict[str, float]:
    return {"rouge_l": 0.4, "unique_word_ratio": 0.2, "diversity": 0.2, "perplexity": 0.2}


@dataclass
class RewardConfig:
    """Weights per term name and the knobs of the built-in terms.

    ``perplexity_form``, ``tau`` and ``diversity_cap`` are shorthands for the options
    of the ``perplexity`` and ``diversity`` terms; ``options`` gives keyword
    arguments to any term by name (it wins over the shorthands).
    """

    weights: dict[str, float] = field(default_factory=_default_weights)
    perplexity_form: str = "linear"  # linear (seed; 0 for ppl >= 11) | exp | inverse
    tau: float = 10.0  # scale of the exp perplexity form
    diversity_cap: int = 50  # unique words for full diversity reward (seed: 50)
    options: dict[str, Any] = field(default_factory=dict)  # term -> {kwarg: value}

    def validate(self) -> RewardConfig:
        if not isinstance(self.weights, Mapping) or not self.weights:
            raise UserError(
                "reward.weights must be a non-empty mapping of term name to weight, "
                f"e.g. {{'rouge_l': 1.0}}; valid terms: {', '.join(available_terms())}."
            )
        self.weights = _canonical_mapping(self.weights, "reward.weights")
        for name, w in self.weights.items():
            get_term(name)
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
                raise UserError(f"reward.weights.{name} must be a finite number, got {w!r}.")
        if self.perplexity_form not in metrics.PERPLEXITY_FORMS:
            raise UserError(
                f"reward.perplexity_form must be one of {', '.join(metrics.PERPLEXITY_FORMS)}; "
                f"got {self.perplexity_form!r}."
            )
        if not (isinstance(self.tau, int | float) and self.tau > 0 and math.isfinite(self.tau)):
            raise UserError(f"reward.tau must be a positive number, got {self.tau!r}.")
        if isinstance(self.diversity_cap, bool) or not (
            isinstance(self.diversity_cap, int) and self.diversity_cap > 0
        ):
            raise UserError(
                f"reward.diversity_cap must be a positive integer, got {self.diversity_cap!r}."
            )
        if not isinstance(self.options, Mapping):
            raise UserError(f"reward.options must be a mapping, got {self.options!r}.")
        self.options = _canonical_mapping(self.options, "reward.options")
        for name, opts in self.options.items():
            get_term(name)
            if not isinstance(opts, Mapping):
                raise UserError(
                    f"reward.options.{name} must be a mapping of keyword arguments, got {opts!r}."
                )
        return self

    def term_options(self, name: str) -> dict[str, Any]:
        """Keyword arguments passed to term ``name``."""
        opts: dict[str, Any] = {}
        if name == "perplexity":
            opts = {"form": self.perplexity_form, "tau": float(self.tau)}
        elif name == "diversity":
            opts = {"cap": self.diversity_cap}
        opts.update(self.options.get(name, {}))
        return opts


@dataclass
class RewardResult:
    """Scores of one batch. ``total`` and ``terms`` are means over items."""

    total: float
    per_item: list[float]
    terms: dict[str, float]
    item_terms: dict[str, list[float]]  # term -> value per item (unweighted)
    weights: dict[str, float]

    def as_dict(self, prefix: str = "reward") -> dict[str, float]:
        """Flat scalars for logging: ``{prefix: total, f"{prefix}/{term}": mean, ...}``."""
        out = {prefix: self.total}
        out.update({f"{prefix}/{k}": v for k, v in self.terms.items()})
        return out


class MultiObjectiveReward:
    """Weighted sum of registered reward terms over (prediction, reference, ppl) items.

    ``weights`` is a mapping term -> weight or a :class:`RewardConfig`; keyword
    arguments (``perplexity_form``, ``tau``, ``diversity_cap``, ``options``) fill or
    override the config. Every term named in the weights is computed and reported in
    ``RewardResult.terms``, including weight-0 terms (handy to log a metric without
    rewarding it).
    """

    def __init__(self, weights: Mapping[str, float] | RewardConfig | None = None, **config: Any):
        if isinstance(weights, RewardConfig):
            try:
                cfg = dataclasses.replace(weights, **config)
            except TypeError as e:
                raise UserError(f"Bad reward option: {e}.") from None
        else:
            try:
                cfg = RewardConfig(
                    **({"weights": dict(weights)} if weights is not None else {}), **config
                )
            except TypeError as e:
                raise UserError(f"Bad reward option: {e}.") from None
        self.config = cfg.validate()
        from neuroplastic.rewards.requirements import check_reward_requirements

        check_reward_requirements(self.config)  # missing optional packages: at setup, not step 10
        self.weights: dict[str, float] = {k: float(v) for k, v in cfg.weights.items()}
        self._terms = [get_term(name) for name in self.weights]
        self._options = {t.name: cfg.term_options(t.name) for t in self._terms}
        for t in self._terms:
            try:
                inspect.signature(t.fn).bind("", None, None, **self._options[t.name])
                if t.batch_fn is not None:
                    inspect.signature(t.batch_fn).bind([], [], [], **self._options[t.name])
            except TypeError:
                raise UserError(
                    f"reward.options.{t.name} has options {sorted(self._options[t.name])} that "
                    f"the {t.name!r} term does not accept."
                ) from None
        self.needs_reference = any(t.needs_reference for t in self._terms)
        self.needs_ppl = any(t.needs_ppl for t in self._terms)

    def __repr__(self) -> str:
        return f"MultiObjectiveReward({self.weights})"

    def __call__(
        self,
        predictions: Sequence[str],
        references: Sequence[str] | None = None,
        ppl: Sequence[float] | float | None = None,
    ) -> RewardResult:
        if isinstance(predictions, str) or isinstance(references, str):
            raise UserError(
                "The reward takes lists of texts, got a single string; wrap it in a list."
            )
        preds = list(predictions)
        n = len(preds)
        if n == 0:
            raise UserError("The reward got no predictions; pass at least one generated text.")
        refs: list[str | None]
        if references is None:
            refs = _unneeded([t.name for t in self._terms if t.needs_reference], "reference texts", "references", n)
        else:
            refs = list(references)
            if len(refs) != n:
                raise UserError(
                    f"Got {n} predictions but {len(refs)} references; pass one reference "
                    "per prediction."
                )
        ppls: list[float | None]
        if ppl is None:
            ppls = _unneeded([t.name for t in self._terms if t.needs_ppl], "perplexities",
                             "ppl= (one per prediction or one for all)", n)
        elif isinstance(ppl, int | float):
            ppls = [float(ppl)] * n
        else:
            ppls = [float(p) for p in ppl]
            if len(ppls) != n:
                raise UserError(
                    f"Got {n} predictions but {len(ppls)} perplexities; pass one per "
                    "prediction or a single number."
                )

        item_terms: dict[str, list[float]] = {}
        for t in self._terms:
            opts = self._options[t.name]
            if t.batch_fn is not None:
                vals = [
                    float(v)
                    for v in t.batch_fn(
                        preds,
                        refs if t.needs_reference else [None] * n,
                        ppls if t.needs_ppl else [None] * n,
                        **opts,
                    )
                ]
                if len(vals) != n:
                    raise ValueError(
                        f"The batch function of reward term {t.name!r} returned {len(vals)} "
                        f"values for {n} items."
                    )
                item_terms[t.name] = vals
                continue
            item_terms[t.name] = [
                float(t.fn(p, r if t.needs_reference else None, q if t.needs_ppl else None, **opts))
                for p, r, q in zip(preds, refs, ppls)
            ]
        per_item = [
            sum(self.weights[name] * vals[i] for name, vals in item_terms.items()) for i in range(n)
        ]
        return RewardResult(
            total=sum(per_item) / n,
            per_item=per_item,
            terms={name: sum(vals) / n for name, vals in item_terms.items()},
            item_terms=item_terms,
            weights=dict(self.weights),
        )


def _unneeded(need: list[str], what: str, how: str, n: int) -> list[None]:
    """``n`` Nones for an input not given; a clear error if the terms ``need`` it."""
    if need:
        raise UserError(f"The reward terms {need} need {what}; pass {how} or remove those terms from the weights.")
    return [None] * n
