"""ops/fast_weight.py: every fast form against the step-by-step reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuroplastic.errors import UserError
from neuroplastic.ops.fast_weight import (
    delta_rule_chunked,
    delta_rule_recurrent,
    fast_weight,
    fast_weight_chunked,
    fast_weight_recurrent,
    feature_map,
    materialized_fast_weight,
)

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
DECAYS = ("mixed", "near0", "near1", "uniform")


def make_inputs(B, H, T, dk, dv, *, dtype=torch.float64, decay="mixed", seed=0, state=True):
    """Random inputs; keys are unit-norm (what the delta rule needs to stay a contraction)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = randn(B, H, T, dk)
    k = feature_map(randn(B, H, T, dk), "identity_l2")
    v = randn(B, H, T, dv)
    u = torch.rand(B, H, T, generator=gen, dtype=torch.float64)
    if decay == "near0":  # lambda = exp(-20) ~ 2e-9
        g = torch.full((B, H, T), -20.0, dtype=torch.float64)
    elif decay == "near1":  # lambda = 1 - 1e-6
        g = torch.full((B, H, T), -1e-6, dtype=torch.float64)
    elif decay == "uniform":  # lambda uniform in (0.05, 1)
        g = torch.log(0.05 + 0.95 * u)
    else:  # per step one of: near 0, near 1, anything in between
        pick = torch.randint(0, 3, (B, H, T), generator=gen)
        g = torch.where(
            pick == 0, -20.0, torch.where(pick == 1, -1e-6, torch.log(u.clamp_min(1e-3)))
        )
    beta = torch.rand(B, H, T, generator=gen, dtype=torch.float64).clamp(0.01, 0.99)
    s0 = randn(B, H, dk, dv) if state else None
    out = dict(q=q, k=k, v=v, log_decay=g, beta=beta, initial_state=s0)
    return {n: (None if t is None else t.to(dtype)) for n, t in out.items()}


def run(rule, mode, inp, chunk_size=64):
    kw = dict(chunk_size=chunk_size) if mode == "chunked" else {}
    if rule == "hebbian":
        fn = fast_weight_chunked if mode == "chunked" else fast_weight_recurrent
        return fn(
            inp["q"], inp["k"], inp["v"], inp["log_decay"], initial_state=inp["initial_state"], **kw
        )
    fn = delta_rule_chunked if mode == "chunked" else delta_rule_recurrent
    return fn(
        inp["q"],
        inp["k"],
        inp["v"],
        inp["beta"],
        inp["log_decay"],
        initial_state=inp["initial_state"],
        **kw,
    )


def close(a, b, tol, what=""):
    """|a - b| <= tol * max(1, max|b|): relative to the largest entry of the reference."""
    assert a.shape == b.shape, what
    assert torch.isfinite(a).all(), what
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    assert err <= tol * scale, f"{what}: max err {err:.3g} > {tol:.0e} x {scale:.3g}"


def check_forms_agree(rule, inp, chunk_size, tol, grads=True):
    names = ["q", "k", "v", "log_decay"] + (["beta"] if rule == "delta" else [])
    if inp["initial_state"] is not None:
        names.append("initial_state")
    results = {}
    for mode in ("recurrent", "chunked"):
        leaves = {
            n: t.detach().clone().requires_grad_(grads) for n, t in inp.items() if t is not None
        }
        leaves.setdefault("initial_state", None)
        o, s = run(rule, mode, leaves, chunk_size)
        gen = torch.Generator().manual_seed(1)
        wo = torch.randn(o.shape, generator=gen, dtype=o.dtype)
        ws = torch.randn(s.shape, generator=gen, dtype=s.dtype)
        gs = ()
        if grads:
            loss = (o * wo).sum() + (s * ws).sum()
            gs = torch.autograd.grad(loss, [leaves[n] for n in names])
        results[mode] = (o.detach(), s.detach(), gs)
    (o1, s1, g1), (o2, s2, g2) = results["recurrent"], results["chunked"]
    close(o2, o1, tol, f"{rule} output")
    close(s2, s1, tol, f"{rule} final state")
    for n, a, b in zip(names, g2, g1):
        close(a, b, tol, f"{rule} grad of {n}")


