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
                       " max_new_tokens: [8], weights: {length: 0.5, bleu: 0.5},"
                       " term_options: {length: {target: 6, unit: tokens}}}"})
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


# ------------------------------------------------------------------ issue 14 item 8


def _trainer(tmp_path, text_file, lam, name, **opts):
    import torch

    torch.manual_seed(0)
    options = {"lam": lam, "samples_per_prompt": 4, "prompts_per_step": 2, "max_new_tokens": [16],
               "entropy_weight": 0.0, "weights": {"length": 0.5, "distinct_1": 0.5},
               "term_options": {"length": {"target": 8, "unit": "tokens"}}}
    options.update(opts)
    over = tiny_overrides(text_file, tmp_path / name, **{
        "train.max_steps": 1, "train.warmup_steps": 0, "train.lr": 0.01, "train.grad_clip": 0,
        "train.eval_interval": 0, "train.ckpt_interval": 0, "train.sample_tokens": 0,
        "recipe_module": "controlled_generation"})
    over.append("options=" + repr(options).replace("'", ""))
    return Trainer(load_config("tiny", over)).setup()


def _flat_grad(model):
    import torch

    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_reward_loss_gradient_is_nonzero_and_changes_the_update(tmp_path, text_file):
    import torch

    t = _trainer(tmp_path, text_file, 0.5, "grad")
    cb = t.callbacks[0]
    out = cb.reward_loss(t.context, 0)
    assert out["reward_spread"] > 0  # the k samples of a prompt were scored differently
    out["loss"].backward()
    g_reward = _flat_grad(t.model).clone()
    t.model.zero_grad(set_to_none=True)
    x, y = t.train_data.next_batch()
    t.model(x, y)[1].backward()
    g_ce = _flat_grad(t.model)
    # not a constant added to the loss: a gradient of the order of the CE gradient's. Before
    # advantages were normalised it was ~0.4 % of it and the arms matched to 4 decimals.
    assert g_reward.norm() > 0.1 * g_ce.norm(), (float(g_reward.norm()), float(g_ce.norm()))

    # one optimizer step: with lam > 0 the parameters move differently than with lam = 0
    after = {}
    for lam in (0.5, 0.0):
        tr = _trainer(tmp_path, text_file, lam, f"step{lam}")
        tr.train()
        after[lam] = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
    assert not torch.equal(after[0.5], after[0.0])
    assert (after[0.5] - after[0.0]).abs().max() > 1e-4


def test_length_term_in_tokens_moves_only_with_the_reward_loss(tmp_path, text_file):
    """A run where a real reward term moves: the length term (target 6 tokens, cap 24)."""
    means = {}
    for lam in (2.0, 0.0):
        over = tiny_overrides(text_file, tmp_path / f"len{lam}", **{
            "train.max_steps": 30, "train.lr": 0.01, "train.warmup_steps": 0,
            "train.eval_interval": 0, "train.ckpt_interval": 0, "train.sample_tokens": 0,
            "recipe_module": "controlled_generation",
            "options": ("{lam: " + str(lam) + ", samples_per_prompt: 6, prompts_per_step: 2,"
                        " max_new_tokens: [24], entropy_weight: 0.0, weights: {length: 1.0},"
                        " term_options: {length: {target: 6, unit: tokens}}}")})
        t = Trainer(load_config("tiny", over))
        t.train()
        recs = [r for r in read_metrics(t.logger.path) if r["kind"] == "control"]
        terms = [r["term/length"] for r in recs]
        means[lam] = (float(np.mean(terms[:8])), float(np.mean(terms[-8:])))
    (first, last), (_, last0) = means[2.0], means[0.0]
    assert last > first + 0.15, means  # the reward arm learned to stop near the target
    assert last > last0 + 0.15, means  # and the CE-only arm did not


def test_length_target_above_a_stage_cap_is_refused_at_setup(tmp_path, text_file):
    base = tiny_overrides(text_file, tmp_path / "cap", **{"recipe_module": "controlled_generation"})
    # the old recipe default: 30 words against a 30-token first stage (24 with a 32 context)
    opts = "options={max_new_tokens: [30, 80], term_options: {length: {target: 30}}}"
    with pytest.raises(UserError, match=r"target is 30 words but a stage generates at most 24 tokens"):
        Trainer(load_config("tiny", base + [opts])).setup()
    opts = "options={max_new_tokens: [30], term_options: {length: {target: 25, unit: tokens}}}"
    with pytest.raises(UserError, match="target is 25 tokens"):
        Trainer(load_config("tiny", base + [opts])).setup()
    # the recipe as shipped: 20 tokens, reachable in every stage of its 256-token context
    cfg = load_config("controlled-generation")
    assert cfg.options["term_options"]["length"] == {"target": 20, "unit": "tokens"}
    from neuroplastic.recipes.controlled_generation import options_of

    options_of(cfg).check_length_target(cfg.model.block_size)  # no error
    assert min(options_of(cfg).stage_caps(cfg.model.block_size)) == 30


def test_evaluation_scores_length_in_the_runs_tokens():
    from neuroplastic.recipes.controlled_generation import reward_for

    class Tok:
        def encode(self, text):
            return list(text.encode())  # one token per byte

    cfg2 = load_config("tiny", ["recipe_module=controlled_generation",
                                "options={weights: {length: 1.0}, "
                                "term_options: {length: {target: 5, unit: tokens}}}"])
    r = reward_for(cfg2, Tok())(["abcde", "abcdefghij"])
    assert r.item_terms["length"] == pytest.approx([1.0, float(np.exp(-1.0))])
