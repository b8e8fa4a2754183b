"""neuroplastic-cot: data and formatting, ALR by complexity, EWC across tasks, Hebbian on
LoRA, and `neuroplastic cot train | evaluate | demo` end to end on a tiny local Qwen2.

The model is built from a config (2 layers, 32 dims, a BPE tokenizer trained on the
synthetic problems, a Qwen-style chat template), saved with ``save_pretrained`` and
loaded back; nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from neuroplastic.cli import main  # noqa: E402
from neuroplastic.data.cot import (  # noqa: E402
    CotBatches,
    CotExample,
    CotFormatter,
    answers_match,
    collate,
    complexity,
    encode_examples,
    extract_prediction,
    final_answer,
    load_cot_examples,
    normalize_number,
    split_examples,
    synthetic_arithmetic,
)
from neuroplastic.errors import UserError  # noqa: E402
from neuroplastic.plasticity import AdaptiveLR, PlasticityEngine  # noqa: E402
from neuroplastic.recipes.cot_app import (  # noqa: E402
    cot_config,
    forgetting_summary,
    make_tiny_model,
    train_cot,
)

GSM8K_ANSWER = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)
# small and quick: 128-token examples, 8 per batch, no LoRA dropout (no RNG in training)
FAST = [
    "model.block_size=128", "options.synthetic_size=200", "train.batch_size=8",
    "train.grad_accum=1", "train.warmup_steps=0", "train.progress=false",
    "train.tensorboard=false", "train.keep_best=false", "train.ckpt_interval=1000",
    "model.lora.dropout=0",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny chat Qwen2 and task A (multiplication problems) as a .jsonl file."""
    root = tmp_path_factory.mktemp("cot")
    texts = [f"{e.question}\n{e.answer}" for e in
             synthetic_arithmetic(200, 1, "arith-mul") + synthetic_arithmetic(200, 1, "arith")]
    model = make_tiny_model(root / "model", texts, vocab_size=400, hidden=32, max_positions=256)
    task_a = root / "taska.jsonl"
    task_a.write_text("".join(json.dumps({"question": e.question, "answer": e.answer}) + "\n"
                              for e in synthetic_arithmetic(60, 3, "arith-mul")), encoding="utf-8")
    # task B for the forgetting test: the same kind of questions, answered without reasoning
    # in another format -- it interferes with task A as much as a task can
    task_b = root / "taskb.jsonl"
    task_b.write_text("".join(
        json.dumps({"question": e.question, "answer": f"The result is {e.final}.\n#### {e.final}"})
        + "\n" for e in synthetic_arithmetic(60, 4, "arith-mul")), encoding="utf-8")
    return {"root": root, "model": model, "task_a": task_a, "task_b": task_b}


@pytest.fixture(scope="module")
def hf_tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny["model"]))


def run_main(*args: str, capsys=None) -> tuple[int, str, str]:
    code = main(list(args))
    if capsys is None:
        return code, "", ""
    out = capsys.readouterr()
    return code, out.out, out.err


def metrics(run_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x]
    return [r for r in rows if r.get("kind") == kind]


def one_sentence(err: str) -> bool:
    """stderr ends with one error line (progress bars of model loading may come before)."""
    lines = [x for x in err.strip().splitlines() if x.strip()]
    msg = lines[-1].removeprefix("neuroplastic: error: ") if lines else ""
    return lines[-1].startswith("neuroplastic: error: ") and msg.endswith(".") and "Traceback" not in err


# ----------------------------------------------------------------------------- answers


def test_final_answer_extraction_and_exact_match():
    assert final_answer(GSM8K_ANSWER) == "72"
    assert final_answer("no marker") is None
    assert normalize_number("$1,200.50") == "1200.5"
    assert normalize_number("72.0") == "72" and normalize_number("-3") == "-3"
    assert normalize_number("abc") is None
    assert extract_prediction("so she has 5 + 3 = 8.\n#### 8\nQuestion: 9") == "8"
    assert extract_prediction("The answer is 1,200.") == "1200"
    assert extract_prediction("first 3 then 4 and finally 12 apples") == "12"
    assert extract_prediction("no number here") is None
    assert answers_match("72", "72") and answers_match("72", "72.00")
    assert not answers_match("71", "72") and not answers_match(None, "72")


def test_complexity_measures():
    assert complexity(GSM8K_ANSWER, "steps") == 2
    assert complexity(GSM8K_ANSWER, "operations") == 2  # 48/2 and 48+24
    assert complexity("A + B means 3 + 4 - 2 = 5\n#### 5", "operations") == 2  # no annotations
    assert complexity(GSM8K_ANSWER, "numbers") == 6  # 48 2 24 48 24 72 outside <<...>>
    assert complexity(GSM8K_ANSWER, "tokens", answer_tokens=17) == 17
    with pytest.raises(UserError, match="complexity measure"):
        complexity(GSM8K_ANSWER, "depth")
    # longer solutions are more complex under every measure
    short, long_ = "a = <<1+1=2>>2\n#### 2", "a = <<1+1=2>>2\nb = <<2*3=6>>6\nc = <<6-1=5>>5\n#### 5"
    for m in ("steps", "operations", "numbers"):
        assert complexity(long_, m) > complexity(short, m)


