"""``neuroplastic cot train | evaluate | demo``: flags and output of the neuroplastic-cot commands.

Part of the command line (:mod:`neuroplastic.cli` adds the ``cot`` parser from here and
calls :func:`run_cot`); the work is done by :mod:`neuroplastic.recipes.cot_app`. Every
flag of the seed system is accepted with underscores (``--model_name``) and hyphens
(``--model-name``).
"""

from __future__ import annotations

import argparse
import json
import math
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from neuroplastic.errors import UserError


def _names(name: str) -> list[str]:
    """``--model_name`` -> ``["--model_name", "--model-name"]``."""
    alt = name.replace("_", "-")
    return [name] if alt == name else [name, alt]


def _add(p: argparse.ArgumentParser, name: str, **kw: Any) -> None:
    p.add_argument(*_names(name), **kw)


def _techniques(p: argparse.ArgumentParser) -> None:
    _add(p, "--use_alr", action="store_true", help="adaptive learning rate by reasoning complexity")
    _add(p, "--use_ewc", action="store_true", help="elastic weight consolidation across tasks")
    _add(p, "--use_hebbian", action="store_true", help="Hebbian (Oja) learning on the LoRA activations")
    _add(p, "--use_all", action="store_true", help="all three techniques")


def add_cot_parser(sub: Any, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """The ``cot`` command with its ``train``, ``evaluate`` and ``demo`` subcommands."""
    c = sub.add_parser(
        "cot", help="chain-of-thought fine-tuning with adaptive LR, EWC and Hebbian (train, evaluate, demo)",
        description="neuroplastic-cot: chain-of-thought LoRA fine-tuning of a local Hugging Face "
        "causal LM with adaptive learning rate, EWC and Hebbian learning (docs/COT.md).",
    )
    cs = c.add_subparsers(dest="cot_command", metavar="{train,evaluate,demo}",
                          parser_class=type(c))

    t = cs.add_parser("train", help="fine-tune a model on GSM8K-style data with the chosen techniques")
    _add(t, "--model_name", required=True, help="local Hugging Face causal LM directory")
    _add(t, "--output_dir", default="./output", help="run directory (checkpoints, adapter, plots)")
    t.add_argument("--lora", action="store_true", default=True,
                   help="train LoRA adapters (the default, as in the seed)")
    _add(t, "--no_lora", action="store_true", help="full fine-tuning instead of LoRA")
    _techniques(t)
    _add(t, "--data", help="task data: gsm8k (default), a .jsonl with question/answer, or arith")
    _add(t, "--tasks", help="a sequence of tasks trained one after the other, e.g. gsm8k,arith")
    _add(t, "--max_steps", type=int, help="optimizer steps (default: the recipe's 500)")
    _add(t, "--batch_size", type=int, help="examples per micro-batch")
    t.add_argument("--grad_accum", "--grad-accum", "--gradient_accumulation_steps",
                   "--gradient-accumulation-steps", dest="grad_accum", type=int,
                   help="micro-batches per optimizer step")
    _add(t, "--learning_rate", type=float, help="peak learning rate")
    _add(t, "--lora_r", type=int, help="LoRA rank")
    _add(t, "--lora_alpha", type=float, help="LoRA alpha")
    _add(t, "--lora_dropout", type=float, help="LoRA dropout")
    _add(t, "--seed", type=int, help="random seed")
    _add(t, "--complexity", choices=["steps", "operations", "numbers", "tokens", "loss"],
         help="ALR complexity measure of a batch (default steps)")
    _add(t, "--ewc_lambda", type=float, help="EWC strength lambda")
    _add(t, "--ewc_every", type=int, help="also consolidate EWC every N steps within a task")
    _add(t, "--hebbian_lr", type=float, help="Hebbian learning rate")
    _add(t, "--device", help="auto, cpu, cuda, cuda:N")
    _add(t, "--data_dir", help="directory searched first for registry data (gsm8k)")
    t.add_argument("--recipe", default="neuroplastic-cot", help="recipe name or YAML file")
    t.add_argument("--resume", action="store_true", help="continue the run in --output_dir")
    t.add_argument("overrides", nargs="*", help="dotted overrides key=value (e.g. options.max_train=500)")

    e = cs.add_parser("evaluate", help="exact-match accuracy of the final number, per-example records")
    _add(e, "--model_path", required=True,
         help="a `cot train` output dir, a LoRA adapter dir, an HF model dir, or a checkpoint")
    _add(e, "--base_model", help="base model of an adapter (default: the one it was trained on)")
    _add(e, "--output_file", default="evaluation_results.json", help="results JSON")
    _add(e, "--data", help="questions: the run's first task by default, gsm8k, a .jsonl or arith")
    e.add_argument("--split", choices=["val", "all"], default="val",
                   help="val: the held-out questions (as in training); all: every question")
    _add(e, "--num_examples", type=int, default=0, help="evaluate the first N (0: all)")
    _add(e, "--max_new_tokens", type=int, default=256, help="generated tokens per question")
    _add(e, "--batch_size", type=int, default=1,
         help="questions generated at once (greedy, left padding; Hugging Face models)")
    e.add_argument("--loglik", action="store_true",
                   help="also the log-likelihood of the reference answers (moves before exact match)")
    e.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    _add(e, "--top_p", type=float, help="nucleus sampling when --temperature > 0")
    _add(e, "--device", default="auto", help="auto, cpu, cuda, cuda:N")
    _add(e, "--data_dir", help="directory searched first for registry data")

    d = cs.add_parser("demo", help="train each technique on task A then B; base vs tuned reasoning; plots")
    _add(d, "--model_name", help="local Hugging Face causal LM directory, or `tiny` (random tiny Qwen2)")
    _techniques(d)
    _add(d, "--num_examples", type=int, default=10, help="held-out questions shown side by side")
    _add(d, "--output_dir", default="neuroplasticity_demo_results", help="results and plots")
    _add(d, "--seed", type=int, default=42, help="random seed")
    _add(d, "--steps", type=int, default=100, help="training steps per run")
    _add(d, "--data", default="gsm8k", help="task A: gsm8k, a .jsonl with question/answer, or arith")
    _add(d, "--task_b", default="arith", help="task B (trained after A): arith, arith-mul or data")
    _add(d, "--max_new_tokens", type=int, default=256, help="generated tokens per question")
    _add(d, "--data_dir", help="directory searched first for registry data")
    d.add_argument("overrides", nargs="*", help="dotted overrides for every run (e.g. train.batch_size=2)")
    for p in (t, e, d):
        p.set_defaults(func=func)
    c.set_defaults(func=func)
    return c


# =========================================================================== commands


def _train_overrides(args: argparse.Namespace) -> list[str]:
    ov: list[str] = []
    pairs = [
        ("max_steps", "train.max_steps"), ("batch_size", "train.batch_size"),
        ("grad_accum", "train.grad_accum"), ("learning_rate", "train.lr"), ("seed", "train.seed"),
        ("lora_r", "model.lora.r"), ("lora_alpha", "model.lora.alpha"),
        ("lora_dropout", "model.lora.dropout"), ("complexity", "options.complexity"),
        ("ewc_every", "options.ewc_every"), ("device", "train.device"),
        ("data_dir", "data.data_dir"),
    ]
    for attr, key in pairs:
        value = getattr(args, attr, None)
        if value is not None:
            ov.append(f"{key}={value}")
    if args.learning_rate is not None:
        ov.append(f"train.min_lr={args.learning_rate / 10}")
    if args.resume:
        ov.append("train.resume=auto")
    return ov + list(args.overrides)


def _set_rule_option(cfg, kind: str, key: str, value: Any) -> None:
    for rule in cfg.plasticity.rules:
        if rule.get("type") == kind:
            rule[key] = value


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.4f}"
    return str(v)


