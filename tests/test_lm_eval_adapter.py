"""The lm-evaluation-harness adapter (``--model neuroplastic``): lm_eval's evaluator runs
small local task YAMLs (multiple choice, rolling log-likelihood, generation) on a tiny
Qwen2 + LoRA and on one of our GPT checkpoints, and the numbers it logs equal our own
scorer's (and a direct computation from the model's logits)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from conftest import tiny_overrides  # noqa: E402

from neuroplastic.data.cot import synthetic_arithmetic  # noqa: E402
from neuroplastic.evaluation.multiple_choice import make_scorer  # noqa: E402
from neuroplastic.recipes.cot_app import make_tiny_model  # noqa: E402

ITEMS = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1), str(a * b)],
          "label": 0} for a, b in [(1, 2), (3, 4), (5, 6)]]
TEXTS = ["Kai has 3 apples and 4 pears.", "Lea gives away 12 marbles. " * 30]  # the 2nd > window


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    (d / "mc.jsonl").write_text("".join(json.dumps(i) + "\n" for i in ITEMS), encoding="utf-8")
    (d / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {file}\ntest_split: test\n"
    (d / "np_mc.yaml").write_text(
        "task: np_tiny_mc\n" + common.format(file=d / "mc.jsonl")
        + 'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
        + 'doc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        + "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8")
    (d / "np_roll.yaml").write_text(
        "task: np_tiny_rolling\n" + common.format(file=d / "text.jsonl")
        + 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        + "metric_list:\n  - metric: word_perplexity\n    aggregation: weighted_perplexity\n"
        + "    higher_is_better: false\n", encoding="utf-8")
    (d / "np_gen.yaml").write_text(
        "task: np_tiny_gen\n" + common.format(file=d / "mc.jsonl")
        + 'output_type: generate_until\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
        + 'doc_to_target: "{{choices[0]}}"\n'
        + 'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
        + "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def hf_lora(tmp_path_factory):
    """A tiny Qwen2 (window 64 tokens) and a LoRA adapter with non-zero weights."""
    from neuroplastic.models.hf import apply_lora, load_causal_lm, save_adapter

    root = tmp_path_factory.mktemp("lm_eval_model")
    texts = [f"{e.question}\n{e.answer}" for e in synthetic_arithmetic(150, 0, "arith")]
    base = make_tiny_model(root / "base", texts + TEXTS, vocab_size=320, hidden=32, max_positions=64)
    model, tok = load_causal_lm(base)
    model = apply_lora(model, r=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    save_adapter(model, root / "adapter", tok)
    return base, root / "adapter"


def evaluate(lm, tasks_dir: Path, tasks: list[str]):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, log_samples=True)


def direct_loglikelihood(model, ids_ctx: list[int], ids_cont: list[int]) -> float:
    """log p(continuation | context) straight from the logits (window large enough)."""
    ids = torch.tensor([ids_ctx + ids_cont])
    with torch.no_grad():
        logits = model(ids)[0]  # our models: (logits, loss)
    logp = torch.log_softmax(logits[0, :-1].double(), dim=-1)
    targets = ids[0, 1:]
    sel = logp[torch.arange(len(targets)), targets][len(ids_ctx) - 1:]
    return float(sel.sum())


def test_model_is_registered_by_import():
    from lm_eval.api.registry import get_model

    from neuroplastic.evaluation.lm_eval_adapter import NeuroplasticLM

    assert get_model("neuroplastic") is NeuroplasticLM
    assert get_model("hf").__name__ == "HFLM"  # the built-in models are still there


def test_lm_eval_on_hf_lora_equals_our_scorer(tasks_dir, hf_lora):
    from neuroplastic.evaluation.lm_eval_adapter import NeuroplasticLM
    from neuroplastic.models.hf import HFCausalLM, load_adapter, load_causal_lm

    base, adapter = hf_lora
    lm = NeuroplasticLM(pretrained=str(base), adapter=str(adapter), device="cpu", batch_size=4)
    res = evaluate(lm, tasks_dir, ["np_tiny_mc", "np_tiny_rolling", "np_tiny_gen"])
    model, tok = load_causal_lm(base)
    model = HFCausalLM(load_adapter(model, adapter), tok).eval()
    scorer = make_scorer(model, tok, "cpu", 4)

    # multiple choice: each (context, continuation) the harness built, scored by us
    mc = res["samples"]["np_tiny_mc"]
    assert len(mc) == len(ITEMS)
    pairs = [tuple(a) for s in mc for a in s["arguments"]]
    assert pairs[0] == ("Question: What is 1 plus 2?\nAnswer:", " 3")
    theirs = [r[0][0] for s in mc for r in s["resps"]]
    ours = [lp for lp, _ in scorer.loglikelihood(pairs)]
    assert theirs == pytest.approx(ours, abs=1e-6)
    direct = [direct_loglikelihood(model, tok.encode(c, add_special_tokens=False),
                                   tok.encode(x, add_special_tokens=False)) for c, x in pairs]
    assert theirs == pytest.approx(direct, abs=1e-4)
    acc = sum(max(range(3), key=lambda j, s=s: s["resps"][j][0][0]) == 0 for s in mc) / len(mc)
    assert res["results"]["np_tiny_mc"]["acc,none"] == pytest.approx(acc)

    # rolling: the whole text from the start token, in windows of 64 tokens for the long one
    roll = res["samples"]["np_tiny_rolling"]
    theirs = [s["resps"][0][0] for s in roll]
    ids = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    assert len(ids[1]) > scorer.max_length == 64
    ours = [scorer.loglikelihood_tokens([([], i)])[0][0] for i in ids]
    assert theirs == pytest.approx(ours, abs=1e-6)
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    assert theirs[0] == pytest.approx(direct_loglikelihood(model, [start], ids[0]), abs=1e-4)
    assert all(t < 0 for t in theirs)

    # generation: greedy, cut before the first newline
    gen = res["samples"]["np_tiny_gen"]
    from neuroplastic.evaluation.generation import generate_until

    for s in gen:
        ctx, kwargs = s["arguments"][0]
        expected = generate_until(model, tok, ctx, max_new_tokens=6, until=["\n"])
        assert s["resps"][0][0] == expected
        assert "\n" not in expected


def test_lm_eval_string_model_args_on_our_checkpoint(tasks_dir, text_file, tmp_path):
    """`--model neuroplastic --model_args checkpoint=RUN` on one of our own GPT runs."""
    from neuroplastic.cli import main
    from neuroplastic.models.loading import load_trained

    out = tmp_path / "run"
    assert main(["train", "tiny", *tiny_overrides(text_file, out, **{"model.block_size": 32})]) == 0
    res = evaluate_string(tasks_dir, f"checkpoint={out},device=cpu,batch_size=2",
                          ["np_tiny_mc", "np_tiny_rolling"])
    model, tok, _, _ = load_trained(out)
    scorer = make_scorer(model, tok, "cpu", 2)
    mc = res["samples"]["np_tiny_mc"]
    pairs = [tuple(a) for s in mc for a in s["arguments"]]
    theirs = [r[0][0] for s in mc for r in s["resps"]]
    assert theirs == pytest.approx([lp for lp, _ in scorer.loglikelihood(pairs)], abs=1e-6)
    roll = [s["resps"][0][0] for s in res["samples"]["np_tiny_rolling"]]
    ours = [scorer.loglikelihood_tokens([([], tok.encode(t))])[0][0] for t in TEXTS]
    assert roll == pytest.approx(ours, abs=1e-6)
    assert math.isfinite(res["results"]["np_tiny_rolling"]["word_perplexity,none"])


def evaluate_string(tasks_dir: Path, model_args: str, tasks: list[str]):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import neuroplastic.evaluation.lm_eval_adapter  # noqa: F401  (registers "neuroplastic")

    tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model="neuroplastic", model_args=model_args, tasks=tasks,
                                   task_manager=tm, log_samples=True)


def test_bad_model_args_are_user_errors():
    from neuroplastic.errors import UserError
    from neuroplastic.evaluation.lm_eval_adapter import NeuroplasticLM

    with pytest.raises(UserError, match="checkpoint=PATH or pretrained=DIR"):
        NeuroplasticLM()
    with pytest.raises(UserError, match="does not exist"):
        NeuroplasticLM(checkpoint="/no/such/run")


@pytest.mark.slow
def test_documented_command_line(tasks_dir, hf_lora, tmp_path):
    """`python -m neuroplastic.evaluation.lm_eval_adapter --model neuroplastic ...` (the
    lm_eval command line with the model registered) runs a local task."""
    import subprocess
    import sys

    base, adapter = hf_lora
    out = subprocess.run(
        [sys.executable, "-m", "neuroplastic.evaluation.lm_eval_adapter", "--model", "neuroplastic",
         "--model_args", f"pretrained={base},adapter={adapter}", "--device", "cpu",
         "--include_path", str(tasks_dir), "--tasks", "np_tiny_mc", "--batch_size", "2",
         "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "np_tiny_mc" in out.stdout and "acc" in out.stdout


# --------------------------------------------------------------------------- shipped task configs

def _shared(name: str):
    from neuroplastic.data import registry

    found = registry.find_local(name)
    if found is None:
        pytest.skip(f"no local copy of {name} (set NEUROPLASTIC_DATA)")
    return found


def test_shipped_task_configs_read_local_files_offline(monkeypatch):
    """hellaswag, mmlu_<subject> and gsm8k from our include path are lm-eval's prompts on the
    local files; the hub is never asked (HF offline, and datasets.load_dataset is poisoned)."""
    import datasets

    from neuroplastic.evaluation.lm_eval_adapter import task_manager
    from neuroplastic.evaluation.multiple_choice import build_instances

    _shared("hellaswag")
    _shared("mmlu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def no_hub(*a, **k):
        raise AssertionError(f"datasets.load_dataset was called: {a} {k}")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    from lm_eval.tasks import get_task_dict

    tasks = get_task_dict(["hellaswag", "mmlu_anatomy"], task_manager())
    hs = tasks["hellaswag"]
    docs = list(hs.validation_docs())
    ours = build_instances("hellaswag")
    assert len(docs) == len(ours) >= 100
    for doc, inst in zip(docs[:50], ours[:50]):
        assert hs.doc_to_text(doc) == inst.context
        assert [" " + c for c in hs.doc_to_choice(doc)] == inst.continuations
        assert hs.doc_to_target(doc) == inst.gold
    mm = tasks["mmlu_anatomy"]
    mdocs = list(mm.validation_docs())
    mine = build_instances("mmlu", subjects=["anatomy"])
    assert len(mdocs) == len(mine)
    assert mm.config.description + mm.doc_to_text(mdocs[0]) == mine[0].context


def test_shipped_gsm8k_holds_out_what_cot_holds_out(monkeypatch):
    from neuroplastic.data.cot import load_cot_examples, split_examples
    from neuroplastic.evaluation.lm_eval_tasks import gsm8k_dataset

    _shared("gsm8k")
    ds = gsm8k_dataset()
    _, held = split_examples(load_cot_examples("gsm8k"), 0.05, 0)
    assert len(ds["test"]) == len(held) and len(ds["train"]) + len(held) == 7473
    assert [r["question"].strip() for r in ds["test"]] == [e.question for e in held]
    assert not {r["question"] for r in ds["test"]} & {r["question"] for r in ds["train"]}


def test_readme_adapter_command_works_offline(tmp_path, text_file):
    """The README's ``--tasks hellaswag`` line, on a tiny checkpoint, with the hub off."""
    import os
    import subprocess
    import sys

    _shared("hellaswag")
    from conftest import run_cli

    out = tmp_path / "run"
    r = run_cli("train", "tiny", *tiny_overrides(text_file, out))
    assert r.returncode == 0, r.stderr[-2000:]
    import neuroplastic

    src = str(Path(neuroplastic.__file__).resolve().parents[1])  # this tree, from any cwd
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-cache"), "HF_HOME": str(tmp_path / "hf-home")}
    r = subprocess.run(
        [sys.executable, "-m", "neuroplastic.evaluation.lm_eval_adapter", "--model", "neuroplastic",
         "--model_args", f"checkpoint={out}", "--tasks", "hellaswag", "--device", "cpu",
         "--limit", "4"],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "|hellaswag|" in r.stdout and "acc_norm" in r.stdout
    assert "overrides existing task" not in r.stderr


# --------------------------------------------------------------------------- agreement (slow)

def _real_model_default() -> str:
    from neuroplastic.models.registry import model_dir

    return str(model_dir("smollm2-135m-instruct"))  # the registry's cache (models fetch)


REAL_MODEL = Path(os.environ.get("NEUROPLASTIC_REAL_MODEL") or _real_model_default())


def lm_eval_agreement(model_dir: Path, n_hellaswag: int, mmlu_per_subject: int,
                      batch_size: int = 16) -> dict:
    """Per-item agreement of our scorer (``neuroplastic evaluate``'s) with lm-eval's own
    ``hf`` model on the same items of the shared HellaSwag and MMLU (val) files, read by
    our shipped task configs. Returns ``{task: {"n", "acc": (ours, lm-eval, agreement),
    "acc_norm": (...)}}``."""
    import lm_eval

    from neuroplastic.evaluation.lm_eval_adapter import task_manager
    from neuroplastic.evaluation.multiple_choice import evaluate_task, make_scorer
    from neuroplastic.models.hf import load_causal_lm

    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=["hellaswag", "mmlu"],
        device="cpu", batch_size=batch_size, task_manager=task_manager(), log_samples=True,
        limit=None, samples={"hellaswag": list(range(n_hellaswag)),
                             **{f"mmlu_{s}": list(range(mmlu_per_subject)) for s in _mmlu_subjects()}},
    )
    theirs: dict[str, dict] = {"hellaswag": {}, "mmlu": {}}
    for task, samples in out["samples"].items():
        key = "hellaswag" if task == "hellaswag" else "mmlu"
        for s in samples:
            theirs[key][(task, s["doc_id"])] = (s["acc"], s.get("acc_norm", s["acc"]))
    model, tok = load_causal_lm(model_dir, device="cpu")
    scorer = make_scorer(model, tok, "cpu", batch_size)
    ours_hs = evaluate_task(scorer, "hellaswag", limit=n_hellaswag)["items"]
    ours_mm = evaluate_task(scorer, "mmlu", limit_per_subject=mmlu_per_subject)["items"]
    mine: dict[str, dict] = {"hellaswag": {}, "mmlu": {}}
    for i, it in enumerate(ours_hs):
        mine["hellaswag"][("hellaswag", i)] = (float(it["pred"] == it["gold"]),
                                               float(it["pred_norm"] == it["gold"]))
    seen: dict[str, int] = {}
    for it in ours_mm:
        j = seen[it["subject"]] = seen.get(it["subject"], -1) + 1
        mine["mmlu"][(f"mmlu_{it['subject']}", j)] = (float(it["pred"] == it["gold"]),
                                                      float(it["pred_norm"] == it["gold"]))
    table = {}
    for task in ("hellaswag", "mmlu"):
        assert set(mine[task]) == set(theirs[task]), task
        keys = sorted(mine[task])
        row = {"n": len(keys)}
        for m, name in enumerate(("acc", "acc_norm")):
            a = [mine[task][k][m] for k in keys]
            b = [theirs[task][k][m] for k in keys]
            row[name] = (sum(a) / len(a), sum(b) / len(b),
                         sum(x == y for x, y in zip(a, b)) / len(a))
        table[task] = row
    return table


