"""Chain-of-thought data: question/answer examples, prompts, answer-only labels, batches.

An example is a GSM8K-style record: a ``question`` and an ``answer`` that holds the
reasoning, one step per line, and ends with ``#### <number>``. Sources
(:func:`load_cot_examples`):

* a registry name whose format is question/answer (``gsm8k``: ``../shared/data/gsm8k``,
  else downloaded once, see :mod:`neuroplastic.data.registry`);
* a ``.jsonl`` file with ``question`` and ``answer`` fields (other field names with
  ``question_field`` / ``answer_field``);
* ``arith`` / ``arith-mul``: generated word problems in the same format (addition and
  subtraction chains / multiplication and division), 1 to 4 steps each, from a seed --
  task B of the continual setting, and data for tests that need no files.

Formatting (:class:`CotFormatter`): when the tokenizer has a chat template, the
question (plus an instruction) is the user turn and the reference solution the
assistant turn, both through ``apply_chat_template``; otherwise the plain prompt
``"Question: ...\\nAnswer:"`` followed by `` <solution><eos>``. The prompt and the
answer are tokenized separately and concatenated, and the labels of the prompt tokens
are ``-100``: the loss is on the answer only.

Complexity (:func:`complexity`) of a reference solution, for the adaptive learning rate:
``steps`` (reasoning lines before ``####``), ``operations`` (arithmetic operators in the
``<<...>>`` calculator annotations, or in the text when there are none), ``numbers``
(numbers in the solution), ``tokens`` (answer tokens, the seed system's
``token_length``). A batch's complexity is the mean over its examples.

:class:`CotBatches` serves shuffled, right-padded batches of one task at a time (the
current task can be switched, e.g. task A then task B), resumable from
``state_dict()``: each task's order is a pure function of ``(seed, task, epoch)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal, Inexact, InvalidOperation, localcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuroplastic.data.sources import iter_jsonl
from neuroplastic.data.tokenizers import as_tokenizer
from neuroplastic.errors import UserError

__all__ = [
    "COMPLEXITY_MEASURES",
    "SYNTHETIC_TASKS",
    "CotBatches",
    "CotExample",
    "CotFormatter",
    "EncodedExample",
    "answers_match",
    "collate",
    "complexity",
    "encode_examples",
    "eval_batches",
    "extract_prediction",
    "final_answer",
    "load_cot_examples",
    "normalize_number",
    "split_examples",
    "synthetic_arithmetic",
]

COMPLEXITY_MEASURES = ("steps", "operations", "numbers", "tokens", "loss")
SYNTHETIC_TASKS = ("arith", "arith-mul")
DEFAULT_INSTRUCTION = "Solve the problem step by step, then give the final answer after '####'."

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_FINAL = re.compile(r"####\s*(" + _NUMBER.pattern + ")")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*(" + _NUMBER.pattern + ")", re.IGNORECASE)
_CALC = re.compile(r"<<([^<>]*)>>")
_OPERATOR = re.compile(r"(?<=[\d)\s])\s*[-+*/×÷x]\s*(?=[\d($])")


# =========================================================================== examples


@dataclass(frozen=True)
class CotExample:
    """One question with its reference solution; ``final`` is the number after ``####``."""

    question: str
    answer: str
    final: str | None
    task: str = ""


#: digits a normalized number may have; longer ones (a model that rambles digits) are
#: unparseable, so scored as wrong -- never an error
MAX_DIGITS = 1000


def normalize_number(text: str | None) -> str | None:
    """A canonical decimal string for a number as written (``"$1,200.50"`` -> ``"1200.5"``);
    ``None`` when it is not a finite number of at most :data:`MAX_DIGITS` digits (any
    text is accepted: ``"1e30"`` -> ``"1000...0"``, 29+ digit numbers are exact)."""
    if text is None:
        return None
    s = str(text).strip().replace(",", "").replace("$", "").rstrip(".")
    if not s or len(s) > 4 * MAX_DIGITS:
        return None
    with localcontext() as ctx:
        ctx.prec = MAX_DIGITS + 10  # exact for every number we accept (the default is 28)
        ctx.traps[Inexact] = False
        try:
            value = Decimal(s)
            if not value.is_finite():
                return None
            value = value.normalize()
            digits = len(value.as_tuple().digits)
            if value.adjusted() >= MAX_DIGITS or digits - value.as_tuple().exponent > 2 * MAX_DIGITS:
                return None
            if value == value.to_integral_value():
                return str(value.quantize(Decimal(1)))
            return format(value, "f")
        except (InvalidOperation, ArithmeticError, ValueError):
            return None


