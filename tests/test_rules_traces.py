"""Traces, EligibilityTrace and AdaptiveLR: reference formulas, directions, state round trip."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from neuroplastic.errors import UserError
from neuroplastic.models.checkpoint_io import flatten_state, unflatten_state
from neuroplastic.plasticity import PlasticityEngine, RewardBaseline
from neuroplastic.plasticity.adaptive_lr import AdaptiveLR
from neuroplastic.plasticity.eligibility import EligibilityTrace
from neuroplastic.plasticity.traces import Traces

REWARDS = [None, 1.0, -0.5, None, 2.0, 0.3, -1.5, 0.0, 0.7]


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)


def backward(model: nn.Module, step: int) -> float:
    x, y = batch(step)
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    return float(loss.detach())


def train(model, opt, engine, steps, rewards=REWARDS, start=0, sched=None, observe=False):
    for t in range(start, start + steps):
        loss = backward(model, t)
        if engine is not None:
            if observe:
                engine.rule("adaptive_lr").observe(loss)
            engine.after_backward()
        opt.step()
        if sched is not None:
            sched.step()
        if engine is not None:
            engine.after_step(reward=rewards[t % len(rewards)])
        opt.zero_grad(set_to_none=True)


def best_rank_k(M: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


# ------------------------------------------------------------------ Traces


@pytest.mark.parametrize("direction", ["descent", "seed"])
@pytest.mark.parametrize("low_rank", [False, True])
def test_traces_matches_reference(direction, low_rank):
    kw = dict(
        trace_decay=0.8, momentum=0.7, scale=1.3, plasticity_lr=0.05, rank=2, low_rank_coef=0.1
    )
    model, ref = make_model(), make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    rule = Traces(direction=direction, low_rank=low_rank, low_rank_method="svd", **kw)
    engine = PlasticityEngine(model, [rule], optimizer=opt)
    baseline = RewardBaseline()
    params = list(ref.parameters())
    tr = [torch.zeros_like(p) for p in params]
    mo = [torch.zeros_like(p) for p in params]
    sign = -1.0 if direction == "descent" else 1.0
    for t in range(len(REWARDS)):
        backward(model, t)
        engine.after_backward()
        opt.step()
        engine.after_step(reward=REWARDS[t])
        opt.zero_grad(set_to_none=True)

        backward(ref, t)
        for i, p in enumerate(params):
            tr[i] = kw["trace_decay"] * tr[i] + (1 - kw["trace_decay"]) * p.grad
            mo[i] = kw["momentum"] * mo[i] + (1 - kw["momentum"]) * tr[i]
        ref_opt.step()
        if REWARDS[t] is not None:
            r = baseline(REWARDS[t])
            with torch.no_grad():
                for i, p in enumerate(params):
                    mod = r * kw["scale"] * mo[i]
                    if low_rank and p.dim() == 2:
                        mod = mod + r * kw["low_rank_coef"] * best_rank_k(mo[i], 2).float()
                    p += sign * kw["plasticity_lr"] * mod
        ref_opt.zero_grad(set_to_none=True)
        for a, b in zip(model.parameters(), params):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for m_rule, m_ref in zip(rule.momentum, mo):
        torch.testing.assert_close(m_rule, m_ref)
    s = engine.stats()
    assert s["traces/momentum_norm"] > 0 and s["traces/trace_norm"] > 0
    assert (s["traces/low_rank_norm"] > 0) == low_rank


@pytest.mark.parametrize("direction", ["descent", "seed"])
@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.AdamW])
def test_traces_one_step_difference(direction, opt_cls):
    eta, s, r = 0.3, 2.0, 1.7
    with_rule, without = make_model(), make_model()
    opt_a = opt_cls(with_rule.parameters(), lr=0.01)
    opt_b = opt_cls(without.parameters(), lr=0.01)
    rule = Traces(trace_decay=0.5, momentum=0.25, scale=s, plasticity_lr=eta, direction=direction)
    engine = PlasticityEngine(with_rule, [rule], optimizer=opt_a)
    for model, opt, eng in ((with_rule, opt_a, engine), (without, opt_b, None)):
        backward(model, 0)
        if eng is not None:
            eng.after_backward()
        opt.step()
        if eng is not None:
            assert eng.after_step(reward=r) == pytest.approx(r)  # baseline 0 -> advantage r
    sign = -1.0 if direction == "descent" else 1.0
    for a, b, p in zip(with_rule.parameters(), without.parameters(), without.parameters()):
        momentum = 0.75 * 0.5 * p.grad  # (1-m)(1-gamma) g after one step
        torch.testing.assert_close(a - b, sign * eta * r * s * momentum, rtol=1e-4, atol=1e-7)
        assert not torch.equal(a, b)
    assert engine.stats()["traces/update_norm"] == pytest.approx(
        eta
        * r
        * s
        * math.sqrt(sum(float((0.375 * p.grad).square().sum()) for p in without.parameters())),
        rel=1e-4,
    )


@pytest.mark.parametrize("low_rank", [False, True])
def test_traces_zero_advantage_is_identity(low_rank):
    with_rule, without = make_model(), make_model()
    opt_a = torch.optim.AdamW(with_rule.parameters(), lr=0.01)
    opt_b = torch.optim.AdamW(without.parameters(), lr=0.01)
    engine = PlasticityEngine(
        with_rule, [Traces(plasticity_lr=0.5, low_rank=low_rank)], optimizer=opt_a
    )
    backward(with_rule, 0)
    engine.after_backward()
    opt_a.step()
    assert engine.after_step(reward=0.0) == 0.0
    backward(without, 0)
    opt_b.step()
    for a, b in zip(with_rule.parameters(), without.parameters()):
        assert torch.equal(a, b)


def test_traces_one_step_low_rank_difference():
    eta, s, r, coef = 0.3, 1.0, 1.5, 0.1
    with_rule, without = make_model(), make_model()
    opt_a = torch.optim.SGD(with_rule.parameters(), lr=0.01)
    opt_b = torch.optim.SGD(without.parameters(), lr=0.01)
    rule = Traces(trace_decay=0.5, momentum=0.5, plasticity_lr=eta, low_rank=True, rank=2)
    engine = PlasticityEngine(with_rule, [rule], optimizer=opt_a)
    for model, opt, eng in ((with_rule, opt_a, engine), (without, opt_b, None)):
        backward(model, 0)
        if eng is not None:
            eng.after_backward()
        opt.step()
        if eng is not None:
            eng.after_step(reward=r)
    for a, b, p in zip(with_rule.parameters(), without.parameters(), without.parameters()):
        momentum = 0.25 * p.grad
        expected = s * momentum
        if p.dim() == 2:
            expected = expected + coef * best_rank_k(momentum, 2).float()
        torch.testing.assert_close(a - b, -eta * r * expected, rtol=1e-4, atol=1e-7)


def _matrix_with_spectrum(m, n, spectrum, seed):
    g = torch.Generator().manual_seed(seed)
    Q1 = torch.linalg.qr(torch.randn(m, m, generator=g)).Q
    Q2 = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    S = torch.zeros(m, n)
    for i, v in enumerate(spectrum):
        S[i, i] = v
    return Q1 @ S @ Q2.T


def test_low_rank_power_iteration_converges_to_best_rank_k():
    model = nn.Sequential(nn.Linear(9, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    rule = Traces(params="*.weight", low_rank=True, rank=3, plasticity_lr=0.0, power_iters=1)
    rule.bind(model)
    spec1 = [10, 8, 6, 4, 1, 0.5, 0.2, 0.1]
    spec2 = [9, 7, 5, 3, 1.5, 0.4, 0.3, 0.1]
    rule.momentum = [
        _matrix_with_spectrum(8, p.shape[1], spec1, i) for i, p in enumerate(rule.params)
    ]
    rule.after_step(0.0)  # first time: exact truncated SVD
    for uv, m in zip(rule.low_rank_approx(), rule.momentum):
        torch.testing.assert_close(uv.double(), best_rank_k(m, 3), rtol=1e-4, atol=1e-5)
    # momentum moves: the warm-started iteration tracks the new dominant subspace
    rule.momentum = [
        _matrix_with_spectrum(8, p.shape[1], spec2, 10 + i) for i, p in enumerate(rule.params)
    ]
    for _ in range(40):
        rule.after_step(0.0)
    for uv, u, m in zip(rule.low_rank_approx(), rule.U, rule.momentum):
        torch.testing.assert_close(uv.double(), best_rank_k(m, 3), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(u.T @ u, torch.eye(3), atol=1e-5, rtol=0)
    assert rule.stats()["low_rank_norm"] > 0


def test_low_rank_is_not_random():
    out = []
    for seed in (1, 2):
        model = make_model(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(seed)
        rule = Traces(low_rank=True, rank=2, plasticity_lr=0.01)
        train(model, opt, PlasticityEngine(model, [rule], optimizer=opt), 6)
        out.append([uv for uv in rule.low_rank_approx() if uv is not None])
    assert len(out[0]) == 2
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_traces_keep_fp32_buffers_for_bf16_params():
    model = make_model().to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rule = Traces(plasticity_lr=0.1, low_rank=True, rank=2)
    engine = PlasticityEngine(model, [rule], optimizer=opt)
    for t in range(3):
        x, y = batch(t)
        ((model(x.bfloat16()) - y.bfloat16()) ** 2).mean().backward()
        engine.after_backward()
        opt.step()
        engine.after_step(reward=1.0 + t)
        opt.zero_grad(set_to_none=True)
    assert all(t.dtype == torch.float32 for t in rule.trace + rule.momentum)
    assert all(u.dtype == torch.float32 for u in rule.U if u.numel())
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())


def test_traces_rejects_bad_settings():
    with pytest.raises(UserError):
        Traces(direction="up")
    with pytest.raises(UserError):
        Traces(trace_decay=1.0)
    with pytest.raises(UserError):
        Traces(rank=0)


# ------------------------------------------------------------------ EligibilityTrace


@pytest.mark.parametrize("scope", ["parameter", "global"])
@pytest.mark.parametrize("direction", ["sign", "normalized"])
def test_eligibility_matches_reference(scope, direction):
    decay, frac, lr = 0.6, 0.2, 0.05
    model, ref = make_model(), make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    rule = EligibilityTrace(
        decay=decay, top_k=frac, plasticity_lr=lr, scope=scope, direction=direction
    )
    engine = PlasticityEngine(model, [rule], optimizer=opt)
    baseline = RewardBaseline()
    params = list(ref.parameters())
    elig = [torch.zeros_like(p) for p in params]
    total = sum(p.numel() for p in params)
    for t in range(len(REWARDS)):
        backward(model, t)
        engine.after_backward()
        opt.step()
        engine.after_step(reward=REWARDS[t])
        opt.zero_grad(set_to_none=True)

        backward(ref, t)
        dirs = []
        for i, p in enumerate(params):
            g = p.grad
            elig[i] = decay * elig[i] + g.abs()
            if direction == "sign":
                dirs.append(torch.sign(-g))
            else:
                rms = math.sqrt(float((g * g).sum()) / g.numel())
                dirs.append(-g / rms)
        ref_opt.step()
        expected_fraction = 0.0
        if REWARDS[t] is not None:
            r = baseline(REWARDS[t])
            if r != 0:
                with torch.no_grad():
                    if scope == "parameter":
                        chosen = []
                        for e in elig:
                            k = max(1, math.floor(frac * e.numel()))
                            chosen.append(torch.topk(e.flatten(), k).indices.tolist())
                    else:
                        flat = torch.cat([e.flatten() for e in elig])
                        k = max(1, math.floor(frac * total))
                        top = set(torch.topk(flat, k).indices.tolist())
                        chosen, off = [], 0
                        for e in elig:
                            chosen.append(
                                [j - off for j in range(off, off + e.numel()) if j in top]
                            )
                            off += e.numel()
                    for p, d, idx in zip(params, dirs, chosen):
                        flat_p, flat_d = p.view(-1), d.flatten()
                        for j in idx:
                            flat_p[j] += lr * r * flat_d[j]
                    expected_fraction = sum(len(c) for c in chosen) / total
        ref_opt.zero_grad(set_to_none=True)
        for a, b in zip(model.parameters(), params):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert engine.stats()["eligibility/fraction_updated"] == pytest.approx(expected_fraction)
    for e_rule, e_ref in zip(rule.eligibility, elig):
        torch.testing.assert_close(e_rule, e_ref)
    s = engine.stats()
    assert s["eligibility/eligibility_max"] == pytest.approx(max(float(e.max()) for e in elig))
    assert s["eligibility/eligibility_mean"] == pytest.approx(
        sum(float(e.sum()) for e in elig) / total
    )


def test_eligibility_no_advantage_no_update():
    with_rule, without = make_model(), make_model()
    opt_a = torch.optim.SGD(with_rule.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(without.parameters(), lr=0.1)
    engine = PlasticityEngine(with_rule, [EligibilityTrace(plasticity_lr=1.0)], optimizer=opt_a)
    train(with_rule, opt_a, engine, 3, rewards=[None, 0.0, None])  # None, then advantage 0
    train(without, opt_b, None, 3)
    for a, b in zip(with_rule.parameters(), without.parameters()):
        assert torch.equal(a, b)
    assert engine.rule("eligibility").stats()["eligibility_mean"] > 0


# ------------------------------------------------------------------ pattern selection


@pytest.mark.parametrize(
    "factory",
    [
        lambda: Traces(params="*.weight", plasticity_lr=0.1, low_rank=True),
        lambda: EligibilityTrace(params="*.weight", plasticity_lr=0.1, top_k=0.5),
    ],
)
def test_pattern_selection_leaves_biases_untouched(factory):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rule = factory()
    engine = PlasticityEngine(model, [rule], optimizer=opt)
    assert rule.names == ["0.weight", "2.weight"]
    moved = set()
    for t in range(6):
        backward(model, t)
        engine.after_backward()
        opt.step()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        engine.after_step(reward=REWARDS[t])
        for n, p in model.named_parameters():
            if not torch.equal(p, before[n]):
                moved.add(n)
        opt.zero_grad(set_to_none=True)
    assert moved == {"0.weight", "2.weight"}


# ------------------------------------------------------------------ AdaptiveLR


def test_adaptive_lr_multiplier_grows_with_complexity():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mults = {}
    for nxt in (0.5, 1.0, 1.5, 3.0):
        rule = AdaptiveLR(sensitivity=0.8, min_mult=0.5, max_mult=2.0, ema_decay=0.9)
        rule.bind(model, opt)
        rule.observe(1.0)  # first value: c = 1
        rule.after_backward()
        assert rule.multiplier == 1.0
        rule.after_step(None)
        rule.observe(nxt)
        rule.after_backward()
        mults[nxt] = rule.multiplier
        assert rule.complexity == pytest.approx(nxt / 1.0)
        rule.after_step(None)
        rule.close()
    assert mults[0.5] < mults[1.0] < mults[1.5] < mults[3.0]
    assert mults[1.0] == 1.0 and mults[1.5] == pytest.approx(1.4)
    assert mults[0.5] == pytest.approx(0.6) and mults[3.0] == 2.0  # clipped at max_mult
    # a callable signal, relative to its own running mean
    values = iter([4.0, 8.0])
    rule = AdaptiveLR(complexity=lambda: next(values), sensitivity=1.0, max_mult=5.0, ema_decay=0.5)
    rule.bind(model, opt)
    for expected in (1.0, 2.0):
        rule.after_backward()
        assert rule.multiplier == pytest.approx(expected)
        rule.after_step(None)
    assert rule.stats()["complexity_mean"] == pytest.approx(6.0)
    rule.close()


def test_adaptive_lr_scales_step_and_restores_lr():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rule = AdaptiveLR(sensitivity=1.0, ema_decay=0.5, max_mult=3.0)
    engine = PlasticityEngine(model, [rule], optimizer=opt)
    rule.set_complexity(2.0)
    engine.after_backward()  # first value: mult 1
    opt.step()
    engine.after_step()
    opt.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in model.parameters()]
    backward(model, 1)
    grads = [p.grad.clone() for p in model.parameters()]
    rule.set_complexity(4.0)  # c = 4 / 2 = 2 -> mult 2
    engine.after_backward()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
    opt.step()
    assert opt.param_groups[0]["lr"] == 0.1  # restored by the step post-hook
    engine.after_step()
    assert opt.param_groups[0]["lr"] == 0.1
    for b, g, p in zip(before, grads, model.parameters()):
        torch.testing.assert_close(p - b, -0.2 * g)
    assert engine.stats()["adaptive_lr/lr_multiplier"] == pytest.approx(2.0)


@pytest.mark.parametrize("kind", ["exponential", "lambda"])
def test_adaptive_lr_does_not_compound_schedule(kind):
    lrs = {}
    for use_rule in (False, True):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if kind == "exponential":  # chainable: reads group["lr"]
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.95)
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
        engine = None
        if use_rule:
            engine = PlasticityEngine(
                model, [AdaptiveLR(sensitivity=2.0, ema_decay=0.8)], optimizer=opt
            )
        mults = []
        for t in range(40):
            backward(model, t)
            if engine is not None:
                engine.rule("adaptive_lr").observe(1.0 + (t % 5))
                engine.after_backward()
                mults.append(engine.rule("adaptive_lr").multiplier)
            opt.step()
            sched.step()  # the design-map order: step, schedule, after_step
            if engine is not None:
                engine.after_step(reward=None)
            opt.zero_grad(set_to_none=True)
            lrs.setdefault(use_rule, []).append(opt.param_groups[0]["lr"])
        if use_rule:
            assert len(set(mults)) > 3  # the lr really was scaled, by varying amounts
    assert lrs[True] == lrs[False]


def test_adaptive_lr_needs_optimizer():
    with pytest.raises(UserError, match="optimizer"):
        PlasticityEngine(make_model(), [AdaptiveLR()])


# ------------------------------------------------------------------ state round trip


def _roundtrip(state, tmp_path):
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.loads(json.dumps(flatten_state(state, tensors)))
    save_file(tensors, str(tmp_path / "state.safetensors"))
    return unflatten_state(skeleton, load_file(str(tmp_path / "state.safetensors")))


FACTORIES = {
    "traces": lambda: [Traces(plasticity_lr=0.05, trace_decay=0.7, momentum=0.6)],
    "traces_low_rank": lambda: [
        Traces(plasticity_lr=0.05, low_rank=True, rank=2, direction="seed")
    ],
    "eligibility_param": lambda: [EligibilityTrace(plasticity_lr=0.02, top_k=0.3)],
    "eligibility_global": lambda: [
        EligibilityTrace(plasticity_lr=0.02, top_k=0.3, scope="global", direction="normalized")
    ],
    "adaptive_lr": lambda: [AdaptiveLR(sensitivity=1.0, ema_decay=0.7)],
    "all": lambda: [
        Traces(params="*.weight", plasticity_lr=0.05, low_rank=True),
        EligibilityTrace(params="*.bias", plasticity_lr=0.02),
        AdaptiveLR(),
    ],
}


@pytest.mark.parametrize("which", sorted(FACTORIES))
def test_state_round_trip_resumes_bitwise(which, tmp_path):
    total, cut = 9, 4
    observe = which in ("adaptive_lr", "all")

    def fresh():
        model = make_model()
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        return model, opt, PlasticityEngine(model, FACTORIES[which](), optimizer=opt)

    model, opt, engine = fresh()
    train(model, opt, engine, total, observe=observe)
    expected = [p.detach().clone() for p in model.parameters()]
    expected_stats = engine.stats()

    model, opt, engine = fresh()
    train(model, opt, engine, cut, observe=observe)
    saved = _roundtrip(
        {
            "engine": engine.state_dict(),
            "model": {k: v.clone() for k, v in model.state_dict().items()},
        },
        tmp_path,
    )
    opt_state = copy.deepcopy(opt.state_dict())
    engine.close()

    model, opt, engine = fresh()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(opt_state)
    engine.load_state_dict(saved["engine"])
    train(model, opt, engine, total - cut, start=cut, observe=observe)
    for a, b in zip(model.parameters(), expected):
        assert torch.equal(a, b)
    assert engine.stats() == expected_stats


def test_load_rejects_mismatched_state():
    model = make_model()
    rule = Traces(low_rank=True, rank=2)
    engine = PlasticityEngine(model, [rule])
    train(model, torch.optim.SGD(model.parameters(), lr=0.1), engine, 3)
    state = rule.state_dict()
    other = Traces(params="*.weight", low_rank=True, rank=2)
    other.bind(make_model())
    with pytest.raises(UserError):
        other.load_state_dict(state)
    other = Traces(low_rank=True, rank=3)
    other.bind(make_model())
    with pytest.raises(UserError, match="rank"):
        other.load_state_dict(state)
