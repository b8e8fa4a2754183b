"""AdaptiveLR: scale the optimizer's learning rates per step from a "complexity" signal.

The adaptive learning rate of the seed ``neuroplastic-cot`` system, on any optimizer.

Signal. Each step the rule gets a raw complexity value ``x`` from, in this order:

1. ``set_complexity(value)`` or ``observe(loss)`` (``engine.observe``), called for this step
   *before* ``after_backward`` (``observe`` is the default signal: the batch loss;
   with ``use_loss=False`` it is ignored, so a recipe's own measure -- e.g. the number
   of reasoning steps in the batch -- given by ``set_complexity`` or the callable
   decides alone);
2. the ``complexity`` callable given to the constructor (called with no arguments in
   ``after_backward``);
3. nothing: the multiplier is 1 for this step (the running mean is not touched).

The value is taken relative to its own running mean (an EMA with ``ema_decay``, started
at the first value, so the first step has ``c = 1``)::

    c    = x / mean            (mean before this step's value; c = 1 if mean <= 0)
    mean <- ema_decay * mean + (1 - ema_decay) * x
    mult = clip(1 + sensitivity * (c - 1), min_mult, max_mult)

so a batch whose loss is above the recent average (a harder batch) gets a larger step
with ``sensitivity > 0``. Use positive signals (loss, length, entropy, perplexity). With
``relative=False`` the value is taken as already relative (``c = x``, centred at 1).
Non-finite values are ignored (multiplier 1).

Protocol (multiplicative on top of any schedule, never compounded):

* ``after_backward`` (before ``optimizer.step()``) stores each param group's current
  ``lr`` -- whatever the schedule set for this step -- as its base and sets
  ``group["lr"] = base * mult``;
* the base is restored right after ``optimizer.step()`` returns (an optimizer step
  post-hook registered at bind time), and again, if still needed, in ``after_step``. A
  scheduler stepped between the two (``optimizer.step(); scheduler.step();
  engine.after_step()``) therefore reads and chains on the scheduled lr, never the scaled
  one, and so does the optimizer state saved in a checkpoint. A group whose lr was
  changed by someone else after ``after_backward`` is left alone.

A loop that sets the lr itself each step (the :class:`~neuroplastic.training.trainer.Trainer`)
sets ``scheduled lr * engine.lr_multiplier()`` after ``after_backward``: the same value, which
it also logs as the lr used.

If the optimizer step and ``after_step`` were both missed, the next ``after_backward``
recognises the lr it set itself and starts again from the stored base. The rule needs the optimizer (bind it with
``PlasticityEngine(..., optimizer=opt)``); it selects no parameters of its own
(``params="*"`` only satisfies the engine and is otherwise unused).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from neuroplastic.errors import UserError
from neuroplastic.plasticity.base import Rule


class AdaptiveLR(Rule):
    """Multiply every param group's lr by ``clip(1 + sensitivity*(c - 1), min_mult, max_mult)``.

    Args:
        complexity: callable with no arguments returning the raw complexity (a float) of
            the current batch, or ``None`` to use the values passed to
            :meth:`observe` / :meth:`set_complexity` (default: the batch loss).
        min_mult: lower bound of the multiplier (> 0).
        max_mult: upper bound of the multiplier (>= min_mult).
        sensitivity: how strongly the relative complexity moves the multiplier.
        ema_decay: decay of the running mean of the raw complexity, in [0, 1).
        relative: take the value relative to its running mean (default) or as is.
        use_loss: let :meth:`observe` (the trainer's batch loss) set the complexity;
            ``False`` ignores it, for a complexity that comes from elsewhere.
        params, exclude: parameter patterns; unused beyond binding.
    """

    name = "adaptive_lr"
    uses_reward = False

    def __init__(
        self,
        complexity: Callable[[], float] | None = None,
        min_mult: float = 0.5,
        max_mult: float = 2.0,
        sensitivity: float = 1.0,
        ema_decay: float = 0.99,
        relative: bool = True,
        use_loss: bool = True,
        params: str | Sequence[str] = "*",
        exclude: str | Sequence[str] = (),
    ):
        super().__init__(params=params, exclude=exclude)
        if complexity is not None and not callable(complexity):
            raise UserError("AdaptiveLR complexity must be a callable returning a float, or None.")
        if not 0.0 < min_mult <= max_mult:
            raise UserError(
                f"AdaptiveLR needs 0 < min_mult <= max_mult, got min_mult={min_mult}, max_mult={max_mult}."
            )
        if not 0.0 <= ema_decay < 1.0:
            raise UserError(f"AdaptiveLR ema_decay must be in [0, 1), got {ema_decay}.")
        self.complexity_fn = complexity
        self.min_mult = float(min_mult)
        self.max_mult = float(max_mult)
        self.sensitivity = float(sensitivity)
        self.ema_decay = float(ema_decay)
        self.relative = bool(relative)
        self.use_loss = bool(use_loss)
        self.mean: float | None = None
        self.count = 0
        self.multiplier = 1.0
        self.complexity = 1.0
        self._pending: float | None = None
        self._base: list[float] | None = None
        self._set: list[float] | None = None
        self._hook = None

    def setup(self) -> None:
        if self.optimizer is None:
            raise UserError(
                "Plasticity rule 'adaptive_lr' needs the optimizer; pass it to "
                "PlasticityEngine(model, rules, optimizer=...)."
            )
        self.close()
        self._hook = self.optimizer.register_step_post_hook(lambda *_: self._restore())

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ---------------------------------------------------------------- signal

    def observe(self, loss: float | torch.Tensor) -> None:
        """Record this step's loss as its complexity (call before ``after_backward``);
        ignored with ``use_loss=False``."""
        if self.use_loss:
            self.set_complexity(loss)

    def set_complexity(self, value: float | torch.Tensor) -> None:
        """Record this step's raw complexity value (call before ``after_backward``)."""
        self._pending = float(value)

    def lr_multiplier(self) -> float:
        """This step's multiplier (set by :meth:`after_backward`)."""
        return self.multiplier

    def multiplier_for(self, c: float) -> float:
        """The lr multiplier for a relative complexity ``c``."""
        return min(self.max_mult, max(self.min_mult, 1.0 + self.sensitivity * (c - 1.0)))

    def _next_multiplier(self) -> float:
        x, self._pending = self._pending, None
        if x is None and self.complexity_fn is not None:
            x = float(self.complexity_fn())
        if x is None or not math.isfinite(x):
            return 1.0
        if self.mean is None:
            self.mean = x
        if self.relative:
            c = x / self.mean if self.mean > 0 else 1.0
        else:
            c = x
        self.mean = self.ema_decay * self.mean + (1.0 - self.ema_decay) * x
        self.count += 1
        self.complexity = c
        return self.multiplier_for(c)

    # ---------------------------------------------------------------- hooks

    def after_backward(self) -> None:
        groups = self.optimizer.param_groups
        self.multiplier = self._next_multiplier()
        if self.multiplier != 1.0:
            self.acted += 1
        base = []
        for i, g in enumerate(groups):
            lr = _as_float(g["lr"])
            stale = (
                self._base is not None
                and self._set is not None
                and i < len(self._set)
                and lr == self._set[i]
            )
            base.append(self._base[i] if stale else lr)
        new = [b * self.multiplier for b in base]
        for g, lr in zip(groups, new):
            _set_lr(g, lr)
        self._base = base
        self._set = [_as_float(g["lr"]) for g in groups]

    def after_step(self, advantage: float | None) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._base is None or self._set is None:
            return
        for i, g in enumerate(self.optimizer.param_groups):
            if i < len(self._base) and _as_float(g["lr"]) == self._set[i]:
                _set_lr(g, self._base[i])
        self._base = None
        self._set = None

    # ---------------------------------------------------------------- stats / state

    def stats(self) -> dict[str, float]:
        return {
            "lr_multiplier": float(self.multiplier),
            "complexity": float(self.complexity),
            "complexity_mean": float(self.mean) if self.mean is not None else 0.0,
        }

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            mean=self.mean,
            count=self.count,
            multiplier=self.multiplier,
            complexity=self.complexity,
            base_lrs=None if self._base is None else list(self._base),
            set_lrs=None if self._set is None else list(self._set),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        mean = state.get("mean")
        self.mean = None if mean is None else float(mean)
        self.count = int(state.get("count", 0))
        self.multiplier = float(state.get("multiplier", 1.0))
        self.complexity = float(state.get("complexity", 1.0))
        base, set_ = state.get("base_lrs"), state.get("set_lrs")
        self._base = None if base is None else [float(b) for b in base]
        self._set = None if set_ is None else [float(s) for s in set_]
        self._pending = None


def _as_float(lr: Any) -> float:
    return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)


def _set_lr(group: dict[str, Any], lr: float) -> None:
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr
