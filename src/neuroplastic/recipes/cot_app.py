"""``neuroplastic cot train | evaluate | demo``: the commands of neuroplastic-cot.

The command line (:mod:`neuroplastic.cli`) parses the seed system's flags and calls
:func:`cot_config` + :func:`train_cot`, :func:`evaluate_model` and :func:`run_demo`;
these return plain dicts and never print (progress goes through ``echo``).

* ``train``: the ``neuroplastic-cot`` recipe on a local Hugging Face causal LM
  (``--model_name PATH``), LoRA by default, with the plasticity rules chosen by
  ``--use_alr / --use_ewc / --use_hebbian / --use_all`` (no flag: plain LoRA
  fine-tuning, the baseline). The run directory (``--output_dir``) holds the trainer's
  checkpoints and ``metrics.jsonl``, the LoRA adapter in ``adapter/`` (or, for a full
  fine-tune, the model in ``model/``), ``fisher.json`` and the run's plots.
* ``evaluate``: exact-match accuracy of the final number on held-out questions, with
  per-example records, for a ``train`` output directory, an adapter directory (+ its
  base model), a plain HF model directory, or one of our checkpoints.
* ``demo``: trains the baseline and each chosen technique on task A then task B, shows
  the base model's and the tuned model's reasoning side by side on ``--num_examples``
  held-out task-A questions, and writes the five plots.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from neuroplastic.config import RunConfig, load_config
from neuroplastic.data.cot import (
    SYNTHETIC_TASKS,
    CotFormatter,
    load_cot_examples,
    split_examples,
)
from neuroplastic.errors import UserError
from neuroplastic.models.loading import load_any_model, read_run_config

#: technique flag -> plasticity rule type
TECHNIQUES = {"alr": "adaptive_lr", "ewc": "ewc", "hebbian": "hebbian"}
RECIPE = "neuroplastic-cot"

Echo = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# =========================================================================== config


def _is_synthetic(spec: str) -> bool:
    return spec in SYNTHETIC_TASKS


def cot_config(
    output_dir: str | Path,
    *,
    model_name: str | None = None,
    techniques: Sequence[str] = (),
    lora: bool = True,
    tasks: Sequence[str] = (),
    recipe: str = RECIPE,
    overrides: Sequence[str] = (),
) -> RunConfig:
    """The ``neuroplastic-cot`` config for a run: model, tasks, and only the rules of
    ``techniques`` (``alr``, ``ewc``, ``hebbian``) from the recipe's ``plasticity.rules``
    (a technique the recipe does not configure gets the rule's defaults)."""
    unknown = [t for t in techniques if t not in TECHNIQUES]
    if unknown:
        raise UserError(f"Unknown technique {unknown[0]!r}; use alr, ewc or hebbian.")
    ov: list[str] = []
    if model_name:
        from neuroplastic.models.registry import is_registry_name

        path = Path(model_name).expanduser()
        if is_registry_name(model_name) and not path.exists():
            ov.append(f"model={model_name}")  # resolved (and made once) by the model registry
        elif not path.is_dir():
            raise UserError(
                f"Model {model_name!r} is not a local directory nor a registry name (see "
                "`neuroplastic models`); pass --model_name smollm2-135m-instruct, or download a "
                "model once (e.g. huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct --local-dir "
                "DIR) and pass --model_name DIR."
            )
        else:
            ov.append(f"model={path}")
    tasks = [str(t) for t in tasks if str(t).strip()]
    if tasks:
        ov.append("options.tasks=" + json.dumps(tasks))
        files = [t for t in tasks if not _is_synthetic(t)]
        if files:  # the trainer also reads data.source (as a plain text stream it then replaces)
            ov.append(f"data.source={files[0]}")
        else:
            ov += ["data.source=synthetic", "data.stages=[definitions]", "data.max_chars=4000"]
    ov += [f"train.out_dir={output_dir}"]
    ov += list(overrides)
    cfg = load_config(recipe, ov)
    if not lora:
        cfg.model.hf.lora = {}
    wanted = [TECHNIQUES[t] for t in techniques]
    rules = [r for r in cfg.plasticity.rules if r.get("type") in wanted]
    for kind in wanted:
        if not any(r.get("type") == kind for r in rules):
            rules.append({"type": kind})
    cfg.plasticity.rules = rules
    from neuroplastic.config import build_dataclass
    from neuroplastic.recipes.cot import CotOptions

    build_dataclass(CotOptions, dict(cfg.options), "options").validate()  # before any model is loaded
    return cfg.validate()


def techniques_from_flags(use_alr: bool, use_ewc: bool, use_hebbian: bool, use_all: bool) -> list[str]:
    if use_all:
        return list(TECHNIQUES)
    return [t for t, on in (("alr", use_alr), ("ewc", use_ewc), ("hebbian", use_hebbian)) if on]


# =========================================================================== train


def _find(callbacks, name: str):
    return next((c for c in callbacks if getattr(c, "name", None) == name), None)


def run_plots(run_dir: Path, label: str = "run") -> dict[str, str]:
    """The per-run plots that apply (ALR, Fisher, Hebbian, held-out loss per task)."""
    from neuroplastic.evaluation.cot import (
        plot_fisher_per_layer,
        plot_forgetting,
        plot_hebbian_norms,
        plot_lr_vs_complexity,
    )

    out: dict[str, str] = {}
    made = {
        "lr_vs_complexity": plot_lr_vs_complexity(run_dir, run_dir / "lr_vs_complexity.png"),
        "hebbian_norms": plot_hebbian_norms({label: run_dir}, run_dir / "hebbian_norms.png"),
        "forgetting": plot_forgetting({label: run_dir}, run_dir / "task_losses.png"),
    }
    fisher_path = run_dir / "fisher.json"
    if fisher_path.is_file():
        made["fisher_per_layer"] = plot_fisher_per_layer(
            json.loads(fisher_path.read_text(encoding="utf-8")), run_dir / "fisher_per_layer.png"
        )
    for k, v in made.items():
        if v is not None:
            out[k] = str(v)
    return out


def train_cot(
    cfg: RunConfig, echo: Echo = _quiet, fresh: bool = False, plots: bool = True
) -> dict[str, Any]:
    """Train one ``neuroplastic-cot`` run; export the adapter (or model) and (``plots``)
    the run's plots. ``fresh``: remove what an earlier run left in the run directory."""
    from neuroplastic.training.run import clear_run_dir
    from neuroplastic.training.trainer import Trainer

    if fresh:
        clear_run_dir(Path(cfg.train.out_dir.format(name=cfg.name)))
    trainer = Trainer(cfg, echo=echo).setup()
    cot = _find(trainer.callbacks, "cot")
    if cot is None:
        raise UserError(f"Recipe {cfg.name!r} has no 'recipe_module: cot'; use neuroplastic-cot.")
    rules = [r.name for r in trainer.engine.rules] if trainer.engine is not None else []
    if "ewc" in rules and len(cot.names) == 1 and not cot.opt.ewc_every:
        echo("note: EWC with one task and options.ewc_every=0 never consolidates, so its penalty "
             "stays 0; add a second task (--tasks A,B) or consolidate every N steps (--ewc_every N).")
    summary = trainer.train()
    run_dir = Path(summary["run_dir"])
    model = trainer.model
    export = None
    if not summary["interrupted"] and hasattr(model, "tokenizer") and hasattr(model, "hf_config"):
        from neuroplastic.models.hf import export_merged, is_peft, save_adapter

        if is_peft(model.model):
            export = str(save_adapter(model, run_dir / "adapter"))
        else:
            export = str(export_merged(model, run_dir / "model"))
    losses = cot.task_losses(trainer.context)
    result = {
        "run_dir": str(run_dir),
        "steps": summary["step"],
        "interrupted": summary["interrupted"],
        "elapsed_s": summary["elapsed_s"],
        "rules": rules,
        "tasks": dict(cot.specs),
        "task_losses": losses,
        "export": export,
        "consolidations": cot.consolidations,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "loss_curve": summary["loss_curve"],
        "plots": run_plots(run_dir) if plots else {},
    }
    (run_dir / "cot_summary.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


# =========================================================================== evaluate


def _options_of(path: Path):
    from neuroplastic.config import build_dataclass
    from neuroplastic.recipes.cot import CotOptions

    cfg = read_run_config(path)
    if cfg is None or cfg.recipe_module != "cot":
        return CotOptions(), None
    return build_dataclass(CotOptions, dict(cfg.options), "options"), cfg


def evaluation_examples(
    data: str | None, model_path: str | Path, split: str = "val", num_examples: int = 0,
    data_dir: str | None = None,
):
    """(examples, description, options) for ``evaluate``: the run's own held-out split by
    default (same split seed and fraction as training)."""
    opts, cfg = _options_of(Path(model_path))
    if data is None:
        tasks = list(opts.tasks) or ([cfg.data.source] if cfg is not None else ["gsm8k"])
        data = tasks[0]
    if split not in ("val", "all"):
        raise UserError(f"--split must be val or all, got {split!r}.")
    if num_examples < 0:
        raise UserError("--num_examples must be >= 0 (0: all).")
    examples = load_cot_examples(
        data, data_dir, question_field=opts.question_field, answer_field=opts.answer_field,
        synthetic_size=opts.synthetic_size, seed=opts.split_seed,
    )
    if split == "val":
        _, examples = split_examples(examples, opts.val_fraction, opts.split_seed, opts.max_val)
    if num_examples:
        examples = examples[:num_examples]
    what = f"{data} ({'held-out split' if split == 'val' else 'all examples'}, {len(examples)})"
    return examples, what, opts


def evaluate_model(
    model_path: str | Path,
    output_file: str | Path | None = None,
    *,
    base_model: str | None = None,
    data: str | None = None,
    split: str = "val",
    num_examples: int = 0,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float | None = None,
    device: str = "cpu",
    data_dir: str | None = None,
    progress: bool = True,
    batch_size: int = 1,
    loglik: bool = False,
) -> dict[str, Any]:
    """``neuroplastic cot evaluate``: accuracy + per-example records (written to ``output_file``).
    ``batch_size`` > 1: greedy generation of that many questions at a time (left padding);
    ``loglik``: also the reference answers' log-likelihood (see :func:`evaluate_cot`)."""
    from neuroplastic.evaluation.cot import evaluate_cot

    if max_new_tokens <= 0:
        raise UserError("--max_new_tokens must be a positive integer.")
    if batch_size < 1:
        raise UserError(f"--batch_size must be a positive integer, got {batch_size}.")
    if temperature < 0:
        raise UserError("--temperature must be >= 0 (0 means greedy).")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {top_p}.")
    if not Path(model_path).exists():  # before any data is looked up (or downloaded)
        raise UserError(f"Model path {str(model_path)!r} does not exist.")
    examples, what, opts = evaluation_examples(data, model_path, split, num_examples, data_dir)
    model, tokenizer, info = load_any_model(model_path, base_model, device)
    formatter = CotFormatter(tokenizer, opts.instruction, opts.system or None, opts.chat_mode)
    res = evaluate_cot(model, tokenizer, examples, formatter, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, device=device, progress=progress,
                       batch_size=batch_size, loglik=loglik)
    res = {"model": info, "data": what, **res}
    if output_file:
        out = Path(output_file)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2), encoding="utf-8")
        res["output_file"] = str(out)
    return res


