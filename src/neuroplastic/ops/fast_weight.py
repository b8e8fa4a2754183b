"""Fast-weight (linear-attention) memory: the recurrences and their chunk-parallel forms.

Pure tensor numerics, no ``nn.Module``. Per batch element and head the memory is a
matrix ``M`` of shape (dk, dv) updated once per step ``t``:

* **Hebbian** (decayed linear attention)::

      M_t = lambda_t * M_{t-1} + k_t v_t^T
      o_t = q_t^T M_t                      # the step's own write is included

* **Delta rule** (the *gated* delta rule of arXiv 2412.06464; plain DeltaNet,
  arXiv 2406.06484, when ``log_decay`` is None): the memory is first decayed, then
  corrected towards ``v_t`` at key ``k_t`` with strength ``beta_t``::

      M'  = lambda_t * M_{t-1}
      M_t = M' + beta_t k_t (v_t - M'^T k_t)^T
          = lambda_t (I - beta_t k_t k_t^T) M_{t-1} + beta_t k_t v_t^T
      o_t = q_t^T M_t

  i.e. the prediction that is corrected is the one read from the *decayed* memory,
  ``lambda_t M_{t-1}^T k_t``. Recurrent and chunked forms use exactly this ordering.
  The update is a contraction when ``||k_t|| <= 1`` and ``0 < beta_t < 1`` (use
  ``feature_map(k, "identity_l2")``); with larger keys the memory can grow without bound.

Shapes: ``q, k`` (B, H, T, dk); ``v`` (B, H, T, dv); ``log_decay`` (B, H, T) with values
<= 0 (``lambda_t = exp(log_decay_t)``); ``beta`` (B, H, T) in (0, 1); ``initial_state``
and the returned final state (B, H, dk, dv). Every function returns ``(o, final_state)``
with ``o`` of shape (B, H, T, dv).

Precision: whatever the input dtype, everything is computed in float32 inside an
``autocast(enabled=False)`` region (float64 when any input is float64, for tests); the
state is float32 (float64 for float64 inputs). ``o`` comes back in ``v``'s dtype, or in
the autocast dtype when autocast is on at the call. This replaces the seed's fp32 bypass.

Forms:

* ``*_recurrent``: the step-by-step reference (a Python loop over ``t``); also the
  generation path, one step at a time with a carried state.
* ``*_chunked``: chunk-parallel. The sequence is cut into chunks of ``C`` steps
  (padded at the end with zero keys/values and zero log-decay, which leaves the state
  untouched). Within a chunk the output is an attention-like matmul with a causal decay
  mask ``D[i, j] = exp(sum_{l=j+1..i} g_l)`` for ``j <= i``, built from *segment sums*
  (no difference of two large cumulative sums, so no cancellation), plus the entering
  state read through ``exp(sum_{l<=i} g_l)``; chunk states are passed on with
  ``exp(sum_{l>j} g_l)``. Every exponent is a sum of log-decays, hence <= 0: no
  ``exp`` of a positive number anywhere, for any decay. The delta rule uses the
  WY/UT transform: per chunk, ``U = T (diag(beta) V - diag(beta*gamma) K S0)`` with
  ``T = (I + strict_tril(diag(beta) (K K^T * D)))^-1`` obtained by one batched unit
  triangular solve for all chunks; only the cheap ``S0``-dependent part runs in the
  loop over chunks. The only Python loops in the chunked forms are over chunks.
* ``materialized_fast_weight``: the seed's implementation style (materialises all
  states as a (B, T, H, dk, dv) tensor via ``exp(-cumsum)`` rescaling), for benchmarks
  and tests only.

Autograd runs through every form. The recurrent forms, the delta rule's chunked form
and the materialised form are plain torch ops; the Hebbian chunked form is one
``autograd.Function`` with a hand-written backward (tested against the recurrent
reference and ``gradcheck``) that saves only q, k, v, log_decay and the chunk-entry
states and rebuilds the (C, C) products a block of chunks at a time, which makes it
several times leaner in memory than autograd through the same ops. It is
differentiable once (no double backward).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from neuroplastic.errors import UserError

__all__ = [
    "FEATURE_MAPS",
    "delta_rule_chunked",
    "delta_rule_recurrent",
    "fast_weight",
    "fast_weight_chunked",
    "fast_weight_recurrent",
    "feature_map",
    "materialized_fast_weight",
]

FEATURE_MAPS = ("identity_l2", "elu1", "seed")


# --------------------------------------------------------------------------- feature maps


def feature_map(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Map queries or keys over their last dimension.

    * ``"identity_l2"``: ``x / ||x||_2`` (unit norm; the right choice for the delta rule).
    * ``"elu1"``: ``ELU(x) + 1``, computed as ``x + 1`` for ``x > 0`` and ``exp(x)``
      otherwise (the same function, but strictly positive down to ``x`` ~ -87 in
      float32, where ``ELU(x) + 1`` already rounds to 0 below ``x`` ~ -17).
    * ``"seed"``: the seed AGIFORMER's map (inkbytefo/agi-former, ``src/models/memory.py``):
      ``ELU(x) + 1`` on both q and k with the
      seed's ``1/sqrt(d)`` query scale. The seed divided its read-out by a normaliser
      ``q . sum(k)``, which cancelled that scale; this memory has no normaliser, so the
      scale matters, and since one function maps both q and k here it is applied to
      both: ``(ELU(x) + 1) / sqrt(d)``. Scores ``q . k`` then stay O(1) for unit-scale
      inputs instead of O(d).
    """
    if kind == "identity_l2":
        return F.normalize(x, p=2.0, dim=-1, eps=1e-6)
    if kind in ("elu1", "seed"):
        y = torch.where(x > 0, x + 1.0, torch.exp(torch.clamp(x, max=0.0)))
        if kind == "seed":
            y = y * (1.0 / math.sqrt(x.shape[-1]))
        return y
    raise UserError(f"feature_map kind must be one of {', '.join(FEATURE_MAPS)}; got {kind!r}.")