def final_answer(answer: str) -> str | None:
    """The number after ``####`` in a reference solution (normalized), or ``None``."""
    m = _FINAL.search(answer)
    return normalize_number(m.group(1)) if m else None


def extract_prediction(text: str) -> str | None:
    """The final number of a generated solution: after ``####``, else after "answer
    is"/"answer:", else the last number in the text (normalized; ``None`` if none)."""
    for rx in (_FINAL, _ANSWER_IS):
        m = rx.search(text)
        if m:
            return normalize_number(m.group(1))
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def answers_match(predicted: str | None, gold: str | None) -> bool:
    """Exact match of two normalized numbers (``"72"`` == ``"72.0"``)."""
    if predicted is None or gold is None:
        return False
    try:
        return Decimal(predicted) == Decimal(gold)
    except (InvalidOperation, ArithmeticError, ValueError):
        return predicted == gold


def _reasoning(answer: str) -> str:
    return answer.split("####", 1)[0]


def complexity(answer: str, measure: str, answer_tokens: int | None = None) -> float:
    """The reasoning complexity of a reference solution (see the module docs)."""
    body = _reasoning(answer)
    if measure == "steps":
        return float(max(1, sum(1 for line in body.splitlines() if line.strip())))
    if measure == "operations":
        calcs = _CALC.findall(body)
        text = " ".join(c.split("=", 1)[0] for c in calcs) if calcs else _CALC.sub("", body)
        return float(max(1, len(_OPERATOR.findall(text))))
    if measure == "numbers":
        return float(max(1, len(_NUMBER.findall(_CALC.sub("", body)))))
    if measure == "tokens":
        if answer_tokens is None:
            raise ValueError("the 'tokens' complexity needs the answer's token count")
        return float(max(1, answer_tokens))
    if measure == "loss":
        return float("nan")  # the trainer's batch loss, not a property of the example
    raise UserError(
        f"Unknown complexity measure {measure!r}; use one of {', '.join(COMPLEXITY_MEASURES)}."
    )


# =========================================================================== sources

_NAMES = ["Ava", "Ben", "Chloe", "Dan", "Ema", "Finn", "Gia", "Hugo", "Ivy", "Jon", "Kai", "Lea"]
_ITEMS = ["apples", "marbles", "stickers", "books", "coins", "shells", "pencils", "cards"]


def _add_sub_problem(rng: np.random.Generator) -> tuple[str, str]:
    name, item = str(rng.choice(_NAMES)), str(rng.choice(_ITEMS))
    total = int(rng.integers(5, 60))
    steps = int(rng.integers(1, 5))
    q = [f"{name} has {total} {item}."]
    lines = []
    for _ in range(steps):
        amount = int(rng.integers(1, 30))
        if rng.random() < 0.5 or total - amount < 0:
            q.append(f"Then {name} gets {amount} more.")
            new = total + amount
            lines.append(f"After getting {amount} more, {name} has {total} + {amount} = "
                         f"<<{total}+{amount}={new}>>{new} {item}.")
        else:
            q.append(f"Then {name} gives away {amount}.")
            new = total - amount
            lines.append(f"After giving away {amount}, {name} has {total} - {amount} = "
                         f"<<{total}-{amount}={new}>>{new} {item}.")
        total = new
    q.append(f"How many {item} does {name} have now?")
    return " ".join(q), "\n".join(lines) + f"\n#### {total}"


def _mul_div_problem(rng: np.random.Generator) -> tuple[str, str]:
    name, item = str(rng.choice(_NAMES)), str(rng.choice(_ITEMS))
    boxes, per = int(rng.integers(2, 10)), int(rng.integers(2, 12))
    total = boxes * per
    q = [f"{name} has {boxes} boxes with {per} {item} in each box."]
    lines = [f"{name} has {boxes} * {per} = <<{boxes}*{per}={total}>>{total} {item}."]
    shared = False
    for _ in range(int(rng.integers(0, 3))):
        if shared or rng.random() < 0.5:
            k = int(rng.integers(2, 4))
            q.append(f"Then the number of {item} is multiplied by {k}.")
            lines.append(f"Multiplied by {k}: {total} * {k} = <<{total}*{k}={total * k}>>{total * k}.")
            total *= k
        else:
            divisors = [d for d in (2, 3, 4, 5) if total % d == 0]
            if not divisors:
                continue
            d = int(rng.choice(divisors))
            q.append(f"Then {name} shares them equally among {d} friends.")
            lines.append(f"Each friend gets {total} / {d} = <<{total}/{d}={total // d}>>{total // d}.")
            total //= d
            shared = True
    q.append(f"How many {item} {'does each friend get' if shared else 'are there'}?")
    return " ".join(q), "\n".join(lines) + f"\n#### {total}"


