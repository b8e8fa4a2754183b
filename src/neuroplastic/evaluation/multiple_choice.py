"""Multiple-choice evaluation by log-likelihood: the scorers, items and task dispatch.

Each item becomes one *context* and a few *continuations* (one per option). A scorer
returns, for every ``(context, continuation)`` request, the summed log-probability of the
continuation given the context and whether it is the greedy continuation -- the
``loglikelihood`` request of EleutherAI's lm-evaluation-harness. Two predictions come
out of the scores:

* ``acc``: the option with the highest summed log-probability;
* ``acc_norm``: the option with the highest log-probability per character of the
  *choice* -- the continuation without lm-eval's target delimiter (the leading space):
  ``sum logprob / len(choice)``, exactly lm-evaluation-harness 0.4's ``process_results``
  (``completion_len = len(choice)`` over ``doc_to_choice``, the delimiter is added to the
  request only). ``acc_bytes`` divides by the choice's UTF-8 bytes instead (lm-eval's
  ``acc_bytes``); the two differ only for non-ASCII text.

Scorers (:class:`LogLikelihoodScorer`) work on any causal LM: :class:`GPTScorer` for our
GPT (``model(idx) -> (logits, loss)``) and :class:`HFScorer` for a ``transformers``
causal LM (``model(input_ids, attention_mask).logits``). Context and continuation are
tokenized separately and their ids concatenated (whitespace at the end of the context is
moved to the start of the continuation first, as lm-eval does); an empty context is
replaced by the end-of-text (HF: beginning-of-text, else end-of-text) token. A sequence
longer than the model's window loses tokens from the left of the context; a continuation
longer than the window itself is scored in consecutive windows (lm-eval's rolling
windows). Requests whose model inputs are identical (the four answers " A".." D" of an
MMLU question) share one forward row; rows are sorted by length, right-padded (with an
attention mask for HF models; our GPT is causal, so pads after a row never reach it) to
the longest of their batch, run one forward per batch, and only the continuation
positions go through ``log_softmax`` (in float32). A tqdm bar shows progress when there
are at least 8 batches (``progress=True/False`` forces it).

Task formats (``evaluate_task``):

* ``mmlu``: lm-eval's ``mmlu`` prompt and shots, see :mod:`neuroplastic.evaluation.mmlu`.
  ``per_subject`` holds each subject's accuracy and ``"macro_acc"``, their unweighted mean
  (``acc`` is the micro average).
* ``hellaswag``: lm-eval's preprocessing, see :mod:`neuroplastic.evaluation.hellaswag`.
* ``synthetic-mc`` (:meth:`SyntheticCurriculum.multiple_choice`): options are scored as
  continuations, not letters -- context ``"Question: {question}\\nAnswer:"``,
  continuation ``" " + option`` -- since a small model trained on the curriculum never
  sees lettered answer formats. Shots: k other items with their right answer.
* ``synthetic-completion`` (:meth:`SyntheticCurriculum.completions`): context ``ctx``,
  continuation ``" " + ending``, shots as for HellaSwag.

For the synthetic tasks ``per_subject`` is by domain (with ``"macro_acc"``); for
HellaSwag it is empty.

The model's window: :func:`evaluate_task` drops few-shot examples (the last ones first)
from a prompt that would not fit the scorer's window with its longest continuation, warns
once and reports the shots used (``shots_used``: min, max, mean; ``shots_cut``: items that
got fewer than asked). A prompt that still does not fit loses tokens from the left; those
items are counted in ``truncated`` (and flagged per item).
"""

from __future__ import annotations

import difflib
import math
import random
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from neuroplastic.data.tokenizers import as_tokenizer
from neuroplastic.errors import UserError
from neuroplastic.models.api import CausalLM
from neuroplastic.models.hf import hf_context_length

__all__ = [
    "TASKS",
    "GPTScorer",
    "HFScorer",
    "LogLikelihoodScorer",
    "MCInstance",
    "build_instances",
    "evaluate_task",
    "fit_shots",
    "locate_data",
    "make_scorer",
    "score_instances",
    "shot_instances",
]

