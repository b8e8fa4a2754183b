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

import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from neuroplastic.data.cot import (
    CotExample,
    CotFormatter,
    answers_match,
    collate,
    extract_prediction,
)
from neuroplastic.data.sources import read_jsonl
from neuroplastic.data.tokenizers import as_tokenizer
from neuroplastic.evaluation.generation import generate_until
from neuroplastic.runtime import model_device

__all__ = [
    "answer_loglik",
    "evaluate_cot",
    "generate_batch",
    "plot_fisher_per_layer",
    "plot_forgetting",
    "plot_hebbian_norms",
    "plot_loss_per_technique",
    "plot_lr_vs_complexity",
    "trim_solution",
]


_FINAL_LINE = re.compile(r"####\s*-?\$?\d[\d,]*(?:\.\d+)?")


def _cut_at(text: str, stops: Sequence[str]) -> str:
    hits = [text.find(s) for s in stops if s and s in text]
    return text[: min(hits)] if hits else text


def trim_solution(text: str) -> str:
    """The generated text up to the end of its ``#### <number>`` line (when it has one)."""
    i = text.find("####")
    if i < 0:
        return text.strip()
    end = text.find("\n", i)
    return (text if end < 0 else text[:end]).strip()


def _hf_model(model: torch.nn.Module) -> Any | None:
    """The ``transformers`` model inside an :class:`HFCausalLM` (batched generation), else None."""
    inner = getattr(model, "model", None)
    return inner if inner is not None and callable(getattr(inner, "generate", None)) and hasattr(
        inner, "config") else None


