"""``neuroplastic ablate``: does a plasticity rule help? Same data and budget, with and
without the rule(s), over several seeds, reported with confidence intervals.

For seed ``s`` both arms use ``train.seed = s`` (same initialisation and data order)
and the same data; they differ only in ``plasticity.rules``. When a rule needs a reward
and the recipe computes none, ``reward.interval`` is switched on in *both* arms, so the
reward is measured alike and only its use differs.

Every run is recorded in ``OUT/seedS-ARM/ablation_arm.json``: its settings, its status
(``complete``, ``interrupted``, ``failed``), the step it reached, its final metrics and, in
the arm with the rules, on how many steps each ablated rule acted (``Rule.acted``). So:

- a run cut short (SIGTERM, Ctrl-C: the trainer saves a checkpoint and stops) is never
  scored as complete: the ablation stops, writes the table with the run marked, gives no
  verdict while a seed is incomplete, and exits non-zero (130 Ctrl-C, 143 SIGTERM);
  running the same command again keeps the completed runs and continues the cut one from
  its checkpoint (resume is bit-exact, so the result equals an uninterrupted ablation).
  Only an unfinished ablation is continued (``OUT/ablation.incomplete``): after a complete
  one the same command trains every run anew;
- a run that fails is marked and its seed left out; the others still run (and run again
  when the command is repeated);
- a rule that never acted in the arm that has it (EWC that never consolidated, a
  reward-modulated rule that never got a reward) gets "did not act in this budget",
  never a verdict.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from neuroplastic.config import RunConfig, load_config, nest_model_keys
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
from neuroplastic.models import checkpoint_io
from neuroplastic.plasticity.registry import rule_class
from neuroplastic.training.callbacks import Callback, StepContext
from neuroplastic.training.trainer import Trainer

ARM_FILE = "ablation_arm.json"

REWARD_RULES = {"traces", "eligibility", "hebbian"}


def arm_configs(base: RunConfig, rules: list[str]) -> tuple[RunConfig, RunConfig]:
    """(without, with) configs: the rule types in ``rules`` removed / present."""
    for r in rules:
        rule_class(r)  # unknown rule -> UserError with the closest names
    with_cfg = copy.deepcopy(base)
    present = {spec["type"] for spec in with_cfg.plasticity.rules}
    for r in rules:
        if r not in present:
            with_cfg.plasticity.rules.append({"type": r})
    without_cfg = copy.deepcopy(base)
    without_cfg.plasticity.rules = [s for s in base.plasticity.rules if s["type"] not in rules]
    if any(r in REWARD_RULES for r in rules) and base.reward.interval == 0:
        for c in (with_cfg, without_cfg):
            c.reward.interval = 10
    return without_cfg, with_cfg


def final_metrics(trainer: Trainer, mc_limit: int) -> dict[str, float]:
    """Validation loss and bits/byte, mean reward on fixed prompts, synthetic MC accuracy."""
    ev = trainer.evaluate()
    out = {"val_loss": ev["loss"], "val_bpb": ev["bpb"]}
    if trainer.cfg.reward.interval > 0:
        from neuroplastic.training.reward import RewardCallback

        cb = next((c for c in trainer.callbacks if isinstance(c, RewardCallback)), None)
        cb = cb or RewardCallback(trainer.cfg.reward)
        # fixed pseudo-steps: the same prompts and sampling seeds in both arms
        totals = [cb.compute(trainer.context, 10**9 + i)["total"] for i in range(3)]
        out["reward"] = sum(totals) / len(totals)
    if trainer.cfg.data.source == "synthetic" and mc_limit > 0:
        from neuroplastic.evaluation.multiple_choice import GPTScorer, evaluate_task

        scorer = GPTScorer(trainer.model, trainer.tokenizer, trainer.device)
        res = evaluate_task(scorer, "synthetic-mc", limit=mc_limit)
        out["mc_acc_norm"] = res["acc_norm"]
    for cb in trainer.callbacks:  # a recipe's own final_metrics(ctx) (e.g. each task's loss)
        extra = getattr(cb, "final_metrics", None)
        if extra is not None:
            out.update(extra(trainer.context))
    return out


HIGHER_IS_BETTER = {"val_loss": False, "val_bpb": False, "reward": True, "mc_acc_norm": True}


def higher_is_better(name: str) -> bool:
    """Direction of a metric: the table above, else lower for losses / bpb / perplexity."""
    if name in HIGHER_IS_BETTER:
        return HIGHER_IS_BETTER[name]
    return not name.endswith(("loss", "bpb", "ppl"))


def rules_acted(trainer: Trainer, rules: list[str]) -> dict[str, int]:
    """Steps on which each ablated rule type acted in this run (0 for a type it lacks)."""
    engine = trainer.engine
    out = {}
    for r in rules:
        cls = rule_class(r)
        out[r] = sum(x.acted for x in engine.rules if isinstance(x, cls)) if engine is not None else 0
    return out


class _RunProgress(Callback):
    """A tqdm bar over one run's steps, named by its seed and arm; chains the signal record."""

    name = "ablate-progress"

    def __init__(self, desc: str, signals: StopSignals, show: bool):
        self.desc = desc
        self.signals = signals
        self.show = show
        self.bar = None

    def on_train_start(self, ctx: StepContext) -> None:
        if self.show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=ctx.cfg.train.max_steps, initial=ctx.step, desc=self.desc,
                            unit="step", dynamic_ncols=True, leave=False,
                            # redraw rarely when stderr is a log file rather than a terminal
                            mininterval=0.1 if sys.stderr.isatty() else 15.0)

    def after_step(self, ctx: StepContext, metrics: dict[str, Any]) -> None:
        self.signals.chain()
        if self.bar is not None:
            self.bar.update(1)
            if "loss" in metrics:
                self.bar.set_postfix(loss=f"{metrics['loss']:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _settings(cfg: RunConfig, mc_limit: int) -> dict[str, Any]:
    """What makes two runs the same run (JSON-normalised): the config less its resume policy."""
    d = cfg.to_dict()
    d["train"].pop("resume", None)
    return json.loads(json.dumps({"config": d, "mc_limit": mc_limit}, default=str))


def _same_settings(saved: Any, settings: dict[str, Any]) -> bool:
    """Whether an arm's saved settings are ``settings``. An arm written before the model
    config had sections (flat ``model:`` keys, ``n_layer``) is compared nested."""
    if saved == settings:
        return True
    try:
        config = saved["config"]
        nested = nest_model_keys(config["model"])
    except (TypeError, KeyError, AttributeError, UserError):
        return False
    again = {**saved, "config": {**config, "model": nested}}
    return json.loads(json.dumps(again, default=str)) == settings


def _read_arm(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_arm(path: Path, settings: dict[str, Any], run: ArmRun) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "run": dict(run.__dict__)}, indent=2), encoding="utf-8")
    tmp.replace(path)


