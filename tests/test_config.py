from __future__ import annotations

import dataclasses

import pytest
import yaml

from neuroplastic.config import (
    ModelConfig,
    all_keys,
    config_from_dict,
    dump_config,
    load_config,
    parse_override,
)
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


# ----------------------------------------------------------------- the model config's sections

# the model section of a config.yaml as the code wrote it before ModelConfig had sections
# (`model.arch=hebbian model.window=16 model.lora={r: 8} model.hf_path=some/dir` on tiny)
OLD_FLAT_MODEL = """\
model:
  arch: hebbian
  vocab_size: 0
  block_size: 128
  n_layer: 4
  n_head: 4
  n_embd: 128
  dropout: 0.0
  bias: false
  norm: rmsnorm
  pos: rope
  rope_theta: 10000.0
  tie_weights: true
  mlp_ratio: 4.0
  window: 16
  memory_heads: 0
  memory_rule: hebbian
  feature_map: elu1
  chunk_size: 64
  conv_size: 0
  conv_init: random
  memory_qkv: shared
  decay_logit_init: []
  beta_bias: null
  alpha: 1.0
  hf_path: some/dir
  allow_hub: false
  trust_remote_code: false
  lora:
    r: 8
  gradient_checkpointing: false
  load_in_4bit: false
  load_in_8bit: false
"""

FLAT = ["model.n_layer=3", "model.window=16", "model.hf_path=some/dir", "model.lora={r: 8}",
        "model.alpha=0.5", "model.pos=learned", "model.arch=gpt"]
NESTED = ["model.gpt.n_layer=3", "model.hebbian.window=16", "model.hf.path=some/dir",
          "model.hf.lora={r: 8}", "model.hebbian.alpha=0.5", "model.gpt.pos=learned", "model.arch=gpt"]


def test_flat_and_nested_overrides_give_equal_configs():
    flat, nested = load_config("tiny", FLAT), load_config("tiny", NESTED)
    assert flat == nested
    m = flat.model
    assert (m.gpt.n_layer, m.gpt.pos, m.hebbian.window, m.hebbian.alpha) == (3, "learned", 16, 0.5)
    assert (m.hf.path, m.hf.lora) == ("some/dir", {"r": 8})
    assert flat != load_config("tiny")  # the overrides did something
    assert m == ModelConfig.from_flat(
        arch="gpt", block_size=128, n_layer=3, n_embd=128, window=16, hf_path="some/dir",
        lora={"r": 8}, alpha=0.5, pos="learned")
    # a sub-key of a flat mapping key lands in its section too
    assert load_config("tiny", ["model.lora.r=4", "model.hf.lora.alpha=16"]).model.hf.lora == {"r": 4, "alpha": 16}
    # the model=PATH shortcut
    assert load_config("tiny", ["model=some/dir"]).model.hf.path == "some/dir"
    # the same setting both ways with the same value is fine
    assert load_config("tiny", ["model.n_layer=3", "model.gpt.n_layer=3"]).model.gpt.n_layer == 3


def test_flat_and_nested_recipe_files_give_equal_configs(tmp_path):
    flat, nested = tmp_path / "flat.yaml", tmp_path / "nested.yaml"
    flat.write_text("model: {n_layer: 3, window: 16, hf_path: some/dir, lora: {r: 8}, alpha: 0.5}\n")
    nested.write_text("model: {gpt: {n_layer: 3}, hebbian: {window: 16, alpha: 0.5}, "
                      "hf: {path: some/dir, lora: {r: 8}}}\n")
    a, b = load_config(str(flat)), load_config(str(nested))
    assert a.model == b.model and (a.model.gpt.n_layer, a.model.hf.path) == (3, "some/dir")
    # an override in the other spelling replaces the recipe's value (no conflict)
    assert load_config(str(nested), ["model.n_layer=5"]).model.gpt.n_layer == 5
    assert load_config(str(flat), ["model.gpt.n_layer=5"]).model.gpt.n_layer == 5
    # a child recipe in one spelling over a base in the other
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {flat}\nmodel: {{gpt: {{n_layer: 6}}, hebbian: {{window: 8}}}}\n")
    c = load_config(str(child)).model
    assert (c.gpt.n_layer, c.hebbian.window, c.hebbian.alpha, c.hf.path) == (6, 8, 0.5, "some/dir")
    child.write_text(f"base: {nested}\nmodel: {{n_layer: 6, window: 8}}\n")
    assert load_config(str(child)).model == c