def synthetic_arithmetic(n: int, seed: int = 0, family: str = "arith") -> list[CotExample]:
    """``n`` generated word problems in GSM8K format (``arith``: +/- chains of 1-4 steps;
    ``arith-mul``: a product then up to two more * or / steps)."""
    if family not in SYNTHETIC_TASKS:
        raise UserError(f"Unknown synthetic task {family!r}; use one of {', '.join(SYNTHETIC_TASKS)}.")
    rng = np.random.default_rng([seed, SYNTHETIC_TASKS.index(family), 7])
    make = _add_sub_problem if family == "arith" else _mul_div_problem
    out = []
    for _ in range(n):
        q, a = make(rng)
        out.append(CotExample(q, a, final_answer(a), family))
    return out


def _read_jsonl(path: Path, question_field: str, answer_field: str, task: str) -> list[CotExample]:
    out = []
    lines = iter_jsonl(path, fix=f"each line must be an object with {question_field!r} and {answer_field!r}")
    for n, record in lines:
        q, a = record.get(question_field), record.get(answer_field)
        if not isinstance(q, str) or not isinstance(a, str) or not q.strip() or not a.strip():
            raise UserError(
                f"{str(path)!r} line {n} has no text fields {question_field!r} and "
                f"{answer_field!r}; chain-of-thought data needs both (as GSM8K)."
            )
        out.append(CotExample(q.strip(), a.strip(), final_answer(a), task))
    return out


def load_cot_examples(
    spec: str,
    data_dir: str | None = None,
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    synthetic_size: int = 2000,
    seed: int = 0,
) -> list[CotExample]:
    """Question/answer examples from a registry name, a ``.jsonl`` file or a synthetic task."""
    spec = str(spec).strip()
    if not spec:
        raise UserError("The chain-of-thought data source is empty; give gsm8k, a .jsonl file or arith.")
    if spec in SYNTHETIC_TASKS:
        return synthetic_arithmetic(synthetic_size, seed=seed, family=spec)
    path = Path(spec).expanduser()
    if path.is_file():
        examples = _read_jsonl(path, question_field, answer_field, path.stem)
    elif path.exists():
        raise UserError(f"{spec!r} is a directory; give a .jsonl file with question and answer fields.")
    else:
        from neuroplastic.data import registry

        try:
            entry = registry.get_entry(spec)
        except UserError:
            raise UserError(
                f"Chain-of-thought data {spec!r} is neither a file, a synthetic task "
                f"({', '.join(SYNTHETIC_TASKS)}) nor a registry name such as gsm8k."
            ) from None
        if entry.format != "gsm8k":
            raise UserError(
                f"Registry corpus {spec!r} is not question/answer data; use gsm8k, a .jsonl "
                "file with question and answer fields, or arith."
            )
        examples = _read_jsonl(registry.resolve(spec, data_dir), "question", "answer", spec)
    if not examples:
        raise UserError(f"Chain-of-thought data {spec!r} holds no examples.")
    return examples