@torch.no_grad()
def generate_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 256,
    until: Sequence[str] = (),
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: Any = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` with a Hugging Face model (an
    :class:`HFCausalLM`), ``batch_size`` prompts at a time: left padding with an attention
    mask, stop at end-of-text (the tokenizer's eos and the generation config's), at most
    ``max_new_tokens`` tokens, the text cut before the first string of ``until``. Prompts
    are batched in order of length (less padding); results come back in prompt order.
    ``progress``: a tqdm-like bar updated per prompt."""
    from transformers import GenerationConfig

    hf = _hf_model(model)
    if hf is None:
        raise TypeError("generate_batch needs a Hugging Face causal LM (HFCausalLM)")
    codec = as_tokenizer(tokenizer)
    dev = model_device(model, device)
    eos = [codec.eos_id] if codec.eos_id is not None else []
    cfg_eos = getattr(getattr(hf, "generation_config", None), "eos_token_id", None)
    for e in cfg_eos if isinstance(cfg_eos, list) else [cfg_eos]:
        if isinstance(e, int) and e not in eos:
            eos.append(e)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if isinstance(pad, int) else (eos[0] if eos else 0)
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens,
                               eos_token_id=eos or None, pad_token_id=pad)
    encoded = [codec.encode(p) or [codec.prefix_id] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(prompts)
    for b in range(0, len(order), max(1, batch_size)):
        rows = order[b : b + max(1, batch_size)]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            n = len(encoded[i])
            ids[r, width - n:] = torch.tensor(encoded[i], dtype=torch.long)
            mask[r, width - n:] = 1
        gen = hf.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=gen_cfg)
        for r, i in enumerate(rows):
            new = gen[r, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in eos), len(new))
            out[i] = _cut_at(codec.decode(new[:cut]), until)
        if progress is not None:
            progress.update(len(rows))
    return out


def _final_span(formatter: CotFormatter, ex: CotExample) -> tuple[int, int] | None:
    """Token offsets (within the answer tokens) of the reference's ``#### <number>``."""
    text = formatter.answer_text(ex.question, ex.answer)
    matches = list(_FINAL_LINE.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    tok = formatter.codec
    full = tok.encode(text)
    before = tok.encode(text[: m.start()])
    upto = tok.encode(text[: m.end()])
    if full[: len(upto)] != upto or upto[: len(before)] != before or len(upto) <= len(before):
        return None  # the tokenizer merges across the boundary: no clean span
    return len(before), len(upto)


@torch.no_grad()
def answer_loglik(
    model: torch.nn.Module,
    formatter: CotFormatter,
    examples: Sequence[CotExample],
    *,
    batch_size: int = 16,
    max_len: int = 1024,
    device: str | torch.device | None = None,
) -> list[dict[str, float | None]]:
    """Per example, the log-likelihood of the reference under the model (teacher forcing,
    nats): ``solution_ll`` -- mean per token of the whole reference answer (reasoning,
    ``#### N`` and the end token; minus the held-out loss) -- and ``final_ll`` -- the sum
    over the tokens of ``#### N`` given the prompt and the reference reasoning (the
    answer's log-likelihood; ``None`` when the tokenizer merges it with what precedes)."""
    dev = model_device(model, device)
    pad = formatter.codec.pad_id
    was_training = model.training
    model.eval()
    out: list[dict[str, float | None]] = []
    try:
        for b in range(0, len(examples), max(1, batch_size)):
            chunk = list(examples[b : b + max(1, batch_size)])
            enc = [formatter.encode(ex, max_len) for ex in chunk]
            kept = [e for e in enc if e is not None]
            logp_rows: list[torch.Tensor] = []
            if kept:
                x, y = collate(kept, pad)
                logits = model(x.to(dev))[0].float()
                logp = torch.log_softmax(logits, dim=-1)
                tgt = y.to(dev)
                picked = logp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
                logp_rows = list(picked.masked_fill(tgt < 0, 0.0).cpu())
            it = iter(logp_rows)
            for ex, e in zip(chunk, enc):
                if e is None:
                    out.append({"solution_ll": None, "final_ll": None})
                    continue
                row = next(it)
                n_ans = len(e.ids) - e.n_prompt
                # token j of ids is predicted at position j - 1
                ans = row[e.n_prompt - 1 : e.n_prompt - 1 + n_ans]
                span = _final_span(formatter, ex)
                final = None
                if span is not None and e.n_prompt + span[1] <= len(e.ids):
                    a, z = e.n_prompt + span[0] - 1, e.n_prompt + span[1] - 1
                    final = float(row[a:z].sum())
                out.append({"solution_ll": float(ans.sum()) / max(1, n_ans), "final_ll": final})
    finally:
        model.train(was_training)
    return out


def _mean(values: Sequence[float | None]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


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
    batch_size: int = 1,
    loglik: bool = False,
    max_len: int = 1024,
) -> dict[str, Any]:
    """Exact-match accuracy of the final number, with per-example records (greedy with
    ``temperature=0``; otherwise sampled with ``top_p`` from a generator seeded by ``seed``).

    ``batch_size`` > 1 with greedy decoding and a Hugging Face model generates that many
    questions at a time (:func:`generate_batch`); otherwise one at a time. ``loglik``:
    also the reference's log-likelihood (:func:`answer_loglik`; ``mean_solution_ll``,
    ``mean_final_ll``), which moves before exact match does."""
    formatter = formatter or CotFormatter(tokenizer)
    codec = as_tokenizer(tokenizer)
    gen = None
    if temperature > 0:
        dev = device or next(model.parameters()).device
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)
    batched = batch_size > 1 and temperature == 0 and _hf_model(model) is not None
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
        if batched:
            texts = generate_batch(model, tokenizer, [formatter.prompt(ex.question) for ex in examples],
                                   max_new_tokens=max_new_tokens, until=formatter.stop_strings,
                                   batch_size=batch_size, device=device, progress=bar)
        else:
            texts = []
            for ex in examples:
                texts.append(generate_until(
                    model, codec, formatter.prompt(ex.question), max_new_tokens=max_new_tokens,
                    until=formatter.stop_strings, temperature=temperature,
                    top_p=top_p if temperature > 0 else None, generator=gen, device=device,
                ))
                if bar is not None:
                    bar.update(1)
        gen_seconds = time.perf_counter() - t0
        for i, (ex, text) in enumerate(zip(examples, texts)):
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
        lls = None
        if loglik and examples:
            # full-vocabulary log-probs are large (16 x 512 x 49k floats ~ 1.6 GB): at most 16
            lls = answer_loglik(model, formatter, examples, batch_size=min(max(1, batch_size), 16),
                                max_len=max_len, device=device)
            for r, ll in zip(records, lls):
                r.update(ll)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    n = len(records)
    correct = sum(r["correct"] for r in records)
    res = {
        "accuracy": correct / n if n else 0.0,
        "correct": correct,
        "n": n,
        "answered": sum(r["predicted"] is not None for r in records),
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p if temperature > 0 else None,
        "chat_template": formatter.chat,
        "batch_size": batch_size if batched else 1,
        "seconds": time.perf_counter() - t0,
        "generation_seconds": gen_seconds,
    }
    if lls is not None:
        res["mean_solution_ll"] = _mean([x["solution_ll"] for x in lls])
        res["mean_final_ll"] = _mean([x["final_ll"] for x in lls])
        res["final_ll_n"] = sum(x["final_ll"] is not None for x in lls)
    res["examples"] = records
    return res


# =========================================================================== plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _records(run: str | Path | list[dict], kind: str) -> list[dict]:
    """Records of one kind from a run directory's metrics.jsonl (or a list of records)."""
    if isinstance(run, list):
        rows = run
    else:
        path = Path(run)
        path = path / "metrics.jsonl" if path.is_dir() else path
        rows = read_jsonl(path, skip_damaged=True) if path.is_file() else []  # skip a line cut by a crash
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
