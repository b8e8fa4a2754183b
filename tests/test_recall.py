"""Recall tasks: the needle / MQAR generators and their evaluation (oracle and constant models)."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from neuroplastic.config import ModelConfig
from neuroplastic.data.recall_tasks import (
    MQAR_ALPHABET,
    NEEDLE_QUERY,
    mqar_documents,
    mqar_example,
    mqar_text,
    needle_documents,
    needle_example,
)
from neuroplastic.data.tokenizers import ByteTokenizer
from neuroplastic.errors import UserError
from neuroplastic.evaluation.recall import (
    evaluate_mqar,
    needle_grid,
    parse_key,
    parse_word,
    plot_needle_heatmap,
)
from neuroplastic.models.transformer import GPT

TOK = ByteTokenizer()
NEEDLE_RE = re.compile(r"The secret key is (\d+)\.")


def _tiny_cfg(block_size: int) -> ModelConfig:
    return ModelConfig.from_flat(vocab_size=TOK.vocab_size, block_size=block_size, n_layer=1, n_head=1, n_embd=8)


class OracleGPT(GPT):
    """Our GPT whose generate answers by reading the prompt it is given (as a perfect
    memory would): the needle's key, or the value of the last MQAR query."""

    def __init__(self, block_size: int = 256, long_context: bool = True):
        super().__init__(_tiny_cfg(block_size))
        self.supports_long_context = long_context
        self.calls = 0

    @staticmethod
    def answer(prompt: str) -> str:
        if prompt.endswith(NEEDLE_QUERY):
            m = NEEDLE_RE.search(prompt)
            return f" {m.group(1)}." if m else " ?"
        context, _, queries = prompt.partition(" |")
        pairs = dict(re.findall(r"(\S+):(\S+)", context))
        key = queries.split()[-1].rstrip("?")
        return f" {pairs.get(key, '?')} "

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, eos_id=None, **kw):
        self.calls += 1
        rows = []
        for row in idx.tolist():
            new = TOK.encode(self.answer(TOK.decode(row)))[:max_new_tokens]
            new += [TOK.eos_id] * (max_new_tokens - len(new))
            rows.append(row + new)
        return torch.tensor(rows, dtype=torch.long, device=idx.device)


class ConstantGPT(GPT):
    """Always continues with the same text."""

    def __init__(self, text: str = " 1234 xx"):
        super().__init__(_tiny_cfg(64))
        self.supports_long_context = True
        self.text = text

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, eos_id=None, **kw):
        new = torch.tensor(TOK.encode(self.text)[:max_new_tokens], dtype=torch.long)
        return torch.cat((idx, new.expand(idx.size(0), -1)), dim=1)


# =========================================================================== needle data


@pytest.mark.parametrize("n", [512, 2048, 4096])
def test_needle_length_and_depth(n):
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        prompt, answer = needle_example(n, depth, rng=random.Random(f"{n}:{depth}"))
        total = len((prompt + answer).encode())
        assert n - max(32, 0.02 * n) <= total <= n
        assert prompt.endswith(NEEDLE_QUERY)
        key = answer.strip()
        assert re.fullmatch(r"[1-9]\d{3}", key) and answer == " " + key
        hay = prompt[: -len(NEEDLE_QUERY)]
        needle = f"The secret key is {key}."
        assert hay.count(needle) == 1
        at = hay.index(needle)
        assert at == 0 or hay[at - 1] in " \n"  # at a sentence boundary
        assert abs(at - depth * (len(hay) - len(needle))) <= 100
        if depth == 0.0:
            assert at == 0
        if depth == 1.0:
            assert hay.endswith(needle)


def test_needle_deterministic_and_options():
    a = needle_example(1024, 0.5, rng=7)
    assert a == needle_example(1024, 0.5, rng=random.Random(7))
    assert a != needle_example(1024, 0.5, rng=8)
    prompt, answer = needle_example(300, 0.5, key=4821, rng=0, filler="Cats purr. Dogs bark loudly!")
    assert answer == " 4821"
    hay = prompt[: -len(NEEDLE_QUERY)]
    assert "The secret key is 4821." in hay and "Cats purr." in hay
    assert set(hay.replace("The secret key is 4821.", "").split()) <= {"Cats", "purr.", "Dogs", "bark", "loudly!"}
    with pytest.raises(UserError):
        needle_example(60, 0.5)
    with pytest.raises(UserError):
        needle_example(512, 1.5)
    with pytest.raises(UserError):
        needle_example(512, 0.5, key="12a4")


