"""Elastic weight consolidation (Kirkpatrick et al., 2017), classic and online.

After a task, :meth:`EWC.consolidate` estimates the diagonal (empirical) Fisher
information ``F`` of the selected parameters from squared gradients of the task loss
and stores the current parameters as the anchor ``theta*``. From then on
:meth:`EWC.penalty` adds::

    lam / 2 * sum_i F_i * (theta_i - theta*_i) ** 2

to the loss, a differentiable scalar whose gradient is ``lam * F * (theta - theta*)``.

Two ways to get the Fisher:

* ``consolidate(batches, loss_fn)``: a dedicated pass over some of the task's data;
  ``loss_fn(model, batch)`` returns a scalar loss. ``F`` is the mean over batches of
  the squared gradient of each batch's loss (``per_sample=False``, cheap, but the
  square of a *mean* gradient underestimates the Fisher by roughly the batch size for
  its noise part) or, with ``per_sample=True``, the mean over single examples of the
  squared per-example gradient (the textbook empirical Fisher; each batch is split
  along dim 0 into size-1 pieces, so it costs one backward per example). Gradients are
  taken with ``torch.autograd.grad``, so ``.grad`` of the parameters is left alone. The
  model is used in whatever train/eval mode it is in.
* ``consolidate_from_grads()`` with ``collect_grads=True``: :meth:`after_backward`
  accumulates the squared gradients the trainer's own backward passes produce during
  the task, and ``F`` is their mean over steps (no extra pass). These are gradients of
  the *total* loss, so they include this rule's penalty gradient (when the penalty was
  in the loss) and any loss scaling (e.g. an AMP grad scaler before ``unscale_``).

``online=True`` (default) keeps one Fisher and one anchor (Schwarz et al., 2018):
``F <- gamma * F + F_new`` and ``theta* <- theta``. ``online=False`` keeps a separate
``(F, theta*)`` per consolidated task and sums their penalties (memory grows with the
number of tasks).

Buffers of float16/bfloat16 parameters are kept in float32 (the anchor too, which is an
exact copy of the low-precision value).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from neuroplastic.errors import UserError
from neuroplastic.plasticity.base import Rule


def buffer_dtype(p: torch.Tensor) -> torch.dtype:
    """float32 for low-precision parameters, else the parameter's dtype."""
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        values = list(batch.values())
    elif isinstance(batch, list | tuple):
        values = list(batch)
    else:
        return None
    for v in values:
        n = _batch_size(v)
        if n is not None:
            return n
    return None


def split_batch(batch: Any) -> list[Any]:
    """Split a batch (tensor or nested dict/list/tuple of tensors) into size-1 pieces along dim 0.

    Tensors whose first dimension is not the batch size, and non-tensor leaves, are
    passed to every piece unchanged.
    """
    n = _batch_size(batch)
    if n is None:
        raise UserError(
            "EWC per_sample=True needs batches that contain tensors with a batch dimension; "
            "got a batch without any."
        )

    def piece(obj: Any, i: int) -> Any:
        if isinstance(obj, torch.Tensor):
            return obj[i : i + 1] if obj.dim() > 0 and obj.shape[0] == n else obj
        if isinstance(obj, Mapping):
            return {k: piece(v, i) for k, v in obj.items()}
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*(piece(v, i) for v in obj))
        if isinstance(obj, list | tuple):
            return type(obj)(piece(v, i) for v in obj)
        return obj

    return [piece(batch, i) for i in range(n)]


