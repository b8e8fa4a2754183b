from __future__ import annotations

import math

import pytest
import torch
import yaml

from neuroplastic.config import load_config
from neuroplastic.errors import UserError
from neuroplastic.models import checkpoint_io
from neuroplastic.training import checkpoint as ckpt
from neuroplastic.training.callbacks import Callback
from neuroplastic.training.metrics import read_metrics
from neuroplastic.training.trainer import Trainer
from tests.conftest import tiny_overrides


def _cfg(data, out, **extra):
    return load_config("tiny", tiny_overrides(data, out, **extra))


@pytest.mark.parametrize(
    "extra",
    [
        {},
        # grad accumulation, an epoch boundary inside the run, dropout (RNG state matters)
        {"train.grad_accum": 2, "data.max_chars": 1200, "model.dropout": 0.1},
    ],
    ids=["plain", "accum-epochwrap-dropout"],
)
def test_resume_matches_uninterrupted_bitwise(text_file, tmp_path, extra):
    straight = Trainer(_cfg(text_file, tmp_path / "a", **extra))
    straight.train()
    ref = [h["loss"] for h in straight.history]
    assert len(ref) == 8

    part1 = Trainer(_cfg(text_file, tmp_path / "b", **extra))
    part1.train(stop_at=6)  # "killed" at step 6: only the step-4 checkpoint survives
    assert checkpoint_io.latest_checkpoint(part1.ckpt_dir).name == ckpt.checkpoint_name(4)
    if "data.max_chars" in extra:
        assert part1.train_data.epoch >= 1  # the run really crossed an epoch boundary
    part2 = Trainer(_cfg(text_file, tmp_path / "b", **{**extra, "train.resume": "auto"}))
    part2.train()
    assert part2.resumed_from is not None and part2.resumed_from.name == ckpt.checkpoint_name(4)
    combined = [h["loss"] for h in part1.history[:4]] + [h["loss"] for h in part2.history]
    assert combined == ref  # bitwise: == on Python floats
    for a, b in zip(straight.model.parameters(), part2.model.parameters()):
        assert torch.equal(a, b)
    for sa, sb in zip(straight.optimizer.state.values(), part2.optimizer.state.values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    # metrics.jsonl reads like one run: one train record per step
    steps = [r["step"] for r in read_metrics(part2.logger.path) if r["kind"] == "train"]
    assert steps == list(range(1, 9))


def test_resume_refuses_other_model_shape(text_file, tmp_path):
    Trainer(_cfg(text_file, tmp_path / "a")).train(stop_at=4)
    with pytest.raises(UserError, match=r"model\.gpt\.n_layer \(2 in the checkpoint, 3 now\)"):
        Trainer(_cfg(text_file, tmp_path / "a", **{"train.resume": "auto", "model.n_layer": 3})).setup()


def _write_flat(config_yaml):
    """Rewrite a config.yaml as the code wrote it before ModelConfig had sections: the
    model's keys flat, in the old order (arch, vocab_size, block_size, the transformer's
    shape, the memory's, hf_path and the other Hugging Face keys)."""
    doc = yaml.safe_load(config_yaml.read_text(encoding="utf-8"))
    m = doc["model"]
    hf = dict(m["hf"])
    flat = {k: m[k] for k in ("arch", "vocab_size", "block_size")}
    flat.update(m["gpt"])
    flat.update(m["hebbian"])
    flat["hf_path"] = hf.pop("path")
    flat.update(hf)
    doc["model"] = flat
    config_yaml.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")


def test_run_with_old_flat_config_yaml_loads_and_resumes_bitwise(text_file, tmp_path):
    """A run directory written before the split (flat model keys in its config.yaml and in
    every checkpoint's) resumes as if nothing had changed, and still refuses a model change."""
    from neuroplastic.models.loading import load_trained

    straight = Trainer(_cfg(text_file, tmp_path / "a"))
    straight.train()
    part1 = Trainer(_cfg(text_file, tmp_path / "b"))
    part1.train(stop_at=6)
    saved = [part1.run_dir / "config.yaml"]
    saved += [c / "config.yaml" for c in checkpoint_io.list_checkpoints(part1.ckpt_dir)]
    assert len(saved) >= 2
    for path in saved:
        _write_flat(path)
        model = yaml.safe_load(path.read_text(encoding="utf-8"))["model"]
        assert model["n_layer"] == 2 and "gpt" not in model and "hf_path" in model
    model, _, cfg, directory = load_trained(tmp_path / "b", prefer="latest")
    assert directory.name == ckpt.checkpoint_name(4)
    assert (cfg.model.gpt.n_layer, cfg.model.gpt.n_embd) == (2, 32) and cfg.model.vocab_size > 0
    assert torch.isfinite(model(torch.zeros(1, 4, dtype=torch.long))[0]).all()
    with pytest.raises(UserError, match=r"model\.gpt\.n_layer \(2 in the checkpoint, 3 now\)"):
        Trainer(_cfg(text_file, tmp_path / "b", **{"train.resume": "auto", "model.n_layer": 3})).setup()
    part2 = Trainer(_cfg(text_file, tmp_path / "b", **{"train.resume": "auto"}))
    part2.train()
    assert part2.resumed_from is not None and part2.resumed_from.name == ckpt.checkpoint_name(4)
    combined = [h["loss"] for h in part1.history[:4]] + [h["loss"] for h in part2.history]
    assert combined == [h["loss"] for h in straight.history]  # bitwise
    for a, b in zip(straight.model.parameters(), part2.model.parameters()):
        assert torch.equal(a, b)


def test_fresh_run_refuses_dir_with_checkpoints(text_file, tmp_path):
    Trainer(_cfg(text_file, tmp_path / "a")).train(stop_at=4)
    with pytest.raises(UserError, match="resume"):
        Trainer(_cfg(text_file, tmp_path / "a")).setup()


class _NanPenalty(Callback):
    name = "nan"

    def __init__(self, bad_steps):
        self.bad_steps = set(bad_steps)

    def penalty(self, ctx):
        if ctx.step in self.bad_steps:
            return torch.tensor(float("nan"))
        return None


def test_nonfinite_step_is_skipped(text_file, tmp_path):
    t = Trainer(_cfg(text_file, tmp_path / "a"), callbacks=[_NanPenalty({2})])
    t.setup()
    before = [p.detach().clone() for p in t.model.parameters()]
    t.train(stop_at=2)
    mid = [p.detach().clone() for p in t.model.parameters()]
    t.train(stop_at=3)  # the NaN step: parameters must not move
    after = [p.detach().clone() for p in t.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(mid, after))
    assert not all(torch.equal(a, b) for a, b in zip(before, mid))
    assert t.nonfinite_total == 1
    summary = t.train()
    assert summary["step"] == 8 and summary["nonfinite_steps"] == 1
    assert all(math.isfinite(p.sum().item()) for p in t.model.parameters())


def test_nonfinite_streak_stops_and_keeps_checkpoint(text_file, tmp_path):
    cfg = _cfg(text_file, tmp_path / "a", **{"train.max_nonfinite": 3, "train.max_steps": 20})
    t = Trainer(cfg, callbacks=[_NanPenalty(range(5, 20))])
    with pytest.raises(UserError, match="not finite for 3 steps"):
        t.train()
    latest = checkpoint_io.latest_checkpoint(t.ckpt_dir)
    assert latest is not None and latest.name == ckpt.checkpoint_name(4)
    checkpoint_io.load_checkpoint(latest)


def test_training_writes_outputs_and_loss_falls(text_file, tmp_path):
    cfg = _cfg(text_file, tmp_path / "run", **{"train.max_steps": 40, "train.eval_interval": 20,
                                               "train.lr": 0.01, "train.tensorboard": True})
    t = Trainer(cfg)
    before = t.setup().evaluate()
    summary = t.train()
    assert summary["last_eval"]["loss"] < before["loss"] - 0.5
    run = tmp_path / "run"
    assert (run / "metrics.jsonl").stat().st_size > 0
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert any((run / "tensorboard").iterdir())
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file()
    kinds = {r["kind"] for r in read_metrics(run / "metrics.jsonl")}
    assert {"train", "eval", "sample"} <= kinds
    # keep_last=2 pruning
    assert len(checkpoint_io.list_checkpoints(run / "checkpoints")) <= 2
    assert 0 < summary["last_eval"]["bpb"] < 8