TASKS: tuple[str, ...] = ("mmlu", "hellaswag", "synthetic-mc", "synthetic-completion")

# Show a progress bar when scoring takes at least this many batches (progress=None).
_PROGRESS_MIN_BATCHES = 8


# =========================================================================== scorers


class LogLikelihoodScorer:
    """Scores ``(context, continuation)`` requests with a causal LM.

    Subclasses provide :meth:`encode` (text -> ids, no special tokens), :meth:`forward`
    (``(B, T)`` ids and mask -> ``(B, T, V)`` logits), ``max_length`` (the model's window),
    ``prefix_id`` (stands in for an empty context) and ``pad_id``. Anything else that can
    answer :meth:`loglikelihood` (a fake, an API model) may subclass this and override it.
    """

    max_length: int = 2048
    prefix_id: int | None = None
    pad_id: int = 0
    # indices (into the last loglikelihood call's requests) whose context was cut on the left
    truncated: list[int] = []  # noqa: RUF012  (replaced per call, never mutated)

    def __init__(
        self,
        device: str | torch.device | None = None,
        batch_size: int = 16,
        progress: bool | None = None,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.device = torch.device(device) if device is not None else None
        self.batch_size = batch_size
        self.progress = progress

    # ------------------------------------------------------------------ to implement

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    # ------------------------------------------------------------------ scoring

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation tokens | context), is_greedy)`` per request."""
        pairs: list[tuple[str, str]] = []
        for context, continuation in requests:
            n = len(context) - len(context.rstrip())
            if n:  # lm-eval: trailing whitespace of the context belongs to the continuation
                context, continuation = context[:-n], context[-n:] + continuation
            pairs.append((context, continuation))
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))
        ids = dict(zip(texts, self.encode_many(texts)))
        return self.loglikelihood_tokens([(ids[c], ids[x]) for c, x in pairs])

    @torch.no_grad()
    def loglikelihood_tokens(
        self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[tuple[float, bool]]:
        """The same as :meth:`loglikelihood` on already tokenized ``(context, continuation)``.

        The model sees at most ``max_length`` tokens: the context is cut from the left. A
        continuation longer than the window is scored in disjoint pieces of at most
        ``max_length`` targets, each read from one forward over the ``max_length`` tokens
        that end just before its last target (lm-eval's rolling windows).
        """
        window = int(self.max_length)
        totals = [0.0] * len(requests)
        greedy = [True] * len(requests)
        truncated: list[int] = []
        # model input -> (request, target ids read from the last positions of that input)
        rows: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, (ctx, cont) in enumerate(requests):
            ctx, cont = list(ctx), list(cont)
            if not cont:
                continue
            if not ctx:
                if self.prefix_id is None:
                    raise UserError(
                        "the context is empty and the tokenizer has no end-of-text or "
                        "beginning-of-text token to start from; give a non-empty context."
                    )
                ctx = [self.prefix_id]
            whole = ctx + cont
            if len(whole) - 1 > window:  # the model cannot see the whole context
                truncated.append(i)
            start, q = len(ctx), len(whole)
            while q > start:  # targets whole[p:q], predicted by the input whole[.. : q - 1]
                p = max(start, q - window)
                row = tuple(whole[max(0, q - 1 - window) : q - 1])
                rows.setdefault(row, []).append((i, whole[p:q]))
                q = p

        order = sorted(rows, key=len, reverse=True)
        batches = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        show = self.progress if self.progress is not None else len(batches) >= _PROGRESS_MIN_BATCHES
        bar = None
        if show and batches:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=len(batches), desc="scoring", unit="batch", file=sys.stderr,
                dynamic_ncols=True, leave=False,
                mininterval=0.1 if sys.stderr.isatty() else 15.0,
            )
        device = self._device()
        try:
            for batch in batches:
                width = len(batch[0])
                ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for b, row in enumerate(batch):
                    ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
                    mask[b, : len(row)] = 1
                logits = self.forward(ids.to(device), mask.to(device))
                # one log_softmax over every position read in this batch
                sel_b: list[int] = []
                sel_t: list[int] = []
                owners: list[int] = []
                idx: list[int] = []
                tgt: list[int] = []
                seg: list[int] = []
                for b, row in enumerate(batch):
                    users = rows[row]
                    k = max(len(t) for _, t in users)
                    base = len(sel_b)
                    sel_b.extend([b] * k)
                    sel_t.extend(range(len(row) - k, len(row)))
                    for i, targets in users:
                        start = base + k - len(targets)
                        idx.extend(range(start, start + len(targets)))
                        tgt.extend(targets)
                        seg.extend([len(owners)] * len(targets))
                        owners.append(i)
                flat = logits[torch.tensor(sel_b, device=logits.device),
                              torch.tensor(sel_t, device=logits.device)]
                logprobs = F.log_softmax(flat.float(), dim=-1)
                idx_t = torch.tensor(idx, device=logits.device)
                tgt_t = torch.tensor(tgt, device=logits.device)
                seg_t = torch.tensor(seg, device=logits.device)
                lp = logprobs[idx_t, tgt_t].double()
                miss = (logprobs.argmax(dim=-1)[idx_t] != tgt_t).double()
                sums = torch.zeros(len(owners), dtype=torch.float64, device=logits.device)
                misses = torch.zeros_like(sums)
                sums.index_add_(0, seg_t, lp)
                misses.index_add_(0, seg_t, miss)
                for i, total, missed in zip(owners, sums.tolist(), misses.tolist()):
                    totals[i] += total
                    greedy[i] = greedy[i] and missed == 0
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        self.truncated = truncated
        return list(zip(totals, greedy))

    def _device(self) -> torch.device:
        return self.device if self.device is not None else torch.device("cpu")


class _ModelScorer(LogLikelihoodScorer):
    """Shared set-up: tokenizer (ours or a ``transformers`` one), model device and eval mode."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        device: str | torch.device | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
        progress: bool | None = None,
    ):
        if device is None:
            param = next(iter(model.parameters()), None)
            device = param.device if param is not None else "cpu"
        super().__init__(device=device, batch_size=batch_size, progress=progress)
        self.model = model
        self.tokenizer = tokenizer
        self.codec = as_tokenizer(tokenizer)
        self.prefix_id = self.codec.prefix_id
        self.pad_id = self.codec.pad_id
        window = max_length if max_length is not None else self._model_window()
        if window is None or int(window) < 1:
            raise UserError(
                "cannot tell the model's context window; pass max_length to the scorer."
            )
        self.max_length = int(window)

    def _model_window(self) -> int | None:
        return None

    def encode(self, text: str) -> list[int]:
        return self.codec.encode(text)

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        return self.codec.encode_batch(list(texts))

    def loglikelihood_tokens(self, requests):
        was_training = self.model.training
        self.model.eval()
        try:
            return super().loglikelihood_tokens(requests)
        finally:
            self.model.train(was_training)


