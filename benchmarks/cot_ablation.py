"""neuroplastic-cot ablation: the untuned model, LoRA only and each technique, on GSM8K.

Rows: ``base`` (the untuned model), then one per variant -- ``baseline`` (LoRA only),
``alr``, ``ewc``, ``hebbian``, ``all`` -- each trained ``--seeds`` times in the
continual setting: task A (``--data``, GSM8K by default) for the first half of
``--steps``, then task B (``--task-b``, synthetic arithmetic by default), with the same
data order per seed. Reported per row (mean ± 95% CI over seeds, Student t):

* exact match of the final number on ``--eval-examples`` held-out task-A problems after
  B (greedy, batched generation with left padding, ``--max-new-tokens``, stop at EOS);
* the reference answers' log-likelihood on the same problems (teacher forcing):
  per token of the whole reference, and of its ``#### N`` given the reasoning -- these
  move before exact match does;
* held-out task-A loss when A ended and after B, their gap (forgetting), and the
  task-B loss after B;

and, per variant, the paired difference to ``baseline`` with the verdict of
``neuroplastic ablate``.

The held-out problems are never trained on: the split of
:func:`neuroplastic.data.cot.split_examples` (seed 0; the first ``max(200,
--eval-examples)`` indices of a seeded permutation of the file, 200 of the shared
GSM8K train file's 7,473 by default) is the one the recipe trains without.

Every row is printed as it finishes; ``--out DIR`` gets ``results.json``,
``table.md``, ``forgetting.png`` and ``loss_per_technique.png``.
``--write-docs`` writes the section ``cot-real`` of docs/COT.md from this run;
``--docs-from DIR/results.json`` writes it from an earlier run's JSON (no training).

    # the full table on one GPU (SmolLM2-135M-Instruct; minutes on an H200)
    PYTHONPATH=src python benchmarks/cot_ablation.py --model /path/to/smollm2-135m-instruct \\
        --data-dir data/gsm8k --device cuda --out runs/cot-real
    # end to end on a CPU in a minute or two (5 steps, 4 problems)
    PYTHONPATH=src python benchmarks/cot_ablation.py --model /path/to/smollm2-135m-instruct \\
        --device cpu --seeds 1 --steps 4 --eval-examples 4 --max-new-tokens 16 \\
        --variants baseline,ewc --out runs/cot-smoke
    # a tiny random Qwen2 (the mechanics only)
    PYTHONPATH=src python benchmarks/cot_ablation.py --model tiny --data arith-mul \\
        --seeds 2 --steps 20 --eval-examples 8 --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _docs import write_section  # noqa: E402

from neuroplastic.evaluation.ablation import MetricSummary, mean_ci  # noqa: E402
from neuroplastic.recipes.cot_app import (  # noqa: E402
    TECHNIQUES,
    cot_config,
    forgetting_summary,
    make_tiny_model,
    train_cot,
)

DOCS = ROOT / "docs" / "COT.md"
KEY = "cot-real"
LABELS = {"base": "base (untuned)", "baseline": "LoRA only", "alr": "+ALR", "ewc": "+EWC",
          "hebbian": "+Hebbian", "all": "all (ALR+EWC+Hebbian)"}
METRICS = [  # key, label, higher is better
    ("em", "exact match", True),
    ("solution_ll", "ref. log-lik / token", True),
    ("final_ll", "log-lik of `#### N`", True),
    ("task_a_loss_after_a", "task-A loss when A ended", False),
    ("task_a_loss_end", "task-A loss after B", False),
    ("forgetting", "forgetting (after B − when A ended)", False),
    ("task_b_loss_end", "task-B loss after B", False),
]


def variant_techniques(name: str) -> list[str]:
    if name == "baseline":
        return []
    if name == "all":
        return list(TECHNIQUES)
    if name not in TECHNIQUES:
        raise SystemExit(f"unknown variant {name!r}; use baseline, alr, ewc, hebbian, all")
    return [name]


def fmt(m: float, h: float = math.nan, digits: int = 4) -> str:
    if m is None or not math.isfinite(m):
        return "n/a"
    return f"{m:.{digits}f} ± {h:.{digits}f}" if math.isfinite(h) else f"{m:.{digits}f}"


# =========================================================================== evaluation


def held_out(data: str, data_dir: str | None, n: int, val_fraction: float = 0.05):
    """The first ``n`` held-out task-A problems of the recipe's split (seed 0)."""
    from neuroplastic.data.cot import load_cot_examples, split_examples

    examples = load_cot_examples(data, data_dir)
    _, val = split_examples(examples, val_fraction, 0, max(200, n))
    if len(val) < n:
        raise SystemExit(f"{data!r} has only {len(val)} held-out problems; lower --eval-examples")
    return val[:n]


