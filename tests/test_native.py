"""The fused C++ CPU kernels (neuroplastic.ops.native): the same numbers as the PyTorch
forms, gradcheck in float64, and a clean fallback where they cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from neuroplastic.config import ModelConfig
from neuroplastic.models.transformer import GPT, apply_rope, rope_angles
from neuroplastic.ops.native import native_build_dir, native_disabled, native_ops, native_usable


@pytest.fixture(scope="module")
def ops():
    ops = native_ops()
    if ops is None:
        pytest.skip("the native CPU kernels could not be built here (no C++ compiler?)")
    return ops


def test_rms_norm_kernel_matches_formula(ops):
    torch.manual_seed(0)
    for shape in [(3, 5, 16), (7, 33), (1, 1, 1, 8)]:
        d = shape[-1]
        x = torch.randn(*shape, requires_grad=True)
        w = torch.rand(d).add(0.5).requires_grad_()
        g = torch.randn(*shape)
        y = ops.rms_norm(x, w, 1e-5)
        y.backward(g)
        x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        ref = x2 * torch.rsqrt(x2.pow(2).mean(-1, keepdim=True) + 1e-5) * w2
        ref.backward(g)
        torch.testing.assert_close(y, ref)
        torch.testing.assert_close(x.grad, x2.grad)
        torch.testing.assert_close(w.grad, w2.grad)
    # a non-contiguous input, a frozen weight, no grad at all
    x = torch.randn(16, 6).t().requires_grad_()
    w = torch.rand(16).add(0.5)
    y = ops.rms_norm(x, w, 1e-6)
    y.sum().backward()
    ref = x.detach() * torch.rsqrt(x.detach().pow(2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(y.detach(), ref)
    assert x.grad is not None and w.grad is None
    with torch.inference_mode():
        torch.testing.assert_close(ops.rms_norm(x.detach(), w, 1e-6), ref)
    xd = torch.randn(4, 3, 8, dtype=torch.float64, requires_grad=True)
    wd = torch.rand(8, dtype=torch.float64).add(0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ops.rms_norm(a, b, 1e-5), (xd, wd))
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.rms_norm(torch.randn(2, 4), torch.ones(5), 1e-5)


@pytest.mark.parametrize("pairing", ["interleaved", "halves"])
def test_rope_kernel_matches_apply_rope(ops, pairing):
    """In place on (B, T, 3, nh, hd), q/k/v returned as views; the backward passes
    gradcheck, also when only some of q, k, v reach the loss."""
    torch.manual_seed(1)
    B, T, nh, hd = 2, 6, 3, 8
    cos, sin = rope_angles(torch.arange(T), hd, dtype=torch.float64)
    inter = pairing == "interleaved"
    qkv = torch.randn(B, T, 3, nh, hd, dtype=torch.float64, requires_grad=True)
    out = qkv * 1  # rotated in place: a non-leaf, as c_attn's output is
    version = out._version
    q, k, v = ops.rope_qkv_(out, cos, sin, inter)
    assert out._version > version  # autograd knows it was written
    assert q.shape == k.shape == v.shape == (B, nh, T, hd)
    assert q.data_ptr() == out.data_ptr()  # views, no new buffer
    torch.testing.assert_close(q, apply_rope(qkv[:, :, 0].transpose(1, 2), cos, sin, pairing))
    torch.testing.assert_close(k, apply_rope(qkv[:, :, 1].transpose(1, 2), cos, sin, pairing))
    torch.testing.assert_close(v, qkv[:, :, 2].transpose(1, 2))
    for pick in (slice(None), 0, 1, 2):
        assert torch.autograd.gradcheck(lambda t, p=pick: ops.rope_qkv_(t * 1, cos, sin, inter)[p], (qkv,))
    with torch.inference_mode():
        x = qkv.detach().clone()
        q2, _, _ = ops.rope_qkv_(x, cos, sin, inter)
        torch.testing.assert_close(q2, q.detach())
    with pytest.raises(RuntimeError, match="cos and sin must be"):
        ops.rope_qkv_(qkv.detach().clone(), cos[:-1], sin[:-1], inter)


@pytest.mark.parametrize("pairing", ["interleaved", "halves"])
def test_model_on_kernels_equals_model_on_torch_forms(ops, pairing):
    """The default GPT with and without the kernels: same loss, gradients and generated
    tokens (KV cache)."""
    torch.manual_seed(2)
    cfg = ModelConfig.from_flat(vocab_size=48, block_size=24, n_layer=2, n_head=4, n_embd=32,
                                mlp_ratio=2.0, rope_pairing=pairing)
    model = GPT(cfg)
    x = torch.randint(0, 48, (3, 16))
    results = []
    for use in (True, False):
        model.zero_grad(set_to_none=True)
        ctx = native_disabled() if not use else torch.enable_grad()
        with ctx:
            assert native_usable(x.float()) == use
            _, loss = model(x, x)
            loss.backward()
            torch.manual_seed(5)
            gen = model.generate(x[:1, :4], max_new_tokens=8, temperature=1.0)
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, gen))
    (l1, g1, t1), (l2, g2, t2) = results
    torch.testing.assert_close(l1, l2)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], msg=name)
    assert torch.equal(t1, t2)


def test_build_dir_is_keyed_by_python_torch_and_source(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROPLASTIC_NATIVE_DIR", str(tmp_path))
    d = native_build_dir()
    assert d.parent == tmp_path
    assert d.name.startswith(f"py{sys.version_info.major}{sys.version_info.minor}-torch")
    assert torch.__version__.replace("+", "_") in d.name
    import neuroplastic.ops.native as native

    monkeypatch.setattr(native, "_cpu_signature", lambda: b"model name: another CPU")
    assert native_build_dir() != d  # never a library built for another instruction set


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=240)


TRAIN_ONE_STEP = """
    import warnings
    warnings.simplefilter("always")
    import torch
    from neuroplastic.config import ModelConfig
    from neuroplastic.models.transformer import GPT
    from neuroplastic.ops.native import native_ops
    model = GPT(ModelConfig.from_flat(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16))
    x = torch.randint(0, 32, (2, 8))
    _, loss = model(x, x)
    loss.backward()
    print("native", native_ops() is not None, "loss", round(loss.item(), 3))