class GPTScorer(_ModelScorer):
    """Scorer for our GPT (``model(idx) -> (logits, loss)``); the window is
    ``model.config.block_size`` (contexts are cut from the left to fit it).

    Right padding needs no mask here: attention is causal, so pad tokens after a row's
    end never reach the positions that are read.
    """

    def _model_window(self) -> int | None:
        return getattr(getattr(self.model, "config", None), "block_size", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids)
        return out[0] if isinstance(out, tuple | list) else out.logits


class HFScorer(_ModelScorer):
    """Scorer for a ``transformers`` causal LM: ``model(input_ids, attention_mask).logits``.

    The window is the model config's ``n_positions`` / ``max_position_embeddings``
    (else the tokenizer's ``model_max_length``, else 2048) unless ``max_length`` is given.
    ``tokenizer`` is a ``transformers`` tokenizer or one of ours.
    """

    def _model_window(self) -> int | None:
        value = hf_context_length(getattr(self.model, "config", None))
        if value is not None:
            return value
        value = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(value, int) and 0 < value < 1_000_000:
            return value
        return 2048

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def make_scorer(
    model: torch.nn.Module,
    tokenizer: Any,
    device: str | torch.device | None = None,
    batch_size: int = 16,
    **kwargs: Any,
) -> LogLikelihoodScorer:
    """:class:`GPTScorer` for our models (a :class:`~neuroplastic.models.api.CausalLM`),
    else :class:`HFScorer` (a bare ``transformers`` model)."""
    if isinstance(model, CausalLM):
        return GPTScorer(model, tokenizer, device, batch_size, **kwargs)
    return HFScorer(model, tokenizer, device, batch_size, **kwargs)


