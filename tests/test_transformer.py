"""Tests for the GPT transformer (neuroplastic.models.transformer)."""

from __future__ import annotations

import pytest
import torch

from neuroplastic.config import ModelConfig
from neuroplastic.errors import UserError
from neuroplastic.models import GPT, build_model
from neuroplastic.models.transformer import KVCache

VARIANTS = [
    ("rmsnorm", "rope"),
    ("rmsnorm", "learned"),
    ("layernorm", "rope"),
    ("layernorm", "learned"),
]


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=48, block_size=24, n_layer=2, n_head=4, n_embd=32, mlp_ratio=2.0)
    base.update(kw)
    return ModelConfig.from_flat(**base)


def sharp_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    """A model with large random weights: peaked logits and position-dependent attention,
    so that bugs in caching or positions change the generated tokens."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("norm,pos", VARIANTS)
def test_cached_forward_matches_full_forward(norm, pos):
    cfg = tiny_cfg(norm=norm, pos=pos, bias=True)
    model = sharp_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    full, _ = model(idx)
    cache = KVCache(cfg.gpt.n_layer, cfg.block_size)
    # prefill 5, then 4 at once (explicit mask with past keys), then 1, then 2
    pieces = []
    for a, b in [(0, 5), (5, 9), (9, 10), (10, 12)]:
        logits, _ = model(idx[:, a:b], kv_cache=cache)
        pieces.append(logits)
        assert cache.pos == b
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm,pos", VARIANTS)
def test_greedy_cache_equals_no_cache(norm, pos):
    cfg = tiny_cfg(norm=norm, pos=pos)
    model = sharp_model(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (3, 5), generator=torch.Generator().manual_seed(2))
    # 30 new tokens: the context passes block_size (24), exercising the crop fallback
    a = model.generate(prompt, 30, temperature=0.0, use_cache=True)
    b = model.generate(prompt, 30, temperature=0.0, use_cache=False)
    assert a.shape == (3, 35)
    assert torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b)
    assert len(set(a[0, 5:].tolist())) > 3  # not a degenerate repeat of one token


@pytest.mark.parametrize("norm,pos", VARIANTS)
def test_sampling_cache_equals_no_cache(norm, pos):
    cfg = tiny_cfg(norm=norm, pos=pos)
    model = sharp_model(cfg, seed=3)
    prompt = torch.randint(0, cfg.vocab_size, (2, 4), generator=torch.Generator().manual_seed(4))
    kw = dict(temperature=0.8, top_k=20, top_p=0.95)
    a = model.generate(prompt, 28, use_cache=True, generator=torch.Generator().manual_seed(7), **kw)
    b = model.generate(prompt, 28, use_cache=False, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(a, b)
    c = model.generate(prompt, 28, use_cache=True, generator=torch.Generator().manual_seed(8), **kw)
    assert not torch.equal(a, c)


def test_top_k_1_and_tiny_top_p_equal_greedy():
    cfg = tiny_cfg()
    model = sharp_model(cfg, seed=5)
    prompt = torch.randint(0, cfg.vocab_size, (2, 3), generator=torch.Generator().manual_seed(6))
    greedy = model.generate(prompt, 15, temperature=0.0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(prompt, 15, temperature=1.3, top_k=1, generator=g), greedy)
    assert torch.equal(model.generate(prompt, 15, temperature=1.3, top_p=1e-6, generator=g), greedy)


def test_eos_stops_early_and_pads_finished_rows():
    cfg = tiny_cfg()
    model = sharp_model(cfg, seed=5)
    prompt = torch.randint(0, cfg.vocab_size, (2, 3), generator=torch.Generator().manual_seed(6))
    greedy = model.generate(prompt, 15, temperature=0.0)
    eos = int(greedy[0, 3])  # the first token row 0 emits
    out = model.generate(prompt, 15, temperature=0.0, eos_id=eos)
    row1 = greedy[1, 3:].tolist()
    if eos in row1:  # stops once row 1 also emitted it
        assert out.size(1) == 3 + row1.index(eos) + 1
    else:
        assert out.size(1) == greedy.size(1)
    assert (out[0, 3:] == eos).all()


def test_generate_restores_training_mode():
    model = GPT(tiny_cfg(dropout=0.1)).train()
    model.generate(torch.zeros(1, 2, dtype=torch.long), 3)
    assert model.training


def test_overfits_one_batch():
    torch.manual_seed(0)
    cfg = tiny_cfg(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = GPT(cfg)
    data = torch.randint(0, cfg.vocab_size, (4, 17))
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.1


def test_loss_ignores_minus_100():
    cfg = tiny_cfg()
    model = sharp_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 8))
    y = torch.randint(0, cfg.vocab_size, (2, 8))
    logits, _ = model(x)
    y_masked = y.clone()
    y_masked[:, :4] = -100
    _, loss = model(x, y_masked)
    ref = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, cfg.vocab_size), y[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, ref)


def test_seed_size_config_on_meta_device():
    cfg = ModelConfig.from_flat(vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=2048)
    with torch.device("meta"):
        model = GPT(cfg)
    assert next(model.parameters()).device.type == "meta"
    n = model.num_params()
    assert 1.2e9 <= n <= 1.4e9
    assert model.config is cfg
    # 6N + 12 L H Q T
    assert model.flops_per_token() == 6 * n + 12 * 24 * 16 * 128 * 1024
    assert model.flops_per_token(256) == 6 * n + 12 * 24 * 16 * 128 * 256


def test_meta_construction_then_init_weights_gives_the_same_model():
    """The RoPE tables are non-persistent buffers: after ``to_empty`` + ``init_weights`` they
    are recomputed, so a meta-built model loaded with a state dict computes what the
    original does."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    ref = GPT(cfg)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    model.load_state_dict(ref.state_dict())
    x = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    torch.testing.assert_close(model(x)[0], ref(x)[0], rtol=0, atol=0)
    assert "rope_cos" not in ref.state_dict()


