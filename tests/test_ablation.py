from __future__ import annotations

import json
import math

import pytest

from neuroplastic.errors import UserError
from neuroplastic.evaluation.ablation import MetricSummary, mean_ci, t_quantile, verdict
from neuroplastic.training.ablate import arm_configs, run_ablation
from tests.conftest import run_cli, tiny_overrides


def test_mean_ci_hand_computed():
    m, h = mean_ci([1.0, 2.0, 3.0])
    # sd = 1, se = 1/sqrt(3), t(0.975, 2) = 4.303
    assert m == 2.0 and h == pytest.approx(4.3027 / math.sqrt(3), rel=1e-3)
    assert math.isnan(mean_ci([5.0])[1])
    assert t_quantile(2) == pytest.approx(4.3027, rel=1e-3)


def test_verdicts():
    assert verdict(-0.5, 0.1, higher_is_better=False) == "helps"  # loss went down
    assert verdict(-0.5, 0.1, higher_is_better=True) == "hurts"
    assert verdict(0.05, 0.1, higher_is_better=True) == "no detectable effect"
    assert verdict(0.5, float("nan"), higher_is_better=True) == "no detectable effect"
    # a difference with zero spread: zero-width interval strictly below 0
    s = MetricSummary("loss", False, [2.0, 2.1, 2.2], [1.5, 1.6, 1.7]).compute()
    assert s.diff_mean == pytest.approx(-0.5) and s.diff_ci == pytest.approx(0.0, abs=1e-9)
    assert s.verdict == "helps"
    s2 = MetricSummary("loss", False, [2.0, 2.1, 2.3], [1.5, 1.6, 1.7]).compute()
    assert s2.verdict == "helps"


def test_arm_configs_differ_only_in_rules():
    from neuroplastic.config import load_config

    base = load_config("tiny")
    without, with_ = arm_configs(base, ["traces"])
    assert [r["type"] for r in with_.plasticity.rules] == ["traces"]
    assert without.plasticity.rules == []
    assert with_.reward.interval == without.reward.interval > 0  # reward measured in both arms
    a, b = without.to_dict(), with_.to_dict()
    a.pop("plasticity"), b.pop("plasticity")
    assert a == b
    with pytest.raises(UserError, match="traces"):
        arm_configs(base, ["tracez"])


def test_run_ablation_small(tmp_path):
    over = tiny_overrides("synthetic", tmp_path / "unused", **{
        "data.max_chars": 6000, "train.max_steps": 6, "reward.interval": 3,
        "reward.num_prompts": 2, "reward.max_new_tokens": 4})
    report = run_ablation("tiny", ["traces"], seeds=2, overrides=over, out_dir=tmp_path / "abl",
                          mc_limit=8, echo=lambda s: None, progress=False)
    names = [m.name for m in report.metrics]
    assert names == ["val_loss", "val_bpb", "reward", "mc_acc_norm"]
    for m in report.metrics:
        assert len(m.without) == len(m.with_) == 2
        assert m.verdict in ("helps", "hurts", "no detectable effect")
    md = (tmp_path / "abl" / "ablation.md").read_text()
    assert "| val_loss | lower |" in md
    assert json.loads((tmp_path / "abl" / "ablation.json").read_text())["rules"] == ["traces"]
    assert (tmp_path / "abl" / "ablation.png").stat().st_size > 1000
    # with traces and a reward, the arms really differ
    vl = report.metrics[0]
    assert vl.without != vl.with_
    # traces got a reward at steps 3 and 6 and updated then
    assert [r.acted for r in report.runs if r.arm == "with"] == [{"traces": 2}, {"traces": 2}]
    assert report.exit_code == 0 and "Runs: 2 of 2 seeds complete." in md


def test_ablate_cli_errors():
    r = run_cli("ablate", "tiny", "--rule", "tracez")
    assert r.returncode == 2 and "traces" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("ablate", "tiny", "--rule", "traces", "--seeds", "1")
    assert r.returncode == 2 and "seeds" in r.stderr


# ----------------------------------------------------------------- interrupted / failed runs, rules that never acted


def _fast(tmp_path, **extra):
    vals = {"data.max_chars": 6000, "train.max_steps": 6, "reward.interval": 0}
    vals.update(extra)
    return tiny_overrides("synthetic", tmp_path / "unused", **vals)


def _arm_file(out, seed, arm):
    return json.loads((out / f"seed{seed}-{arm}" / "ablation_arm.json").read_text())["run"]


