"""The plasticity engine as a trainer callback."""

from __future__ import annotations

from typing import Any

from neuroplastic.data.batching import sequential_blocks
from neuroplastic.plasticity.engine import PlasticityEngine
from neuroplastic.training.callbacks import PLASTICITY, Callback, StepContext


class EngineCallback(Callback):
    """Calls the engine's hooks at the trainer's hook points.

    - ``penalty``: added to the loss (EWC and friends).
    - ``after_backward``: every rule first observes the step's loss (``ctx.loss``;
      AdaptiveLR uses it), then reads the (clipped) gradients.
    - ``after_step``: plastic updates, modulated by ``ctx.reward`` (set this step by
      a reward producer, otherwise ``None``: reward-modulated rules do not update).
    - ``on_stage_change``: rules that implement ``consolidate(batches, loss_fn)`` (EWC)
      consolidate on the stage just finished.
    """

    name = "plasticity"

    phase = PLASTICITY

    def __init__(self, engine: PlasticityEngine, consolidate_batches: int = 8):
        self.engine = engine
        self.consolidate_batches = consolidate_batches

    def penalty(self, ctx: StepContext) -> Any:
        return self.engine.penalty()

    def after_backward(self, ctx: StepContext) -> None:
        self.engine.observe(ctx.loss)
        self.engine.after_backward()

    def after_step(self, ctx: StepContext, metrics: dict[str, Any]) -> None:
        adv = self.engine.after_step(reward=ctx.reward)
        if adv is not None:
            metrics["advantage"] = adv

    def on_stage_change(self, ctx: StepContext, old: int, new: int) -> None:
        rules = self.engine.consolidating()
        if not rules or ctx.curriculum is None:
            return
        stage = ctx.curriculum.stages[old]
        # the global batch size: under data parallelism every rank consolidates on the same
        # batches a single process with the whole batch would use (same Fisher everywhere)
        batch = ctx.cfg.train.batch_size * ctx.world_size
        batches = sequential_blocks(
            ctx.data.train[stage], ctx.block_size, batch, self.consolidate_batches
        )
        device = ctx.device

        def loss_fn(model, batch):
            x, y = batch
            return model(x.to(device), y.to(device))[1]

        # eval mode: no dropout in the Fisher, and Hebbian hooks record nothing
        was_training = ctx.model.training
        ctx.model.eval()
        try:
            for rule in rules:
                rule.consolidate(batches, loss_fn)
        finally:
            ctx.model.train(was_training)
        ctx.logger.log("consolidate", ctx.step, stage=stage, rules=",".join(r.name for r in rules))

    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state)
