"""EWC, Hebbian (Oja), Homeostasis and Consolidation rules against naive references."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from neuroplastic.errors import UserError
from neuroplastic.models.checkpoint_io import flatten_state, unflatten_state
from neuroplastic.plasticity.consolidation import Consolidation, ReplayBuffer
from neuroplastic.plasticity.engine import PlasticityEngine
from neuroplastic.plasticity.ewc import EWC, split_batch
from neuroplastic.plasticity.hebbian import Hebbian
from neuroplastic.plasticity.homeostasis import Homeostasis


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: threads only add contention (and make the timing flaky on a busy box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def mlp(seed: int = 0, d_in: int = 4, hidden: int = 6, d_out: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))


def mse_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def through_checkpoint(state):
    """What a checkpoint does to a state dict: tensors out, skeleton through JSON."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.loads(json.dumps(flatten_state(state, tensors)))
    return unflatten_state(skeleton, {k: v.clone() for k, v in tensors.items()})


# ====================================================================== EWC


def test_ewc_penalty_none_before_and_zero_at_anchor():
    model = mlp()
    rule = EWC(lam=3.0).bind(model)
    assert rule.penalty() is None
    assert rule.stats()["tasks"] == 0.0
    g = torch.Generator().manual_seed(1)
    rule.add_task([torch.rand(p.shape, generator=g) for p in rule.params])
    pen = rule.penalty()
    assert pen is not None and pen.requires_grad
    assert float(pen.detach()) == 0.0
    assert rule.stats()["tasks"] == 1.0


def test_ewc_penalty_and_gradient_match_reference():
    model = mlp()
    lam = 2.5
    rule = EWC(lam=lam).bind(model)
    g = torch.Generator().manual_seed(2)
    fisher = [torch.rand(p.shape, generator=g) for p in rule.params]
    rule.add_task(fisher)
    anchor = [p.detach().clone() for p in rule.params]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))

    pen = rule.penalty()
    ref = 0.0
    for p, f, a in zip(rule.params, fisher, anchor):
        for pi, fi, ai in zip(
            p.detach().flatten().tolist(), f.flatten().tolist(), a.flatten().tolist()
        ):
            ref += lam / 2 * fi * (pi - ai) ** 2
    assert float(pen.detach()) == pytest.approx(ref, rel=1e-5)

    pen.backward()
    for p, f, a in zip(rule.params, fisher, anchor):
        for gi, pi, fi, ai in zip(
            p.grad.flatten().tolist(),
            p.detach().flatten().tolist(),
            f.flatten().tolist(),
            a.flatten().tolist(),
        ):
            assert gi == pytest.approx(lam * fi * (pi - ai), rel=1e-4, abs=1e-7)
    st = rule.stats()
    assert st["penalty"] == pytest.approx(ref, rel=1e-5)
    assert st["fisher_mean"] == pytest.approx(
        sum(float(f.sum()) for f in fisher) / sum(f.numel() for f in fisher), rel=1e-6
    )


def _task_batches(seed: int, n: int = 3, bs: int = 5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 4, generator=g), torch.randn(bs, 2, generator=g)) for _ in range(n)]


@pytest.mark.parametrize("per_sample", [False, True])
def test_ewc_fisher_matches_reference(per_sample):
    model = mlp()
    batches = _task_batches(3)
    rule = EWC(per_sample=per_sample).bind(model)
    rule.consolidate(batches, mse_loss)
    # .grad is left alone
    assert all(p.grad is None for p in model.parameters())

    ref = [torch.zeros_like(p) for p in model.parameters()]
    count = 0
    pieces = (
        [(x[i : i + 1], y[i : i + 1]) for x, y in batches for i in range(x.shape[0])]
        if per_sample
        else batches
    )
    for piece in pieces:
        model.zero_grad()
        mse_loss(model, piece).backward()
        for r, p in zip(ref, model.parameters()):
            r += p.grad**2
        count += 1
    for f, r in zip(rule.fisher, ref):
        torch.testing.assert_close(f, r / count, rtol=1e-5, atol=1e-8)
    for a, p in zip(rule.anchor, model.parameters()):
        assert torch.equal(a, p.detach())


