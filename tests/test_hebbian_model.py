"""Tests for the agiformer model (neuroplastic.models.hebbian)."""

from __future__ import annotations

import math

import pytest
import torch

from neuroplastic.config import ModelConfig, load_config
from neuroplastic.errors import UserError
from neuroplastic.models import GPT, build_model, checkpoint_io
from neuroplastic.models.hebbian import HebbianLM
from neuroplastic.training.trainer import Trainer
from tests.conftest import tiny_overrides

RULES = ["hebbian", "delta"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops: intra-op threads only add overhead (and stall badly on a shared CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(
        arch="hebbian", vocab_size=48, block_size=40, n_layer=2, n_head=4, n_embd=32,
        mlp_ratio=2.0, window=6, chunk_size=4,
    )
    base.update(kw)
    return ModelConfig.from_flat(**base)


def sharp_model(cfg: ModelConfig, seed: int = 0) -> HebbianLM:
    """Large random weights: peaked logits, so bugs in the carried state change tokens."""
    torch.manual_seed(seed)
    model = HebbianLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "decay_logit" not in name:  # keep the spread of horizons
                p.normal_(0.0, 0.3)
    return model.eval()


def _greedy_by_rerun(model: HebbianLM, prompt: torch.Tensor, n: int) -> torch.Tensor:
    out = prompt
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(out)
            out = torch.cat((out, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return out


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("prompt_len", [1, 5, 6, 7, 30])  # window = 6; 30 >= 4 windows: blockwise prefill
@pytest.mark.parametrize("conv", [0, 3])
def test_generation_with_carried_state_equals_rerun(rule, prompt_len, conv):
    cfg = tiny_cfg(memory_rule=rule, alpha=0.9, conv_size=conv)
    model = sharp_model(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (2, prompt_len), generator=torch.Generator().manual_seed(3))
    n = cfg.block_size - prompt_len
    cached = model.generate(prompt, n, temperature=0.0, use_cache=True)
    assert cached.shape == (2, cfg.block_size)
    assert torch.equal(cached, _greedy_by_rerun(model, prompt, n))
    assert torch.equal(cached, model.generate(prompt, n, temperature=0.0, use_cache=False))


@pytest.mark.parametrize("rule", RULES)
def test_generation_with_own_memory_projection_and_shift_init(rule):
    cfg = tiny_cfg(memory_rule=rule, conv_size=3, conv_init="shift", memory_qkv="own")
    model = sharp_model(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    n = cfg.block_size - 5
    cached = model.generate(prompt, n, temperature=0.0, use_cache=True)
    assert torch.equal(cached, _greedy_by_rerun(model, prompt, n))


def test_shift_init_makes_the_memory_an_induction_lookup():
    """conv_init=shift with an own projection: q and v see this token, k the token before,
    through the same projection, so q_t . k_s is high exactly where x_t == x_{s-1}."""
    cfg = tiny_cfg(conv_size=4, conv_init="shift", memory_qkv="own", memory_heads=1)
    torch.manual_seed(0)
    model = HebbianLM(cfg)
    mix = model.transformer["h"][0].mix
    C, K = cfg.gpt.n_embd, 4
    w = mix.mem_conv.weight[:, 0]
    assert torch.equal(w[:C, K - 1], torch.ones(C)) and torch.equal(w[:C, : K - 1], torch.zeros(C, K - 1))
    assert torch.equal(w[C : 2 * C, K - 2], torch.ones(C)) and w[C : 2 * C].abs().sum() == C
    assert torch.equal(w[2 * C :, K - 1], torch.ones(C))
    assert torch.equal(mix.mem_attn.weight[:C], mix.mem_attn.weight[C : 2 * C])
    # attention's own q/k are left alone (not tied)
    assert not torch.equal(mix.c_attn.weight[:C], mix.c_attn.weight[C : 2 * C])
    # a shared projection is not tied either (it would tie the attention's q and k)
    shared = HebbianLM(tiny_cfg(conv_size=4, conv_init="shift")).transformer["h"][0].mix
    assert shared.mem_attn is None
    assert not torch.equal(shared.c_attn.weight[:C], shared.c_attn.weight[C : 2 * C])


@pytest.mark.parametrize("T,W", [(8, 2), (37, 4), (64, 16), (70, 8), (9, 1)])
def test_blocked_local_attention_equals_banded_mask(T, W):
    from neuroplastic.models.hebbian import blocked_local_attention

    g = torch.Generator().manual_seed(T * W)
    q, k, v = (torch.randn(2, 3, T, 5, generator=g, dtype=torch.float64) for _ in range(3))
    rel = torch.arange(T)[None, :] - torch.arange(T)[:, None]
    mask = (rel <= 0) & (rel > -W)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(blocked_local_attention(q, k, v, W), want, rtol=1e-12, atol=1e-12)


def test_long_forward_with_small_window_uses_blocks_and_matches_pieces():
    """T >= 4 window runs the blockwise kernel; feeding the same tokens in short pieces
    with a carried state (banded-mask path) gives the same logits."""
    cfg = tiny_cfg(window=3, block_size=40)
    model = sharp_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    full, _ = model(idx)
    state = model.new_state()
    pieces = [model(idx[:, a : a + 5], state=state)[0] for a in range(0, 40, 5)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-4, rtol=1e-4)


def test_decay_logit_init():
    one = HebbianLM(tiny_cfg(memory_heads=2, decay_logit_init=[6.0]))
    lam = 0.99 + 0.01 / (1 + math.exp(-6.0))
    torch.testing.assert_close(one.decay_rates(), torch.full((2, 2), lam))
    per = HebbianLM(tiny_cfg(memory_heads=2, decay_logit_init=[-1.0, 2.0]))
    want = torch.tensor([0.99 + 0.01 / (1 + math.exp(1.0)), 0.99 + 0.01 / (1 + math.exp(-2.0))])
    torch.testing.assert_close(per.decay_rates(), want.expand(2, 2))
    default = HebbianLM(tiny_cfg(memory_heads=2))  # spread over [-3, 3]
    assert default.decay_rates()[0, 0] < default.decay_rates()[0, 1]
    with pytest.raises(UserError, match="decay_logit_init"):
        HebbianLM(tiny_cfg(memory_heads=2, decay_logit_init=[1.0, 2.0, 3.0]))


def test_beta_bias():
    plain = HebbianLM(tiny_cfg(memory_rule="delta"))
    assert plain.transformer["h"][0].mix.beta_proj.bias is None
    biased = HebbianLM(tiny_cfg(memory_rule="delta", beta_bias=-2.0))
    bias = biased.transformer["h"][0].mix.beta_proj.bias
    assert torch.equal(bias, torch.full_like(bias, -2.0))
    assert biased.num_params() == plain.num_params() + 2 * 4  # n_layer x memory heads


def test_own_memory_projection_adds_its_parameters():
    shared = build_model(tiny_cfg(conv_size=4))
    own = build_model(tiny_cfg(conv_size=4, memory_qkv="own"))
    C, L = 32, 2
    assert own.num_params() - shared.num_params() == L * 3 * C * C


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("conv", [0, 4])
def test_stateful_pieces_match_full_forward(rule, conv):
    cfg = tiny_cfg(memory_rule=rule, conv_size=conv)
    model = sharp_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1))
    full, _ = model(idx)
    state = model.new_state()
    pieces = []
    # a first piece longer than the window, one shorter, single tokens, a long one
    for a, b in [(0, 9), (9, 12), (12, 13), (13, 14), (14, 23)]:
        logits, _ = model(idx[:, a:b], state=state)
        pieces.append(logits)
        assert state.pos == b and state.cached == min(b, cfg.hebbian.window - 1)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)


def test_generation_runs_past_block_size():
    cfg = tiny_cfg(block_size=16)
    model = sharp_model(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="block_size"):
        model(prompt)
    out = model.generate(prompt, 20, temperature=0.0)
    assert out.shape == (1, 40)
    # no cropping: the carried state equals recomputing everything in block_size pieces
    assert torch.equal(out, model.generate(prompt, 20, temperature=0.0, use_cache=False))


def test_sampling_and_eos():
    cfg = tiny_cfg()
    model = sharp_model(cfg)
    prompt = torch.zeros(3, 2, dtype=torch.long)
    a = model.generate(prompt, 10, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(0))
    b = model.generate(prompt, 10, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (3, 12)
    first = model.generate(prompt, 1, temperature=0.0)[:, -1]
    out = model.generate(prompt, 10, temperature=0.0, eos_id=int(first[0]))
    assert (out[0, 2:] == first[0]).all()


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("fmap", ["elu1", "identity_l2"])
def test_chunked_forward_equals_recurrent(rule, fmap):
    cfg = tiny_cfg(memory_rule=rule, feature_map=fmap, memory_heads=2, alpha=0.5)
    model = sharp_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(5))
    chunked, _ = model(idx, mode="chunked")
    recurrent, _ = model(idx, mode="recurrent")
    torch.testing.assert_close(chunked, recurrent, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rule", RULES)
def test_bf16_autocast_forward_is_finite(rule):
    cfg = tiny_cfg(alpha=0.1, block_size=128, chunk_size=16, window=16, memory_rule=rule)
    torch.manual_seed(0)
    model = HebbianLM(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 128))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits.float()).all() and torch.isfinite(loss)
    loss.backward()
    # every parameter learns (the decay logits and gates included), with finite gradients
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_overfits_one_batch():
    cfg = tiny_cfg(vocab_size=32, block_size=32, window=8, chunk_size=8)
    torch.manual_seed(0)
    model = HebbianLM(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(300):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < 0.5:
            break
    assert loss.item() < 0.5


# --------------------------------------------------------------------------- decay / alpha


def test_lambda_formula_and_set_alpha_round_trip():
    cfg = tiny_cfg(alpha=0.5)
    model = HebbianLM(cfg)
    assert float(model.alpha) == 0.5
    with torch.no_grad():
        for i, block in enumerate(model.transformer["h"]):
            block.mix.decay_logit.copy_(torch.tensor([-2.0, 0.0, 1.0, 30.0]) + i)
    for i, row in enumerate(model.decay_rates()):
        for p, lam in zip(torch.tensor([-2.0, 0.0, 1.0, 30.0]) + i, row):
            expected = (0.99 + 0.01 / (1 + math.exp(-float(p)))) * 0.5
            assert abs(float(lam) - expected) < 1e-6
    idx = torch.randint(0, cfg.vocab_size, (1, 20))
    before, _ = model(idx)
    lam_before = model.decay_rates()
    model.set_alpha(0.1)
    assert float(model.alpha) == pytest.approx(0.1)
    torch.testing.assert_close(model.decay_rates(), lam_before / 0.5 * 0.1)
    after, _ = model(idx)
    assert not torch.allclose(before, after)
    # alpha is a buffer in the state dict: a fresh model restores it
    sd = model.state_dict()
    assert "alpha" in sd
    fresh = HebbianLM(cfg)
    assert float(fresh.alpha) == 0.5
    fresh.load_state_dict(sd)
    assert float(fresh.alpha) == pytest.approx(0.1)
    torch.testing.assert_close(fresh(idx)[0], after)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError):
            model.set_alpha(bad)
    # at alpha = 1 and a saturated logit, lambda reaches 1 and log lambda stays <= 0
    model.set_alpha(1.0)
    log_decay = model.transformer["h"][0].mix.log_decay(model.alpha.log())
    assert (log_decay <= 0).all() and torch.isfinite(log_decay).all()


def test_meta_device_construction():
    cfg = tiny_cfg(alpha=0.3)
    with torch.device("meta"):
        model = HebbianLM(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    assert float(model.alpha) == pytest.approx(0.3)
    assert torch.isfinite(model(torch.zeros(1, 4, dtype=torch.long))[0]).all()
    # with the same weights the meta-built model computes exactly what a normally built
    # one does (nothing is left uninitialised by to_empty)
    ref = HebbianLM(cfg)
    model.load_state_dict(ref.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    torch.testing.assert_close(model(idx)[0], ref(idx)[0], rtol=0, atol=0)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"vocab_size": 0}, "vocab_size"),
        ({"window": 0}, "window"),
        ({"memory_heads": 3}, "memory_heads"),
        ({"memory_rule": "oja"}, "memory_rule"),
        ({"feature_map": "relu"}, "feature_map"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"conv_size": -1}, "conv_size"),
        ({"conv_size": 1, "conv_init": "shift"}, "conv_size >= 2"),
        ({"conv_init": "zeros"}, "conv_init"),
        ({"memory_qkv": "separate"}, "memory_qkv"),
        ({"alpha": 0.0}, "alpha"),
        ({"pos": "learned"}, "pos"),
    ],
)
def test_bad_config_raises_user_error(kw, match):
    with pytest.raises(UserError, match=match):
        build_model(tiny_cfg(**kw))