def evaluate(path, base, examples, args, device) -> dict:
    """Exact match + log-likelihoods of a model dir or a run dir (its adapter on ``base``)."""
    from neuroplastic.data.cot import CotFormatter
    from neuroplastic.evaluation.cot import evaluate_cot
    from neuroplastic.models.loading import load_any_model

    model, tok, _ = load_any_model(path, base, device)
    if hasattr(model.model, "merge_and_unload"):  # a LoRA adapter: merged, generation is faster
        model.model = model.model.merge_and_unload()
    res = evaluate_cot(model, tok, examples, CotFormatter(tok), max_new_tokens=args.max_new_tokens,
                       device=device, progress=args.progress, batch_size=args.eval_batch_size,
                       loglik=True, max_len=args.block_size)
    del model
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    return {"em": res["accuracy"], "correct": res["correct"], "n": res["n"],
            "answered": res["answered"], "solution_ll": res["mean_solution_ll"],
            "final_ll": res["mean_final_ll"], "eval_s": res["seconds"],
            "generation_s": res["generation_seconds"],
            "samples": [{k: r[k] for k in ("question", "gold", "generated", "predicted", "correct")}
                        for r in res["examples"][:3]]}


def read_cot_rows(run_dir: Path) -> list[dict]:
    from neuroplastic.training.metrics import read_metrics

    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "cot"]


def mechanism_counts(run_dir: Path) -> dict[str, int]:
    """Steps in which each technique acted: ALR's multiplier was not 1, EWC's penalty
    was > 0, the Hebbian update was non-zero (from the run's ``metrics.jsonl``)."""
    rows = read_cot_rows(run_dir)

    def count(key, test):
        return sum(1 for r in rows if isinstance(r.get(key), (int, float)) and test(r[key]))

    return {"alr": count("lr_multiplier", lambda x: abs(x - 1.0) > 1e-9),
            "ewc": count("ewc_penalty", lambda x: x > 0),
            "hebbian": count("hebbian_update_norm", lambda x: x > 0)}


def row_line(label: str, row: dict) -> str:
    parts = [f"EM {row['em']:.4f} ({row['correct']}/{row['n']})",
             f"ll/token {fmt(row.get('solution_ll'))}", f"ll(#### N) {fmt(row.get('final_ll'))}"
             ] if "em" in row else []
    for k, name in (("task_a_loss_after_a", "A loss@A"), ("task_a_loss_end", "A loss@end"),
                    ("forgetting", "forgetting"), ("task_b_loss_end", "B loss@end")):
        if k in row:
            parts.append(f"{name} {fmt(row[k])}")
    for k in ("train_s", "eval_s"):
        if k in row:
            parts.append(f"{k} {row[k]:.1f}")
    return f"{label:>24}: " + ", ".join(parts)


# =========================================================================== report


def summarize(results: dict) -> dict:
    """Per-row mean ± CI and the paired differences to the baseline."""
    summary, diffs = {}, {}
    for v, rows in results["runs"].items():
        summary[v] = {k: mean_ci([r[k] for r in rows if r.get(k) is not None
                                  and math.isfinite(r[k])]) for k, _, _ in METRICS}
    base_rows = results["runs"].get("baseline")
    if base_rows:
        for v, rows in results["runs"].items():
            if v == "baseline":
                continue
            for k, _label, hib in METRICS:
                pairs = [(a[k], b[k]) for a, b in zip(base_rows, rows)
                         if a.get(k) is not None and b.get(k) is not None
                         and math.isfinite(a[k]) and math.isfinite(b[k])]
                if not pairs:
                    continue
                ms = MetricSummary(k, hib, [a for a, _ in pairs], [b for _, b in pairs]).compute()
                acted = [sum(r.get("acted", {}).values()) for r in rows]
                verdict = ms.verdict if not acted or any(acted) else "did not act in this budget"
                diffs.setdefault(v, {})[k] = {"diff_mean": ms.diff_mean, "diff_ci": ms.diff_ci,
                                              "verdict": verdict}
    return {"summary": summary, "vs_baseline": diffs}