def test_split_batch_nested():
    batch = {"x": torch.arange(6).view(3, 2), "meta": [torch.ones(3), "tag"], "w": torch.ones(5)}
    pieces = split_batch(batch)
    assert len(pieces) == 3
    assert pieces[1]["x"].tolist() == [[2, 3]]
    assert pieces[2]["meta"][1] == "tag" and pieces[2]["meta"][0].shape == (1,)
    assert pieces[0]["w"].shape == (5,)  # not batch-sized: passed whole


def test_ewc_online_decay_and_classic_sum():
    g = torch.Generator().manual_seed(4)
    model = mlp()
    online = EWC(lam=1.0, gamma=0.5).bind(model)
    classic = EWC(lam=1.0, online=False).bind(model)
    f1 = [torch.rand(p.shape, generator=g) for p in online.params]
    f2 = [torch.rand(p.shape, generator=g) for p in online.params]
    online.add_task(f1)
    classic.add_task(f1)
    a1 = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2)
    online.add_task(f2)
    classic.add_task(f2)
    a2 = [p.detach().clone() for p in model.parameters()]
    for f, x1, x2 in zip(online.fisher, f1, f2):
        torch.testing.assert_close(f, 0.5 * x1 + x2)
    for a, p in zip(online.anchor, a2):
        assert torch.equal(a, p)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    ref = sum(
        0.5 * (f * (p.detach() - a) ** 2).sum()
        for fs, anc in ((f1, a1), (f2, a2))
        for f, p, a in zip(fs, model.parameters(), anc)
    )
    torch.testing.assert_close(classic.penalty().detach(), ref)
    assert online.stats()["tasks"] == classic.stats()["tasks"] == 2.0


def test_ewc_consolidate_from_grads_matches_mean_squared_grads():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rule = EWC(collect_grads=True)
    engine = PlasticityEngine(model, [rule], opt)
    with pytest.raises(UserError):
        rule.consolidate_from_grads()  # nothing collected yet
    sq = [torch.zeros_like(p) for p in model.parameters()]
    for batch in _task_batches(5, n=4):
        mse_loss(model, batch).backward()
        engine.after_backward()
        for s, p in zip(sq, model.parameters()):
            s += p.grad**2
        opt.step()
        engine.after_step()
        opt.zero_grad(set_to_none=True)
    rule.consolidate_from_grads()
    for f, s in zip(rule.fisher, sq):
        torch.testing.assert_close(f, s / 4)
    assert rule.grad_count == 0 and all(float(t.abs().sum()) == 0 for t in rule.grad_sq)
    with pytest.raises(UserError):
        EWC().bind(model).consolidate_from_grads()


def _two_tasks(noise: float = 0.3):
    """Two noisy regression tasks on disjoint input features, sharing one small MLP.

    The label noise matters: the empirical Fisher is built from squared gradients of the
    loss, which vanish on a task fitted perfectly.
    """
    g = torch.Generator().manual_seed(0)
    n, d = 256, 8
    xa = torch.zeros(n, d)
    xa[:, :4] = torch.randn(n, 4, generator=g)
    xb = torch.zeros(n, d)
    xb[:, 4:] = torch.randn(n, 4, generator=g)
    wa, wb = torch.randn(4, 1, generator=g), torch.randn(4, 1, generator=g)
    ya = torch.tanh(xa[:, :4] @ wa) + 1.0 + noise * torch.randn(n, 1, generator=g)
    yb = torch.tanh(xb[:, 4:] @ wb) - 1.0 + noise * torch.randn(n, 1, generator=g)
    return (xa, ya), (xb, yb)


