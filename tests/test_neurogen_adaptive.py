"""NeuroGen's adaptive-softmax readout (issue 17): exact distribution, frequency order,
checkpoints, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuroplastic.errors import UserError
from neuroplastic.neurogen import NeuroGenModel
from tests.test_neurogen import SMALL, batch, one_sentence

ADAPTIVE = dict(softmax="adaptive", adaptive_cutoffs=[8, 24], adaptive_div=2.0)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one torch thread (the conftest fixture)."""


def model(**kw) -> NeuroGenModel:
    return NeuroGenModel(vocab_size=64, embedding_dim=16, gpu_device=-1, **{**SMALL, **ADAPTIVE, **kw})


def test_nll_is_the_exact_distribution_under_any_frequency_order():
    m = model()
    counts = np.random.default_rng(0).integers(0, 100, 64)
    m.set_token_frequencies(counts)
    brain = m.brain
    # the most frequent token is the head's first entry, the rarest the last tail's last
    assert int(brain.rank[int(np.argmax(counts))]) == 0
    assert sorted(brain.rank.tolist()) == list(range(64))
    assert torch.equal(brain.unrank[brain.rank], torch.arange(64))
    h = torch.randn(10, 16)
    y = torch.randint(0, 64, (10,))
    lp = brain.log_probs(h)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(10), atol=1e-5)
    assert torch.allclose(brain.token_nll(h, y), -lp[torch.arange(10), y], atol=1e-5)
    assert torch.equal(brain.predict(h), lp.argmax(-1))


def test_adaptive_brain_learns_and_its_checkpoint_restores_everything(tmp_path):
    m = model()
    x, y = batch()
    m.set_token_frequencies(np.bincount(y.reshape(-1).numpy(), minlength=64))
    first = m.train_step(x, y)
    for _ in range(15):
        last = m.train_step(x, y)
    assert last < first - 0.3
    path = m.save_checkpoint(tmp_path / "brain.ckpt")
    m2 = NeuroGenModel.from_checkpoint(path)
    assert torch.equal(m2.brain.rank, m.brain.rank)
    assert m2.evaluate(x, y) == m.evaluate(x, y)
    assert m2.train_step(x, y) == m.train_step(x, y)
    # a full-softmax model cannot take it: one sentence naming the readout
    full = NeuroGenModel(vocab_size=64, embedding_dim=16, gpu_device=-1, **SMALL)
    with pytest.raises(UserError) as e:
        full.load_checkpoint(path)
    assert "readout" in str(e.value) and one_sentence(str(e.value))


def test_generation_samples_from_the_adaptive_distribution():
    m = model()
    out = m.generate([1, 2, 3], max_length=6, temperature=0.8, seed=0)
    assert len(out) == 6 and all(0 <= t < 64 for t in out)
    assert out == m.generate([1, 2, 3], max_length=6, temperature=0.8, seed=0)


@pytest.mark.parametrize("kw, needle", [
    (dict(softmax="sampled"), "softmax must be"),
    (dict(softmax="adaptive", adaptive_cutoffs=[24, 8]), "adaptive_cutoffs"),
    (dict(softmax="adaptive", adaptive_cutoffs=[100, 200]), "leave no tail"),
    (dict(softmax="adaptive", adaptive_cutoffs=[8], adaptive_div=0.5), "adaptive_div"),
])
def test_bad_readout_settings_are_one_sentence(kw, needle):
    with pytest.raises(UserError) as e:
        NeuroGenModel(vocab_size=64, embedding_dim=16, gpu_device=-1, **{**SMALL, **kw})
    assert needle in str(e.value) and one_sentence(str(e.value))


def test_token_frequencies_need_the_adaptive_softmax_and_one_count_per_id():
    with pytest.raises(UserError, match="softmax='full'"):
        NeuroGenModel(vocab_size=64, embedding_dim=16, gpu_device=-1, **SMALL).set_token_frequencies(np.ones(64))
    with pytest.raises(UserError, match="one entry per vocabulary id"):
        model().set_token_frequencies(np.ones(10))