def _run_arm(cfg: RunConfig, run: ArmRun, rules: list[str], mc_limit: int, signals: StopSignals,
             desc: str, progress: bool, echo: Callable[[str], None], resuming: bool) -> ArmRun:
    """Train (or continue, or reuse) one run and score it when it ran its whole budget."""
    arm_dir = Path(cfg.train.out_dir)
    arm_file = arm_dir / ARM_FILE
    settings = _settings(cfg, mc_limit)
    prev = _read_arm(arm_file) if resuming else None
    same = prev is not None and _same_settings(prev.get("settings"), settings)
    if same and prev["run"].get("status") == "complete":
        try:
            done = ArmRun(**prev["run"])
        except TypeError:  # written by another version: run it again
            done = None
        if done is not None:
            echo(f"seed {run.seed} {run.arm:>7}: complete in {arm_dir} (kept)")
            return done
    resume = same and checkpoint_io.latest_checkpoint(arm_dir / "checkpoints") is not None
    if not resume:
        shutil.rmtree(arm_dir, ignore_errors=True)
    cfg.train.resume = "auto" if resume else "none"
    bar = _RunProgress(desc, signals, progress)
    trainer = Trainer(cfg, callbacks=[bar])
    trainer.setup()  # a setting the user can fix: UserError now, before any run is marked
    if resume:
        echo(f"seed {run.seed} {run.arm:>7}: continuing from step {trainer.step} in {arm_dir}")
    run.status = "running"
    _write_arm(arm_file, settings, run)  # a run killed outright (kill -9) continues next time
    summary: dict[str, Any] = {}
    try:
        if trainer.step < run.max_steps:
            summary = trainer.train()
        else:  # killed while it was scored: the last checkpoint is the final state
            trainer.logger.close()
    except Exception as exc:  # noqa: BLE001 - the run failed: mark it, the ablation goes on
        if signals.signum is not None:  # it was stopping on a signal: continue it next time
            run.status = "interrupted"
        else:
            run.status, run.detail = "failed", str(exc).split("\n")[0][:300]
    finally:
        bar.close()
    run.step = trainer.step
    if run.status == "running":
        if summary.get("interrupted") or (signals.signum is not None and run.step < run.max_steps):
            run.status = "interrupted"
        elif run.step < run.max_steps:
            run.status, run.detail = "failed", "stopped before its last step"
        else:
            try:
                run.metrics = final_metrics(trainer, mc_limit)
                run.acted = rules_acted(trainer, rules) if run.arm == "with" else {}
                run.status = "complete"
            except Exception as exc:  # noqa: BLE001
                run.status, run.detail = "failed", "scoring: " + str(exc).split("\n")[0][:300]
    _write_arm(arm_file, settings, run)
    return run