def test_synthetic_tasks_are_deterministic_and_correct():
    a, b = synthetic_arithmetic(50, 7, "arith"), synthetic_arithmetic(50, 7, "arith")
    assert a == b and a != synthetic_arithmetic(50, 8, "arith")
    for e in a + synthetic_arithmetic(50, 7, "arith-mul"):
        calcs = re.findall(r"<<([^=<>]+)=([^<>]+)>>", e.answer)
        assert calcs and all(eval(expr) == float(val) for expr, val in calcs)  # noqa: S307
        assert e.final == normalize_number(calcs[-1][1])
    assert {complexity(e.answer, "steps") for e in a} >= {1.0, 2.0, 3.0, 4.0}


def test_load_and_split(tmp_path, tiny):
    ex = load_cot_examples(str(tiny["task_a"]))
    assert len(ex) == 60 and ex[0].final is not None and ex[0].task == "taska"
    train, val = split_examples(ex, 0.1, seed=0)
    assert len(val) == 6 and len(train) == 54
    assert split_examples(ex, 0.1, seed=0) == (train, val)
    assert not {e.question for e in train} & {e.question for e in val}
    assert len(split_examples(ex, 0.5, seed=0, max_val=4)[1]) == 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="question.*answer"):
        load_cot_examples(str(bad))
    with pytest.raises(UserError, match="not question/answer"):
        load_cot_examples("tinyshakespeare")
    with pytest.raises(UserError, match="neither a file"):
        load_cot_examples("no-such-data")


@pytest.mark.skipif(not Path("../shared/data/gsm8k/train.jsonl").is_file()
                    and not Path(__file__).resolve().parents[2].joinpath("shared/data/gsm8k/train.jsonl").is_file(),
                    reason="GSM8K is not in ../shared/data")