# --------------------------------------------------------------------------- helpers


class _Prec:
    """The fp32 (or fp64) region: autocast off, inputs cast, output dtype remembered."""

    def __init__(self, tensors: Sequence[torch.Tensor | None], v: torch.Tensor):
        present = [t for t in tensors if t is not None]
        self.dtype = (
            torch.float64 if any(t.dtype == torch.float64 for t in present) else torch.float32
        )
        dev = v.device.type
        out = v.dtype
        if out != torch.float64 and torch.is_autocast_enabled(dev):
            out = torch.get_autocast_dtype(dev)
        self.out_dtype = out
        self._ctx = torch.autocast(device_type=dev, enabled=False)

    def __enter__(self) -> _Prec:
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)

    def cast(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(self.dtype)


def _check(name, q, k, v, log_decay, beta=None, initial_state=None, *, need_beta=False):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise UserError(
            f"{name}: q, k, v must be 4-D (B, H, T, d); got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}."
        )
    if q.shape != k.shape:
        raise UserError(
            f"{name}: q and k must have the same shape (B, H, T, dk); got "
            f"{tuple(q.shape)} and {tuple(k.shape)}."
        )
    B, H, T, dk = q.shape
    if v.shape[:3] != (B, H, T):
        raise UserError(
            f"{name}: v must be (B, H, T, dv) = ({B}, {H}, {T}, dv); got {tuple(v.shape)}."
        )
    for label, t in (("log_decay", log_decay), ("beta", beta)):
        if t is not None and t.shape != (B, H, T):
            raise UserError(
                f"{name}: {label} must be (B, H, T) = ({B}, {H}, {T}); got {tuple(t.shape)}."
            )
    if need_beta and beta is None:
        raise UserError(f"{name}: the delta rule needs beta of shape (B, H, T); got None.")
    if initial_state is not None and initial_state.shape != (B, H, dk, v.shape[-1]):
        raise UserError(
            f"{name}: initial_state must be (B, H, dk, dv) = ({B}, {H}, {dk}, {v.shape[-1]}); "
            f"got {tuple(initial_state.shape)}."
        )


def _tri(C: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """0/1 matrices ``strict[i, j] = i > j`` and ``lower[i, j] = i >= j``."""
    idx = torch.arange(C, device=device)
    return (
        (idx[:, None] > idx[None, :]).to(dtype),
        (idx[:, None] >= idx[None, :]).to(dtype),
    )


def _decay_matrix(g: torch.Tensor) -> torch.Tensor:
    """Causal decay mask ``D[..., i, j] = exp(sum_{l=j+1..i} g_l)`` for ``j <= i``, else 0.

    Each exponent is a *segment sum* of the log-decays it spans (<= 0), built by a
    cumulative sum over a masked copy, never a difference of two large prefix sums
    (whose rounding error, ~eps * |prefix|, would become a relative error of the
    decay). Masks are products with 0/1 matrices (much faster on CPU than
    ``masked_fill``); the upper triangle is zeroed after ``exp``, whose argument is 0
    there, so no ``exp`` of a positive number and no ``-inf`` either. Differentiable.
    """
    strict, lower = _tri(g.shape[-1], g.dtype, g.device)
    return (g.unsqueeze(-1) * strict).cumsum(dim=-2).exp() * lower


@torch.no_grad()
def _decay_mask(g: torch.Tensor) -> torch.Tensor:
    """:func:`_decay_matrix` in one buffer (in-place steps), without autograd."""
    strict, lower = _tri(g.shape[-1], g.dtype, g.device)
    d = g.unsqueeze(-1) * strict  # d[..., l, j] = g_l for l > j
    d.cumsum_(dim=-2)  # d[..., i, j] = sum_{j < l <= i} g_l, 0 above the diagonal
    return d.exp_().mul_(lower)


def _suffix_sums(g: torch.Tensor) -> torch.Tensor:
    """``out[..., j] = sum_{l > j} g[..., l]`` (exclusive, 0 at the end), summed directly."""
    r = g.flip(-1).cumsum(-1).flip(-1)  # sum_{l >= j}
    return F.pad(r[..., 1:], (0, 1))


def _suffix_incl(x: torch.Tensor) -> torch.Tensor:
    """``out[..., i] = sum_{l >= i} x[..., l]``."""
    return x.flip(-1).cumsum(-1).flip(-1)


def _prefix_excl(x: torch.Tensor) -> torch.Tensor:
    """``out[..., i] = sum_{l < i} x[..., l]``."""
    return F.pad(x[..., :-1], (1, 0)).cumsum(-1)


# chunks per block of the (C, C) work: bounds the temporaries to ~2**18 elements each
_BLOCK_ELEMENTS = 1 << 18


def _blocks(q: torch.Tensor):
    B, H, N, C, _ = q.shape
    step = max(1, _BLOCK_ELEMENTS // max(1, B * H * C * C))
    return [(n, min(N, n + step)) for n in range(0, N, step)]


# up to this many chunks the chunk states are passed on by one (N, N) matmul, beyond it
# by a loop over chunks (the matmul costs N^2 dk dv, the loop N dk dv in N small steps)
_PASS_MATMUL_CHUNKS = 64


def _pass_states(contrib: torch.Tensor, a: torch.Tensor, la: torch.Tensor, s0: torch.Tensor):
    """Chunk-entry states ``prev[n]`` and the final state of ``S_n = a_n S_{n-1} +
    contrib_n`` from ``S_{-1} = s0``; contrib ``(B, H, N, dk, dv)``, a ``(B, H, N, 1, 1)``
    and ``la = log a`` ``(B, H, N)`` (the chunk's summed log-decays: finite even where
    ``a`` underflows to 0).

    For ``N <= _PASS_MATMUL_CHUNKS``: all states at once, ``S = E @ contrib + G s0`` with
    ``E[i, m] = prod_{m < l <= i} a_l`` (a causal decay matrix built from segment sums of
    ``log a``, as within a chunk) and ``G_i = prod_{l <= i} a_l``; no loop."""
    B, H, N, dk, dv = contrib.shape
    if N > _PASS_MATMUL_CHUNKS:
        prev = torch.empty_like(contrib)
        S = s0
        for n in range(N):
            prev[:, :, n] = S
            S = torch.addcmul(contrib[:, :, n], a[:, :, n], S)
        return prev, S
    E = _decay_mask(la)
    G = la.cumsum(-1).exp()
    S_all = (E @ contrib.reshape(B, H, N, dk * dv)).reshape(B, H, N, dk, dv)
    S_all.add_(G[..., None, None] * s0.unsqueeze(2))
    prev = torch.cat((s0.unsqueeze(2), S_all[:, :, :-1]), dim=2)
    return prev, S_all[:, :, -1]


def _pass_states_backward(
    dprev: torch.Tensor, ds: torch.Tensor, prev: torch.Tensor, a: torch.Tensor, la: torch.Tensor
):
    """Gradients of :func:`_pass_states`: ``(dcontrib, dlog_a (B, H, N), ds0)`` from the
    gradients of the chunk-entry states and of the final state."""
    B, H, N, dk, dv = prev.shape
    if N > _PASS_MATMUL_CHUNKS:
        dcontrib = torch.empty_like(prev)
        da = torch.empty_like(a)
        for n in range(N - 1, -1, -1):
            dcontrib[:, :, n] = ds
            da[:, :, n] = (ds * prev[:, :, n]).sum((-1, -2), keepdim=True)
            ds = torch.addcmul(dprev[:, :, n], a[:, :, n], ds)
        return dcontrib, (da * a)[..., 0, 0], ds
    # d S_all[i] = dprev[i + 1] (i < N - 1), ds (i = N - 1); the gradient reaching state
    # S_m in full is sum_i E_im dS_i (= dcontrib_m, as in the loop); S_m = a_m S_{m-1} + ...
    dS = torch.cat((dprev[:, :, 1:], ds.unsqueeze(2)), dim=2).reshape(B, H, N, dk * dv)
    E = _decay_mask(la)
    dcontrib = (E.transpose(-1, -2) @ dS).reshape(B, H, N, dk, dv)
    dlog_a = a[..., 0, 0] * (dcontrib * prev).sum((-1, -2))
    ds0 = torch.addcmul(dprev[:, :, 0], a[:, :, 0], dcontrib[:, :, 0])
    return dcontrib, dlog_a, ds0


class _HebbianChunked(torch.autograd.Function):
    """Chunk-parallel Hebbian memory with a hand-written backward.

    Inputs are chunked: q, k (B, H, N, C, dk), v (B, H, N, C, dv), g (B, H, N, C), s0
    (B, H, dk, dv). Forward: per chunk ``o = gamma * (Q S_prev) + ((Q K^T) * D) V``;
    ``S_next = a * S_prev + (K * tail)^T V`` with ``gamma_i = exp(sum_{l<=i} g_l)``,
    ``tail_j = exp(sum_{l>j} g_l)``, ``a = gamma_C``, ``D`` the causal decay mask. Only
    q, k, v, g and the N chunk-entry states are saved; the (C, C) products are rebuilt
    in the backward, a block of chunks at a time, so no (C, C) tensor lives between
    forward and backward (plain autograd kept three per chunk).

    Log-decay gradient: every factor is ``exp`` of a prefix, suffix or segment sum of g,
    so ``dg`` collects ``d(log factor) = d(factor) * factor`` through the matching
    cumulative sums; for the mask, ``R = dP * P`` gives ``dg_l = sum_{i >= l > j} R_ij``,
    computed as the suffix sum of (row sum - column sum) of ``R``.
    """

    @staticmethod
    def forward(ctx, q, k, v, g, s0):
        B, H, N, C, dk = q.shape
        gamma = g.cumsum(-1).exp()
        tail = _suffix_sums(g).exp()
        a = gamma[..., -1:].unsqueeze(-1)  # (B, H, N, 1, 1)
        contrib = (k * tail.unsqueeze(-1)).transpose(-1, -2) @ v  # (B, H, N, dk, dv)
        prev, S = _pass_states(contrib, a, g.sum(-1), s0)
        o = (q * gamma.unsqueeze(-1)) @ prev
        for n0, n1 in _blocks(q):
            sl = slice(n0, n1)
            p = (q[:, :, sl] @ k[:, :, sl].transpose(-1, -2)).mul_(_decay_mask(g[:, :, sl]))
            o[:, :, sl] += p @ v[:, :, sl]
        ctx.save_for_backward(q, k, v, g, prev)
        return o, S

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, ds):
        q, k, v, g, prev = ctx.saved_tensors
        gamma = g.cumsum(-1).exp()
        tail = _suffix_sums(g).exp()
        a = gamma[..., -1:].unsqueeze(-1)
        # read-out of the entering state: o += gamma * (q^T S_prev)
        dq = (do @ prev.transpose(-1, -2)).mul_(gamma.unsqueeze(-1))
        dlog_gamma = (dq * q).sum(-1)  # d(gamma_i) * gamma_i
        dprev = (q * gamma.unsqueeze(-1)).transpose(-1, -2) @ do
        # state passing, backwards over chunks
        dcontrib, dlog_a, ds = _pass_states_backward(dprev, ds, prev, a, g.sum(-1))
        dlog_gamma[..., -1] += dlog_a  # a = gamma_C
        del dprev, dlog_a
        # each chunk's writes: contrib = (k * tail)^T v
        kt = k * tail.unsqueeze(-1)
        dkt = v @ dcontrib.transpose(-1, -2)  # (B, H, N, C, dk)
        dv = kt @ dcontrib
        dlog_tail = (dkt * kt).sum(-1)
        del kt, dcontrib
        dk = dkt.mul_(tail.unsqueeze(-1))
        # intra-chunk attention, a block of chunks at a time
        for n0, n1 in _blocks(q):
            sl = slice(n0, n1)
            qb, kb, vb, dob = q[:, :, sl], k[:, :, sl], v[:, :, sl], do[:, :, sl]
            d = _decay_mask(g[:, :, sl])
            p = (qb @ kb.transpose(-1, -2)).mul_(d)
            dv[:, :, sl] += p.transpose(-1, -2) @ dob
            dp = dob @ vb.transpose(-1, -2)
            r = p.mul_(dp)  # dP * P
            dsc = dp.mul_(d)  # gradient of Q K^T
            del d
            dq[:, :, sl] += dsc @ kb
            dk[:, :, sl] += dsc.transpose(-1, -2) @ qb
            dlog_gamma[:, :, sl] += r.sum(-1) - r.sum(-2)  # D_ij = exp(b_i - b_j)
        dg = _suffix_incl(dlog_gamma) + _prefix_excl(dlog_tail)
        return dq, dk, dv, dg, ds


def _zero_state(q: torch.Tensor, dv: int, dtype: torch.dtype) -> torch.Tensor:
    B, H, _, dk = q.shape
    return torch.zeros(B, H, dk, dv, dtype=dtype, device=q.device)


# --------------------------------------------------------------------------- recurrent


def fast_weight_recurrent(q, k, v, log_decay, initial_state=None):
    """Hebbian memory, step by step (the reference; also generation with a carried state).

    ``log_decay`` may be None (lambda = 1). Returns ``(o, final_state)``.
    """
    _check("fast_weight_recurrent", q, k, v, log_decay, None, initial_state)
    dv = v.shape[-1]
    with _Prec((q, k, v, log_decay, initial_state), v) as p:
        q, k, v, g, S = (p.cast(t) for t in (q, k, v, log_decay, initial_state))
        S = _zero_state(q, dv, p.dtype) if S is None else S
        lam = None if g is None else g.exp()
        outs = []
        for t in range(q.shape[2]):
            kv = k[:, :, t, :, None] * v[:, :, t, None, :]
            S = kv + (S if lam is None else lam[:, :, t, None, None] * S)
            outs.append((q[:, :, t, None, :] @ S).squeeze(-2))
        o = torch.stack(outs, dim=2) if outs else v.new_zeros(v.shape)
    return o.to(p.out_dtype), S


def delta_rule_recurrent(q, k, v, beta, log_decay=None, initial_state=None):
    """(Gated) delta rule, step by step: ``M' = lambda_t M``; ``M += beta_t k_t (v_t - M'^T k_t)^T``."""
    _check("delta_rule_recurrent", q, k, v, log_decay, beta, initial_state, need_beta=True)
    dv = v.shape[-1]
    with _Prec((q, k, v, beta, log_decay, initial_state), v) as p:
        q, k, v, beta, g, S = (p.cast(t) for t in (q, k, v, beta, log_decay, initial_state))
        S = _zero_state(q, dv, p.dtype) if S is None else S
        lam = None if g is None else g.exp()
        outs = []
        for t in range(q.shape[2]):
            if lam is not None:
                S = lam[:, :, t, None, None] * S
            kt = k[:, :, t, None, :]  # (B, H, 1, dk)
            err = v[:, :, t, None, :] - kt @ S  # (B, H, 1, dv)
            S = S + (beta[:, :, t, None, None] * kt).transpose(-1, -2) * err
            outs.append((q[:, :, t, None, :] @ S).squeeze(-2))
        o = torch.stack(outs, dim=2) if outs else v.new_zeros(v.shape)
    return o.to(p.out_dtype), S


# --------------------------------------------------------------------------- chunked


def _chunked(q, k, v, g, beta, S, chunk_size: int):
    """Chunk-parallel Hebbian (``beta is None``) or gated delta rule, in the compute dtype."""
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    if g is None:
        g = q.new_zeros(B, H, T)
    C = max(1, min(int(chunk_size), T))
    N = -(-T // C)
    pad = N * C - T
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g = F.pad(g, (0, pad))
        if beta is not None:
            beta = F.pad(beta, (0, pad))
    q = q.reshape(B, H, N, C, dk)
    k = k.reshape(B, H, N, C, dk)
    v = v.reshape(B, H, N, C, dv)
    g = g.reshape(B, H, N, C)

    if beta is None:
        o, S = _HebbianChunked.apply(q, k, v, g, S)
        return o.reshape(B, H, N * C, dv)[:, :, :T], S

    # gated delta rule (plain autograd). Per chunk, with S the entering state,
    # gamma_i = exp(sum_{l<=i} g_l), D the causal decay mask:
    #   U = W_v - W_k S,  [W_v, W_k] = (I + strict_tril(diag(beta) (K K^T * D)))^-1
    #                                   [diag(beta) V, diag(beta * gamma) K]
    #   o = gamma * (Q S) + ((Q K^T) * D) U,   S_next = gamma_C S + (K * tail)^T U
    beta = beta.reshape(B, H, N, C)
    gamma = g.cumsum(-1).exp()  # exp(sum_{l<=i} g_l): what is left of the entering state
    tail = _suffix_sums(g).exp()  # exp(sum_{l>j} g_l): what of step j reaches the chunk end
    chunk_decay = gamma[..., -1, None, None]  # (B, H, N, 1, 1)
    k_tail = (k * tail.unsqueeze(-1)).transpose(-1, -2)  # (B, H, N, dk, C)
    decay = _decay_matrix(g)  # D[i, j] = exp(sum_{j<l<=i} g_l), 0 above the diagonal
    strict, _ = _tri(C, g.dtype, g.device)
    a = (k @ k.transpose(-1, -2)) * (decay * strict) * beta.unsqueeze(-1)
    rhs = torch.cat((v * beta.unsqueeze(-1), k * (beta * gamma).unsqueeze(-1)), dim=-1)
    w = torch.linalg.solve_triangular(a, rhs, upper=False, unitriangular=True)
    w_v, w_k = w.split((dv, dk), dim=-1)
    states, us = [], []
    for n in range(N):
        states.append(S)
        u_n = w_v[:, :, n] - w_k[:, :, n] @ S  # pseudo-values, (B, H, C, dv)
        us.append(u_n)
        S = chunk_decay[:, :, n] * S + k_tail[:, :, n] @ u_n
    prev = torch.stack(states, dim=2)  # (B, H, N, dk, dv): state entering each chunk
    u = torch.stack(us, dim=2)
    o = (q * gamma.unsqueeze(-1)) @ prev + ((q @ k.transpose(-1, -2)) * decay) @ u
    return o.reshape(B, H, N * C, dv)[:, :, :T], S


def fast_weight_chunked(q, k, v, log_decay, chunk_size=64, initial_state=None):
    """Hebbian memory, chunk-parallel; equal to :func:`fast_weight_recurrent`."""
    _check("fast_weight_chunked", q, k, v, log_decay, None, initial_state)
    _check_chunk(chunk_size)
    with _Prec((q, k, v, log_decay, initial_state), v) as p:
        q, k, v, g, S = (p.cast(t) for t in (q, k, v, log_decay, initial_state))
        S = _zero_state(q, v.shape[-1], p.dtype) if S is None else S
        if q.shape[2] == 0:
            return v.new_zeros(v.shape).to(p.out_dtype), S
        o, S = _chunked(q, k, v, g, None, S, chunk_size)
    return o.to(p.out_dtype), S


def delta_rule_chunked(q, k, v, beta, log_decay=None, chunk_size=64, initial_state=None):
    """(Gated) delta rule, chunk-parallel (WY/UT transform); equal to :func:`delta_rule_recurrent`."""
    _check("delta_rule_chunked", q, k, v, log_decay, beta, initial_state, need_beta=True)
    _check_chunk(chunk_size)
    with _Prec((q, k, v, beta, log_decay, initial_state), v) as p:
        q, k, v, beta, g, S = (p.cast(t) for t in (q, k, v, beta, log_decay, initial_state))
        S = _zero_state(q, v.shape[-1], p.dtype) if S is None else S
        if q.shape[2] == 0:
            return v.new_zeros(v.shape).to(p.out_dtype), S
        o, S = _chunked(q, k, v, g, beta, S, chunk_size)
    return o.to(p.out_dtype), S


def _check_chunk(chunk_size) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise UserError(f"chunk_size must be a positive integer; got {chunk_size!r}.")


# --------------------------------------------------------------------------- dispatcher


def fast_weight(
    q,
    k,
    v,
    log_decay,
    *,
    rule: str = "hebbian",
    beta=None,
    mode: str = "chunked",
    chunk_size: int = 64,
    initial_state=None,
    backend: str = "auto",
):
    """Run the memory: ``rule`` ``"hebbian"`` or ``"delta"``; ``mode`` ``"chunked"`` or ``"recurrent"``.

    ``backend`` (chunked mode): ``"auto"`` runs flash-linear-attention's Triton kernels
    (:mod:`neuroplastic.ops.fla_backend`) when the tensors are on CUDA and ``fla`` is
    installed, else the torch forms of this module; ``"torch"`` always the torch forms;
    ``"fla"`` requires fla (a :class:`UserError` where it cannot run)."""
    if mode not in ("chunked", "recurrent"):
        raise UserError(f"fast_weight mode must be 'chunked' or 'recurrent'; got {mode!r}.")
    if backend not in ("auto", "torch", "fla"):
        raise UserError(f"fast_weight backend must be 'auto', 'torch' or 'fla'; got {backend!r}.")
    if mode == "chunked" and backend != "torch" and rule in ("hebbian", "delta"):
        from neuroplastic.ops import fla_backend

        if fla_backend.fla_usable(q, v) and q.shape[2] > 0:
            if rule == "hebbian":
                _check("fast_weight", q, k, v, log_decay, None, initial_state)
                return fla_backend.fla_hebbian(q, k, v, log_decay, initial_state)
            _check("fast_weight", q, k, v, log_decay, beta, initial_state, need_beta=True)
            return fla_backend.fla_delta_rule(q, k, v, beta, log_decay, initial_state)
        if backend == "fla":
            raise UserError(
                "fast_weight backend 'fla' needs CUDA tensors (not float64, head size <= 256) "
                "and flash-linear-attention installed (pip install 'neuroplastic[cuda]'); "
                "use backend='auto' to fall back to the torch forms."
            )
    if rule == "hebbian":
        if mode == "chunked":
            return fast_weight_chunked(q, k, v, log_decay, chunk_size, initial_state)
        return fast_weight_recurrent(q, k, v, log_decay, initial_state)
    if rule == "delta":
        if mode == "chunked":
            return delta_rule_chunked(q, k, v, beta, log_decay, chunk_size, initial_state)
        return delta_rule_recurrent(q, k, v, beta, log_decay, initial_state)
    raise UserError(f"fast_weight rule must be 'hebbian' or 'delta'; got {rule!r}.")


# --------------------------------------------------------------------------- seed style


def materialized_fast_weight(q, k, v, log_decay):
    """The seed's implementation style, for benchmarks and tests only.

    Materialises every state as one (B, T, H, dk, dv) tensor: keys are scaled by
    ``exp(-cumsum(log_decay))``, outer products summed with ``cumsum`` over time, and
    queries scaled by ``exp(+cumsum)``. Exact in exact arithmetic but it exponentiates
    positive numbers: it overflows (inf/NaN) once the total log-decay over the sequence
    falls below about -88 in float32 (the seed clamped at +-50 and was then wrong), and
    it needs O(T d^2) memory. Returns ``(o, final_state)`` like the other forms.
    """
    _check("materialized_fast_weight", q, k, v, log_decay)
    with _Prec((q, k, v, log_decay), v) as p:
        q, k, v, g = (p.cast(t) for t in (q, k, v, log_decay))
        cum = g.cumsum(-1).unsqueeze(-1)  # (B, H, T, 1)
        kv = torch.einsum("bhte,bhtf->bthef", k * torch.exp(-cum), v)  # (B, T, H, dk, dv)
        states = kv.cumsum(dim=1)
        o = torch.einsum("bhte,bthef->bhtf", q * torch.exp(cum), states)
        final = states[:, -1] * torch.exp(cum[:, :, -1:, :])
    return o.to(p.out_dtype), final
