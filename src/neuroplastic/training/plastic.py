"""The plasticity engine in the gradient trainer: its hooks as a callback, and the replay
of its buffer of past batches."""

from __future__ import annotations

from typing import Any

import torch

from neuroplastic.data.batching import sequential_blocks
from neuroplastic.models.api import forward_targets
from neuroplastic.plasticity.engine import PlasticityEngine
from neuroplastic.training.callbacks import PLASTICITY, Callback, StepContext
from neuroplastic.training.distributed import set_grad_sync


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
            return forward_targets(model, x.to(device), y.to(device))[1]

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


class Replay:
    """Replay of past batches inside the gradient step (``plasticity.replay_every``,
    ``replay_weight``) from the engine's replay buffer (a Consolidation rule with
    ``replay_capacity``): every step's batch is remembered, and every ``replay_every``
    steps one past batch is trained on as an extra micro-batch before the new data."""

    def __init__(self, engine: PlasticityEngine | None, cfg: Any, dist: Any, device: Any):
        self.engine, self.pc, self.dist, self.device = engine, cfg.plasticity, dist, device
        self.grad_accum = cfg.train.grad_accum

    @property
    def buffer(self) -> Any:
        return None if self.engine is None else self.engine.replay

    def remember(self, train_data: Any, x: torch.Tensor, y: torch.Tensor) -> None:
        """Keep the step's batch: the whole global batch, so the buffer is the same on every rank."""
        if self.buffer is not None:
            gx, gy = getattr(train_data, "last_global", None) or (x, y)
            self.buffer.add((gx.clone(), gy.clone()))

    def backward(self, step: int, forward_model: torch.nn.Module, precision: Any) -> float | None:
        """Before (0-based) step ``step``: when replay is due, forward and backward one past
        batch (this rank's rows; its gradients are reduced with the last micro-batch) and
        return its loss; otherwise None."""
        pc, buf = self.pc, self.buffer
        if buf is None or pc.replay_every <= 0 or len(buf) == 0 or (step + 1) % pc.replay_every:
            return None
        (rx, ry), = buf.sample(1)
        rx, ry = self.dist.local_rows(rx), self.dist.local_rows(ry)  # this rank's rows
        rx, ry = rx.to(self.device), ry.to(self.device)
        set_grad_sync(forward_model, False)  # reduced with the last micro-batch
        with precision.autocast():
            _, rloss = forward_targets(forward_model, rx, ry)
        precision.backward(rloss * (pc.replay_weight / self.grad_accum))
        return float(rloss.detach())