def test_needle_documents():
    docs = needle_documents(20, min_bytes=200, max_bytes=600, seed=3)
    assert docs == needle_documents(20, min_bytes=200, max_bytes=600, seed=3)
    assert docs != needle_documents(20, min_bytes=200, max_bytes=600, seed=4)
    assert len(docs) == 20
    for d in docs:
        assert 150 <= len(d.encode()) <= 600
        m = re.search(r"Answer: The secret key is (\d{4})\.$", d)
        assert m and f"The secret key is {m.group(1)}." in d[: -len(NEEDLE_QUERY)]
    assert len(needle_documents()) == 1000  # defaults, for data.source=needle


def test_multi_needle_document():
    from neuroplastic.data.recall_tasks import NEEDLE_SUBJECTS, multi_needle_document, needle_query

    assert needle_query("secret key") == NEEDLE_QUERY
    for seed in range(20):
        k = 1 + seed % 5
        doc, spans = multi_needle_document(900, k, rng=seed)
        assert (doc, spans) == multi_needle_document(900, k, rng=seed)
        raw = doc.encode()
        assert len(raw) <= 900 and len(spans) == k
        found = re.findall(r"The ([a-z ]+) is (\d{4})\. ", doc.split("\nQuestion:")[0] + " ")
        assert len(found) == k and len({s for s, _ in found}) == k
        assert all(s in NEEDLE_SUBJECTS for s, _ in found)
        hidden = dict(found)
        asked = re.findall(r"Question: What is the ([a-z ]+)\?\nAnswer: The \1 is", doc)
        assert sorted(asked) == sorted(hidden)
        for subject, (a, b) in zip(asked, spans):
            assert raw[a:b].decode() == " " + hidden[subject]
            assert raw[:a].decode().endswith(needle_query(subject))
    with pytest.raises(UserError, match="too small"):
        multi_needle_document(200, 4, rng=0)
    with pytest.raises(UserError, match="num_needles"):
        multi_needle_document(9000, len(NEEDLE_SUBJECTS) + 1, rng=0)


def test_filler_never_mentions_a_needle_subject():
    from neuroplastic.data.recall_tasks import NEEDLE_SUBJECTS

    filler = "The door code is 1234. Cats purr. My room number is nine. Dogs bark."
    hay, _ = needle_example(200, 0.0, key="4821", rng=0, filler=filler)
    assert not any(s in hay.split("\nQuestion")[0].lower() for s in NEEDLE_SUBJECTS if s != "secret key")


# =========================================================================== MQAR data


def test_mqar_format_and_determinism():
    context, queries = mqar_example(8, 4, random.Random(1))
    assert (context, queries) == mqar_example(8, 4, 1)
    assert re.fullmatch(r"([a-z0-9]{2}:[a-z0-9]{2} ){8}\|", context)
    pairs = dict(re.findall(r"(\w+):(\w+)", context))
    assert len(pairs) == 8  # distinct keys
    assert len({k for k, _ in queries}) == 4
    assert all(pairs[k] == v for k, v in queries)
    doc = mqar_text(context, queries)
    assert doc == context + "".join(f" {k}? {v}" for k, v in queries)
    p2 = mqar_text(context, queries, 2)
    assert doc.startswith(p2) and p2.endswith(f" {queries[2][0]}?")
    assert doc[len(p2) :].startswith(f" {queries[2][1]}")

    c3, q3 = mqar_example(5, 5, 2, key_len=3, value_len=1)
    assert all(len(k) == 3 and len(v) == 1 and set(k + v) <= set(MQAR_ALPHABET) for k, v in q3)
    with pytest.raises(UserError):
        mqar_example(4, 5)
    with pytest.raises(UserError):
        mqar_example(40, 2, key_len=1)

    docs = mqar_documents(10, seed=5)
    assert docs == mqar_documents(10, seed=5) and docs != mqar_documents(10, seed=6)
    assert all(d.count("?") == 4 and d.count(":") == 8 for d in docs)
    assert len(mqar_documents()) == 1000


