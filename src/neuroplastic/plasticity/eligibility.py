"""EligibilityTrace: reward-modulated update of the most eligible weights.

The plasticity rule of the seed ``controlled-generation`` system, on any ``nn.Module``.

Per selected parameter with gradient ``g`` (buffers in fp32)::

    after_backward:  e <- decay * e + |g|              (eligibility: recent gradient activity)
                     d <- direction(-g)                 (saved: grads are cleared after the step)
    after_step(r):   theta[top-k of e] += plasticity_lr * r * d[top-k of e]

``r`` is the reward advantage from the engine (reward minus its running baseline);
``None`` (or 0) -> no update. Since ``d`` points down the loss, a positive advantage
pushes the most eligible weights further along their descent direction and a negative
one pushes them back (the same convention as :class:`~neuroplastic.plasticity.traces.Traces`).

* ``top_k`` is a fraction of the selected weights; ``scope="parameter"`` (default) takes
  ``max(1, floor(top_k * numel))`` entries of each parameter, ``scope="global"`` takes
  ``max(1, floor(top_k * total))`` entries across all selected parameters.
* ``direction="sign"`` (default): ``d = sign(-g)``. ``direction="normalized"``:
  ``d = -g / rms(g)`` with the RMS over the parameter, so that entries are O(1) like the
  sign and ``plasticity_lr`` means about the same in both modes (0 where ``g`` is 0).

The direction of a step is used only by the ``after_step`` that follows its
``after_backward`` and is released afterwards, so it is not part of the state; the
eligibilities are. A parameter without a gradient this step has its eligibility
decayed and a zero direction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from neuroplastic.errors import UserError
from neuroplastic.plasticity.base import Rule


class EligibilityTrace(Rule):
    """Eligibility traces ``e <- decay*e + |grad|``; top-k weights move by ``lr * advantage * dir``.

    Args:
        params: name pattern(s) of the parameters it acts on (globs or ``re:`` regexes).
        exclude: name pattern(s) to leave out.
        decay: eligibility decay in [0, 1).
        top_k: fraction of the selected weights updated per step, in (0, 1].
        plasticity_lr: the plastic step size.
        scope: ``"parameter"`` (top-k within each parameter, default) or ``"global"``.
        direction: ``"sign"`` (``sign(-grad)``, default) or ``"normalized"`` (``-grad / rms(grad)``).
    """

    name = "eligibility"
    uses_reward = True

    def __init__(
        self,
        params: str | Sequence[str] = "*",
        exclude: str | Sequence[str] = (),
        decay: float = 0.9,
        top_k: float = 0.01,
        plasticity_lr: float = 1e-4,
        scope: str = "parameter",
        direction: str = "sign",
    ):
        super().__init__(params=params, exclude=exclude)
        if not 0.0 <= decay < 1.0:
            raise UserError(f"Eligibility decay must be in [0, 1), got {decay}.")
        if not 0.0 < top_k <= 1.0:
            raise UserError(
                f"Eligibility top_k is a fraction of the weights in (0, 1], got {top_k}."
            )
        if plasticity_lr < 0:
            raise UserError(f"Eligibility plasticity_lr must be >= 0, got {plasticity_lr}.")
        if scope not in ("parameter", "global"):
            raise UserError(f"Eligibility scope must be 'parameter' or 'global', got {scope!r}.")
        if direction not in ("sign", "normalized"):
            raise UserError(
                f"Eligibility direction must be 'sign' or 'normalized', got {direction!r}."
            )
        self.decay = float(decay)
        self.top_k = float(top_k)
        self.plasticity_lr = float(plasticity_lr)
        self.scope = scope
        self.direction = direction
        self.eligibility: list[torch.Tensor] = []
        self._dir: list[torch.Tensor] | None = None
        self._ks: list[int] = []
        self._numel = 0
        self._last_fraction = 0.0
        self._last_update_norm: torch.Tensor | float = 0.0

    def setup(self) -> None:
        self.eligibility = self.zeros_like_params(torch.float32)
        self._ks = [max(1, int(math.floor(self.top_k * p.numel()))) for p in self.params]
        self._numel = sum(p.numel() for p in self.params)
        self._dir = None

    # ---------------------------------------------------------------- hooks

    @torch.no_grad()
    def after_backward(self) -> None:
        grads = [
            torch.zeros_like(p, dtype=torch.float32)
            if p.grad is None
            else (p.grad if p.grad.dtype == torch.float32 else p.grad.float())
            for p in self.params
        ]
        torch._foreach_mul_(self.eligibility, self.decay)
        torch._foreach_add_(self.eligibility, torch._foreach_abs(grads))
        neg = torch._foreach_neg(grads)
        if self.direction == "sign":
            torch._foreach_sign_(neg)
        else:
            norms = torch.stack([n.to(neg[0].device) for n in torch._foreach_norm(grads)])
            sizes = torch.tensor([float(g.numel()) for g in grads], device=norms.device)
            factors = torch.where(norms > 0, sizes.sqrt() / norms.clamp_min(1e-30), 0.0)
            torch._foreach_mul_(neg, [f.to(g.device) for f, g in zip(factors.unbind(0), neg)])
        self._dir = neg

    @torch.no_grad()
    def after_step(self, advantage: float | None) -> None:
        dirs, self._dir = self._dir, None
        self._last_fraction = 0.0
        self._last_update_norm = 0.0
        if advantage is None or dirs is None:
            return
        coef = self.plasticity_lr * float(advantage)
        if coef == 0.0:
            return
        if self.scope == "parameter":
            selected = [
                torch.topk(e.reshape(-1), k, sorted=False).indices
                for e, k in zip(self.eligibility, self._ks)
            ]
        else:
            selected = self._global_topk()
        sq = None
        count = 0
        for p, d, idx in zip(self.params, dirs, selected):
            if idx.numel() == 0:
                continue
            delta = d.reshape(-1)[idx] * coef
            s = delta.square().sum()
            sq = s if sq is None else sq + s.to(sq.device)
            count += idx.numel()
            delta = delta.to(p.dtype)
            if p.is_contiguous():
                p.data.view(-1).index_add_(0, idx, delta)
            else:
                full = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                full.index_add_(0, idx, delta)
                p.data.add_(full.view_as(p))
        self._last_fraction = count / max(self._numel, 1)
        self._last_update_norm = 0.0 if sq is None else sq.sqrt()
        if count:
            self.acted += 1

    def _global_topk(self) -> list[torch.Tensor]:
        dev = self.eligibility[0].device
        flat = torch.cat([e.reshape(-1).to(dev) for e in self.eligibility])
        k = max(1, int(math.floor(self.top_k * flat.numel())))
        idx = torch.topk(flat, k, sorted=False).indices.sort().values
        sizes = [e.numel() for e in self.eligibility]
        offsets = torch.tensor([0, *list(_cumsum(sizes))], device=dev)
        bounds = torch.searchsorted(idx, offsets).tolist()
        out = []
        for i, e in enumerate(self.eligibility):
            out.append((idx[bounds[i] : bounds[i + 1]] - offsets[i]).to(e.device))
        return out

    # ---------------------------------------------------------------- stats / state

    def stats(self) -> dict[str, float]:
        """Mean and max eligibility over the selected weights, the fraction of them the
        latest ``after_step`` moved (0 without an advantage) and the norm of its update."""
        nonempty = [e for e in self.eligibility if e.numel()]
        total = float(torch.stack([e.sum().cpu() for e in nonempty]).sum()) if nonempty else 0.0
        top = float(torch.stack([e.max().cpu() for e in nonempty]).max()) if nonempty else 0.0
        return {
            "eligibility_mean": total / max(self._numel, 1),
            "eligibility_max": top,
            "fraction_updated": float(self._last_fraction),
            "update_norm": float(self._last_update_norm),
        }

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            eligibility=[e.clone() for e in self.eligibility],
            last_fraction=float(self._last_fraction),
            last_update_norm=float(self._last_update_norm),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.eligibility = [
            e.float() for e in self._check_buffers(state["eligibility"], "eligibility")
        ]
        self._dir = None
        self._last_fraction = float(state.get("last_fraction", 0.0))
        self._last_update_norm = float(state.get("last_update_norm", 0.0))


def _cumsum(sizes: list[int]):
    total = 0
    for s in sizes:
        total += s
        yield total
