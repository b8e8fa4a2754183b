"""The hook points of a training run (``penalty`` -> ``after_backward`` -> optimizer step ->
``after_step``), implemented by plasticity engines, reward producers and observers, and
the :class:`StepContext` they receive."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from neuroplastic.errors import UserError

if TYPE_CHECKING:
    from neuroplastic.config import RunConfig
    from neuroplastic.plasticity.engine import PlasticityEngine


#: Callback phases, in the order the trainer calls them every step.
REWARD, PLASTICITY, OBSERVE = 0, 1, 2


@dataclass(eq=False)
class StepContext:
    """What a callback may read (and the two per-step values it may write).

    The gradient trainer builds one context at setup, before the recipe's callbacks, and
    updates it: ``logger`` once it is open (before ``on_train_start``), ``step`` before
    every hook, ``loss`` and ``reward`` each step. Everything else is the run's, fixed.

    The run: ``cfg`` (the :class:`~neuroplastic.config.RunConfig`), ``model`` (unwrapped:
    no DDP/compile), ``optimizer``, ``device``, ``tokenizer``, ``data`` (the corpus: its
    ``train``/``val`` splits, per stage with a curriculum), ``block_size``, ``byte_lengths``
    (bytes per token id, for bits per byte), ``world_size`` (data-parallel processes),
    ``engine`` (the :class:`~neuroplastic.plasticity.PlasticityEngine`, or None),
    ``curriculum`` (or None), ``logger`` (``logger.log(kind, step, **fields)`` into
    ``metrics.jsonl``), ``echo`` (a line for the user), ``run_dir``, and ``autocast()``
    (the context manager of ``train.amp``).

    The step: ``step`` (optimizer steps done before this one; in ``on_stage_change``, the
    steps done), ``loss`` (this step's mean loss, from ``after_backward`` on; None before)
    and ``reward`` (None at the start of every step; a reward producer sets it, and the
    plasticity engine reads it in ``after_step``).

    The trainer's services: ``use_data(train_batches, val_sets)`` (train and validate on
    a recipe's own batches: a ``next_batch()`` source and ``{name: [batches]}``; call it
    while the callbacks are built), ``evaluate()`` (validation metrics: ``loss``, ``ppl``,
    ``bpb``) and ``sample(prompt=None, max_new_tokens=None, ...)`` (a generation that does
    not disturb the training RNG).
    """

    cfg: RunConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    tokenizer: Any
    data: Any
    block_size: int
    byte_lengths: Any
    world_size: int
    engine: PlasticityEngine | None
    curriculum: Any
    echo: Callable[[str], None]
    run_dir: Path
    autocast: Callable[[], Any]
    use_data: Callable[[Any, dict[str, list]], None]
    evaluate: Callable[[], dict[str, float]]
    sample: Callable[..., str]
    logger: Any = None
    step: int = 0
    loss: float | None = None
    reward: float | None = None


class Callback:
    """Hook points a plasticity engine (or anything else) can implement.

    ``name`` keys the callback's state inside checkpoints. ``phase`` orders the
    trainer's callbacks: :data:`REWARD` (the default: reward producers and anything that
    must run before the engine), :data:`PLASTICITY` (the plasticity engine), then
    :data:`OBSERVE` (what reads the step's results).

    Every hook gets the run's :class:`StepContext` (``ctx``): what a callback may read,
    the per-step ``loss`` and ``reward``, and the trainer's services. A reward producer
    sets ``ctx.reward``; hooks add keys to ``metrics``, the step's log record.

    Order within a step: ``penalty`` (once per micro-batch; a tensor added to the loss,
    divided by ``train.grad_accum``), backward, gradient clipping, ``after_backward``,
    the optimizer step, ``after_step``; then ``ctx.step`` advances and, when the
    curriculum moves (by steps, or on a plateau at an evaluation), ``on_stage_change``.
    ``on_train_start`` runs once per ``train()``. A step whose loss is not finite is
    skipped after ``penalty``: no later hook sees it.
    """

    name = "callback"
    phase = 0  # REWARD

    def on_train_start(self, ctx: StepContext) -> None: ...

    def penalty(self, ctx: StepContext) -> torch.Tensor | None:
        return None

    def after_backward(self, ctx: StepContext) -> None: ...

    def after_step(self, ctx: StepContext, metrics: dict[str, Any]) -> None: ...

    def on_stage_change(self, ctx: StepContext, old: int, new: int) -> None:
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
