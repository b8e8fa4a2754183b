"""Loss / perplexity evaluation over the model's own context (issue #18): sliding windows,
--context / --stride, the summary naming window and stride, WikiText-2 word-level
perplexity, and the evaluate options checked before a model is loaded (issue #14)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXT, run_cli, tiny_overrides

from neuroplastic.data.batching import sequential_blocks
from neuroplastic.evaluation.lm import fit_to_memory, lm_metrics, model_context, sliding_windows

transformers = pytest.importorskip("transformers")


def _assert_clean_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize("n,window,stride", [(1000, 128, 128), (1000, 128, 32), (130, 128, 50),
                                             (20, 128, 128), (257, 128, 127)])
def test_sliding_windows_score_every_target_once_with_the_most_context(n, window, stride):
    tokens = np.arange(n)
    batches, info = sliding_windows(tokens, window, stride, batch_size=3)
    seen = []
    for x, y in batches:
        assert x.shape == y.shape and x.shape[1] <= window
        for xr, yr in zip(x.tolist(), y.tolist()):
            for pos, (a, b) in enumerate(zip(xr, yr)):
                if b != -100:
                    assert b == a + 1  # y is x shifted by one
                    seen.append(b)
                    # context seen for this target: the window's tokens before it
                    assert pos + 1 == min(b, window) or pos + 1 >= window - stride
    assert seen == list(range(1, n))
    assert info["targets"] == n - 1 and (info["window"], info["stride"]) == (window, stride)


def test_disjoint_windows_are_the_old_sequential_blocks():
    tokens = np.random.default_rng(0).integers(0, 50, 5000)
    old = sequential_blocks(tokens, 128, 4, 3)
    new, info = sliding_windows(tokens, 128, None, 4, max_batches=3)
    assert info["stride"] == 128 and len(new) == len(old) == 3
    for (x1, y1), (x2, y2) in zip(old, new):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_memory_cap_lowers_batch_then_window_and_says_so():
    assert fit_to_memory(512, 16, 1000, 64 << 30) == (512, 16, None)
    w, b, note = fit_to_memory(8192, 16, 49152, 16 << 30)  # ~4.5 GB a window: 1 per batch
    assert (w, b) == (8192, 1) and "batch size lowered from 16 to 1" in note
    w, b, note = fit_to_memory(8192, 16, 49152, 4 << 30)
    assert w < 8192 and b == 1 and note.startswith("window lowered from 8192 to")
    assert "--context" in note
    assert fit_to_memory(8192, 16, 49152, None) == (8192, 16, None)


# --------------------------------------------------------------------------- a tiny HF model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny LLaMA with a 512-token context, saved with a BPE tokenizer."""
    from neuroplastic.data.tokenizers import BPETokenizer

    d = tmp_path_factory.mktemp("tiny-llama-512")
    tok = BPETokenizer.train([SAMPLE_TEXT], vocab_size=300)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, vocab_size=tok.vocab_size,
        bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
    ))
    with torch.no_grad():  # peaked logits, so that the window matters
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(str(d))
    tok.save(d)
    return d


