"""The hook points of a training run (``penalty`` -> ``after_backward`` -> optimizer step ->
``after_step``), implemented by plasticity engines, reward producers and observers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from neuroplastic.training.trainer import Trainer


class Callback:
    """Hook points a plasticity engine (or anything else) can implement.

    ``name`` keys the callback's state inside checkpoints.
    """

    name = "callback"

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
