"""The CausalLM protocol and the tokenizer adapter (models/api.py) on every implementation."""

from __future__ import annotations

import pytest
import torch

from neuroplastic.config import ModelConfig
from neuroplastic.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    TransformersTokenizer,
    as_tokenizer,
)
from neuroplastic.models import build_model
from neuroplastic.models.api import CausalLM, TokenizerAdapter

transformers = pytest.importorskip("transformers")

TEXT = "The quick brown fox jumps over the lazy dog. Ünïcödé too, 123!\n" * 20
VOCAB = 300


def _gpt():
    return build_model(ModelConfig.from_flat(vocab_size=VOCAB, block_size=24, n_layer=1, n_head=2, n_embd=16))


def _hebbian():
    return build_model(ModelConfig.from_flat(arch="hebbian", vocab_size=VOCAB, block_size=16, n_layer=1,
                                   n_head=2, n_embd=16, window=8, chunk_size=4))


def _hf():
    from neuroplastic.models.hf import HFCausalLM

    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=20, n_embd=16, n_layer=1, n_head=2)
    return HFCausalLM(transformers.GPT2LMHeadModel(cfg))


MODELS = {"gpt": (_gpt, 24, False), "hebbian": (_hebbian, 16, True), "hf": (_hf, 20, False)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_is_a_causal_lm(name):
    make, window, long_context = MODELS[name]
    torch.manual_seed(0)
    model = make()
    assert isinstance(model, CausalLM)
    assert model.context_length == window and model.supports_long_context is long_context
    assert model.device == torch.device("cpu")

    idx = torch.randint(0, VOCAB, (2, window))
    logits, loss = model(idx)
    assert logits.shape == (2, window, VOCAB) and loss is None
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -100
    logits, loss = model(idx, targets)
    assert loss.ndim == 0 and torch.isfinite(loss)
    if not long_context:  # one forward takes at most context_length tokens
        with pytest.raises((ValueError, IndexError)):
            model(torch.randint(0, VOCAB, (1, window + 1)))

    prompt = idx[:, :5]
    gen = torch.Generator().manual_seed(1)
    out = model.generate(prompt, 7, temperature=1.0, top_k=10, top_p=0.9, generator=gen)
    assert out.shape == (2, 12) and torch.equal(out[:, :5], prompt)
    # past the window: GPT / HF crop, the Hebbian LM carries its memory; both give greedy
    # continuations identical with and without the cache
    long = model.generate(prompt, window + 3, temperature=0.0)
    assert long.shape == (2, 5 + window + 3)
    assert torch.equal(model.generate(prompt, window + 3, temperature=0.0, use_cache=False), long)


def test_a_plain_module_is_not_a_causal_lm():
    assert not isinstance(torch.nn.Linear(2, 2), CausalLM)


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train([TEXT], vocab_size=VOCAB)


@pytest.fixture(scope="module")
def hf_tok(bpe, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    bpe.save(d)
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(d))


def test_our_tokenizers_are_adapters_as_they_are(bpe):
    for tok in (ByteTokenizer(), bpe):
        assert isinstance(tok, TokenizerAdapter) and as_tokenizer(tok) is tok
        ids = tok.encode(TEXT)
        assert tok.decode(ids) == TEXT and tok.decode(ids + [tok.eos_id]) == TEXT
        assert tok.prefix_id == tok.eos_id and isinstance(tok.pad_id, int)


def test_a_transformers_tokenizer_is_wrapped(bpe, hf_tok):
    assert not isinstance(hf_tok, TokenizerAdapter)
    tok = as_tokenizer(hf_tok)
    assert isinstance(tok, TransformersTokenizer) and isinstance(tok, TokenizerAdapter)
    assert as_tokenizer(tok) is tok and tok.tokenizer is hf_tok
    ids = tok.encode(TEXT)
    assert ids == bpe.encode(TEXT)  # same files, same ids; no special tokens added
    assert tok.decode(ids) == TEXT and tok.decode(ids + [tok.eos_id]) == TEXT
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (bpe.eos_id, bpe.pad_id, bpe.vocab_size)
    assert tok.prefix_id == tok.eos_id  # no bos in these files


def test_wrapper_ids_fall_back_bos_then_eos_then_zero():
    class Fake:
        def __init__(self, bos, eos, pad):
            self.bos_token_id, self.eos_token_id, self.pad_token_id = bos, eos, pad

    def ids(bos, eos, pad):
        t = TransformersTokenizer(Fake(bos, eos, pad))
        return t.eos_id, t.pad_id, t.prefix_id

    assert ids(1, 2, 3) == (2, 3, 1)
    assert ids(1, 2, None) == (2, 2, 1)
    assert ids(None, 2, None) == (2, 2, 2)
    assert ids(1, None, None) == (None, 1, 1)
    assert ids(None, None, None) == (None, 0, 0)
