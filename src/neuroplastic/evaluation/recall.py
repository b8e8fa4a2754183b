"""Recall evaluation: needle-in-a-haystack grid (with a heatmap) and multi-query associative
recall (MQAR). The examples come from :mod:`neuroplastic.data.recall_tasks`.

Any model with our API works: ``model(idx) -> (logits, loss)`` and
``model.generate(idx, max_new_tokens, temperature=0.0, eos_id=...)`` (our GPT, the Hebbian
LM). Answers are the model's greedy continuation of the prompt, ``len(answer tokens) + 1``
tokens long (the extra token shows whether the answer stopped where it should):

* needle: the digits at the start of the continuation (after spaces) must equal the key
  exactly (``" 48215"`` does not match ``4821``; ``" 4821."`` does);
* MQAR: the first whitespace-separated word of the continuation must equal the value. Each
  query is asked on its own: the prompt holds the context and the earlier queries with
  their *right* answers (teacher forcing), then ``" key?"``.

Context window. A model that sets ``supports_long_context = True`` (the Hebbian LM, whose
``generate`` carries a recurrent state) gets the whole prompt. Any other model cannot see
beyond its ``context_length``, so a longer prompt is cut from the left to
``context_length - (max_new_tokens - 1)`` tokens -- the prompt and the answer then
fit the window, which is what the GPT's ``generate`` would crop to anyway. Such examples
are recorded as ``truncated``, with ``needle_visible`` telling whether the needle sentence
survived the cut; a GPT honestly fails when the needle falls out of its context.

Prompts with the same token length are generated together in batches of ``batch_size``
rows (no padding is ever needed). A tqdm bar over examples shows progress when there are
at least 8 (``progress=True/False`` forces it).
"""

from __future__ import annotations

import math
import random
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from neuroplastic.data.recall_tasks import (
    NEEDLE_QUERY,
    Filler,
    mqar_example,
    mqar_text,
    needle_example,
    needle_sentence,
)
from neuroplastic.errors import UserError
from neuroplastic.models.api import CausalLM
from neuroplastic.runtime import model_device

__all__ = [
    "evaluate_mqar",
    "needle_grid",
    "parse_depths",
    "parse_key",
    "parse_lengths",
    "parse_word",
    "plot_needle_heatmap",
]

_PROGRESS_MIN = 8
_DIGITS = re.compile(r"\s*(\d+)")


# =========================================================================== parsing


def parse_key(continuation: str) -> str:
    """The digits at the start of ``continuation`` (after whitespace), or ``""``."""
    m = _DIGITS.match(continuation)
    return m.group(1) if m else ""


def parse_word(continuation: str) -> str:
    """The first whitespace-separated word of ``continuation``, or ``""``."""
    words = continuation.split()
    return words[0] if words else ""


# =========================================================================== generation


def _check_model(model: Any, tokenizer: Any) -> None:
    if not isinstance(model, CausalLM):
        raise UserError(
            f"{type(model).__name__} is not one of our causal LMs; recall evaluation needs a "
            "model with our generate(idx, max_new_tokens, temperature, eos_id) API."
        )
    for name in ("encode", "decode"):
        if not callable(getattr(tokenizer, name, None)):
            raise UserError(
                f"the tokenizer {type(tokenizer).__name__} has no {name}(); give one of "
                "neuroplastic's tokenizers."
            )


class _Request:
    """One prompt to continue: its ids (already cut to the window) and what to record."""

    __slots__ = ("ids", "max_new", "record", "expected", "parse")

    def __init__(self, ids: list[int], max_new: int, record: dict, expected: str, parse):
        self.ids = ids
        self.max_new = max_new
        self.record = record
        self.expected = expected
        self.parse = parse


def _prepare(
    tokenizer: Any,
    window: int | None,
    prompt: str,
    answer: str,
    parse,
    expected: str,
    record: dict,
    must_see: str | None = None,
) -> _Request:
    ids = list(tokenizer.encode(prompt))
    if not ids:
        raise UserError("a recall prompt encoded to no tokens; check the tokenizer.")
    max_new = len(tokenizer.encode(answer)) + 1
    record.update(prompt_bytes=len(prompt.encode("utf-8")), prompt_tokens=len(ids))
    truncated = False
    if window is not None:
        keep = window - (max_new - 1)
        if keep < 1:
            raise UserError(
                f"the model's block_size ({window}) leaves no room for a prompt before the "
                f"{max_new - 1}-token answer; use a model with a larger block_size."
            )
        if len(ids) > keep:
            ids = ids[-keep:]
            truncated = True
    record.update(fed_tokens=len(ids), truncated=truncated)
    if must_see is not None:
        record["needle_visible"] = (not truncated) or must_see in tokenizer.decode(ids)
    return _Request(ids, max_new, record, expected, parse)


