"""Bad input through the real CLI in a subprocess: one sentence on stderr, exit 2."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli, tiny_overrides


def _assert_clean_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_unknown_recipe():
    _assert_clean_error(run_cli("train", "tiyn"), "Unknown recipe", "tiny")


def test_unknown_and_mistyped_keys(tmp_path):
    _assert_clean_error(run_cli("train", "tiny", "model.n_layers=4"), "model.n_layer")
    _assert_clean_error(run_cli("train", "tiny", "model.n_layer=many"), "expects an integer")
    _assert_clean_error(run_cli("train", "tiny", "model.gpt.n_layers=4"), "did you mean 'model.gpt.n_layer'")
    _assert_clean_error(run_cli("train", "tiny", "model.n_layer=2", "model.gpt.n_layer=3"),
                        "model.n_layer=2", "model.gpt.n_layer=3", "same setting")


def test_negative_lr_and_block_size_over_context(tmp_path):
    _assert_clean_error(run_cli("train", "tiny", "train.lr=-0.1"), "train.lr")
    _assert_clean_error(
        run_cli("train", "tiny", "data.block_size=512", "model.block_size=128"),
        "larger than the model context",
    )


@pytest.mark.parametrize("kind", ["missing", "empty", "binary"])
def test_bad_data_files(tmp_path, kind):
    p = tmp_path / f"{kind}.txt"
    if kind == "empty":
        p.write_text("")
    elif kind == "binary":
        p.write_bytes(bytes(range(256)) * 50 + b"\x00" * 100)
    r = run_cli("train", "tiny", *tiny_overrides(p, tmp_path / "out"))
    _assert_clean_error(r, str(p.name))


def test_unwritable_out_dir(tmp_path, text_file):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli("train", "tiny", *tiny_overrides(text_file, blocker / "run"))
    _assert_clean_error(r, "Cannot write")


def test_checkpoint_of_other_shape(tmp_path, text_file):
    out = tmp_path / "run"
    r = run_cli("train", "tiny", *tiny_overrides(text_file, out, **{"train.max_steps": 4}))
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("train", "tiny", *tiny_overrides(text_file, out, **{"model.n_embd": 64}), "--resume")
    _assert_clean_error(r, "model.gpt.n_embd (32 in the checkpoint, 64 now)")


def test_train_evaluate_generate_roundtrip(tmp_path, text_file):
    out = tmp_path / "run"
    r = run_cli("train", "tiny", *tiny_overrides(text_file, out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "val loss" in r.stdout
    r = run_cli("evaluate", str(out), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    metrics = json.loads(r.stdout)
    assert metrics["loss"] > 0 and metrics["bpb"] > 0
    r = run_cli("evaluate", str(out), "--data", str(text_file))
    assert r.returncode == 0 and "bits per byte" in r.stdout
    r = run_cli("generate", str(out), "--prompt", "The heart", "--max-new-tokens", "10",
                "--temperature", "0")
    assert r.returncode == 0 and r.stdout.startswith("The heart")
    _assert_clean_error(run_cli("evaluate", str(tmp_path / "nope")), "does not exist")


def test_recipes_and_help():
    r = run_cli("recipes")
    assert r.returncode == 0 and "tiny" in r.stdout
    r = run_cli("--help")
    assert r.returncode == 0 and "demo" in r.stdout


def test_demo_short_run_val_loss_falls(tmp_path):
    out = tmp_path / "demo"
    r = run_cli("demo", "--steps", "60", "--out", str(out), "train.eval_interval=30",
                "train.ckpt_interval=30", "train.progress=false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    res = json.loads((out / "demo_results.json").read_text())
    assert res["after"]["loss"] < res["before"]["loss"] - 1.0
    assert "before" in r.stdout and "bits per byte" in r.stdout
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "checkpoints" / "step_0000060" / "model.safetensors").is_file()


@pytest.mark.slow
def test_full_demo(tmp_path):
    """The real `neuroplastic demo` (its wall time is recorded in docs/BENCHMARKS.md)."""
    import json

    r = run_cli("demo", "--out", str(tmp_path / "demo"), cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "demo" / "demo_results.json").read_text())
    assert res["after"]["loss"] < 0.5 * res["before"]["loss"]


def _start_training(tmp_path, text_file, out, **extra):
    import os
    import subprocess
    import sys

    args = tiny_overrides(text_file, out, **{"train.max_steps": 100000, "train.ckpt_interval": 20,
                                             "train.eval_interval": 0, **extra})
    env = dict(os.environ)
    return subprocess.Popen([sys.executable, "-m", "neuroplastic", "train", "tiny", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_checkpoint(out, timeout=120):
    import time

    from neuroplastic.models import checkpoint_io

    t0 = time.time()
    while time.time() - t0 < timeout:
        if checkpoint_io.latest_checkpoint(out / "checkpoints") is not None:
            return
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


def test_ctrl_c_saves_and_resume_continues(tmp_path, text_file):
    import signal

    from neuroplastic.models import checkpoint_io
    from neuroplastic.training import checkpoint as ckpt

    out = tmp_path / "run"
    proc = _start_training(tmp_path, text_file, out)
    _wait_for_checkpoint(out)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]  # saved, then 128 + SIGINT
    assert "Traceback" not in stderr
    latest = checkpoint_io.latest_checkpoint(out / "checkpoints")
    stopped_at = int(latest.name.split("_")[1])
    assert stopped_at >= 20 and "Stopped at step" in stderr + stdout
    r = run_cli("train", "tiny", *tiny_overrides(text_file, out, **{
        "train.max_steps": stopped_at + 3, "train.eval_interval": 0}), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming from {latest}" in r.stdout
    assert checkpoint_io.latest_checkpoint(out / "checkpoints").name == ckpt.checkpoint_name(stopped_at + 3)


def test_sigkill_then_resume_from_last_complete_checkpoint(tmp_path, text_file):
    from neuroplastic.models import checkpoint_io

    out = tmp_path / "run"
    proc = _start_training(tmp_path, text_file, out, **{"train.ckpt_interval": 5})
    _wait_for_checkpoint(out)
    import time

    time.sleep(1.0)
    proc.kill()
    proc.communicate(timeout=60)
    latest = checkpoint_io.latest_checkpoint(out / "checkpoints")
    step = int(latest.name.split("_")[1])
    r = run_cli("train", "tiny", *tiny_overrides(text_file, out, **{
        "train.max_steps": step + 2, "train.eval_interval": 0}), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_evaluate_task_malformed_files_exit_2(tmp_path, text_file):
    out = tmp_path / "run"
    r = run_cli("train", "tiny", *tiny_overrides(text_file, out, **{"train.max_steps": 2}))
    assert r.returncode == 0, r.stderr[-2000:]
    bad = tmp_path / "astronomy_val.csv"
    bad.write_text("What is the Sun?,A star,A planet,A moon,A comet,A\nBroken row,only two\n")
    r = run_cli("evaluate", str(out), "--task", "mmlu", "--data", str(bad))
    _assert_clean_error(r, "astronomy_val.csv", "line 2")
    hs = tmp_path / "hs.jsonl"
    hs.write_text('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 0}\n{"ctx": "x"\n')
    r = run_cli("evaluate", str(out), "--task", "hellaswag", "--data", str(hs))
    _assert_clean_error(r, "hs.jsonl", "line 2")
    good = tmp_path / "good_val.csv"
    good.write_text("What is the Sun?,A star,A planet,A moon,A comet,A\n")
    r = run_cli("evaluate", str(out), "--task", "mmlu", "--data", str(good), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert 0.0 <= json.loads(r.stdout)["acc"] <= 1.0


def test_overrides_after_options_are_overrides(tmp_path, capsys):
    from neuroplastic.cli import main

    # parsed as an override (so the unknown key is named), not as an unrecognized argument
    assert main(["train", "tiny", "--out", str(tmp_path / "r"), "model.n_layerz=3"]) == 2
    assert "n_layer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["train", "tiny", "--bogus-flag"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus-flag" in capsys.readouterr().err
