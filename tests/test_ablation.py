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


def test_ablate_cli_errors():
    r = run_cli("ablate", "tiny", "--rule", "tracez")
    assert r.returncode == 2 and "traces" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("ablate", "tiny", "--rule", "traces", "--seeds", "1")
    assert r.returncode == 2 and "seeds" in r.stderr
