from __future__ import annotations

import functools
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from neuroplastic.data import tokenizers as tkmod
from neuroplastic.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    HFTokenizer,
    build_tokenizer,
    load_tokenizer,
)
from neuroplastic.errors import UserError

TRAIN_TEXT = (
    "The heart is an organ that pumps blood through the body.\n"
    "Mars is a planet with a thin atmosphere and two small moons.\n\n"
    "  Water boils at 100 degrees Celsius at sea level; it freezes at 0.\n"
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🙂🚀, Ελληνικά, русский текст.\n"
    "def f(x):\n\treturn x ** 2  # code, too\n"
    "It's, they're, we've, I'm, you'll, he'd -- contractions!\r\n"
) * 30

SAMPLES = [
    "",
    "hello world",
    "Hello  world!\n\nFirst Citizen:\tYou are all resolved?  \n",
    "naïve café 日本語 🙂 — “quotes” and \u00a0nbsp\u2028line sep",
    "   leading and trailing spaces   ",
    "x\r\ny\r\n\r\n\tz",
]

SPECIALS = ("<|endoftext|>", "<|pad|>")
FAST = settings(max_examples=150, deadline=None)


@functools.cache
def bpe() -> BPETokenizer:
    return BPETokenizer.train([TRAIN_TEXT], vocab_size=600)


@pytest.fixture(scope="module")
def saved_bpe(tmp_path_factory) -> tuple[BPETokenizer, Path]:
    d = tmp_path_factory.mktemp("bpe")
    bpe().save(d)
    tok = load_tokenizer(d)
    assert isinstance(tok, BPETokenizer)
    return tok, d


def no_specials(text: str) -> bool:
    return not any(s in text for s in SPECIALS)


# -- byte tokenizer ---------------------------------------------------------------------------
def test_byte_special_ids():
    tok = ByteTokenizer()
    assert (tok.kind, tok.vocab_size, tok.eos_id, tok.pad_id) == ("byte", 258, 256, 257)
    assert len(tok) == 258
    assert tok.encode("A") == [65]
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode([104, 256, 105, 257, 257]) == "hi"
    assert tok.decode_bytes([104, 256, 105, 257]) == b"hi"
    # A literal special-token string in text is that token (as in transformers) ...
    assert tok.encode("a<|endoftext|>b<|pad|>") == [97, 256, 98, 257]
    # ... but encode_bytes is pure bytes, so it round-trips exactly.
    raw = b"a<|endoftext|>b"
    assert tok.encode_bytes(raw) == list(raw)
    assert tok.decode_bytes(tok.encode_bytes(raw)) == raw


def test_byte_decode_accepts_arrays_and_tensors():
    tok = ByteTokenizer()
    ids = tok.encode("tensor é")
    assert tok.decode(np.array(ids)) == "tensor é"
    assert tok.decode(torch.tensor(ids)) == "tensor é"
    assert tok.decode_bytes(torch.tensor([[104, 105]])) == b"hi"
    assert tok.decode([0xFF, 104]) == "\ufffdh"  # invalid utf-8 -> replacement char
    with pytest.raises(ValueError):
        tok.decode_bytes([300])
    with pytest.raises(ValueError):
        tok.decode_bytes([-1])


def test_byte_lone_surrogate_does_not_crash():
    for tok in (ByteTokenizer(), bpe()):
        ids = tok.encode("a\ud800b")
        assert tok.decode(ids).startswith("a") and tok.decode(ids).endswith("b")


@FAST
@given(st.text())
def test_byte_roundtrip_text(text):
    assume(no_specials(text))
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == tok.encode_bytes(text.encode("utf-8"))


@FAST
@given(st.binary())
def test_byte_roundtrip_bytes(data):
    tok = ByteTokenizer()
    ids = tok.encode_bytes(data)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode_bytes(ids) == data


def test_byte_save_load(tmp_path):
    ByteTokenizer().save(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / "neuroplastic_tokenizer.json").read_text())
    assert meta["kind"] == "byte"
    tok = load_tokenizer(tmp_path / "tok")
    assert isinstance(tok, ByteTokenizer)


# -- BPE --------------------------------------------------------------------------------------
def test_bpe_basics():
    tok = bpe()
    assert tok.kind == "bpe"
    assert 258 < tok.vocab_size <= 600  # the small corpus may run out of merges first
    assert (tok.eos_id, tok.pad_id) == (0, 1)
    assert tok.byte_level
    ids = tok.encode("The heart is an organ")
    assert len(ids) < len("The heart is an organ") / 2  # merges were learned
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == "The heart is an organ"
    assert tok.encode("a<|endoftext|>b")[1] == tok.eos_id
    assert tok.decode_bytes(tok.encode_bytes(b"a<|endoftext|>b")) == b"a<|endoftext|>b"
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids)) == tok.decode(ids)
    with pytest.raises(ValueError):
        tok.decode_bytes([tok.vocab_size])