"""


def test_failed_build_warns_once_and_runs_on_torch_forms(tmp_path):
    """No working compiler: one warning, the model trains on its PyTorch forms; the failure
    is remembered, so the next process warns without compiling again."""
    env = {"NEUROPLASTIC_NATIVE_DIR": str(tmp_path), "CXX": "/bin/false", "NEUROPLASTIC_NO_NATIVE": ""}
    done = _run(TRAIN_ONE_STEP, env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "native False loss" in done.stdout
    assert done.stderr.count("the fused CPU kernels could not be built") == 1
    assert "NEUROPLASTIC_NO_NATIVE=1" in done.stderr and "building the fused CPU kernels" in done.stderr
    again = _run(TRAIN_ONE_STEP, env)
    assert again.returncode == 0 and "native False loss" in again.stdout
    assert "building" not in again.stderr and "an earlier build; delete" in again.stderr


def test_no_native_env_skips_the_build(tmp_path):
    done = _run(TRAIN_ONE_STEP, {"NEUROPLASTIC_NATIVE_DIR": str(tmp_path), "NEUROPLASTIC_NO_NATIVE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "native False loss" in done.stdout
    assert "building" not in done.stderr and "could not be built" not in done.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("pairing", ["interleaved", "halves"])
def test_compiled_graph_takes_the_functional_kernel(ops, pairing):
    """Under torch.compile (fullgraph, AOT autograd) RoPE is the functional op rope_qkv in
    the graph, with its registered fake and gradient formulas: same loss and gradients as
    eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(3)
    cfg = ModelConfig.from_flat(vocab_size=48, block_size=24, n_layer=2, n_head=4, n_embd=32,
                                mlp_ratio=2.0, rope_pairing=pairing)
    model = GPT(cfg)
    x = torch.randint(0, 48, (2, 12))
    _, loss = model(x, x)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    _, loss_c = torch.compile(model, backend=counter, fullgraph=True)(x, x)
    loss_c.backward()
    assert "neuroplastic.rope_qkv" in counter.graphs[0].code
    torch.testing.assert_close(loss_c, loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], msg=name)
    # the functional op and its backward against the in-place one
    qkv = torch.randn(2, 5, 3, 4, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_angles(torch.arange(5), 8, dtype=torch.float64)
    inter = pairing == "interleaved"
    assert torch.autograd.gradcheck(
        lambda t: torch.ops.neuroplastic.rope_qkv.default(t, cos, sin, inter), (qkv,))
    ref = ops.rope_qkv_(qkv.detach().clone(), cos, sin, inter)
    for a, b in zip(torch.ops.neuroplastic.rope_qkv.default(qkv.detach(), cos, sin, inter), ref):
        torch.testing.assert_close(a, b.transpose(1, 2))