# =========================================================================== prompts


@dataclass
class MCInstance:
    """One item ready to score: a context, its continuations, the right one's index."""

    context: str
    continuations: list[str]
    gold: int
    subject: str | None = None
    record: dict = field(default_factory=dict)  # what the per-item output shows
    # lm-eval's target_delimiter: a continuation is delimiter + choice; acc_norm divides
    # by len(choice)
    delimiter: str = " "
    # the context as header + shots + query (when built with shots), so that shots can be
    # dropped to fit a window; ``context`` is always the full prompt with every shot
    header: str = ""
    shots: list[str] = field(default_factory=list)
    query: str | None = None

    @property
    def choices(self) -> list[str]:
        d = self.delimiter
        return [c[len(d):] if d and c.startswith(d) else c for c in self.continuations]

    def with_shots(self, k: int) -> str:
        """The context with only the first ``k`` shots."""
        if self.query is None:
            return self.context
        return self.header + "".join(self.shots[:k]) + self.query


def _sample_shots(n_items: int, index: int, k: int, seed: int) -> list[int]:
    """k indices other than ``index``, drawn by a generator seeded per item."""
    if k == 0:
        return []
    if k > n_items - 1:
        raise UserError(
            f"{k} shots need at least {k + 1} items, but there are only {n_items}; "
            "lower the number of shots."
        )
    rng = random.Random(f"neuroplastic-shots:{seed}:{index}")
    pool = [j for j in range(n_items) if j != index]
    return rng.sample(pool, k)


