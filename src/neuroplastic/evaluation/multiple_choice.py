"""Multiple-choice evaluation by log-likelihood (MMLU, HellaSwag, the synthetic items).

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

* ``mmlu`` (csv, no header: question, A, B, C, D, answer letter; ``<subject>_<split>.csv``):
  lm-eval's ``mmlu`` prompt, ``"The following are multiple choice questions (with
  answers) about {subject}.\\n\\n"`` then the k shots, each ``"{question}\\nA. ..\\nB.
  ..\\nC. ..\\nD. ..\\nAnswer: {letter}"`` followed by ``"\\n\\n"``, then the question
  ending ``"Answer:"``; continuations ``" A"`` .. ``" D"``. Shots are the first k rows of
  the subject's ``dev`` split (lm-eval's ``first_n``). ``limit`` counts items in total,
  taken round-robin over the subjects (the first items of every subject);
  ``limit_per_subject`` is lm-eval's ``--limit`` for each MMLU subtask. ``per_subject``
  holds each subject's accuracy and ``"macro_acc"``, their unweighted mean (``acc`` is
  the micro average).
* ``hellaswag`` (jsonl with ``ctx``, ``endings``, ``label``): lm-eval's preprocessing --
  the query is ``"{activity_label}: {ctx}"`` (``ctx_a + " " + ctx_b.capitalize()`` when
  those fields exist), and query and endings go through ``preprocess`` (strip, ``" [title]"``
  -> ``". "``, drop ``[...]`` tags, ``"  "`` -> ``" "``); continuation ``" " + ending``.
  ``preprocess=False`` scores the raw ``ctx`` and endings instead. Shots (there is no
  train split here) are k other items of the same file drawn with ``seed``, each
  ``query + " " + gold ending``, joined by ``"\\n\\n"``.
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

import csv
import difflib
import json
import math
import random
import re
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
    "hellaswag_query",
    "load_hellaswag",
    "load_mmlu",
    "make_scorer",
    "mmlu_prompt",
    "score_instances",
]

TASKS: tuple[str, ...] = ("mmlu", "hellaswag", "synthetic-mc", "synthetic-completion")
LETTERS = "ABCD"

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


# =========================================================================== loaders

_SPLIT_SUFFIX = re.compile(r"_(dev|val|test|train|auxiliary_train)$")


def _mmlu_files(path: Path, split: str) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"MMLU data {path} does not exist; give the mmlu folder or a csv file.")
    for d in (path / split, path):
        files = sorted(d.glob(f"*_{split}.csv"))
        if files:
            return files
    raise UserError(
        f"no MMLU files *_{split}.csv in {path} or {path / split}; check the folder and the split."
    )


def _mmlu_subject(path: Path) -> str:
    return _SPLIT_SUFFIX.sub("", path.stem)


def _read_mmlu_csv(path: Path, subject: str) -> list[dict]:
    items: list[dict] = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            line = 1
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    raise UserError(f"{path} line {line}: not valid csv ({e}); fix that row.") from e
                start, line = line, reader.line_num + 1
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # a blank line
                if len(row) != 6:
                    raise UserError(
                        f"{path} line {start}: expected 6 columns (question, A, B, C, D, "
                        f"answer letter) but found {len(row)}; fix that row."
                    )
                answer = row[5].strip().upper()
                if len(answer) != 1 or answer not in LETTERS:
                    raise UserError(
                        f"{path} line {start}: the answer must be one of A, B, C, D but is "
                        f"{row[5]!r}; fix that row."
                    )
                items.append(
                    {
                        "question": row[0],
                        "options": list(row[1:5]),
                        "answer": LETTERS.index(answer),
                        "subject": subject,
                    }
                )
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e}); re-save it as UTF-8.") from e
    except OSError as e:
        raise UserError(f"cannot read {path} ({e}).") from e
    if not items:
        raise UserError(f"{path} holds no MMLU rows; delete it or fill it in.")
    return items


def load_mmlu(
    path_or_dir: str | Path, split: str = "val", subjects: Sequence[str] | None = None
) -> dict[str, list[dict]]:
    """MMLU items by subject, from a csv file, a folder of ``<subject>_<split>.csv`` or
    the mmlu folder holding ``<split>/``. Items: ``{"question", "options" (4), "answer"
    (0-3), "subject"}``. ``subjects`` keeps only those (an unknown one is an error)."""
    files = _mmlu_files(Path(path_or_dir), split)
    by_subject = {_mmlu_subject(p): p for p in files}
    if subjects is not None:
        missing = [s for s in subjects if s not in by_subject]
        if missing:
            close = difflib.get_close_matches(missing[0], list(by_subject), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else (
                f"known subjects: {', '.join(sorted(by_subject))}"
            )
            raise UserError(f"no MMLU subject {missing[0]!r} in {path_or_dir} ({split}); {hint}")
        by_subject = {s: by_subject[s] for s in subjects}
    return {s: _read_mmlu_csv(p, s) for s, p in by_subject.items()}


def _hellaswag_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for name in ("hellaswag_val.jsonl", "val_head500.jsonl"):
            if (path / name).is_file():
                return path / name
        files = sorted(path.glob("*.jsonl"))
        if len(files) == 1:
            return files[0]
    raise UserError(f"no HellaSwag jsonl file at {path}; give the path of the .jsonl file.")


def _label(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def load_hellaswag(path: str | Path) -> list[dict]:
    """HellaSwag items ``{"ctx", "endings", "label", "activity_label"}`` (plus ``ctx_a``,
    ``ctx_b``, ``ind`` when the file has them) from a jsonl file (or its folder)."""
    path = _hellaswag_file(Path(path))
    items: list[dict] = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise UserError(f"{path} line {n}: not valid JSON ({e}); fix that line.") from e
                if not isinstance(rec, dict):
                    raise UserError(f"{path} line {n}: expected a JSON object; fix that line.")
                for key in ("ctx", "endings", "label"):
                    if key not in rec:
                        raise UserError(f"{path} line {n}: missing key {key!r}; fix that line.")
                endings = rec["endings"]
                if (
                    not isinstance(endings, list)
                    or len(endings) < 2
                    or not all(isinstance(e, str) for e in endings)
                ):
                    raise UserError(
                        f"{path} line {n}: 'endings' must be a list of at least 2 strings; "
                        "fix that line."
                    )
                if not isinstance(rec["ctx"], str):
                    raise UserError(f"{path} line {n}: 'ctx' must be a string; fix that line.")
                label = _label(rec["label"])
                if label is None or not 0 <= label < len(endings):
                    raise UserError(
                        f"{path} line {n}: 'label' must be an integer from 0 to "
                        f"{len(endings) - 1} but is {rec['label']!r}; fix that line."
                    )
                item = {
                    "ctx": rec["ctx"],
                    "endings": list(endings),
                    "label": label,
                    "activity_label": str(rec.get("activity_label") or ""),
                }
                for key in ("ctx_a", "ctx_b", "ind"):
                    if key in rec:
                        item[key] = rec[key]
                items.append(item)
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e}); re-save it as UTF-8.") from e
    except OSError as e:
        raise UserError(f"cannot read {path} ({e}).") from e
    if not items:
        raise UserError(f"{path} holds no HellaSwag items.")
    return items


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


def _mmlu_question(item: dict) -> str:
    lines = [item["question"].strip()]
    lines += [f"{letter}. {opt}" for letter, opt in zip(LETTERS, item["options"])]
    return "\n".join(lines) + "\nAnswer:"


def _mmlu_header(item: dict) -> str:
    subject = item["subject"].replace("_", " ")
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


def _mmlu_shot(shot: dict) -> str:
    return f"{_mmlu_question(shot)} {LETTERS[shot['answer']]}\n\n"


def mmlu_prompt(item: dict, shots: Sequence[dict] = ()) -> str:
    """lm-eval's MMLU context for ``item`` after the few-shot ``shots`` (dev items)."""
    return _mmlu_header(item) + "".join(_mmlu_shot(s) for s in shots) + _mmlu_question(item)