def test_num_params_conventions():
    tied = GPT(tiny_cfg(pos="learned"))
    wpe = tied.transformer["wpe"].weight.numel()
    assert tied.num_params(non_embedding=False) - tied.num_params() == wpe
    untied = GPT(tiny_cfg(tie_weights=False))
    wte = untied.transformer["wte"].weight.numel()
    assert untied.num_params(non_embedding=False) - untied.num_params() == wte
    # tied weights: one tensor, no duplicate in the state dict
    assert "lm_head.weight" not in tied.state_dict()
    assert "lm_head.weight" in untied.state_dict()


@pytest.mark.parametrize("norm,pos", VARIANTS)
def test_causality(norm, pos):
    cfg = tiny_cfg(norm=norm, pos=pos)
    model = sharp_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    t = 9
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_too_long_input_raises():
    cfg = tiny_cfg(block_size=8)
    model = GPT(cfg)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))
    model(torch.zeros(1, 8, dtype=torch.long))  # exactly block_size is fine
    cache = KVCache(cfg.gpt.n_layer, cfg.block_size)
    model(torch.zeros(1, 6, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)


def test_bad_configs_raise_user_error():
    with pytest.raises(UserError, match="vocab_size"):
        GPT(tiny_cfg(vocab_size=0))
    with pytest.raises(UserError, match="divisible"):
        GPT(tiny_cfg(n_embd=30, n_head=4))
    with pytest.raises(UserError, match="norm"):
        GPT(tiny_cfg(norm="batchnorm"))
    with pytest.raises(UserError, match="arch"):
        build_model(tiny_cfg(arch="mamba"))


def test_build_model():
    model = build_model(tiny_cfg())
    assert isinstance(model, GPT)


@pytest.mark.parametrize("norm,pos", [("rmsnorm", "rope"), ("layernorm", "learned")])
def test_bf16_autocast_forward(norm, pos):
    torch.manual_seed(0)
    cfg = tiny_cfg(norm=norm, pos=pos, bias=True)
    model = GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    y = torch.randint(0, cfg.vocab_size, (2, 16))
    _, ref = model(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(x, y)
        out = model.generate(x[:, :4], 6, temperature=0.0)
    assert logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - ref.item()) < 0.05
    assert out.shape == (2, 10)
    loss.backward()  # gradients flow under autocast
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_init_std():
    cfg = ModelConfig.from_flat(vocab_size=512, block_size=64, n_layer=8, n_head=4, n_embd=128)
    torch.manual_seed(0)
    model = GPT(cfg)
    blk = model.transformer["h"][0]
    assert abs(blk.attn.c_attn.weight.std().item() - 0.02) < 0.002
    assert abs(blk.mlp.c_proj.weight.std().item() - 0.02 / 4) < 0.001  # 1/sqrt(2*8)
    assert abs(blk.attn.c_proj.weight.std().item() - 0.02 / 4) < 0.001


# --------------------------------------------------------------------------- fast paths


def _rope_reference(
    x: torch.Tensor, pos: torch.Tensor, pairing: str = "halves", theta: float = 10000.0
) -> torch.Tensor:
    """RoPE through complex numbers in float64: pair (i, i + d/2) (halves) or (2i, 2i+1)
    (interleaved) is z = a + j b, multiplied by exp(j pos theta^(-2i/d))."""
    h = x.shape[-1] // 2
    inv = theta ** (-torch.arange(0, 2 * h, 2, dtype=torch.float64) / (2 * h))
    rot = torch.polar(torch.ones(len(pos), h, dtype=torch.float64), pos.double()[:, None] * inv)
    if pairing == "halves":
        z = torch.complex(x[..., :h].double(), x[..., h:].double()) * rot
        return torch.cat((z.real, z.imag), dim=-1)
    z = torch.complex(x[..., 0::2].double(), x[..., 1::2].double()) * rot
    return torch.stack((z.real, z.imag), dim=-1).flatten(-2)


@pytest.mark.parametrize("pairing", ["interleaved", "halves"])
def test_rope_matches_complex_reference_and_gradcheck(pairing):
    from neuroplastic.models.transformer import _Rope, _rotate_pairs, apply_rope, rope_angles

    torch.manual_seed(0)
    pos = torch.arange(5, 5 + 7)
    cos, sin = rope_angles(pos, 8)
    x = torch.randn(2, 3, 7, 8)
    ref = _rope_reference(x, pos, pairing)
    torch.testing.assert_close(apply_rope(x, cos, sin, pairing).double(), ref, atol=1e-5, rtol=1e-5)
    # a strided input (a transposed view, as the hebbian model passes) and the real form
    # that bfloat16 and torch.compile take
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(apply_rope(xt, cos, sin, pairing).double(), ref, atol=1e-5, rtol=1e-5)
    if pairing == "interleaved":
        torch.testing.assert_close(_rotate_pairs(x, cos, sin).double(), ref, atol=1e-5, rtol=1e-5)
        out_b = apply_rope(x.bfloat16(), cos, sin, pairing)
        assert out_b.dtype == torch.bfloat16
        torch.testing.assert_close(out_b.double(), ref, atol=5e-2, rtol=5e-2)
    xd = torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, cos.double(), sin.double(), pairing), (xd,))
    if pairing == "interleaved":  # the low-precision eager node, checked in float64
        assert torch.autograd.gradcheck(lambda t: _Rope.apply(t, cos.double(), sin.double(), pairing), (xd,))
    # built once per forward in the compute dtype
    cb, sb = rope_angles(pos, 8, dtype=torch.bfloat16)
    assert cb.dtype == sb.dtype == torch.bfloat16
    torch.testing.assert_close(cb, cos.to(torch.bfloat16))
    with pytest.raises(ValueError, match="pairing must be one of interleaved, halves"):
        apply_rope(x, cos, sin, "rotate")