def _check_count(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def locate_data(name: str, data_path: Any, data_dir: Any) -> Path:
    """``data_path``, else the local copy of the registry dataset ``name``."""
    if data_path is not None:
        return Path(data_path)
    from neuroplastic.data.registry import data_dirs, find_local, get_entry

    found = find_local(name, data_dir)
    if found is None:
        searched = ", ".join(str(d) for d in data_dirs(data_dir))
        raise UserError(
            f"no local copy of {name} ({get_entry(name).paths[0]}) in the data dirs "
            f"({searched}); pass its path, or set NEUROPLASTIC_DATA / --data-dir to a folder "
            "that holds it."
        )
    return found


def shot_instances(
    queries: Sequence[tuple[str, list[str]]],
    gold: Sequence[int],
    subjects: Sequence[str | None],
    records: Sequence[dict],
    *,
    limit: int | None = None,
    shots: int = 0,
    seed: int = 0,
) -> list[MCInstance]:
    """:class:`MCInstance` s of the first ``limit`` ``(query, endings)`` items, continuation
    ``" " + ending``, each after ``shots`` other items (drawn with ``seed``) with their
    right ending."""
    out: list[MCInstance] = []
    n = len(queries) if limit is None else min(limit, len(queries))
    for i in range(n):
        query, endings = queries[i]
        shot_texts = [
            f"{queries[j][0]} {queries[j][1][gold[j]]}\n\n"
            for j in _sample_shots(len(queries), i, shots, seed)
        ]
        out.append(
            MCInstance(
                context="".join(shot_texts) + query,
                continuations=[" " + e for e in endings],
                gold=gold[i],
                subject=subjects[i],
                record=records[i],
                shots=shot_texts,
                query=query,
            )
        )
    return out


def build_instances(
    task: str,
    *,
    data_path: str | Path | None = None,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    shots: int = 0,
    seed: int = 0,
    split: str = "val",
    subjects: Sequence[str] | None = None,
    preprocess: bool = True,
    limit_per_subject: int | None = None,
) -> list[MCInstance]:
    """The items of ``task`` as :class:`MCInstance` s (see the module docstring)."""
    _check_count("limit", limit, 1, allow_none=True)
    _check_count("limit_per_subject", limit_per_subject, 1, allow_none=True)
    _check_count("shots", shots, 0)
    if task not in TASKS:
        close = difflib.get_close_matches(str(task), TASKS, n=1)
        hint = f"did you mean {close[0]}?" if close else f"choose one of {', '.join(TASKS)}"
        raise UserError(f"unknown multiple-choice task {task!r}; {hint}")
    if task == "mmlu":
        from neuroplastic.evaluation.mmlu import mmlu_instances

        return mmlu_instances(
            locate_data("mmlu", data_path, data_dir), split=split, subjects=subjects,
            limit=limit, limit_per_subject=limit_per_subject, shots=shots,
        )
    if task == "hellaswag":
        from neuroplastic.evaluation.hellaswag import hellaswag_instances

        return hellaswag_instances(
            locate_data("hellaswag", data_path, data_dir), limit=limit, shots=shots, seed=seed,
            preprocess=preprocess,
        )
    from neuroplastic.data.synthetic import SyntheticCurriculum

    cur = SyntheticCurriculum(seed=seed)
    if task == "synthetic-mc":
        items = cur.multiple_choice()
        return shot_instances(
            [(f"Question: {it['question']}\nAnswer:", it["options"]) for it in items],
            [it["answer"] for it in items],
            [it["subject"] for it in items],
            [{"subject": it["subject"], "question": it["question"]} for it in items],
            limit=limit, shots=shots, seed=seed,
        )
    items = cur.completions()
    return shot_instances(
        [(it["ctx"], it["endings"]) for it in items],
        [it["label"] for it in items],
        [it["domain"] for it in items],
        [{"domain": it["domain"], "ctx": it["ctx"]} for it in items],
        limit=limit, shots=shots, seed=seed,
    )


def fit_shots(scorer: LogLikelihoodScorer, instances: Sequence[MCInstance]) -> list[int]:
    """Drop few-shot examples (the last first) from every prompt that would not fit the
    scorer's window together with its longest continuation; returns the shots each
    instance keeps (its ``context`` is rewritten). Needs a scorer that can ``encode``."""
    window = int(getattr(scorer, "max_length", 0) or 0)
    used: list[int] = []
    for inst in instances:
        k = len(inst.shots)
        if k == 0 or inst.query is None or window < 1:
            used.append(k)
            continue
        try:
            longest = max(len(scorer.encode(c)) for c in inst.continuations)
        except NotImplementedError:  # a scorer that only answers loglikelihood
            used.append(k)
            continue
        while k > 0 and len(scorer.encode(inst.with_shots(k))) + longest - 1 > window:
            k -= 1
        if k < len(inst.shots):
            inst.context = inst.with_shots(k)
        used.append(k)
    return used


# =========================================================================== scoring


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def score_instances(
    scorer: LogLikelihoodScorer, instances: Sequence[MCInstance], task: str = "custom"
) -> dict:
    """Score every option of every instance in one :meth:`~LogLikelihoodScorer.loglikelihood`
    call; return ``{"task", "acc", "acc_norm", "n", "per_subject", "items"}``."""
    if not instances:
        raise UserError(f"there are no {task} items to evaluate; check the data and the limit.")
    requests = [(inst.context, cont) for inst in instances for cont in inst.continuations]
    scorer.truncated = []
    scores = scorer.loglikelihood(requests)
    cut_requests = set(getattr(scorer, "truncated", None) or [])
    items: list[dict] = []
    pos = 0
    hits = hits_norm = hits_bytes = n_cut = 0
    per: dict[str, list[int]] = {}
    for inst in instances:
        k = len(inst.continuations)
        chunk = scores[pos : pos + k]
        cut = any(r in cut_requests for r in range(pos, pos + k))
        pos += k
        lls = [float(s[0]) for s in chunk]
        choices = inst.choices
        # lm-eval: lls / len(choice) and lls / len(choice.encode()); the delimiter is not counted
        normed = [ll / max(len(c), 1) for ll, c in zip(lls, choices)]
        per_byte = [ll / max(len(c.encode("utf-8")), 1) for ll, c in zip(lls, choices)]
        pred, pred_norm, pred_bytes = _argmax(lls), _argmax(normed), _argmax(per_byte)
        hits += pred == inst.gold
        hits_norm += pred_norm == inst.gold
        hits_bytes += pred_bytes == inst.gold
        n_cut += cut
        if inst.subject is not None:
            per.setdefault(inst.subject, []).append(int(pred == inst.gold))
        items.append(
            {
                **inst.record,
                "logprobs": lls,
                "is_greedy": [bool(s[1]) for s in chunk],
                "pred": pred,
                "pred_norm": pred_norm,
                "gold": inst.gold,
                **({"truncated": True} if cut else {}),
            }
        )
    n = len(instances)
    per_subject: dict[str, float] = {s: sum(v) / len(v) for s, v in sorted(per.items())}
    if per_subject:
        per_subject["macro_acc"] = math.fsum(per_subject.values()) / len(per_subject)
    return {
        "task": task,
        "acc": hits / n,
        "acc_norm": hits_norm / n,
        "acc_bytes": hits_bytes / n,
        "n": n,
        "truncated": n_cut,
        "window": int(getattr(scorer, "max_length", 0) or 0),
        "per_subject": per_subject,
        "items": items,
    }


def evaluate_task(
    scorer: LogLikelihoodScorer,
    task: str,
    *,
    data_path: str | Path | None = None,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    shots: int = 0,
    seed: int = 0,
    split: str = "val",
    subjects: Sequence[str] | None = None,
    preprocess: bool = True,
    limit_per_subject: int | None = None,
) -> dict:
    """Evaluate ``scorer`` on ``task`` (one of :data:`TASKS`).

    ``data_path``: the mmlu folder / csv or the HellaSwag jsonl; when None it is found with
    the data registry (``data_dir``, ``NEUROPLASTIC_DATA``, ``../shared/data``, the cache).
    ``limit``: the first N items in total (MMLU: round-robin over subjects);
    ``limit_per_subject``: MMLU only, at most N per subject (lm-eval's ``--limit``).
    ``shots``: k-shot examples asked for; prompts too long for the scorer's window keep
    fewer (a warning, once; ``shots_used`` / ``shots_cut`` in the result).
    ``seed``: the few-shot draws (HellaSwag, synthetic) and the synthetic items.
    ``split`` and ``subjects`` pick MMLU files; ``preprocess`` applies lm-eval's
    HellaSwag text cleaning. Returns ``{"task", "acc", "acc_norm", "acc_bytes", "n",
    "shots", "shots_used", "shots_cut", "truncated", "window", "per_subject", "items"}``.
    """
    if limit_per_subject is not None and task != "mmlu":
        raise UserError("limit_per_subject applies to MMLU only; use limit for other tasks.")
    instances = build_instances(
        task, data_path=data_path, data_dir=data_dir, limit=limit, shots=shots, seed=seed,
        split=split, subjects=subjects, preprocess=preprocess,
        limit_per_subject=limit_per_subject,
    )
    used = fit_shots(scorer, instances) if shots else [0] * len(instances)
    cut = sum(u < shots for u in used)
    if cut:
        warnings.warn(
            f"{cut} of {len(instances)} {task} prompts did not fit the model's "
            f"{scorer.max_length}-token window with {shots} shots and kept "
            f"{min(used)}-{max(used)} (mean {sum(used) / len(used):.2f}).",
            UserWarning, stacklevel=2,
        )
    for inst, u in zip(instances, used):
        inst.record = {**inst.record, "shots": u}
    result = score_instances(scorer, instances, task)
    result["shots"] = shots
    result["shots_used"] = {"min": min(used), "max": max(used), "mean": sum(used) / len(used)}
    result["shots_cut"] = cut
    return result