def _train(model, data, steps, engine=None, lr=0.01):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = mse_loss(model, data)
        if engine is not None:
            loss = loss + engine.penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def test_ewc_reduces_forgetting():
    task_a, task_b = _two_tasks()
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    _train(base, task_a, 300)
    with torch.no_grad():
        loss_a_before = float(mse_loss(base, task_a))
        loss_b_before = float(mse_loss(base, task_b))

    plain = copy.deepcopy(base)
    _train(plain, task_b, 300)

    protected = copy.deepcopy(base)
    rule = EWC(lam=100.0, per_sample=True)
    engine = PlasticityEngine(protected, [rule])
    xa, ya = task_a
    rule.consolidate([(xa[i : i + 64], ya[i : i + 64]) for i in range(0, 256, 64)], mse_loss)
    _train(protected, task_b, 300, engine=engine)

    with torch.no_grad():
        a_plain, a_ewc = float(mse_loss(plain, task_a)), float(mse_loss(protected, task_a))
        b_plain, b_ewc = float(mse_loss(plain, task_b)), float(mse_loss(protected, task_b))
    print(
        f"EWC forgetting: loss A after A {loss_a_before:.4f}, B before {loss_b_before:.4f}; "
        f"loss A after B: plain {a_plain:.4f}, EWC {a_ewc:.4f}; loss B: plain {b_plain:.4f}, "
        f"EWC {b_ewc:.4f}"
    )
    assert a_ewc < 0.5 * a_plain
    assert b_ewc < 0.25 * loss_b_before  # task B is still learned


# ====================================================================== Hebbian


def _oja_reference(w, xs, ys, lr):
    """dW[o, i] = lr / N * sum_n (y[n,o] x[n,i] - sum_k y[n,o] y[n,k] W[k,i]), plain loops."""
    out_f, in_f = w.shape
    xs, ys, w = xs.tolist(), ys.tolist(), w.tolist()
    n = len(xs)
    dw = [[0.0] * in_f for _ in range(out_f)]
    for o in range(out_f):
        for i in range(in_f):
            acc = 0.0
            for x, y in zip(xs, ys):
                acc += y[o] * x[i] - sum(y[o] * y[k] * w[k][i] for k in range(out_f))
            dw[o][i] = lr * acc / n
    return torch.tensor(dw)


@pytest.mark.parametrize("subtract_bias", [False, True])
def test_hebbian_update_matches_reference(subtract_bias):
    torch.manual_seed(0)
    layer = nn.Linear(5, 3, bias=True)
    model = nn.Sequential(layer)
    rule = Hebbian(lr=0.1, subtract_bias=subtract_bias).bind(model)
    assert rule.names == ["0.weight"] and rule.params[0] is layer.weight
    w0 = layer.weight.detach().clone()
    x1, x2 = torch.randn(2, 4, 5), torch.randn(3, 5)  # two forward passes, one with a time axis
    model(x1)
    model(x2)
    rule.after_step(None)
    xs = torch.cat([x1.reshape(-1, 5), x2])
    ys = xs @ w0.t() + (0 if subtract_bias else layer.bias.detach())
    expected = w0 + _oja_reference(w0, xs, ys, 0.1)
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=1e-5, atol=1e-6)
    assert rule.stats()["update_norm"] == pytest.approx(float((expected - w0).norm()), rel=1e-5)
    assert rule.stats()["mean_abs_activation"] == pytest.approx(float(ys.abs().mean()), rel=1e-5)


def test_hebbian_oja_finds_principal_component():
    g = torch.Generator().manual_seed(0)
    d = 6
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    scales = torch.tensor([3.0, 1.2, 1.0, 0.7, 0.5, 0.3])
    pc = q[:, 0]
    torch.manual_seed(1)
    layer = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        layer.weight.mul_(0.3)
    rule = Hebbian(lr=0.02)
    engine = PlasticityEngine(layer, [rule])
    for _ in range(400):
        x = (torch.randn(64, d, generator=g) * scales) @ q.t()
        layer(x)
        engine.after_step()
    w = layer.weight.detach()[0]
    cos = float(torch.dot(w, pc).abs() / w.norm())
    assert cos > 0.95
    assert float(w.norm()) == pytest.approx(1.0, abs=0.05)


def test_hebbian_records_only_in_training_and_close_removes_hooks():
    model = mlp()
    rule = Hebbian(params="2", lr=0.5).bind(model)  # module name "2": the second Linear
    assert rule.names == ["2.weight"]
    w0 = model[2].weight.detach().clone()
    model.eval()
    model(torch.randn(3, 4))
    rule.after_step(None)
    assert torch.equal(model[2].weight, w0)
    model.train()
    out = model(torch.randn(3, 4))
    assert not out.requires_grad or out.grad_fn is not None  # autograd untouched
    rule.after_step(None)
    assert not torch.equal(model[2].weight, w0)
    assert len(model[2]._forward_hooks) == 1
    rule.close()
    assert len(model[2]._forward_hooks) == 0
    w1 = model[2].weight.detach().clone()
    model(torch.randn(3, 4))
    rule.after_step(None)
    assert torch.equal(model[2].weight, w1)
    # parameter-style pattern works too; no match is a UserError
    assert Hebbian(params="*.weight").bind(mlp()).names == ["0.weight", "2.weight"]
    with pytest.raises(UserError):
        Hebbian(params="nothing*").bind(mlp())


