"""``neuroplastic ablate``: does a plasticity rule help? Same data and budget, with and
without the rule(s), over several seeds, reported with confidence intervals.

For seed ``s`` both arms use ``train.seed = s`` (same initialisation and data order)
and the same data; they differ only in ``plasticity.rules``. When a rule needs a reward
and the recipe computes none, ``reward.interval`` is switched on in *both* arms, so the
reward is measured alike and only its use differs.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from neuroplastic.config import RunConfig, load_config
from neuroplastic.errors import UserError
from neuroplastic.evaluation.ablation import AblationReport, MetricSummary
from neuroplastic.plasticity.registry import rule_class
from neuroplastic.training.trainer import Trainer

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
        totals = [cb.compute(trainer, 10**9 + i)["total"] for i in range(3)]
        out["reward"] = sum(totals) / len(totals)
    if trainer.cfg.data.source == "synthetic" and mc_limit > 0:
        from neuroplastic.evaluation.multiple_choice import GPTScorer, evaluate_task

        scorer = GPTScorer(trainer.model, trainer.tokenizer, trainer.device)
        res = evaluate_task(scorer, "synthetic-mc", limit=mc_limit)
        out["mc_acc_norm"] = res["acc_norm"]
    for cb in trainer.callbacks:  # a recipe's own metrics (e.g. each task's loss)
        extra = getattr(cb, "final_metrics", None)
        if extra is not None:
            out.update(extra(trainer))
    return out


HIGHER_IS_BETTER = {"val_loss": False, "val_bpb": False, "reward": True, "mc_acc_norm": True}


def higher_is_better(name: str) -> bool:
    """Direction of a metric: the table above, else lower for losses / bpb / perplexity."""
    if name in HIGHER_IS_BETTER:
        return HIGHER_IS_BETTER[name]
    return not name.endswith(("loss", "bpb", "ppl"))


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
    if seeds < 2:
        raise UserError("An ablation needs --seeds >= 2 to give a confidence interval.")
    if not rules:
        raise UserError("Name at least one rule to ablate with --rule (e.g. --rule traces).")
    base = load_config(recipe, list(overrides or []))
    out = Path(out_dir or f"runs/ablate-{base.name}-{'+'.join(rules)}")
    without_cfg, with_cfg = arm_configs(base, rules)
    results: dict[str, list[dict[str, float]]] = {"without": [], "with": []}
    seed_list = list(range(seeds))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * seeds, desc="ablation runs", unit="run")
    for s in seed_list:
        for arm, cfg0 in (("without", without_cfg), ("with", with_cfg)):
            cfg = copy.deepcopy(cfg0)
            cfg.train.seed = s
            cfg.train.out_dir = str(out / f"seed{s}-{arm}")
            cfg.train.resume = "none"
            cfg.train.progress = False
            cfg.train.keep_best = False
            cfg.train.tensorboard = False
            cfg.validate()
            shutil.rmtree(cfg.train.out_dir, ignore_errors=True)
            trainer = Trainer(cfg)
            trainer.train()
            m = final_metrics(trainer, mc_limit)
            results[arm].append(m)
            echo(f"seed {s} {arm:>7}: " + ", ".join(f"{k}={v:.4f}" for k, v in m.items()))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    report = AblationReport(
        title=f"ablate {base.name} --rule {' '.join(rules)} --seeds {seeds}",
        rules=rules, seeds=seed_list,
    )
    for name in results["without"][0]:
        report.metrics.append(MetricSummary(
            name, higher_is_better(name),
            [r[name] for r in results["without"]], [r[name] for r in results["with"]],
        ).compute())
    report.notes.append(
        f"Budget per run: {base.train.max_steps} steps x {base.train.batch_size} x "
        f"{base.block_size} tokens; both arms see the same data in the same order per seed."
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(report.markdown(), encoding="utf-8")
    (out / "ablation.json").write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
    report.plot(out / "ablation.png")
    report.out_dir = out  # type: ignore[attr-defined]
    return report

