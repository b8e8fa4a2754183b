"""The fast-weight memory on flash-linear-attention's Triton kernels (CUDA only).

``flash-linear-attention`` (``pip install neuroplastic[cuda]``; import name ``fla``) has
chunked Triton kernels for exactly our two rules:

* ``fla.ops.simple_gla.chunk_simple_gla`` with ``scale=1``: ``S_t = exp(g_t) S_{t-1} +
  k_t v_t^T``, ``o_t = q_t^T S_t`` (head-wise scalar gate in log space, the step's own
  write included) = our Hebbian memory;
* ``fla.ops.gated_delta_rule.chunk_gated_delta_rule`` with ``scale=1`` and no in-kernel
  l2 norm or sigmoid: ``S' = exp(g_t) S_{t-1}``, ``S_t = S' + beta_t k_t (v_t - S'^T
  k_t)^T``, ``o_t = q_t^T S_t`` = our gated delta rule (``g = 0`` for plain DeltaNet).

fla takes ``(B, T, H, d)`` tensors and ``(B, T, H)`` gates; ours are ``(B, H, T, d)`` and
``(B, H, T)``, so the wrappers transpose (fla makes its inputs contiguous). q, k, v and
beta run in one compute dtype (bf16 under autocast, else v's dtype), the log-decays in
float32; states are float32 (fla accumulates in float32), outputs in the compute dtype.
fla's kernels are differentiable in q, k, v, gates, beta and the initial state. fla picks
its own chunk length (64); ``chunk_size`` of the torch forms does not apply (it changes
only the arithmetic's grouping, not the result). Checked on CPU against fla's own pure-torch
references (``naive_chunk_simple_gla``, ``naive_recurrent_gated_delta_rule``): same outputs
and states as our recurrent forms; on CUDA the tests compare the kernels themselves.

:func:`fla_usable` says whether a call can go to fla: CUDA tensors, fla importable, not
float64 (the tests' precision), head sizes <= 256 (fla's limit), and the environment
variable ``NEUROPLASTIC_NO_FLA`` unset.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["fla_available", "fla_delta_rule", "fla_hebbian", "fla_usable"]


@functools.cache
def fla_available() -> bool:
    """True when flash-linear-attention's two kernels import."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: F401
        from fla.ops.simple_gla import chunk_simple_gla  # noqa: F401
    except Exception:  # ImportError, or a Triton/driver problem at import
        return False
    return True


def fla_usable(q: torch.Tensor, v: torch.Tensor) -> bool:
    return (
        q.is_cuda
        and q.dtype != torch.float64
        and v.dtype != torch.float64
        and q.shape[-1] <= 256
        and v.shape[-1] <= 256
        and not os.environ.get("NEUROPLASTIC_NO_FLA")
        and fla_available()
    )


def _compute_dtype(v: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(v.device.type):
        return torch.get_autocast_dtype(v.device.type)
    return v.dtype


def _to_fla(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.transpose(1, 2).to(dtype)  # (B, H, T, ...) -> (B, T, H, ...)


def _state(initial_state, q, dv) -> torch.Tensor:
    if initial_state is not None:
        return initial_state.float()
    B, H, _, dk = q.shape
    return torch.zeros(B, H, dk, dv, dtype=torch.float32, device=q.device)


def fla_hebbian(q, k, v, log_decay, initial_state=None):
    """Our Hebbian memory (``(B, H, T, d)`` layout) through ``chunk_simple_gla``; returns
    ``(o, final_state)`` like :func:`neuroplastic.ops.fast_weight.fast_weight_chunked`."""
    from fla.ops.simple_gla import chunk_simple_gla

    dt = _compute_dtype(v)
    B, H, T, _ = q.shape
    g = log_decay if log_decay is not None else q.new_zeros(B, H, T)
    with torch.autocast(q.device.type, enabled=False):
        o, S = chunk_simple_gla(
            _to_fla(q, dt), _to_fla(k, dt), _to_fla(v, dt), g=_to_fla(g, torch.float32),
            scale=1.0, initial_state=_state(initial_state, q, v.shape[-1]),
            output_final_state=True,
        )
    return o.transpose(1, 2), S.float()


def fla_delta_rule(q, k, v, beta, log_decay=None, initial_state=None):
    """Our (gated) delta rule through ``chunk_gated_delta_rule``; returns ``(o,
    final_state)`` like :func:`neuroplastic.ops.fast_weight.delta_rule_chunked`."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    dt = _compute_dtype(v)
    B, H, T, _ = q.shape
    g = log_decay if log_decay is not None else q.new_zeros(B, H, T)
    with torch.autocast(q.device.type, enabled=False):
        o, S = chunk_gated_delta_rule(
            _to_fla(q, dt), _to_fla(k, dt), _to_fla(v, dt), _to_fla(g, torch.float32),
            _to_fla(beta, dt), scale=1.0, initial_state=_state(initial_state, q, v.shape[-1]),
            output_final_state=True, use_qk_l2norm_in_kernel=False,
        )
    return o.transpose(1, 2), S.float()