@torch.no_grad()
def _run(
    model: Any,
    tokenizer: Any,
    requests: list[_Request],
    device: torch.device,
    batch_size: int,
    progress: bool | None,
    desc: str,
) -> None:
    """Greedy-continue every request; fill ``prediction``, ``continuation``, ``correct``."""
    groups: dict[tuple[int, int], list[_Request]] = {}
    for r in requests:
        groups.setdefault((len(r.ids), r.max_new), []).append(r)
    show = progress if progress is not None else len(requests) >= _PROGRESS_MIN
    bar = None
    if show and requests:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(requests), desc=desc, unit="ex", file=sys.stderr, dynamic_ncols=True,
            leave=False, mininterval=0.1 if sys.stderr.isatty() else 15.0,
        )
    eos = getattr(tokenizer, "eos_id", None)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        for (length, max_new), rows in groups.items():
            for s in range(0, len(rows), batch_size):
                batch = rows[s : s + batch_size]
                idx = torch.tensor([r.ids for r in batch], dtype=torch.long, device=device)
                out = model.generate(idx, max_new, temperature=0.0, eos_id=eos)
                new = out[:, length:].tolist()
                for r, ids in zip(batch, new):
                    if eos is not None and eos in ids:
                        ids = ids[: ids.index(eos)]
                    text = tokenizer.decode(ids)
                    pred = r.parse(text)
                    r.record.update(continuation=text, prediction=pred, correct=pred == r.expected)
                if bar is not None:
                    bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
        if hasattr(model, "train"):
            model.train(was_training)


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


# =========================================================================== needle


def needle_grid(
    model: Any,
    tokenizer: Any,
    lengths: Sequence[int] = (512, 1024, 2048, 4096),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    trials: int = 5,
    seed: int = 0,
    device: str | torch.device | None = None,
    filler: Filler = None,
    batch_size: int = 16,
    progress: bool | None = None,
) -> dict:
    """Needle-in-a-haystack accuracy over a grid of context lengths (bytes of prompt +
    answer, see :func:`~neuroplastic.data.recall_tasks.needle_example`) and depths.

    ``trials`` examples per cell, each with its own key and haystack, drawn from ``seed``
    (the same for every model). ``device``: where to run (the model is moved there); None
    means the model's own device. Returns a JSON-ready dict::

        {"task": "needle", "accuracy": overall, "lengths": [...], "depths": [...],
         "trials": n, "grid": [[acc per depth] per length],
         "truncated": [[any example cut, per depth] per length],
         "cells": [{"length", "depth", "accuracy", "correct", "trials", "truncated",
                    "needle_visible"}],
         "records": [{"length", "depth", "trial", "key", "prediction", "continuation",
                      "correct", "needle_depth", "prompt_bytes", "prompt_tokens",
                      "fed_tokens", "truncated", "needle_visible"}],
         "long_context": bool, "window": block_size or None}

    ``needle_depth`` is the needle's actual byte offset over the haystack's length;
    ``needle_visible`` (per cell: the fraction) whether the needle was in what the model saw.
    """
    _check_model(model, tokenizer)
    lengths = [int(_check_count("each needle length", n, 1)) for n in lengths]
    if not lengths:
        raise UserError("needle_grid needs at least one length.")
    depths = list(depths)
    if not depths or any(
        isinstance(d, bool) or not isinstance(d, int | float) or not 0 <= d <= 1 for d in depths
    ):
        raise UserError(f"needle depths must be numbers in [0, 1], got {depths!r}.")
    depths = [float(d) for d in depths]
    _check_count("trials", trials, 1)
    _check_count("batch_size", batch_size, 1)
    dev = model_device(model, device)
    model.to(dev)
    window = None if model.supports_long_context else model.context_length

    requests: list[_Request] = []
    for n in lengths:
        for d in depths:
            for t in range(trials):
                rng = random.Random(f"neuroplastic-needle-eval:{seed}:{n}:{d!r}:{t}")
                prompt, answer = needle_example(n, d, rng=rng, filler=filler)
                key = answer.strip()
                needle = needle_sentence(key)
                haystack = prompt[: len(prompt) - len(NEEDLE_QUERY)].encode("utf-8")
                at = haystack.index(needle.encode("utf-8"))
                record = {
                    "length": n, "depth": d, "trial": t, "key": key,
                    "needle_depth": round(at / max(1, len(haystack)), 4),
                }
                requests.append(
                    _prepare(tokenizer, window, prompt, answer, parse_key, key, record, needle)
                )
    _run(model, tokenizer, requests, dev, batch_size, progress, "needle")

    records = [r.record for r in requests]
    cells: list[dict] = []
    grid: list[list[float]] = []
    trunc: list[list[bool]] = []
    for i, n in enumerate(lengths):
        row, trow = [], []
        for j, d in enumerate(depths):
            start = (i * len(depths) + j) * trials
            recs = records[start : start + trials]
            correct = sum(r["correct"] for r in recs)
            acc = correct / trials
            cut = any(r["truncated"] for r in recs)
            cells.append({
                "length": n, "depth": d, "accuracy": acc, "correct": correct, "trials": trials,
                "truncated": cut,
                "needle_visible": sum(r["needle_visible"] for r in recs) / trials,
            })
            row.append(acc)
            trow.append(cut)
        grid.append(row)
        trunc.append(trow)
    return {
        "task": "needle",
        "accuracy": sum(r["correct"] for r in records) / len(records),
        "lengths": lengths,
        "depths": depths,
        "trials": trials,
        "seed": seed,
        "grid": grid,
        "truncated": trunc,
        "cells": cells,
        "records": records,
        "long_context": model.supports_long_context,
        "window": window,
    }


