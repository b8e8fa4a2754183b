"""controlled-generation: the policy-gradient reward loss has the right sign."""

from __future__ import annotations

import numpy as np
import pytest

from neuroplastic.config import load_config
from neuroplastic.errors import UserError
from neuroplastic.rewards import register_term
from neuroplastic.rewards.combined import available_terms
from neuroplastic.training.metrics import read_metrics
from neuroplastic.training.trainer import Trainer
from tests.conftest import tiny_overrides

if "toy_short" not in available_terms():
    register_term("toy_short", lambda pred, ref, ppl: 1.0 - min(len(pred) / 24.0, 1.0))


def _run(tmp_path, text_file, lam, steps=40):
    over = tiny_overrides(text_file, tmp_path / f"lam{lam}", **{
        "train.max_steps": steps, "train.lr": 0.01, "train.warmup_steps": 0,
        "train.eval_interval": 0, "train.ckpt_interval": 0,
        "recipe_module": "controlled_generation",
        "options": ("{lam: " + str(lam) + ", samples_per_prompt: 6, prompts_per_step: 2,"
                    " max_new_tokens: [24], entropy_weight: 0.0, weights: {toy_short: 1.0},"
                    " temperature: 1.0}"),
    })
    t = Trainer(load_config("tiny", over))
    t.train()
    recs = [r for r in read_metrics(t.logger.path) if r["kind"] == "control"]
    lens = [r["gen_len"] for r in recs]
    return float(np.mean(lens[:8])), float(np.mean(lens[-8:])), recs


def test_reward_preferring_short_outputs_shortens_them(tmp_path, text_file):
    first, last, recs = _run(tmp_path, text_file, lam=5.0)
    assert last < first - 4, (first, last)
    assert all("pg_loss" in r and "reward" in r for r in recs)
    first0, last0, _ = _run(tmp_path, text_file, lam=0.0)
    assert last0 > first0 - 2, (first0, last0)  # without the reward loss: no shortening
    assert last < last0 - 4


def test_bad_options_are_clear(tmp_path, text_file):
    base = tiny_overrides(text_file, tmp_path / "x", **{"recipe_module": "controlled_generation"})
    with pytest.raises(UserError, match="samples_per_prompt"):
        Trainer(load_config("tiny", base + ["options.samples_per_prompt=1"])).setup()
    with pytest.raises(UserError, match="options.lamda"):
        Trainer(load_config("tiny", base + ["options.lamda=1"])).setup()
    with pytest.raises(UserError, match="recipe_module"):
        Trainer(load_config("tiny", tiny_overrides(text_file, tmp_path / "y") + ["options.lam=1"])).setup()


def test_evaluate_rewards_before_after_and_compare(tmp_path, text_file):
    import json

    from tests.conftest import run_cli

    runs = []
    for lam in (1.0, 0.0):
        out = tmp_path / f"r{lam}"
        over = tiny_overrides(text_file, out, **{
            "train.max_steps": 2, "recipe_module": "controlled_generation",
            "options": "{lam: " + str(lam) + ", samples_per_prompt: 2, prompts_per_step: 1,"
                       " max_new_tokens: [8], weights: {length: 0.5, bleu: 0.5}}"})
        r = run_cli("train", "tiny", *over)
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(out)
    r = run_cli("evaluate", str(runs[0]), "--task", "rewards", "--compare", str(runs[1]),
                "--limit", "4", "--max-new-tokens", "6", "--output", str(tmp_path / "rw.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    cols = json.loads((tmp_path / "rw.json").read_text())
    assert list(cols) == ["before", "after", runs[1].name]
    assert set(cols["after"]["terms"]) == {"length", "bleu"}
    assert (tmp_path / "rw.png").stat().st_size > 1000
    assert "| total" in r.stdout