def test_qkv_rope_node_matches_reference():
    """The one-node q/k rotation + layout change equals rotating q and k by the reference
    and transposing, forward and backward (gradcheck in float64)."""
    from neuroplastic.models.transformer import _QKVRope, rope_angles

    torch.manual_seed(1)
    B, T, nh, hd = 2, 6, 3, 8
    pos = torch.arange(T)
    cos, sin = (t.double()[:, None, None] for t in rope_angles(pos, hd))
    qkv = torch.randn(B, T, 3, nh, hd, dtype=torch.float64, requires_grad=True)
    q, k, v = _QKVRope.apply(qkv, cos, sin)
    assert q.shape == (B, nh, T, hd) and q.is_contiguous() and v.is_contiguous()
    ref_q = _rope_reference(qkv[:, :, 0].transpose(1, 2), pos)
    ref_k = _rope_reference(qkv[:, :, 1].transpose(1, 2), pos)
    torch.testing.assert_close(q, ref_q)
    torch.testing.assert_close(k, ref_k)
    torch.testing.assert_close(v, qkv[:, :, 2].transpose(1, 2))
    assert torch.autograd.gradcheck(lambda t: _QKVRope.apply(t, cos, sin), (qkv,))


def test_qkv_rope_node_interleaved_matches_reference():
    """The four-kernel node with interleaved pairs (the bfloat16/float16 eager path)."""
    from neuroplastic.models.transformer import _QKVRope, rope_angles

    torch.manual_seed(1)
    B, T, nh, hd = 2, 6, 3, 8
    pos = torch.arange(T)
    cos, sin = (t.double()[:, None, None] for t in rope_angles(pos, hd))
    qkv = torch.randn(B, T, 3, nh, hd, dtype=torch.float64, requires_grad=True)
    q, k, v = _QKVRope.apply(qkv, cos, sin, "interleaved")
    torch.testing.assert_close(q, _rope_reference(qkv[:, :, 0].transpose(1, 2), pos, "interleaved"))
    torch.testing.assert_close(k, _rope_reference(qkv[:, :, 1].transpose(1, 2), pos, "interleaved"))
    assert torch.autograd.gradcheck(lambda t: _QKVRope.apply(t, cos, sin, "interleaved"), (qkv,))
    # bfloat16 model forward takes it, and agrees with float32
    model = GPT(tiny_cfg())
    x = torch.randint(0, 48, (2, 8))
    ref, _ = model(x)
    low, _ = model.to(torch.bfloat16)(x)
    torch.testing.assert_close(low.float(), ref, atol=0.1, rtol=0.1)


