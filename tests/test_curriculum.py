from __future__ import annotations

import pytest
import torch

from neuroplastic.config import load_config
from neuroplastic.curriculum import Curriculum
from neuroplastic.errors import UserError
from neuroplastic.training import checkpoint as ckpt
from neuroplastic.training.metrics import read_metrics
from neuroplastic.training.trainer import Trainer
from tests.conftest import tiny_overrides


def _cfg(out, **extra):
    vals = {"data.max_chars": 9000, "curriculum.stages": "[definitions, explanations, dialogues]",
            "train.max_steps": 9, "train.ckpt_interval": 4, **extra}
    return load_config("tiny", tiny_overrides("synthetic", out, **vals))


def test_step_schedule_unit():
    c = Curriculum(["a", "b", "c"], max_steps=90)
    assert [c.stage_for_step(s) for s in (0, 29, 30, 59, 60, 89)] == [0, 0, 1, 1, 2, 2]
    c = Curriculum(["a", "b"], max_steps=100, boundaries=[0.8])
    assert c.stage_for_step(79) == 0 and c.stage_for_step(80) == 1


def test_plateau_schedule_unit():
    c = Curriculum(["a", "b"], max_steps=100, advance="plateau", patience=2, min_delta=0.1)
    assert not c.update(1, 3.0)
    assert not c.update(2, 2.5)  # improved
    assert not c.update(3, 2.45)  # not by min_delta: 1 bad eval
    assert c.update(4, 2.44)  # 2 bad evals -> advance
    assert c.stage == "b" and c.changes == [[4, 1]]
    assert not c.update(5, 9.0) and c.stage == "b"  # last stage stays


def test_trainer_moves_through_stages_and_logs(tmp_path):
    t = Trainer(_cfg(tmp_path / "run"))
    t.train()
    assert t.curriculum.changes == [[3, 1], [6, 2]]
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["name"] for r in recs if r["kind"] == "curriculum"] == ["explanations", "dialogues"]
    ev = [r for r in recs if r["kind"] == "eval"][-1]
    assert {"definitions/loss", "explanations/loss", "dialogues/loss", "stage_loss"} <= set(ev)


@pytest.mark.parametrize("cumulative", [False, True])
def test_resume_across_stage_boundary_is_exact(tmp_path, cumulative):
    extra = {"curriculum.cumulative": cumulative}
    straight = Trainer(_cfg(tmp_path / "a", **extra))
    straight.train()
    part1 = Trainer(_cfg(tmp_path / "b", **extra))
    part1.train(stop_at=5)  # checkpoint at 4 (stage 1), then crosses into nothing new before 6
    part2 = Trainer(_cfg(tmp_path / "b", **{**extra, "train.resume": "auto"}))
    part2.train()
    assert part2.resumed_from.name == ckpt.checkpoint_name(4)
    combined = [h["loss"] for h in part1.history[:4]] + [h["loss"] for h in part2.history]
    assert combined == [h["loss"] for h in straight.history]
    assert part2.curriculum.changes == straight.curriculum.changes
    for a, b in zip(straight.model.parameters(), part2.model.parameters()):
        assert torch.equal(a, b)


def test_resume_with_other_curriculum_is_refused(tmp_path):
    Trainer(_cfg(tmp_path / "a")).train(stop_at=4)
    with pytest.raises(UserError, match="curriculum"):
        Trainer(_cfg(tmp_path / "a", **{"train.resume": "auto",
                                        "curriculum.stages": "[definitions, dialogues]"})).setup()


def test_unknown_stage_is_clear(tmp_path):
    with pytest.raises(UserError, match="definitions"):
        Trainer(_cfg(tmp_path / "a", **{"curriculum.stages": "[definitons]"})).setup()


def test_stage_alternatives_fall_back_to_what_is_available(tmp_path, text_file):
    from neuroplastic.config import DataConfig
    from neuroplastic.data.pipeline import stage_documents
    from neuroplastic.data.synthetic import SyntheticCurriculum

    cfg = DataConfig(source="curriculum")
    docs = stage_documents(cfg, [f"{tmp_path / 'absent.txt'}|synthetic:definitions", str(text_file)])
    first, second = docs.values()
    assert first[0] == SyntheticCurriculum(seed=0).documents("definitions")
    assert "The heart is an organ" in second[0][0]


def test_alphas_follow_the_stage_and_need_a_model_with_decay(tmp_path):
    with pytest.raises(UserError, match="alphas"):
        Trainer(_cfg(tmp_path / "a", **{"curriculum.alphas": "[0.1, 0.5, 0.99]"})).setup()
    with pytest.raises(UserError, match="one value per stage"):
        _cfg(tmp_path / "b", **{"curriculum.alphas": "[0.1, 0.5]"})