def test_params_close_to_same_size_gpt():
    for rule, conv in [(r, c) for r in RULES for c in (0, 4)]:
        cfg = ModelConfig.from_flat(arch="hebbian", vocab_size=256, memory_rule=rule, conv_size=conv)
        heb = build_model(cfg)
        gpt = build_model(ModelConfig.from_flat(vocab_size=256))
        assert isinstance(heb, HebbianLM) and isinstance(gpt, GPT)
        assert abs(heb.num_params() / gpt.num_params() - 1) < 0.10
        assert heb.flops_per_token() > 0


# --------------------------------------------------------------------------- trainer


def test_trainer_runs_hebbian(text_file, tmp_path):
    overrides = tiny_overrides(
        text_file, tmp_path / "run",
        **{
            "model.arch": "hebbian",
            "model.window": 8,
            "model.chunk_size": 8,
            "model.alpha": 0.5,
            "train.max_steps": 5,
        },
    )
    trainer = Trainer(load_config("tiny", overrides))
    trainer.train()
    assert isinstance(trainer.model, HebbianLM)
    losses = [h["loss"] for h in trainer.history]
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)
    # the checkpoint restores alpha with the weights
    last = checkpoint_io.latest_checkpoint(trainer.ckpt_dir)
    assert last is not None
    model = HebbianLM(trainer.cfg.model)
    model.set_alpha(0.9)
    checkpoint_io.load_model_weights(model, last / "model.safetensors")
    assert float(model.alpha) == pytest.approx(0.5)
