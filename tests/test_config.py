from __future__ import annotations

import pytest

from neuroplastic.config import all_keys, load_config, parse_override
from neuroplastic.errors import UserError


def test_tiny_recipe_loads_with_overrides():
    cfg = load_config("tiny", ["model.n_layer=2", "train.max_steps=200", "train.lr=1e-3"])
    assert cfg.model.gpt.n_layer == 2
    assert cfg.train.max_steps == 200
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.name == "tiny"


def test_unknown_key_names_closest():
    with pytest.raises(UserError, match=r"model\.n_layer"):
        load_config("tiny", ["model.n_layers=4"])
    with pytest.raises(UserError, match=r"train\.max_steps"):
        load_config("tiny", ["train.max_step=4"])
    with pytest.raises(UserError, match="Unknown config key"):
        load_config("tiny", ["modle.n_layer=4"])


def test_wrong_type_says_expected_type():
    with pytest.raises(UserError, match="expects an integer"):
        load_config("tiny", ["model.n_layer=four"])
    with pytest.raises(UserError, match="expects a number"):
        load_config("tiny", ["train.lr=fast"])
    with pytest.raises(UserError, match="expects a boolean"):
        load_config("tiny", ["train.compile=maybe"])


def test_value_checks():
    with pytest.raises(UserError, match="train.lr"):
        load_config("tiny", ["train.lr=-1"])
    with pytest.raises(UserError, match="larger than the model context"):
        load_config("tiny", ["data.block_size=4096"])
    with pytest.raises(UserError, match="divisible"):
        load_config("tiny", ["model.n_embd=130"])
    with pytest.raises(UserError, match="model.norm"):
        load_config("tiny", ["model.norm=batchnorm"])


def test_unknown_recipe_and_bad_override_form():
    with pytest.raises(UserError, match="tiny"):
        load_config("tiyn")
    with pytest.raises(UserError, match="key=value"):
        parse_override("model.n_layer")


def test_recipe_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: {n_layer: 3}\ntrain: {max_steps: 7}\n")
    cfg = load_config(str(p))
    assert (cfg.model.gpt.n_layer, cfg.train.max_steps, cfg.name) == (3, 7, "r")
    p.write_text("model: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(p))
    p.write_text("model: {n_layr: 3}\n")
    with pytest.raises(UserError, match="n_layer"):
        load_config(str(p))


def test_all_keys_are_dotted_leaves():
    keys = all_keys()
    assert "model.n_layer" in keys and "train.lr" in keys and "data.source" in keys
    assert "model.gpt.n_layer" in keys and "model.hf.path" in keys and "model.hf_path" in keys
    assert "model" not in keys and "model.gpt" not in keys


def test_recipe_base_inheritance(tmp_path):
    p = tmp_path / "child.yaml"
    p.write_text("base: tiny\nmodel: {n_layer: 3}\n")
    cfg = load_config(str(p))
    assert cfg.model.gpt.n_layer == 3
    assert cfg.model.gpt.n_embd == load_config("tiny").model.gpt.n_embd  # inherited
    assert cfg.name == "child"
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    with pytest.raises(UserError, match="nest too deeply"):
        load_config(str(loop))


def test_mapping_overrides_keep_the_other_keys():
    cfg = load_config("tiny", ["reward.weights.rouge_l=1.0"])
    assert cfg.reward.weights == {"rouge_l": 1.0, "unique_word_ratio": 0.2, "diversity": 0.2, "perplexity": 0.2}
    cfg = load_config("tiny", ["options.lam=0.3"])
    assert cfg.options == {"lam": 0.3}