def markdown(results: dict, png: str | None = "cot_real_forgetting.png") -> str:
    meta = results["meta"]
    stats = summarize(results)
    n_eval = meta["eval_examples"]
    # a run with --eval-examples 0 has no exact match or log-likelihood columns
    metrics = [m for m in METRICS if n_eval or m[0] not in ("em", "solution_ll", "final_ll")]
    head = ["row"] + [label for _, label, _ in metrics]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---|" * len(metrics)]
    base = results.get("base")
    if base:
        cells = [fmt(base.get(k)) if k in ("em", "solution_ll", "final_ll") else "—"
                 for k, _, _ in metrics]
        cells[0] = f"{base['em']:.4f} ({base['correct']}/{base['n']})"
        lines.append(f"| {LABELS['base']} | " + " | ".join(cells) + " |")
    for v in results["runs"]:
        s = stats["summary"][v]
        lines.append(f"| {LABELS.get(v, v)} | " + " | ".join(fmt(*s[k]) for k, _, _ in metrics) + " |")
    diff_lines = ["| variant | metric | variant − LoRA only | verdict |", "|---|---|---|---|"]
    for v, per in stats["vs_baseline"].items():
        for k, label, _ in metrics:
            if k in per:
                d = per[k]
                diff_lines.append(f"| {LABELS.get(v, v)} | {label} | "
                                  f"{fmt(d['diff_mean'], d['diff_ci'])} | {d['verdict']} |")
    times = [r.get("train_s", 0.0) for rows in results["runs"].values() for r in rows]
    label = meta.get("model_label") or Path(str(meta["model"])).name
    title = ("SmolLM2-135M-Instruct on GSM8K" if "smollm2" in label.lower() and meta["data"] == "gsm8k"
             else f"{label} on {meta['data']}")
    device = meta.get("device") or ("cpu" if "device cpu;" in meta.get("machine", "") else "")
    if device == "cpu" or not n_eval:
        title += " (" + ", ".join(x for x in ("CPU" if device == "cpu" else "",
                                               "" if n_eval else "losses only") if x) + ")"
    evaluation = (
        f"Exact match and log-likelihoods on the first {n_eval} held-out task-A problems "
        f"(never trained on; `split_examples`, seed 0), after task B; greedy, "
        f"{meta['max_new_tokens']} new tokens at most. Log-likelihoods in nats (higher is "
        "better): per token of the whole reference answer, and summed over the tokens of its "
        "`#### N` given the prompt and the reference reasoning. " if n_eval else
        "No generation or answer log-likelihood in this run (`--eval-examples 0`). ")
    body = [
        f"## Measured: {title} (benchmarks/cot_ablation.py)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}  ",
        f"Date: {meta['date']} UTC; {meta['elapsed_s']:.0f} s in all "
        f"({sum(times):.0f} s of training summed over runs, mean "
        f"{meta.get('step_s', math.nan):.3f} s per optimizer step with the run's evaluations)",
        "",
        f"Task A `{meta['data']}` for {meta['steps'] // 2} steps, then task B `{meta['task_b']}` for "
        f"{meta['steps'] - meta['steps'] // 2} (LoRA r=8, {meta['batch_size']} × {meta['grad_accum']} "
        f"examples a step, lr {meta['lr']}), {meta['seeds']} seeds, variants paired by seed. "
        f"{evaluation}Losses: held-out cross-entropy "
        f"per answer token on {meta['loss_examples']} problems per task (lower is better). "
        "Mean ± 95% CI over seeds (Student t).",
        "",
        *lines,
        "",
        "Paired difference to LoRA only (same seed), verdict as in `neuroplastic ablate`:",
        "",
        *diff_lines,
    ]
    acted = []
    for v, rows in results["runs"].items():
        counts: dict[str, list[int]] = {}
        for r in rows:
            for t, n in r.get("acted", {}).items():
                counts.setdefault(t, []).append(n)
        if counts:
            acted.append(f"{LABELS.get(v, v)}: " + ", ".join(
                f"{t} {'/'.join(map(str, ns))}" for t, ns in counts.items()))
    pens = {v: [r["ewc_penalty_end"] for r in rows if "ewc_penalty_end" in r]
            for v, rows in results["runs"].items()}
    pens = {v: p for v, p in pens.items() if p}
    if pens:
        body += ["", f"EWC (lambda {meta.get('ewc_lambda', 100.0):g}) penalty at the last step, "
                 "per seed: " + "; ".join(f"{LABELS.get(v, v)} " + ", ".join(f"{x:.3g}" for x in p)
                                          for v, p in pens.items()) + "."]
    if acted:
        body += ["", "Steps in which each technique acted (per seed; ALR multiplier ≠ 1, EWC "
                 "penalty > 0 -- only after the switch to task B --, Hebbian update ≠ 0): "
                 + "; ".join(acted) + "."]
    if png:
        body += ["", f"![task losses over training, seed 0]({png})"]
    return "\n".join(body).rstrip() + "\n"