# --------------------------------------------------------------------------- chunked == recurrent


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rule=st.sampled_from(["hebbian", "delta"]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    B=st.integers(1, 2),
    H=st.integers(1, 2),
    T=st.integers(1, 40),
    dk=st.integers(1, 6),
    dv=st.integers(1, 6),
    chunk=st.sampled_from([1, 3, 4, 8, 16, 64]),
    decay=st.sampled_from(DECAYS),
    state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunked_matches_recurrent_random(rule, dtype, B, H, T, dk, dv, chunk, decay, state, seed):
    inp = make_inputs(B, H, T, dk, dv, dtype=dtype, decay=decay, seed=seed, state=state)
    check_forms_agree(rule, inp, chunk, TOL[dtype])


@pytest.mark.parametrize("rule", ["hebbian", "delta"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "T, chunk",
    [(1, 16), (5, 16), (16, 16), (23, 8), (50, 16)],
    ids=["T=1", "T<chunk", "T=chunk", "T%chunk!=0", "several-chunks"],
)
def test_chunked_matches_recurrent_edge_lengths(rule, dtype, T, chunk):
    inp = make_inputs(2, 2, T, 4, 3, dtype=dtype, decay="mixed", seed=T)
    check_forms_agree(rule, inp, chunk, TOL[dtype])


@pytest.mark.parametrize("rule", ["hebbian", "delta"])
@pytest.mark.parametrize("decay", ["near0", "near1"])
def test_extreme_decays_default_chunk(rule, decay):
    inp = make_inputs(1, 2, 150, 8, 8, dtype=torch.float32, decay=decay, seed=3)
    check_forms_agree(rule, inp, 64, TOL[torch.float32])


def test_hebbian_chunked_blockwise_backward(monkeypatch):
    """The hand-written backward processes the (C, C) work in blocks of chunks."""
    import neuroplastic.ops.fast_weight as fw

    monkeypatch.setattr(fw, "_BLOCK_ELEMENTS", 1)  # one chunk per block
    inp = make_inputs(2, 2, 29, 4, 3, decay="mixed", seed=21)
    check_forms_agree("hebbian", inp, 4, TOL[torch.float64])


@pytest.mark.parametrize("limit", [0, 1000], ids=["loop-over-chunks", "one-matmul"])
@pytest.mark.parametrize("decay", ["mixed", "near0", "near1"])
def test_hebbian_state_passing_both_ways(monkeypatch, limit, decay):
    """Chunk states are passed on by an (N, N) matmul up to _PASS_MATMUL_CHUNKS chunks and
    by a loop beyond: both agree with the recurrence (outputs, state, all gradients)."""
    import neuroplastic.ops.fast_weight as fw

    monkeypatch.setattr(fw, "_PASS_MATMUL_CHUNKS", limit)
    inp = make_inputs(2, 2, 37, 4, 3, decay=decay, seed=5, state=True)
    check_forms_agree("hebbian", inp, 3, TOL[torch.float64])


def test_hebbian_chunked_gradcheck():
    inp = make_inputs(1, 2, 11, 3, 2, decay="uniform", seed=22)
    args = [inp[n].requires_grad_() for n in ("q", "k", "v", "log_decay", "initial_state")]

    def fn(q, k, v, g, s0):
        return fast_weight_chunked(q, k, v, g, chunk_size=4, initial_state=s0)

    assert torch.autograd.gradcheck(fn, args)


def test_delta_rule_without_decay_is_deltanet():
    """log_decay=None: plain DeltaNet, M_t = M + beta k (v - M^T k)^T."""
    inp = make_inputs(1, 1, 9, 3, 2, seed=5)
    q, k, v, beta, s = inp["q"], inp["k"], inp["v"], inp["beta"], inp["initial_state"]
    M = s.clone()
    outs = []
    for t in range(9):
        kt, vt = k[0, 0, t], v[0, 0, t]
        M[0, 0] += beta[0, 0, t] * torch.outer(kt, vt - M[0, 0].T @ kt)
        outs.append(q[0, 0, t] @ M[0, 0])
    ref = torch.stack(outs)
    for fn in (delta_rule_recurrent, delta_rule_chunked):
        o, st_ = fn(q, k, v, beta, None, initial_state=s)
        close(o[0, 0], ref, 1e-12)
        close(st_, M, 1e-12)


def test_hebbian_recurrent_matches_definition():
    inp = make_inputs(1, 1, 7, 3, 2, decay="uniform", seed=6)
    q, k, v, g, s = (inp[n] for n in ("q", "k", "v", "log_decay", "initial_state"))
    M = s[0, 0].clone()
    outs = []
    for t in range(7):
        M = math.exp(g[0, 0, t]) * M + torch.outer(k[0, 0, t], v[0, 0, t])
        outs.append(q[0, 0, t] @ M)
    o, st_ = fast_weight_recurrent(q, k, v, g, initial_state=s)
    close(o[0, 0], torch.stack(outs), 1e-12)
    close(st_[0, 0], M, 1e-12)


# --------------------------------------------------------------------------- materialised (seed style)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_materialized_matches_recurrent(dtype):
    # seed-range decays (lambda in [0.9, 1]): the exp(-cumsum) trick stays in range
    inp = make_inputs(2, 3, 37, 5, 4, dtype=dtype, decay="uniform", seed=8, state=False)
    g = torch.log(0.9 + 0.1 * torch.rand(2, 3, 37, generator=torch.Generator().manual_seed(0))).to(
        dtype
    )
    o1, s1 = fast_weight_recurrent(inp["q"], inp["k"], inp["v"], g)
    o2, s2 = materialized_fast_weight(inp["q"], inp["k"], inp["v"], g)
    close(o2, o1, TOL[dtype])
    close(s2, s1, TOL[dtype])


# --------------------------------------------------------------------------- carried state


@pytest.mark.parametrize("rule", ["hebbian", "delta"])
@pytest.mark.parametrize("mode", ["chunked", "recurrent"])
def test_two_halves_with_carried_state_equal_one_run(rule, mode):
    inp = make_inputs(2, 2, 45, 4, 5, decay="mixed", seed=11)
    o_full, s_full = run(rule, mode, inp, chunk_size=8)
    first = {
        n: (t[:, :, :20] if n not in ("initial_state",) and t is not None else t)
        for n, t in inp.items()
    }
    second = {
        n: (t[:, :, 20:] if n not in ("initial_state",) and t is not None else t)
        for n, t in inp.items()
    }
    o1, s1 = run(rule, mode, first, chunk_size=8)
    second["initial_state"] = s1
    o2, s2 = run(rule, mode, second, chunk_size=8)
    close(torch.cat([o1, o2], dim=2), o_full, 1e-10)
    close(s2, s_full, 1e-10)


@pytest.mark.parametrize("rule", ["hebbian", "delta"])
def test_generation_one_step_at_a_time_equals_chunked_prefix(rule):
    """Generation: chunked prompt, then recurrent single steps with the carried state."""
    inp = make_inputs(1, 2, 30, 4, 4, decay="uniform", seed=12, state=False)
    o_full, s_full = run(rule, "chunked", inp, chunk_size=16)
    prompt = {n: (None if t is None else t[:, :, :21]) for n, t in inp.items()}
    prompt["initial_state"] = None
    o, s = run(rule, "chunked", prompt, chunk_size=16)
    outs = [o]
    for t in range(21, 30):
        step = {n: (None if x is None else x[:, :, t : t + 1]) for n, x in inp.items()}
        step["initial_state"] = s
        o_t, s = run(rule, "recurrent", step)
        outs.append(o_t)
    close(torch.cat(outs, dim=2), o_full, 1e-10)
    close(s, s_full, 1e-10)


# --------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("rule", ["hebbian", "delta"])
@pytest.mark.parametrize("lam", ["alpha0.1", "near1"])
def test_bf16_autocast_long_sequence_is_finite(rule, lam):
    B, H, T, d = 1, 2, 4096, 16
    inp = make_inputs(B, H, T, d, d, dtype=torch.float32, decay="near1", seed=13, state=False)
    if lam == "alpha0.1":  # the seed's first stage: lambda = 0.1 * (0.99 + 0.01 sigmoid(p))
        inp["log_decay"] = torch.full((B, H, T), math.log(0.1 * 0.995))
    q, k, v = (inp[n].to(torch.bfloat16).requires_grad_() for n in ("q", "k", "v"))
    g = inp["log_decay"].requires_grad_()
    beta = inp["beta"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, s = fast_weight(q, k, v, g, rule=rule, beta=beta, mode="chunked")
        o_rec, s_rec = fast_weight(q, k, v, g, rule=rule, beta=beta, mode="recurrent")
    assert o.dtype == torch.bfloat16 and o_rec.dtype == torch.bfloat16
    assert s.dtype == torch.float32 and s_rec.dtype == torch.float32
    for t in (o, s, o_rec, s_rec):
        assert torch.isfinite(t.float()).all()
    close(s, s_rec, 1e-4)
    o.float().square().mean().backward()
    for t in (q, k, v, g):
        assert torch.isfinite(t.grad.float()).all()


def test_autocast_output_dtype_and_fp32_inputs():
    inp = make_inputs(1, 1, 10, 4, 4, dtype=torch.float32, seed=14)
    q, k, v, g = inp["q"], inp["k"], inp["v"], inp["log_decay"]
    o, s = fast_weight_chunked(q, k, v, g)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o_bf, s_bf = fast_weight_chunked(q, k, v, g)
    assert o_bf.dtype == torch.bfloat16 and s_bf.dtype == torch.float32
    # inside the op nothing ran in bf16: the state is bit-for-bit the fp32 one
    assert torch.equal(s_bf, s)
    o16, s16 = fast_weight_recurrent(q.half(), k.half(), v.half(), g)
    assert o16.dtype == torch.float16 and s16.dtype == torch.float32


# --------------------------------------------------------------------------- feature maps, API


def test_feature_maps():
    x = torch.randn(3, 2, 50, 8) * 5
    x[0, 0, 0] = -30.0  # where ELU(x) + 1 rounds to 0 in float32
    n = feature_map(x, "identity_l2").norm(dim=-1)
    torch.testing.assert_close(n, torch.ones_like(n))
    e = feature_map(x, "elu1")
    assert (e > 0).all()
    torch.testing.assert_close(e[1:], torch.nn.functional.elu(x[1:]) + 1)
    s = feature_map(x, "seed")
    assert (s > 0).all()
    torch.testing.assert_close(s, e / math.sqrt(8))
    with pytest.raises(UserError):
        feature_map(x, "relu")


def test_dispatcher_and_errors():
    inp = make_inputs(1, 2, 12, 4, 3, seed=15)
    q, k, v, g, b = inp["q"], inp["k"], inp["v"], inp["log_decay"], inp["beta"]
    o, _ = fast_weight(q, k, v, g, mode="recurrent")
    close(fast_weight(q, k, v, g, chunk_size=5)[0], o, 1e-10)
    o_d, _ = fast_weight(q, k, v, g, rule="delta", beta=b, mode="recurrent")
    close(fast_weight(q, k, v, g, rule="delta", beta=b)[0], o_d, 1e-10)
    with pytest.raises(UserError):
        fast_weight(q, k, v, g, rule="oja")
    with pytest.raises(UserError):
        fast_weight(q, k, v, g, mode="parallel")
    with pytest.raises(UserError, match="beta"):
        fast_weight(q, k, v, g, rule="delta")
    with pytest.raises(UserError, match="log_decay"):
        fast_weight(q, k, v, g[:, :, :5])
    with pytest.raises(UserError, match="initial_state"):
        fast_weight(q, k, v, g, initial_state=torch.zeros(1, 2, 3, 3))
    with pytest.raises(UserError, match="chunk_size"):
        fast_weight(q, k, v, g, chunk_size=0)
    with pytest.raises(UserError):
        fast_weight(q[0], k[0], v[0], g[0])


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["hebbian", "delta"])
def test_chunked_matches_recurrent_long_fp32(rule):
    inp = make_inputs(2, 4, 1000, 32, 32, dtype=torch.float32, decay="mixed", seed=16)
    check_forms_agree(rule, inp, 64, TOL[torch.float32])


# --------------------------------------------------------------------------- fla backend


def test_backend_choice_on_cpu():
    """On CPU ``auto`` is the torch forms, bit for bit; ``fla`` is refused with a fix."""
    inp = make_inputs(1, 2, 12, 4, 3, dtype=torch.float32, seed=17)
    q, k, v, g, b = inp["q"], inp["k"], inp["v"], inp["log_decay"], inp["beta"]
    for rule in ("hebbian", "delta"):
        o_a, s_a = fast_weight(q, k, v, g, rule=rule, beta=b, backend="auto")
        o_t, s_t = fast_weight(q, k, v, g, rule=rule, beta=b, backend="torch")
        assert torch.equal(o_a, o_t) and torch.equal(s_a, s_t)
        with pytest.raises(UserError, match="flash-linear-attention"):
            fast_weight(q, k, v, g, rule=rule, beta=b, backend="fla")
    with pytest.raises(UserError, match="backend"):
        fast_weight(q, k, v, g, backend="triton")


def _fla_ready() -> bool:
    from neuroplastic.ops.fla_backend import fla_available

    return torch.cuda.is_available() and fla_available()


needs_fla = pytest.mark.skipif(
    not _fla_ready(), reason="needs CUDA and flash-linear-attention (pip install 'neuroplastic[cuda]')"
)


@needs_fla
@pytest.mark.parametrize("rule", ["hebbian", "delta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decay", ["uniform", "none"])
def test_fla_matches_recurrent_reference(rule, dtype, decay):
    """fla's kernels (through ``fast_weight``) = the float64 recurrent reference: outputs,
    final state and every gradient (q, k, v, log-decay, beta, initial state)."""
    T = 150  # not a multiple of fla's chunk (64)
    inp = make_inputs(2, 3, T, 32, 16, decay="uniform", seed=18)
    if decay == "none":
        inp["log_decay"] = None
    names = ["q", "k", "v", "log_decay", "beta", "initial_state"]
    ref = {n: (None if inp[n] is None else inp[n].cuda().requires_grad_()) for n in names}
    dev = {n: (None if t is None else t.detach().to(dtype if n in "qkv" else torch.float32)
               .requires_grad_()) for n, t in ref.items()}
    gen = torch.Generator().manual_seed(19)
    wo = torch.randn(2, 3, T, 16, generator=gen, dtype=torch.float64).cuda()
    ws = torch.randn(2, 3, 32, 16, generator=gen, dtype=torch.float64).cuda()

    def loss(inputs, mode, backend):
        o, s = fast_weight(inputs["q"], inputs["k"], inputs["v"], inputs["log_decay"], rule=rule,
                           beta=inputs["beta"], mode=mode, initial_state=inputs["initial_state"],
                           backend=backend)
        return o, s, (o.double() * wo).sum() + (s.double() * ws).sum()

    o_r, s_r, l_r = loss(ref, "recurrent", "torch")
    o_f, s_f, l_f = loss(dev, "chunked", "fla")
    assert o_f.dtype == dtype and s_f.dtype == torch.float32
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3  # fla's dots run in TF32 / bf16
    close(o_f.double(), o_r, tol, "o")
    close(s_f.double(), s_r, tol, "state")
    l_r.backward()
    l_f.backward()
    for n in names:
        if ref[n] is not None and (rule == "delta" or n != "beta"):
            close(dev[n].grad.double(), ref[n].grad, 5 * tol, f"d{n}")


@needs_fla
def test_fla_used_by_default_on_cuda(monkeypatch):
    """``backend="auto"`` on CUDA goes to fla; ``NEUROPLASTIC_NO_FLA`` turns it off."""
    import neuroplastic.ops.fla_backend as fb

    calls = []
    real = fb.fla_hebbian
    monkeypatch.setattr(fb, "fla_hebbian", lambda *a, **k: calls.append(1) or real(*a, **k))
    inp = make_inputs(1, 2, 64, 16, 16, dtype=torch.float32, seed=20)
    q, k, v, g = (inp[n].cuda() for n in ("q", "k", "v", "log_decay"))
    fast_weight(q, k, v, g)
    assert calls == [1]
    monkeypatch.setenv("NEUROPLASTIC_NO_FLA", "1")
    fast_weight(q, k, v, g)
    assert calls == [1]
