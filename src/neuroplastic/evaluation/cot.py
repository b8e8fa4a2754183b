"""Chain-of-thought evaluation and the plots of neuroplastic-cot.

:func:`evaluate_cot` generates a solution for each question (greedy by default) and
scores the exact match of the final number (after ``####``, else after "answer is",
else the last number of the generation; see :func:`neuroplastic.data.cot.extract_prediction`)
against the number after ``####`` in the reference. The result holds the accuracy and
one record per example (question, reference, generated text, predicted and gold
numbers, correct).

Plots (PNG, matplotlib Agg), each from the ``metrics.jsonl`` of runs trained by the
``cot`` recipe module (:mod:`neuroplastic.recipes.cot`):

* :func:`plot_loss_per_technique` -- training loss per step of several runs (one line
  per technique), smoothed;
* :func:`plot_lr_vs_complexity` -- the lr multiplier of each step against the step's
  reasoning complexity under ALR;
* :func:`plot_fisher_per_layer` -- the mean diagonal Fisher of the EWC rule per layer;
* :func:`plot_hebbian_norms` -- the Frobenius norm of the Hebbian update per step;
* :func:`plot_forgetting` -- the held-out loss of each task over training for several
  runs (task A after the switch to task B shows forgetting).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from neuroplastic.data.cot import CotExample, CotFormatter, answers_match, extract_prediction
from neuroplastic.evaluation.generation import TextCodec, generate_until

__all__ = [
    "evaluate_cot",
    "plot_fisher_per_layer",
    "plot_forgetting",
    "plot_hebbian_norms",
    "plot_loss_per_technique",
    "plot_lr_vs_complexity",
    "trim_solution",
]


def trim_solution(text: str) -> str:
    """The generated text up to the end of its ``#### <number>`` line (when it has one)."""
    i = text.find("####")
    if i < 0:
        return text.strip()
    end = text.find("\n", i)
    return (text if end < 0 else text[:end]).strip()


