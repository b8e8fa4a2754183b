from __future__ import annotations

import pytest
import torch

from neuroplastic.config import available_recipes, load_config
from neuroplastic.models import build_model
from neuroplastic.plasticity.registry import build_rule


@pytest.mark.parametrize("name", sorted(available_recipes()))
def test_every_recipe_loads_and_its_rules_build(name):
    cfg = load_config(name)
    for spec in cfg.plasticity.rules:
        build_rule(spec)
    cfg.model.vocab_size = cfg.model.vocab_size or (cfg.data.bpe_vocab_size if cfg.data.tokenizer == "bpe" else 258)
    with torch.device("meta"):
        model = build_model(cfg.model)
    n = sum(p.numel() for p in model.parameters())
    if name == "neuroplastic-llm-seed":
        assert (cfg.model.gpt.n_layer, cfg.model.gpt.n_embd, cfg.model.gpt.n_head) == (24, 2048, 16)
        assert n > 1.2e9
    assert n > 0


def test_neuroplastic_llm_has_traces_reward_and_curriculum():
    cfg = load_config("neuroplastic-llm")
    assert [r["type"] for r in cfg.plasticity.rules] == ["traces"]
    assert cfg.plasticity.rules[0]["low_rank"] is True
    assert cfg.reward.interval > 0
    assert cfg.curriculum.stages == ["definitions", "explanations", "dialogues"]


def test_a_registered_recipe_from_a_yaml_trains(tmp_path, text_file):
    """The worked example of docs/ARCHITECTURE.md ("Adding a recipe"): one YAML naming a
    registered Recipe whose callback sees every step, in the observer phase."""
    from neuroplastic.errors import UserError
    from neuroplastic.recipes import Recipe, register, strategy_for
    from neuroplastic.training.callbacks import OBSERVE, Callback
    from neuroplastic.training.trainer import Trainer
    from tests.conftest import tiny_overrides

    class CountSteps(Callback):
        name = "count_steps"
        phase = OBSERVE

        def __init__(self):
            self.losses: list[float] = []

        def after_step(self, ctx, metrics):
            self.losses.append(metrics["loss"])

    class CountingRecipe(Recipe):
        def callbacks(self, ctx):
            self.made = CountSteps()
            return [self.made]

    recipe = register("throwaway_counting", CountingRecipe())
    yaml_path = tmp_path / "counting.yaml"
    yaml_path.write_text("base: tiny\ndescription: counts its steps\nrecipe_module: throwaway_counting\n")
    cfg = load_config(str(yaml_path), tiny_overrides(text_file, tmp_path / "run", **{
        "train.max_steps": 2, "train.eval_interval": 0, "plasticity.rules": "[{type: hebbian}]"}))
    trainer = strategy_for(cfg).setup()
    assert isinstance(trainer, Trainer)
    assert [type(cb).__name__ for cb in trainer.callbacks] == ["EngineCallback", "CountSteps"]
    summary = trainer.train()
    assert summary["step"] == 2 and len(recipe.made.losses) == 2
    bad = load_config(str(yaml_path), [*tiny_overrides(text_file, tmp_path / "bad"),
                                       "recipe_module=no_such_recipe"])
    with pytest.raises(UserError, match="no_such_recipe"):
        Trainer(bad).setup()
