from __future__ import annotations

import os
import pickle

import pytest
import torch

from neuroplastic.config import load_config
from neuroplastic.errors import UserError
from neuroplastic.models import checkpoint_io
from neuroplastic.models.loading import load_trained
from neuroplastic.training import checkpoint as ckpt
from neuroplastic.training.trainer import Trainer
from tests.conftest import run_cli, tiny_overrides


@pytest.fixture
def trained(text_file, tmp_path):
    cfg = load_config("tiny", tiny_overrides(text_file, tmp_path / "run"))
    t = Trainer(cfg)
    t.train(stop_at=4)
    return t


def test_flatten_roundtrip():
    state = {"a": torch.arange(3), "b": [1, 2.5, None, "x", (torch.ones(2), 3)],
             7: {"nested": torch.zeros(1)}, "nan": float("nan"), "inf": float("-inf")}
    tensors = {}
    skel = checkpoint_io.flatten_state(state, tensors)
    import json
    back = checkpoint_io.unflatten_state(json.loads(json.dumps(skel)), tensors)
    assert torch.equal(back["a"], state["a"]) and back["b"][:4] == [1, 2.5, None, "x"]
    assert isinstance(back["b"][4], tuple) and torch.equal(back["b"][4][0], torch.ones(2))
    assert torch.equal(back[7]["nested"], torch.zeros(1))
    assert back["nan"] != back["nan"] and back["inf"] == float("-inf")


def test_crash_during_save_keeps_previous(trained):
    t = trained
    good = checkpoint_io.latest_checkpoint(t.ckpt_dir)
    t.train(stop_at=6)

    def boom(tmp):
        raise OSError("disk full (simulated)")

    t.step = 8
    with pytest.raises(OSError):
        ckpt.save_checkpoint(t.ckpt_dir / ckpt.checkpoint_name(8), model=t.model, state=t.state(),
                             optimizer_state=t.optimizer.state_dict(), tokenizer=t.tokenizer,
                             before_rename=boom)
    latest = checkpoint_io.latest_checkpoint(t.ckpt_dir)
    assert latest is not None and latest.name in (good.name, ckpt.checkpoint_name(6))
    assert not list(t.ckpt_dir.glob(".tmp-*"))
    model, tok, cfg, path = load_trained(latest)
    assert path == latest


def test_truncated_and_foreign_files_are_clear_errors(trained):
    path = checkpoint_io.latest_checkpoint(trained.ckpt_dir)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a valid safetensors"):
        load_trained(path)
    weights.write_bytes(os.urandom(2000))
    with pytest.raises(UserError, match="not a valid safetensors"):
        load_trained(path)
    (path / "state.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_trained(path)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_is_refused_without_executing(trained, tmp_path):
    marker = tmp_path / "pwned"
    path = checkpoint_io.latest_checkpoint(trained.ckpt_dir)
    payload = pickle.dumps({"w": _Evil(marker)}, protocol=4)
    (path / "model.safetensors").write_bytes(payload)
    with pytest.raises(UserError, match="refuses"):
        load_trained(path)
    assert not marker.exists()
    # a torch.save'd file handed over directly
    evil_pt = tmp_path / "model.pt"
    torch.save({"w": _Evil(marker)}, evil_pt)
    with pytest.raises(UserError, match="refuses"):
        load_trained(evil_pt)
    r = run_cli("evaluate", str(evil_pt))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "refuses" in r.stderr
    assert not marker.exists()


def test_shape_mismatch_is_clear(trained, tmp_path):
    from neuroplastic.models import build_model

    cfg = load_config("tiny", ["model.n_embd=64", "model.n_layer=2", "model.block_size=32"])
    cfg.model.vocab_size = trained.tokenizer.vocab_size
    other = build_model(cfg.model)
    path = checkpoint_io.latest_checkpoint(trained.ckpt_dir)
    with pytest.raises(UserError, match="shape"):
        checkpoint_io.load_model_weights(other, path / "model.safetensors")


def test_checkpoint_from_before_rope_pairing_loads_as_halves_and_resume_names_the_key(text_file, tmp_path):
    """A checkpoint whose config.yaml predates model.rope_pairing was trained with the
    halves pairing: it evaluates as trained (same logits), and resuming it from a recipe
    that now defaults to interleaved is refused naming the key, then works with it set."""
    import yaml

    overrides = tiny_overrides(text_file, tmp_path / "run") + ["model.rope_pairing=halves"]
    t = Trainer(load_config("tiny", overrides))
    t.train(stop_at=4)
    path = checkpoint_io.latest_checkpoint(t.ckpt_dir)
    for cfg_file in (path / "config.yaml", t.run_dir / "config.yaml"):
        doc = yaml.safe_load(cfg_file.read_text(encoding="utf-8"))
        del doc["model"]["gpt"]["rope_pairing"]  # as an earlier version wrote it
        cfg_file.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    model, _, cfg, _ = load_trained(path)
    assert cfg.model.gpt.rope_pairing == "halves"
    x = torch.randint(0, cfg.model.vocab_size, (2, 16))
    t.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], t.model(x)[0])
    resume = tiny_overrides(text_file, tmp_path / "run") + ["train.resume=auto"]
    with pytest.raises(UserError, match="rope_pairing"):
        Trainer(load_config("tiny", resume)).setup()
    Trainer(load_config("tiny", resume + ["model.rope_pairing=halves"])).train(stop_at=6)