@FAST
@given(st.text())
def test_bpe_roundtrip_text(text):
    assume(no_specials(text))
    tok = bpe()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert tok.encode_bytes(text.encode("utf-8")) == ids


@FAST
@given(st.binary())
def test_bpe_roundtrip_bytes(data):
    tok = bpe()
    ids = tok.encode_bytes(data)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode_bytes(ids) == data
    assert tok.decode(ids) == data.decode("utf-8", "replace")


@FAST
@given(st.text(alphabet=st.sampled_from(list("ab .,'\n\n\t\r ") + ["\u00a0", "é", "1", "\u2028"])))
def test_bpe_chunked_encoding_is_exact(text):
    """Long texts are cut into pieces that encode in parallel; the ids must not change."""
    tok = bpe()
    whole = tok._tk.encode(text, add_special_tokens=False).ids
    with mock.patch.object(tkmod, "_CHUNK_CHARS", 3):
        assert tok.encode(text) == whole
        assert tok.encode_batch([text, "x"]) == [whole, tok.encode("x")]


def test_bpe_long_text_matches_single_pass():
    tok = bpe()
    text = TRAIN_TEXT * 40  # > 64K chars: the chunked path
    assert len(text) > tkmod._CHUNK_CHARS
    assert tok.encode(text) == tok._tk.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=60, deadline=None)
@given(st.text())
def test_bpe_saved_and_reloaded_encodes_identically(saved_bpe, text):
    reloaded, _ = saved_bpe
    assert reloaded.encode(text) == bpe().encode(text)
    assert reloaded.vocab_size == bpe().vocab_size and reloaded.eos_id == bpe().eos_id


def test_bpe_saved_dir_loads_in_transformers(saved_bpe):
    transformers = pytest.importorskip("transformers")
    tok, d = saved_bpe
    for files in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "neuroplastic_tokenizer.json"):
        assert (d / files).is_file()
    for cls in (transformers.PreTrainedTokenizerFast, transformers.AutoTokenizer):
        hf = cls.from_pretrained(str(d))
        assert hf.eos_token_id == tok.eos_id and hf.pad_token_id == tok.pad_id
        for text in [*SAMPLES, TRAIN_TEXT[:2000], "with <|endoftext|> inside"]:
            ids = tok.encode(text)
            assert hf(text, add_special_tokens=False)["input_ids"] == ids
            assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)


def test_bpe_train_rejects_tiny_vocab():
    with pytest.raises(UserError, match="at least 258"):
        BPETokenizer.train(["abc"], vocab_size=100)


# -- HF (GPT-2 style files) -------------------------------------------------------------------
def test_hf_from_vocab_and_merges(tmp_path):
    d = tmp_path / "gpt2ish"
    d.mkdir()
    bpe()._tk.model.save(str(d))  # writes vocab.json + merges.txt, GPT-2's layout
    assert (d / "vocab.json").is_file() and (d / "merges.txt").is_file()
    tok = load_tokenizer(d)
    assert isinstance(tok, HFTokenizer) and tok.kind == "hf"
    assert tok.eos_id == bpe().eos_id
    for text in SAMPLES:
        assert tok.encode(text) == bpe().encode(text)
        assert tok.decode(tok.encode(text)) == text
    data = b"\xff\x00abc \xc3"
    assert tok.decode_bytes(tok.encode_bytes(data)) == data
    # Saving an hf tokenizer and loading it back keeps kind and ids.
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.kind == "hf" and again.encode(SAMPLES[2]) == tok.encode(SAMPLES[2])


def test_hf_from_tokenizer_json_with_config(tmp_path):
    d = tmp_path / "plain"
    d.mkdir()
    bpe()._tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|pad|>"}}))
    tok = load_tokenizer(d)
    assert isinstance(tok, HFTokenizer) and tok.eos_id == 1
    assert isinstance(load_tokenizer(d / "tokenizer.json"), HFTokenizer)


# -- load / build errors ----------------------------------------------------------------------
def test_build_tokenizer_specs(tmp_path):
    assert isinstance(build_tokenizer("byte", None), ByteTokenizer)
    tok = build_tokenizer("bpe", lambda: iter([TRAIN_TEXT]), vocab_size=300)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 300
    tok.save(tmp_path / "t")
    assert build_tokenizer(str(tmp_path / "t"), None).encode("heart") == tok.encode("heart")
    with pytest.raises(UserError, match="no training data"):
        build_tokenizer("bpe", None)
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match=str(missing)):
        build_tokenizer(str(missing), None)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no tokenizer"):
        load_tokenizer(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "neuroplastic_tokenizer.json").write_text('{"kind": "sentencepiece"}')
    with pytest.raises(UserError, match="unknown tokenizer kind"):
        load_tokenizer(bad)
    (bad / "neuroplastic_tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="neuroplastic_tokenizer.json"):
        load_tokenizer(bad)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(UserError, match="tokenizer.json"):
        load_tokenizer(corrupt)