def test_qkv_rope_pairs_node_matches_reference():
    """The interleaved node (one complex multiply in place, q/k/v returned as views of its
    input) equals the reference forward, and its hand-written backward passes gradcheck,
    also when only some of q, k, v reach the loss."""
    from neuroplastic.models.transformer import _QKVRopePairs, rope_angles, rope_cis

    torch.manual_seed(1)
    B, T, nh, hd = 2, 6, 3, 8
    pos = torch.arange(T)
    cis, conj = rope_cis(*(t.double() for t in rope_angles(pos, hd)), nh)
    assert cis.shape == (T, 2, nh, hd // 2) and cis.is_contiguous()
    torch.testing.assert_close(conj, cis[:, 0].conj())
    qkv = torch.randn(B, T, 3, nh, hd, dtype=torch.float64, requires_grad=True)
    out = qkv * 1  # rotated in place: a non-leaf, as c_attn's output is
    q, k, v = _QKVRopePairs.apply(out, cis, conj)
    assert q.shape == k.shape == v.shape == (B, nh, T, hd)
    assert q.data_ptr() == out.data_ptr()  # views, no new buffer
    torch.testing.assert_close(q, _rope_reference(qkv[:, :, 0].transpose(1, 2), pos, "interleaved"))
    torch.testing.assert_close(k, _rope_reference(qkv[:, :, 1].transpose(1, 2), pos, "interleaved"))
    torch.testing.assert_close(v, qkv[:, :, 2].transpose(1, 2))
    assert torch.autograd.gradcheck(lambda t: _QKVRopePairs.apply(t * 1, cis, conj), (qkv,))
    assert torch.autograd.gradcheck(lambda t: _QKVRopePairs.apply(t * 1, cis, conj)[1], (qkv,))
    assert torch.autograd.gradcheck(lambda t: _QKVRopePairs.apply(t * 1, cis, conj)[2], (qkv,))


def test_in_place_rotation_fails_loudly_for_a_saved_c_attn_output():
    """c_attn's output is rotated in place after its forward hooks ran: a hook that used the
    output in a differentiable computation gets autograd's in-place error at backward,
    never gradients of the wrong values; a hook that reads it at once sees the unrotated
    projection."""
    model = GPT(tiny_cfg())
    attn = model.transformer["h"][0].attn
    seen, reg = [], []
    attn.c_attn.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    attn.c_attn.register_forward_hook(lambda m, a, out: reg.append(out.pow(2).sum()))
    x = torch.randint(0, 48, (2, 8))
    _, loss = model(x, x)
    with torch.no_grad():
        projection = attn.c_attn(model.transformer["h"][0].ln_1(model.transformer["wte"](x)))
    torch.testing.assert_close(seen[0], projection)
    loss.backward(retain_graph=True)  # the model's own gradients are fine
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        reg[0].backward()


def test_rope_pairings_are_one_model_family():
    """A halves model equals an interleaved model whose query/key features are permuted
    within each head (i, i + d/2) -> (2i, 2i+1): same logits, forward and with a KV cache."""
    halves = sharp_model(tiny_cfg(rope_pairing="halves"), seed=4)
    inter = GPT(tiny_cfg(rope_pairing="interleaved"))
    inter.load_state_dict(halves.state_dict())
    nh, hd, C = halves.config.gpt.n_head, halves.head_dim, halves.config.gpt.n_embd
    h = hd // 2
    perm_head = torch.stack((torch.arange(h), torch.arange(h) + h), dim=-1).flatten()  # new -> old
    perm = torch.cat([torch.arange(C)[n * hd:(n + 1) * hd][perm_head] for n in range(nh)])
    with torch.no_grad():
        for block in inter.transformer["h"]:
            w = block.attn.c_attn.weight
            w[:C] = w[:C][perm]
            w[C:2 * C] = w[C:2 * C][perm]
    x = torch.randint(0, halves.config.vocab_size, (2, 10))
    halves.eval(), inter.eval()
    with torch.no_grad():
        ref, _ = halves(x)
        torch.testing.assert_close(inter(x)[0], ref, atol=1e-4, rtol=1e-4)
        cache = inter.new_kv_cache()
        first, _ = inter(x[:, :6], kv_cache=cache)
        rest, _ = inter(x[:, 6:], kv_cache=cache)
        torch.testing.assert_close(torch.cat((first, rest), 1), ref, atol=1e-4, rtol=1e-4)
    # without the permutation the two pairings are different functions
    other = GPT(tiny_cfg(rope_pairing="interleaved"))
    other.load_state_dict(halves.state_dict())
    other.eval()
    with torch.no_grad():
        assert not torch.allclose(other(x)[0], ref, atol=1e-2)


def test_saved_config_without_rope_pairing_means_halves(tmp_path):
    """A config.yaml written before model.rope_pairing existed was trained with halves;
    recipes and overrides get today's default (interleaved); a bad value is one sentence."""
    from neuroplastic.config import RunConfig, config_from_dict, config_from_saved
    from neuroplastic.errors import UserError

    saved = RunConfig().to_dict()
    del saved["model"]["gpt"]["rope_pairing"]
    assert config_from_saved(saved).model.gpt.rope_pairing == "halves"
    assert config_from_dict(saved).model.gpt.rope_pairing == "interleaved"
    flat = {"model": {"n_layer": 2, "pos": "rope"}}  # a saved config from before the sections
    assert config_from_saved(flat).model.gpt.rope_pairing == "halves"
    saved["model"]["gpt"]["rope_pairing"] = "interleaved"
    assert config_from_saved(saved).model.gpt.rope_pairing == "interleaved"
    with pytest.raises(UserError, match="model.rope_pairing must be one of interleaved, halves"):
        GPT(tiny_cfg(rope_pairing="rotate"))


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_rmsnorm_matches_formula(native):
    """The eager CPU RMSNorm (the fused C++ kernel, or without it the hand-written
    backward) = x * rsqrt(mean(x^2) + eps) * w, with the same gradients; other dtypes take
    F.rms_norm; parameters are nn.RMSNorm's."""
    import contextlib

    from neuroplastic.models.transformer import _RMSNormFn
    from neuroplastic.ops.native import native_disabled, native_ops

    if native and native_ops() is None:
        pytest.skip("the native CPU kernels could not be built here")
    with contextlib.nullcontext() if native else native_disabled():
        _rmsnorm_matches_formula("RMSNormFunction" if native else "RMSNormFnBackward", _RMSNormFn)


def _rmsnorm_matches_formula(node, _RMSNormFn):
    from neuroplastic.models.transformer import RMSNorm

    torch.manual_seed(2)
    norm = RMSNorm(16, eps=1e-5)
    assert isinstance(norm, torch.nn.RMSNorm) and list(norm.state_dict()) == ["weight"]
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16, requires_grad=True)
    g = torch.randn(3, 5, 16)
    y = norm(x)
    assert y.grad_fn is not None and node in y.grad_fn.name()
    y.backward(g)
    x2 = x.detach().clone().requires_grad_()
    w2 = norm.weight.detach().clone().requires_grad_()
    ref = x2 * torch.rsqrt(x2.pow(2).mean(-1, keepdim=True) + 1e-5) * w2
    ref.backward(g)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(norm.weight.grad, w2.grad)
    xd = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    wd = torch.rand(16, dtype=torch.float64).add(0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFn.apply(a, b, 1e-5), (xd, wd))
    xb = x.detach().to(torch.bfloat16)
    torch.testing.assert_close(norm.to(torch.bfloat16)(xb).float(),
                               torch.nn.functional.rms_norm(xb, (16,), norm.weight, 1e-5).float())


def test_state_dict_names_unchanged():
    """Checkpoints of earlier models load: the parameter names are nn.RMSNorm's / GPT's."""
    model = GPT(tiny_cfg(n_layer=1))
    assert list(model.state_dict()) == [
        "transformer.wte.weight", "transformer.h.0.ln_1.weight",
        "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.ln_2.weight", "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.0.mlp.c_proj.weight", "transformer.ln_f.weight",
    ]


@pytest.mark.parametrize(
    "norm,pos,pairing",
    [("rmsnorm", "rope", "interleaved"), ("rmsnorm", "rope", "halves"), ("layernorm", "learned", "interleaved")],
)
def test_compiled_path_equals_eager(norm, pos, pairing):
    """Under torch.compile the plain formulas are traced instead of the eager autograd
    nodes: same loss and gradients."""
    torch.manual_seed(3)
    cfg = tiny_cfg(norm=norm, pos=pos, rope_pairing=pairing)
    model = GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    y = torch.randint(0, cfg.vocab_size, (2, 12))
    _, loss = model(x, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    _, loss_c = torch.compile(model, backend="eager")(x, y)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)
