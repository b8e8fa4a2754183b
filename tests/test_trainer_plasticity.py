"""Plasticity rules inside the real trainer: exact resume, reward path, errors."""

from __future__ import annotations

import pytest
import torch

from neuroplastic.config import load_config
from neuroplastic.errors import UserError
from neuroplastic.training import checkpoint as ckpt
from neuroplastic.training.metrics import read_metrics
from neuroplastic.training.trainer import Trainer
from tests.conftest import tiny_overrides

RULES = (
    "[{type: traces, params: '*.c_*.weight', plasticity_lr: 0.01, low_rank: true, rank: 2},"
    " {type: ewc, params: '*.weight', lam: 10.0},"
    " {type: hebbian, params: '*.mlp.c_fc', lr: 0.0001},"
    " {type: adaptive_lr, max_mult: 1.5}]"
)


def _cfg(out, **extra):
    vals = {"data.max_chars": 9000, "curriculum.stages": "[definitions, explanations, dialogues]",
            "train.max_steps": 9, "train.ckpt_interval": 4, "plasticity.rules": RULES,
            "reward.interval": 2, "reward.num_prompts": 2, "reward.max_new_tokens": 6, **extra}
    return load_config("tiny", tiny_overrides("synthetic", out, **vals))


def test_resume_with_rules_reward_and_curriculum_is_exact(tmp_path):
    straight = Trainer(_cfg(tmp_path / "a"))
    straight.train()
    recs = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert [r for r in recs if r["kind"] == "reward"], "no reward was computed"
    assert [r for r in recs if r["kind"] == "consolidate"], "EWC did not consolidate at a stage change"
    assert straight.engine.rule("ewc").penalty() is not None

    part1 = Trainer(_cfg(tmp_path / "b"))
    part1.train(stop_at=6)
    part2 = Trainer(_cfg(tmp_path / "b", **{"train.resume": "auto"}))
    part2.train()
    assert part2.resumed_from.name == ckpt.checkpoint_name(4)
    combined = [h["loss"] for h in part1.history[:4]] + [h["loss"] for h in part2.history]
    assert combined == [h["loss"] for h in straight.history]
    for a, b in zip(straight.model.parameters(), part2.model.parameters()):
        assert torch.equal(a, b)
    sa, sb = straight.engine.state_dict(), part2.engine.state_dict()
    assert sa["baseline"] == sb["baseline"]
    for ta, tb in zip(sa["rules"]["traces"]["momentum"], sb["rules"]["traces"]["momentum"]):
        assert torch.equal(ta, tb)


def test_traces_without_reward_change_nothing(tmp_path):
    """Traces with no reward signal must leave training identical to no rule at all."""
    base = {"data.max_chars": 4000, "train.max_steps": 4, "curriculum.stages": "[definitions]"}
    plain = Trainer(_cfg(tmp_path / "p", **{**base, "plasticity.rules": "[]", "reward.interval": 0}))
    plain.train()
    traced = Trainer(_cfg(tmp_path / "t", **{**base, "reward.interval": 0,
                                            "plasticity.rules": "[{type: traces}]"}))
    traced.train()
    for a, b in zip(plain.model.parameters(), traced.model.parameters()):
        assert torch.equal(a, b)


def test_resume_without_the_rules_is_refused(tmp_path):
    Trainer(_cfg(tmp_path / "a")).train(stop_at=4)
    with pytest.raises(UserError, match="plasticity"):
        Trainer(_cfg(tmp_path / "a", **{"train.resume": "auto", "plasticity.rules": "[]"})).setup()
    with pytest.raises(UserError, match="no state for plasticity rule"):
        Trainer(_cfg(tmp_path / "a", **{
            "train.resume": "auto",
            "plasticity.rules": "[{type: traces, params: '*.c_*.weight'}, {type: homeostasis}]"})).setup()


def test_bad_rule_config_is_clear(tmp_path):
    with pytest.raises(UserError, match="traces"):
        Trainer(_cfg(tmp_path / "a", **{"plasticity.rules": "[{type: trace}]"})).setup()
    with pytest.raises(UserError, match="plasticity_lr"):
        Trainer(_cfg(tmp_path / "a", **{"plasticity.rules": "[{type: traces, plasticity_rate: 1}]"})).setup()
    with pytest.raises(UserError, match="matched no parameters"):
        Trainer(_cfg(tmp_path / "a", **{"plasticity.rules": "[{type: traces, params: 'nothing*'}]"})).setup()


def test_replay_batches_are_interleaved_and_resume_exactly(tmp_path):
    extra = {"plasticity.rules": "[{type: consolidation, params: '*.c_fc.weight', replay_capacity: 5}]",
             "plasticity.replay_every": 2, "reward.interval": 0, "curriculum.stages": "[definitions]",
             "data.max_chars": 4000, "train.max_steps": 8}
    straight = Trainer(_cfg(tmp_path / "a", **extra))
    straight.train()
    recs = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if r["kind"] == "train"]
    assert any("replay_loss" in r for r in recs)
    assert len(straight.replay) == 5
    part1 = Trainer(_cfg(tmp_path / "b", **extra))
    part1.train(stop_at=6)
    part2 = Trainer(_cfg(tmp_path / "b", **{**extra, "train.resume": "auto"}))
    part2.train()
    combined = [h["loss"] for h in part1.history[:4]] + [h["loss"] for h in part2.history]
    assert combined == [h["loss"] for h in straight.history]
    for a, b in zip(straight.model.parameters(), part2.model.parameters()):
        assert torch.equal(a, b)


def test_logged_lr_is_the_lr_the_optimizer_used_with_adaptive_lr(tmp_path):
    """AdaptiveLR's multiplier is applied by the trainer: the logged lr is the step's lr."""
    cfg = _cfg(tmp_path / "a", **{
        "train.max_steps": 6, "train.warmup_steps": 0, "train.lr": 0.01, "train.min_lr": 0.01,
        "curriculum.stages": "[definitions]", "reward.interval": 0,
        "plasticity.rules": "[{type: adaptive_lr, sensitivity: 20.0, ema_decay: 0.5, max_mult: 3.0}]"})
    trainer = Trainer(cfg).setup()
    used = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, *_: used.append([g["lr"] for g in opt.param_groups]))
    trainer.train()
    rows = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(rows) == len(used) == 6
    assert [[r["lr"]] * len(u) for r, u in zip(rows, used)] == used
    mults = [r["adaptive_lr/lr_multiplier"] for r in rows]
    assert any(m != 1.0 for m in mults)
    assert all(r["lr"] == pytest.approx(0.01 * m) for r, m in zip(rows, mults))
    assert all(g["lr"] == 0.01 for g in trainer.optimizer.param_groups)  # restored after the step
