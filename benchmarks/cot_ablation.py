"""neuroplastic-cot ablation: each technique vs plain LoRA in the continual setting.

For every seed and variant (``baseline`` = LoRA only, ``alr``, ``ewc``, ``hebbian``,
``all``) the model is fine-tuned on task A (``--data``, GSM8K by default) for the first
half of ``--steps`` and on task B (``--task-b``, synthetic arithmetic by default) for the
second half, with the same data order per seed. Reported per variant (mean ± 95% CI over
seeds) and as the paired difference to the baseline with a verdict (the statistics of
``neuroplastic ablate``):

* held-out task-A loss when A ended and after B, and their gap (forgetting);
* held-out task-B loss after B;
* exact-match accuracy on ``--eval-examples`` held-out task-A questions after B
  (greedy generation; 0 skips it) and the untuned model's accuracy for reference.

    python benchmarks/cot_ablation.py --model models/qwen2.5-0.5b-instruct --seeds 3 \\
        --steps 300 --eval-examples 100 --write-docs train.device=cuda
    python benchmarks/cot_ablation.py --model tiny --data arith-mul --task-b arith \\
        --seeds 3 --steps 60 --eval-examples 0 --write-docs      # CPU, a tiny random Qwen2

``--model tiny`` builds a tiny randomly initialised Qwen2 (a BPE tokenizer trained on
the two tasks, 2 layers x 32 dims): it checks the pipeline and shows the mechanics of
each technique on CPU in minutes, not what they do for a real model.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuroplastic.evaluation.ablation import MetricSummary, mean_ci  # noqa: E402
from neuroplastic.recipes.cot_app import (  # noqa: E402
    TECHNIQUES,
    cot_config,
    evaluate_model,
    forgetting_summary,
    make_tiny_model,
    train_cot,
)

DOCS = ROOT / "docs" / "BENCHMARKS.md"
KEY = "cot"
METRICS = [  # name, label, higher is better
    ("task_a_loss_after_a", "task-A loss when A ended", False),
    ("task_a_loss_end", "task-A loss after B", False),
    ("forgetting", "forgetting (after B - when A ended)", False),
    ("task_b_loss_end", "task-B loss after B", False),
    ("acc_a", "task-A accuracy after B", True),
]


def variant_techniques(name: str) -> list[str]:
    if name == "baseline":
        return []
    if name == "all":
        return list(TECHNIQUES)
    if name not in TECHNIQUES:
        raise SystemExit(f"unknown variant {name!r}; use baseline, alr, ewc, hebbian, all")
    return [name]


def fmt(m: float, h: float) -> str:
    if not math.isfinite(m):
        return "n/a"
    return f"{m:.4f} ± {h:.4f}" if math.isfinite(h) else f"{m:.4f}"


def write_section(body: str) -> None:
    text = DOCS.read_text(encoding="utf-8") if DOCS.exists() else "# Benchmarks\n"
    begin, end = f"<!-- begin:{KEY} -->", f"<!-- end:{KEY} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    if begin in text and end in text:
        a, b = text.index(begin), text.index(end) + len(end)
        if text[b : b + 1] == "\n":
            b += 1
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    DOCS.write_text(text, encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="local HF causal LM directory, or `tiny`")
    ap.add_argument("--data", default="gsm8k", help="task A (gsm8k, a .jsonl, arith, arith-mul)")
    ap.add_argument("--task-b", default="arith", help="task B")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per run (A then B)")
    ap.add_argument("--variants", default="baseline,alr,ewc,hebbian,all")
    ap.add_argument("--eval-examples", type=int, default=50, help="held-out task-A questions (0: skip)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--device", default="auto", help="for the accuracy evaluation")
    ap.add_argument("--out", default="runs/cot-ablation")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--write-docs", action="store_true", help=f"write the `{KEY}` section of docs/BENCHMARKS.md")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every run (e.g. train.lr=1e-4)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    model = args.model
    tiny = model == "tiny"
    if tiny:
        from neuroplastic.data.cot import load_cot_examples

        texts = [f"{e.question}\n{e.answer}" for spec in (args.data, args.task_b)
                 for e in load_cot_examples(spec)[:2000]]
        model = str(make_tiny_model(out / "tiny-model", texts, vocab_size=400, hidden=32,
                                    max_positions=256))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        variant_techniques(v)
    from neuroplastic.recipes.cot import task_names

    task_a, task_b = task_names([args.data, args.task_b])
    results: dict[str, list[dict]] = {v: [] for v in variants}
    base_acc = None
    if args.eval_examples:
        res = evaluate_model(model, None, data=args.data, num_examples=args.eval_examples,
                             max_new_tokens=args.max_new_tokens, device=device, progress=False)
        base_acc = res["accuracy"]
        print(f"untuned model: task-A accuracy {base_acc:.4f} ({res['n']} questions)", flush=True)
    for seed in range(args.seeds):
        for v in variants:
            run_dir = out / v / f"seed{seed}"
            cfg = cot_config(run_dir, model_name=model, techniques=variant_techniques(v),
                             tasks=[args.data, args.task_b], overrides=[
                                 f"train.seed={seed}", f"train.max_steps={args.steps}",
                                 "train.progress=false", "train.tensorboard=false",
                                 "train.keep_best=false", *args.overrides])
            t0 = time.perf_counter()
            res = train_cot(cfg, fresh=True, plots=False)
            row = {"seed": seed, "seconds": time.perf_counter() - t0}
            row.update(forgetting_summary(run_dir, task_a))
            row["task_b_loss_end"] = res["task_losses"][task_b]
            if args.eval_examples:
                ev = evaluate_model(run_dir, None, data=args.data, num_examples=args.eval_examples,
                                    max_new_tokens=args.max_new_tokens, device=device, progress=False)
                row["acc_a"] = ev["accuracy"]
            results[v].append(row)
            print(f"seed {seed} {v:>8}: " + ", ".join(
                f"{k}={x:.4f}" for k, x in row.items() if k != "seed"), flush=True)
    elapsed = time.perf_counter() - t_start

    metrics = [m for m in METRICS if all(m[0] in r for rows in results.values() for r in rows)]
    lines = ["| variant | " + " | ".join(label for _, label, _ in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for v in variants:
        cells = [fmt(*mean_ci([r[k] for r in results[v]])) for k, _, _ in metrics]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    diff_lines = ["| variant | metric | difference vs baseline | verdict |", "|---|---|---|---|"]
    summary: dict[str, dict] = {}
    if "baseline" in results:
        for v in variants:
            if v == "baseline":
                continue
            for k, label, hib in metrics:
                ms = MetricSummary(k, hib, [r[k] for r in results["baseline"]],
                                   [r[k] for r in results[v]]).compute()
                summary.setdefault(v, {})[k] = ms.__dict__
                diff_lines.append(f"| {v} | {label} | {fmt(ms.diff_mean, ms.diff_ci)} | {ms.verdict} |")

    from neuroplastic.evaluation.cot import plot_forgetting, plot_loss_per_technique

    docs_png = ROOT / "docs" / "cot_forgetting.png" if args.write_docs else out / "forgetting.png"
    plot_forgetting({v: out / v / "seed0" for v in variants}, docs_png)
    plot_loss_per_technique({v: out / v / "seed0" for v in variants}, out / "loss_per_technique.png")
    (out / "results.json").write_text(json.dumps(
        {"args": vars(args), "model": model, "tasks": [task_a, task_b], "base_acc": base_acc,
         "runs": results, "vs_baseline": summary}, indent=2, default=str), encoding="utf-8")

    cmd = "python benchmarks/cot_ablation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = (f"cpu: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads); "
               f"gpu: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}; "
               f"torch {torch.__version__}; python {platform.python_version()}")
    body = [
        "## neuroplastic-cot: techniques in the continual setting (benchmarks/cot_ablation.py)",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {machine}  ",
        f"Date: {_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC; {elapsed:.0f} s in all",
        "",
    ]
    if tiny:
        body += [
            "**A tiny model, not a real one:** a randomly initialised 2-layer, 32-dim Qwen2 with a "
            "400-token BPE tokenizer trained on the two tasks (`--model tiny`). These numbers "
            "check the pipeline and show the mechanics of each technique on a CPU; they say "
            "nothing about what the techniques do for a pretrained model. **Pending:** the same "
            "table for a real small model (Qwen2.5-0.5B-Instruct or GPT-2), which needs a local "
            "copy of its weights: `python benchmarks/cot_ablation.py --model DIR --seeds 3 "
            "--steps 300 --eval-examples 100 --write-docs train.device=cuda`.",
            "",
        ]
    body += [
        f"Task A: `{args.data}`, then task B: `{args.task_b}`, {args.steps} steps in all (half each), "
        f"{args.seeds} seeds, variants paired by seed (same initialisation and data order). Losses "
        "are mean cross-entropy per answer token on held-out questions (lower is better); mean ± "
        "95% CI (Student t).",
        "",
        *lines,
        "",
        "Paired difference to the baseline (variant − baseline), verdict as in `neuroplastic ablate`:",
        "",
        *diff_lines,
    ]
    if base_acc is not None:
        body += ["", f"Untuned model's task-A accuracy: {base_acc:.4f}."]
    body += ["", "![task losses over training, seed 0](cot_forgetting.png)" if args.write_docs else ""]
    text = "\n".join(body).rstrip() + "\n"
    print()
    print(text)
    if args.write_docs:
        write_section(text)
        print(f"wrote the `{KEY}` section of {DOCS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
