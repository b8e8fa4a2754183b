"""``neuroplastic neurogen ablate``: which of the brain's mechanisms matter?

For every seed the full brain and, per mechanism, the brain with that mechanism switched
off (``BrainConfig.<mechanism> = False``) train on the same windows of the same corpus for
the same number of steps; the held-out loss of each pair is compared with the project's
ablation statistics (:mod:`neuroplastic.evaluation.ablation`: paired difference, 95% CI,
verdict "helps" / "hurts" / "no detectable effect").
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from neuroplastic.errors import UserError
from neuroplastic.evaluation.ablation import AblationReport, MetricSummary
from neuroplastic.models.brain import MECHANISMS


def run_neurogen_ablation(
    mechanisms: list[str],
    seeds: int = 3,
    data: str = "tinyshakespeare",
    tokenizer: str = "byte",
    steps: int = 60,
    batch: int = 32,
    seq_len: int = 64,
    embedding_dim: int = 128,
    overrides: dict[str, Any] | None = None,
    out_dir: str | Path = "runs/neurogen-ablate",
    data_dir: str | None = None,
    val_seqs: int = 64,
    echo: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, Any]:
    from neuroplastic.neurogen.experiment import heldout_blocks, load_corpus, train_fixed
    from neuroplastic.neurogen.model import NeuroGenModel

    unknown = [m for m in mechanisms if m not in MECHANISMS]
    if unknown:
        raise UserError(f"Unknown mechanism {unknown[0]!r}; choose from {', '.join(MECHANISMS)}.")
    if not mechanisms:
        raise UserError(f"Name at least one mechanism to ablate ({', '.join(MECHANISMS)}), or 'all'.")
    if seeds < 2:
        raise UserError("An ablation needs --seeds >= 2 to give a confidence interval.")
    if steps < 1 or batch < 1 or seq_len < 1:
        raise UserError("--steps, --batch-size and --seq-len must be positive integers.")
    corpus = load_corpus(data, tokenizer, data_dir=data_dir)
    val = heldout_blocks(corpus.val, seq_len, val_seqs)
    base = dict(overrides or {})
    arms = ["full", *mechanisms]
    results: dict[str, list[float]] = {a: [] for a in arms}
    speeds: dict[str, list[float]] = {a: [] for a in arms}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=seeds * len(arms), desc="neurogen ablation", unit="run")
    for s in range(seeds):
        for arm in arms:
            cfg = dict(base, seed=s)
            if arm != "full":
                cfg[arm] = False
            model = NeuroGenModel(corpus.vocab_size, embedding_dim, -1, **cfg)
            r = train_fixed(model, corpus, steps, batch, seq_len, seed=1000 + s, val=val)
            results[arm].append(r.val_loss)
            speeds[arm].append(r.tokens_per_s)
            echo(f"seed {s} {arm:>16}: held-out loss {r.val_loss:.4f} ({r.tokens_per_s:,.0f} tokens/s)")
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    summaries = []
    for m in mechanisms:
        # "with" = the full brain, "without" = mechanism off: difference < 0 means it helps
        summaries.append(MetricSummary(m, False, results[m], results["full"]).compute())
    report = AblationReport(
        title=f"neurogen ablate {' '.join(mechanisms)} --seeds {seeds}",
        rules=mechanisms, seeds=list(range(seeds)), metrics=summaries,
    )
    report.notes.append(
        f"Metric: held-out loss (nats/token) on {len(val[0])} x {seq_len} tokens of {corpus.description}; "
        f"each run {steps} steps x {batch} streams x {seq_len} tokens; 'with' = full brain, "
        f"'without' = that mechanism off, paired by seed (same init seed and data windows)."
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = _markdown(report, results, speeds)
    (out / "ablation.md").write_text(md, encoding="utf-8")
    (out / "ablation.json").write_text(json.dumps({
        "report": report.to_dict(), "losses": results, "tokens_per_s": speeds,
        "settings": {"data": data, "tokenizer": tokenizer, "steps": steps, "batch": batch, "seq_len": seq_len,
                     "embedding_dim": embedding_dim, "overrides": base, "seeds": seeds},
    }, indent=2), encoding="utf-8")
    png = plot_ablation(report, out / "ablation.png")
    return {"report": report, "markdown": md, "out_dir": out, "png": png, "losses": results}


def _markdown(report: AblationReport, results: dict[str, list[float]], speeds: dict[str, list[float]]) -> str:
    from neuroplastic.evaluation.ablation import mean_ci

    def f(m: float, h: float) -> str:
        return f"{m:.4f} ± {h:.4f}" if math.isfinite(h) else f"{m:.4f}"

    full_m, full_h = mean_ci(results["full"])
    lines = [
        f"### {report.title}",
        "",
        f"Full brain: held-out loss {f(full_m, full_h)} (mean ± 95% CI over seeds {', '.join(map(str, report.seeds))}).",
        "",
        "| mechanism off | held-out loss | full − off (paired) | verdict for the mechanism | tokens/s |",
        "|---|---|---|---|---|",
    ]
    for m in report.metrics:
        sp = sum(speeds[m.name]) / len(speeds[m.name])
        lines.append(f"| {m.name} | {f(m.without_mean, m.without_ci)} | {f(m.diff_mean, m.diff_ci)} | "
                     f"{m.verdict} | {sp:,.0f} |")
    for n in report.notes:
        lines += ["", n]
    return "\n".join(lines) + "\n"


def plot_ablation(report: AblationReport, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = report.metrics
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(ms) + 1.6), dpi=110)
    ys = range(len(ms))
    colors = ["C2" if m.verdict == "helps" else "C3" if m.verdict == "hurts" else "0.5" for m in ms]
    ax.errorbar([m.diff_mean for m in ms], list(ys), xerr=[m.diff_ci if math.isfinite(m.diff_ci) else 0 for m in ms],
                fmt="none", ecolor="0.3", capsize=4)
    ax.scatter([m.diff_mean for m in ms], list(ys), c=colors, zorder=3)
    ax.axvline(0, color="0.6", lw=1)
    ax.set_yticks(list(ys), [f"{m.name} ({m.verdict})" for m in ms])
    ax.set_xlabel("held-out loss: full brain − mechanism off\n(nats/token; < 0: the mechanism helps; 95% CI)")
    ax.set_title(f"NeuroGen ablation, {len(report.seeds)} paired seeds", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