def test_sigterm_cut_run_is_marked_no_verdict_nonzero_exit_and_rerun_continues_it(tmp_path, monkeypatch, capsys):
    """A SIGTERM during seed 1's 'with' run: the trainer saves and stops at step 4 of 6; the
    ablation must not score it as complete, must give no verdict, must exit 143, and the
    same command run again keeps the finished runs and continues the cut one."""
    import os
    import signal

    from neuroplastic.cli import main
    from neuroplastic.training.trainer import Trainer

    out = tmp_path / "abl"
    argv = ["ablate", "tiny", "--rule", "homeostasis", "--seeds", "2", "--mc-limit", "0", "--out", str(out),
            *_fast(tmp_path)]
    real_step = Trainer.train_step
    sent = []

    def step_and_maybe_signal(self):
        if self.run_dir.name == "seed1-with" and self.step == 3 and not sent:
            sent.append(self.step)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", step_and_maybe_signal)
    assert main(argv) == 143
    captured = capsys.readouterr()
    assert "incomplete (1 of 2 seeds complete)" in captured.err
    md = (out / "ablation.md").read_text()
    assert "Runs: 1 of 2 seeds complete; seed 1 with: interrupted at step 4 of 6" in md
    assert "| 1 | with | interrupted at step 4 of 6 | 4 of 6 |" in md
    doc = json.loads((out / "ablation.json").read_text())
    assert doc["exit_code"] == 143 and doc["complete_seeds"] == [0]
    for m in doc["metrics"]:
        assert m["verdict"] == "no verdict: 1 of 2 seeds complete"
        assert len(m["with_"]) == len(m["without"]) == 1  # the cut seed is left out
    assert _arm_file(out, 1, "with")["status"] == "interrupted"

    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "seed 0 without: complete in" in captured.out and "(kept)" in captured.out
    assert "seed 1    with: continuing from step 4" in captured.out
    doc = json.loads((out / "ablation.json").read_text())
    assert doc["exit_code"] == 0 and doc["complete_seeds"] == [0, 1]
    assert "continuing the unfinished ablation" in captured.out
    assert not (out / "ablation.incomplete").exists()
    assert all(m["verdict"] in ("helps", "hurts", "no detectable effect") for m in doc["metrics"])
    run = _arm_file(out, 1, "with")
    assert run["status"] == "complete" and run["step"] == 6
    assert run["acted"] == {"homeostasis": 6}  # counted across the interruption (rule state)
    steps = [json.loads(line)["step"] for line in (out / "seed1-with" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("kind", "train") == "train" and "loss" in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def fail_arm(monkeypatch, run_name: str) -> None:
    """Make the arm whose run directory is ``run_name`` fail (an out-of-memory error)."""
    from neuroplastic.training.trainer import Trainer

    real_train = Trainer.train

    def train(self, stop_at=None):
        if self.run_dir.name == run_name:
            raise RuntimeError("out of memory")
        return real_train(self, stop_at)

    monkeypatch.setattr(Trainer, "train", train)


def test_failed_run_is_marked_and_left_out(tmp_path, monkeypatch):
    fail_arm(monkeypatch, "seed0-with")
    report = run_ablation("tiny", ["homeostasis"], seeds=2, overrides=_fast(tmp_path), out_dir=tmp_path / "abl",
                          mc_limit=0, echo=lambda s: None, progress=False)
    status = {(r.seed, r.arm): r.describe() for r in report.runs}
    assert status == {(0, "without"): "complete", (0, "with"): "failed at step 0 of 6: out of memory",
                      (1, "without"): "complete", (1, "with"): "complete"}
    assert report.exit_code == 1 and report.complete_seeds() == [1]
    assert {m.verdict for m in report.metrics} == {"no verdict: 1 of 2 seeds complete"}


def test_run_stopped_short_without_a_flag_is_not_complete(tmp_path, monkeypatch):
    """Ground truth is the step reached, not the trainer's flag."""
    from neuroplastic.training.trainer import Trainer

    real_train = Trainer.train
    monkeypatch.setattr(Trainer, "train", lambda self, stop_at=None: real_train(
        self, 2 if self.run_dir.name == "seed1-without" else stop_at))
    report = run_ablation("tiny", ["homeostasis"], seeds=2, overrides=_fast(tmp_path), out_dir=tmp_path / "abl",
                          mc_limit=0, echo=lambda s: None, progress=False)
    bad = [r for r in report.runs if not r.complete]
    assert [(r.seed, r.arm, r.status, r.step) for r in bad] == [(1, "without", "failed", 2)]
    assert report.exit_code == 1
    assert all(m.verdict.startswith("no verdict") for m in report.metrics)


def test_rule_that_never_acted_gets_no_verdict_and_progress_names_seed_and_arm(tmp_path, capsys):
    """EWC on `tiny` never consolidates (no task boundary), so its penalty is never in the
    loss: the arms are identical and the table must say so instead of 'no detectable effect'."""
    report = run_ablation("tiny", ["ewc"], seeds=2, overrides=_fast(tmp_path, **{"train.max_steps": 3}),
                          out_dir=tmp_path / "abl", mc_limit=0, echo=lambda s: None, progress=True)
    assert {m.verdict for m in report.metrics} == {"did not act in this budget"}
    assert [r.acted for r in report.runs if r.arm == "with"] == [{"ewc": 0}, {"ewc": 0}]
    md = (tmp_path / "abl" / "ablation.md").read_text()
    assert "ewc never acted in the runs that have it" in md
    assert "| 0 | with | complete | 3 of 3 | 0 |" in md
    err = capsys.readouterr().err
    for desc in ("run 1/4 seed 0 without", "run 2/4 seed 0 with", "run 4/4 seed 1 with"):
        assert desc in err
    assert "0/3 [" in err  # a bar over the run's steps


def test_rules_count_the_steps_they_acted_on():
    import torch

    from neuroplastic.plasticity.engine import PlasticityEngine
    from neuroplastic.plasticity.ewc import EWC
    from neuroplastic.plasticity.traces import Traces

    model = torch.nn.Linear(4, 3)
    ewc, traces = EWC(lam=1.0), Traces()
    engine = PlasticityEngine(model, [ewc, traces])
    model(torch.randn(2, 4)).sum().backward()
    engine.after_backward()
    engine.after_step(reward=None)  # no reward: traces do not update; nothing consolidated
    assert (ewc.acted, traces.acted) == (0, 0)
    ewc.add_task([torch.ones_like(p) for p in ewc.params])
    engine.after_step(reward=1.0)
    engine.after_step(reward=0.5)
    assert (ewc.acted, traces.acted) == (2, 2)
    state = engine.state_dict()
    fresh = PlasticityEngine(torch.nn.Linear(4, 3), [EWC(lam=1.0), Traces()])
    fresh.load_state_dict(state)
    assert [r.acted for r in fresh.rules] == [2, 2]


def test_reward_rule_without_a_reward_in_budget_gets_no_verdict(tmp_path):
    """traces need a reward; ablate computes one every 10 steps, so a 4-step run never gets one."""
    report = run_ablation("tiny", ["traces"], seeds=2, overrides=_fast(tmp_path, **{
        "train.max_steps": 4, "reward.interval": 0, "reward.num_prompts": 1, "reward.max_new_tokens": 2}),
        out_dir=tmp_path / "abl", mc_limit=0, echo=lambda s: None, progress=False)
    assert [r.acted for r in report.runs if r.arm == "with"] == [{"traces": 0}, {"traces": 0}]
    assert {m.verdict for m in report.metrics} == {"did not act in this budget"}


@pytest.mark.slow
def test_cli_sigterm_mid_ablation_exits_143_and_rerun_finishes(tmp_path):
    """The reported case, end to end: SIGTERM to `neuroplastic ablate` while a run trains."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "abl"
    cmd = [sys.executable, "-m", "neuroplastic", "ablate", "tiny", "--rule", "homeostasis", "--seeds", "2",
           "--mc-limit", "0", "--out", str(out), *_fast(tmp_path, **{"train.max_steps": 400, "train.ckpt_interval": 50})]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in ["src", os.environ.get("PYTHONPATH", "")] if p))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = out / "seed0-without" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 20):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 143, stderr[-2000:]
    assert "seed 0 without: interrupted at step" in stdout and "no statistics and no verdict yet" in stdout
    assert "Traceback" not in stderr
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "seed 0 without: continuing from step" in r.stdout and "Runs: 2 of 2 seeds complete." in r.stdout


def test_arms_written_before_the_model_config_had_sections_are_kept(tmp_path, monkeypatch):
    """An unfinished ablation whose arm files hold the old flat model settings continues
    with its complete arms kept, not trained again."""
    fail_arm(monkeypatch, "seed0-with")
    out = tmp_path / "abl"
    first = run_ablation("tiny", ["homeostasis"], seeds=2, overrides=_fast(tmp_path), out_dir=out,
                         mc_limit=0, echo=lambda s: None, progress=False)
    assert first.exit_code == 1
    monkeypatch.undo()  # the arm trains normally again
    for arm in ("seed0-without", "seed1-without", "seed1-with"):
        path = out / arm / "ablation_arm.json"
        doc = json.loads(path.read_text())
        m = doc["settings"]["config"]["model"]
        hf = dict(m["hf"])
        flat = {k: m[k] for k in ("arch", "vocab_size", "block_size")}
        flat.update({**m["gpt"], **m["hebbian"], "hf_path": hf.pop("path"), **hf})
        doc["settings"]["config"]["model"] = flat
        path.write_text(json.dumps(doc, indent=2))
    said = []
    report = run_ablation("tiny", ["homeostasis"], seeds=2, overrides=_fast(tmp_path), out_dir=out,
                          mc_limit=0, echo=said.append, progress=False)
    kept = sorted(line.split(":")[0] for line in said if line.endswith("(kept)"))
    assert kept == ["seed 0 without", "seed 1    with", "seed 1 without"]
    assert report.exit_code == 0 and report.complete_seeds() == [0, 1]
