"""What the run shell promises (docs/RELIABILITY.md), each held by a test here: no checkpoint
with non-finite weights, an atomic ``best``, one writer per run directory, signals that save
and exit 143 / 130, a resume that says when there is nothing to do, and bad settings
refused at setup with one sentence and exit code 2."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neuroplastic.cli import main
from neuroplastic.config import load_config
from neuroplastic.errors import UserError
from neuroplastic.models import checkpoint_io
from neuroplastic.recipes.recall import train_recall
from neuroplastic.training import checkpoint as ckpt
from neuroplastic.training.callbacks import Callback
from neuroplastic.training.trainer import Trainer
from tests.conftest import tiny_overrides, wait_for_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(data, out, **extra):
    return load_config("tiny", tiny_overrides(data, out, **extra))


def _recall_cfg(out, **extra):
    vals = {
        "model.n_embd": 32, "model.block_size": 512, "train.batch_size": 2,
        "train.max_steps": 4, "train.eval_interval": 2, "train.ckpt_interval": 2,
        "train.progress": False, "train.tensorboard": False, "train.out_dir": str(out),
        "options.short_block": 256, "options.long_block": 512, "options.long_bytes": "[300,500]",
        "options.eval_lengths": "[300]", "options.eval_examples": 2, **extra,
    }
    return load_config("needle-recall", [f"{k}={v}" for k, v in vals.items()])


def _one_sentence(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _all_finite(directory: Path) -> bool:
    tensors = [*load_file(str(directory / "model.safetensors")).values(),
               *load_file(str(directory / "optimizer.safetensors")).values()]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


# ------------------------------------------------------------------ 1. non-finite state


def test_state_is_finite_sees_parameters_and_optimizer_state():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert ckpt.state_is_finite(model, opt)
    with torch.no_grad():
        model.weight[0, 0] = 1e30  # huge but finite (its square overflows): still finite
    assert ckpt.state_is_finite(model, opt)
    with torch.no_grad():
        model.weight[0, 0] = 0.0
    opt.state[model.bias]["exp_avg_sq"][1] = float("inf")
    assert not ckpt.state_is_finite(model, opt)
    assert ckpt.state_is_finite(model)
    with torch.no_grad():
        model.bias[0] = float("-inf")
    assert not ckpt.state_is_finite(model)


def test_huge_lr_with_finite_loss_stops_without_writing_nonfinite_checkpoints(text_file, tmp_path, capsys):
    """`train tiny train.lr=1e6 train.grad_clip=0`: the loss stays finite while the weights
    overflow. No non-finite checkpoint is written (keep_last=1 cannot prune the last good
    one away), the run stops with exit 2 naming the step of the last good checkpoint."""
    out = tmp_path / "run"
    code = main(["train", "tiny", *tiny_overrides(text_file, out, **{
        "train.lr": 1e6, "train.grad_clip": 0, "train.warmup_steps": 0, "train.ckpt_interval": 1,
        "train.keep_last": 1, "train.eval_interval": 0, "train.max_steps": 30})])
    line = _one_sentence(capsys)
    assert code == 2
    assert "non-finite" in line and "although the loss was finite" in line
    kept = checkpoint_io.list_checkpoints(out / "checkpoints")
    assert kept, "the last good checkpoint was pruned"
    assert all(_all_finite(p) for p in kept)
    assert f"The last good checkpoint is untouched: {kept[-1]} (step {int(kept[-1].name[5:])})" in line


def test_between_checks_the_save_refuses_nonfinite_state(text_file, tmp_path, capsys):
    """The state is checked every train.log_interval steps and before every save: with
    checkpoints more often than checks, the save is what stops the run."""
    out = tmp_path / "run"
    code = main(["train", "tiny", *tiny_overrides(text_file, out, **{
        "train.lr": 1e6, "train.grad_clip": 0, "train.warmup_steps": 0, "train.ckpt_interval": 1,
        "train.keep_last": 1, "train.eval_interval": 0, "train.max_steps": 30,
        "train.log_interval": 25})])
    line = _one_sentence(capsys)
    assert code == 2 and "Not writing checkpoint" in line and "are not finite" in line
    kept = checkpoint_io.list_checkpoints(out / "checkpoints")
    assert kept and all(_all_finite(p) for p in kept)
    assert f"The last good checkpoint is untouched: {kept[-1]}" in line


def test_no_checkpoint_yet_is_not_called_untouched(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "tiny", *tiny_overrides(text_file, out, **{
        "train.lr": 1e6, "train.grad_clip": 0, "train.warmup_steps": 0, "train.ckpt_interval": 100,
        "train.eval_interval": 0, "train.max_steps": 30})])
    line = _one_sentence(capsys)
    assert code == 2 and "untouched" not in line and "none to resume from" in line
    assert checkpoint_io.list_checkpoints(out / "checkpoints") == []


class _NanPenalty(Callback):
    name = "nan"

    def penalty(self, ctx):
        return torch.tensor(float("nan"))


def test_loss_streak_message_claims_a_checkpoint_only_when_one_exists(text_file, tmp_path):
    t = Trainer(_cfg(text_file, tmp_path / "a", **{"train.max_nonfinite": 2}), callbacks=[_NanPenalty()])
    with pytest.raises(UserError) as exc:
        t.train()
    assert "untouched" not in str(exc.value) and "none to resume from" in str(exc.value)


def test_save_refuses_nonfinite_state_and_resume_refuses_a_nonfinite_checkpoint(text_file, tmp_path):
    t = Trainer(_cfg(text_file, tmp_path / "a"))
    t.train(stop_at=4)
    with torch.no_grad():
        next(t.model.parameters())[0] = float("nan")
    with pytest.raises(UserError, match="Not writing checkpoint step_0000004.*untouched"):
        t.save()
    with pytest.raises(UserError, match="Not writing checkpoint best"):
        t.save(best=True)
    assert _all_finite(checkpoint_io.latest_checkpoint(t.ckpt_dir))
    # a non-finite checkpoint written by something else is refused on resume
    bad = tmp_path / "bad" / "checkpoints" / ckpt.checkpoint_name(4)
    ckpt.save_checkpoint(bad, model=t.model, state=t.state(),
                         optimizer_state=t.optimizer.state_dict(),
                         config_text=(tmp_path / "a" / "config.yaml").read_text(), tokenizer=t.tokenizer)
    with pytest.raises(UserError, match="holds non-finite parameters"):
        Trainer(_cfg(text_file, tmp_path / "bad", **{"train.resume": "auto"})).setup()


def test_recall_loop_never_saves_nonfinite_state(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(UserError, match="(non-finite|not finite)") as exc:
        train_recall(_recall_cfg(out, **{"train.lr": 1e6, "train.grad_clip": 0, "train.warmup_steps": 0,
                                         "train.ckpt_interval": 1, "train.keep_last": 1,
                                         "train.eval_interval": 0, "train.max_steps": 40}),
                     echo=lambda *a: None)
    kept = checkpoint_io.list_checkpoints(out / "checkpoints")
    assert all(_all_finite(p) for p in kept)
    if kept:
        assert f"untouched: {kept[-1]}" in str(exc.value)
    else:
        assert "untouched" not in str(exc.value)


# ------------------------------------------------------------------ 2. atomic best


def test_replacing_best_keeps_the_old_one_when_the_rename_fails(text_file, tmp_path, monkeypatch):
    t = Trainer(_cfg(text_file, tmp_path / "a"))
    t.train(stop_at=4)  # eval at 4 wrote best/
    best = t.ckpt_dir / "best"
    old_weights = load_file(str(best / "model.safetensors"))
    t.train(stop_at=5)
    real_replace = os.replace

    def crash_on_rename_in(src, dst):
        if Path(src).name.startswith(ckpt.TMP_PREFIX):
            raise OSError(errno.EIO, "simulated crash while renaming the new best in")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_rename_in)
    with pytest.raises(UserError, match="survives intact, and so does the previous"):
        t.save(best=True)
    monkeypatch.undo()
    checkpoint_io.load_checkpoint(best)  # complete and loadable: the old best, not a partial new one
    now = load_file(str(best / "model.safetensors"))
    assert all(torch.equal(now[k], old_weights[k]) for k in old_weights)
    assert not [p for p in t.ckpt_dir.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_start_restores_a_best_moved_aside_and_removes_unfinished_saves(text_file, tmp_path):
    t = Trainer(_cfg(text_file, tmp_path / "a"))
    t.train(stop_at=4)
    ckd = t.ckpt_dir
    # what kill -9 leaves: best moved aside (new one not yet in), and a half-written step
    os.rename(ckd / "best", ckd / ".old-best-99999")
    (ckd / ".tmp-step_0000008-99999").mkdir()
    (ckd / ".tmp-step_0000008-99999" / "model.safetensors").write_bytes(b"partial")
    Trainer(_cfg(text_file, tmp_path / "a", **{"train.resume": "auto"})).setup().close()
    assert (ckd / "best" / checkpoint_io.STATE_FILE).is_file()
    checkpoint_io.load_checkpoint(ckd / "best")
    assert sorted(p.name for p in ckd.iterdir()) == ["best", "step_0000004"]


def test_a_stale_aside_copy_is_dropped_when_best_is_complete(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "best").mkdir(parents=True)
    (root / "best" / checkpoint_io.STATE_FILE).write_text("{}")
    (root / ".old-best-4242").mkdir()
    (root / ".old-best-4242" / checkpoint_io.STATE_FILE).write_text('{"old": 1}')
    done = ckpt.clean_stale(root)
    assert len(done) == 1 and sorted(p.name for p in root.iterdir()) == ["best"]
    assert (root / "best" / checkpoint_io.STATE_FILE).read_text() == "{}"


# ------------------------------------------------------------------ 3. one writer


def test_second_writer_on_a_run_dir_is_refused(text_file, tmp_path):
    a = Trainer(_cfg(text_file, tmp_path / "a")).setup()
    with pytest.raises(UserError, match=f"in use by another neuroplastic process \\(pid {os.getpid()}\\)"):
        Trainer(_cfg(text_file, tmp_path / "a")).setup()
    a.close()
    Trainer(_cfg(text_file, tmp_path / "a")).setup().close()  # free again


def test_cli_second_writer_exits_2_with_one_sentence(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / ckpt.RunLock.NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process's run, as the kernel sees it
        assert main(["train", "tiny", *tiny_overrides(text_file, out)]) == 2
        assert "is in use by another neuroplastic process" in _one_sentence(capsys)
        assert main(["train", "needle-recall", "model.n_embd=32", f"train.out_dir={out}"]) == 2
        assert "is in use by another neuroplastic process" in _one_sentence(capsys)
    finally:
        os.close(fd)
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


# ------------------------------------------------------------------ 4, 5. signals


def _popen(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("NEUROPLASTIC_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "neuroplastic", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_trainer_exits_143_after_sigterm_with_a_checkpoint(text_file, tmp_path):
    out = tmp_path / "run"
    proc = _popen(["train", "tiny", *tiny_overrides(text_file, out, **{
        "train.max_steps": 100000, "train.ckpt_interval": 3, "train.eval_interval": 0})])
    wait_for_checkpoint(proc, out / "checkpoints")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr
    m = [ln for ln in (stdout + stderr).splitlines() if ln.startswith("Stopped at step")]
    assert m
    step = int(m[0].split()[3].rstrip(";"))
    assert checkpoint_io.latest_checkpoint(out / "checkpoints").name == ckpt.checkpoint_name(step)


def test_recall_loop_saves_and_exits_143_on_sigterm_then_resumes(tmp_path):
    out = tmp_path / "r"
    over = [f"{k}={v}" for k, v in {
        "model.n_embd": 32, "model.block_size": 512, "train.batch_size": 2,
        "train.max_steps": 100000, "train.eval_interval": 0, "train.ckpt_interval": 3,
        "train.progress": False, "train.tensorboard": False, "train.out_dir": str(out),
        "options.short_block": 256, "options.long_block": 512, "options.long_bytes": "[300,500]",
        "options.eval_lengths": "[300]", "options.eval_examples": 2}.items()]
    proc = _popen(["train", "needle-recall", *over])
    wait_for_checkpoint(proc, out / "checkpoints")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr and "Stopped at step" in stdout + stderr
    stopped = checkpoint_io.latest_checkpoint(out / "checkpoints")
    step = int(stopped.name[5:])
    assert checkpoint_io.load_checkpoint(stopped)["state"]["step"] == step
    # the next run continues from there
    summary = train_recall(load_config("needle-recall", [*over, f"train.max_steps={step + 1}",
                                                          "train.resume=auto"]), echo=lambda *a: None)
    assert summary["step"] == step + 1 and summary["exit_code"] == 0


def test_recall_loop_stop_request_saves_at_the_step_and_reports_ctrl_c(tmp_path, monkeypatch):
    """Ctrl-C (SIGINT) in the recall loop: the step finishes, a checkpoint is saved, exit 130."""
    from neuroplastic.training import run as run_mod

    class _InterruptAtOnce(run_mod.StopRequest):
        def __enter__(self):
            super().__enter__()
            self._handler(signal.SIGINT, None)
            return self

    monkeypatch.setattr(run_mod, "StopRequest", _InterruptAtOnce)
    out = tmp_path / "r"
    summary = train_recall(_recall_cfg(out, **{"train.max_steps": 50}), echo=lambda *a: None)
    assert summary["interrupted"] and summary["exit_code"] == 130 and summary["step"] == 1
    assert checkpoint_io.latest_checkpoint(out / "checkpoints").name == ckpt.checkpoint_name(1)


def test_recall_loop_shows_a_progress_bar_in_a_log_file(tmp_path, capsys):
    train_recall(_recall_cfg(tmp_path / "r", **{"train.max_steps": 2, "train.eval_interval": 0}),
                 echo=lambda *a: None, progress=True)
    err = capsys.readouterr().err
    assert "recall needle-recall" in err and "2/2" in err


# ------------------------------------------------------------------ 6. resume with nothing to do


def test_resume_at_max_steps_says_so_and_past_it_is_refused(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "tiny", *tiny_overrides(text_file, out)]) == 0
    capsys.readouterr()
    assert main(["train", "tiny", *tiny_overrides(text_file, out), "--resume"]) == 0
    said = capsys.readouterr().out
    assert "Nothing to train" in said and "already at train.max_steps=8" in said
    assert main(["train", "tiny", *tiny_overrides(text_file, out, **{"train.max_steps": 5}), "--resume"]) == 2
    line = _one_sentence(capsys)
    assert "is at step 8, past train.max_steps=5" in line
    assert [p.name for p in checkpoint_io.list_checkpoints(out / "checkpoints")] == ["step_0000004", "step_0000008"]


def test_recall_resume_at_max_steps_says_so(tmp_path):
    out = tmp_path / "r"
    train_recall(_recall_cfg(out), echo=lambda *a: None)
    said: list[str] = []
    summary = train_recall(_recall_cfg(out, **{"train.resume": "auto"}), echo=said.append)
    assert summary["already_complete"] and any("Nothing to train" in s for s in said)
    with pytest.raises(UserError, match="past train.max_steps=3"):
        train_recall(_recall_cfg(out, **{"train.resume": "auto", "train.max_steps": 3}),
                     echo=lambda *a: None)


# ------------------------------------------------------------------ 7. one sentence, exit 2


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.lr=nan", "train.lr must be a finite number"),
        ("train.log_interval=0", "train.log_interval must be >= 1"),
        ("train.beta1=1.5", "train.beta1 must be in [0, 1)"),
        ("train.beta2=nan", "train.beta2 must be a finite number"),
        ("train.out_dir=runs/{nme}", "placeholder other than {name}"),
        ("model.rope_theta=0", "model.rope_theta must be > 0"),
        ("model.rope_theta=-5", "model.rope_theta must be > 0"),
        ("train.eval_interval=-1", "train.eval_interval must be >= 0"),
        ("train.sample_tokens=-1", "train.sample_tokens must be >= 0"),
    ],
)
def test_bad_settings_are_one_sentence_at_setup(override, needle, tmp_path, capsys):
    out = tmp_path / "x"
    args = [a for a in tiny_overrides("synthetic", out) if not a.startswith(override.split("=")[0] + "=")]
    assert main(["train", "tiny", *args, override]) == 2
    assert needle in _one_sentence(capsys)
    assert not (out / "checkpoints").exists()


def test_recipe_path_that_is_a_directory(tmp_path, capsys):
    assert main(["train", str(tmp_path)]) == 2
    assert "is a directory" in _one_sentence(capsys)


def test_full_disk_while_saving_keeps_the_previous_checkpoint(text_file, tmp_path, monkeypatch, capsys):
    real = ckpt.save_file

    def fill_disk(tensors, filename, *a, **k):
        if "step_0000008" in str(filename):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", fill_disk)
    out = tmp_path / "run"
    assert main(["train", "tiny", *tiny_overrides(text_file, out)]) == 2
    line = _one_sentence(capsys)
    survivor = out / "checkpoints" / "step_0000004"
    assert "No space left on device" in line and f"the previous checkpoint {survivor} survives" in line
    checkpoint_io.load_checkpoint(survivor)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "step_0000004"]


def test_full_disk_while_logging_is_one_sentence_and_keeps_the_checkpoints(
    text_file, tmp_path, monkeypatch, capsys
):
    """metrics.jsonl cannot be appended to (the disk filled after step 6): one sentence,
    exit 2, no traceback; the checkpoints written before stay loadable and the run resumes."""
    from neuroplastic.training import metrics

    real_open = open

    def full_after_step_6(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
            if any('"step": 7' in ln for ln in lines):
                f.close()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return f

    monkeypatch.setattr(metrics, "open", full_after_step_6, raising=False)
    out = tmp_path / "run"
    assert main(["train", "tiny", *tiny_overrides(text_file, out)]) == 2
    line = _one_sentence(capsys)
    assert "Could not append to" in line and "No space left on device" in line and "resume" in line
    checkpoint_io.load_checkpoint(out / "checkpoints" / "step_0000004")
    monkeypatch.undo()
    assert main(["train", "tiny", *tiny_overrides(text_file, out), "train.resume=auto"]) == 0


def test_read_only_checkpoints_dir_is_refused_at_setup(text_file, tmp_path, monkeypatch, capsys):
    """Tests run as root, whom chmod does not stop: the probe write is made to fail the way
    a read-only directory fails it (the chmod variant below runs where chmod bites)."""
    real = Path.write_text

    def read_only(self, *a, **k):
        if self.name.startswith(".write-test") and self.parent.name == "checkpoints":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", read_only)
    out = tmp_path / "run"
    assert main(["train", "tiny", *tiny_overrides(text_file, out)]) == 2
    line = _one_sentence(capsys)
    assert "checkpoints" in line and "Permission denied" in line
    assert not (out / "metrics.jsonl").exists()  # refused before the first step


def test_read_only_checkpoints_dir_with_chmod(text_file, tmp_path, capsys):
    ro = tmp_path / "run" / "checkpoints"
    ro.mkdir(parents=True)
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: chmod does not make a directory read-only")
        assert main(["train", "tiny", *tiny_overrides(text_file, tmp_path / "run")]) == 2
        assert "Permission denied" in _one_sentence(capsys)
    finally:
        ro.chmod(0o755)


def test_permission_error_while_saving_is_one_sentence(text_file, tmp_path, monkeypatch, capsys):
    def denied(tensors, filename, *a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(filename))

    monkeypatch.setattr(ckpt, "save_file", denied)
    assert main(["train", "tiny", *tiny_overrides(text_file, tmp_path / "run")]) == 2
    line = _one_sentence(capsys)
    assert "Permission denied" in line and "no earlier checkpoint exists" in line


def test_clearing_a_run_dir_in_use_is_refused_and_keeps_the_lock_file(tmp_path):
    """``demo`` clears its run dir: not while another process holds the lock (one sentence,
    nothing deleted), and never the lock file itself (deleting it would let a second
    process lock a new file while the first still writes)."""
    from neuroplastic.errors import UserError
    from neuroplastic.training.checkpoint import RunLock
    from neuroplastic.training.run import clear_run_dir

    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000002").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    held = RunLock(run).acquire()  # another writer (a second open file description)
    try:
        with pytest.raises(UserError, match="is in use by another neuroplastic process"):
            clear_run_dir(run)
        assert (run / "checkpoints" / "step_0000002").is_dir() and (run / "metrics.jsonl").exists()
    finally:
        held.release()
    inode = (run / ".lock").stat().st_ino
    clear_run_dir(run)
    assert [p.name for p in run.iterdir()] == [".lock"] and (run / ".lock").stat().st_ino == inode
    clear_run_dir(tmp_path / "absent")  # nothing to clear