def png_name(key: str) -> str:
    """The forgetting plot's file name beside the docs for section ``key``."""
    return f"{key.replace('-', '_')}_forgetting.png"


def write_outputs(results: dict, out: Path, docs: Path | None, key: str = KEY) -> str:
    from neuroplastic.evaluation.cot import plot_forgetting, plot_loss_per_technique

    runs = {LABELS.get(v, v): out / v / "seed0" for v in results["runs"]}
    png = plot_forgetting(runs, out / "forgetting.png")
    plot_loss_per_technique(runs, out / "loss_per_technique.png")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    text = markdown(results, png_name(key) if docs is not None and png else None)
    (out / "table.md").write_text(text, encoding="utf-8")
    if docs is not None:
        publish(results, out, docs, key)
    return text


def publish(results: dict, out: Path, docs: Path, key: str = KEY) -> None:
    """Write the docs section, copy the forgetting plot beside the docs, and keep the
    results as ``results/<key>.json`` there: a later session copies it into an ``--out``
    folder as ``results.json`` to ``--add`` variants to the same table."""
    import shutil

    png = out / "forgetting.png"
    has_png = png.is_file()
    if has_png:
        shutil.copyfile(png, docs.parent / png_name(key))
    kept = docs.parent / "results" / f"{key}.json"
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    write_section(docs, key, markdown(results, png_name(key) if has_png else None),
                  title="# neuroplastic-cot")


# =========================================================================== runs


def run_seed(seed, args, model, variants, examples, common, device, out, t_start, task_a, task_b):
    """Train and evaluate every variant for one seed; each row is printed and written
    to ``out/rows/seed<S>-<variant>.json`` as it finishes."""
    rows = []
    (out / "rows").mkdir(parents=True, exist_ok=True)
    for v in variants:
        if args.budget_s and time.perf_counter() - t_start > args.budget_s:
            print(f"seed {seed} {v}: skipped, --budget-s {args.budget_s} reached", flush=True)
            continue
        run_dir = out / v / f"seed{seed}"
        cfg = cot_config(run_dir, model_name=model, techniques=variant_techniques(v),
                         tasks=[args.data, args.task_b],
                         overrides=[*common, f"train.seed={seed}", *args.overrides])
        if args.ewc_lambda is not None:
            for rule in cfg.plasticity.rules:
                if rule.get("type") == "ewc":
                    rule["lam"] = args.ewc_lambda
        t0 = time.perf_counter()
        res = train_cot(cfg, fresh=True, plots=False)
        row: dict = {"seed": seed, "variant": v, "train_s": time.perf_counter() - t0,
                     "steps": res["steps"], "interrupted": res["interrupted"],
                     "step_s": res["elapsed_s"] / max(1, res["steps"])}
        row["acted"] = {t: n for t, n in mechanism_counts(run_dir).items()
                        if t in variant_techniques(v)}
        penalties = [r["ewc_penalty"] for r in read_cot_rows(run_dir) if "ewc_penalty" in r]
        if penalties:
            row["ewc_penalty_end"] = penalties[-1]
        row.update(forgetting_summary(run_dir, task_a))
        row["task_b_loss_end"] = res["task_losses"][task_b]
        if examples:
            row.update(evaluate(run_dir, model, examples, args, device))
        (out / "rows" / f"seed{seed}-{v}.json").write_text(json.dumps(row, default=str),
                                                         encoding="utf-8")
        rows.append(row)
        print(row_line(f"seed {seed} {LABELS.get(v, v)}", row), flush=True)
    return rows