def test_config_yaml_is_nested_and_old_flat_config_yaml_loads():
    cfg = load_config("tiny", FLAT)
    text = dump_config(cfg)
    saved = yaml.safe_load(text)["model"]
    assert saved["gpt"]["n_layer"] == 3 and saved["hf"]["path"] == "some/dir" and "n_layer" not in saved
    assert config_from_dict(yaml.safe_load(text)) == cfg
    old = config_from_dict(yaml.safe_load(OLD_FLAT_MODEL)).model
    now = load_config("tiny", ["model.arch=hebbian", "model.hebbian.window=16", "model.hf.lora={r: 8}",
                               "model.hf.path=some/dir"]).model
    assert old == now
    # what the resume check compares: the old flat config and the same settings nested
    assert config_from_dict(yaml.safe_load(OLD_FLAT_MODEL)).to_dict()["model"] == dataclasses.asdict(now)


def test_flat_and_nested_with_two_values_is_one_error(tmp_path):
    with pytest.raises(UserError, match=r"model\.n_layer=3 and model\.gpt\.n_layer=4 .*same setting"):
        load_config("tiny", ["model.n_layer=3", "model.gpt.n_layer=4"])
    with pytest.raises(UserError, match=r"model\.hf\.path=.*model\.hf_path=.*same setting"):
        load_config("tiny", ["model.hf.path=a", "model.hf_path=b"])
    p = tmp_path / "both.yaml"
    p.write_text("model: {n_layer: 3, gpt: {n_layer: 4}}\n")
    with pytest.raises(UserError, match=r"both\.yaml.*model\.n_layer and model\.gpt\.n_layer .*\(3 and 4\)"):
        load_config(str(p))
    with pytest.raises(UserError, match="same setting"):
        config_from_dict({"model": {"window": 8, "hebbian": {"window": 16}}})
    with pytest.raises(UserError, match="same setting"):
        ModelConfig.from_flat(hf_path="a", hf={"path": "b"})
    # the same value written as 3 and 3.0 is one value
    assert config_from_dict({"model": {"n_layer": 3, "gpt": {"n_layer": 3.0}}}).model.gpt.n_layer == 3


def test_misspelt_keys_name_the_flat_and_nested_spellings(tmp_path):
    with pytest.raises(UserError) as info:
        load_config("tiny", ["model.n_layers=4"])
    assert "'model.n_layer'" in str(info.value) and "'model.gpt.n_layer'" in str(info.value)
    with pytest.raises(UserError, match=r"Unknown config key 'model\.gpt\.n_layers'; did you mean 'model\.gpt\.n_layer'"):
        load_config("tiny", ["model.gpt.n_layers=4"])
    with pytest.raises(UserError, match=r"did you mean 'model\.hebbian\.window'"):
        load_config("tiny", ["model.hebbian.windw=4"])
    p = tmp_path / "r.yaml"
    p.write_text("model: {hf: {pth: x}}\n")
    with pytest.raises(UserError, match=r"Unknown config key 'model\.hf\.pth'; did you mean 'model\.hf\.path'"):
        load_config(str(p))
    p.write_text("model: {gpt: {n_layr: 3}}\n")
    with pytest.raises(UserError, match=r"did you mean 'model\.gpt\.n_layer'"):
        load_config(str(p))
    with pytest.raises(UserError, match=r"Config key 'model\.n_layer' has no sub-keys"):
        load_config("tiny", ["model.n_layer.x=4"])


def test_model_config_has_no_flat_attributes():
    """The sections are where the values live: no delegation, and a stray flat write fails
    instead of setting an attribute nothing reads."""
    m = load_config("tiny").model
    for key in ("n_layer", "window", "hf_path", "lora", "alpha"):
        assert not hasattr(m, key)
    with pytest.raises(AttributeError):
        m.n_layer = 3
    with pytest.raises(AttributeError):
        m.gpt.window = 3