def _mmlu_subjects() -> list[str]:
    from neuroplastic.evaluation.lm_eval_tasks import TASKS_DIR

    return sorted(p.stem[len("mmlu_"):] for p in (TASKS_DIR / "mmlu").glob("mmlu_*.yaml"))


@pytest.mark.slow
def test_per_item_agreement_with_lm_eval_hf_on_the_real_model():
    """>= 99.5 % per-item agreement (acc and acc_norm) with lm-eval's ``hf`` model.
    Sizes: NEUROPLASTIC_AGREEMENT_HS (HellaSwag items, default 200) and
    NEUROPLASTIC_AGREEMENT_MMLU (MMLU items per subject, default 4: 228 items)."""
    if not (REAL_MODEL / "config.json").is_file():
        pytest.skip(f"no real model at {REAL_MODEL} (`neuroplastic models fetch "
                    "smollm2-135m-instruct`, or set NEUROPLASTIC_REAL_MODEL)")
    _shared("hellaswag")
    _shared("mmlu")
    n_hs = int(os.environ.get("NEUROPLASTIC_AGREEMENT_HS", "200"))
    n_mm = int(os.environ.get("NEUROPLASTIC_AGREEMENT_MMLU", "4"))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    table = lm_eval_agreement(REAL_MODEL, n_hs, n_mm)
    print("\n| task | items | metric | neuroplastic | lm-eval hf | per-item agreement |")
    print("|---|---|---|---|---|---|")
    for task, row in table.items():
        for m in ("acc", "acc_norm"):
            ours, theirs, agree = row[m]
            print(f"| {task} | {row['n']} | {m} | {ours:.4f} | {theirs:.4f} | {100 * agree:.1f} % |")
    for task, row in table.items():
        for m in ("acc", "acc_norm"):
            assert row[m][2] >= 0.995, (task, m, row[m])