def run_workers(args, argv, out: Path, model: str, while_waiting=None) -> list[dict]:
    """One process per seed (``--workers``), at most ``--workers`` at a time; a small
    model leaves a GPU mostly idle, so seeds in parallel fill it."""
    import subprocess

    base_argv = list(sys.argv[1:] if argv is None else argv)
    procs: list[tuple[int, subprocess.Popen]] = []
    pending = list(range(args.seeds))
    failed = []
    while pending or procs:
        while pending and len(procs) < args.workers:
            seed = pending.pop(0)
            cmd = [sys.executable, str(Path(__file__).resolve()), *base_argv, "--model", model,
                   "--only-seed", str(seed), "--no-base"]
            procs.append((seed, subprocess.Popen(cmd)))
        if while_waiting is not None:  # the untuned model's row, while the workers train
            while_waiting()
            while_waiting = None
        time.sleep(0.5)
        for seed, p in list(procs):
            if p.poll() is not None:
                procs.remove((seed, p))
                if p.returncode != 0:
                    failed.append(seed)
                    print(f"worker for seed {seed} failed (exit {p.returncode})", flush=True)
    rows = []
    for f in sorted((out / "rows").glob("seed*-*.json")):
        rows.append(json.loads(f.read_text(encoding="utf-8")))
    return [r for r in rows if r["seed"] < args.seeds]


# settings that must match for rows of two runs to share one table
SAME = ("model", "data", "task_b", "steps", "device", "batch_size", "grad_accum", "lr",
        "eval_examples", "max_new_tokens", "loss_examples", "overrides", "ewc_lambda")


def rows_to_keep(out: Path, meta: dict, variants: list[str]) -> tuple[dict, list[dict]]:
    """``--add``: the earlier run's results and the rows to keep (its other variants,
    seeds below ``--seeds``); one sentence if there is none or its settings differ."""
    src = out / "results.json"
    if not src.is_file():
        raise SystemExit(f"--add: no earlier run in {out} (no results.json); run without --add first")
    earlier = json.loads(src.read_text(encoding="utf-8"))

    def value(m: dict, k: str):
        if k == "device" and not m.get(k):  # runs before the key existed name it in "machine"
            return "cpu" if "device cpu;" in m.get("machine", "") else None
        return m.get(k)

    differ = [k for k in SAME if value(earlier["meta"], k) != value(meta, k)]
    if differ:
        k = differ[0]
        raise SystemExit(f"--add: the run in {out} has {k}={value(earlier['meta'], k)!r}, this "
                         f"one {value(meta, k)!r}; rows of different settings cannot share a table")
    kept = [r for v, rs in earlier["runs"].items() if v not in variants for r in rs
            if r["seed"] < meta["seeds"]]
    missing = [f"{v}/seed{s}" for v in {r["variant"] for r in kept} for s in range(meta["seeds"])
               if not any(r["variant"] == v and r["seed"] == s for r in kept)]
    if missing:
        raise SystemExit(f"--add: the run in {out} has no row for {', '.join(sorted(missing))} "
                         f"(it had fewer seeds); use --seeds {earlier['meta']['seeds']} or fewer")
    return earlier, kept


# =========================================================================== pack


