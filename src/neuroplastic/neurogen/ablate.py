"""``neuroplastic neurogen ablate``: which of the brain's mechanisms matter?

For every seed the full brain and, per mechanism, the brain with that mechanism switched
off (``BrainConfig.<mechanism> = False``) train on the same windows of the same corpus for
the same number of steps; the held-out loss of each pair is compared with the project's
ablation statistics (:mod:`neuroplastic.evaluation.ablation`: paired difference, 95% CI,
verdict "helps" / "hurts" / "no detectable effect").

Every run counts the training steps on which each mechanism acted (:class:`MechanismCounter`,
read from the brain's own counters and activity after every step). A mechanism that never
acted in the full brain's runs (replay every 50 steps in a 5-step run) gets "did not act in
this budget", never a verdict: its arms can differ only by chance.

Each finished run is kept in ``OUT/runs/seedS-ARM.json``. Ctrl-C / SIGTERM stop the
ablation after the current step; the table marks the cut run, gives no verdict while a
seed is incomplete, and the exit code is 130 / 143. Running the same command again keeps the
finished runs and runs the others (a run restarts from its first step: the same seed and
windows give the same result). Only an unfinished ablation is continued
(``OUT/ablation.incomplete``); after a complete one every run is measured anew.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from neuroplastic.errors import UserError
from neuroplastic.evaluation.ablation import (
    NOT_ACTED,
    AblationReport,
    ArmRun,
    MetricSummary,
    StopSignals,
    begin_ablation,
    end_ablation,
    no_verdict_incomplete,
)
from neuroplastic.models.brain import MECHANISMS

#: what "acted" means for each mechanism, on one training step (in the arm that has it on)
ACTED_MEANS = {
    "thalamic_gating": "the mean thalamic gate was below 1",
    "working_memory": "PFC winners persisted to the next token",
    "hippocampus": "an episode was recalled",
    "basal_ganglia": "basal-ganglia neurons fired (gating Broca)",
    "embedding_relay": "the gated token embedding reached the readout",
    "three_factor": "the three-factor update was non-zero",
    "tagging": "updates went to early-phase weights or tagged ones were captured",
    "homeostasis": "synaptic scaling was applied",
    "replay": "a replay (consolidation) event ran",
}


class MechanismCounter:
    """On how many training steps each mechanism acted, read from a
    :class:`~neuroplastic.neurogen.model.NeuroGenModel` after every ``train_step``
    (call it as ``on_step(step, loss)``); see :data:`ACTED_MEANS`."""

    def __init__(self, model):
        self.model = model
        self.counts = dict.fromkeys(MECHANISMS, 0)
        self._last = self._events()

    def _events(self) -> tuple[int, int, int]:
        m = self.model
        return m.replay.events, m.tagging.captures, m.scaling.applied

    def __call__(self, step: int = 0, loss: float = 0.0) -> None:
        m = self.model
        cfg, st = m.cfg, m.activity_stats
        events, captures, applied = self._events()
        (prev_events, prev_captures, prev_applied), self._last = self._last, (events, captures, applied)
        gate = float(st.get("thalamic_gate", 1.0))
        three = bool(cfg.three_factor) and m.three_factor.last_update_norm > 0
        acted = {
            "thalamic_gating": cfg.thalamic_gating and gate < 1.0,
            "working_memory": cfg.working_memory and st.get("working_memory_persistence", 0.0) > 0,
            "hippocampus": cfg.hippocampus and st.get("recall_rate", 0.0) > 0,
            "basal_ganglia": cfg.basal_ganglia and st.get("firing_rate", {}).get("basal_ganglia", 0.0) > 0,
            "embedding_relay": cfg.embedding_relay and gate > 0,
            "three_factor": three,
            "tagging": cfg.tagging and (three or captures > prev_captures),
            "homeostasis": cfg.homeostasis and applied > prev_applied,
            "replay": cfg.replay and events > prev_events,
        }
        for k, v in acted.items():
            self.counts[k] += int(bool(v))


class _Stop(Exception):
    """Raised from a run's step hook when the ablation was asked to stop."""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


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
    """Run the ablation (see the module docs); the result's ``exit_code`` is 0 when every run
    completed, 130 / 143 when Ctrl-C / SIGTERM stopped it, 1 when a run failed."""
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
    out = Path(out_dir)
    settings = json.loads(json.dumps({
        "data": data, "data_dir": data_dir, "tokenizer": tokenizer, "steps": steps, "batch": batch,
        "seq_len": seq_len, "embedding_dim": embedding_dim, "overrides": base, "val_seqs": val_seqs,
    }, default=str))
    arms = ["full", *mechanisms]
    plan = [(s, arm) for s in range(seeds) for arm in arms]
    runs: list[ArmRun] = []
    stopped = False
    resuming = begin_ablation(out)
    if resuming:
        echo(f"continuing the unfinished ablation in {out}: completed runs with the same settings are kept")
    with StopSignals() as signals:
        for i, (s, arm) in enumerate(plan):
            run = ArmRun(seed=s, arm=arm, max_steps=steps)
            if stopped or signals.signum is not None:
                stopped = True
                runs.append(run)  # "not run"
                continue
            path = out / "runs" / f"seed{s}-{arm}.json"
            prev = _read_json(path) if resuming else None
            if prev is not None and prev.get("settings") == settings and prev["run"].get("status") == "complete":
                try:
                    kept = ArmRun(**prev["run"])
                    echo(f"seed {s} {arm:>16}: held-out loss {kept.metrics['val_loss']:.4f} (kept from {path})")
                except (TypeError, KeyError):  # written by another version: run it again
                    kept = None
                if kept is not None:
                    runs.append(kept)
                    continue
            cfg = dict(base, seed=s)
            if arm != "full":
                cfg[arm] = False
            model = NeuroGenModel(corpus.vocab_size, embedding_dim, -1, **cfg)
            counter = MechanismCounter(model)
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=steps, desc=f"run {i + 1}/{len(plan)} seed {s} {arm}", unit="step",
                           dynamic_ncols=True, leave=False, mininterval=0.1 if sys.stderr.isatty() else 15.0)

            def on_step(step: int, loss: float, _counter=counter, _bar=bar, _run=run) -> None:
                _counter(step, loss)
                _run.step = step
                if _bar is not None:
                    _bar.update(1)
                    _bar.set_postfix(loss=f"{loss:.4f}")
                if signals.signum is not None and step < steps:
                    raise _Stop

            try:
                r = train_fixed(model, corpus, steps, batch, seq_len, seed=1000 + s, val=val, on_step=on_step)
            except _Stop:
                run.status = "interrupted"
            except Exception as exc:  # noqa: BLE001 - the run failed: mark it, the ablation goes on
                run.status, run.detail = "failed", str(exc).split("\n")[0][:300]
            else:
                run.status, run.step = "complete", r.steps
                run.metrics = {"val_loss": r.val_loss, "tokens_per_s": r.tokens_per_s}
                run.acted = dict(counter.counts)
            finally:
                if bar is not None:
                    bar.close()
            if run.complete:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"settings": settings, "run": dict(run.__dict__)}, indent=2),
                                encoding="utf-8")
                echo(f"seed {s} {arm:>16}: held-out loss {run.metrics['val_loss']:.4f} "
                     f"({run.metrics['tokens_per_s']:,.0f} tokens/s)")
            else:
                echo(f"seed {s} {arm:>16}: {run.describe()}")
                stopped = stopped or run.status == "interrupted"
            runs.append(run)
        exit_code = signals.exit_code
    report = AblationReport(
        title=f"neurogen ablate {' '.join(mechanisms)} --seeds {seeds}",
        rules=mechanisms, seeds=list(range(seeds)), runs=runs,
    )
    done = report.complete_seeds()
    by = {(r.seed, r.arm): r for r in runs}
    results = {a: [by[(s, a)].metrics["val_loss"] for s in done] for a in arms}
    speeds = {a: [by[(s, a)].metrics["tokens_per_s"] for s in done] for a in arms}
    acted = {a: [by[(s, a)].acted for s in done] for a in arms}
    for m in mechanisms:
        # "with" = the full brain, "without" = mechanism off: difference < 0 means it helps
        summary = MetricSummary(m, False, results[m], results["full"]).compute()
        if len(done) < seeds:
            summary.verdict = no_verdict_incomplete(len(done), seeds)
        elif all(a[m] == 0 for a in acted["full"]):
            summary.verdict = NOT_ACTED
        report.metrics.append(summary)
    report.notes.append(
        f"Metric: held-out loss (nats/token) on {len(val[0])} x {seq_len} tokens of {corpus.description}; "
        f"each run {steps} steps x {batch} streams x {seq_len} tokens; 'with' = full brain, "
        f"'without' = that mechanism off, paired by seed (same init seed and data windows). "
        f"'acted': on how many of the full brain's {steps} steps per seed the mechanism did something "
        "(" + "; ".join(f"{m}: {ACTED_MEANS[m]}" for m in mechanisms) + "); a mechanism that never "
        f"acted gets '{NOT_ACTED}' instead of a verdict."
    )
    if stopped:
        report.exit_code = exit_code
    elif any(not r.complete for r in runs):
        report.exit_code = 1
    end_ablation(out, complete=report.exit_code == 0)
    md = _markdown(report, results, speeds, acted, steps)
    (out / "ablation.md").write_text(md, encoding="utf-8")
    (out / "ablation.json").write_text(json.dumps({
        "report": report.to_dict(), "losses": results, "tokens_per_s": speeds, "acted": acted,
        "settings": {"data": data, "tokenizer": tokenizer, "steps": steps, "batch": batch, "seq_len": seq_len,
                     "embedding_dim": embedding_dim, "overrides": base, "seeds": seeds},
    }, indent=2), encoding="utf-8")
    png = out / "ablation.png"
    if done:
        plot_ablation(report, png)
    else:
        png.unlink(missing_ok=True)
        png = None
    return {"report": report, "markdown": md, "out_dir": out, "png": png, "losses": results, "acted": acted,
            "exit_code": report.exit_code}


