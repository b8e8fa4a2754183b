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
        assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head) == (24, 2048, 16)
        assert n > 1.2e9
    assert n > 0


def test_neuroplastic_llm_has_traces_reward_and_curriculum():
    cfg = load_config("neuroplastic-llm")
    assert [r["type"] for r in cfg.plasticity.rules] == ["traces"]
    assert cfg.plasticity.rules[0]["low_rank"] is True
    assert cfg.reward.interval > 0
    assert cfg.curriculum.stages == ["definitions", "explanations", "dialogues"]
