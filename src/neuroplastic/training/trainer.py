"""The gradient step: the step strategy that trains a language model inside the run
shell (:class:`~neuroplastic.training.run.Run`).

Recipes configure it; plasticity rules plug in as callbacks with the hook points of
the design map (``penalty`` -> ``after_backward`` -> optimizer step -> ``after_step``),
each given the run's :class:`~neuroplastic.training.callbacks.StepContext`.
Everything stateful is checkpointed, so ``train.resume=auto`` continues a run exactly:
the losses of an interrupted-and-resumed run equal those of an uninterrupted one bit
for bit on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from neuroplastic.config import RunConfig
from neuroplastic.errors import UserError
from neuroplastic.models.api import forward_targets
from neuroplastic.runtime import (
    amp_dtype,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from neuroplastic.training import checkpoint as ckpt
from neuroplastic.training.build import (
    apply_stage_alpha,
    build_callbacks,
    build_engine,
    build_model,
    describe,
)
from neuroplastic.training.callbacks import (
    Callback,
    StepContext,
    callback_states,
    load_callback_states,
)
from neuroplastic.training.distributed import (
    Distributed,
    rank_device,
    set_grad_sync,
    setup_distributed,
)
from neuroplastic.training.inputs import prepare_inputs
from neuroplastic.training.optim import build_optimizer, lr_at, set_lr
from neuroplastic.training.plastic import Replay
from neuroplastic.training.precision import Precision
from neuroplastic.training.report import Report
from neuroplastic.training.run import Run
from neuroplastic.training.validation import sample_text, validation_metrics

#: the step counters that ``state.json`` stores (in this order)
COUNTERS = ("step", "tokens_seen", "nonfinite_total", "nonfinite_streak", "best_val", "best_step")


class Trainer:
    """Train a model from a :class:`RunConfig`; see the module docstring."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        callbacks: Sequence[Callback] = (),
        echo: Callable[[str], None] | None = None,
        model_factory: Callable[[Any], torch.nn.Module] | None = None,
    ):
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.echo = echo or (lambda s: None)
        self.model_factory = model_factory
        self.step = 0
        self.tokens_seen = 0
        self.nonfinite_total = 0
        self.nonfinite_streak = 0
        self.best_val = float("inf")
        self.best_step = -1
        self.last_eval: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []  # per-step train records (kept in memory)
        self.run = Run(cfg, self.echo)  # run dir, resume, checkpoints, logger, stop signal
        self._setup_done = False

    # ------------------------------------------------------------------ setup

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir

    @property
    def ckpt_dir(self) -> Path:
        return self.run.ckpt_dir

    @property
    def dist(self) -> Distributed:
        """The data-parallel group (torchrun); one process by default."""
        return self.run.dist

    def close(self) -> None:
        """Release the run directory's lock (``train`` does this when it returns)."""
        self.run.close()

    def state_finite(self) -> bool:
        """Parameters and optimizer state all finite (on every rank: FSDP shards differ)."""
        ok = ckpt.state_is_finite(self.model, self.optimizer)
        if self.dist.enabled and self.dist.fsdp:
            ok = self.dist.mean([0.0 if ok else 1.0], self.device)[0] == 0.0
        return ok

    def setup(self) -> Trainer:
        if not self._setup_done:
            self.run.setup(self._setup)
        return self

    def _setup(self) -> Trainer:
        cfg = self.cfg
        resume_path, loaded = self.run.resume()

        self.device = resolve_device(cfg.train.device, option="train.device")
        self.run.dist = setup_distributed(cfg.train.parallel, self.device)
        self.device = rank_device(self.device, self.dist)
        if not self.dist.is_main:
            self.echo = self.run.echo = lambda s: None
        self.amp = amp_dtype(cfg.train.amp, self.device)
        seed_everything(cfg.train.seed)

        inputs = prepare_inputs(cfg, resume_path, self.dist.world_size)
        self.tokenizer, self.data, self.byte_lengths = inputs.tokenizer, inputs.data, inputs.byte_lengths
        self.curriculum, self.train_data, self.val_sets = (
            inputs.curriculum, inputs.train_data, inputs.val_sets
        )
        self.block_size = cfg.block_size
        tc = cfg.train
        # every rank draws the same global batch and keeps its own rows
        self.train_data = self.dist.shard_batches(self.train_data)

        self.model, self.forward_model = build_model(cfg, self.device, self.dist, self.model_factory)
        self.optimizer = build_optimizer(self.model, cfg.train, self.device)
        self.precision = Precision(self.amp, self.device)  # autocast, float16's GradScaler
        self.engine = build_engine(cfg, self.model, self.optimizer)
        self.replayer = Replay(self.engine, cfg, self.dist, self.device)  # plasticity.replay_every
        self.report = Report(self.model, self.block_size, self.device, self.amp, tc.peak_tflops,
                             self.dist, self.engine, self.echo)  # MFU, log extras, loss curve
        # what callbacks see (callbacks.StepContext); logger and step are filled in below
        self.context = StepContext(
            cfg=cfg, model=self.model, optimizer=self.optimizer, device=self.device,
            tokenizer=self.tokenizer, data=self.data, block_size=self.block_size,
            byte_lengths=self.byte_lengths, world_size=self.dist.world_size,
            engine=self.engine, curriculum=self.curriculum, echo=self.echo,
            run_dir=self.run_dir, autocast=self.precision.autocast, use_data=self.use_data,
            evaluate=self.evaluate, sample=self.sample,
        )
        self.callbacks = build_callbacks(cfg, self.context, self.callbacks)

        if loaded is not None:
            self._restore(loaded)
            self.run.check_resumed(self, resume_path)
        apply_stage_alpha(cfg, self.model, self.curriculum)
        self.logger = self.context.logger = self.run.open_logger(self.step if loaded is not None else None)
        self.context.step = self.step
        self.report.data_parallel(tc.batch_size)
        self.resumed_from = resume_path
        self._setup_done = True
        return self

    def use_data(self, train_data: Any, val_sets: dict[str, list]) -> None:
        """Train on ``train_data`` and validate on ``val_sets`` (a recipe's own data)."""
        self.train_data, self.val_sets = train_data, val_sets

    def describe(self) -> str:
        """One paragraph: the model, the data, the device and the plasticity rules."""
        return describe(self.context)

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        return {
            **{name: getattr(self, name) for name in COUNTERS},
            "data": self.train_data.state_dict(),
            "rng": rng_state(),
            "scaler": self.precision.state_dict(),
            "callbacks": callback_states(self.callbacks),
        }

    def _restore(self, loaded: dict[str, Any]) -> None:
        path = loaded["path"]
        self.dist.load_model(self.model, path / "model.safetensors")
        try:
            self.dist.load_optimizer(self.model, self.optimizer, loaded["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise UserError(
                f"The optimizer state in {str(path)!r} does not fit this model ({exc})."
            ) from exc
        s = loaded["state"]
        for name in COUNTERS:  # int, or float for best_val
            setattr(self, name, type(getattr(self, name))(s[name]))
        self.train_data.load_state_dict(s["data"])
        self.precision.load_state_dict(s.get("scaler"))
        load_callback_states(self.callbacks, s.get("callbacks", {}), path)
        set_rng_state(s["rng"])

    def checkpoint_payload(self):
        """``(model, optimizer_state)`` to write, or None on ranks that do not write."""
        return self.dist.checkpoint_state(self.model, self.optimizer)

    def save(self, best: bool = False) -> Path:
        """Write a full checkpoint for the current step (:meth:`Run.save`)."""
        return self.run.save(self, best)

    # ------------------------------------------------------------------ eval

    def evaluate(self) -> dict[str, float]:
        """Validation loss, perplexity and bits per byte (with a curriculum: the means
        over stages, each stage's, and the current one's; see
        :func:`~neuroplastic.training.validation.validation_metrics`)."""
        return validation_metrics(self.forward_model, self.val_sets, self.byte_lengths,
                                  self.device, self.precision.autocast, self.curriculum)

    def sample(self, prompt: str | None = None, max_new_tokens: int | None = None,
               temperature: float | None = None, top_k: int | None = 50,
               seed: int | None = None) -> str:
        """A generation from ``prompt`` that does not disturb the training RNG
        (:func:`~neuroplastic.training.validation.sample_text`)."""
        return sample_text(self.model, self.tokenizer, self.cfg, self.device, self.step,
                           prompt, max_new_tokens, temperature, top_k, seed)

    # ------------------------------------------------------------------ train

    def train(self, stop_at: int | None = None) -> dict[str, Any]:
        """Run until ``train.max_steps`` (or ``stop_at``, for tests and tools).

        Returns a summary dict. Ctrl-C / SIGTERM finish the current step, save a
        checkpoint and return with ``summary["interrupted"] = True``.
        """
        self.setup()
        with self.run.session():
            return self._train(stop_at)

    def _train(self, stop_at: int | None) -> dict[str, Any]:
        cfg, tc = self.cfg, self.cfg.train
        end = tc.max_steps if stop_at is None else min(stop_at, tc.max_steps)
        self.model.train()
        self.context.step = self.step
        for cb in self.callbacks:
            cb.on_train_start(self.context)
        start_step, start_tokens = self.step, self.tokens_seen
        summary = self.run.loop(self, end)
        run_tps, run_mfu = self.report.throughput(
            self.tokens_seen - start_tokens, summary["elapsed_s"], self.step > start_step
        )
        png = None
        if self.step >= tc.max_steps and not summary["interrupted"]:
            if not tc.sample_interval:
                self._sample_and_log()
            png = self.report.loss_curve(self.logger.path, self.run_dir, cfg.name)
        self.logger.close()
        return {
            "tokens_per_s": run_tps,
            "mfu": run_mfu,
            "step": self.step,
            **summary,
            "tokens_seen": self.tokens_seen,
            "nonfinite_steps": self.nonfinite_total,
            "last_eval": dict(self.last_eval),
            "best_val": self.best_val,
            "best_step": self.best_step,
            "run_dir": str(self.run_dir),
            "loss_curve": str(png) if png else None,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
        }

    # the run shell's hooks (training/run.py)

    @property
    def progress_desc(self) -> str:
        return self.cfg.name

    def log_extras(self, tokens_per_s: float) -> dict[str, Any]:
        return self.report.log_extras(tokens_per_s)

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        return self.report.postfix(record)

    def after_step(self) -> None:
        tc = self.cfg.train
        if tc.eval_interval and (self.step % tc.eval_interval == 0 or self.step == tc.max_steps):
            self._eval_and_log()
        if tc.sample_interval and self.step % tc.sample_interval == 0:
            self._sample_and_log()

    def train_step(self) -> dict[str, Any]:
        """One gradient step (the run shell's hook)."""
        tc, ctx = self.cfg.train, self.context
        lr = lr_at(self.step, tc)
        ctx.step, ctx.loss, ctx.reward = self.step, None, None
        set_lr(self.optimizer, lr)
        loss_sum = torch.zeros((), device=self.device)
        penalty_value = 0.0
        tokens = 0
        replay_loss = self.replayer.backward(self.step, self.forward_model, self.precision)
        for micro in range(tc.grad_accum):
            x, y = self.train_data.next_batch()
            if micro == 0:
                self.replayer.remember(self.train_data, x, y)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # DDP all-reduces the gradients in the last micro-batch's backward only
            set_grad_sync(self.forward_model, micro == tc.grad_accum - 1)
            with self.precision.autocast():
                _, loss = forward_targets(self.forward_model, x, y)
            total = loss / tc.grad_accum
            for cb in self.callbacks:
                pen = cb.penalty(ctx)
                if pen is not None:
                    total = total + pen / tc.grad_accum
                    penalty_value += float(pen.detach()) / tc.grad_accum
            self.precision.backward(total)
            loss_sum += loss.detach().float()
            tokens += x.numel()
        loss_value = float(loss_sum) / tc.grad_accum
        if self.dist.enabled:  # every rank logs, checks finiteness, feeds AdaptiveLR, stops alike
            stop = self.run.stop is not None and self.run.stop.requested
            (loss_value, penalty_value, replay), self.run.stop_agreed = self.dist.agree(
                [loss_value, penalty_value, replay_loss or 0.0], stop, self.device
            )
            replay_loss = None if replay_loss is None else replay
            tokens *= self.dist.world_size
        self.tokens_seen += tokens
        record: dict[str, Any] = {"loss": loss_value, "lr": lr, "tokens": tokens}
        if penalty_value:
            record["penalty"] = penalty_value
        if replay_loss is not None:
            record["replay_loss"] = replay_loss
            penalty_value += 0.0 * replay_loss  # a non-finite replay loss skips the step too
        if not (math.isfinite(loss_value) and math.isfinite(penalty_value)):
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_total += 1
            self.nonfinite_streak += 1
            self.step += 1
            record["skipped"] = True
            self.logger.log("nonfinite", self.step, loss=str(loss_value), penalty=str(penalty_value))
            if self.nonfinite_streak >= tc.max_nonfinite:
                raise UserError(
                    f"The loss was not finite for {self.nonfinite_streak} steps in a row "
                    f"(last at step {self.step}); lower train.lr, enable train.grad_clip, or "
                    f"check the data. {self.run.last_good()}"
                )
            return record
        self.nonfinite_streak = 0
        ctx.loss = loss_value
        self.precision.unscale(self.optimizer)
        if tc.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
            record["grad_norm"] = float(grad_norm)
        for cb in self.callbacks:
            cb.after_backward(ctx)
        if self.engine is not None:  # the lr used (and logged): scheduled x AdaptiveLR's multiplier
            record["lr"] = lr * self.engine.lr_multiplier()
            set_lr(self.optimizer, record["lr"])
        self.precision.step(self.optimizer)
        for cb in self.callbacks:
            cb.after_step(ctx, record)
        self.optimizer.zero_grad(set_to_none=True)
        # A finite loss does not mean finite weights (a huge lr overflows the update). One
        # fused check over parameters and optimizer state (checkpoint.state_is_finite) every
        # train.log_interval steps and before every save: per step it would cost ~4% of an
        # H200 step (docs/RELIABILITY.md). The in-memory state cannot be undone; it is never
        # saved, and the run stops at the last good checkpoint on disk.
        done = self.step + 1
        if done % tc.log_interval == 0 or done >= tc.max_steps:
            self.run.guard_finite(done, loss_value, self.state_finite())
        self.step += 1
        self.history.append({"step": self.step, "loss": loss_value})
        if self.curriculum is not None and self.curriculum.advance == "steps":
            old = self.curriculum.current
            if self.curriculum.update(self.step):
                self._stage_changed(old)
        return record

    @property
    def replay(self):
        """The replay buffer of a rule that keeps one (Consolidation with replay_capacity)."""
        return self.replayer.buffer

    def _stage_changed(self, old: int) -> None:
        new = self.curriculum.current
        apply_stage_alpha(self.cfg, self.model, self.curriculum)
        self.logger.log("curriculum", self.step, stage=new, name=self.curriculum.stage)
        self.echo(f"[step {self.step}] curriculum: {self.curriculum.stages[old]} -> {self.curriculum.stage}")
        self.context.step = self.step
        for cb in self.callbacks:
            cb.on_stage_change(self.context, old, new)

    def _eval_and_log(self) -> None:
        metrics = self.evaluate()
        self.last_eval = metrics
        if self.curriculum is not None and self.curriculum.advance == "plateau":
            old = self.curriculum.current
            if self.curriculum.update(self.step, metrics["stage_loss"]):
                self._stage_changed(old)
        self.logger.log("eval", self.step, **metrics)
        if metrics["loss"] < self.best_val:
            self.best_val = metrics["loss"]
            self.best_step = self.step
            if self.cfg.train.keep_best:
                self.save(best=True)

    def _sample_and_log(self) -> None:
        if not (self.dist.is_main or self.dist.fsdp):
            return  # under DDP only rank 0 samples (FSDP: generation is a collective)
        text = self.sample()
        self.logger.log("sample", self.step, text=text)
        self.echo(f"[step {self.step}] sample: {text!r}")
