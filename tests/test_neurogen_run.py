"""``neuroplastic neurogen train`` inside the run shell (issue 16): kill -9 and --resume give
bit-identical losses, single-file run directories resume, a signal shows in the exit code,
bad checkpoints are one sentence."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from neuroplastic.models import checkpoint_io
from tests.conftest import SAMPLE_TEXT, kill_at_first_checkpoint
from tests.test_neurogen import train_opts


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one torch thread (the conftest fixture)."""


def _train_losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r.get("kind") == "train"}


def _cli(data, out, *extra: str) -> subprocess.Popen:
    args = ["--data", str(data), "--out", str(out), "--no-progress", "--no-tensorboard", "--gpu-device", "-1",
            "--scale", "0.03125", "--embedding-dim", "8", "--tokens-per-chunk", "128", "--max-seq-length", "32",
            "--checkpoint-interval", "3", "--log-interval", "1", "--max-chunks", "40", "--set", "sparsity=0.0625",
            "--set", "replay_interval=3", "--eval-data", str(data), "--eval-tokens", "256", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "neuroplastic", "neurogen", "train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_sigkill_then_resume_gives_bit_identical_losses(tmp_path):
    """kill -9 mid-run, then --resume: the losses equal an uninterrupted run's, bit for bit."""
    data = tmp_path / "c.txt"
    data.write_text(SAMPLE_TEXT)
    full, part = tmp_path / "full", tmp_path / "part"
    proc = _cli(data, full)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    proc = _cli(data, part)
    killed_at = kill_at_first_checkpoint(proc, part / "checkpoints")
    assert killed_at < 40
    proc = _cli(data, part, "--resume")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert f"(step {killed_at})" in out
    expected, got = _train_losses(full), _train_losses(part)
    assert sorted(got) == sorted(expected) == list(range(1, 41))
    assert got == expected
    # the shell's checkpoint directories, with the tokenizer, the config and the stream position
    last = checkpoint_io.latest_checkpoint(part / "checkpoints")
    assert last.name == "step_0000040" and (last / "tokenizer").is_dir()
    state = checkpoint_io.load_checkpoint(last)["state"]
    assert state["step"] == 40 and state["stream"]["offset"] > 0 and "rng" in state
    assert (part / "loss_curve.png").is_file()


def test_single_file_run_directory_resumes_and_continues_in_the_new_format(tmp_path):
    """A run directory of the older format (checkpoint_step_N.safetensors + .json written by
    NeuroGenModel.save_checkpoint with the trainer's position) resumes from its newest file."""
    from neuroplastic.neurogen.train import list_checkpoints, load_model, train

    straight = train(train_opts(tmp_path / "a", max_chunks=6), echo=lambda s: None)
    train(train_opts(tmp_path / "b", max_chunks=4), echo=lambda s: None)
    ckpt_dir = tmp_path / "b" / "run" / "checkpoints"
    for step in (2, 4):  # rewrite the run as the old trainer left it
        model, state = load_model(ckpt_dir / f"step_{step:07d}", -1)
        trainer = {k: state[k] for k in ("step", "stream", "carry", "loss_sum", "tokens")}
        model.save_checkpoint(ckpt_dir / f"checkpoint_step_{step}.safetensors",
                              extra={"trainer": {**trainer, "data": str(tmp_path / "b" / "corpus.txt")}})
        shutil.rmtree(ckpt_dir / f"step_{step:07d}")
    assert [p.name for _, p in list_checkpoints(ckpt_dir)] == [
        "checkpoint_step_2.safetensors", "checkpoint_step_4.safetensors"]
    lines: list[str] = []
    opts = train_opts(tmp_path / "b", max_chunks=6, resume=True, data=str(tmp_path / "b" / "corpus.txt"))
    resumed = train(opts, echo=lines.append)
    assert resumed["resumed_from"].name == "checkpoint_step_4.safetensors"
    assert any("single-file format" in line for line in lines)
    assert resumed["avg_loss"] == straight["avg_loss"]
    assert _train_losses(tmp_path / "b" / "run") == _train_losses(tmp_path / "a" / "run")
    assert [p.name for _, p in list_checkpoints(ckpt_dir)] == [
        "checkpoint_step_2.safetensors", "checkpoint_step_4.safetensors", "step_0000006"]


def test_a_signal_saves_and_sets_the_exit_code(tmp_path, monkeypatch, capsys):
    from neuroplastic.cli import main
    from neuroplastic.neurogen.model import NeuroGenModel

    real = NeuroGenModel.train_step

    def step_then_sigterm(self, x, y):
        loss = real(self, x, y)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(NeuroGenModel, "train_step", step_then_sigterm)
    data = tmp_path / "c.txt"
    data.write_text(SAMPLE_TEXT)
    out = tmp_path / "run"
    argv = ["neurogen", "train", "--data", str(data), "--out", str(out), "--no-progress", "--no-tensorboard",
            "--gpu-device", "-1", "--scale", "0.03125", "--embedding-dim", "8", "--tokens-per-chunk", "128",
            "--max-seq-length", "32", "--checkpoint-interval", "10", "--max-chunks", "20"]
    assert main(argv) == 143
    assert "Stopped at step 3; checkpoint saved. Resume with --resume." in capsys.readouterr().out
    assert [p.name for p in checkpoint_io.list_checkpoints(out / "checkpoints")] == ["step_0000003"]


def test_bad_checkpoints_and_changed_data_are_one_sentence(tmp_path, capsys):
    from neuroplastic.cli import main
    from neuroplastic.data.tokenizers import build_tokenizer
    from neuroplastic.neurogen.train import train

    train(train_opts(tmp_path, max_chunks=2), echo=lambda s: None)
    run = tmp_path / "run"
    other = tmp_path / "other.txt"
    other.write_text(SAMPLE_TEXT[::-1])
    common = ["neurogen", "train", "--out", str(run), "--no-progress", "--no-tensorboard", "--gpu-device", "-1",
              "--tokens-per-chunk", "256", "--max-seq-length", "32", "--max-chunks", "4", "--resume"]

    def one_error(argv, needle):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err

    one_error([*common, "--data", str(other)], "--data")
    ckpt = run / "checkpoints" / "step_0000002"
    shutil.rmtree(ckpt / "tokenizer")  # a tokenizer of another vocabulary in its place
    build_tokenizer("bpe", lambda: iter([SAMPLE_TEXT]), vocab_size=300).save(ckpt / "tokenizer")
    one_error([*common, "--data", str(tmp_path / "corpus.txt")], "vocabulary")
    shutil.rmtree(ckpt / "tokenizer")  # the run's own tokenizer/ is used then
    (ckpt / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:100])
    one_error([*common, "--data", str(tmp_path / "corpus.txt")], "model.safetensors")


def test_without_max_chunks_the_run_ends_with_the_data(tmp_path):
    """--max-chunks 0: the run shell stops when the stream ends (the strategy's ``finished``),
    after a last, shorter step, and saves and logs that step."""
    from neuroplastic.neurogen.train import list_checkpoints, train

    res = train(train_opts(tmp_path, max_chunks=0, tokens_per_chunk=1024, checkpoint_interval=4, log_interval=3),
                echo=lambda s: None)
    n_tokens = len(SAMPLE_TEXT.encode("utf-8")) + 1  # one document and its end-of-text token
    assert res["steps"] == 10 and res["tokens"] == (n_tokens - 1) // 32 * 32  # whole 32-token streams
    assert [p.name for _, p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [
        "step_0000004", "step_0000008", "step_0000010"]
    assert sorted(_train_losses(tmp_path / "run")) == [3, 6, 9, 10]