def test_hebbian_reward_gating():
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    models = [mlp(seed=3) for _ in range(3)]
    plain = Hebbian(lr=0.1).bind(models[0])
    gated = Hebbian(lr=0.1, reward_gated=True).bind(models[1])
    gated_none = Hebbian(lr=0.1, reward_gated=True).bind(models[2])
    assert gated.uses_reward and not plain.uses_reward
    w0 = [m[0].weight.detach().clone() for m in models]
    for m in models:
        m(x)
    plain.after_step(None)
    gated.after_step(-0.5)
    gated_none.after_step(None)
    d_plain = models[0][0].weight.detach() - w0[0]
    d_gated = models[1][0].weight.detach() - w0[1]
    assert float(d_plain.norm()) > 0
    torch.testing.assert_close(d_gated, -0.5 * d_plain)  # anti-Hebbian direction
    assert torch.equal(models[2][0].weight, w0[2])  # no reward: no change
    # the dropped activity does not leak into the next step
    gated_none.after_step(1.0)
    assert torch.equal(models[2][0].weight, w0[2])


def test_hebbian_clips_update_norm():
    x = torch.randn(16, 4) * 5
    m1, m2 = mlp(seed=4), mlp(seed=4)
    free = Hebbian(params="0", lr=0.5).bind(m1)
    clipped = Hebbian(params="0", lr=0.5, max_update_norm=0.01).bind(m2)
    w0 = m1[0].weight.detach().clone()
    m1(x)
    m2(x)
    free.after_step(None)
    clipped.after_step(None)
    d_free = m1[0].weight.detach() - w0
    d_clip = m2[0].weight.detach() - w0
    assert float(d_free.norm()) > 0.01
    assert float(d_clip.norm()) == pytest.approx(0.01, rel=1e-4)
    torch.testing.assert_close(d_clip, d_free * (0.01 / d_free.norm()), rtol=1e-4, atol=1e-7)


# ====================================================================== Homeostasis


def test_homeostasis_matches_reference_and_skips_vectors():
    model = mlp()
    rule = Homeostasis(target=2.0, rate=0.3).bind(model)
    assert rule.names == ["0.weight", "2.weight"]  # biases (1-D) are not scaled
    before = [p.detach().clone() for p in rule.params]
    rule.after_step(None)
    for p, w in zip(rule.params, before):
        for r in range(w.shape[0]):
            row = w[r].tolist()
            norm = math.sqrt(sum(v * v for v in row))
            f = 1 + 0.3 * (2.0 / norm - 1)
            torch.testing.assert_close(p.detach()[r], torch.tensor([v * f for v in row]))


def test_homeostasis_converges_to_target_and_initial_norms():
    model = mlp(hidden=12)
    rule = Homeostasis(target=1.5, rate=0.1, interval=2)
    engine = PlasticityEngine(model, [rule])
    for _ in range(300):
        engine.after_step()
    assert rule.applied == 150
    for p in rule.params:
        norms = p.detach().norm(dim=1)
        torch.testing.assert_close(norms, torch.full_like(norms, 1.5), rtol=1e-4, atol=1e-4)
    assert rule.stats()["target_deviation"] < 1e-4
    assert rule.stats()["mean_row_norm"] == pytest.approx(1.5, abs=1e-4)

    # target=None keeps the norms the rows had at bind time
    model = mlp(seed=5)
    rule = Homeostasis(rate=0.2).bind(model)
    initial = [p.detach().norm(dim=1) for p in rule.params]
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    for _ in range(100):
        rule.after_step(None)
    for p, n0 in zip(rule.params, initial):
        torch.testing.assert_close(p.detach().norm(dim=1), n0, rtol=1e-4, atol=1e-5)


# ====================================================================== Consolidation