def test_gsm8k_from_the_registry():
    ex = load_cot_examples("gsm8k", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    assert len(ex) == 7473 and ex[0].final == "72"
    assert all(e.final is not None for e in ex)


# ----------------------------------------------------------------------------- formatting


def test_chat_template_and_loss_on_the_answer_only(hf_tokenizer):
    fmt = CotFormatter(hf_tokenizer)
    assert fmt.chat
    ex = synthetic_arithmetic(1, 0, "arith")[0]
    prompt = fmt.prompt(ex.question)
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    enc = fmt.encode(ex, max_len=512)
    answer_ids = enc.ids[enc.n_prompt:]
    assert hf_tokenizer.decode(answer_ids).startswith(ex.answer)
    # the assistant turn ends as the template writes it: "<|im_end|>\n"
    eos = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert eos == hf_tokenizer.eos_token_id and answer_ids[-2:] == [eos] + hf_tokenizer.encode("\n")
    x, y = collate([enc], pad_id=hf_tokenizer.pad_token_id)
    assert (y[0, : enc.n_prompt - 1] == -100).all()
    assert y[0, enc.n_prompt - 1 :].tolist() == answer_ids  # exactly the answer is trained on
    assert x[0].tolist() == enc.ids[:-1]
    # a shorter example in the same batch is padded: pad targets are -100 too
    enc2 = fmt.encode(synthetic_arithmetic(3, 5, "arith")[2], max_len=512)
    x, y = collate([enc, enc2], pad_id=hf_tokenizer.pad_token_id)
    assert int((y != -100).sum()) == (len(enc.ids) - enc.n_prompt) + (len(enc2.ids) - enc2.n_prompt)


def test_plain_format_without_chat_template(hf_tokenizer):
    fmt = CotFormatter(hf_tokenizer, chat=False)
    ex = CotExample("What is 2+3?", "2+3 = <<2+3=5>>5\n#### 5", "5")
    assert fmt.prompt(ex.question).endswith("Question: What is 2+3?\nAnswer:")
    enc = fmt.encode(ex, max_len=512)
    assert enc.ids[-1] == hf_tokenizer.eos_token_id
    assert fmt.stop_strings and "\nQuestion:" in fmt.stop_strings
    # too long: the answer is cut, the prompt kept; nothing fits -> None
    cut = fmt.encode(ex, max_len=enc.n_prompt + 2)
    assert cut.n_prompt == enc.n_prompt and len(cut.ids) == enc.n_prompt + 2
    assert CotFormatter(hf_tokenizer, instruction="").encode(ex, max_len=1) is None


def test_batches_resume_exactly(hf_tokenizer):
    fmt = CotFormatter(hf_tokenizer)
    tasks = {n: encode_examples(fmt, synthetic_arithmetic(13, i, n), 256)
             for i, n in enumerate(("arith", "arith-mul"))}
    a = CotBatches(tasks, batch_size=4, pad_id=0, seed=3)
    for _ in range(5):  # into the second epoch
        a.next_batch()
    a.set_task("arith-mul")
    a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    b = CotBatches(tasks, batch_size=4, pad_id=0, seed=3)
    b.load_state_dict(state)
    for _ in range(4):
        for t1, t2 in zip(a.next_batch(), b.next_batch()):
            assert torch.equal(t1, t2)
    a.set_task("arith")
    b.set_task("arith")
    assert all(torch.equal(t1, t2) for t1, t2 in zip(a.next_batch(), b.next_batch()))
    assert math.isfinite(a.step_complexity())
    with pytest.raises(UserError, match="differs"):
        CotBatches({"arith": tasks["arith"][:5]}, 4, 0).load_state_dict(state)


def test_lm_metrics_ignore_masked_targets():
    from neuroplastic.evaluation.lm import lm_metrics

    class Uniform(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(*x.shape, 10), None

    y = torch.tensor([[1, 2, -100, -100]])
    m = lm_metrics(Uniform(), [(torch.zeros_like(y), y)], torch.ones(10, dtype=torch.long))
    assert m["tokens"] == 2 and m["loss"] == pytest.approx(math.log(10))


def test_adaptive_lr_can_ignore_the_loss():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    values = iter([1.0, 3.0])
    rule = AdaptiveLR(complexity=lambda: next(values), use_loss=False, ema_decay=0.5, max_mult=5.0)
    engine = PlasticityEngine(model, [rule], optimizer=opt)
    for loss in (100.0, 0.01):
        rule.observe(loss)  # ignored: the complexity callable decides
        model(torch.ones(1, 2)).sum().backward()
        engine.after_backward()
        opt.step()
        engine.after_step()
    assert rule.complexity == pytest.approx(3.0 / 1.0) and rule.multiplier == pytest.approx(3.0)
    assert opt.param_groups[0]["lr"] == 1.0  # restored after the step


# ----------------------------------------------------------------------------- training


def train_run(tiny, out: Path, techniques, steps=8, extra=(), lr=1e-2, task_b="arith", plots=False):
    cfg = cot_config(
        out, model_name=str(tiny["model"]), techniques=techniques,
        tasks=[str(tiny["task_a"]), task_b],
        overrides=[*FAST, f"train.max_steps={steps}", f"train.lr={lr}", f"train.min_lr={lr}",
                   f"train.eval_interval={max(1, steps // 2)}", *extra],
    )
    return train_cot(cfg, fresh=True, plots=plots)


@pytest.mark.parametrize("flag", ["--use_alr", "--use_ewc", "--use_hebbian", "--use_all", None])
def test_cot_train_each_flag(tiny, tmp_path, capsys, flag):
    out = tmp_path / "run"
    args = ["cot", "train", "--model_name", str(tiny["model"]), "--output-dir", str(out),
            "--lora", "--tasks", f"{tiny['task_a']},arith", "--max_steps", "6",
            "--learning_rate", "0.01", "--ewc_lambda", "100", *FAST, "train.eval_interval=3"]
    code, stdout, _ = run_main(*args, *([flag] if flag else []), capsys=capsys)
    assert code == 0, stdout
    summary = json.loads((out / "cot_summary.json").read_text())
    expected = {"--use_alr": ["adaptive_lr"], "--use_ewc": ["ewc"], "--use_hebbian": ["hebbian"],
                "--use_all": ["adaptive_lr", "ewc", "hebbian"], None: []}[flag]
    assert summary["rules"] == expected
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert summary["trainable_params"] < 20_000  # LoRA only
    steps = metrics(out, "cot")
    assert len(steps) == 6 and all(math.isfinite(r["loss"]) for r in steps)
    assert {r["task"] for r in steps} == {"taska", "arith"}
    assert ("lr_multiplier" in steps[0]) == ("adaptive_lr" in expected)
    assert ("hebbian_update_norm" in steps[0]) == ("hebbian" in expected)
    if "hebbian" in expected:
        assert all(r["hebbian_update_norm"] > 0 for r in steps)
        assert (out / "hebbian_norms.png").stat().st_size > 1000
    if "ewc" in expected:
        assert summary["consolidations"] == 1 and len(metrics(out, "consolidate")) == 1
        assert all(r["ewc_penalty"] > 0 for r in steps[4:])  # after the switch at step 3
        assert (out / "fisher_per_layer.png").stat().st_size > 1000
        fisher = json.loads((out / "fisher.json").read_text())
        assert set(fisher["per_layer"]) == {"layer 0", "layer 1"}
        assert set(fisher["per_layer_module"]["layer 1"]) == {
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert all(("lora_A" in n or "lora_B" in n) for n in fisher["per_param"])
    if "adaptive_lr" in expected:
        assert (out / "lr_vs_complexity.png").stat().st_size > 1000
    assert "run dir:" in stdout and "held-out loss" in stdout


def test_hebbian_acts_on_lora_down_projections(tiny, tmp_path):
    from neuroplastic.training.trainer import Trainer

    cfg = cot_config(tmp_path / "h", model_name=str(tiny["model"]), techniques=["hebbian"],
                     tasks=[str(tiny["task_a"])], overrides=[*FAST, "train.max_steps=1"])
    trainer = Trainer(cfg).setup()
    rule = trainer.engine.rule("hebbian")
    assert rule.names and all(".lora_A." in n for n in rule.names)
    assert len(rule.names) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down


def test_alr_multiplier_grows_with_batch_complexity(tiny, tmp_path):
    res = train_run(tiny, tmp_path / "alr", ["alr"], steps=16,
                    extra=["options.complexity=steps", "options.tasks=[arith]"])
    rows = metrics(res["run_dir"], "cot")
    xs = torch.tensor([r["complexity"] for r in rows])
    ms = torch.tensor([r["lr_multiplier"] for r in rows])
    assert xs.std() > 0.1  # batches differ in complexity
    corr = torch.corrcoef(torch.stack([xs, ms]))[0, 1]
    assert corr > 0.9, (xs, ms)
    hi, lo = xs > xs.median(), xs < xs.median()
    assert ms[hi].mean() > ms[lo].mean()
    # and the optimizer really used base lr x multiplier
    assert all(r["lr"] == pytest.approx(1e-2 * r["lr_multiplier"]) for r in rows)


@pytest.mark.parametrize("measure", ["operations", "loss"])
def test_alr_other_complexity_measures(tiny, tmp_path, measure):
    res = train_run(tiny, tmp_path / measure, ["alr"], steps=4,
                    extra=[f"options.complexity={measure}", "options.tasks=[arith]"])
    rows = metrics(res["run_dir"], "cot")
    assert all(math.isfinite(r["lr_multiplier"]) for r in rows)
    assert len({round(r["lr_multiplier"], 6) for r in rows}) > 1  # the multiplier moves


def test_ewc_lowers_task_a_loss_after_task_b(tiny, tmp_path):
    """Continual setting (A: multiplication problems with reasoning; B: the same kind of
    questions answered in another format): with EWC (lambda 1000) the held-out loss of
    task A after training on B is lower than without, for fixed seeds; training on B does
    make the plain run forget A (the setting is meaningful)."""
    diffs = []
    for seed in (0, 1):
        losses = {}
        for techs in ([], ["ewc"]):
            res = train_run(tiny, tmp_path / f"s{seed}{len(techs)}", techs, steps=20,
                            task_b=str(tiny["task_b"]),
                            extra=[f"train.seed={seed}", "train.eval_interval=20",
                                   "plasticity.rules=[{type: ewc, lam: 1000}]"])
            losses[bool(techs)] = forgetting_summary(Path(res["run_dir"]), "taska")
            if techs:
                assert res["consolidations"] == 1
        assert losses[False]["forgetting"] > 0.5  # B makes the plain run forget A
        assert losses[False]["task_a_loss_after_a"] == pytest.approx(losses[True]["task_a_loss_after_a"])
        diffs.append(losses[True]["task_a_loss_end"] - losses[False]["task_a_loss_end"])
    assert all(d < 0 for d in diffs), diffs


def test_ablate_ewc_in_the_continual_setting(tiny, tmp_path):
    from neuroplastic.training.ablate import run_ablation

    report = run_ablation(
        "neuroplastic-cot", ["ewc"], seeds=2, mc_limit=0, progress=False,
        out_dir=tmp_path / "ablate", overrides=[
            f"model={tiny['model']}", f"data.source={tiny['task_a']}",
            f"options.tasks=[{tiny['task_a']}, arith]", "plasticity.rules=[{type: ewc, lam: 100}]",
            *FAST, "train.max_steps=6", "train.lr=5e-3", "train.eval_interval=6",
        ],
    )
    names = {m.name: m for m in report.metrics}
    assert {"val_loss", "taska_loss", "arith_loss"} <= set(names)
    assert names["taska_loss"].higher_is_better is False
    assert len(names["taska_loss"].with_) == 2
    assert (tmp_path / "ablate" / "ablation.md").is_file()
    # EWC consolidated after task A, so its penalty was in the loss of task B's steps
    acted = [r.acted["ewc"] for r in report.runs if r.arm == "with"]
    assert len(acted) == 2 and all(0 < a < 6 for a in acted), acted
    assert names["taska_loss"].verdict != "did not act in this budget"


def test_resume_continues_the_task_sequence(tiny, tmp_path):
    """Interrupted after task A and resumed: the same losses as one uninterrupted run."""
    from neuroplastic.training.trainer import Trainer

    def cfg(out, resume="none"):
        return cot_config(out, model_name=str(tiny["model"]), techniques=["alr", "ewc", "hebbian"],
                          tasks=[str(tiny["task_a"]), "arith"],
                          overrides=[*FAST, "train.max_steps=6", "train.ckpt_interval=3",
                                     "train.lr=1e-2", f"train.resume={resume}"])

    Trainer(cfg(tmp_path / "full")).train()
    Trainer(cfg(tmp_path / "part")).train(stop_at=3)
    Trainer(cfg(tmp_path / "part", "auto")).train()
    full = [r["loss"] for r in metrics(tmp_path / "full", "cot")]
    part = [r["loss"] for r in metrics(tmp_path / "part", "cot")]
    assert len(full) == 6 and part == full


# ----------------------------------------------------------------------------- evaluate


class ScriptedLM(torch.nn.Module):
    """Generates a fixed text per prompt (to check the accounting of evaluate_cot)."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        super().__init__()
        self.tok = tokenizer
        self.answers = answers
        self.w = torch.nn.Parameter(torch.zeros(1))

    def generate(self, idx, max_new_tokens, eos_id=None, **kw):
        prompt = self.tok.decode(idx[0].tolist())
        text = next(v for k, v in self.answers.items() if k in prompt)
        ids = self.tok.encode(text, add_special_tokens=False)[:max_new_tokens] + [eos_id]
        return torch.cat([idx, torch.tensor([ids])], dim=1)


def test_evaluate_cot_exact_match_and_records(hf_tokenizer):
    from neuroplastic.evaluation.cot import evaluate_cot

    ex = [CotExample("How many is 2 and 3?", "2+3=5\n#### 5", "5"),
          CotExample("How many is 4 and 4?", "4+4=8\n#### 8", "8"),
          CotExample("How many is 1 and 1?", "1+1=2\n#### 2", "2")]
    model = ScriptedLM(hf_tokenizer, {
        "2 and 3": "2 + 3 = 5\n#### 5\nextra text after the answer",
        "4 and 4": "4 + 4 = 9\n#### 9",
        "1 and 1": "it is 1 + 1 so the answer is 2.",
    })
    res = evaluate_cot(model, hf_tokenizer, ex, max_new_tokens=64, progress=False)
    assert res["n"] == 3 and res["correct"] == 2 and res["accuracy"] == pytest.approx(2 / 3)
    first = res["examples"][0]
    assert first["generated"] == "2 + 3 = 5\n#### 5"  # cut after the #### line
    assert [r["predicted"] for r in res["examples"]] == ["5", "9", "2"]
    assert [r["correct"] for r in res["examples"]] == [True, False, True]


def test_cot_evaluate_cli(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    train_run(tiny, out, ["ewc"], steps=4)
    results = tmp_path / "results.json"
    code, stdout, _ = run_main("cot", "evaluate", "--model_path", str(out), "--output_file",
                               str(results), "--num_examples", "3", "--max_new_tokens", "12",
                               "--device", "cpu", capsys=capsys)
    assert code == 0
    res = json.loads(results.read_text())
    assert res["n"] == 3 and 0.0 <= res["accuracy"] <= 1.0
    assert res["model"]["kind"] == "lora adapter"
    assert res["model"]["base_model"] == str(tiny["model"])
    assert res["chat_template"] is True
    for r in res["examples"]:
        assert {"question", "reference", "generated", "predicted", "gold", "correct"} <= set(r)
        assert r["gold"] is not None
    # the held-out questions of task A, as in training
    train, val = split_examples(load_cot_examples(str(tiny["task_a"])), 0.05, 0, 200)
    assert [r["question"] for r in res["examples"]] == [e.question for e in val[:3]]
    assert "exact match" in stdout
    # an adapter directory with an explicit base model, and a plain HF model, load too
    code, _, _ = run_main("cot", "evaluate", "--model-path", str(out / "adapter"), "--base-model",
                          str(tiny["model"]), "--data", "arith", "--num-examples", "2",
                          "--max-new-tokens", "4", "--output-file", str(results), "--device", "cpu")
    assert code == 0 and json.loads(results.read_text())["n"] == 2
    code, _, _ = run_main("cot", "evaluate", "--model_path", str(tiny["model"]), "--data", "arith",
                          "--num_examples", "1", "--max_new_tokens", "4", "--output_file",
                          str(results), "--device", "cpu")
    assert code == 0 and json.loads(results.read_text())["model"]["kind"] == "hugging face model"
    # sampling (the seed's --temperature 0.7 --top_p 0.9) is seeded: the same twice
    sampled = []
    for _ in range(2):
        code, _, _ = run_main("cot", "evaluate", "--model_path", str(out), "--num_examples", "2",
                              "--max_new_tokens", "8", "--temperature", "0.7", "--top_p", "0.9",
                              "--output_file", str(results), "--device", "cpu")
        assert code == 0
        res = json.loads(results.read_text())
        assert res["top_p"] == 0.9 and res["temperature"] == 0.7
        sampled.append([r["generated"] for r in res["examples"]])
    assert sampled[0] == sampled[1]


def test_cot_demo_end_to_end(tiny, tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, _ = run_main(
        "cot", "demo", "--model_name", str(tiny["model"]), "--use_all", "--num_examples", "2",
        "--output_dir", str(out), "--steps", "4", "--data", str(tiny["task_a"]),
        "--max_new_tokens", "12", *FAST, "train.eval_interval=2", capsys=capsys,
    )
    assert code == 0
    res = json.loads((out / "demo_results.json").read_text())
    assert [v["variant"] for v in res["variants"]] == [
        "baseline", "alr", "ewc", "hebbian", "alr+ewc+hebbian"]
    assert len(res["side_by_side"]) == 2
    for name in ("loss_per_technique", "lr_vs_complexity", "fisher_per_layer", "hebbian_norms",
                 "forgetting_curves"):
        png = out / f"{name}.png"
        assert png.is_file() and png.stat().st_size > 1000, name
        assert res["plots"][name] == str(png)
    assert "BASE (" in stdout and "TUNED (" in stdout and "forgetting" in stdout


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("args, needle", [
    (["cot", "train", "--model_name", "/no/such/model", "--output_dir", "x"], "not a local directory"),
    (["cot", "train", "--model_name", "MODEL", "--data", "arith", "--tasks", "arith,arith-mul"],
     "either --data"),
    (["cot", "train", "--model_name", "MODEL", "--tasks", "arith", "options.complexity=depth"],
     "options.complexity"),
    (["cot", "evaluate", "--model_path", "/no/such/dir"], "does not exist"),
    (["cot", "evaluate", "--model_path", "MODEL", "--batch_size", "0"], "--batch_size"),
    (["cot", "demo", "--num_examples", "2"], "needs a model"),
    (["cot"], "Name a cot command"),
])
def test_user_errors_are_one_sentence(tiny, tmp_path, capsys, args, needle):
    args = [a.replace("MODEL", str(tiny["model"])) for a in args]
    if "--output_dir" not in args and args[:2] == ["cot", "train"]:
        args += ["--output_dir", str(tmp_path / "o")]
    code, _, err = run_main(*args, capsys=capsys)
    assert code == 2
    assert needle in err and one_sentence(err), err


def test_adapter_without_base_model_is_a_user_error(tiny, tmp_path):
    from neuroplastic.models.loading import load_any_model

    out = tmp_path / "run"
    train_run(tiny, out, [], steps=2)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    lonely = tmp_path / "adapter"
    lonely.mkdir()
    for f in (out / "adapter").iterdir():
        if f.name != "neuroplastic_base.json":  # that record would name the base
            (lonely / f.name).write_bytes(f.read_bytes())
    (lonely / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="needs its base model"):
        load_any_model(lonely)
    model, _, info = load_any_model(lonely, base_model=str(tiny["model"]))
    assert info["kind"] == "lora adapter"


def test_recipe_runs_through_the_plain_train_command(tiny, tmp_path, capsys):
    out = tmp_path / "plain"
    code, stdout, _ = run_main(
        "train", "neuroplastic-cot", f"model={tiny['model']}", f"data.source={tiny['task_a']}",
        *FAST, "train.max_steps=3", "train.eval_interval=3", f"train.out_dir={out}", capsys=capsys,
    )
    assert code == 0
    steps = metrics(out, "cot")
    assert len(steps) == 3 and "lr_multiplier" in steps[0] and "hebbian_update_norm" in steps[0]
    evals = metrics(out, "eval")
    assert evals and math.isfinite(evals[-1]["loss"])


# ----------------------------------------------------------------------------- any output is scored

HUGE = "1" + "0" * 29  # 30 digits: beyond Decimal's default 28-digit precision


def test_numbers_beyond_decimal_precision_are_scored_never_an_error():
    assert normalize_number(HUGE) == HUGE
    assert normalize_number("12345678901234567890123456789.5") == "12345678901234567890123456789.5"
    assert normalize_number("1e30") == "1" + "0" * 30 and normalize_number("1E+30") == "1" + "0" * 30
    assert normalize_number("0.5e-3") == "0.0005"
    for junk in ("9" * 5000, "1e999999999", "1e-5000", "nan", "inf", "-inf", "1e", "--3"):
        assert normalize_number(junk) is None, junk
    assert extract_prediction(f"so the total is {HUGE}\n#### {HUGE}") == HUGE
    assert extract_prediction("#### " + "9" * 5000) is None  # unparseable: scored as wrong
    assert extract_prediction("the answer is 1e30") == "1"  # "1e30" is not one number in text
    assert answers_match(normalize_number(HUGE + ".0"), HUGE)
    assert not answers_match(normalize_number(HUGE + "1"), HUGE)


def test_evaluate_cot_scores_huge_and_odd_numbers(hf_tokenizer):
    from neuroplastic.evaluation.cot import evaluate_cot

    ex = [CotExample("Question one?", f"x\n#### {HUGE}", HUGE),
          CotExample("Question two?", "x\n#### 5", "5"),
          CotExample("Question three?", "x\n#### 5", "5"),
          CotExample("Question four?", "x\n#### 7", "7")]
    model = ScriptedLM(hf_tokenizer, {
        "one": f"{HUGE[:10]},{HUGE[10:]}\n#### {HUGE}",
        "two": "#### " + "9" * 3000,
        "three": "it is 1e30",
        "four": "#### 12345678901234567890123456789012345.25",
    })
    res = evaluate_cot(model, hf_tokenizer, ex, max_new_tokens=4000, progress=False)
    assert res["n"] == 4 and res["correct"] == 1
    assert [r["correct"] for r in res["examples"]] == [True, False, False, False]
    preds = [r["predicted"] for r in res["examples"]]
    assert preds[0] == HUGE and preds[2] == "30"
    assert set(preds[1]) == {"9"} and len(preds[1]) > 28  # generation stops after a chunk
    assert preds[3] == "12345678901234567890123456789012345.25"


# ----------------------------------------------------------------------------- progress bars


def test_cot_train_and_demo_show_a_per_step_bar(tiny, tmp_path, capsys):
    quiet = [o for o in FAST if not o.startswith("train.progress")]
    code, _, err = run_main(
        "cot", "train", "--model_name", str(tiny["model"]), "--output_dir", str(tmp_path / "t"),
        "--data", str(tiny["task_a"]), "--max_steps", "3", *quiet, "train.eval_interval=3",
        capsys=capsys)
    assert code == 0 and re.search(r"\b3/3 ", err), err[-2000:]
    code, _, err = run_main(
        "cot", "demo", "--model_name", str(tiny["model"]), "--use_alr", "--num_examples", "1",
        "--output_dir", str(tmp_path / "d"), "--steps", "2", "--data", str(tiny["task_a"]),
        "--max_new_tokens", "4", *quiet, "train.eval_interval=2", capsys=capsys)
    assert code == 0
    assert len(re.findall(r"\b2/2 ", err)) >= 2, err[-2000:]  # baseline and alr, a bar each


# ----------------------------------------------------------------------------- held-out split


def test_split_is_deterministic_and_never_overlaps():
    examples = synthetic_arithmetic(300, 0, "arith")
    # a question repeated in the file must not end up on both sides
    examples = examples + [CotExample(e.question, e.answer, e.final, "dup") for e in examples[:40]]
    train, val = split_examples(examples, 0.1, 0, 200)
    again = split_examples(examples, 0.1, 0, 200)
    assert (train, val) == again
    assert len(val) == 34
    assert not {e.question for e in train} & {e.question for e in val}
    bigger = split_examples(examples, 0.2, 0, 200)[1]
    assert set(map(id, val)) <= set(map(id, bigger))  # more held out extends, never reshuffles
    assert split_examples(examples, 0.1, 1, 200)[1] != val


@pytest.mark.skipif(not Path("/work/shared/data/gsm8k/train.jsonl").is_file()
                    and not Path("../shared/data/gsm8k/train.jsonl").is_file(),
                    reason="the shared GSM8K file is absent")
def test_gsm8k_held_out_split_is_the_documented_one():
    data_dir = next(str(p) for p in (Path("/work/shared/data"), Path("../shared/data"))
                    if (p / "gsm8k" / "train.jsonl").is_file())
    examples = load_cot_examples("gsm8k", data_dir)
    assert len(examples) == 7473
    train, val = split_examples(examples, 0.05, 0, 200)  # the recipe's defaults
    assert (len(train), len(val)) == (7273, 200)
    assert not {e.question for e in train} & {e.question for e in val}
    order = __import__("numpy").random.default_rng([0, 1234]).permutation(7473)
    assert [e.question for e in val] == [examples[i].question for i in sorted(order[:200])]


# ----------------------------------------------------------------------------- batched generation


def test_batched_generation_matches_one_at_a_time(tiny, hf_tokenizer):
    from neuroplastic.evaluation.cot import evaluate_cot
    from neuroplastic.models.loading import load_any_model

    model, tok, _ = load_any_model(tiny["model"])
    examples = load_cot_examples(str(tiny["task_a"]))[:5]
    one = evaluate_cot(model, tok, examples, max_new_tokens=16, progress=False)
    many = evaluate_cot(model, tok, examples, max_new_tokens=16, progress=False, batch_size=3)
    assert many["batch_size"] == 3 and one["batch_size"] == 1
    assert [r["generated"] for r in many["examples"]] == [r["generated"] for r in one["examples"]]
    # prompts of different lengths are left-padded: a prompt alone gives the same text
    alone = evaluate_cot(model, tok, examples[4:], max_new_tokens=16, progress=False, batch_size=3)
    assert alone["examples"][0]["generated"] == one["examples"][4]["generated"]


def test_answer_loglik_is_the_reference_likelihood(tiny):
    from neuroplastic.evaluation.cot import answer_loglik
    from neuroplastic.models.loading import load_any_model

    model, tok, _ = load_any_model(tiny["model"])
    fmt = CotFormatter(tok)
    examples = load_cot_examples(str(tiny["task_a"]))[:3]
    lls = answer_loglik(model, fmt, examples, batch_size=2, max_len=256)
    for ex, ll in zip(examples, lls):
        enc = fmt.encode(ex, 256)
        x, y = collate([enc], 0)
        with torch.no_grad():
            logits, loss = model(x, y)
        assert ll["solution_ll"] == pytest.approx(-float(loss), abs=1e-4)
        # "#### N" summed by hand from the same teacher-forced log-probs
        text = fmt.answer_text(ex.question, ex.answer)
        k = text.rindex("####")
        a = len(tok.encode(text[:k], add_special_tokens=False))
        z = len(tok.encode(text[: k + len(f"#### {ex.final}")], add_special_tokens=False))
        logp = torch.log_softmax(logits[0].float(), -1)
        want = sum(float(logp[enc.n_prompt + j - 1, enc.ids[enc.n_prompt + j]]) for j in range(a, z))
        assert ll["final_ll"] == pytest.approx(want, abs=1e-4) and ll["final_ll"] < 0


def test_cot_evaluate_cli_batched_with_loglik(tiny, tmp_path, capsys):
    results = tmp_path / "r.json"
    code, stdout, _ = run_main("cot", "evaluate", "--model_path", str(tiny["model"]), "--data",
                               str(tiny["task_a"]), "--num_examples", "3", "--max_new_tokens", "8",
                               "--batch_size", "3", "--loglik", "--output_file", str(results),
                               "--device", "cpu", capsys=capsys)
    assert code == 0
    res = json.loads(results.read_text())
    assert res["batch_size"] == 3 and res["mean_solution_ll"] < 0 and res["final_ll_n"] == 3
    assert all(r["solution_ll"] < 0 for r in res["examples"])
    assert "log-lik" in stdout


# ----------------------------------------------------------------------------- the ablation script


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_cot_ablation_benchmark_end_to_end(tiny, tmp_path, capsys, workers):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "cot_ablation", Path(__file__).resolve().parents[1] / "benchmarks" / "cot_ablation.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "abl"
    code = bench.main([
        "--model", str(tiny["model"]), "--data", str(tiny["task_a"]), "--seeds", "2",
        "--steps", "4", "--eval-examples", "3", "--eval-batch-size", "3", "--max-new-tokens", "6",
        "--variants", "baseline,ewc", "--batch-size", "4", "--block-size", "128",
        "--loss-examples", "3", "--out", str(out), "--device", "cpu", "--workers", str(workers), "--ewc-lambda", "1000",
        "model.lora.dropout=0", "train.lr=1e-2"])
    assert code == 0
    stdout = capsys.readouterr().out
    # a row per model as it finishes (workers print to the real stdout, not captured here)
    assert re.search(r"base \(untuned\): EM 0\.\d{4} \(\d/3\)", stdout)
    if workers == 1:
        assert len(re.findall(r"seed \d (LoRA only|\+EWC): EM", stdout)) == 4
    rows = sorted(p.name for p in (out / "rows").iterdir())
    assert rows == ["seed0-baseline.json", "seed0-ewc.json", "seed1-baseline.json", "seed1-ewc.json"]
    res = json.loads((out / "results.json").read_text())
    assert set(res["runs"]) == {"baseline", "ewc"} and all(len(v) == 2 for v in res["runs"].values())
    for row in res["runs"]["ewc"]:
        assert row["n"] == 3 and row["solution_ll"] < 0 and math.isfinite(row["forgetting"])
        assert row["acted"]["ewc"] > 0  # the penalty acts after the switch to task B
        assert row["ewc_penalty_end"] > 0
        assert row["interrupted"] is False and row["steps"] == 4
    assert res["meta"]["ewc_lambda"] == 1000
    assert "lam: 1000" in (out / "ewc" / "seed0" / "config.yaml").read_text()
    table = (out / "table.md").read_text()
    assert "| LoRA only |" in table and "| +EWC |" in table and "| base (untuned) |" in table
    assert (out / "forgetting.png").stat().st_size > 1000
    # the docs section is written from the JSON afterwards, and replaced (not appended) next time
    docs = tmp_path / "COT.md"
    docs.write_text("# COT\n\nintro\n", encoding="utf-8")
    for _ in range(2):
        assert bench.main(["--docs-from", str(out / "results.json"), "--docs-file", str(docs)]) == 0
    text = docs.read_text()
    assert text.startswith("# COT\n\nintro\n") and text.count("<!-- begin:cot-real -->") == 1
    assert "| +EWC |" in text and (tmp_path / "cot_real_forgetting.png").is_file()
    assert json.loads((tmp_path / "results" / "cot-real.json").read_text()) == res  # for --add


def test_cot_ablation_benchmark_losses_only(tiny, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "cot_ablation", Path(__file__).resolve().parents[1] / "benchmarks" / "cot_ablation.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "abl0"
    assert bench.main(["--model", str(tiny["model"]), "--data", str(tiny["task_a"]), "--seeds", "1",
                       "--steps", "2", "--eval-examples", "0", "--variants", "baseline",
                       "--batch-size", "4", "--block-size", "128", "--loss-examples", "3",
                       "--out", str(out), "--device", "cpu"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["base"] is None
    row = res["runs"]["baseline"][0]
    assert "em" not in row and math.isfinite(row["task_a_loss_end"])
    table = (out / "table.md").read_text()
    # no exact-match / log-likelihood columns without generation; the title says so
    assert "| row | task-A loss when A ended |" in table and "exact match" not in table.split("|")[1]
    assert "(CPU, losses only)" in table and "No generation or answer log-likelihood" in table
    # --docs-key writes its own section and leaves the default one alone
    docs = tmp_path / "COT.md"
    docs.write_text("# COT\n\n<!-- begin:cot-real -->\nGPU table\n<!-- end:cot-real -->\n",
                    encoding="utf-8")
    assert bench.main(["--docs-from", str(out / "results.json"), "--docs-file", str(docs),
                       "--docs-key", "cot-real-cpu"]) == 0
    text = docs.read_text()
    assert "GPU table" in text and text.count("<!-- begin:cot-real-cpu -->") == 1
    assert (tmp_path / "cot_real_cpu_forgetting.png").is_file()


def test_cot_ablation_add_variants_to_an_earlier_run(tiny, tmp_path):
    """--add trains only the new variants; the earlier rows are kept unchanged and the
    table pairs them by seed; a run of other settings is refused in one sentence."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "cot_ablation", Path(__file__).resolve().parents[1] / "benchmarks" / "cot_ablation.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "abl"
    common = ["--model", str(tiny["model"]), "--data", str(tiny["task_a"]), "--seeds", "2",
              "--steps", "2", "--eval-examples", "0", "--batch-size", "4", "--block-size", "128",
              "--loss-examples", "3", "--out", str(out), "--device", "cpu", "model.lora.dropout=0"]
    with pytest.raises(SystemExit, match="no earlier run"):
        bench.main([*common, "--variants", "ewc", "--add"])
    assert bench.main([*common, "--variants", "baseline"]) == 0
    before = json.loads((out / "results.json").read_text())
    assert bench.main([*common, "--variants", "ewc", "--add"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["runs"]) == ["baseline", "ewc"]
    assert res["runs"]["baseline"] == before["runs"]["baseline"]  # kept, not retrained
    assert [r["seed"] for r in res["runs"]["ewc"]] == [0, 1]
    assert sorted(p.name for p in (out / "rows").iterdir()) == [
        "seed0-baseline.json", "seed0-ewc.json", "seed1-baseline.json", "seed1-ewc.json"]
    assert "`, then `" in res["meta"]["command"] and res["meta"]["elapsed_s"] > before["meta"]["elapsed_s"]
    table = (out / "table.md").read_text()
    assert "| +EWC | task-A loss after B |" in table  # paired with the kept baseline
    # rerunning a kept variant replaces its rows; other settings are refused
    with pytest.raises(SystemExit, match="steps=2, this one 4"):
        bench.main([*common, "--variants", "ewc", "--add", "--steps", "4"])
    with pytest.raises(SystemExit, match="fewer seeds"):
        bench.main([*common, "--variants", "ewc", "--add", "--seeds", "3"])
    assert json.loads((out / "results.json").read_text())["runs"] == res["runs"]
