"""agiformer recipe: developmental alpha follows the curriculum and survives resume."""

from __future__ import annotations

import torch

from neuroplastic.config import load_config
from neuroplastic.training import checkpoint as ckpt
from neuroplastic.training.trainer import Trainer


def _cfg(out, **extra):
    vals = {
        "model.n_layer": 2, "model.n_embd": 32, "model.n_head": 2, "model.block_size": 64,
        "model.window": 16, "model.chunk_size": 16, "data.max_chars": 30000,
        "train.batch_size": 4, "train.max_steps": 10, "train.eval_interval": 5,
        "train.ckpt_interval": 4, "train.progress": False, "train.tensorboard": False,
        "train.out_dir": str(out), **extra,
    }
    return load_config("agiformer", [f"{k}={v}" for k, v in vals.items()])


def test_alpha_switches_at_stage_boundaries(tmp_path):
    cfg = _cfg(tmp_path / "a")
    assert cfg.curriculum.alphas == [0.1, 0.5, 0.99] and cfg.curriculum.boundaries == [0.15, 0.4]
    t = Trainer(cfg).setup()
    seen = {}
    for _ in range(10):
        t.train(stop_at=t.step + 1)
        seen[t.step] = round(float(t.model.alpha), 4)
    # boundaries at round(0.15*10)=2 and round(0.4*10)=4
    assert seen[1] == 0.1 and seen[2] == 0.5 and seen[3] == 0.5 and seen[4] == 0.99 and seen[10] == 0.99
    assert t.curriculum.changes == [[2, 1], [4, 2]]


def test_resume_restores_alpha_and_losses_exactly(tmp_path):
    straight = Trainer(_cfg(tmp_path / "a"))
    straight.train()
    part1 = Trainer(_cfg(tmp_path / "b"))
    part1.train(stop_at=6)
    part2 = Trainer(_cfg(tmp_path / "b", **{"train.resume": "auto"}))
    part2.setup()
    assert part2.resumed_from.name == ckpt.checkpoint_name(4)
    assert abs(float(part2.model.alpha) - 0.99) < 1e-6
    part2.train()
    combined = [h["loss"] for h in part1.history[:4]] + [h["loss"] for h in part2.history]
    assert combined == [h["loss"] for h in straight.history]
    for a, b in zip(straight.model.parameters(), part2.model.parameters()):
        assert torch.equal(a, b)