def pack_model(src: str, dst: str, shard_mb: int, data_dir: str | None) -> int:
    """A bfloat16 copy of ``src`` in shards of at most ``shard_mb`` MB (for a machine
    reached through size-limited transfers), with GSM8K beside it when found."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    dst_p = Path(dst)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model.save_pretrained(dst_p / "model", max_shard_size=f"{shard_mb}MB")
    AutoTokenizer.from_pretrained(src).save_pretrained(dst_p / "model")
    if data_dir:
        from neuroplastic.data import registry

        gsm = registry.resolve("gsm8k", data_dir)
        (dst_p / "data" / "gsm8k").mkdir(parents=True, exist_ok=True)
        for f in Path(gsm).parent.iterdir():
            if f.is_file():
                shutil.copyfile(f, dst_p / "data" / "gsm8k" / f.name)
    for f in sorted(dst_p.rglob("*")):
        if f.is_file():
            print(f"{f.stat().st_size / 2**20:8.1f} MiB  {f}")
    return 0


# =========================================================================== main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="local HF causal LM directory, or `tiny`")
    ap.add_argument("--data", default="gsm8k", help="task A (gsm8k, a .jsonl, arith, arith-mul)")
    ap.add_argument("--task-b", default="arith", help="task B")
    ap.add_argument("--model-label", help="the model's name in the table (default: its folder's)")
    ap.add_argument("--data-dir", help="folder searched first for registry data (a copy of "
                    "shared/data/gsm8k, or its parent)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run (A then B)")
    ap.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (LoRA)")
    ap.add_argument("--block-size", type=int, default=512, help="prompt + answer tokens per example")
    ap.add_argument("--loss-examples", type=int, default=32,
                    help="held-out problems per task in the loss curves")
    ap.add_argument("--variants", default="baseline,alr,ewc,hebbian,all")
    ap.add_argument("--ewc-lambda", type=float,
                    help="EWC strength for the ewc and all variants (default: the recipe's 100)")
    ap.add_argument("--eval-examples", type=int, default=200, help="held-out task-A problems")
    ap.add_argument("--eval-batch-size", type=int, default=200, help="problems generated at once")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--no-base", action="store_true", help="skip the untuned model's row")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (training and evaluation)")
    ap.add_argument("--out", default="runs/cot-ablation")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--progress", action="store_true", help="per-step and per-question bars on stderr")
    ap.add_argument("--write-docs", action="store_true", help="write the --docs-key section of docs/COT.md")
    ap.add_argument("--docs-key", default=KEY, help=f"the docs section to write (default {KEY}; "
                    "another name keeps that table, e.g. cot-real-cpu for a CPU run)")
    ap.add_argument("--docs-from", metavar="RESULTS_JSON",
                    help="only write the docs section from an earlier run's results.json")
    ap.add_argument("--docs-file", default=str(DOCS), help="the docs file (default docs/COT.md)")
    ap.add_argument("--workers", type=int, default=1,
                    help="seeds trained in parallel processes (a GPU: 3 fills it better than 1)")
    ap.add_argument("--budget-s", type=float, default=0,
                    help="start no new run after this many seconds (0: no limit); the table "
                    "then says which runs are missing")
    ap.add_argument("--add", action="store_true",
                    help="add --variants to the run already in --out (same settings, checked): "
                    "its other variants' rows are kept and paired by seed, the table is rebuilt "
                    "from all of them")
    ap.add_argument("--only-seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--pack-model", nargs=2, metavar=("SRC", "DST"),
                    help="write a bfloat16 copy of SRC in shards to DST/model (and GSM8K from "
                    "--data-dir to DST/data/gsm8k), then exit")
    ap.add_argument("--shard-mb", type=int, default=50, help="shard size for --pack-model")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every run (e.g. train.amp=none)")
    args = ap.parse_args(argv)
    docs = Path(args.docs_file)
    if args.docs_from:
        src = Path(args.docs_from)
        results = json.loads(src.read_text(encoding="utf-8"))
        publish(results, src.parent, docs, args.docs_key)
        print(f"wrote the `{args.docs_key}` section of {docs} from {src}")
        return 0
    if args.pack_model:
        return pack_model(*args.pack_model, args.shard_mb, args.data_dir)
    if not args.model:
        ap.error("--model is required (or --docs-from)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.progress:  # no weight-loading bars between the rows
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    if args.steps < 2 or args.seeds < 1 or args.eval_examples < 0:
        raise SystemExit("--steps must be >= 2, --seeds >= 1 and --eval-examples >= 0 (0: losses only)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    model = args.model
    if model == "tiny":
        from neuroplastic.data.cot import load_cot_examples

        texts = [f"{e.question}\n{e.answer}" for spec in (args.data, args.task_b)
                 for e in load_cot_examples(spec, args.data_dir)[:2000]]
        model = str(make_tiny_model(out / "tiny-model", texts, vocab_size=400, hidden=32,
                                    max_positions=256))
        args.block_size = min(args.block_size, 256)
    model = str(Path(model).expanduser().resolve())
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        variant_techniques(v)
    from neuroplastic.recipes.cot import task_names

    task_a, task_b = task_names([args.data, args.task_b])
    examples = held_out(args.data, args.data_dir, args.eval_examples) if args.eval_examples else []
    # only as many training examples as the run draws (encoding all of GSM8K costs seconds)
    per_task = max(64, (args.steps // 2 + 1) * args.batch_size * args.grad_accum)
    common = [
        f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
        f"train.grad_accum={args.grad_accum}", f"train.lr={args.lr}", f"train.min_lr={args.lr / 10}",
        f"train.warmup_steps={min(15, args.steps // 10)}", f"train.device={device}",
        f"model.block_size={args.block_size}", f"options.max_train={per_task}",
        f"options.max_val={max(200, args.eval_examples)}", f"options.eval_examples={args.loss_examples}",
        f"train.progress={'true' if args.progress else 'false'}", "train.tensorboard=false",
        "train.keep_best=false", "train.sample_tokens=0", f"train.ckpt_interval={args.steps}",
        f"train.eval_interval={max(1, args.steps // 2)}",
    ]
    if args.data_dir:
        common.append(f"data.data_dir={args.data_dir}")
    cmd = "python benchmarks/cot_ablation.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    machine = (f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads); "
               f"gpu: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}; "
               f"device {device}; torch {torch.__version__}; python {platform.python_version()}")
    path = Path(model)
    meta = {"command": cmd, "machine": machine, "model": model, "data": args.data,
            "model_label": args.model_label or (path.parent.name if path.name == "model" else path.name),
            "task_b": args.task_b, "tasks": [task_a, task_b], "steps": args.steps, "device": str(device),
            "seeds": args.seeds, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
            "lr": args.lr, "eval_examples": len(examples), "max_new_tokens": args.max_new_tokens,
            "loss_examples": args.loss_examples, "overrides": list(args.overrides),
            "train_examples_per_task": per_task, "ewc_lambda": args.ewc_lambda or 100.0,
            "date": f"{_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M}"}
    results: dict = {"meta": meta, "base": None, "runs": {v: [] for v in variants}}
    kept: list[dict] = []
    if args.only_seed is None:
        if args.add:
            earlier, kept = rows_to_keep(out, meta, variants)
            results["base"] = earlier.get("base")
            meta["command"] = earlier["meta"]["command"] + "`, then `" + cmd
            meta["earlier_elapsed_s"] = (earlier["meta"].get("earlier_elapsed_s", 0.0)
                                         + earlier["meta"].get("elapsed_s", 0.0))
            order = list(LABELS)
            results["runs"] = {v: [] for v in sorted({r["variant"] for r in kept} | set(variants),
                                                     key=lambda v: order.index(v) if v in order else 99)}
        print(f"{len(examples)} held-out {args.data} problems; {args.seeds} seeds x "
              f"{len(variants)} variants x {args.steps} steps on {device} "
              f"({args.workers} worker(s))" + (f"; {len(kept)} rows kept from the earlier run"
                                               if kept else ""), flush=True)
        rows_dir = out / "rows"
        keep = {f"seed{r['seed']}-{r['variant']}.json" for r in kept}
        if rows_dir.is_dir():
            for f in rows_dir.glob("seed*-*.json"):
                if f.name not in keep:
                    f.unlink()
    def base_row():
        if not args.no_base and examples and results["base"] is None:
            results["base"] = evaluate(model, None, examples, args, device)
            print(row_line(LABELS["base"], results["base"]), flush=True)

    if args.workers > 1 and args.seeds > 1 and args.only_seed is None:
        rows = run_workers(args, argv, out, model, while_waiting=base_row)
    else:
        base_row()
        seeds = [args.only_seed] if args.only_seed is not None else list(range(args.seeds))
        rows = []
        for seed in seeds:
            rows += run_seed(seed, args, model, variants, examples, common, device, out, t_start,
                             task_a, task_b)
        if args.only_seed is not None:  # a worker: its rows are in out/rows/
            return 0
    rows = [r for r in rows if r["variant"] in variants] + kept
    for row in sorted(rows, key=lambda r: r["seed"]):
        results["runs"][row["variant"]].append(row)
    skipped = [f"{v}/seed{s}" for s in range(args.seeds) for v in variants
               if not any(r["seed"] == s and r["variant"] == v for r in rows)]
    if skipped:
        meta["not_run"] = skipped
        print(f"not run (--budget-s {args.budget_s} reached, or a worker failed): "
              + ", ".join(skipped), flush=True)
    results["runs"] = {v: r for v, r in results["runs"].items() if r}
    step_times = [r["step_s"] for rows_ in results["runs"].values() for r in rows_]
    meta["elapsed_s"] = time.perf_counter() - t_start + meta.pop("earlier_elapsed_s", 0.0)
    meta["step_s"] = sum(step_times) / len(step_times) if step_times else math.nan
    text = write_outputs(results, out, docs if args.write_docs else None, args.docs_key)
    print()
    print(text)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'forgetting.png'}")
    if args.write_docs:
        print(f"wrote the `{args.docs_key}` section of {docs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
