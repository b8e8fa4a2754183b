"""Traces: gradient traces + momentum + optional low-rank term, modulated by reward.

The plasticity rule of the seed ``neuroplastic-llm`` system, on any ``nn.Module``.

Per selected parameter ``theta`` with gradient ``g`` (all buffers in fp32, whatever the
parameter dtype)::

    after_backward:  trace    <- gamma * trace    + (1 - gamma) * g
                     momentum <- m     * momentum + (1 - m)     * trace
    after_step(r):   theta    <- theta + sign * eta_p * (r * s * momentum + c_r * coef * U @ V)

with ``r`` the reward *advantage* the engine passes (reward minus its running baseline;
``None`` -> no update this step, the traces still accumulate), ``s`` = ``scale``,
``eta_p`` = ``plasticity_lr``, ``coef`` = ``low_rank_coef`` and the ``U @ V`` term only
for 2-D weights when ``low_rank`` is on. ``c_r`` is ``r`` when ``low_rank_modulated``
(default) and 1 otherwise.

Direction (``direction``)
-------------------------
``momentum`` is a smoothed *gradient*, so it points up the loss. The seed wrote
``theta <- theta + eta_p * r * s * momentum`` (``direction="seed"``, ``sign = +1``): with a
positive advantage that moves the weights *up* the loss gradient, i.e. it undoes the
optimizer exactly when things are going well. The default ``direction="descent"``
(``sign = -1``) is the three-factor reading that makes sense: ``-momentum`` is the
recent descent direction (the eligibility of each weight), and the advantage
modulates it: a positive advantage (reward above its trend) pushes further along the
recent descent direction, a negative one partly reverses it.

Low-rank term (``low_rank``)
----------------------------
``U @ V`` is never random: it is a rank-``k`` factorisation of each 2-D weight's
momentum, ``U`` (``out x k``, orthonormal columns) and ``V = U^T momentum``
(``k x in``), so ``U @ V = U U^T momentum`` is the projection of the momentum on its
dominant left singular subspace -- the best rank-``k`` approximation once ``U`` has
converged. It adds ``coef`` times the dominant directions of the recent gradient
history on top of the full momentum. It is computed only in ``after_step`` when ``r`` is
not ``None``:

* ``low_rank_method="power"`` (default): ``power_iters`` steps of subspace (block
  power) iteration, warm-started from the previous ``V`` (its row space is the right
  basis), with QR re-orthonormalisation. The very first time (or after a reset) a
  matrix is initialised with an exact truncated SVD (``torch.linalg.svd``), so nothing
  depends on a random seed. Because momentum changes slowly, one iteration per step
  tracks the subspace cheaply (two QRs of ``n x k`` / ``m x k`` matrices and two
  matmuls).
* ``low_rank_method="svd"``: an exact truncated SVD every step (exact, more costly).

Same-shape matrices are stacked and processed with one batched ``torch.linalg`` call.

By default the low-rank term is reward-modulated like the momentum term
(``low_rank_modulated=True``): an unmodulated term would be a reward-independent drift
that does not vanish when the advantage is 0. ``low_rank_modulated=False`` with
``direction="seed"`` and ``low_rank_coef=0.1`` is the seed's exact formula
``theta += eta_p * (r * s * momentum + 0.1 * U @ V)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from neuroplastic.errors import UserError
from neuroplastic.plasticity.base import Rule

_DIRECTIONS = {"descent": -1.0, "seed": 1.0}
_LOW_RANK_METHODS = ("power", "svd")


class Traces(Rule):
    """Reward-modulated gradient traces + momentum (+ low-rank) plasticity.

    Args:
        params: name pattern(s) of the parameters it acts on (globs or ``re:`` regexes).
        exclude: name pattern(s) to leave out.
        trace_decay: ``gamma`` in ``trace <- gamma*trace + (1-gamma)*grad`` (in [0, 1)).
        momentum: ``m`` in ``momentum <- m*momentum + (1-m)*trace`` (in [0, 1)).
        scale: ``s``, multiplies the momentum term.
        plasticity_lr: ``eta_p``, the plastic step size.
        low_rank: add the ``low_rank_coef * U @ V`` term for 2-D weights.
        rank: ``k``, the rank of ``U @ V`` (capped at ``min(out, in)``).
        low_rank_coef: coefficient of the low-rank term (0.1 as in the seed).
        direction: ``"descent"`` (default, ``theta -= ...``: a positive advantage
            reinforces the recent descent direction) or ``"seed"`` (``theta += ...``, the
            seed's formula, which climbs the loss gradient when the advantage is positive).
        low_rank_method: ``"power"`` (warm-started subspace iteration, default) or ``"svd"``.
        power_iters: subspace iterations per step for ``"power"``.
        low_rank_modulated: multiply the low-rank term by the advantage (default True).
    """

    name = "traces"
    uses_reward = True

    def __init__(
        self,
        params: str | Sequence[str] = "*",
        exclude: str | Sequence[str] = (),
        trace_decay: float = 0.9,
        momentum: float = 0.9,
        scale: float = 1.0,
        plasticity_lr: float = 1e-4,
        low_rank: bool = False,
        rank: int = 4,
        low_rank_coef: float = 0.1,
        direction: str = "descent",
        low_rank_method: str = "power",
        power_iters: int = 1,
        low_rank_modulated: bool = True,
    ):
        super().__init__(params=params, exclude=exclude)
        if not 0.0 <= trace_decay < 1.0:
            raise UserError(f"Traces trace_decay must be in [0, 1), got {trace_decay}.")
        if not 0.0 <= momentum < 1.0:
            raise UserError(f"Traces momentum must be in [0, 1), got {momentum}.")
        if plasticity_lr < 0:
            raise UserError(f"Traces plasticity_lr must be >= 0, got {plasticity_lr}.")
        if direction not in _DIRECTIONS:
            raise UserError(
                f"Traces direction must be one of {sorted(_DIRECTIONS)}, got {direction!r}."
            )
        if low_rank_method not in _LOW_RANK_METHODS:
            raise UserError(
                f"Traces low_rank_method must be one of {list(_LOW_RANK_METHODS)}, got {low_rank_method!r}."
            )
        if int(rank) < 1:
            raise UserError(f"Traces rank must be >= 1, got {rank}.")
        if int(power_iters) < 1:
            raise UserError(f"Traces power_iters must be >= 1, got {power_iters}.")
        self.trace_decay = float(trace_decay)
        self.momentum_decay = float(momentum)
        self.scale = float(scale)
        self.plasticity_lr = float(plasticity_lr)
        self.low_rank = bool(low_rank)
        self.rank = int(rank)
        self.low_rank_coef = float(low_rank_coef)
        self.direction = direction
        self.sign = _DIRECTIONS[direction]
        self.low_rank_method = low_rank_method
        self.power_iters = int(power_iters)
        self.low_rank_modulated = bool(low_rank_modulated)
        self.trace: list[torch.Tensor] = []
        self.momentum: list[torch.Tensor] = []
        self.U: list[torch.Tensor] = []
        self.V: list[torch.Tensor] = []
        self._lr_groups: list[list[int]] = []
        self._plain: list[int] = []
        self._last_update_norm: torch.Tensor | float = 0.0

    # ---------------------------------------------------------------- set-up

    def setup(self) -> None:
        self.trace = self.zeros_like_params(torch.float32)
        self.momentum = self.zeros_like_params(torch.float32)
        self.U = [self._empty(p) for p in self.params]
        self.V = [self._empty(p) for p in self.params]
        groups: dict[tuple, list[int]] = {}
        if self.low_rank:
            for i, p in enumerate(self.params):
                if p.dim() == 2:
                    groups.setdefault((tuple(p.shape), p.device), []).append(i)
        self._lr_groups = list(groups.values())
        in_lr = {i for idx in self._lr_groups for i in idx}
        self._plain = [i for i in range(len(self.params)) if i not in in_lr]
        self._last_update_norm = 0.0

    @staticmethod
    def _empty(p: torch.Tensor) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.float32, device=p.device)

    def _k(self, shape: Sequence[int]) -> int:
        return min(self.rank, int(shape[0]), int(shape[1]))

    # ---------------------------------------------------------------- hooks

    @torch.no_grad()
    def after_backward(self) -> None:
        with_grad, grads, without = [], [], []
        for t, p in zip(self.trace, self.params):
            if p.grad is None:
                without.append(t)
            else:
                with_grad.append(t)
                grads.append(p.grad if p.grad.dtype == torch.float32 else p.grad.float())
        w = 1.0 - self.trace_decay
        if with_grad:
            torch._foreach_lerp_(with_grad, grads, w)
        if without:  # lerp towards a zero gradient
            torch._foreach_mul_(without, self.trace_decay)
        torch._foreach_lerp_(self.momentum, self.trace, 1.0 - self.momentum_decay)

    @torch.no_grad()
    def after_step(self, advantage: float | None) -> None:
        if advantage is None:
            self._last_update_norm = 0.0
            return
        r = float(advantage)
        self.acted += 1
        a = self.sign * self.plasticity_lr * r * self.scale  # momentum coefficient
        b = (
            self.sign
            * self.plasticity_lr
            * self.low_rank_coef
            * (r if self.low_rank_modulated else 1.0)
        )
        params = self.params
        torch._foreach_add_(params, self.momentum, alpha=a)
        # ||a*m + b*U@V||^2 = a^2 ||m||^2 + (2ab + b^2) ||V||^2, because U has orthonormal
        # columns and V = U^T m (so <m, U@V> = ||U@V||^2 = ||V||^2): no full-size temporaries
        v_sq = torch.zeros((), dtype=torch.float32, device=self.momentum[0].device)
        for idx in self._lr_groups:
            U, V = self._update_low_rank(idx)
            for j, i in enumerate(idx):
                p = params[i]
                if p.dtype == torch.float32:
                    p.addmm_(U[j], V[j], alpha=b)  # in place, no U@V temporary
                else:
                    p.add_((U[j] @ V[j]).to(p.dtype), alpha=b)
            v_sq = v_sq + V.square().sum().to(v_sq.device)
        m_sq = torch.stack([n.to(v_sq.device) for n in torch._foreach_norm(self.momentum)]).square().sum()
        self._last_update_norm = (a * a * m_sq + (2 * a * b + b * b) * v_sq).clamp_min(0).sqrt()

    # ---------------------------------------------------------------- low rank

    def _update_low_rank(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Refresh U/V of the same-shape matrices ``idx``; returns (U, V) stacked.

        The power step works matrix by matrix on the momentum (no stacked copy of the
        full-size momenta); only the thin ``m x k`` / ``k x n`` factors are batched.
        """
        mom = [self.momentum[i] for i in idx]
        k = self._k(mom[0].shape)
        ready = all(self.U[i].numel() > 0 for i in idx)
        if self.low_rank_method == "svd" or not ready:
            Uf, S, Vh = torch.linalg.svd(torch.stack(mom), full_matrices=False)
            U = Uf[..., :k]
            V = S[..., :k, None] * Vh[..., :k, :]
        else:
            V = torch.stack([self.V[i] for i in idx])  # (B, k, n)
            for _ in range(self.power_iters):
                Vb = torch.linalg.qr(V.transpose(-1, -2)).Q  # (B, n, k) right basis
                U = torch.linalg.qr(torch.stack([m @ Vb[j] for j, m in enumerate(mom)])).Q
                V = torch.stack([U[j].transpose(0, 1) @ m for j, m in enumerate(mom)])
        U = U.contiguous()
        V = V.contiguous()
        for j, i in enumerate(idx):
            self.U[i] = U[j].clone()
            self.V[i] = V[j].clone()
        return U, V

    def low_rank_approx(self) -> list[torch.Tensor | None]:
        """Current ``U @ V`` per selected parameter (``None`` where there is none)."""
        return [u @ v if u.numel() else None for u, v in zip(self.U, self.V)]

    # ---------------------------------------------------------------- stats / state

    @staticmethod
    def _global_norm(ts: list[torch.Tensor]) -> float:
        ts = [t for t in ts if t.numel()]
        if not ts:
            return 0.0
        norms = torch._foreach_norm(ts)
        return float(torch.stack([n.cpu() for n in norms]).norm())

    def stats(self) -> dict[str, float]:
        """Global L2 norms of the traces, the momentum, the update of the latest
        ``after_step`` (0 when it had no advantage) and the low-rank term ``U @ V``."""
        return {
            "trace_norm": self._global_norm(self.trace),
            "momentum_norm": self._global_norm(self.momentum),
            "update_norm": float(self._last_update_norm),
            # ||U V||_F = ||V||_F because U has orthonormal columns
            "low_rank_norm": self._global_norm(self.V),
        }

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            trace=[t.clone() for t in self.trace],
            momentum=[t.clone() for t in self.momentum],
            U=[t.clone() for t in self.U],
            V=[t.clone() for t in self.V],
            last_update_norm=float(self._last_update_norm),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.trace = [t.float() for t in self._check_buffers(state["trace"], "trace")]
        self.momentum = [t.float() for t in self._check_buffers(state["momentum"], "momentum")]
        U = self._check_buffers(state.get("U", [self._empty(p) for p in self.params]), "U", False)
        V = self._check_buffers(state.get("V", [self._empty(p) for p in self.params]), "V", False)
        for i, (u, v, p, n) in enumerate(zip(U, V, self.params, self.names)):
            if u.numel() == 0 and v.numel() == 0:
                U[i], V[i] = self._empty(p), self._empty(p)
                continue
            k = self._k(p.shape) if p.dim() == 2 else -1
            if (
                p.dim() != 2
                or tuple(u.shape) != (p.shape[0], k)
                or tuple(v.shape) != (k, p.shape[1])
            ):
                raise UserError(
                    f"Saved low-rank factors of rule {self.name!r} for {n} have shapes "
                    f"{tuple(u.shape)} and {tuple(v.shape)}, which do not fit rank {self.rank}; "
                    "resume with the same rule settings."
                )
            U[i], V[i] = u.float(), v.float()
        self.U, self.V = U, V
        last = state.get("last_update_norm", 0.0)
        self._last_update_norm = 0.0 if last is None or not math.isfinite(last) else float(last)