def _hs_clean(text: str) -> str:
    """lm-eval's HellaSwag ``preprocess``."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_query(item: dict, preprocess: bool = True) -> tuple[str, list[str]]:
    """``(query, endings)`` of a HellaSwag item as lm-eval's ``hellaswag`` task builds them
    (``preprocess=False``: the raw ``ctx`` and endings)."""
    if not preprocess:
        return item["ctx"], list(item["endings"])
    if isinstance(item.get("ctx_a"), str) and isinstance(item.get("ctx_b"), str):
        ctx = item["ctx_a"] + " " + item["ctx_b"].capitalize()
    else:
        ctx = item["ctx"]
    label = item.get("activity_label") or ""
    query = _hs_clean(f"{label}: {ctx}" if label else ctx)
    return query, [_hs_clean(e) for e in item["endings"]]


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


def _mmlu_dev(path: Path, subject: str) -> list[dict]:
    root = path if path.is_dir() else path.parent
    for d in (root / "dev", root.parent / "dev", root):
        f = d / f"{subject}_dev.csv"
        if f.is_file():
            return _read_mmlu_csv(f, subject)
    raise UserError(
        f"few-shot MMLU needs the dev split, but there is no {subject}_dev.csv near {path}; "
        "add the dev folder or use 0 shots."
    )


def _locate(name: str, data_path: Any, data_dir: Any) -> Path:
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
    out: list[MCInstance] = []
    if task == "mmlu":
        path = _locate("mmlu", data_path, data_dir)
        by_subject = {
            s: items[:limit_per_subject] for s, items in load_mmlu(path, split, subjects).items()
        }
        if limit is not None:  # round-robin: the first items of every subject
            order = [
                (s, j)
                for j in range(max((len(v) for v in by_subject.values()), default=0))
                for s in by_subject
                if j < len(by_subject[s])
            ][:limit]
            keep = {s: sorted(j for t, j in order if t == s) for s in by_subject}
            by_subject = {s: [by_subject[s][j] for j in keep[s]] for s in by_subject if keep[s]}
        for subject, items in by_subject.items():
            dev = _mmlu_dev(path, subject) if shots else []
            if shots > len(dev):
                raise UserError(
                    f"MMLU subject {subject} has only {len(dev)} dev examples for few-shot; "
                    f"use {len(dev)} shots or fewer."
                )
            for item in items:
                shot_texts = [_mmlu_shot(d) for d in dev[:shots]]
                out.append(
                    MCInstance(
                        context=mmlu_prompt(item, dev[:shots]),
                        continuations=[f" {letter}" for letter in LETTERS[: len(item["options"])]],
                        gold=item["answer"],
                        subject=subject,
                        record={"subject": subject, "question": item["question"]},
                        header=_mmlu_header(item),
                        shots=shot_texts,
                        query=_mmlu_question(item),
                    )
                )
        return out

    if task == "hellaswag":
        items = load_hellaswag(_locate("hellaswag", data_path, data_dir))
        queries = [hellaswag_query(it, preprocess) for it in items]
        gold = [it["label"] for it in items]
        subj: list[str | None] = [None] * len(items)
        records = [{"ctx": it["ctx"]} for it in items]
    else:
        from neuroplastic.data.synthetic import SyntheticCurriculum

        cur = SyntheticCurriculum(seed=seed)
        if task == "synthetic-mc":
            items = cur.multiple_choice()
            queries = [(f"Question: {it['question']}\nAnswer:", it["options"]) for it in items]
            gold = [it["answer"] for it in items]
            subj = [it["subject"] for it in items]
            records = [{"subject": it["subject"], "question": it["question"]} for it in items]
        else:
            items = cur.completions()
            queries = [(it["ctx"], it["endings"]) for it in items]
            gold = [it["label"] for it in items]
            subj = [it["domain"] for it in items]
            records = [{"domain": it["domain"], "ctx": it["ctx"]} for it in items]
    n = len(items) if limit is None else min(limit, len(items))
    for i in range(n):
        query, endings = queries[i]
        shot_texts = [
            f"{queries[j][0]} {queries[j][1][gold[j]]}\n\n"
            for j in _sample_shots(len(items), i, shots, seed)
        ]
        out.append(
            MCInstance(
                context="".join(shot_texts) + query,
                continuations=[" " + e for e in endings],
                gold=gold[i],
                subject=subj[i],
                record=records[i],
                shots=shot_texts,
                query=query,
            )
        )
    return out


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