# =========================================================================== evaluation


def test_parsing():
    assert parse_key(" 4821.") == "4821"
    assert parse_key(" 48215") == "48215"
    assert parse_key(" x4821") == ""
    assert parse_word(" 7k b9?") == "7k"
    assert parse_word("  ") == ""


def test_oracle_and_constant_on_needle_grid(tmp_path):
    oracle = OracleGPT(block_size=64, long_context=True)
    res = needle_grid(oracle, TOK, lengths=(256, 1024), depths=(0.0, 0.5, 1.0), trials=2, seed=1,
                      progress=False)
    assert res["accuracy"] == 1.0
    assert res["grid"] == [[1.0] * 3, [1.0] * 3]
    assert not any(c["truncated"] for c in res["cells"])  # long context: whole prompt
    assert len(res["records"]) == 12 and len(res["cells"]) == 6
    json.dumps(res)
    again = needle_grid(oracle, TOK, lengths=(256, 1024), depths=(0.0, 0.5, 1.0), trials=2, seed=1,
                        progress=False)
    assert [r["key"] for r in again["records"]] == [r["key"] for r in res["records"]]

    const = needle_grid(ConstantGPT(), TOK, lengths=(256, 512), depths=(0.0, 1.0), trials=3,
                        progress=False)
    assert const["accuracy"] <= 0.1

    png = plot_needle_heatmap(res, tmp_path / "plots" / "needle.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_needle_truncated_to_block_size():
    # A window of 512 bytes: the 1024-byte cells are cut from the left, so the needle is
    # lost at depth 0 and kept at depth 1; the 256-byte cells fit.
    oracle = OracleGPT(block_size=512, long_context=False)
    res = needle_grid(oracle, TOK, lengths=(256, 1024), depths=(0.0, 1.0), trials=2, progress=False)
    cells = {(c["length"], c["depth"]): c for c in res["cells"]}
    assert not cells[(256, 0.0)]["truncated"] and cells[(256, 0.0)]["accuracy"] == 1.0
    assert cells[(1024, 0.0)]["truncated"] and cells[(1024, 0.0)]["needle_visible"] == 0.0
    assert cells[(1024, 0.0)]["accuracy"] == 0.0
    assert cells[(1024, 1.0)]["truncated"] and cells[(1024, 1.0)]["accuracy"] == 1.0
    assert res["truncated"] == [[False, False], [True, True]]
    for r in res["records"]:
        assert r["fed_tokens"] <= 512 - 5  # room for the 5-token answer + 1 check token
        assert r["truncated"] == (r["prompt_tokens"] > r["fed_tokens"])

    # a real (untrained) GPT with a small window runs through the same path
    torch.manual_seed(0)
    gpt = GPT(_tiny_cfg(64))
    res = needle_grid(gpt, TOK, lengths=(128,), depths=(0.5,), trials=2, progress=False)
    assert all(r["truncated"] and r["fed_tokens"] == 64 - 5 for r in res["records"])
    assert res["window"] == 64 and res["accuracy"] == 0.0


def test_mqar_oracle_and_constant():
    oracle = OracleGPT()
    res = evaluate_mqar(oracle, TOK, num_examples=20, num_pairs=8, num_queries=4, progress=False)
    assert res["accuracy"] == 1.0 and res["example_accuracy"] == 1.0
    assert res["per_position"] == [1.0] * 4 and len(res["records"]) == 80
    assert oracle.calls == 4  # equal-length prompts share a batch per query position
    json.dumps(res)
    const = evaluate_mqar(ConstantGPT(" zz yy"), TOK, num_examples=20, progress=False)
    assert const["accuracy"] <= 0.1 and const["example_accuracy"] == 0.0


def test_evaluation_errors():
    with pytest.raises(UserError):
        needle_grid(OracleGPT(), TOK, depths=(2.0,), progress=False)
    with pytest.raises(UserError):
        needle_grid(OracleGPT(), TOK, trials=0, progress=False)
    with pytest.raises(UserError):
        needle_grid(torch.nn.Linear(2, 2), TOK, progress=False)
    with pytest.raises(UserError):
        plot_needle_heatmap({"accuracy": 1.0}, "unused.png")
