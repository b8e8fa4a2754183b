"""NeuroGen (issue #8): the seed's API, the brain, its mechanisms, checkpoints, the CLI."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from neuroplastic.errors import UserError
from neuroplastic.models import brain_kernels
from neuroplastic.models.brain import _ALL, MECHANISMS, PROJECTIONS, SEED_SIZES, Brain, BrainConfig
from neuroplastic.neurogen import NeuroGenModel, metadata_path
from tests.conftest import SAMPLE_TEXT, run_cli

needs_numba = pytest.mark.skipif(not brain_kernels.AVAILABLE, reason="numba is not installed")

#: a brain small enough for unit tests: 2,496 neurons
SMALL = dict(scale=1 / 32, sparsity=1 / 16)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_model(vocab: int = 64, dim: int = 16, **kw) -> NeuroGenModel:
    return NeuroGenModel(vocab_size=vocab, embedding_dim=dim, gpu_device=-1, **{**SMALL, **kw})


def batch(vocab: int = 64, b: int = 4, t: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (b, t + 1), generator=g)
    x[:, t // 2 :] = x[:, : t - t // 2 + 1]  # repetition, so the hippocampus has something to recall
    return x[:, :-1], x[:, 1:]


def one_sentence(msg: str) -> bool:
    return "\n" not in msg and msg.endswith((".", "?")) and msg.count(". ") <= 1


# ------------------------------------------------------------------ the API


def test_api_with_the_seeds_argument_names():
    model = NeuroGenModel(vocab_size=64, embedding_dim=16, gpu_device=-1, **SMALL)
    loss = model.train_step(input_ids=[1, 2, 3, 4, 5], target_ids=[2, 3, 4, 5, 6])
    assert isinstance(loss, float) and math.isfinite(loss)
    x, y = batch()
    losses = [loss, model.train_step(x, y)]  # batched tensors
    losses.append(model.train_step(x.tolist(), y.numpy()))  # lists of lists, numpy
    assert all(isinstance(v, float) for v in losses)
    out = model.generate(prompt_token_ids=[1, 2, 3], max_length=7, temperature=1.0)
    assert isinstance(out, list) and len(out) == 7 and all(isinstance(t, int) and 0 <= t < 64 for t in out)
    assert model.generate([1, 2, 3], max_length=0) == []
    greedy = model.generate([5], max_length=10, temperature=0)
    assert model.generate([5], max_length=10, temperature=0, eos_token_id=greedy[0]) == greedy[:1]
    assert model.generate([5], 10, 1.0, seed=7) == model.generate([5], 10, 1.0, seed=7)
    stats = model.get_statistics()
    for key in ("tokens_processed", "loss_average", "dopamine", "dopamine_baseline", "consolidation_events",
                "recall_rate", "thalamic_gate", "tagged_fraction", "captures", "homeostasis_deviation",
                "three_factor_update_norm", "working_memory_persistence", "mechanisms"):
        assert key in stats, key
    assert stats["tokens_processed"] == 5 + 2 * x.numel() and stats["step"] == 3
    assert set(stats["modules"]) == set(SEED_SIZES)
    for m, d in stats["modules"].items():
        assert d["firing_rate"] > 0 and d["mean_weight"] > 0 and d["neurons"] == model.brain.sizes[m]
    assert all(stats["mechanisms"][m] for m in MECHANISMS)
    assert stats["loss_average"] == pytest.approx(sum(losses) / 3) and stats["loss"] == losses[-1]


def test_gpu_device_falls_back_to_cpu_with_a_warning(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="CUDA"):
        model = NeuroGenModel(vocab_size=32, embedding_dim=8, gpu_device=0, **SMALL)
    assert model.device.type == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert NeuroGenModel(vocab_size=32, embedding_dim=8, gpu_device=-1, **SMALL).device.type == "cpu"


def test_full_brain_has_the_seeds_sizes_and_sparse_fixed_fan_in():
    cfg = BrainConfig(vocab_size=300, embedding_dim=8)
    brain = Brain(cfg)
    assert brain.sizes == SEED_SIZES and brain.n_neurons == 79_872
    # index + weight tensors, one entry per synapse: nothing dense
    assert brain.syn_tgt.dim() == 1 and brain.w_late.shape == brain.syn_tgt.shape
    assert brain.n_synapses < 2_000_000
    for p, (src, tgt, fan, _, _) in enumerate(PROJECTIONS):
        s, t, off, f, _, _, stride = (int(v) for v in brain.proj[p])
        assert f == fan and _ALL[s] == src and _ALL[t] == tgt
        n_src = brain.n_all[s]
        ids = off + torch.arange(n_src)[:, None] * stride + torch.arange(f)
        counts = torch.bincount(brain.syn_tgt[ids].reshape(-1).long(), minlength=brain.n_all[t])
        assert int(counts.min()) == int(counts.max()) == n_src * f // brain.n_all[t]  # fixed fan-in
    assert brain.k["pfc"] == 128 and brain.k["thalamus"] == 16
    codes = brain.code.long()
    assert codes.shape == (300, 16) and all(len(set(r.tolist())) == 16 for r in codes[:50])


def test_config_errors_are_one_sentence():
    for kw, needle in [({"hipocampus": False}, "hippocampus"), ({"activity": "spiking"}, "activity"),
                       ({"sparsity": 0.9}, "sparsity"), ({"scale": "big"}, "scale"), ({"lr": -1.0}, "lr")]:
        with pytest.raises(UserError) as e:
            NeuroGenModel(64, 16, -1, **kw)
        assert needle in str(e.value) and one_sentence(str(e.value)), str(e.value)
    for kw in ({"vocab_size": 1}, {"vocab_size": 2.5}, {"embedding_dim": 0}, {"gpu_device": -2},
               {"gpu_device": "cuda"}):
        with pytest.raises(UserError) as e:
            NeuroGenModel(**{"vocab_size": 64, "embedding_dim": 16, "gpu_device": -1, **kw})
        assert one_sentence(str(e.value)), str(e.value)


def test_bad_inputs_raise_one_clear_sentence():
    model = small_model()
    cases = [
        (lambda: model.train_step([1, 2, 64], [2, 3, 4]), "64"),
        (lambda: model.train_step([1, -1], [2, 3]), "-1"),
        (lambda: model.train_step([1, 2, 3], [2, 3]), "shape"),
        (lambda: model.train_step([], []), "empty"),
        (lambda: model.train_step([[1, 2], [3]], [[2, 3], [4]]), "different lengths"),
        (lambda: model.train_step([1.5, 2.0], [2, 3]), "integer"),
        (lambda: model.train_step(torch.zeros(2, 2, 2, dtype=torch.long), torch.zeros(2, 2, 2, dtype=torch.long)), "shape"),
        (lambda: model.train_step("hello", "world"), "list of token ids"),
        (lambda: model.generate([70]), "70"),
        (lambda: model.generate([]), "empty"),
        (lambda: model.generate([[1, 2], [3, 4]]), "one sequence"),
        (lambda: model.generate([1], max_length=-1), "max_length"),
        (lambda: model.generate([1], temperature=-0.5), "temperature"),
        (lambda: model.generate([1], temperature=float("nan")), "temperature"),
        (lambda: model.evaluate([1, 2], [1]), "shape"),
    ]
    for fn, needle in cases:
        with pytest.raises(UserError) as e:
            fn()
        assert needle in str(e.value) and one_sentence(str(e.value)), str(e.value)
    assert model.step == 0  # nothing was learned from bad input


# ------------------------------------------------------------------ checkpoints


def test_save_load_gives_identical_generation_statistics_and_training(tmp_path):
    model = small_model(replay_interval=2)
    for s in range(4):
        model.train_step(*batch(seed=s))
    path = tmp_path / "brain.ckpt"
    model.save_checkpoint(path)
    assert path.is_file() and metadata_path(path).is_file() and metadata_path(path).name == "brain.ckpt.json"
    from safetensors.torch import load_file

    assert "model.w_late" in load_file(str(path))
    meta = json.loads(metadata_path(path).read_text())
    assert meta["format"] == "neuroplastic-neurogen" and meta["counters"]["step"] == 4
    other = small_model(seed=123, replay_interval=2)  # different init: everything must come from the file
    other.load_checkpoint(path)
    assert other.generate([1, 2, 3], max_length=20, temperature=0) == model.generate([1, 2, 3], max_length=20, temperature=0)
    assert other.generate([4], 15, 1.0, seed=3) == model.generate([4], 15, 1.0, seed=3)
    assert other.get_statistics() == model.get_statistics()
    # learning continues identically (optimizer, dopamine baseline, rules, replay buffer restored)
    x, y = batch(seed=9)
    for _ in range(2):
        assert other.train_step(x, y) == model.train_step(x, y)
    assert torch.equal(other.brain.w_late, model.brain.w_late) and torch.equal(other.brain.motor, model.brain.motor)
    assert other.get_statistics() == model.get_statistics()
    # any extension works, from_checkpoint builds the right size
    model.save_checkpoint(tmp_path / "sub" / "weights.bin")
    assert NeuroGenModel.from_checkpoint(tmp_path / "sub" / "weights.bin").get_statistics() == model.get_statistics()


def test_bad_checkpoints_raise_one_clear_sentence(tmp_path):
    model = small_model()
    model.train_step(*batch())
    path = tmp_path / "a.ckpt"
    model.save_checkpoint(path)
    cases = [
        (lambda: small_model(vocab=65).load_checkpoint(path), "vocab_size"),
        (lambda: small_model(dim=32).load_checkpoint(path), "embedding_dim"),
        (lambda: small_model(scale=1 / 16).load_checkpoint(path), "sizes"),
        (lambda: model.load_checkpoint(tmp_path / "missing.ckpt"), "does not exist"),
        (lambda: model.save_checkpoint(tmp_path), "directory"),
    ]
    lonely = tmp_path / "lonely.ckpt"
    lonely.write_bytes(path.read_bytes())
    cases.append((lambda: model.load_checkpoint(lonely), "metadata"))
    pickled = tmp_path / "p.ckpt"
    torch.save({"w": torch.zeros(2)}, pickled)
    metadata_path(pickled).write_text(metadata_path(path).read_text())
    cases.append((lambda: model.load_checkpoint(pickled), "pickle"))
    bad_json = tmp_path / "j.ckpt"
    bad_json.write_bytes(path.read_bytes())
    metadata_path(bad_json).write_text("{not json")
    cases.append((lambda: model.load_checkpoint(bad_json), "JSON"))
    for fn, needle in cases:
        with pytest.raises(UserError) as e:
            fn()
        assert needle in str(e.value) and one_sentence(str(e.value)), str(e.value)


# ------------------------------------------------------------------ mechanisms


def _after(steps: int = 4, **kw):
    model = small_model(replay_interval=2, replay_batch=2, **kw)
    w0 = model.brain.w_late.clone()
    for s in range(steps):
        model.train_step(*batch(b=2, t=24, seed=s))
    return model, w0


def test_every_mechanism_is_observable_and_switchable():
    full, w0 = _after()
    s = full.get_statistics()
    assert s["recall_rate"] > 0 and s["consolidation_events"] == 2 and s["captures"] > 0
    assert s["tagged_fraction"] > 0 and s["three_factor_update_norm"] > 0
    assert 0 < s["thalamic_gate"] < 1 and s["working_memory_persistence"] > 0
    assert s["modules"]["basal_ganglia"]["firing_rate"] > 0 and s["homeostasis_deviation"] > 0
    assert not torch.equal(full.brain.w_late, w0)

    off = {m: _after(**{m: False}) for m in MECHANISMS}
    for m, (model, _) in off.items():
        st = model.get_statistics()
        assert st["mechanisms"][m] is False and sum(not v for v in st["mechanisms"].values()) == 1
    assert off["hippocampus"][0].get_statistics()["recall_rate"] == 0
    assert off["hippocampus"][0].get_statistics()["modules"]["hippocampus"]["firing_rate"] == 0
    assert off["replay"][0].get_statistics()["consolidation_events"] == 0
    st = off["tagging"][0].get_statistics()
    assert st["captures"] == 0 and st["tagged_fraction"] == 0 and st["early_phase_norm"] == 0
    assert off["three_factor"][0].get_statistics()["three_factor_update_norm"] == 0
    assert off["thalamic_gating"][0].get_statistics()["thalamic_gate"] == 1.0
    assert off["working_memory"][0].get_statistics()["working_memory_persistence"] < s["working_memory_persistence"]
    assert off["basal_ganglia"][0].get_statistics()["modules"]["basal_ganglia"]["firing_rate"] == 0
    # with no plasticity at all the synapses never change; homeostasis alone changes them
    frozen, w0 = _after(three_factor=False, tagging=False, homeostasis=False)
    assert torch.equal(frozen.brain.w_late, w0)
    scaled, w0 = _after(three_factor=False, tagging=False)
    assert not torch.equal(scaled.brain.w_late, w0)


def test_three_factor_sign_follows_dopamine():
    """Coincidences followed by better-than-baseline reward strengthen their synapses."""
    model = small_model(tagging=False, homeostasis=False, replay=False)
    brain = model.brain
    x, _ = batch()
    st = brain.fresh_state(x.shape[0])
    p_i, p_v = st.prev_idx.clone(), st.prev_val.clone()
    act = brain.run_cycle(x, st)
    up, _ = brain.eligibility(act, p_i, p_v, torch.ones(x.shape))
    down, _ = brain.eligibility(act, p_i, p_v, -torch.ones(x.shape))
    none, counts = brain.eligibility(act, p_i, p_v, torch.zeros(x.shape))
    assert (up >= 0).all() and up.sum() > 0 and torch.allclose(down, -up) and (none == 0).all()
    k = brain.kmod.tolist()
    for i, m in enumerate(_ALL[:-1]):  # every module fires k neurons per token
        assert counts[brain.neuron_slice(m)].sum() == k[i] * x.numel()


def test_lif_mode_trains_and_spikes():
    model, _ = _after(steps=3, activity="lif", lif_threshold=0.5)
    st = model.get_statistics()
    assert st["activity"] == "lif" and all(d["firing_rate"] > 0 for d in st["modules"].values())
    x, _ = batch()
    act = model.brain.run_cycle(x, model.brain.fresh_state(x.shape[0]))
    v = act.val[:, :, model.brain.module_slice("pfc")]
    assert set(v.unique().tolist()) <= {0.0, 1.0}


@needs_numba
@pytest.mark.parametrize("activity", ["kwta", "lif"])
def test_compiled_kernel_matches_torch_reference(activity):
    brain = Brain(BrainConfig(vocab_size=64, embedding_dim=8, activity=activity, lif_threshold=0.5, **SMALL))
    x, _ = batch(t=30)
    res = {}
    for be in ("numba", "torch"):
        st = brain.fresh_state(x.shape[0])
        a1 = brain.run_cycle(x[:, :17], st, backend=be)  # two calls: the state carries over
        a2 = brain.run_cycle(x[:, 17:], st, backend=be)
        res[be] = (torch.cat([a1.idx, a2.idx], 1), torch.cat([a1.val, a2.val], 1), torch.cat([a1.gate, a2.gate], 1),
                   torch.cat([a1.recall_token, a2.recall_token], 1), st)
    (ni, nv, ng, nr, ns), (ti, tv, tg, tr, ts) = res["numba"], res["torch"]
    offs = torch.repeat_interleave(brain.noff[:-1], brain.kmod)  # unique key per (module, neuron)
    si, order_n = torch.where(ni >= 0, ni.long() + offs, -1).sort(dim=-1, stable=True)
    sj, order_t = torch.where(ti >= 0, ti.long() + offs, -1).sort(dim=-1, stable=True)
    assert torch.equal(si, sj)  # the same neurons fire (order within a module may differ)
    assert torch.allclose(nv.gather(-1, order_n), tv.gather(-1, order_t), atol=1e-5)
    assert torch.allclose(ng, tg, atol=1e-6) and torch.equal(nr, tr)
    assert torch.allclose(ns.v, ts.v, atol=1e-5) and torch.equal(ns.tl, ts.tl) and torch.equal(ns.hip_n, ts.hip_n)
    assert (nr >= 0).any()  # the repetition was recalled
    from neuroplastic.models.brain import Activity

    act = Activity(ni, nv, ng, torch.zeros_like(ng), nr)
    p0i = torch.full((x.shape[0], int(brain.koff[-1])), -1, dtype=torch.int32)
    p0v = torch.zeros(x.shape[0], int(brain.koff[-1]))
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    dw_n, c_n = brain.eligibility(act, p0i, p0v, d, backend="numba")
    dw_t, c_t = brain.eligibility(act, p0i, p0v, d, backend="torch")
    assert torch.equal(c_n, c_t) and torch.allclose(dw_n, dw_t, atol=1e-4)


def test_torch_backend_trains_like_the_kernel():
    a = small_model(backend="torch", replay=False)
    b = small_model(backend="auto", replay=False)
    x, y = batch(t=12)
    la, lb = a.train_step(x, y), b.train_step(x, y)
    assert la == pytest.approx(lb, abs=1e-5)
    assert a.get_statistics()["backend"] == "torch"
    assert torch.allclose(a.brain.w_late, b.brain.w_late, atol=1e-5)


# ------------------------------------------------------------------ learning


def _synthetic_corpus():
    from neuroplastic.data.synthetic import SyntheticCurriculum
    from neuroplastic.data.tokenizers import ByteTokenizer

    docs = SyntheticCurriculum(seed=0).documents("definitions")
    tok = ByteTokenizer()
    ids = np.asarray([t for d in docs for t in tok.encode(d) + [tok.eos_id]], dtype=np.int64)
    split = int(len(ids) * 0.9)
    return ids[:split], ids[split:], tok.vocab_size


def test_it_learns_below_the_unigram_entropy():
    from neuroplastic.neurogen.experiment import (
        heldout_blocks,
        heldout_loss,
        unigram_entropy,
        windows,
    )

    train, val, vocab = _synthetic_corpus()
    h1 = unigram_entropy(train, vocab)
    model = NeuroGenModel(vocab, 32, -1, scale=1 / 16, sparsity=1 / 32, replay_interval=10)
    vb = heldout_blocks(val, 32, 16)
    before = heldout_loss(model, vb)
    rng = np.random.default_rng(0)
    curve = []
    for s in range(30):
        model.train_step(*windows(train, 16, 32, rng))
        if s % 10 == 9:
            curve.append(heldout_loss(model, vb))
    assert curve[0] < before and curve[-1] < curve[0]
    assert curve[-1] < h1 - 0.25, (curve, h1)


@pytest.mark.slow
def test_it_learns_tinyshakespeare_at_scale_one_eighth():
    from neuroplastic.data.registry import find_local
    from neuroplastic.neurogen.experiment import (
        heldout_blocks,
        load_corpus,
        train_fixed,
        unigram_entropy,
    )

    if find_local("tinyshakespeare") is None:
        pytest.skip("tinyshakespeare is not available locally")
    corpus = load_corpus("tinyshakespeare")
    model = NeuroGenModel(corpus.vocab_size, 128, -1, scale=1 / 8, sparsity=1 / 64)
    r = train_fixed(model, corpus, 150, 32, 64, 0, heldout_blocks(corpus.val, 64, 64), eval_every=50)
    losses = [loss for _, loss in r.curve]
    assert losses[-1] < losses[1] < losses[0]
    assert losses[-1] < unigram_entropy(corpus.train, corpus.vocab_size) - 0.5


# ------------------------------------------------------------------ the command line


def train_opts(tmp_path, **kw):
    from neuroplastic.neurogen.train import TrainOptions

    data = tmp_path / "corpus.txt"
    if not data.exists():
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text(SAMPLE_TEXT)
    base = dict(data=str(data), out=str(tmp_path / "run"), tokens_per_chunk=256, max_seq_length=32, max_chunks=4,
                checkpoint_interval=2, log_interval=1, embedding_dim=16, gpu_device=-1, scale=1 / 32,
                overrides=["sparsity=0.0625", "replay_interval=3"], tensorboard=False, progress=False)
    base.update(kw)
    return TrainOptions(**base)


def test_streaming_trainer_checkpoints_logs_and_resumes_exactly(tmp_path):
    from neuroplastic.neurogen.train import list_checkpoints, load_model, train

    straight = train(train_opts(tmp_path / "a", max_chunks=6), echo=lambda s: None)
    assert straight["steps"] == 6
    ckpts = [p.name for _, p in list_checkpoints(tmp_path / "a" / "run" / "checkpoints")]
    assert ckpts == ["step_0000002", "step_0000004", "step_0000006"]
    recs = [json.loads(line) for line in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "avg_loss", "tokens_per_s", "firing_rate/pfc", "dopamine", "consolidation_events"):
        assert key in train_recs[-1], key
    assert (tmp_path / "a" / "run" / "loss_curve.png").is_file()

    train(train_opts(tmp_path / "b", max_chunks=4), echo=lambda s: None)
    with pytest.raises(UserError, match="--resume"):  # not a terminal and no choice given
        train(train_opts(tmp_path / "b", max_chunks=6), echo=lambda s: None, isatty=False)
    questions = []
    resumed = train(train_opts(tmp_path / "b", max_chunks=6), echo=lambda s: None, isatty=True,
                    ask=lambda q: questions.append(q) or "y")
    assert "Load checkpoint? (y/n)" in questions[0]
    assert resumed["resumed_from"].name == "step_0000004" and resumed["steps"] == 6
    assert resumed["avg_loss"] == straight["avg_loss"]
    a, _ = load_model(tmp_path / "a" / "run" / "checkpoints" / "step_0000006", -1)
    b, _ = load_model(tmp_path / "b" / "run" / "checkpoints" / "step_0000006", -1)
    assert a.get_statistics() == b.get_statistics()
    # "n" starts over; --no-resume too (removing the old checkpoints)
    fresh = train(train_opts(tmp_path / "b", max_chunks=2), echo=lambda s: None, isatty=True, ask=lambda q: "n")
    assert fresh["resumed_from"] is None and fresh["steps"] == 2
    assert [p.name for _, p in list_checkpoints(tmp_path / "b" / "run" / "checkpoints")] == ["step_0000002"]


def test_init_from_fine_tunes_with_a_new_lr(tmp_path):
    from neuroplastic.neurogen.train import train

    first = train(train_opts(tmp_path, max_chunks=2), echo=lambda s: None)
    tuned = train(train_opts(tmp_path, out=str(tmp_path / "tuned"), init_from=str(first["checkpoint"]), lr=1e-4,
                              max_chunks=2), echo=lambda s: None)
    assert tuned["steps"] == 2 and tuned["statistics"]["lr"] == 1e-4
    assert tuned["statistics"]["tokens_processed"] == 2 * first["statistics"]["tokens_processed"]


def test_cli_exit_2_paths(tmp_path, capsys):
    from neuroplastic.cli import main

    data = tmp_path / "c.txt"
    data.write_text(SAMPLE_TEXT)
    common = ["neurogen", "train", "--data", str(data), "--out", str(tmp_path / "r"), "--no-progress",
              "--gpu-device", "-1", "--scale", "0.03125", "--embedding-dim", "8"]
    bad = [
        (["neurogen", "train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")], "does not exist"),
        ([*common, "--max-seq-length", "0"], "--max-seq-length"),
        ([*common, "--init-from", str(tmp_path / "nope.ckpt")], "does not exist"),
        ([*common, "--set", "hipocampus=false"], "hippocampus"),
        ([*common, "--tokenizer", str(tmp_path / "no-tokenizer")], "tokenizer"),
        (["neurogen", "generate", str(tmp_path / "nothing.ckpt")], "does not exist"),
        (["neurogen", "ablate", "--mechanism", "dopamine"], "Unknown mechanism"),
    ]
    for argv, needle in bad:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (argv, err)


def test_cli_subprocess_must_choose_resume_without_a_terminal(tmp_path):
    from neuroplastic.neurogen.train import train

    train(train_opts(tmp_path, max_chunks=2), echo=lambda s: None)
    r = run_cli("neurogen", "train", "--data", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "run"),
                "--max-chunks", "3", "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--resume" in lines[0] and "--no-resume" in lines[0]


@pytest.mark.slow
def test_cli_subprocess_train_resume_and_generate(tmp_path):
    data = tmp_path / "c.txt"
    data.write_text(SAMPLE_TEXT)
    args = ["neurogen", "train", "--data", str(data), "--out", str(tmp_path / "r"), "--no-progress",
            "--gpu-device", "-1", "--scale", "0.03125", "--embedding-dim", "8", "--tokens-per-chunk", "128",
            "--max-seq-length", "32", "--checkpoint-interval", "2"]
    r = run_cli(*args, "--max-chunks", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step_0000002" in r.stdout
    r = run_cli(*args, "--max-chunks", "3", "--resume")
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr[-2000:]
    r = run_cli("neurogen", "generate", str(tmp_path / "r"), "--prompt", "The heart", "--max-length", "20")
    assert r.returncode == 0 and r.stdout.startswith("The heart"), r.stderr[-2000:]


def test_ablation_reports_each_mechanism(tmp_path):
    from neuroplastic.neurogen.ablate import run_neurogen_ablation

    data = tmp_path / "c.txt"
    data.write_text(SAMPLE_TEXT)
    res = run_neurogen_ablation(["hippocampus", "three_factor"], seeds=2, data=str(data), steps=2, batch=4,
                                seq_len=16, embedding_dim=8, overrides=dict(SMALL), out_dir=tmp_path / "abl",
                                val_seqs=4, echo=lambda s: None, progress=False)
    names = [m.name for m in res["report"].metrics]
    assert names == ["hippocampus", "three_factor"]
    assert all(m.verdict in ("helps", "hurts", "no detectable effect") for m in res["report"].metrics)
    assert all(len(v) == 2 for v in res["losses"].values())
    for f in ("ablation.md", "ablation.json", "ablation.png"):
        assert (tmp_path / "abl" / f).is_file()
    assert "| hippocampus |" in res["markdown"]


def _ng_ablate(tmp_path, mechanisms, out="abl", overrides=None, **kw):
    from neuroplastic.neurogen.ablate import run_neurogen_ablation

    data = tmp_path / "c.txt"
    data.write_text(SAMPLE_TEXT)
    args = dict(seeds=2, data=str(data), steps=2, batch=4, seq_len=16, embedding_dim=8,
                overrides=dict(SMALL, **(overrides or {})), out_dir=tmp_path / out, val_seqs=4,
                echo=lambda s: None, progress=False)
    args.update(kw)
    return run_neurogen_ablation(mechanisms, **args)


def test_ablation_mechanism_that_never_acted_gets_no_verdict(tmp_path, capsys):
    """Replay fires every 50 steps: in 2 steps it never ran, so both arms are the same brain
    and the table must say 'did not act in this budget', not 'no detectable effect'."""
    res = _ng_ablate(tmp_path, ["replay", "three_factor"], progress=True)
    verdicts = {m.name: m.verdict for m in res["report"].metrics}
    assert verdicts["replay"] == "did not act in this budget"
    assert verdicts["three_factor"] in ("helps", "hurts", "no detectable effect")
    assert [a["replay"] for a in res["acted"]["full"]] == [0, 0]
    assert [a["three_factor"] for a in res["acted"]["full"]] == [2, 2]
    assert [a["three_factor"] for a in res["acted"]["three_factor"]] == [0, 0]  # off in its own arm
    assert "| replay | " in res["markdown"] and "| did not act in this budget | 0, 0 |" in res["markdown"]
    assert res["exit_code"] == 0
    err = capsys.readouterr().err
    assert "run 1/6 seed 0 full" in err and "run 6/6 seed 1 three_factor" in err  # per-run bars
    # replay every step: now it acts on both steps and gets a verdict
    res = _ng_ablate(tmp_path, ["replay"], out="abl2", overrides={"replay_interval": 1})
    assert [a["replay"] for a in res["acted"]["full"]] == [2, 2]
    assert res["report"].metrics[0].verdict in ("helps", "hurts", "no detectable effect")


def test_ablation_interrupted_is_marked_and_rerun_keeps_finished_runs(tmp_path, monkeypatch):
    import os
    import signal

    from neuroplastic.neurogen import ablate

    real_call = ablate.MechanismCounter.__call__
    sent = []

    def call(self, step=0, loss=0.0):
        real_call(self, step, loss)
        if self.model.cfg.seed == 1 and not self.model.cfg.hippocampus and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ablate.MechanismCounter, "__call__", call)
    res = _ng_ablate(tmp_path, ["hippocampus"])
    assert res["exit_code"] == 143
    runs = {(r.seed, r.arm): r.describe() for r in res["report"].runs}
    assert runs == {(0, "full"): "complete", (0, "hippocampus"): "complete", (1, "full"): "complete",
                    (1, "hippocampus"): "interrupted at step 1 of 2"}
    assert res["report"].metrics[0].verdict == "no verdict: 1 of 2 seeds complete"
    assert "Runs: 1 of 2 seeds complete; seed 1 hippocampus: interrupted at step 1 of 2" in res["markdown"]
    first = {k: v[:] for k, v in res["losses"].items()}

    monkeypatch.setattr(ablate.MechanismCounter, "__call__", real_call)
    lines = []
    res = _ng_ablate(tmp_path, ["hippocampus"], echo=lines.append)
    assert res["exit_code"] == 0 and res["report"].complete_seeds() == [0, 1]
    assert sum("kept from" in line for line in lines) == 3  # only the cut run ran again
    assert res["losses"]["full"][0] == first["full"][0]
    assert not (tmp_path / "abl" / "ablation.incomplete").exists()
    lines.clear()  # a complete ablation is not continued: the same command measures anew
    res = _ng_ablate(tmp_path, ["hippocampus"], echo=lines.append)
    assert res["exit_code"] == 0 and not any("kept" in line for line in lines) and len(lines) == 4


def test_cli_mechanism_names_match_the_brain():
    from neuroplastic.neurogen.cli import MECHANISM_NAMES

    assert tuple(MECHANISM_NAMES) == tuple(MECHANISMS)


def test_token_stream_resumes_inside_and_across_documents(tmp_path):
    from neuroplastic.neurogen.train import TokenStream

    docs = ["abc", "defgh", "ij"]
    enc = lambda s: [ord(c) for c in s]  # noqa: E731
    full = TokenStream(lambda: iter(docs), enc, 0).take(100)
    assert full == enc("abc") + [0] + enc("defgh") + [0] + enc("ij") + [0]
    s = TokenStream(lambda: iter(docs), enc, 0)
    first = s.take(6)
    t = TokenStream(lambda: iter(docs), enc, 0)
    t.load_state_dict(s.state_dict())
    assert first + t.take(100) == full and t.exhausted


@needs_numba
def test_kernel_top_k_selection_is_exact_with_ties():
    from neuroplastic.models.brain_kernels import _select_topk

    rng = np.random.default_rng(0)
    for n, k, distinct in [(3000, 64, 10**9), (2000, 300, 10**9), (600, 100, 10**9), (1500, 50, 40), (300, 200, 7)]:
        score = rng.integers(0, distinct, n).astype(np.float32) if distinct < 10**9 else rng.random(n).astype(np.float32)
        sel = np.arange(n, dtype=np.int32) + 1000
        row_idx, row_val = np.full(k, -1, np.int32), np.zeros(k, np.float32)
        nw = _select_topk(score.copy(), sel, n, k, np.empty(n + 1, np.float32), np.empty(n + 1, np.int32),
                          row_idx, row_val, 0)
        # expected: the k largest, ties at the k-th value to the earliest candidates, in candidate order
        order = sorted(range(n), key=lambda i: (-score[i], i))[:k]
        assert nw == k and row_idx.tolist() == [int(sel[i]) for i in sorted(order)]
        assert np.array_equal(row_val, score[sorted(order)])


def test_streaming_trainer_with_a_bpe_tokenizer_and_jsonl_data(tmp_path):
    from neuroplastic.data.tokenizers import load_tokenizer
    from neuroplastic.neurogen.train import load_model, train

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"body": s + "."}) + "\n" for s in SAMPLE_TEXT.split(". ") if s))
    res = train(train_opts(tmp_path, data=str(data), field="body", tokenizer="bpe", bpe_vocab_size=300,
                            max_chunks=2), echo=lambda s: None)
    tok = load_tokenizer(tmp_path / "run" / "tokenizer")
    assert tok.kind == "bpe" and res["statistics"]["tokens_processed"] > 0
    assert load_model(res["checkpoint"], -1)[0].vocab_size == tok.vocab_size


def test_motor_bag_gradient_equals_embedding_bag():
    """The sparse-matmul backward of the readout's motor dictionary gives embedding_bag's
    gradient (up to float rounding), with repeated indices and zero-weight (empty) slots."""
    import torch.nn.functional as F

    from neuroplastic.models.brain import MotorBag, motor_bag

    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 50, (37, 6), generator=gen)
    idx[:, 0] = idx[:, 1]  # repeats inside a row
    val = torch.rand(37, 6, generator=gen)
    val[::3, 2] = 0.0  # empty slots
    motor = torch.randn(50, 8, generator=gen, requires_grad=True)
    g = torch.randn(37, 8, generator=gen)
    ref = F.embedding_bag(idx, motor, per_sample_weights=val, mode="sum")
    (gref,) = torch.autograd.grad(ref, motor, g)
    out = MotorBag.apply(idx, val, motor)
    (gout,) = torch.autograd.grad(out, motor, g)
    assert torch.equal(out, ref)
    torch.testing.assert_close(gout, gref, rtol=1e-5, atol=1e-6)
    assert motor_bag(idx, val, motor).grad_fn.name().startswith("MotorBag")
    with torch.no_grad():
        assert torch.equal(motor_bag(idx, val, motor), ref)
