"""benchmarks/controlled_generation.py end to end on a microscopic GPT-2, and the held-out
split of synthetic (prompt, reference) pairs that its evaluation relies on."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import controlled_generation as bench  # noqa: E402

from neuroplastic.config import load_config  # noqa: E402
from neuroplastic.data.synthetic import STAGES, SyntheticCurriculum  # noqa: E402
from neuroplastic.errors import UserError  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _micro(out: Path, **kw) -> bench.BenchConfig:
    vals = dict(out=out, size="micro", pretrain_steps=3, pretrain_batch=4, steps=2, batch=2, block=32,
                seeds=[0], max_new_tokens=[6], samples_per_prompt=2, prompts_per_step=1,
                weights={"length": 0.5, "bleu": 0.5}, length_target=4, eval_limit=3, eval_max_new=6,
                progress=False)
    vals.update(kw)
    return bench.BenchConfig(**vals)


def test_benchmark_end_to_end_micro(tmp_path, capsys):
    cfg = _micro(tmp_path / "b")
    res = bench.run_benchmark(cfg)
    # the CLI describes the HF model's own shape (micro: 1 layer x 32), not the recipe's keys
    assert "model: 1 layers x 32 dim" in capsys.readouterr().out
    # the base was built, CE pre-trained through the trainer and exported with save_pretrained
    pre = tmp_path / "b" / "pretrained"
    assert (pre / "config.json").is_file() and (pre / "tokenizer.json").is_file()
    assert res["base"]["pretrain"]["steps"] == 3 and res["params"] > 0
    # both arms ran through `neuroplastic train controlled-generation` with their own lam
    for arm, lam in (("reward", 0.5), ("ce", 0.0)):
        run = Path(res["arms"][arm][0]["run"])
        saved = load_config(str(run / "config.yaml"))
        assert saved.options["lam"] == lam and saved.model.hf.path == str(pre)
        assert saved.train.max_steps == 2 and len(res["arms"][arm][0]["step_s"]) == 2
    # evaluation columns: before / reward arm / CE-only arm, terms of the recipe weights + total
    cols = json.loads((tmp_path / "b" / "seed0-rewards.json").read_text())
    assert list(cols) == ["before", "after", "seed0-ce-only"]
    assert all(0 <= c["new_tokens"] <= 6 for c in cols.values())  # mean generated length
    rows = res["summary"]["rows"]
    assert list(rows) == ["length", "bleu", "total"]
    for r in rows.values():
        assert r["diff"][0] == pytest.approx(r["reward"][0] - r["ce"][0])
    md = bench.table(res["summary"])
    header = md.splitlines()[0]
    assert [c.strip() for c in header.strip("|").split("|")] == bench.COLUMNS
    assert len(md.splitlines()) == 2 + 3 + 1  # + generated tokens
    assert Path(res["png"]).stat().st_size > 1000

    # the docs section: the table part and the timing part coexist and are replaced in place
    doc = tmp_path / "BENCH.md"
    doc.write_text("# Benchmarks\n\n<!-- begin:other -->\nkeep me\n<!-- end:other -->\n")
    body = bench.results_markdown(res, cfg, "python benchmarks/controlled_generation.py --x", "cg.png")
    assert "| total |" in body and "![" in body and "one seed" in body
    assert "| generated tokens (not a reward) |" in body and "stage 6 tok: reward / tokens" in body
    bench.write_part("reward-table", body, doc=doc, intro=bench.INTRO)
    bench.write_part("gpt2-timing", "timing v1\n", doc=doc, intro=bench.INTRO)
    bench.write_part("gpt2-timing", "timing v2\n", doc=doc, intro=bench.INTRO)
    text = doc.read_text()
    assert "keep me" in text and text.count(bench.INTRO.splitlines()[0]) == 1
    assert "timing v2" in text and "timing v1" not in text
    a, b = text.index("<!-- begin:controlled-generation -->"), text.index("<!-- end:controlled-generation -->")
    assert a < text.index("| total |") < text.index("timing v2") < b


def test_summary_with_seeds_gives_ci_and_verdict():
    def col(total, length):
        return {"total": total, "terms": {"length": length}}

    per_seed = [{"before": col(0.1, 0.2), "reward": col(0.5 + d, 0.3), "ce": col(0.2 + d, 0.3)}
                for d in (0.0, 0.01, 0.02)]
    s = bench.summarise(per_seed)
    assert s["rows"]["total"]["diff"][0] == pytest.approx(0.3)
    assert s["rows"]["total"]["verdict"] == "helps"
    assert s["rows"]["length"]["verdict"] == "no detectable effect"
    text = bench.sentence(s, _micro(Path("unused")))
    assert "95% CI over 3 seeds" in text and "helps" in text
    assert "± " in bench.table(s)


def test_timing_mode_groups_steps_by_generation_length(tmp_path):
    cfg = _micro(tmp_path / "t", time_steps=3, max_new_tokens=[4, 6, 8], seeds=[0])
    t = bench.run_timing(cfg)
    for arm in ("reward", "ce"):
        assert set(t["arms"][arm]["by_stage"]) == {"4", "6", "8"}
        assert all(v > 0 for v in t["arms"][arm]["by_stage"].values())
    md = bench.timing_markdown(t, cfg, "python benchmarks/controlled_generation.py --time-steps 3", 300)
    assert "s / step, 8 new tokens" in md and "--model /path/to/gpt2" in md


def test_bad_arguments_are_one_sentence(tmp_path, capsys):
    assert bench.main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not a directory" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(UserError, match="lam"):
        _micro(tmp_path, lam=0.0).validate()
    assert bench.main(["--seeds", "0,x", "--out", str(tmp_path / "o")]) == 2
    assert "comma-separated integers" in capsys.readouterr().err


def test_length_target_text():
    assert bench._length_txt(_micro(Path("unused"))) == "4 tokens"
    assert bench._length_txt(_micro(Path("unused"), length_target=None)) == "20 tokens"  # the recipe's


def test_quick_is_smoke_size():
    cfg, _ = bench.build_config(["--quick"])
    assert (cfg.size, cfg.seeds, cfg.max_new_tokens, cfg.steps) == ("micro", [0, 1], [6], 3)
    cfg, _ = bench.build_config(["--seeds", "3,4", "--max-new-tokens", "30,80,150", "--lora", "8"])
    assert (cfg.size, cfg.seeds, cfg.max_new_tokens, cfg.lora) == ("small", [3, 4], [30, 80, 150], 8)
    assert "model.lora={r: 8, alpha: 16}" in bench.arm_args(cfg, Path("m"), 0.5, 3, Path("o"), 5)


# ----------------------------------------------------------------------------- held-out pairs


def test_pair_splits_partition_by_concept():
    cur = SyntheticCurriculum()
    held = cur.heldout_concepts()
    assert len(held) == len(cur.concepts) // 5
    for stage in STAGES:
        all_, train, heldout = cur.pairs(stage), cur.pairs(stage, "train"), cur.pairs(stage, "heldout")
        assert not set(train) & set(heldout)
        assert sorted(train + heldout) == sorted(all_) and len(heldout) == len(held)
    # a held-out concept is held out in every stage
    subjects = {c.subject for c in cur.concepts if c.name in held}
    assert {p for p, _ in cur.pairs("definitions", "heldout")} == {f"Define {s}." for s in subjects}
    with pytest.raises(UserError, match="split"):
        cur.pairs("definitions", "test")
    assert SyntheticCurriculum().pairs("dialogues") == cur.pairs("dialogues")  # "all" unchanged


def test_reward_training_never_sees_the_evaluation_prompts():
    from neuroplastic.evaluation.rewards_eval import reward_pairs
    from neuroplastic.training.reward import pairs_for

    cfg = load_config("controlled-generation")
    ctx = SimpleNamespace(cfg=cfg)  # a StepContext's cfg is all that synthetic pairs read
    trained = {p for s in STAGES for p in pairs_for(ctx, s)}
    evaluated = reward_pairs(cfg, None, Path("."), 60, seed=0)
    assert len(evaluated) == 60
    assert not trained & set(evaluated)
    heldout = {p for s in STAGES for p in SyntheticCurriculum().pairs(s, "heldout")}
    assert set(evaluated) <= heldout


@pytest.mark.slow
def test_batched_evaluation_outputs_and_docs_from(tmp_path, capsys):
    """--eval-mode batched (the GPU path): the CLI's held-out prompts, batched greedy generation
    equal to one-at-a-time, rows printed per seed, results.md with generations side by side."""
    from neuroplastic.evaluation.rewards_eval import reward_pairs
    from neuroplastic.models.loading import load_trained

    cfg = _micro(tmp_path / "b", eval_mode="batched", eval_limit=4, show=3)
    res = bench.run_benchmark(cfg)
    out = capsys.readouterr().out
    assert "seed 0 | total" in out and "reward - CE" in out and "seed 0 | generated tokens" in out
    cols = json.loads((tmp_path / "b" / "seed0-rewards.json").read_text())
    assert list(cols) == ["before", "after", "seed0-ce-only"]
    assert len(cols["after"]["samples"]) == 3

    run = Path(res["arms"]["reward"][0]["run"])
    model, tok, run_cfg, _ = load_trained(run)
    pairs = bench.held_out_pairs(run_cfg, 4)
    assert pairs == reward_pairs(run_cfg, tok, run, 4, seed=0)
    prompts = [p for p, _ in pairs]
    batched = bench.greedy_batch(model, tok, prompts, 6, "cpu")
    single = [bench.greedy_batch(model, tok, [p], 6, "cpu")[0] for p in prompts]
    assert batched == single

    md = bench.write_outputs(res, cfg, "python benchmarks/controlled_generation.py --x")
    text = md.read_text()
    assert text.startswith("<!-- part:reward-table -->") and "Generations side by side" in text
    side = text.split("| prompt | before (base) | controlled-generation | CE-only |\n|---|---|---|---|\n")[1]
    assert len([line for line in side.splitlines() if line.startswith("| ")]) == 3
    doc = tmp_path / "docs" / "BENCH.md"
    doc.parent.mkdir()
    assert bench.docs_from(tmp_path / "b", doc=doc) == "reward-table"
    assert "Generations side by side" in doc.read_text()
    assert (doc.parent / "controlled_generation.png").stat().st_size > 1000
    with pytest.raises(UserError, match="no results.md"):
        bench.docs_from(tmp_path)