class EWC(Rule):
    """Elastic weight consolidation penalty on the selected parameters.

    Args:
        params, exclude, min_dim: parameter selection (see :func:`select_parameters`).
        lam: strength ``lambda`` of the penalty ``lam/2 * sum F (theta - theta*)^2``.
        gamma: decay of the old Fisher in the online variant, ``F <- gamma*F + F_new``
            (1.0: plain sum over tasks; 0.0: only the last task counts).
        online: one running ``(F, theta*)`` (True) or one per task (False).
        per_sample: default for :meth:`consolidate` (see module docs).
        collect_grads: accumulate squared gradients in :meth:`after_backward` for
            :meth:`consolidate_from_grads`.
    """

    name = "ewc"

    def __init__(
        self,
        params: str | list[str] = "*",
        exclude: str | list[str] = (),
        min_dim: int = 0,
        lam: float = 1.0,
        gamma: float = 1.0,
        online: bool = True,
        per_sample: bool = False,
        collect_grads: bool = False,
    ):
        super().__init__(params=params, exclude=exclude, min_dim=min_dim)
        if lam < 0:
            raise UserError(f"EWC lam must be >= 0, got {lam}.")
        if not 0 <= gamma <= 1:
            raise UserError(f"EWC gamma (online Fisher decay) must be in [0, 1], got {gamma}.")
        self.lam = float(lam)
        self.gamma = float(gamma)
        self.online = bool(online)
        self.per_sample = bool(per_sample)
        self.collect_grads = bool(collect_grads)
        # online: fisher/anchor are lists aligned with params (or None before the first task)
        # classic: lists (one per task) of such lists
        self.fisher: Any = None
        self.anchor: Any = None
        self.tasks = 0
        self.grad_sq: list[torch.Tensor] | None = None
        self.grad_count = 0
        self._last_penalty: torch.Tensor | float | None = None

    def setup(self) -> None:
        self.fisher = None if self.online else []
        self.anchor = None if self.online else []
        self.tasks = 0
        self.grad_sq = (
            [torch.zeros_like(p, dtype=buffer_dtype(p)) for p in self.params]
            if self.collect_grads
            else None
        )
        self.grad_count = 0
        self._last_penalty = None

    # ------------------------------------------------------------------ Fisher

    def _grads_of(self, loss: torch.Tensor) -> list[torch.Tensor]:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise UserError("EWC loss_fn(model, batch) must return a scalar loss tensor.")
        grads = torch.autograd.grad(loss.reshape(()), self.params, allow_unused=True)
        return [
            torch.zeros_like(p, dtype=buffer_dtype(p))
            if g is None
            else g.detach().to(buffer_dtype(p))
            for g, p in zip(grads, self.params)
        ]

    def fisher_from_batches(
        self,
        batches: Iterable[Any],
        loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
        per_sample: bool | None = None,
        max_batches: int | None = None,
    ) -> list[torch.Tensor]:
        """The empirical diagonal Fisher (mean of squared gradients) without storing it."""
        if self.model is None:
            raise UserError(
                "Bind the EWC rule to a model (PlasticityEngine does) before consolidating."
            )
        per_sample = self.per_sample if per_sample is None else per_sample
        acc = [torch.zeros_like(p, dtype=buffer_dtype(p)) for p in self.params]
        count = 0
        for b, batch in enumerate(batches):
            if max_batches is not None and b >= max_batches:
                break
            pieces = split_batch(batch) if per_sample else [batch]
            for piece in pieces:
                g = self._grads_of(loss_fn(self.model, piece))
                torch._foreach_addcmul_(acc, g, g)
                count += 1
        if count == 0:
            raise UserError("EWC consolidate got no batches; pass some of the task's data.")
        torch._foreach_div_(acc, float(count))
        return acc

    def consolidate(
        self,
        batches: Iterable[Any],
        loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
        per_sample: bool | None = None,
        max_batches: int | None = None,
    ) -> None:
        """End of a task: estimate the Fisher on ``batches`` and anchor the current parameters."""
        self.add_task(self.fisher_from_batches(batches, loss_fn, per_sample, max_batches))

    def consolidate_from_grads(self) -> None:
        """End of a task: use the squared gradients collected in :meth:`after_backward`."""
        if self.grad_sq is None:
            raise UserError("EWC consolidate_from_grads needs collect_grads=True.")
        if self.grad_count == 0:
            raise UserError(
                "EWC consolidate_from_grads: no gradients were collected since the last "
                "consolidation; call engine.after_backward() after each backward pass."
            )
        fisher = torch._foreach_div(self.grad_sq, float(self.grad_count))
        self.add_task(fisher)
        for t in self.grad_sq:
            t.zero_()
        self.grad_count = 0

    def add_task(self, fisher: list[torch.Tensor]) -> None:
        """Fold a Fisher estimate (aligned with ``self.params``) in and anchor the current parameters."""
        fisher = self._check_buffers(fisher, "fisher")
        fisher = [f.to(buffer_dtype(p)) for f, p in zip(fisher, self.params)]
        anchor = [p.detach().to(buffer_dtype(p)).clone() for p in self.params]
        if self.online:
            if self.fisher is None:
                self.fisher = fisher
            else:
                torch._foreach_mul_(self.fisher, self.gamma)
                torch._foreach_add_(self.fisher, fisher)
            self.anchor = anchor
        else:
            self.fisher.append(fisher)
            self.anchor.append(anchor)
        self.tasks += 1
        self._last_penalty = 0.0

    # ------------------------------------------------------------------ hooks

    def _pairs(self) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        if self.online:
            return [] if self.fisher is None else [(self.fisher, self.anchor)]
        return list(zip(self.fisher, self.anchor))

    def penalty(self) -> torch.Tensor | None:
        pairs = self._pairs()
        if not pairs:
            return None
        params = [p if p.dtype == buffer_dtype(p) else p.to(buffer_dtype(p)) for p in self.params]
        total = None
        for fisher, anchor in pairs:
            diff = torch._foreach_sub(params, anchor)
            sq = torch._foreach_mul(diff, diff)
            sq = torch._foreach_mul(sq, fisher)
            part = torch.stack([s.sum().float() for s in sq]).sum()
            total = part if total is None else total + part
        out = 0.5 * self.lam * total
        self._last_penalty = out.detach()  # a tensor: no device sync on the hot path
        return out

    def after_step(self, advantage: float | None) -> None:
        # the penalty was part of this step's loss once a task has been consolidated
        if self.lam != 0 and self._pairs():
            self.acted += 1

    def after_backward(self) -> None:
        if self.grad_sq is None:
            return
        grads = [g.to(b.dtype) for g, b in zip(self.grads(), self.grad_sq)]
        torch._foreach_addcmul_(self.grad_sq, grads, grads)
        self.grad_count += 1

    def stats(self) -> dict[str, float]:
        pairs = self._pairs()
        if not pairs:
            return {"penalty": 0.0, "fisher_mean": 0.0, "tasks": float(self.tasks)}
        n = sum(p.numel() for p in self.params)
        fsum = sum(float(f.sum()) for fisher, _ in pairs for f in fisher)
        if self._last_penalty is None:
            with torch.no_grad():
                self.penalty()
        return {
            "penalty": float(self._last_penalty),
            "fisher_mean": fsum / max(n, 1) / (1 if self.online else len(pairs)),
            "tasks": float(self.tasks),
        }

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            online=self.online,
            tasks=self.tasks,
            fisher=self.fisher if self.online else list(self.fisher),
            anchor=self.anchor if self.online else list(self.anchor),
            grad_sq=self.grad_sq,
            grad_count=self.grad_count,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if bool(state.get("online", self.online)) != self.online:
            raise UserError(
                f"Saved EWC state has online={state.get('online')} but the rule has "
                f"online={self.online}; resume with the same rule settings."
            )

        def load(lst: Any, key: str) -> list[torch.Tensor]:
            out = self._check_buffers(lst, key)
            return [t.to(buffer_dtype(p)) for t, p in zip(out, self.params)]

        if self.online:
            self.fisher = None if state.get("fisher") is None else load(state["fisher"], "fisher")
            self.anchor = None if state.get("anchor") is None else load(state["anchor"], "anchor")
        else:
            self.fisher = [load(f, "fisher") for f in state.get("fisher") or []]
            self.anchor = [load(a, "anchor") for a in state.get("anchor") or []]
        self.tasks = int(state.get("tasks", 0))
        if state.get("grad_sq") is not None:
            if not self.collect_grads:
                raise UserError(
                    "Saved EWC state has collected gradients but the rule has collect_grads=False; "
                    "resume with the same rule settings."
                )
            self.grad_sq = load(state["grad_sq"], "grad_sq")
        elif self.collect_grads:
            self.grad_sq = [torch.zeros_like(p, dtype=buffer_dtype(p)) for p in self.params]
        self.grad_count = int(state.get("grad_count", 0))
        self._last_penalty = None