def _cmd_train(args, echo, table) -> int:
    from neuroplastic.recipes.cot_app import cot_config, techniques_from_flags, train_cot

    techniques = techniques_from_flags(args.use_alr, args.use_ewc, args.use_hebbian, args.use_all)
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if args.data and tasks:
        raise UserError("Give either --data (one task) or --tasks (a sequence), not both.")
    if args.data:
        tasks = [args.data]
    cfg = cot_config(args.output_dir, model_name=args.model_name, techniques=techniques,
                     lora=not args.no_lora, tasks=tasks, recipe=args.recipe,
                     overrides=_train_overrides(args))
    if args.ewc_lambda is not None:
        _set_rule_option(cfg, "ewc", "lam", args.ewc_lambda)
    if args.hebbian_lr is not None:
        _set_rule_option(cfg, "hebbian", "lr", args.hebbian_lr)
    what = ", ".join(r["type"] for r in cfg.plasticity.rules) or "none (baseline)"
    print(f"neuroplastic cot train: {args.model_name} "
          f"({'LoRA ' + json.dumps(cfg.model.hf.lora) if cfg.model.hf.lora else 'full fine-tune'}), "
          f"techniques: {what}, {cfg.train.max_steps} steps")
    res = train_cot(cfg, echo=echo)
    print(f"trained {res['steps']} steps in {res['elapsed_s']:.0f} s "
          f"({res['trainable_params']:,} trainable parameters, {res['consolidations']} EWC "
          "consolidation(s))")
    rows = [[f"{name} ({spec})", _fmt(res["task_losses"][name])] for name, spec in res["tasks"].items()]
    print(table(rows, ["task", "held-out loss"]))
    print(f"run dir: {res['run_dir']}")
    if res["export"]:
        print(f"  model:  {res['export']}")
    for name, path in res["plots"].items():
        print(f"  plot:   {path} ({name})")
    print(f"next: neuroplastic cot evaluate --model_path {res['run_dir']} --output_file "
          f"{Path(res['run_dir']) / 'results.json'}")
    return 0


