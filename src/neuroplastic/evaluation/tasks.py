"""The tasks of ``neuroplastic evaluate``: a registry of name -> run + format.

Importing this module is cheap (no torch): the command line reads its choices from it.

An :class:`EvalTask` has a name, a one-line help, ``run(model, options)`` that evaluates a
:class:`LoadedModel` and returns a plain dict, and ``format(result, options)`` that turns
the dict into the lines printed for humans. ``to_json`` (optional) is what ``--json``
prints instead; ``check`` (optional) validates and normalises the options before any model
is loaded. A result may carry ``"warnings"``: messages the command line prints on stderr.
The ``--task`` choices are :data:`TASKS` in registration order; adding a task is one
:func:`register` call (docs/ARCHITECTURE.md, "Adding an evaluation task").
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuroplastic.errors import UserError
from neuroplastic.evaluation.table import format_table

__all__ = [
    "TASKS",
    "EvalOptions",
    "EvalTask",
    "LoadedModel",
    "check_options",
    "evaluate",
    "get_task",
    "load_model",
    "register",
    "text_tokenizer",
]


@dataclass
class EvalOptions:
    """What ``neuroplastic evaluate`` can set (each task reads the ones it uses)."""

    data: str | None = None
    field: str = "text"
    data_dir: str | None = None
    context: int | None = None
    stride: int | None = None
    batches: int | None = None
    batch_size: int = 16
    limit: int | None = None
    limit_per_subject: int | None = None
    shots: int = 0
    per_subject: bool = False
    lengths: Any = "512,1024,2048,4096"
    depths: Any = "0,0.25,0.5,0.75,1"
    trials: int = 5
    compare: list[str] | None = None
    max_new_tokens: int = 30
    output: str | None = None


@dataclass
class LoadedModel:
    """A model to evaluate: ``config`` is its RunConfig for our checkpoints, else None;
    ``reward_for(cfg, tokenizer)``: the reward such a run trained with (see :func:`evaluate`)."""

    model: Any
    tokenizer: Any
    config: Any
    directory: Path
    info: dict = field(default_factory=dict)
    device: str = "cpu"
    reward_for: Callable[[Any, Any], Any] | None = None


@dataclass(frozen=True)
class EvalTask:
    name: str
    help: str
    run: Callable[[LoadedModel, EvalOptions], dict]
    format: Callable[[dict, EvalOptions], list[str]]
    to_json: Callable[[dict], Any] | None = None
    check: Callable[[EvalOptions], None] | None = None


#: The registered tasks by name, in registration order (the ``--task`` choices).
TASKS: dict[str, EvalTask] = {}


def register(task: EvalTask) -> EvalTask:
    if task.name in TASKS:
        raise ValueError(f"evaluation task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> EvalTask:
    try:
        return TASKS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(str(name), list(TASKS), n=1)
        hint = f"did you mean {close[0]}?" if close else f"choose one of {', '.join(TASKS)}"
        raise UserError(f"unknown evaluation task {name!r}; {hint}") from None


def check_options(task: EvalTask, options: EvalOptions) -> None:
    """Every option a user can get wrong, checked before a model is loaded."""
    def positive(name: str, value, allow_none: bool = True) -> None:
        if value is None and allow_none:
            return
        if value is None or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value}.")

    positive("--batch-size", options.batch_size, allow_none=False)
    positive("--batches", options.batches)
    positive("--limit", options.limit)
    positive("--limit-per-subject", options.limit_per_subject)
    positive("--context", options.context)
    positive("--stride", options.stride)
    positive("--trials", options.trials, allow_none=False)
    positive("--max-new-tokens", options.max_new_tokens, allow_none=False)
    if options.shots < 0:
        raise UserError("--shots must be >= 0.")
    if options.context is not None and options.stride is not None and options.stride > options.context:
        raise UserError(
            f"--stride ({options.stride}) must not be larger than --context ({options.context}); "
            "a stride of the window's length means disjoint windows."
        )
    if options.limit_per_subject is not None and task.name != "mmlu":
        raise UserError("--limit-per-subject applies to --task mmlu only; use --limit.")
    if task.check is not None:
        task.check(options)


def evaluate(name: str, checkpoint: str, options: EvalOptions, device: str = "auto",
             reward_for: Callable[[Any, Any], Any] | None = None) -> tuple[EvalTask, dict]:
    """Check the options, load the model at ``checkpoint`` and run task ``name`` on it:
    ``(task, result)``.

    ``reward_for(cfg, tokenizer)`` is the reward a run of ours trained with (the ``rewards``
    task scores with it); the layer that knows the recipes passes it (``neuroplastic
    evaluate`` passes :func:`neuroplastic.recipes.reward_for`). Without it a run is scored
    with its ``reward.weights``.
    """
    from neuroplastic.runtime import resolve_device

    task = get_task(name)
    check_options(task, options)
    resolved = str(resolve_device(device))  # a device this machine lacks: one sentence
    loaded = load_model(checkpoint, resolved)
    loaded.reward_for = reward_for
    return task, task.run(loaded, options)


# =========================================================================== loading


def load_model(path: str, device: str) -> LoadedModel:
    """One of our checkpoints / run dirs (``config`` its RunConfig), else any model
    :func:`~neuroplastic.models.loading.load_any_model` reads (a Hugging Face directory, a
    LoRA adapter, a cot output; ``config`` None)."""
    from neuroplastic.models.loading import load_any_model, load_trained

    p = Path(path).expanduser()
    hf_like = p.is_dir() and any(
        (d / name).is_file()
        for d in (p, p / "model", p / "adapter")
        for name in ("config.json", "adapter_config.json")
    )
    if p.exists() and not hf_like:
        model, tok, cfg, directory = load_trained(p, device=device)
        return LoadedModel(model, tok, cfg, directory, {"kind": "neuroplastic checkpoint"}, device)
    model, tok, info = load_any_model(path, device=device)
    directory = Path(info.get("hf_dir") or info.get("model_path") or path)
    return LoadedModel(model, tok, None, directory, info, device)


def text_tokenizer(loaded: LoadedModel):
    """Our Tokenizer for a stream of text (encode without special tokens, eos, byte
    lengths): the model's own, or the Hugging Face model directory's tokenizer files."""
    from neuroplastic.data.tokenizers import HFTokenizer, Tokenizer

    if isinstance(loaded.tokenizer, Tokenizer):
        return loaded.tokenizer
    for key in ("hf_dir", "base_model", "adapter", "model_path"):
        d = loaded.info.get(key)
        if d and any((Path(d) / name).is_file() for name in ("tokenizer.json", "vocab.json")):
            return HFTokenizer(d)
    raise UserError(
        "cannot read this model's tokenizer files (tokenizer.json, or vocab.json + merges.txt) "
        "for loss/perplexity; evaluate a folder that has them."
    )


# =========================================================================== lm, wikitext2

# what the lm tasks' printout needs beyond the metrics; not part of their JSON
_LM_DISPLAY = ("max_batches", "batch_size", "context_given")


def _wikitext2_file(options: EvalOptions) -> Path:
    if options.data:
        p = Path(options.data).expanduser()
        if not p.is_file():
            raise UserError(f"WikiText-2 file {str(p)!r} does not exist; give wiki.valid.tokens.")
        return p
    from neuroplastic.data.registry import data_dirs

    names = ("wikitext2/wiki.valid.tokens", "wikitext2/wiki.valid.raw",
             "wikitext2/wikitext-2/wiki.valid.tokens", "wikitext2/wikitext-2-raw/wiki.valid.raw")
    dirs = data_dirs(options.data_dir)
    for d in dirs:
        for name in names:
            if (d / name).is_file():
                return d / name
    raise UserError(
        "no WikiText-2 validation file (wikitext2/wiki.valid.tokens) in the data dirs "
        f"({', '.join(str(d) for d in dirs)}); pass --data FILE or --data-dir."
    )


def _run_lm(loaded: LoadedModel, options: EvalOptions, wikitext2: bool) -> dict:
    import numpy as np
    import torch

    from neuroplastic.data.batching import join_documents
    from neuroplastic.data.pipeline import prepare_data, token_byte_lengths
    from neuroplastic.evaluation.lm import (
        fit_to_memory,
        free_memory_bytes,
        lm_metrics,
        model_context,
        sliding_windows,
    )

    model, cfg, directory, device = loaded.model, loaded.config, loaded.directory, loaded.device
    text_tok = text_tokenizer(loaded)
    context = model_context(model, loaded.tokenizer)
    if context is None:
        raise UserError("cannot tell this model's context length; pass --context N.")
    if options.context is not None and options.context > context:
        raise UserError(
            f"--context {options.context} is longer than the model's context of {context} tokens; "
            f"use at most {context}."
        )
    window = options.context or context
    words = None
    if wikitext2:
        path = _wikitext2_file(options)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read {path} as UTF-8 text ({exc}).") from exc
        # one stream, started by the end-of-text token so that every token is scored
        tokens = np.asarray([text_tok.eos_id, *text_tok.encode(text)], dtype=np.int64)
        words = len(text.split())
        what = f"WikiText-2 validation ({path}), the whole file as one stream"
        max_batches = options.batches
    elif options.data:
        from neuroplastic.data.sources import load_documents

        docs = load_documents(options.data, field=options.field, data_dir=options.data_dir)
        tokens = join_documents([text_tok.encode(d) for d in docs], text_tok.eos_id)
        what = options.data
        max_batches = options.batches or 50
    else:
        if cfg is None:
            raise UserError(
                "a Hugging Face model has no run validation split; pass --data FILE "
                "(or --task wikitext2)."
            )
        if options.data_dir:
            cfg.data.data_dir = options.data_dir
        tokens = prepare_data(cfg.data, tokenizer_dir=directory / "tokenizer").val_tokens
        what = f"validation split of {cfg.data.source}"
        max_batches = options.batches or 50
    if len(tokens) < 2:
        raise UserError(f"{what} holds fewer than 2 tokens; give more text.")
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or text_tok.vocab_size)
    new_window, batch_size, note = fit_to_memory(
        window, options.batch_size, vocab, free_memory_bytes(device)
    )
    if new_window < window and options.context is not None:
        raise UserError(f"--context {window} does not fit in memory ({note}); use a smaller --context.")
    window = new_window
    stride = min(options.stride or window, window)
    batches, win = sliding_windows(tokens, window, stride, batch_size, max_batches)
    metrics = lm_metrics(
        model, batches, torch.from_numpy(token_byte_lengths(text_tok)), device,
        progress=len(batches) > 1,
    )
    metrics.update(
        checkpoint=str(directory), data=what, model_context=context, window=window,
        stride=stride, windows=win["windows"], stream_tokens=win["stream_tokens"],
    )
    if note:
        metrics["note"] = note
    if words is not None:
        if win["scored_end"] < win["stream_tokens"]:  # a capped run: the words it covered
            words = len(text_tok.decode(tokens[1 : win["scored_end"]].tolist()).split())
        metrics["words"] = words
        nll = metrics["loss"] * metrics["tokens"]
        metrics["word_ppl"] = math.exp(min(nll / max(words, 1), 50.0))
    metrics.update(max_batches=max_batches, batch_size=batch_size,
                   context_given=options.context is not None)
    return metrics


def _format_lm(res: dict, options: EvalOptions) -> list[str]:
    window, stride, note, words = res["window"], res["stride"], res.get("note"), res.get("words")
    lines = [f"checkpoint: {res['checkpoint']}"]
    scored = f"{res['tokens']:,} tokens scored"
    if res["tokens"] < res["stream_tokens"] - 1:
        scored += (f" of {res['stream_tokens'] - 1:,} (--batches {res['max_batches']} x "
                   f"--batch-size {res['batch_size']})")
    if words is not None:
        scored += f", {words:,} words"
    lines.append(f"data: {res['data']} ({scored})")
    origin = ("--context" if res["context_given"]
              else f"the model's context{' (lowered: memory)' if note else ''}")
    kind = "disjoint windows" if stride == window else f"sliding windows, {window - stride} tokens of overlap"
    lines.append(f"window: {window} tokens ({origin}; model context {res['model_context']}), "
                 f"stride {stride} ({kind}), {res['windows']} windows")
    if note:
        lines.append(f"note: {note}")
    rows = [["loss (nats/token)", f"{res['loss']:.4f}"],
            ["perplexity (per token)", f"{res['ppl']:.2f}"]]
    if words is not None:
        rows.append(["perplexity (per word)", f"{res['word_ppl']:.2f}"])
    rows.append(["bits per byte", f"{res['bpb']:.4f}"])
    lines.append(format_table(rows, ["metric", "value"]))
    return lines


def _lm_json(res: dict) -> dict:
    return {k: v for k, v in res.items() if k not in _LM_DISPLAY}


# =========================================================================== multiple choice


def _run_mc(loaded: LoadedModel, options: EvalOptions, task: str) -> dict:
    from neuroplastic.evaluation import multiple_choice

    scorer = multiple_choice.make_scorer(loaded.model, loaded.tokenizer, loaded.device,
                                         options.batch_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        res = multiple_choice.evaluate_task(
            scorer, task, data_path=options.data, data_dir=options.data_dir, limit=options.limit,
            shots=options.shots, limit_per_subject=options.limit_per_subject,
        )
    res["checkpoint"] = str(loaded.directory)
    if options.output:
        Path(options.output).write_text(json.dumps(res, indent=2), encoding="utf-8")
    # once each (evaluate_task warns once per call)
    return {**res, "warnings": [str(w.message) for w in caught]}


def _format_mc(res: dict, options: EvalOptions) -> list[str]:
    lines = [f"checkpoint: {res['checkpoint']}"]
    shots = f"{res['shots']}-shot"
    used = res["shots_used"]
    if res["shots_cut"]:
        shots = (f"{res['shots']} shots asked, {used['min']}-{used['max']} used (mean "
                 f"{used['mean']:.2f}; {res['shots_cut']} items got fewer to fit the "
                 f"{res['window']}-token window)")
    lines.append(f"task: {res['task']}, {res['n']} items, {shots}")
    if res["truncated"]:
        lines.append(f"note: {res['truncated']} of {res['n']} prompts are longer than the model's "
                     f"{res['window']}-token window and lost tokens from the left")
    rows = [["acc", f"{res['acc']:.4f}"], ["acc_norm", f"{res['acc_norm']:.4f}"]]
    per = res.get("per_subject") or {}
    if "macro_acc" in per:
        rows.append(["macro acc (per subject)", f"{per['macro_acc']:.4f}"])
    lines.append(format_table(rows, ["metric", "value"]))
    subjects = {k: v for k, v in per.items() if k != "macro_acc"}
    if subjects and options.per_subject:
        lines.append(format_table([[k, f"{v:.4f}"] for k, v in sorted(subjects.items())],
                                  ["subject", "acc"]))
    if options.output:
        lines.append(f"per-item records: {options.output}")
    return lines


def _mc_json(res: dict) -> dict:
    return {k: v for k, v in res.items() if k != "items"}


# =========================================================================== recall


def _recall_json_path(loaded: LoadedModel, options: EvalOptions, task: str) -> Path:
    return Path(options.output) if options.output else loaded.directory.parent.parent / f"{task}.json"


def _check_needle(options: EvalOptions) -> None:
    from neuroplastic.evaluation.recall import parse_depths, parse_lengths

    options.lengths = parse_lengths(options.lengths)
    options.depths = parse_depths(options.depths)


def _run_needle(loaded: LoadedModel, options: EvalOptions) -> dict:
    from neuroplastic.evaluation.recall import needle_grid, plot_needle_heatmap

    out_json = _recall_json_path(loaded, options, "needle")
    res = needle_grid(loaded.model, text_tokenizer(loaded), lengths=options.lengths,
                      depths=options.depths, trials=options.trials, device=loaded.device)
    png = out_json.with_suffix(".png")
    plot_needle_heatmap(res, png, title=f"needle recall: {loaded.directory}")
    out_json.write_text(json.dumps(res, indent=2, default=str), encoding="utf-8")
    return {**res, "checkpoint": str(loaded.directory), "heatmap": str(png), "results": str(out_json)}


def _format_needle(res: dict, options: EvalOptions) -> list[str]:
    rows = [[str(n)] + [f"{acc:.2f}" for acc in res["grid"][i]] for i, n in enumerate(options.lengths)]
    return [
        f"checkpoint: {res['checkpoint']}",
        format_table(rows, ["bytes \\ depth", *[f"{d:g}" for d in options.depths]]),
        f"overall accuracy: {res['accuracy']:.3f}; heatmap: {res['heatmap']}",
        f"results: {res['results']}",
    ]


def _run_mqar(loaded: LoadedModel, options: EvalOptions) -> dict:
    from neuroplastic.evaluation.recall import evaluate_mqar

    out_json = _recall_json_path(loaded, options, "mqar")
    res = evaluate_mqar(loaded.model, text_tokenizer(loaded), num_examples=options.limit or 100,
                        device=loaded.device)
    out_json.write_text(json.dumps(res, indent=2, default=str), encoding="utf-8")
    return {**res, "checkpoint": str(loaded.directory), "results": str(out_json)}


def _format_mqar(res: dict, options: EvalOptions) -> list[str]:
    return [
        f"checkpoint: {res['checkpoint']}",
        format_table([["accuracy (per query)", f"{res['accuracy']:.4f}"],
                      ["accuracy (whole example)", f"{res['example_accuracy']:.4f}"]],
                     ["metric", "value"]),
        f"results: {res['results']}",
    ]


# =========================================================================== rewards


def _run_rewards(loaded: LoadedModel, options: EvalOptions) -> dict:
    import torch

    from neuroplastic.evaluation.rewards_eval import (
        plot_components,
        reward_components,
        reward_pairs,
    )
    from neuroplastic.models import build_model
    from neuroplastic.models.loading import load_trained
    from neuroplastic.rewards import MultiObjectiveReward

    cfg, tok, directory, device = loaded.config, loaded.tokenizer, Path(loaded.directory), loaded.device
    if cfg is None:
        raise UserError("--task rewards needs one of our checkpoints or run directories.")
    if loaded.reward_for is not None:  # the reward the run trained with
        reward_fn = loaded.reward_for(cfg, tok)
    else:
        reward_fn = MultiObjectiveReward(dict(cfg.reward.weights))
    pairs = reward_pairs(cfg, tok, directory, options.limit or 20, seed=0)
    kw = dict(max_new_tokens=options.max_new_tokens, temperature=0.0, device=device)
    torch.manual_seed(cfg.train.seed)
    before = build_model(cfg.model).to(device)
    columns = {"before": reward_components(before, tok, pairs, reward_fn, **kw),
               "after": reward_components(loaded.model, tok, pairs, reward_fn, **kw)}
    for other in options.compare or []:
        m2, tok2, _, d2 = load_trained(other, device=device)
        columns[Path(other).name] = reward_components(m2, tok2, pairs, reward_fn, **kw)
    out_json = Path(options.output) if options.output else directory.parent.parent / "rewards.json"
    png = out_json.with_suffix(".png")
    plot_components(columns, png, title=f"reward components: {directory.parent.parent.name}")
    out_json.write_text(json.dumps(columns, indent=2), encoding="utf-8")
    return {"checkpoint": str(directory), "prompts": len(pairs), "columns": columns,
            "results": str(out_json), "plot": str(png)}


def _format_rewards(res: dict, options: EvalOptions) -> list[str]:
    columns = res["columns"]
    names = list(columns["after"]["terms"])
    rows = [[n, *[f"{c['terms'][n]:.4f}" for c in columns.values()]] for n in names]
    rows.append(["total", *[f"{c['total']:.4f}" for c in columns.values()]])
    return [
        f"checkpoint: {res['checkpoint']}; {res['prompts']} prompts, greedy, "
        f"{options.max_new_tokens} new tokens",
        format_table(rows, ["term", *columns]),
        f"results: {res['results']}; plot: {res['plot']}",
    ]


# =========================================================================== the registry


register(EvalTask("lm", "loss/ppl/bpb", lambda m, o: _run_lm(m, o, wikitext2=False), _format_lm,
                  to_json=_lm_json))
register(EvalTask("wikitext2", "token- and word-level perplexity on the WikiText-2 validation file",
                  lambda m, o: _run_lm(m, o, wikitext2=True), _format_lm, to_json=_lm_json))
register(EvalTask("mmlu", "MMLU, multiple choice (acc, acc_norm, per subject)",
                  lambda m, o: _run_mc(m, o, "mmlu"), _format_mc, to_json=_mc_json))
register(EvalTask("hellaswag", "HellaSwag, multiple choice (acc, acc_norm)",
                  lambda m, o: _run_mc(m, o, "hellaswag"), _format_mc, to_json=_mc_json))
register(EvalTask("synthetic-mc", "the synthetic curriculum's questions, multiple choice",
                  lambda m, o: _run_mc(m, o, "synthetic-mc"), _format_mc, to_json=_mc_json))
register(EvalTask("synthetic-completion", "the synthetic curriculum's completions, multiple choice",
                  lambda m, o: _run_mc(m, o, "synthetic-completion"), _format_mc, to_json=_mc_json))
register(EvalTask("needle", "needle-in-a-haystack recall over lengths x depths (heatmap)",
                  _run_needle, _format_needle, check=_check_needle))
register(EvalTask("mqar", "multi-query associative recall accuracy", _run_mqar, _format_mqar))
register(EvalTask("rewards", "reward components before/after training (and --compare runs)",
                  _run_rewards, _format_rewards))
