"""A GPT-style decoder-only transformer, readable in one sitting (after karpathy/nanoGPT).

Options come from :class:`neuroplastic.config.ModelConfig` (``vocab_size``, ``block_size``)
and its ``gpt`` section, :class:`neuroplastic.config.GPTConfig` (the layers see only that):

- ``norm``: ``rmsnorm`` or ``layernorm`` (pre-norm blocks plus a final norm);
- ``pos``: ``rope`` (rotary embeddings on queries and keys, base ``rope_theta``) or
  ``learned`` (absolute position embeddings, nanoGPT style);
- ``rope_pairing``: which dimensions of a head RoPE rotates together: ``interleaved``
  (``(2i, 2i+1)``, GPT-J / RoFormer; the default: in float32 one complex multiply, the
  fastest eager form) or ``halves`` (``(i, i + d/2)``, GPT-NeoX / Hugging Face Llama; what
  checkpoints written before the key existed were trained with). The two are the same
  model family: permuting each head's query and key features maps one onto the other;
- ``bias``, ``dropout``, ``mlp_ratio`` (GELU MLP), ``tie_weights`` (output projection
  shares the token embedding).

Attention always goes through :func:`torch.nn.functional.scaled_dot_product_attention`.
Generation uses a :class:`KVCache`; see :meth:`GPT.generate`.

Eager on CPU in float32/64, RMSNorm and the rotation of queries and keys run as fused C++
kernels with C++ autograd nodes (:mod:`neuroplastic.ops.native`, built on first use; under
``torch.compile`` on CPU the rotation is the kernel's functional form); where they cannot be
built, and on other devices and dtypes, the PyTorch forms below compute the same thing (the
tests compare both).

Weight tying: when ``tie_weights`` is true there is no separate ``lm_head`` module; the
output projection reads ``transformer.wte.weight``. The state dict therefore holds no
shared tensors and can be written with ``safetensors.torch.save_file`` directly.

Meta-device construction (``with torch.device("meta"): GPT(cfg)``) works; after
``model.to_empty(device=...)`` call :meth:`GPT.init_weights` to get real values.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from neuroplastic.config import GPTConfig, ModelConfig
from neuroplastic.errors import UserError
from neuroplastic.models.api import LanguageModel
from neuroplastic.ops.native import NATIVE_DTYPES, native_for_compile, native_ops, native_usable

__all__ = ["GPT", "KVCache", "ROPE_PAIRINGS", "apply_rope", "rope_angles"]

#: the values of ``model.rope_pairing`` (see the module docstring)
ROPE_PAIRINGS = ("interleaved", "halves")


# --------------------------------------------------------------------------- helpers


def rope_angles(
    positions: torch.Tensor,
    head_dim: int,
    theta: float = 10000.0,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of the rotary angles, each ``(T, head_dim // 2)``: computed in
    float32, then cast to ``dtype`` (default float32). :class:`GPT` keeps them as tables
    over ``block_size`` positions and slices them per forward."""
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )
    angles = torch.outer(positions.to(torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    if dtype is not None and dtype != torch.float32:
        cos, sin = cos.to(dtype), sin.to(dtype)
    return cos, sin


def _rotate(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    inverse: bool,
    out: torch.Tensor | None = None,
    pairing: str = "halves",
) -> torch.Tensor:
    """The rotation of ``x``'s pairs (``halves``: ``(i, i + d/2)``, ``interleaved``: ``(2i,
    2i+1)``) by the angles (``inverse``: by minus the angles), written into ``out``
    (default: a new contiguous tensor): two multiplies and two fused multiply-adds on the
    pair members, no ``cat``, ``neg`` or temporaries."""
    h = x.shape[-1] // 2
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if pairing == "halves":
        x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    else:
        x1, x2, o1, o2 = x[..., 0::2], x[..., 1::2], out[..., 0::2], out[..., 1::2]
    torch.mul(x1, cos, out=o1)
    torch.mul(x2, cos, out=o2)
    sign = 1 if inverse else -1
    o1.addcmul_(x2, sin, value=sign)
    o2.addcmul_(x1, sin, value=-sign)
    return out


class _Rope(torch.autograd.Function):
    """RoPE as one autograd node: the rotation is orthogonal, so its backward is the
    rotation by minus the angles (same four kernels, nothing saved but cos/sin)."""

    @staticmethod
    def forward(ctx, x, cos, sin, pairing="halves"):
        ctx.save_for_backward(cos, sin)
        ctx.pairing = pairing
        return _rotate(x, cos, sin, False, None, pairing)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, True, None, ctx.pairing), None, None, None


class _QKVRope(torch.autograd.Function):
    """``c_attn``'s output ``(B, T, 3, nh, hd)`` -> rotated q, rotated k and v, each a
    contiguous ``(B, nh, T, hd)`` (the layout SDPA's kernels use), in one autograd node.
    The backward writes the three gradients straight into one ``(B, T, 3, nh, hd)``
    tensor, so there is no split/stack/cat of gradients and no strided gradient reaches
    ``c_attn``'s matmuls. cos/sin are ``(T, 1, 1, hd/2)``. Either pairing (the halves
    default's path until 2026-12-06; interleaved where the complex multiply of
    :class:`_QKVRopePairs` does not apply: bfloat16/float16)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, pairing="halves"):
        B, T, _, nh, hd = qkv.shape
        out = torch.empty(3, B, nh, T, hd, dtype=qkv.dtype, device=qkv.device)
        view = out.permute(1, 3, 0, 2, 4)  # (B, T, 3, nh, hd) view of out
        _rotate(qkv[:, :, :2], cos, sin, False, view[:, :, :2], pairing)
        view[:, :, 2].copy_(qkv[:, :, 2])
        ctx.save_for_backward(cos, sin)
        ctx.pairing = pairing
        return out[0], out[1], out[2]

    @staticmethod
    def backward(ctx, gq, gk, gv):
        cos, sin = ctx.saved_tensors
        B, nh, T, hd = gv.shape
        grad = torch.empty(B, T, 3, nh, hd, dtype=gv.dtype, device=gv.device)
        gqk = torch.stack((gq, gk), dim=1).permute(0, 3, 1, 2, 4)  # (B, T, 2, nh, hd)
        _rotate(gqk, cos, sin, True, grad[:, :, :2], ctx.pairing)
        grad[:, :, 2].copy_(gv.transpose(1, 2))
        return grad, None, None, None


def _complex_pairs(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(..., d)`` as a complex view ``(..., d/2)``: element pairs ``(2i, 2i+1)``."""
    return torch.view_as_complex(x.view(*x.shape[:-1], x.shape[-1] // 2, 2))


def _pairable(x: torch.Tensor) -> bool:
    """Whether :func:`_complex_pairs` can view ``x`` without a copy."""
    return (
        x.stride(-1) == 1
        and x.storage_offset() % 2 == 0
        and all(s % 2 == 0 for s in x.stride()[:-1])
    )


def _complex_fast(x: torch.Tensor) -> bool:
    """The interleaved rotation as one complex multiply: eager, float32/float64 (complex
    numbers have no bfloat16 form; under ``torch.compile`` the real form is fused)."""
    return x.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling()


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The interleaved rotation in real arithmetic (low precision, ``torch.compile``)."""
    xs = x.unflatten(-1, (x.shape[-1] // 2, 2))
    x0, x1 = xs[..., 0], xs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


#: the complex dtype the interleaved rotation multiplies in, per real dtype
_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def rope_cis(cos: torch.Tensor, sin: torch.Tensor, n_head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos + j sin`` ``(T, 2, n_head, d/2)`` and its conjugate ``(T, n_head, d/2)`` (what
    the backward multiplies one gradient by), complex and contiguous, for
    :class:`_QKVRopePairs` from ``cos``/``sin`` ``(T, d/2)``. Expanded over queries/keys
    and heads (not broadcast) so that the complex multiply runs over whole rows of
    ``C`` elements instead of ``d/2`` at a time (2x faster on CPU at ``d`` = 32); shared
    by the layers, and kept by :class:`GPT` while the positions stay the same."""
    T, h = cos.shape
    cis = torch.complex(cos, sin)[:, None, None].expand(T, 2, n_head, h).contiguous()
    return cis, cis[:, 0].conj().resolve_conj()


class _QKVRopePairs(torch.autograd.Function):
    """Interleaved RoPE on ``c_attn``'s output ``(B, T, 3, nh, hd)`` in one autograd node:
    queries and keys rotated **in place** by one complex multiply, q, k and v returned as
    ``(B, nh, T, hd)`` views of it (the layout nanoGPT hands SDPA: no new buffer, no
    copy). The backward rotates the q/k gradients by the conjugate straight into one
    ``(B, T, 3, nh, hd)`` gradient (the rotation is orthogonal; SDPA's CPU gradients come
    as ``(B, T, nh, hd)`` rows, so the multiply reads and writes whole rows), which is
    the one copy nanoGPT's ``split`` backward makes anyway. ``cis``/``cis_conj`` from
    :func:`rope_cis`.

    In place is safe here because nothing keeps ``c_attn``'s output: its backward needs
    the input and the weight only, forward hooks on ``c_attn`` ran before the rotation,
    and anything that saved the output for a backward of its own fails loudly (autograd's
    version counter) instead of using rotated values. Measured (docs/BENCHMARKS.md,
    ``vs_nanogpt.py --halves``, CPU eager, 1 thread): the default model at 0.948x of
    nanoGPT at 4L/128 and 0.987x at 6L/384, against 0.920x / 0.976x with the halves
    rotation."""

    @staticmethod
    def forward(ctx, qkv, cis, cis_conj):
        qk = _complex_pairs(qkv[:, :, :2])
        torch.mul(qk, cis, out=qk)
        ctx.cis_conj = cis_conj
        return qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)

    @staticmethod
    def backward(ctx, gq, gk, gv):
        conj = ctx.cis_conj  # (T, nh, hd/2): against (B, T, nh, hd/2)
        like = gv if gv is not None else (gq if gq is not None else gk)
        B, nh, T, hd = like.shape
        grad = torch.empty(B, T, 3, nh, hd, dtype=like.dtype, device=like.device)
        for i, g in ((0, gq), (1, gk)):
            if g is None:
                grad[:, :, i].zero_()
                continue
            g = g.transpose(1, 2)  # contiguous from SDPA on CPU (then no copy)
            if not g.is_contiguous():
                g = g.contiguous()
            torch.mul(_complex_pairs(g), conj, out=_complex_pairs(grad[:, :, i]))
        if gv is None:
            grad[:, :, 2].zero_()
        else:
            grad[:, :, 2].copy_(gv.transpose(1, 2))
        return grad, None, None


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairing: str = "interleaved"
) -> torch.Tensor:
    """Rotate pairs of ``x``'s last dim by the angles: ``(x[..., 2i], x[..., 2i+1])``
    (``pairing="interleaved"``) or ``(x[..., i], x[..., i + d/2])`` (``"halves"``, as in
    GPT-NeoX / Llama). ``cos``/``sin`` ``(T, d/2)`` broadcast against ``x``'s trailing
    ``(T, ..., d)`` dims: ``x`` is ``(B, nh, T, d)``, or ``(B, T, 2, nh, d)`` with ``cos``
    ``(T, 1, 1, d/2)`` to rotate queries and keys in one call. Returns a new contiguous
    tensor of ``x``'s dtype.

    Eager mode uses one complex multiply (interleaved, float32/64) or one autograd node
    (:class:`_Rope`, halves); under ``torch.compile`` the plain formula is traced and the
    compiler fuses it."""
    if pairing not in ROPE_PAIRINGS:
        raise ValueError(f"pairing must be one of {', '.join(ROPE_PAIRINGS)}; got {pairing!r}")
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if pairing == "interleaved":
        if _complex_fast(x):
            z = _complex_pairs(x if _pairable(x) else x.contiguous())
            return torch.view_as_real(z * torch.complex(cos, sin)).flatten(-2)
        if torch.compiler.is_compiling():
            return _rotate_pairs(x, cos, sin)
        return _Rope.apply(x, cos, sin, pairing)
    if torch.compiler.is_compiling():
        # the halves as a size-2 dim: out = x * cos + swap(x) * (-sin, sin). Inductor
        # vectorizes this form; the chunk/cat form compiled to CPU kernels about 3x
        # slower (rotation + SDPA fwd+bwd, 6 heads x 64, extra over no rotation)
        xs = x.unflatten(-1, (2, x.shape[-1] // 2))
        out = xs * cos.unsqueeze(-2) + xs.flip(-2) * torch.stack((-sin, sin), dim=-2)
        return out.flatten(-2)
    return _Rope.apply(x, cos, sin)


#: eps as a 0-dim CPU float32 tensor, per value (the eager RMSNorm's addcmul input)
_EPS: dict[float, torch.Tensor] = {}


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm over the last dim for eager CPU, float32: ``x * rstd * w`` with ``rstd =
    1 / sqrt(mean(x^2) + eps)``.

    Forward: one norm reduction and two multiplies; saves only ``x`` (the input, no copy)
    and ``rstd``. Backward: LayerNorm's fused CPU backward, called with a zero mean and
    our ``rstd``, is ``rstd * (g w - mean(g w) - xhat mean(g w xhat))`` and the weight
    gradient ``sum(g xhat)``; RMSNorm's input gradient lacks the ``- mean(g w)`` term, so
    ``rstd * mean(g w)`` (one matrix-vector product) is added back. About half the time of
    the composite ``F.rms_norm``'s autograd graph, which records some ten full-size ops."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        d = x.shape[-1]
        n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        eps_t = _EPS.get(eps)
        if eps_t is None:
            eps_t = _EPS[eps] = torch.tensor(eps, dtype=torch.float32)
        rstd = torch.addcmul(eps_t, n, n, value=1.0 / d).rsqrt_()  # 1 / sqrt(|x|^2 / d + eps)
        ctx.save_for_backward(x, rstd, weight)
        return torch.mul(x, rstd).mul_(weight)

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        d = x.shape[-1]
        # the OpOverload, not the packet: no overload resolution per call (~4 us)
        dx, dweight, _ = torch.ops.aten.native_layer_norm_backward.default(
            grad.contiguous(), x, [d], torch.zeros_like(rstd), rstd, weight, None,
            [True, ctx.needs_input_grad[1], False],
        )
        # rstd * mean(g w), per row; a plain broadcast add (addcmul with two broadcast
        # operands takes a slow path on CPU)
        return dx.add_(torch.mul((grad @ weight).unsqueeze_(-1), rstd), alpha=1.0 / d), dweight, None


class RMSNorm(nn.RMSNorm):
    """:class:`torch.nn.RMSNorm` (same parameter, same formula) with faster eager CPU
    paths: a float32/64 input goes through the fused C++ kernel (``neuroplastic.ops.native``)
    when it is built, else a float32 one through :class:`_RMSNormFn`; everything else (CUDA,
    other dtypes, ``torch.compile``) calls ``F.rms_norm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        w = self.weight
        if w is not None and w.dtype == x.dtype and len(self.normalized_shape) == 1 and native_usable(x):
            return native_ops().rms_norm(x, w, eps)
        if (
            not torch.compiler.is_compiling()
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and w is not None
            and w.dtype == torch.float32
            and len(self.normalized_shape) == 1
        ):
            return _RMSNormFn.apply(x, w, eps)
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, eps=1e-5)
    return nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias)


class KVCache:
    """Keys and values of past positions for incremental decoding.

    One preallocated tensor each for keys and values, ``(n_layer, B, n_head, max_len,
    head_dim)``, allocated on the first :meth:`update` with that call's batch size,
    dtype and device (so it follows autocast). ``pos`` counts the positions already
    stored; the model advances it once per forward, after all layers have written.
    """

    def __init__(self, n_layer: int, max_len: int):
        self.n_layer = n_layer
        self.max_len = max_len
        self.pos = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` ``(B, nh, T, hd)`` at ``pos`` for ``layer``; return all keys
        and values up to ``pos + T``."""
        B, nh, T, hd = k.shape
        if self.k is None or self.k.shape[1] != B or self.k.dtype != k.dtype:
            if self.pos != 0:
                raise ValueError(
                    "KVCache holds positions for another batch size or dtype; call reset()."
                )
            shape = (self.n_layer, B, nh, self.max_len, hd)
            self.k = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(shape, dtype=v.dtype, device=v.device)
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KVCache is full: {end} positions requested, room for {self.max_len}.")
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        """Forget all positions (the buffers are kept and overwritten)."""
        self.pos = 0


# --------------------------------------------------------------------------- layers


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.dropout = cfg.dropout
        self.rope_pairing = cfg.rope_pairing
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple | None,
        kv_cache: KVCache | None,
        layer: int,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim)
        # split along dim 2 (not a permute first): the backward is then one stack / cat
        # straight into c_attn's (B, T, 3C) layout, no extra copy
        if rope is None:
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each (B, nh, T, hd)
        else:
            # queries and keys rotated in one call. rope: cos/sin (T, hd/2); cis/cis_conj
            # rope_cis's tables or None; native the fused kernels (neuroplastic.ops.native)
            # when the model computes in float32/64 on CPU, eager, else None
            cos, sin, cis, cis_conj, native = rope
            if native is not None and qkv.is_contiguous():
                q, k, v = native.rope_qkv_(qkv, cos, sin, self.rope_pairing == "interleaved")
            elif cis is not None and cis.dtype == _COMPLEX.get(qkv.dtype) and qkv.is_contiguous():
                q, k, v = _QKVRopePairs.apply(qkv, cis, cis_conj)
            elif not torch.compiler.is_compiling():
                cos, sin = (t[:, None, None].to(qkv.dtype) for t in (cos, sin))
                q, k, v = _QKVRope.apply(qkv, cos, sin, self.rope_pairing)
            elif (
                qkv.device.type == "cpu" and qkv.dtype == cos.dtype and qkv.dtype in NATIVE_DTYPES
                and qkv.is_contiguous() and native_for_compile()
            ):
                # torch.compile, CPU: the fused kernel's functional form as one op of the
                # graph (inductor's own code for the rotation cost more; docs/BENCHMARKS.md)
                q, k, v = (t.transpose(1, 2) for t in torch.ops.neuroplastic.rope_qkv.default(
                    qkv, cos, sin, self.rope_pairing == "interleaved"))
            else:  # torch.compile; apply_rope casts cos/sin to qkv's dtype
                qk, v = qkv.split((2, 1), dim=2)
                qk = apply_rope(qk, cos[:, None, None], sin[:, None, None], self.rope_pairing)
                q, k = (t.transpose(1, 2) for t in qk.unbind(2))
                v = v.squeeze(2).transpose(1, 2)
        is_causal = True
        if kv_cache is not None:
            past = kv_cache.pos
            k, v = kv_cache.update(layer, k, v)
            # Queries sit at positions past..past+T-1 and see every key up to their own
            # position. SDPA's is_causal aligns the mask top-left, which is only right
            # when there is no past; a single query sees everything; otherwise an explicit
            # mask (built once per forward by the model) is used.
            is_causal = past == 0 and T > 1
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if is_causal else attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.n_embd)
        self.c_fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, kv_cache, layer, attn_mask):
        x = x + self.attn(self.ln_1(x), rope, kv_cache, layer, attn_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


# --------------------------------------------------------------------------- model


def check_config(cfg: ModelConfig) -> None:
    if cfg.vocab_size <= 0:
        raise UserError(
            f"model.vocab_size must be positive to build a GPT, got {cfg.vocab_size}; "
            "set it from the tokenizer before building the model."
        )
    g = cfg.gpt
    sizes = {"block_size": cfg.block_size, "n_layer": g.n_layer, "n_head": g.n_head, "n_embd": g.n_embd}
    for key, value in sizes.items():
        if value <= 0:
            raise UserError(f"model.{key} must be a positive integer, got {value}.")
    if g.n_embd % g.n_head:
        raise UserError(
            f"model.n_embd ({g.n_embd}) must be divisible by model.n_head ({g.n_head})."
        )
    if g.norm not in ("rmsnorm", "layernorm"):
        raise UserError(f"model.norm must be one of rmsnorm, layernorm; got {g.norm!r}.")
    if g.pos not in ("rope", "learned"):
        raise UserError(f"model.pos must be one of rope, learned; got {g.pos!r}.")
    if g.rope_pairing not in ROPE_PAIRINGS:
        raise UserError(
            f"model.rope_pairing must be one of {', '.join(ROPE_PAIRINGS)}; got {g.rope_pairing!r}."
        )
    if g.pos == "rope" and (g.n_embd // g.n_head) % 2:
        raise UserError(
            f"RoPE needs an even head size, but model.n_embd / model.n_head = "
            f"{g.n_embd // g.n_head}; change model.n_head or use model.pos=learned."
        )
    if not 0 <= g.dropout < 1:
        raise UserError(f"model.dropout must be in [0, 1), got {g.dropout}.")
    if int(g.mlp_ratio * g.n_embd) <= 0:
        raise UserError(f"model.mlp_ratio must be positive, got {g.mlp_ratio}.")


class GPT(LanguageModel):
    """Decoder-only transformer language model.

    ``logits, loss = model(idx, targets)``: ``idx`` and ``targets`` are ``(B, T)`` token
    ids, ``logits`` is ``(B, T, vocab_size)`` and ``loss`` the mean cross-entropy over
    targets that are not ``-100`` (``None`` without targets).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_config(cfg)
        self.config = cfg
        g = cfg.gpt
        self.head_dim = g.n_embd // g.n_head
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, g.n_embd),
                drop=nn.Dropout(g.dropout),
                h=nn.ModuleList(Block(g) for _ in range(g.n_layer)),
                ln_f=make_norm(g),
            )
        )
        if g.pos == "learned":
            self.transformer["wpe"] = nn.Embedding(cfg.block_size, g.n_embd)
        # Tied: the output projection is transformer.wte.weight (no second module, so the
        # state dict has no shared tensors).
        self.lm_head = None if g.tie_weights else nn.Linear(g.n_embd, cfg.vocab_size, bias=False)
        self._cis_cache = None  # (key, rope_cis tables) of the last forward; see _hidden
        if g.pos == "rope":
            # cos/sin of every position, float32, built once (not per forward: under
            # torch.compile, angles computed in the graph were fused into the rotation
            # kernel and recomputed per element). Not persistent: checkpoints are unchanged.
            shape = (cfg.block_size, self.head_dim // 2)
            self.register_buffer("rope_cos", torch.empty(shape), persistent=False)
            self.register_buffer("rope_sin", torch.empty(shape), persistent=False)
        self.init_weights()

    # ------------------------------------------------------------------ init / stats

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02) for linear and embedding weights, zero biases, unit norm
        weights, and residual output projections (``c_proj``) at 0.02 / sqrt(2 n_layer).
        Also (re)computes the RoPE tables (needed after meta-device construction)."""
        gpt2_init_(self, self.config.gpt.n_layer)
        self._cis_cache = None
        if self.config.gpt.pos == "rope":
            pos = torch.arange(self.config.block_size, device=self.rope_cos.device)
            cos, sin = rope_angles(pos, self.head_dim, self.config.gpt.rope_theta)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters. With ``non_embedding`` (nanoGPT's convention) position
        embeddings are left out, and so is the token embedding unless it is tied to the
        output projection (then it does matmul work per token and counts)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer["wpe"].weight.numel()
            if self.lm_head is not None:
                n -= self.transformer["wte"].weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): ``6 N + 12 L H Q T`` with N the
        non-embedding parameters, L layers, H heads, Q head size and T the sequence length
        (``block_size`` by default). PaLM appendix B, as in nanoGPT's ``estimate_mfu``."""
        cfg = self.config
        T = cfg.block_size if seq_len is None else seq_len
        return float(6 * self.num_params(True) + 12 * cfg.gpt.n_layer * cfg.gpt.n_head * self.head_dim * T)

    # ------------------------------------------------------------------ forward

    def _output_weight(self) -> torch.Tensor:
        return self.transformer["wte"].weight if self.lm_head is None else self.lm_head.weight

    def _hidden(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states ``(B, T, C)``."""
        cfg, g = self.config, self.config.gpt
        B, T = idx.shape
        past = 0 if kv_cache is None else kv_cache.pos
        if past + T > cfg.block_size:
            if kv_cache is None:
                raise ValueError(
                    f"Cannot forward a sequence of length {T}: the model's block_size is "
                    f"{cfg.block_size}. Crop the input to the last {cfg.block_size} tokens."
                )
            raise ValueError(
                f"Positions {past}..{past + T - 1} exceed the model's block_size "
                f"{cfg.block_size}; reset the KV cache and recompute on a cropped context."
            )
        x = self.transformer["wte"](idx)
        rope = None
        if g.pos == "learned":
            x = x + self.transformer["wpe"](torch.arange(past, past + T, device=idx.device))
        else:
            # sliced and cast once per forward, to the dtype attention computes in (autocast's)
            dtype = x.dtype
            if torch.is_autocast_enabled(x.device.type):
                dtype = torch.get_autocast_dtype(x.device.type)
            cos, sin = (t[past : past + T].to(dtype) for t in (self.rope_cos, self.rope_sin))
            cis = cis_conj = None
            # the fused kernel (float32/64 CPU, eager) reads cos/sin (T, hd/2) as they are
            native = native_ops() if dtype == x.dtype and native_usable(x) else None
            if native is None and g.rope_pairing == "interleaved" and dtype in _COMPLEX and not torch.compiler.is_compiling():
                # the same tables every training step: kept (one entry) instead of rebuilt
                key = (past, T, dtype, cos.device)
                if self._cis_cache is None or self._cis_cache[0] != key:
                    self._cis_cache = (key, rope_cis(cos, sin, g.n_head))
                cis, cis_conj = self._cis_cache[1]
            rope = (cos, sin, cis, cis_conj, native)
        x = self.transformer["drop"](x)
        attn_mask = None
        if kv_cache is not None and past > 0 and T > 1:
            # query i (absolute position past + i) sees keys 0..past + i
            attn_mask = torch.ones(T, past + T, dtype=torch.bool, device=idx.device).tril(past)
        for i, block in enumerate(self.transformer["h"]):
            x = block(x, rope, kv_cache, i, attn_mask)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.transformer["ln_f"](x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self._hidden(idx, kv_cache)
        logits = F.linear(x, self._output_weight())
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
            )
        return logits, loss

    # ------------------------------------------------------------------ generation

    def new_kv_cache(self) -> KVCache:
        return KVCache(self.config.gpt.n_layer, self.config.block_size)

    @staticmethod
    def _sample(
        logits: torch.Tensor,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Next token ids ``(B, 1)`` from last-position logits ``(B, V)``."""
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits.float() / temperature
        if top_k is not None and top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # drop a token when the tokens before it already reach top_p (the first stays)
            drop = probs.cumsum(dim=-1) - probs > top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue ``idx`` ``(B, T)`` by up to ``max_new_tokens`` tokens; returns
        ``(B, T + new)``.

        ``temperature=0`` is greedy; ``top_k`` / ``top_p`` filter before sampling with
        ``generator``. With ``eos_id``, a row that emitted it keeps emitting it and
        generation stops once every row has. The model is put in eval mode for the call
        and restored afterwards.

        With ``use_cache`` the prompt is run once and each new token is fed alone against
        a :class:`KVCache`. Once the context would pass ``block_size``, the cache is reset
        and the last ``block_size`` tokens are recomputed at every step (the same cropping
        as without a cache), so both paths produce the same tokens.
        """
        block_size = self.config.block_size
        cache = self.new_kv_cache() if use_cache else None

        def next_logits(out: torch.Tensor) -> torch.Tensor:
            if cache is not None and 0 < cache.pos < block_size:
                ctx = out[:, -1:]  # everything before it is cached
            else:
                ctx = out[:, -block_size:]
                if cache is not None:
                    cache.reset()
            return F.linear(self._hidden(ctx, cache)[:, -1], self._output_weight())

        return generate_loop(self, idx, max_new_tokens, next_logits, temperature, top_k, top_p,
                             eos_id, generator)


@torch.no_grad()
def gpt2_init_(model: nn.Module, n_layer: int) -> None:
    """GPT-2 init in place: N(0, 0.02) for linear and embedding weights, zero biases, unit
    norm weights, residual output projections (``c_proj``) at 0.02 / sqrt(2 n_layer)."""
    proj_std = 0.02 / math.sqrt(2 * n_layer)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            std = proj_std if name.endswith("c_proj") else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm | nn.RMSNorm):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


@torch.no_grad()
def generate_loop(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    next_logits,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The sampling loop every model's ``generate`` shares.

    ``next_logits(out)`` returns the ``(B, V)`` logits of the next token after the
    sequence ``out`` so far (each model keeps its own cache in that closure). The model
    is in eval mode during the loop; rows that emitted ``eos_id`` keep emitting it, and
    the loop stops once every row has.
    """
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"generate() needs a (B, T) prompt with T >= 1, got {tuple(idx.shape)}.")
    was_training = model.training
    model.eval()
    try:
        finished = None
        if eos_id is not None:
            finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        out = idx
        for _ in range(max_new_tokens):
            nxt = GPT._sample(next_logits(out), temperature, top_k, top_p, generator)
            if finished is not None:
                nxt = nxt.masked_fill(finished.unsqueeze(1), eos_id)
                finished = finished | (nxt.squeeze(1) == eos_id)
            out = torch.cat((out, nxt), dim=1)
            if finished is not None and bool(finished.all()):
                break
        return out
    finally:
        model.train(was_training)