def _device(spec: str) -> str:
    if spec == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec


def _cmd_evaluate(args, echo, table) -> int:
    from neuroplastic.recipes.cot_app import evaluate_model

    res = evaluate_model(
        args.model_path, args.output_file, base_model=args.base_model, data=args.data,
        split=args.split, num_examples=args.num_examples, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, device=_device(args.device),
        data_dir=args.data_dir, batch_size=args.batch_size, loglik=args.loglik,
    )
    print(f"model: {res['model']['kind']} {res['model']['model_path']}")
    print(f"data: {res['data']}; {'chat template' if res['chat_template'] else 'plain prompt'}, "
          f"{'greedy' if not res['temperature'] else 'T=' + str(res['temperature'])}, "
          f"{res['max_new_tokens']} new tokens")
    print(table([["exact match (final number)", f"{res['accuracy']:.4f}"],
                 ["correct / total", f"{res['correct']} / {res['n']}"],
                 ["with a final number", f"{res['answered']} / {res['n']}"],
                 *([["reference log-lik per token", _fmt(res["mean_solution_ll"])],
                    ["log-lik of '#### N'", _fmt(res["mean_final_ll"])]]
                   if "mean_solution_ll" in res else [])], ["metric", "value"]))
    print(f"results and per-example records: {res['output_file']}")
    return 0


def _side_by_side(item: dict[str, Any], width: int = 48) -> str:
    def col(text: str) -> list[str]:
        lines: list[str] = []
        for para in (text or "(empty)").splitlines() or [""]:
            lines.extend(textwrap.wrap(para, width) or [""])
        return lines

    def verdict(pred, ok) -> str:
        return f"answer {pred if pred is not None else '-'}, {'right' if ok else 'wrong'}"

    left = [f"BASE ({verdict(item['base_predicted'], item['base_correct'])})", *col(item["base"])]
    right = [f"TUNED ({verdict(item['tuned_predicted'], item['tuned_correct'])})", *col(item["tuned"])]
    n = max(len(left), len(right))
    left += [""] * (n - len(left))
    right += [""] * (n - len(right))
    rows = [f"{a.ljust(width)} | {b}" for a, b in zip(left, right)]
    head = textwrap.fill(f"Q: {item['question']}", 2 * width + 3)
    return "\n".join([head, f"(gold: {item['gold']})", *rows])


def _cmd_demo(args, echo, table) -> int:
    from neuroplastic.recipes.cot_app import run_demo, techniques_from_flags

    techniques = techniques_from_flags(args.use_alr, args.use_ewc, args.use_hebbian, args.use_all)
    if not techniques:
        echo("no technique flag given: showing all three (as --use_all)")
        techniques = techniques_from_flags(False, False, False, True)
    if args.steps <= 0:
        raise UserError("--steps must be a positive integer.")
    res = run_demo(
        args.output_dir, model_name=args.model_name, techniques=techniques,
        num_examples=args.num_examples, seed=args.seed, steps=args.steps, data=args.data,
        task_b=args.task_b, max_new_tokens=args.max_new_tokens, overrides=args.overrides,
        data_dir=args.data_dir, echo=echo,
    )
    print()
    print(f"neuroplastic cot demo: {res['model']}; task A {res['tasks']['A']}, then task B "
          f"{res['tasks']['B']}; {res['steps']} steps per run")
    keys = [k for k in ("train_loss_end", "task_a_loss_after_a", "task_a_loss_end", "forgetting")
            if any(k in r for r in res["variants"])]
    extra = sorted({k for r in res["variants"] for k in r if k.endswith("_loss_end")
                    and k not in keys})
    rows = [[r["variant"], *[_fmt(r.get(k, math.nan)) for k in keys + extra]] for r in res["variants"]]
    print(table(rows, ["variant", *keys, *extra]))
    print()
    print(f"Reasoning on {len(res['side_by_side'])} held-out task-A questions: base model vs "
          f"tuned ({res['tuned_variant']}); accuracy {res['base_accuracy']:.2f} -> "
          f"{res['tuned_accuracy']:.2f}")
    for item in res["side_by_side"]:
        print()
        print(_side_by_side(item))
    print()
    out = Path(args.output_dir)
    print(f"results: {out / 'demo_results.json'}")
    for name, path in res["plots"].items():
        print(f"  plot: {path} ({name})")
    return 0


def run_cot(args: argparse.Namespace, echo: Callable[[str], None], table: Callable) -> int:
    sub = getattr(args, "cot_command", None)
    if sub == "train":
        return _cmd_train(args, echo, table)
    if sub == "evaluate":
        return _cmd_evaluate(args, echo, table)
    if sub == "demo":
        return _cmd_demo(args, echo, table)
    raise UserError("Name a cot command: neuroplastic cot train, evaluate or demo (see --help).")