def run_ablation(
    recipe: str,
    rules: list[str],
    seeds: int = 3,
    overrides: list[str] | None = None,
    out_dir: str | Path | None = None,
    mc_limit: int = 200,
    echo: Callable[[str], None] = print,
    progress: bool = True,
) -> AblationReport:
    """Train both arms for every seed and compare them; see the module docs.

    Returns the report (also written as ``ablation.md``/``.json``/``.png`` in ``out_dir``);
    ``report.exit_code`` is 0 when every run completed, 130/143 when the ablation was
    interrupted by Ctrl-C/SIGTERM (run it again to continue), 1 when a run failed.
    """
    if seeds < 2:
        raise UserError("An ablation needs --seeds >= 2 to give a confidence interval.")
    if not rules:
        raise UserError("Name at least one rule to ablate with --rule (e.g. --rule traces).")
    base = load_config(recipe, list(overrides or []))
    out = Path(out_dir or f"runs/ablate-{base.name}-{'+'.join(rules)}")
    without_cfg, with_cfg = arm_configs(base, rules)
    seed_list = list(range(seeds))
    plan = []
    for s in seed_list:
        for arm, cfg0 in (("without", without_cfg), ("with", with_cfg)):
            cfg = copy.deepcopy(cfg0)
            cfg.train.seed = s
            cfg.train.out_dir = str(out / f"seed{s}-{arm}")
            cfg.train.progress = False
            cfg.train.keep_best = False
            cfg.train.tensorboard = False
            cfg.validate()
            plan.append((s, arm, cfg))
    runs: list[ArmRun] = []
    stopped = False
    resuming = begin_ablation(out)
    if resuming:
        echo(f"continuing the unfinished ablation in {out}: completed runs with the same settings are kept")
    with StopSignals() as signals:
        for i, (s, arm, cfg) in enumerate(plan):
            run = ArmRun(seed=s, arm=arm, max_steps=cfg.train.max_steps)
            if stopped or signals.signum is not None:
                stopped = True
                runs.append(run)  # "not run"
                continue
            run = _run_arm(cfg, run, rules, mc_limit, signals, f"run {i + 1}/{len(plan)} seed {s} {arm}",
                           progress, echo, resuming)
            runs.append(run)
            if run.complete:
                echo(f"seed {s} {arm:>7}: " + ", ".join(f"{k}={v:.4f}" for k, v in run.metrics.items()))
            else:
                echo(f"seed {s} {arm:>7}: {run.describe()}")
            if run.status == "interrupted":
                stopped = True
        exit_code = signals.exit_code
    report = AblationReport(
        title=f"ablate {base.name} --rule {' '.join(rules)} --seeds {seeds}",
        rules=rules, seeds=seed_list, runs=runs,
    )
    done = report.complete_seeds()
    by = {(r.seed, r.arm): r for r in runs}
    pairs = [(by[(s, "without")], by[(s, "with")]) for s in done]
    names = list(pairs[0][0].metrics) if pairs else []
    never_acted = [r for r in rules if pairs and all(w.acted.get(r, 0) == 0 for _, w in pairs)]
    for name in names:
        m = MetricSummary(
            name, higher_is_better(name),
            [a.metrics[name] for a, _ in pairs], [b.metrics[name] for _, b in pairs],
        ).compute()
        if len(done) < seeds:
            m.verdict = no_verdict_incomplete(len(done), seeds)
        elif len(never_acted) == len(rules):
            m.verdict = NOT_ACTED
        report.metrics.append(m)
    if never_acted and len(done) == seeds:
        which = ", ".join(never_acted)
        if len(never_acted) == len(rules):
            report.notes.append(
                f"{which} never acted in the runs that have {'it' if len(rules) == 1 else 'them'} "
                f"({NOT_ACTED}): the arms can differ only by chance, so no verdict is given. Give the runs "
                "more steps, or what the rule needs (a reward, a task boundary to consolidate at)."
            )
        else:
            report.notes.append(f"{which} never acted in the runs that have it ({NOT_ACTED}); "
                                "the verdicts are those of the other rules.")
    report.notes.append(
        f"Budget per run: {base.train.max_steps} steps x {base.train.batch_size} x "
        f"{base.block_size} tokens; both arms see the same data in the same order per seed."
    )
    if stopped:
        report.exit_code = exit_code
    elif any(not r.complete for r in runs):
        report.exit_code = 1
    end_ablation(out, complete=report.exit_code == 0)
    (out / "ablation.md").write_text(report.markdown(), encoding="utf-8")
    (out / "ablation.json").write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
    png = out / "ablation.png"
    if report.metrics:
        report.plot(png)
    else:
        png.unlink(missing_ok=True)
    report.out_dir = out  # type: ignore[attr-defined]
    return report