@torch.no_grad()
def evaluate_cot(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[CotExample],
    formatter: CotFormatter | None = None,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Exact-match accuracy of the final number, with per-example records (greedy with
    ``temperature=0``; otherwise sampled with ``top_p`` from a generator seeded by ``seed``)."""
    formatter = formatter or CotFormatter(tokenizer)
    codec = TextCodec(tokenizer)
    gen = None
    if temperature > 0:
        dev = device or next(model.parameters()).device
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)
    was_training = model.training
    model.eval()
    records = []
    bar = None
    if progress and examples:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(examples), desc="evaluating", unit="q", file=sys.stderr,
                   dynamic_ncols=True, leave=False,
                   mininterval=0.1 if sys.stderr.isatty() else 15.0)
    t0 = time.perf_counter()
    try:
        for i, ex in enumerate(examples):
            text = generate_until(
                model, codec, formatter.prompt(ex.question), max_new_tokens=max_new_tokens,
                until=formatter.stop_strings, temperature=temperature,
                top_p=top_p if temperature > 0 else None, generator=gen, device=device,
            )
            solution = trim_solution(text)
            pred = extract_prediction(solution)
            records.append({
                "index": i,
                "task": ex.task,
                "question": ex.question,
                "reference": ex.answer,
                "generated": solution,
                "predicted": pred,
                "gold": ex.final,
                "correct": answers_match(pred, ex.final),
            })
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    n = len(records)
    correct = sum(r["correct"] for r in records)
    return {
        "accuracy": correct / n if n else 0.0,
        "correct": correct,
        "n": n,
        "answered": sum(r["predicted"] is not None for r in records),
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p if temperature > 0 else None,
        "chat_template": formatter.chat,
        "seconds": time.perf_counter() - t0,
        "examples": records,
    }


# =========================================================================== plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _records(run: str | Path | list[dict], kind: str) -> list[dict]:
    """Records of one kind from a run directory's metrics.jsonl (or a list of records)."""
    if isinstance(run, list):
        rows = run
    else:
        path = Path(run)
        rows = _read_jsonl(path / "metrics.jsonl" if path.is_dir() else path)
    return [r for r in rows if r.get("kind") == kind]


def _smooth(values: list[float], k: int) -> list[float]:
    if k <= 1:
        return values
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    _plt().close(fig)
    return path


def plot_loss_per_technique(runs: dict[str, Any], path: str | Path, smooth: int = 0) -> Path | None:
    """Training loss against step, one line per run (``{label: run_dir}``)."""
    series = {}
    for label, run in runs.items():
        rows = [(r["step"], r["loss"]) for r in _records(run, "cot") if r.get("loss") is not None]
        if rows:
            series[label] = rows
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, rows in series.items():
        steps, losses = zip(*rows)
        k = smooth or max(1, len(losses) // 25)
        ax.plot(steps, _smooth(list(losses), k), label=label, lw=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (answer tokens, nats)")
    ax.set_title("training loss per technique")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_lr_vs_complexity(run: Any, path: str | Path) -> Path | None:
    """The lr multiplier of each step against its reasoning complexity (ALR runs)."""
    rows = [(r["complexity"], r["lr_multiplier"]) for r in _records(run, "cot")
            if r.get("complexity") is not None and r.get("lr_multiplier") is not None
            and math.isfinite(r["complexity"])]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    xs, ys = zip(*rows)
    ax.scatter(xs, ys, s=12, alpha=0.6)
    ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
    ax.set_xlabel("batch reasoning complexity (mean over the step's examples)")
    ax.set_ylabel("learning-rate multiplier")
    ax.set_title("adaptive learning rate: multiplier vs complexity")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_fisher_per_layer(fisher: dict[str, Any], path: str | Path) -> Path | None:
    """The mean diagonal Fisher per layer, one bar per layer type (q_proj, ..., or the
    layer's mean when only ``per_layer`` is given), log scale."""
    fisher = fisher or {}
    by_module = fisher.get("per_layer_module") or {
        k: {"mean": v} for k, v in (fisher.get("per_layer") or {}).items()}
    if not by_module:
        return None
    plt = _plt()
    layers = list(by_module)
    kinds = list(dict.fromkeys(k for mods in by_module.values() for k in mods))
    width = 0.8 / max(len(kinds), 1)
    values = [v for mods in by_module.values() for v in mods.values() if v > 0]
    floor = min(values) / 10 if values else 1e-12
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(layers) * max(1, len(kinds) / 4) + 2), 4.2),
                           dpi=110)
    for j, kind in enumerate(kinds):
        xs = [i + (j - (len(kinds) - 1) / 2) * width for i in range(len(layers))]
        ys = [max(by_module[layer].get(kind, 0.0), floor) for layer in layers]
        ax.bar(xs, [y - floor for y in ys], width, bottom=floor, label=kind, color=f"C{j % 10}")
    ax.set_xticks(range(len(layers)), layers, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_ylabel("mean Fisher (diagonal)")
    ax.set_title(f"EWC Fisher magnitude per layer ({fisher.get('tasks', '?')} consolidation(s))")
    ax.grid(alpha=0.3, axis="y")
    if len(kinds) > 1:
        ax.legend(fontsize=7, ncol=min(len(kinds), 7), loc="upper center",
                  bbox_to_anchor=(0.5, -0.08), frameon=False)
    return _save(fig, path)


def plot_hebbian_norms(runs: dict[str, Any], path: str | Path, key: str = "hebbian_update_norm") -> Path | None:
    """The Hebbian update norm per step, one line per run."""
    series = {}
    for label, run in runs.items():
        rows = [(r["step"], r[key]) for r in _records(run, "cot") if r.get(key) is not None]
        if rows:
            series[label] = rows
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, rows in series.items():
        ax.plot(*zip(*rows), label=label, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("||dW|| (Frobenius, all adapted layers)")
    ax.set_title("Hebbian (Oja) update norm per step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_forgetting(runs: dict[str, Any], path: str | Path) -> Path | None:
    """Held-out loss of every task over training (``cot_eval`` records), per run; the
    first task solid, later ones dashed; vertical lines where the task changed."""
    data = {label: _records(run, "cot_eval") for label, run in runs.items()}
    data = {k: v for k, v in data.items() if v}
    if not data:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    switches: set[int] = set()
    for i, (label, rows) in enumerate(data.items()):
        tasks = [k[: -len("/loss")] for k in rows[0] if k.endswith("/loss")]
        for j, task in enumerate(tasks):
            pts = [(r["step"], r[f"{task}/loss"]) for r in rows if f"{task}/loss" in r]
            ax.plot(*zip(*pts), color=f"C{i}", ls="-" if j == 0 else "--", marker="o", ms=3,
                    lw=1.4, label=f"{label}: {task}")
        prev = rows[0].get("task")
        for r in rows[1:]:
            if r.get("task") != prev:
                switches.add(r["step"])
            prev = r.get("task")
    for s in sorted(switches):
        ax.axvline(s, color="0.4", lw=0.8, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (answer tokens, nats)")
    ax.set_title("forgetting: each task's loss over training (dotted: task change)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)
