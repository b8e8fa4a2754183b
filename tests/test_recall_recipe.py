"""The needle-recall recipe (neuroplastic.recipes.recall): data, loop, resume, CLI, errors,
and (slow) the acceptance run: >= 90% needle recall at 2 KB after <= 20 minutes of CPU."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from neuroplastic.cli import main
from neuroplastic.config import load_config
from neuroplastic.errors import UserError
from neuroplastic.models import checkpoint_io
from neuroplastic.recipes.recall import recall_batch, train_recall
from neuroplastic.training.trainer import Trainer
from tests.conftest import kill_at_first_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(out, **extra):
    vals = {
        "model.n_embd": 32, "model.block_size": 512, "train.batch_size": 2,
        "train.max_steps": 4, "train.eval_interval": 2, "train.ckpt_interval": 2,
        "train.progress": False, "train.tensorboard": False, "train.out_dir": str(out),
        "options.short_block": 256, "options.long_block": 512, "options.long_bytes": "[300,500]",
        "options.eval_lengths": "[300]", "options.eval_examples": 2, **extra,
    }
    return load_config("needle-recall", [f"{k}={v}" for k, v in vals.items()])


def test_recall_batch_weights_the_answers():
    rng = random.Random(0)
    x, y, w = recall_batch(rng, rows=3, block=400, lo=150, hi=300, max_needles=2,
                           answer_weight=7.0, eos_id=256)
    assert x.shape == y.shape == w.shape == (3, 400)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert set(w.unique().tolist()) == {1.0, 7.0}
    assert (y == 256).any()  # documents are packed with end-of-text between them
    for row in range(3):
        weighted = bytes(y[row][w[row] == 7.0].tolist()).decode()
        # answers are " NNNN" (the last one may be cut by the row's end); nothing else is weighted
        assert weighted.startswith(" ") and weighted.replace(" ", "").isdigit()
        text = bytes(v for v in y[row].tolist() if v < 256).decode()
        keys = [k for k in weighted.split() if len(k) == 4]
        assert keys
        for key in keys:
            # each answered key was hidden earlier in the same row: it appears twice
            assert text.index(f" is {key}. ") < text.rindex("Answer: The ")


def test_train_writes_checkpoints_the_evaluator_reads(tmp_path, capsys):
    out = tmp_path / "run"
    summary = train_recall(_cfg(out), echo=lambda *a: None)
    assert summary["step"] == 4 and set(summary["last_eval"]) == {"300/exact", "300/digits"}
    assert [h["step"] for h in summary["history"]] == [2, 4]
    assert [p.name for p in checkpoint_io.list_checkpoints(out / "checkpoints")] == ["step_0000002", "step_0000004"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("kind") == "eval" for r in records)
    assert main(["evaluate", str(out), "--task", "needle", "--lengths", "300", "--depths", "0,1",
                 "--trials", "1"]) == 0
    assert (out / "needle.json").is_file() and (out / "needle.png").is_file()
    # a second run into the same directory without --resume is refused; nothing is lost
    with pytest.raises(UserError, match="already holds checkpoints"):
        train_recall(_cfg(out), echo=lambda *a: None)
    assert len(checkpoint_io.list_checkpoints(out / "checkpoints")) == 2


def test_resume_equals_uninterrupted(tmp_path):
    full = tmp_path / "full"
    train_recall(_cfg(full, **{"options.short_fraction": 0.5}), echo=lambda *a: None)
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_0000002", part / "checkpoints" / "step_0000002")
    summary = train_recall(_cfg(part, **{"train.resume": "auto"}), echo=lambda *a: None)
    assert summary["step"] == 4
    a = checkpoint_io.load_checkpoint(full / "checkpoints" / "step_0000004")
    b = checkpoint_io.load_checkpoint(part / "checkpoints" / "step_0000004")
    from safetensors.torch import load_file

    wa = load_file(str(a["path"] / "model.safetensors"))
    wb = load_file(str(b["path"] / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["state"]["history"] == b["state"]["history"]


@pytest.mark.parametrize(
    "override,match",
    [
        ("options.answer_weight=0", "answer_weight"),
        ("options.short_bytes=[50,400]", "short_bytes"),
        ("options.long_block=4096", "long_block"),
        ("options.max_needles=99", "max_needles"),
        ("options.short_fraction=1.5", "short_fraction"),
        ("options.what=1", "Unknown config key 'options.what'"),
        ("data.tokenizer=bpe", "data.tokenizer=byte"),
    ],
)
def test_bad_options_are_one_sentence(tmp_path, override, match):
    k, v = override.split("=", 1)
    with pytest.raises(UserError, match=match):
        train_recall(_cfg(tmp_path / "bad", **{k: v}), echo=lambda *a: None)


def test_cli_bad_option_exits_2(tmp_path, capsys):
    code = main(["train", "needle-recall", "options.answer_weight=-1", f"train.out_dir={tmp_path}/x"])
    assert code == 2
    assert "answer_weight" in capsys.readouterr().err


def test_lm_trainer_refuses_the_recipe(tmp_path):
    with pytest.raises(UserError, match="own training loop"):
        Trainer(_cfg(tmp_path / "lm")).setup()


@pytest.mark.slow
def test_needle_recall_at_2kb_acceptance(tmp_path):
    """The issue's acceptance: the needle-recall recipe, trained on CPU in <= 20 minutes,
    recalls the needle at 2 KB in >= 90% of the grid's cells (greedy decoding)."""
    import time

    from neuroplastic.evaluation.recall import needle_grid
    from neuroplastic.models.loading import load_trained

    torch.set_num_threads(2)
    cfg = load_config("needle-recall", [f"train.out_dir={tmp_path / 'run'}", "train.progress=false",
                                        "train.tensorboard=false"])
    t0 = time.time()
    train_recall(cfg, echo=print)
    minutes = (time.time() - t0) / 60
    assert minutes <= 20, f"training took {minutes:.1f} min"
    model, tok, _, _ = load_trained(tmp_path / "run")
    res = needle_grid(model, tok, lengths=[2048], trials=10, progress=False)
    # 5 depths x 10 needles at 2 KB: >= 90% of them recalled exactly
    assert res["accuracy"] >= 0.9, res["grid"]


def _cli(args: list[str], **kw):
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "neuroplastic", "train", "needle-recall", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def _train_losses(out) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r.get("kind") == "train"}


def test_sigkill_then_resume_gives_bit_identical_losses(tmp_path):
    """kill -9 mid-run, then --resume: the losses equal an uninterrupted run's, bit for bit."""

    over = [f"{k}={v}" for k, v in {
        "model.n_embd": 32, "model.block_size": 512, "train.batch_size": 2,
        "train.max_steps": 60, "train.eval_interval": 0, "train.ckpt_interval": 3,
        "train.log_interval": 1, "train.progress": False, "train.tensorboard": False,
        "options.short_block": 256, "options.long_block": 512, "options.long_bytes": "[300,500]",
        "options.short_fraction": 0.5, "options.eval_lengths": "[300]",
        "options.eval_examples": 2}.items()]
    full, part = tmp_path / "full", tmp_path / "part"
    proc = _cli([*over, f"train.out_dir={full}"])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    proc = _cli([*over, f"train.out_dir={part}"])
    killed_at = kill_at_first_checkpoint(proc, part / "checkpoints")
    assert killed_at < 60
    proc = _cli([*over, f"train.out_dir={part}", "--resume"])
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert f"(step {killed_at})" in out
    expected, got = _train_losses(full), _train_losses(part)
    assert sorted(got) == sorted(expected) == list(range(1, 61))
    assert got == expected