def split_examples(
    examples: Sequence[CotExample], val_fraction: float = 0.05, seed: int = 0, max_val: int = 0
) -> tuple[list[CotExample], list[CotExample]]:
    """(train, held-out) by a seeded permutation: the held-out part is the same for every
    run with the same ``seed`` (GSM8K has only its train split locally).

    The held-out examples are the first ``n_val = min(max_val, round(n * val_fraction))``
    indices of ``numpy.random.default_rng([seed, 1234]).permutation(n)`` (kept in file
    order); training gets every other example whose question is not held out. For the
    shared GSM8K file (7,473 problems) and the recipe's defaults (``val_fraction`` 0.05,
    ``max_val`` 200, ``seed`` 0) that is 200 held-out problems and 7,273 training ones;
    a larger ``max_val`` extends the held-out set (the old one is a subset of it)."""
    if not 0 < val_fraction < 1:
        raise UserError(f"The held-out fraction must be in (0, 1), got {val_fraction}.")
    n = len(examples)
    if n < 2:
        raise UserError("Chain-of-thought data needs at least 2 examples (one to hold out).")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    if max_val > 0:
        n_val = min(n_val, max_val)
    order = np.random.default_rng([seed, 1234]).permutation(n)
    val = [examples[int(i)] for i in sorted(order[:n_val])]
    held = {e.question for e in val}  # a question repeated in the file is never on both sides
    train = [examples[int(i)] for i in sorted(order[n_val:]) if examples[int(i)].question not in held]
    return train, val


# =========================================================================== formatting


@dataclass
class EncodedExample:
    """Token ids of prompt + answer; labels are ``-100`` on the first ``n_prompt``."""

    ids: list[int]
    n_prompt: int
    complexity: float
    index: int = 0

    @property
    def labels(self) -> list[int]:
        return [-100] * self.n_prompt + self.ids[self.n_prompt :]


class CotFormatter:
    """Turns examples into prompts and ``prompt + answer`` token ids (see module docs).

    ``chat``: ``"auto"`` (the chat template when the tokenizer has one), ``True``
    (required) or ``False`` (always the plain format). ``codec`` is the tokenizer behind
    our interface (:func:`~neuroplastic.data.tokenizers.as_tokenizer`).
    """

    def __init__(
        self,
        tokenizer: Any,
        instruction: str = DEFAULT_INSTRUCTION,
        system: str | None = None,
        chat: bool | str = "auto",
    ):
        self.tokenizer = tokenizer
        self.instruction = instruction
        self.system = system
        has_template = bool(getattr(tokenizer, "chat_template", None)) and hasattr(
            tokenizer, "apply_chat_template"
        )
        if chat is True and not has_template:
            raise UserError("The tokenizer has no chat template; use the plain prompt format (chat: false).")
        self.chat = has_template if chat == "auto" else bool(chat)
        self.codec = as_tokenizer(tokenizer)
        self.eos_id = self.codec.eos_id

    def _messages(self, question: str) -> list[dict[str, str]]:
        user = f"{question}\n{self.instruction}" if self.instruction else question
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return [*msgs, {"role": "user", "content": user}]

    def prompt(self, question: str) -> str:
        """The text the model continues with its reasoning."""
        if self.chat:
            return self.tokenizer.apply_chat_template(
                self._messages(question), tokenize=False, add_generation_prompt=True
            )
        head = f"{self.instruction}\n" if self.instruction else ""
        return f"{head}Question: {question}\nAnswer:"

    def answer_text(self, question: str, answer: str) -> str:
        """The text after the prompt that the model learns to produce."""
        if self.chat:
            prompt = self.prompt(question)
            full = self.tokenizer.apply_chat_template(
                [*self._messages(question), {"role": "assistant", "content": answer}],
                tokenize=False,
            )
            if full.startswith(prompt):
                return full[len(prompt):]
            return answer  # a template that rewrites earlier turns: fall back to the answer
        return " " + answer

    @property
    def stop_strings(self) -> list[str]:
        """Strings after which a generated answer is complete (plain format only)."""
        return [] if self.chat else ["\nQuestion:", "\n\n\n"]

    def encode(self, example: CotExample, max_len: int, measure: str = "steps", index: int = 0) -> EncodedExample | None:
        """Prompt + answer ids (ending in eos), cut to ``max_len``; ``None`` if no answer
        token fits."""
        p_ids = self.codec.encode(self.prompt(example.question))
        a_ids = self.codec.encode(self.answer_text(example.question, example.answer))
        if self.eos_id is not None and (not a_ids or a_ids[-1] != self.eos_id):
            if not self.chat or self.eos_id not in a_ids:
                a_ids.append(self.eos_id)
        value = complexity(example.answer, measure, len(a_ids))
        if len(p_ids) >= max_len:  # keep the end of an overlong prompt and one answer token
            p_ids = p_ids[-(max_len - 1):]
        ids = (p_ids + a_ids)[:max_len]
        if len(ids) <= len(p_ids) or len(ids) < 2:
            return None
        return EncodedExample(ids, len(p_ids), value, index)