# =========================================================================== tiny model


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_model(
    directory: str | Path,
    texts: Sequence[str],
    *,
    chat: bool = True,
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    max_positions: int = 512,
    head_std: float = 0.35,
    seed: int = 0,
) -> Path:
    """A tiny randomly initialised Qwen2 with a BPE tokenizer trained on ``texts`` (and a
    Qwen-style chat template with ``<|im_start|>`` / ``<|im_end|>`` when ``chat``), saved
    with ``save_pretrained``: for tests and for the demo on a machine without weights.
    Its reasoning means nothing; it exercises every code path on a CPU in seconds.

    ``head_std``: the output projection is drawn with this standard deviation (instead
    of the usual 0.02) so that logits can be peaked; with LoRA on a random model the
    frozen head would otherwise keep every prediction close to uniform."""
    import tempfile

    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from neuroplastic.data.tokenizers import BPETokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bpe = BPETokenizer.train(list(texts), vocab_size=vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        bpe.save(tmp)
        (Path(tmp) / "neuroplastic_tokenizer.json").unlink(missing_ok=True)
        tok = AutoTokenizer.from_pretrained(tmp)
    if chat:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.eos_token = "<|im_end|>"
        tok.chat_template = TINY_CHAT_TEMPLATE
    tok.pad_token = "<|pad|>"
    tok.model_max_length = max_positions
    tok.save_pretrained(str(directory))
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_positions, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    ))
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, head_std)
    model.save_pretrained(str(directory))
    return directory


