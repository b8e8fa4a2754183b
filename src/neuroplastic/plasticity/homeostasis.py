"""Homeostatic synaptic scaling: keep each output unit's weight-row norm near a target.

For every selected parameter with at least two dimensions, row ``r`` (output unit
``r``: ``W[r]``, all other dimensions flattened) is scaled multiplicatively::

    W[r] <- W[r] * (1 + rate * (target_r / ||W[r]|| - 1))

so that ``||W[r]||`` moves a fraction ``rate`` of the way to ``target_r`` (exactly:
``||W[r]||_new = ||W[r]|| + rate * (target_r - ||W[r]||)``) and converges
geometrically for ``0 < rate < 2``. The direction of each row is unchanged.
``target`` is a fixed number, or ``None`` for each row's own norm when the rule is
bound (keeps the initial scale of every unit while training pushes it around).
The scaling runs in ``after_step`` every ``interval`` steps (on the ``interval``-th,
``2*interval``-th, ... call). Rows with a norm below ``eps`` are left alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from neuroplastic.errors import UserError
from neuroplastic.plasticity.base import Rule


def _row_norms(p: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(p.detach().reshape(p.shape[0], -1).float(), dim=1)


class Homeostasis(Rule):
    """Synaptic scaling of the selected weights' row norms towards a target (see module docs).

    Args:
        params, exclude: parameter selection; only parameters with ``min_dim`` >= 2
            dimensions are used (rows = output units).
        target: the row norm to keep (float), or None for each row's norm at bind time.
        rate: fraction of the gap to the target closed per application (0 < rate <= 1).
        interval: apply every this many steps.
        eps: rows with a smaller norm are not scaled.
    """

    name = "homeostasis"

    def __init__(
        self,
        params: str | Sequence[str] = "*",
        exclude: str | Sequence[str] = (),
        min_dim: int = 2,
        target: float | None = None,
        rate: float = 0.01,
        interval: int = 1,
        eps: float = 1e-8,
    ):
        super().__init__(params=params, exclude=exclude, min_dim=max(int(min_dim), 2))
        if target is not None and target <= 0:
            raise UserError(
                f"Homeostasis target must be > 0 (or null for the initial norms), got {target}."
            )
        if not 0 < rate < 2:
            raise UserError(f"Homeostasis rate must be in (0, 2), got {rate}.")
        if int(interval) < 1:
            raise UserError(f"Homeostasis interval must be >= 1, got {interval}.")
        self.target = None if target is None else float(target)
        self.rate = float(rate)
        self.interval = int(interval)
        self.eps = float(eps)
        self.targets: list[torch.Tensor] = []
        self.applied = 0

    def setup(self) -> None:
        # float32 per-row targets, one vector per parameter
        if self.target is None:
            self.targets = [_row_norms(p) for p in self.params]
        else:
            self.targets = [
                torch.full((p.shape[0],), self.target, dtype=torch.float32, device=p.device)
                for p in self.params
            ]
        self.applied = 0

    def scale_factors(self) -> list[torch.Tensor]:
        """Per-row multiplicative factors ``1 + rate*(target/||row|| - 1)`` (1 for tiny rows)."""
        out = []
        for p, t in zip(self.params, self.targets):
            n = _row_norms(p)
            f = 1 + self.rate * (t / n.clamp_min(self.eps) - 1)
            out.append(torch.where(n > self.eps, f, torch.ones_like(f)))
        return out

    def apply(self) -> None:
        """One scaling step now (regardless of ``interval``)."""
        factors = self.scale_factors()
        with torch.no_grad():
            for p, f in zip(self.params, factors):
                shape = (p.shape[0],) + (1,) * (p.dim() - 1)
                if p.dtype == torch.float32:
                    p.mul_(f.view(shape))
                else:
                    p.copy_((p.float() * f.view(shape)).to(p.dtype))
        self.applied += 1
        self.acted += 1

    def after_step(self, advantage: float | None) -> None:
        # the engine increments step_count after this call: this is step step_count + 1
        if (self.step_count + 1) % self.interval == 0:
            self.apply()

    def stats(self) -> dict[str, float]:
        norms = [_row_norms(p) for p in self.params]
        allnorms = torch.cat(norms)
        alltargets = torch.cat(self.targets)
        dev = ((allnorms - alltargets).abs() / alltargets.clamp_min(self.eps)).mean()
        return {
            "mean_row_norm": float(allnorms.mean()),
            "target_deviation": float(dev),
        }

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(targets=list(self.targets), applied=self.applied)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        targets = self._check_buffers(state["targets"], "targets", like_params=False)
        for t, p, n in zip(targets, self.params, self.names):
            if tuple(t.shape) != (p.shape[0],):
                raise UserError(
                    f"Saved homeostasis targets for {n} have shape {tuple(t.shape)}, expected "
                    f"({p.shape[0]},); resume with the same model."
                )
        self.targets = [t.float() for t in targets]
        self.applied = int(state.get("applied", 0))