def _markdown(report: AblationReport, results: dict[str, list[float]], speeds: dict[str, list[float]],
              acted: dict[str, list[dict[str, int]]], steps: int) -> str:
    from neuroplastic.evaluation.ablation import mean_ci

    def f(m: float, h: float) -> str:
        if not math.isfinite(m):
            return "n/a"
        return f"{m:.4f} ± {h:.4f}" if math.isfinite(h) else f"{m:.4f}"

    full_m, full_h = mean_ci(results["full"])
    lines = [
        f"### {report.title}",
        "",
        f"Full brain: held-out loss {f(full_m, full_h)} (mean ± 95% CI over seeds "
        f"{', '.join(map(str, report.complete_seeds())) or 'none complete'}).",
        "",
        report.status_line(),
        "",
        "| mechanism off | held-out loss | full − off (paired) | verdict for the mechanism | acted (steps of "
        f"{steps}, full brain, per seed) | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for m in report.metrics:
        sp = speeds[m.name]
        sp_text = f"{sum(sp) / len(sp):,.0f}" if sp else "n/a"
        counts = ", ".join(str(a[m.name]) for a in acted["full"]) or "n/a"
        lines.append(f"| {m.name} | {f(m.without_mean, m.without_ci)} | {f(m.diff_mean, m.diff_ci)} | "
                     f"{m.verdict} | {counts} | {sp_text} |")
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
