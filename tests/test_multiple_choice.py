"""Tests for multiple-choice evaluation (neuroplastic.evaluation.multiple_choice)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from neuroplastic.config import ModelConfig
from neuroplastic.data import registry
from neuroplastic.data.tokenizers import BPETokenizer, ByteTokenizer
from neuroplastic.errors import UserError
from neuroplastic.evaluation.hellaswag import load_hellaswag
from neuroplastic.evaluation.mmlu import load_mmlu, mmlu_prompt
from neuroplastic.evaluation.multiple_choice import (
    GPTScorer,
    HFScorer,
    LogLikelihoodScorer,
    build_instances,
    evaluate_task,
    make_scorer,
)
from neuroplastic.models import GPT

BYTES = ByteTokenizer()

# Requests of very different lengths: short, long contexts (cut on the left), an empty
# context, shared contexts, and a continuation longer than the 32-token window.
REQUESTS = [
    ("The heart is", " an organ"),
    ("The heart is", " a planet"),
    ("Water boils at one hundred degrees Celsius at sea level. " * 3, " Mars"),
    ("", "Mars is a planet."),
    ("Q: What is a triangle?\nA:", " It has three sides."),
    ("A triangle has", " three sides and its angles add up to one hundred eighty degrees."),
    ("x", " y"),
    ("Ends with a space ", "here"),
]


def tiny_gpt(block_size: int = 32, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_flat(vocab_size=BYTES.vocab_size, block_size=block_size, n_layer=2, n_head=2,
                      n_embd=32, mlp_ratio=2.0, **kw)
    model = GPT(cfg)
    with torch.no_grad():  # larger weights: peaked, position-dependent logits
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def hand_loglikelihood(logits_fn, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """log p(cont | ctx) from log_softmax over the whole sequence, by hand."""
    ids = torch.tensor([(ctx + cont)[:-1]])  # the last token is only a target
    with torch.no_grad():
        logprobs = F.log_softmax(logits_fn(ids)[0].float(), dim=-1)
    total, greedy = 0.0, True
    for j, tok in enumerate(cont):
        row = logprobs[len(ctx) - 1 + j]
        total += float(row[tok])
        greedy = greedy and int(row.argmax()) == tok
    return total, greedy


# --------------------------------------------------------------------------- scorers


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_gpt_loglikelihood_matches_hand_computation(pos):
    model = tiny_gpt(block_size=64, pos=pos)
    scorer = GPTScorer(model, BYTES, batch_size=3)
    reqs = [r for r in REQUESTS if len(BYTES.encode(r[0] + r[1])) <= 64 and r[0] and r[0][-1] != " "]
    got = scorer.loglikelihood(reqs)
    for (ctx, cont), (ll, greedy) in zip(reqs, got):
        want, want_greedy = hand_loglikelihood(lambda x: model(x)[0], BYTES.encode(ctx), BYTES.encode(cont))
        assert ll == pytest.approx(want, abs=1e-5)
        assert greedy == want_greedy


def test_gpt_context_is_cut_from_the_left():
    model = tiny_gpt(block_size=16)
    ctx, cont = BYTES.encode("A long context that does not fit."), BYTES.encode(" ok")
    [(ll, _)] = GPTScorer(model, BYTES).loglikelihood_tokens([(ctx, cont)])
    whole = (ctx + cont)[-17:]
    want, _ = hand_loglikelihood(lambda x: model(x)[0], whole[:-3], whole[-3:])
    assert ll == pytest.approx(want, abs=1e-5)


def test_greedy_flag_on_the_argmax_continuation():
    model = tiny_gpt(block_size=64)
    ctx = BYTES.encode("The heart is")
    ids = list(ctx)
    for _ in range(4):  # greedy decode four tokens
        ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    greedy_cont = ids[len(ctx):]
    other = [(greedy_cont[0] + 1) % 256] + greedy_cont[1:]
    (_, g1), (_, g2) = GPTScorer(model, BYTES).loglikelihood_tokens([(ctx, greedy_cont), (ctx, other)])
    assert g1 is True and g2 is False


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_gpt_batched_equals_one_at_a_time(pos):
    model = tiny_gpt(block_size=32, pos=pos)
    one = GPTScorer(model, BYTES, batch_size=1).loglikelihood(REQUESTS)
    many = GPTScorer(model, BYTES, batch_size=5, progress=True).loglikelihood(REQUESTS)
    for (a, ga), (b, gb) in zip(one, many):
        assert a == pytest.approx(b, abs=1e-5)
        assert ga == gb
    # each request alone (no sharing of rows between requests)
    for req, (b, _) in zip(REQUESTS, many):
        [(a, _)] = GPTScorer(model, BYTES, batch_size=1).loglikelihood([req])
        assert a == pytest.approx(b, abs=1e-5)


def test_long_continuation_is_scored_in_windows():
    model = tiny_gpt(block_size=8)
    ctx, cont = BYTES.encode("abc"), BYTES.encode("defghijklmnopqrst")  # 17 tokens > 8
    [(ll, greedy)] = GPTScorer(model, BYTES).loglikelihood_tokens([(ctx, cont)])
    w = ctx + cont  # 20 tokens; targets 3..19 in windows of 8 from the end (lm-eval rolling)
    pieces = [(w[11:19], w[12:20]), (w[3:11], w[4:12]), (w[0:3], w[3:4])]
    want = 0.0
    for inp, targets in pieces:
        got = hand_loglikelihood(lambda x: model(x)[0], inp[: len(inp) - len(targets) + 1],
                                 inp[len(inp) - len(targets) + 1 :] + targets[-1:])
        want += got[0]
    assert ll == pytest.approx(want, abs=1e-4) and greedy is False


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    text = "The heart is an organ that pumps blood. Mars is a planet with two moons. " * 20
    bpe = BPETokenizer.train([text], vocab_size=300)
    bpe.save(root / "tok")
    cfg = transformers.GPT2Config(vocab_size=bpe.vocab_size, n_positions=32, n_embd=32,
                                  n_layer=2, n_head=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(root / "model")
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "model").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(root / "tok")
    return model, hf_tok, bpe


def test_hf_batched_equals_one_at_a_time_and_hand(hf_pair):
    model, hf_tok, bpe = hf_pair
    one = HFScorer(model, hf_tok, batch_size=1).loglikelihood(REQUESTS)
    many = HFScorer(model, hf_tok, batch_size=4).loglikelihood(REQUESTS)
    ours = HFScorer(model, bpe, batch_size=3).loglikelihood(REQUESTS)  # our tokenizer, same ids
    for (a, ga), (b, gb), (c, _) in zip(one, many, ours):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb
        assert c == pytest.approx(b, abs=1e-5)
    scorer = HFScorer(model, hf_tok)
    assert scorer.max_length == 32 and isinstance(make_scorer(model, hf_tok), HFScorer)
    for (ctx, cont), (ll, greedy) in zip(REQUESTS, many):
        c_ids = hf_tok.encode(ctx, add_special_tokens=False)
        x_ids = hf_tok.encode(cont, add_special_tokens=False)
        if not c_ids or ctx.endswith(" ") or len(c_ids) + len(x_ids) > 32:
            continue
        want, want_greedy = hand_loglikelihood(lambda x: model(input_ids=x).logits, c_ids, x_ids)
        assert ll == pytest.approx(want, abs=1e-5) and greedy == want_greedy


# --------------------------------------------------------------------------- tasks


class Oracle(nn.Module):
    """A fake LM that puts (almost) all mass on the next byte of whichever gold text
    (context + right continuation) the input so far is a prefix of; uniform elsewhere."""

    def __init__(self, golds: list[list[int]]):
        super().__init__()
        self.config = SimpleNamespace(block_size=1 << 16)
        self.golds = golds
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, idx):
        B, T = idx.shape
        logits = torch.zeros(B, T, BYTES.vocab_size)
        for b in range(B):
            row = idx[b].tolist()
            for g in self.golds:
                m = 0
                while m < min(len(row), len(g)) and row[m] == g[m]:
                    m += 1
                for t in range(min(m, len(g) - 1)):
                    logits[b, t, g[t + 1]] = 30.0
        return logits, None


def write_mmlu(root: Path) -> Path:
    rows = {
        "astronomy": [
            ("Which planet is red?", "Venus", "Mars", "Jupiter", "Saturn", "B"),
            ("How many moons has Mars?", "0", "1", "2", "3", "C"),
            ("What is the Sun?", "A star", "A planet", "A moon", "A comet", "A"),
            ('A question, with "quotes"\nand a newline', "x", "y", "z", "w", "D"),
        ],
        "high_school_biology": [
            ("What pumps blood?", "The lungs", "The heart", "The liver", "The skin", "B"),
            ("Cells come from?", "Cells", "Rocks", "Air", "Water", "A"),
        ],
    }
    import csv

    for split in ("val", "dev"):
        (root / split).mkdir(parents=True)
        for subject, items in rows.items():
            with open(root / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(items)
    return root


def write_hellaswag(path: Path) -> Path:
    items = [
        {"ind": 0, "activity_label": "Cooking", "ctx": "A man cracks an egg. he",
         "endings": ["flies away.", "puts it in a pan.", "sings.", "reads a [title] book."], "label": 1},
        {"ind": 1, "activity_label": "Running", "ctx": "A woman runs down a track. she",
         "endings": ["jumps over a hurdle.", "eats soup.", "falls asleep.", "paints."], "label": 0},
        {"ind": 2, "activity_label": "Swimming", "ctx": "A boy dives into a pool. the boy",
         "endings": ["climbs a tree.", "drives.", "swims to the other side.", "cooks."], "label": "2"},
    ]
    path.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "task,kw",
    [
        ("synthetic-mc", dict(limit=12, shots=0)),
        ("synthetic-mc", dict(limit=8, shots=2)),
        ("synthetic-completion", dict(limit=12, shots=1)),
        ("mmlu", dict(shots=0)),
        ("mmlu", dict(shots=2)),
        ("hellaswag", dict(shots=0)),
        ("hellaswag", dict(shots=1)),
    ],
)
def test_model_that_knows_the_answers_scores_100(task, kw, tmp_path):
    if task == "mmlu":
        kw["data_path"] = write_mmlu(tmp_path / "mmlu")
    elif task == "hellaswag":
        kw["data_path"] = write_hellaswag(tmp_path / "hs.jsonl")
    instances = build_instances(task, **kw)
    golds = [BYTES.encode(i.context + i.continuations[i.gold]) for i in instances]
    result = evaluate_task(GPTScorer(Oracle(golds), BYTES, batch_size=4), task, **kw)
    assert result["task"] == task and result["n"] == len(instances) > 0
    assert result["acc"] == 1.0 and result["acc_norm"] == 1.0
    for item in result["items"]:
        assert item["pred"] == item["pred_norm"] == item["gold"]
        assert item["is_greedy"][item["gold"]] and len(item["logprobs"]) == 4
    if task == "mmlu":
        assert set(result["per_subject"]) == {"astronomy", "high_school_biology", "macro_acc"}
        assert result["per_subject"]["macro_acc"] == 1.0
    if task == "hellaswag":
        assert result["per_subject"] == {}


class LengthScorer(LogLikelihoodScorer):
    """Log-likelihood -0.5 per character, minus 1: short options win on the sum, long
    options on the per-character average."""

    def loglikelihood(self, requests):
        return [(-0.5 * len(cont) - 1.0, False) for _, cont in requests]


def test_acc_norm_differs_from_acc_when_option_lengths_differ(tmp_path):
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps({"ctx": "Pick one:", "endings": ["x", "yyy", "zzzzz", "wwwwwwwwww"],
                                "label": 3}) + "\n", encoding="utf-8")
    r = evaluate_task(LengthScorer(), "hellaswag", data_path=path)
    assert (r["acc"], r["acc_norm"]) == (0.0, 1.0)
    assert (r["items"][0]["pred"], r["items"][0]["pred_norm"]) == (0, 3)
    # equal option lengths (" A".." D"): the two agree
    m = evaluate_task(LengthScorer(), "mmlu", data_path=write_mmlu(tmp_path / "mmlu"))
    assert m["acc"] == m["acc_norm"]


def test_mmlu_prompt_is_lm_eval_format(tmp_path):
    data = load_mmlu(write_mmlu(tmp_path / "mmlu"), "val")
    shot = load_mmlu(tmp_path / "mmlu", "dev")["astronomy"][0]
    item = data["astronomy"][1]
    assert mmlu_prompt(item, [shot]) == (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "Which planet is red?\nA. Venus\nB. Mars\nC. Jupiter\nD. Saturn\nAnswer: B\n\n"
        "How many moons has Mars?\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer:"
    )
    assert data["astronomy"][3]["question"] == 'A question, with "quotes"\nand a newline'
    assert load_mmlu(tmp_path / "mmlu" / "val", subjects=["high_school_biology"]).keys() == {
        "high_school_biology"
    }
    inst = build_instances("mmlu", data_path=tmp_path / "mmlu", limit_per_subject=1)
    assert [i.subject for i in inst] == ["astronomy", "high_school_biology"]
    # limit counts items in total, round-robin over the subjects
    assert [i.subject for i in build_instances("mmlu", data_path=tmp_path / "mmlu", limit=1)] == [
        "astronomy"
    ]
    three = build_instances("mmlu", data_path=tmp_path / "mmlu", limit=3)
    assert [i.subject for i in three] == ["astronomy", "astronomy", "high_school_biology"]
    assert inst[0].continuations == [" A", " B", " C", " D"]


def test_synthetic_formats():
    mc = build_instances("synthetic-mc", limit=2, shots=1)
    assert mc[0].context.count("Question: ") == 2 and mc[0].context.endswith("\nAnswer:")
    assert all(c.startswith(" ") and len(c) > 2 for c in mc[0].continuations)
    comp = build_instances("synthetic-completion", limit=2)
    assert not comp[0].context.endswith(" ") and comp[0].continuations[0].startswith(" ")
    assert build_instances("synthetic-mc", limit=3, shots=1)[1].context == mc[1].context


def test_hellaswag_lm_eval_preprocessing(tmp_path):
    path = write_hellaswag(tmp_path / "hs.jsonl")
    [first, *_] = build_instances("hellaswag", data_path=path)
    assert first.context == "Cooking: A man cracks an egg. he"
    assert first.continuations[3] == " reads a. book."
    raw = build_instances("hellaswag", data_path=path, preprocess=False)[0]
    assert raw.context == "A man cracks an egg. he" and raw.continuations[3] == " reads a [title] book."
    assert [it["label"] for it in load_hellaswag(path)] == [1, 0, 2]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "rows,line,what",
    [
        ('q1,a,b,c,d,A\nq2,a,b,c,d\n', 2, "6 columns"),
        ('q1,a,b,c,d,A\n"multi\nline",a,b,c,d,B\nq3,a,b,c,d,E\n', 4, "answer"),
        ('q1,a,b,c,d,A,extra\n', 1, "6 columns"),
    ],
)
def test_malformed_mmlu_names_file_and_line(tmp_path, rows, line, what):
    path = tmp_path / "anatomy_val.csv"
    path.write_text(rows, encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_mmlu(tmp_path, "val")
    assert "anatomy_val.csv" in str(e.value) and f"line {line}:" in str(e.value)
    assert what in str(e.value)


@pytest.mark.parametrize(
    "second,what",
    [
        ('{"ctx": "a", "endings": ["x", "y"], "label": 0', "JSON"),
        ('{"ctx": "a", "endings": ["x", "y"]}', "'label'"),
        ('{"endings": ["x", "y"], "label": 0}', "'ctx'"),
        ('{"ctx": "a", "endings": ["x", "y", "z", "w"], "label": 4}', "label"),
        ('{"ctx": "a", "endings": ["x", "y"], "label": -1}', "label"),
        ('{"ctx": "a", "endings": "xy", "label": 0}', "endings"),
        ('["not", "an", "object"]', "object"),
    ],
)
def test_malformed_hellaswag_names_file_and_line(tmp_path, second, what):
    path = tmp_path / "broken.jsonl"
    good = '{"ctx": "a", "endings": ["x", "y"], "label": 1}'
    path.write_text(f"{good}\n{second}\n{good}\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_hellaswag(path)
    # the shared JSONL reader words it "line 2 is not valid JSON"; the field checks "line 2: ..."
    assert "broken.jsonl line 2" in str(e.value) and what in str(e.value)


def test_user_errors(tmp_path, monkeypatch):
    scorer = LengthScorer()
    with pytest.raises(UserError, match="unknown multiple-choice task"):
        evaluate_task(scorer, "mmlu-pro")
    with pytest.raises(UserError, match="dev examples"):
        evaluate_task(scorer, "mmlu", data_path=write_mmlu(tmp_path / "mmlu"), shots=5)
    with pytest.raises(UserError, match="subject"):
        load_mmlu(tmp_path / "mmlu", subjects=["astronomi"])
    with pytest.raises(UserError, match="limit"):
        evaluate_task(scorer, "synthetic-mc", limit=0)
    with pytest.raises(UserError, match="no MMLU files"):
        load_mmlu(tmp_path, "test")
    monkeypatch.setattr(registry, "find_local", lambda name, data_dir=None: None)
    for task in ("mmlu", "hellaswag"):
        with pytest.raises(UserError, match=f"no local copy of {task}"):
            evaluate_task(scorer, task)


# --------------------------------------------------------------------------- real data


def test_real_mmlu_and_hellaswag_parse_and_evaluate():
    mmlu_root = registry.find_local("mmlu")
    hs_path = registry.find_local("hellaswag")
    if mmlu_root is None and hs_path is None:
        pytest.skip("no local MMLU or HellaSwag copy (set NEUROPLASTIC_DATA)")
    scorer = make_scorer(tiny_gpt(block_size=64), BYTES, batch_size=32)
    assert isinstance(scorer, GPTScorer)
    if mmlu_root is not None:
        for split in ("dev", "val"):
            files = sorted((mmlu_root / split).glob(f"*_{split}.csv"))
            data = load_mmlu(mmlu_root, split)
            assert len(files) > 0 and sorted(data) == [f.name[: -len(f"_{split}.csv")] for f in files]
            assert all(len(it["options"]) == 4 and 0 <= it["answer"] < 4 for v in data.values() for it in v)
        some = sorted(data)[:: max(1, len(data) // 6)]  # a few subjects, to stay quick
        r = evaluate_task(scorer, "mmlu", limit_per_subject=8, subjects=some)
        assert r["n"] == sum(min(8, len(data[s])) for s in some)
        assert set(r["per_subject"]) == {*some, "macro_acc"}
        assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["per_subject"]["macro_acc"] <= 1.0
        with pytest.warns(UserWarning, match="did not fit the model's 64-token window"):
            r5 = evaluate_task(scorer, "mmlu", limit=4, shots=5, subjects=["anatomy", "virology"])
        assert r5["n"] == 4 and 0.0 <= r5["acc"] <= 1.0
        assert r5["shots"] == 5 and r5["shots_cut"] == 4 and r5["shots_used"]["max"] < 5
    if hs_path is not None:
        items = load_hellaswag(hs_path)
        lines = [ln for ln in hs_path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        assert len(items) == len(lines)
        r = evaluate_task(scorer, "hellaswag", limit=8, shots=1)
        assert r["n"] == 8 and 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["acc_norm"] <= 1.0


# --------------------------------------------------------------------------- lm-eval's acc_norm


class TableScorer(LogLikelihoodScorer):
    """Fixed log-likelihoods by continuation string."""

    def __init__(self, table: dict[str, float]):
        super().__init__()
        self.table = table

    def loglikelihood(self, requests):
        return [(self.table[cont], False) for _, cont in requests]


def test_acc_norm_divides_by_the_choice_length_without_the_leading_space(tmp_path):
    """lm-eval 0.4 (``ConfigurableTask.process_results``): ``acc_norm`` is
    ``argmax(ll / len(choice))`` in characters of the choice *without* the target delimiter,
    ``acc_bytes`` the same in UTF-8 bytes. Each item below is built so that another
    normalisation picks another ending."""
    items = [
        # per char without the space: xy -1.45, wxyz -1.25 -> 1; with the space (" xy" 3,
        # " wxyz" 5): -0.97 vs -1.0 -> 0 (what our scorer did before)
        ({"xy": -2.9, "wxyz": -5.0, "q" * 30: -200.0, "r" * 30: -200.0}, 0, 1, 1),
        # per char: abcdefgh -0.75 (one BPE token: -6 per token), "a b c d" -0.93 (four
        # tokens: -1.6 per token) -> 0; per token would pick 1
        ({"abcdefgh": -6.0, "a b c d": -6.5, "s" * 30: -200.0, "t" * 30: -200.0}, 0, 0, 0),
        # chars vs bytes: "ééé" 3 chars / 6 bytes (-1.1 vs -0.55), "abcd" 4 / 4 (-1.0) ->
        # acc_norm picks 1, acc_bytes picks 0
        ({"ééé": -3.3, "abcd": -4.0, "u" * 30: -200.0, "v" * 30: -200.0}, 0, 1, 0),
    ]
    path = tmp_path / "hs.jsonl"
    table: dict[str, float] = {}
    with open(path, "w", encoding="utf-8") as f:
        for lls, _, pred_norm, _ in items:
            endings = list(lls)
            table.update({" " + e: v for e, v in lls.items()})
            f.write(json.dumps({"ctx": "Pick:", "endings": endings, "label": pred_norm}) + "\n")
    r = evaluate_task(TableScorer(table), "hellaswag", data_path=path)
    assert [it["pred"] for it in r["items"]] == [p for _, p, _, _ in items] == [0, 0, 0]
    assert [it["pred_norm"] for it in r["items"]] == [p for _, _, p, _ in items] == [1, 0, 1]
    assert r["acc_norm"] == 1.0
    assert r["acc_bytes"] == pytest.approx(2 / 3)  # the third item: bytes pick 0, gold is 1
    inst = build_instances("hellaswag", data_path=path)[0]
    assert inst.choices == ["xy", "wxyz", "q" * 30, "r" * 30]


def test_shots_that_do_not_fit_the_window_are_dropped_and_reported(tmp_path):
    data = write_mmlu(tmp_path / "mmlu")
    model = tiny_gpt(block_size=100)
    scorer = GPTScorer(model, BYTES, batch_size=4)
    full = build_instances("mmlu", data_path=data, shots=2)
    assert all(len(BYTES.encode(i.context)) > 100 for i in full)  # two shots never fit
    with pytest.warns(UserWarning, match=r"did not fit the model's 100-token window with 2 shots") as w:
        r = evaluate_task(scorer, "mmlu", data_path=data, shots=2)
    assert len(w) == 1  # once, not per item
    assert r["shots"] == 2 and r["shots_cut"] == r["n"] == 6
    kept = [it["shots"] for it in r["items"]]
    assert max(kept) < 2 and r["shots_used"] == {"min": min(kept), "max": max(kept),
                                                  "mean": sum(kept) / len(kept)}
    # what the model saw is exactly the prompt with the shots that fit
    ref = build_instances("mmlu", data_path=data, shots=2)
    ll = GPTScorer(model, BYTES).loglikelihood(
        [(i.with_shots(k), c) for i, k in zip(ref, kept) for c in i.continuations])
    assert [x["logprobs"] for x in r["items"]] == [
        pytest.approx([s for s, _ in ll[4 * j : 4 * j + 4]]) for j in range(len(ref))]
    # a window large enough: every shot is kept and nothing is cut
    big = evaluate_task(GPTScorer(tiny_gpt(block_size=1024), BYTES), "mmlu", data_path=data, shots=2)
    assert big["shots_cut"] == 0 and big["truncated"] == 0 and big["shots_used"]["min"] == 2


def test_prompts_longer_than_the_window_are_counted(tmp_path):
    path = tmp_path / "hs.jsonl"
    path.write_text(
        json.dumps({"ctx": "short", "endings": ["a", "b"], "label": 0}) + "\n"
        + json.dumps({"ctx": "long " * 30, "endings": ["a", "b"], "label": 0}) + "\n",
        encoding="utf-8",
    )
    r = evaluate_task(GPTScorer(tiny_gpt(block_size=32), BYTES), "hellaswag", data_path=path)
    assert r["truncated"] == 1 and r["window"] == 32
    assert "truncated" not in r["items"][0] and r["items"][1]["truncated"] is True