def plot_needle_heatmap(result: dict, path: str | Path, title: str | None = None) -> Path:
    """Write a PNG heatmap of ``needle_grid``'s ``result``: context length (rows) by needle
    depth (columns), coloured by accuracy (0 red .. 1 green) and annotated with it; cells
    where the prompt was cut to the model's window are marked ``cut``. Returns the path."""
    try:
        grid = [[float(a) for a in row] for row in result["grid"]]
        lengths, depths = list(result["lengths"]), list(result["depths"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(
            f"plot_needle_heatmap needs the dict returned by needle_grid ({e!r} is missing or "
            "malformed)."
        ) from e
    trunc = result.get("truncated") or [[False] * len(depths) for _ in lengths]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(1.2 * len(depths) + 2.5, 0.8 * len(lengths) + 1.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="lower")
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context length (bytes)")
    for i in range(len(lengths)):
        for j in range(len(depths)):
            text = f"{grid[i][j]:.2f}" + ("\ncut" if trunc[i][j] else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color="black")
    acc = result.get("accuracy")
    head = title or "Needle in a haystack"
    if isinstance(acc, int | float) and not math.isnan(acc):
        head += f" (accuracy {acc:.2f})"
    ax.set_title(head)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


# =========================================================================== MQAR


def evaluate_mqar(
    model: Any,
    tokenizer: Any,
    num_examples: int = 100,
    num_pairs: int = 8,
    num_queries: int = 4,
    seed: int = 0,
    device: str | torch.device | None = None,
    key_len: int = 2,
    value_len: int = 2,
    batch_size: int = 32,
    progress: bool | None = None,
) -> dict:
    """Multi-query associative recall accuracy on ``num_examples`` fresh examples (drawn from
    ``seed``, never the training documents' stream). Returns::

        {"task": "mqar", "accuracy": fraction of queries right,
         "example_accuracy": fraction of examples with every query right,
         "per_position": [accuracy of the i-th query], "n": num_examples, "num_pairs",
         "num_queries", "truncated": fraction of prompts cut to the window,
         "records": [{"example", "query", "key", "value", "prediction", "continuation",
                      "correct", "prompt_bytes", "prompt_tokens", "fed_tokens", "truncated"}]}
    """
    _check_model(model, tokenizer)
    _check_count("num_examples", num_examples, 1)
    _check_count("batch_size", batch_size, 1)
    dev = model_device(model, device)
    model.to(dev)
    window = None if model.supports_long_context else model.context_length
    rng = random.Random(f"neuroplastic-mqar-eval:{seed}")
    requests: list[_Request] = []
    for e in range(num_examples):
        context, queries = mqar_example(num_pairs, num_queries, rng, key_len, value_len)
        for q, (key, value) in enumerate(queries):
            record = {"example": e, "query": q, "key": key, "value": value}
            prompt = mqar_text(context, queries, q)
            requests.append(
                _prepare(tokenizer, window, prompt, " " + value, parse_word, value, record)
            )
    _run(model, tokenizer, requests, dev, batch_size, progress, "mqar")

    records = [r.record for r in requests]
    per_example = [
        all(r["correct"] for r in records[e * num_queries : (e + 1) * num_queries])
        for e in range(num_examples)
    ]
    per_position = [
        sum(records[e * num_queries + q]["correct"] for e in range(num_examples)) / num_examples
        for q in range(num_queries)
    ]
    return {
        "task": "mqar",
        "accuracy": sum(r["correct"] for r in records) / len(records),
        "example_accuracy": sum(per_example) / num_examples,
        "per_position": per_position,
        "n": num_examples,
        "num_pairs": num_pairs,
        "num_queries": num_queries,
        "seed": seed,
        "truncated": sum(r["truncated"] for r in records) / len(records),
        "records": records,
        "long_context": model.supports_long_context,
        "window": window,
    }


def parse_lengths(text: str, what: str = "--lengths") -> tuple[int, ...]:
    """Comma-separated positive integers (``"512,1024"``) or a UserError naming ``what``."""
    try:
        values = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise UserError(
            f"{what} must be comma-separated positive integers (bytes), e.g. 512,1024, "
            f"not {text!r}."
        )
    return values


def parse_depths(text: str, what: str = "--depths") -> tuple[float, ...]:
    """Comma-separated numbers in [0, 1] (``"0,0.5,1"``) or a UserError naming ``what``."""
    try:
        values = tuple(float(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or any(not 0 <= v <= 1 for v in values):  # also rejects nan
        raise UserError(
            f"{what} must be comma-separated numbers from 0 to 1, e.g. 0,0.5,1, not {text!r}."
        )
    return values