def encode_examples(
    formatter: CotFormatter, examples: Sequence[CotExample], max_len: int, measure: str = "steps"
) -> list[EncodedExample]:
    out = []
    for i, ex in enumerate(examples):
        enc = formatter.encode(ex, max_len, measure, index=i)
        if enc is not None:
            out.append(enc)
    return out


# =========================================================================== batches


def collate(batch: Sequence[EncodedExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(inputs, targets)``; targets are the next tokens with ``-100`` on
    prompt and padding positions (causal attention: pads after a row never reach it)."""
    width = max(len(e.ids) for e in batch) - 1
    x = torch.full((len(batch), width), pad_id, dtype=torch.long)
    y = torch.full((len(batch), width), -100, dtype=torch.long)
    for r, e in enumerate(batch):
        ids = torch.tensor(e.ids, dtype=torch.long)
        labels = torch.tensor(e.labels, dtype=torch.long)
        x[r, : len(ids) - 1] = ids[:-1]
        y[r, : len(ids) - 1] = labels[1:]
    return x, y


def eval_batches(
    examples: Sequence[EncodedExample], batch_size: int, pad_id: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed batches in order (for validation losses)."""
    return [collate(examples[i : i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]


@dataclass
class _TaskPosition:
    epoch: int = 0
    position: int = 0


@dataclass
class CotBatches:
    """Shuffled batches of the current task; resumable (see module docs).

    ``next_batch()`` returns ``(inputs, targets)`` and records the batch's mean
    complexity; :meth:`step_complexity` is the mean over the batches served since the
    last :meth:`end_step` (one optimizer step may draw several micro-batches).
    """

    tasks: dict[str, list[EncodedExample]]
    batch_size: int
    pad_id: int
    seed: int = 0
    task: str = ""
    positions: dict[str, _TaskPosition] = field(default_factory=dict)
    _values: list[float] = field(default_factory=list)

    def __post_init__(self):
        if not self.tasks:
            raise UserError("No chain-of-thought tasks to train on.")
        for name, examples in self.tasks.items():
            if not examples:
                raise UserError(
                    f"Task {name!r} has no example that fits the context; raise model.block_size."
                )
        self.task = self.task or next(iter(self.tasks))
        for name in self.tasks:
            self.positions.setdefault(name, _TaskPosition())

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def set_task(self, name: str) -> None:
        if name not in self.tasks:
            raise UserError(f"Unknown task {name!r}; tasks are {', '.join(self.tasks)}.")
        self.task = name

    def _order(self, name: str, epoch: int) -> np.ndarray:
        idx = self.task_names.index(name)
        return np.random.default_rng([self.seed, idx, epoch]).permutation(len(self.tasks[name]))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        examples = self.tasks[self.task]
        pos = self.positions[self.task]
        picked: list[EncodedExample] = []
        while len(picked) < min(self.batch_size, len(examples)):
            order = self._order(self.task, pos.epoch)
            take = min(self.batch_size - len(picked), len(examples) - pos.position)
            picked.extend(examples[int(i)] for i in order[pos.position : pos.position + take])
            pos.position += take
            if pos.position >= len(examples):
                pos.epoch += 1
                pos.position = 0
        values = [e.complexity for e in picked]
        self._values.append(float(np.mean(values)))
        return collate(picked, self.pad_id)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def step_complexity(self) -> float:
        """Mean complexity of the batches served in this step (nan if none / measure loss)."""
        return float(np.mean(self._values)) if self._values else math.nan

    def end_step(self) -> None:
        self._values.clear()

    def state_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "seed": self.seed,
            "positions": {k: [p.epoch, p.position] for k, p in self.positions.items()},
            "sizes": {k: len(v) for k, v in self.tasks.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sizes = {k: int(v) for k, v in (state.get("sizes") or {}).items()}
        now = {k: len(v) for k, v in self.tasks.items()}
        if sizes != now:
            raise UserError(
                "The checkpoint's chain-of-thought data differs from this run's (task sizes "
                f"{sizes} vs {now}); resume with the same data and options."
            )
        self.seed = int(state.get("seed", self.seed))
        self.task = str(state["task"])
        for k, (epoch, position) in (state.get("positions") or {}).items():
            self.positions[k] = _TaskPosition(int(epoch), int(position))
        self._values.clear()