def test_consolidation_tags_only_large_changes_and_captures_there():
    model = nn.Linear(4, 3, bias=False)
    rule = Consolidation(threshold=0.1, capture_rate=0.25).bind(model)
    w0 = model.weight.detach().clone()
    big = torch.zeros(3, 4, dtype=torch.bool)
    big[0, 1] = big[2, 3] = big[1, 0] = True
    with torch.no_grad():
        model.weight.add_(torch.where(big, torch.tensor(0.5), torch.tensor(0.05)))
    rule.after_step(None)
    assert torch.equal(rule.tags[0], big)
    w1 = model.weight.detach()
    for r in range(3):
        for c in range(4):
            slow = w0[r, c].item()
            if big[r, c]:
                slow = slow + 0.25 * (w1[r, c].item() - slow)
            assert rule.slow[0][r, c].item() == pytest.approx(slow, abs=1e-7)
    assert torch.equal(model.weight.detach(), w1)  # pull=0: fast weights untouched
    st = rule.stats()
    assert st["tagged_fraction"] == pytest.approx(3 / 12)
    assert st["slow_fast_distance"] == pytest.approx(float((w1 - rule.slow[0]).norm()), rel=1e-6)

    # drift is measured since the last capture: tagged weights were reset, the others keep
    # accumulating their small changes until they cross the threshold
    with torch.no_grad():
        model.weight.add_(torch.where(big, torch.tensor(0.0), torch.tensor(0.06)))
    rule.after_step(None)
    assert torch.equal(rule.tags[0], ~big)


def test_consolidation_pull_change_mode_and_quantile():
    model = nn.Linear(4, 3, bias=False)
    rule = Consolidation(tag_on="change", threshold=0.1, capture_rate=0.5, pull=0.2).bind(model)
    w0 = model.weight.detach().clone()
    delta = torch.linspace(-0.3, 0.3, 12).view(3, 4)
    with torch.no_grad():
        model.weight.add_(delta)
    w1 = w0 + delta
    rule.after_step(None)
    tags = delta.abs() > 0.1
    assert torch.equal(rule.tags[0], tags)
    slow = torch.where(tags, w0 + 0.5 * (w1 - w0), w0)
    torch.testing.assert_close(rule.slow[0], slow)
    torch.testing.assert_close(model.weight.detach(), w1 - 0.2 * (w1 - slow))
    # no further change: nothing tagged (the pull is not counted as a change)
    rule.after_step(None)
    assert not rule.tags[0].any()

    torch.manual_seed(0)
    big = nn.Linear(50, 40)
    rule = Consolidation(threshold=0.0, quantile=0.9).bind(big)
    with torch.no_grad():
        for p in big.parameters():
            p.add_(torch.randn_like(p))
    rule.after_step(None)
    for t in rule.tags:
        assert abs(float(t.float().mean()) - 0.1) < 0.03


def test_replay_buffer_reservoir_is_deterministic_and_uniform():
    a, b = ReplayBuffer(5, seed=7), ReplayBuffer(5, seed=7)
    for i in range(40):
        batch = {"x": torch.full((2,), float(i)), "i": i}
        a.add(batch)
        b.add(batch)
    assert len(a) == 5 and a.seen == 40
    assert [it["i"] for it in a.items] == [it["i"] for it in b.items]
    sa, sb = a.sample(3), b.sample(3)
    assert [s["i"] for s in sa] == [s["i"] for s in sb]
    assert len({s["i"] for s in sa}) == 3
    assert len(a.sample(10)) == 5 and a.sample(0) == []
    sa[0]["x"].add_(100)  # samples are copies
    assert all(float(it["x"][0]) < 40 for it in a.items)

    counts = torch.zeros(30)
    for seed in range(300):
        buf = ReplayBuffer(6, seed=seed)
        for i in range(30):
            buf.add(torch.tensor([i]))
        for it in buf.items:
            counts[int(it)] += 1
    freq = counts / 300
    assert float((freq - 0.2).abs().max()) < 0.1  # each batch kept with probability 6/30


