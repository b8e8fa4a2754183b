"""The hook points of a training run (``penalty`` -> ``after_backward`` -> optimizer step ->
``after_step``), implemented by plasticity engines, reward producers and observers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from neuroplastic.errors import UserError

if TYPE_CHECKING:
    from neuroplastic.training.trainer import Trainer


#: Callback phases, in the order the trainer calls them every step.
REWARD, PLASTICITY, OBSERVE = 0, 1, 2


class Callback:
    """Hook points a plasticity engine (or anything else) can implement.

    ``name`` keys the callback's state inside checkpoints. ``phase`` orders the
    trainer's callbacks: :data:`REWARD` (the default: reward producers and anything that
    must run before the engine), :data:`PLASTICITY` (the plasticity engine), then
    :data:`OBSERVE` (what reads the step's results).

    The hooks get the trainer as their context. What a callback may use of it: ``cfg``,
    ``step`` (steps done before this one), ``model``, ``optimizer``, ``device``,
    ``tokenizer``, ``data``, ``block_size``, ``engine`` (or None), ``logger``, ``echo``,
    ``run_dir``, ``autocast()``, ``last_loss`` (this step's loss, from ``after_backward``
    on) and ``reward`` (None at the start of a step; a reward producer sets it for the
    plasticity engine).
    """

    name = "callback"
    phase = 0  # REWARD

    def on_train_start(self, trainer: Trainer) -> None: ...

    def penalty(self, trainer: Trainer) -> torch.Tensor | None:
        return None

    def after_backward(self, trainer: Trainer) -> None: ...

    def after_step(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...

    def on_stage_change(self, trainer: Trainer, old: int, new: int) -> None:
        """The curriculum moved from stage ``old`` to ``new`` (indices)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def callback_states(callbacks: list[Callback]) -> dict[str, dict[str, Any]]:
    """Every callback's state, keyed by its ``name`` (what a checkpoint stores)."""
    return {cb.name: cb.state_dict() for cb in callbacks}


def load_callback_states(callbacks: list[Callback], saved: dict[str, Any], path: Path) -> None:
    """Restore :func:`callback_states` from checkpoint ``path``; state that this run has and
    the checkpoint has not (or the other way round) is a UserError."""
    current = {cb.name for cb in callbacks}
    for name, st in saved.items():
        if st and name not in current:
            raise UserError(
                f"The checkpoint {str(path)!r} holds {name!r} state (e.g. plasticity rules) that "
                "this run does not have; resume with the settings it was started with."
            )
    for cb in callbacks:
        if cb.name in saved:
            cb.load_state_dict(saved[cb.name])
        elif cb.state_dict():
            raise UserError(
                f"The checkpoint {str(path)!r} has no state for {cb.name!r}; it was trained "
                "without it, so resume with the settings it was started with."
            )