@pytest.fixture(scope="module")
def long_text(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "long.txt"
    p.write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    return p


def _json(r) -> dict:
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_hf_model_uses_its_own_context_and_128_reproduces_the_old_number(hf_dir, long_text, tmp_path):
    # a run of the tiny recipe on the HF model with 128-token blocks: what `evaluate RUN`
    # printed before used cfg.block_size (128) as its window
    run = tmp_path / "run"
    r = run_cli("train", "tiny", *tiny_overrides(long_text, run, **{
        "model": str(hf_dir), "data.block_size": 128, "model.block_size": 512,
        "train.max_steps": 1, "train.eval_interval": 1, "train.ckpt_interval": 1}))
    assert r.returncode == 0, r.stderr[-3000:]

    from neuroplastic.data.pipeline import prepare_data, token_byte_lengths
    from neuroplastic.models.loading import load_trained

    model, tok, cfg, directory = load_trained(run)
    assert cfg.block_size == 128 and model_context(model, tok) == 512
    val = prepare_data(cfg.data, tokenizer_dir=directory / "tokenizer").val_tokens
    assert len(val) > 2 * 128 + 1
    old = lm_metrics(model, sequential_blocks(val, 128, 1, 2), torch.from_numpy(token_byte_lengths(tok)))

    default = _json(run_cli("evaluate", str(run), "--json", "--batch-size", "1", "--batches", "2"))
    assert (default["window"], default["stride"], default["model_context"]) == (512, 512, 512)
    told = _json(run_cli("evaluate", str(run), "--json", "--context", "128", "--batch-size", "1",
                         "--batches", "2"))
    assert (told["window"], told["stride"]) == (128, 128)
    assert told["tokens"] == old["tokens"] == 256
    assert told["loss"] == pytest.approx(old["loss"], rel=1e-6)
    assert told["bpb"] == pytest.approx(old["bpb"], rel=1e-6)
    assert default["loss"] != pytest.approx(told["loss"], rel=1e-3)

    r = run_cli("evaluate", str(run), "--context", "128", "--stride", "64", "--batches", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "window: 128 tokens (--context; model context 512), stride 64 (sliding windows" in r.stdout
    r = run_cli("evaluate", str(run), "--batches", "1")
    assert "window: 512 tokens (the model's context; model context 512), stride 512 (disjoint windows)" in r.stdout


def test_evaluate_a_hugging_face_directory(hf_dir, long_text):
    res = _json(run_cli("evaluate", str(hf_dir), "--data", str(long_text), "--json"))
    assert (res["window"], res["stride"], res["model_context"]) == (512, 512, 512)
    from neuroplastic.data.tokenizers import HFTokenizer

    n = len(HFTokenizer(hf_dir).encode(SAMPLE_TEXT * 3)) + 1  # + end-of-text
    assert res["tokens"] == n - 1  # every token but the first is scored
    # known only once the model is loaded (transformers may draw its loading bar first)
    r = run_cli("evaluate", str(hf_dir), "--data", str(long_text), "--context", "1024")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "neuroplastic: error: --context 1024 is longer than the model's context of 512 tokens; "
        "use at most 512.")
    r = run_cli("evaluate", str(hf_dir))
    assert r.returncode == 2 and "pass --data FILE" in r.stderr.strip().splitlines()[-1]


def test_wikitext2_word_and_token_perplexity(hf_dir, tmp_path):
    wiki = tmp_path / "wiki.valid.tokens"
    text = " \n = Homarus gammarus = \n \n Homarus gammarus , known as the European lobster , is a " \
           "species of <unk> lobster . \n" * 20
    wiki.write_text(text, encoding="utf-8")
    res = _json(run_cli("evaluate", str(hf_dir), "--task", "wikitext2", "--data", str(wiki), "--json",
                        "--context", "100", "--stride", "50"))
    from neuroplastic.data.tokenizers import HFTokenizer

    assert res["words"] == len(text.split()) == 20 * 20
    assert res["tokens"] == len(HFTokenizer(hf_dir).encode(text))  # all, after the end-of-text start
    assert res["word_ppl"] == pytest.approx(math.exp(res["loss"] * res["tokens"] / res["words"]))
    assert res["ppl"] == pytest.approx(math.exp(res["loss"]))
    r = run_cli("evaluate", str(hf_dir), "--task", "wikitext2", "--data", str(wiki))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{res['tokens']:,} tokens scored, {res['words']:,} words" in r.stdout
    assert "perplexity (per word)" in r.stdout and "perplexity (per token)" in r.stdout
    assert "stride 512" in r.stdout


# --------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--task", "needle", "--lengths", "abc"], "--lengths must be comma-separated positive integers"),
        (["--task", "needle", "--depths", "0,2"], "--depths must be comma-separated numbers from 0 to 1"),
        (["--context", "0"], "--context must be a positive integer"),
        (["--context", "64", "--stride", "65"], "--stride (65) must not be larger than --context (64)"),
        (["--limit", "0"], "--limit must be a positive integer"),
        (["--limit-per-subject", "3"], "--limit-per-subject applies to --task mmlu only"),
    ],
)
def test_bad_evaluate_options_are_one_sentence_before_loading(argv, needle, tmp_path):
    # the checkpoint does not exist: the options are checked first
    _assert_clean_error(run_cli("evaluate", str(tmp_path / "nope"), *argv), needle)


def test_mmlu_shots_that_do_not_fit_are_reported_and_warned_once(tmp_path, text_file):
    run = tmp_path / "run"
    r = run_cli("train", "tiny", *tiny_overrides(text_file, run))
    assert r.returncode == 0, r.stderr[-2000:]
    for split in ("dev", "val"):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
        with open(tmp_path / "mmlu" / split / f"astronomy_{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([(f"Which planet is number {i}?", "Venus", "Mars", "Earth",
                                      "Saturn", "ABCD"[i % 4]) for i in range(6)])
    r = run_cli("evaluate", str(run), "--task", "mmlu", "--data", str(tmp_path / "mmlu"),
                "--shots", "5", "--limit", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "task: mmlu, 3 items, 5 shots asked, 0-0 used" in r.stdout
    assert "5-shot" not in r.stdout
    assert "prompts are longer than the model's 32-token window" in r.stdout
    warns = [ln for ln in r.stderr.splitlines() if "warning:" in ln]
    assert len(warns) == 1 and "3 of 3 mmlu prompts did not fit" in warns[0]
    res = _json(run_cli("evaluate", str(run), "--task", "mmlu", "--data", str(tmp_path / "mmlu"),
                        "--shots", "5", "--limit", "3", "--json"))
    assert res["shots"] == 5 and res["shots_cut"] == 3 and res["shots_used"]["max"] == 0


def test_help_says_what_limit_counts():
    r = run_cli("evaluate", "--help")
    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and "--limit LIMIT items in total" in text
    assert "what lm- eval's --limit means" in text or "what lm-eval's --limit means" in text
    assert "--context" in text and "--stride" in text