def test_replay_buffer_round_trip_continues_identically():
    a = ReplayBuffer(4, seed=3)
    for i in range(10):
        a.add((torch.tensor([i, i]), [torch.ones(1) * i]))
    b = ReplayBuffer(4, seed=99)
    b.load_state_dict(through_checkpoint(a.state_dict()))
    for i in range(10, 20):
        batch = (torch.tensor([i, i]), [torch.ones(1) * i])
        a.add(batch)
        b.add(batch)
    for x, y in zip(a.items + a.sample(4), b.items + b.sample(4)):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1][0], y[1][0])


# ====================================================================== exact resume


def _rules():
    return [
        EWC(lam=5.0, collect_grads=True),
        Hebbian(params="0", lr=0.01, reward_gated=True, max_update_norm=0.05),
        Homeostasis(rate=0.05, interval=2),
        Consolidation(threshold=1e-3, quantile=0.5, capture_rate=0.3, pull=0.05, replay_capacity=3),
    ]


def _data(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(6, 4, generator=g), torch.randn(6, 2, generator=g)


def _run(model, opt, engine, start, stop):
    replay = engine.rule("consolidation").replay
    ewc = engine.rule("ewc")
    for step in range(start, stop):
        x, y = _data(step)
        replay.add((x, y))
        rx, ry = replay.sample(1)[0]
        loss = mse_loss(model, (torch.cat([x, rx]), torch.cat([y, ry])))
        pen = engine.penalty()
        if pen is not None:
            loss = loss + pen
        loss.backward()
        engine.after_backward()
        opt.step()
        engine.after_step(reward=math.sin(step) if step % 3 else None)
        opt.zero_grad(set_to_none=True)
        if step == 3:
            ewc.consolidate_from_grads()


def _fresh(seed):
    model = mlp(seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    engine = PlasticityEngine(model, _rules(), opt)
    return model, opt, engine


def test_state_dict_round_trip_gives_identical_continuation():
    model, opt, engine = _fresh(0)
    _run(model, opt, engine, 0, 10)
    reference = [p.detach().clone() for p in model.parameters()]

    model, opt, engine = _fresh(0)
    _run(model, opt, engine, 0, 6)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = through_checkpoint(opt.state_dict())
    saved_rules = through_checkpoint(engine.state_dict())
    stats_before = engine.stats()
    engine.close()

    model2, opt2, engine2 = _fresh(123)  # different init: everything must come from the state
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    engine2.load_state_dict(saved_rules)
    for k in (
        "ewc/tasks",
        "ewc/fisher_mean",
        "homeostasis/mean_row_norm",
        "consolidation/tagged_fraction",
    ):
        assert engine2.stats()[k] == stats_before[k]
    _run(model2, opt2, engine2, 6, 10)
    for p, r in zip(model2.parameters(), reference):
        assert torch.equal(p.detach(), r)
    assert engine2.rule("ewc").tasks == 1


def test_load_state_rejects_other_model():
    model, opt, engine = _fresh(0)
    state = through_checkpoint(engine.state_dict())
    other = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 2))
    engine2 = PlasticityEngine(other, _rules(), torch.optim.Adam(other.parameters()))
    with pytest.raises(UserError):
        engine2.load_state_dict(state)


def test_rule_interface_abilities_and_engine_dispatch():
    from neuroplastic.plasticity.adaptive_lr import AdaptiveLR

    assert EWC.implements("consolidate") and not Hebbian.implements("consolidate")
    assert AdaptiveLR.implements("observe") and not EWC.implements("observe")
    assert Hebbian.implements("last_update_norm") and not EWC.implements("last_update_norm")
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ewc, heb = EWC(params="*.weight"), Hebbian(params="0", lr=0.01)
    cons = Consolidation(threshold=1e-3, replay_capacity=2)
    alr = AdaptiveLR(sensitivity=1.0, ema_decay=0.5, max_mult=5.0)
    engine = PlasticityEngine(model, [ewc, heb, cons, alr], optimizer=opt)
    assert engine.consolidating() == [ewc]
    assert engine.replay is cons.replay is not None
    assert ewc.replay is None and ewc.last_update_norm is None
    assert isinstance(heb.last_update_norm, float)
    engine.observe(2.0)  # no-op for all but AdaptiveLR
    engine.after_backward()
    engine.observe(4.0)
    engine.after_backward()
    assert alr.multiplier == pytest.approx(2.0)
    engine.close()