# =========================================================================== demo


def _task_eval_rows(run_dir: Path) -> list[dict[str, Any]]:
    from neuroplastic.training.metrics import read_metrics

    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "cot_eval"]


def forgetting_summary(run_dir: Path, task_a: str) -> dict[str, float]:
    """Task-A held-out loss when task A ended and at the end of training, and their gap."""
    rows = _task_eval_rows(run_dir)
    key = f"{task_a}/loss"
    rows = [r for r in rows if key in r]
    if not rows:
        return {}
    first_task = rows[0].get("task")
    at_switch = next((r for r in rows if r.get("task") != first_task), None)
    end = rows[-1]
    out = {"task_a_loss_end": end[key]}
    if at_switch is not None:
        out["task_a_loss_after_a"] = at_switch[key]
        out["forgetting"] = end[key] - at_switch[key]
    return out


def _train_loss_tail(run_dir: Path, frac: float = 0.1) -> float:
    from neuroplastic.training.metrics import read_metrics

    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")
              if r.get("kind") == "cot" and r.get("loss") is not None]
    if not losses:
        return math.nan
    k = max(1, int(len(losses) * frac))
    return sum(losses[-k:]) / k


def run_demo(
    output_dir: str | Path,
    *,
    model_name: str | None,
    techniques: Sequence[str],
    num_examples: int = 10,
    seed: int = 42,
    steps: int = 0,
    data: str = "gsm8k",
    task_b: str = "arith",
    max_new_tokens: int = 256,
    overrides: Sequence[str] = (),
    data_dir: str | None = None,
    echo: Echo = _quiet,
) -> dict[str, Any]:
    """Baseline + one run per technique (+ all chosen together) on task A then task B;
    base vs tuned reasoning on held-out task-A questions; the five plots."""
    from neuroplastic.evaluation.cot import (
        evaluate_cot,
        plot_fisher_per_layer,
        plot_forgetting,
        plot_hebbian_norms,
        plot_loss_per_technique,
        plot_lr_vs_complexity,
    )

    if num_examples < 1:
        raise UserError("--num_examples must be a positive integer.")
    if not model_name:
        raise UserError(
            "The demo needs a model: pass --model_name DIR (a local Hugging Face causal LM such "
            "as Qwen2.5-0.5B-Instruct), or --model_name tiny for a tiny random Qwen2 that only "
            "exercises the mechanics."
        )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    techniques = list(dict.fromkeys(techniques))
    if model_name == "tiny":
        texts = [f"{e.question}\n{e.answer}" for spec in (data, task_b)
                 for e in load_cot_examples(spec, data_dir)[:2000]]
        model_name = str(make_tiny_model(out / "tiny-model", texts, seed=seed))
        echo(f"built a tiny random Qwen2 in {model_name} (its reasoning is not meaningful)")
    variants: list[tuple[str, list[str]]] = [("baseline", [])]
    variants += [(t, [t]) for t in techniques]
    if len(techniques) > 1:
        variants.append(("+".join(techniques), techniques))
    base_ov = [f"train.seed={seed}", "train.progress=true", "train.tensorboard=false",
               "train.keep_best=false"]  # a per-step bar on stderr for every run
    if steps:
        base_ov.append(f"train.max_steps={steps}")
    if data_dir:
        base_ov.append(f"data.data_dir={data_dir}")
    runs: dict[str, Path] = {}
    summaries: dict[str, dict[str, Any]] = {}
    tuned_cfg = None
    for label, techs in variants:
        cfg = cot_config(out / "runs" / label.replace("+", "_"), model_name=model_name,
                         techniques=techs, tasks=[data, task_b],
                         overrides=[*base_ov, *overrides])
        echo(f"training {label} ({', '.join(TECHNIQUES[t] for t in techs) or 'LoRA only'}) "
             f"for {cfg.train.max_steps} steps: {data} then {task_b}")
        res = train_cot(cfg, echo=echo, fresh=True, plots=False)  # the demo draws its own
        runs[label] = Path(res["run_dir"])
        summaries[label] = res
        tuned_cfg = cfg
    from neuroplastic.recipes.cot import task_names

    task_a = task_names([data, task_b])[0]
    rows = []
    for label, run_dir in runs.items():
        row = {"variant": label, "train_loss_end": _train_loss_tail(run_dir)}
        row.update(forgetting_summary(run_dir, task_a))
        row.update({f"{k}_loss_end": v for k, v in summaries[label]["task_losses"].items()
                    if k != task_a})  # task A's is task_a_loss_end
        rows.append(row)

    # base vs tuned reasoning on held-out task-A questions
    tuned_label = variants[-1][0]
    examples = evaluation_examples(data, runs[tuned_label], "val", num_examples, data_dir)[0]
    opts = _options_of(runs[tuned_label])[0]
    base, base_tok, _ = load_any_model(model_name)
    tuned, tuned_tok, _ = load_any_model(runs[tuned_label], model_name)
    fmt = CotFormatter(base_tok, opts.instruction, opts.system or None, opts.chat_mode)
    echo(f"generating {len(examples)} solutions with the base and the tuned ({tuned_label}) model")
    base_res = evaluate_cot(base, base_tok, examples, fmt, max_new_tokens=max_new_tokens)
    tuned_res = evaluate_cot(tuned, tuned_tok, examples, fmt, max_new_tokens=max_new_tokens)
    side = [
        {"question": b["question"], "gold": b["gold"], "base": b["generated"],
         "base_predicted": b["predicted"], "base_correct": b["correct"], "tuned": t["generated"],
         "tuned_predicted": t["predicted"], "tuned_correct": t["correct"]}
        for b, t in zip(base_res["examples"], tuned_res["examples"])
    ]

    def first(pred) -> Path | None:
        return next((runs[lbl] for lbl, techs in reversed(variants) if pred(techs)), None)

    plots: dict[str, str | None] = {}
    plots["loss_per_technique"] = plot_loss_per_technique(runs, out / "loss_per_technique.png")
    alr_run = first(lambda t: "alr" in t)
    plots["lr_vs_complexity"] = plot_lr_vs_complexity(alr_run, out / "lr_vs_complexity.png") if alr_run else None
    ewc_run = first(lambda t: "ewc" in t)
    fisher = None
    if ewc_run is not None and (ewc_run / "fisher.json").is_file():
        fisher = json.loads((ewc_run / "fisher.json").read_text(encoding="utf-8"))
        plots["fisher_per_layer"] = plot_fisher_per_layer(fisher, out / "fisher_per_layer.png")
    heb_runs = {lbl: runs[lbl] for lbl, t in variants if "hebbian" in t}
    plots["hebbian_norms"] = plot_hebbian_norms(heb_runs, out / "hebbian_norms.png") if heb_runs else None
    plots["forgetting_curves"] = plot_forgetting(runs, out / "forgetting_curves.png")
    plots = {k: str(v) for k, v in plots.items() if v is not None}
    result = {
        "model": model_name,
        "tasks": {"A": data, "B": task_b},
        "steps": tuned_cfg.train.max_steps if tuned_cfg else 0,
        "variants": rows,
        "tuned_variant": tuned_label,
        "base_accuracy": base_res["accuracy"],
        "tuned_accuracy": tuned_res["accuracy"],
        "side_by_side": side,
        "plots": plots,
        "runs": {k: str(v) for k, v in runs.items()},
    }
    (out / "demo_results.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result
