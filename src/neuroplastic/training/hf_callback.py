"""Plasticity rules in a ``transformers.Trainer`` run.

:class:`NeuroplasticCallback` attaches a :class:`~neuroplastic.plasticity.PlasticityEngine`
(any rules) to a Trainer::

    engine = PlasticityEngine(model, [Traces(params="*lora_*"), EWC(params="*lora_*")])
    trainer = NeuroplasticTrainer(model=model, args=args, train_dataset=ds,
                                  engine=engine, reward_fn=lambda state: ...)
    trainer.train()

or, with a plain ``Trainer`` (no EWC penalty in the loss then)::

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[NeuroplasticCallback(engine)])

Hook points, per optimizer step (after gradient accumulation and clipping):

* before ``optimizer.step()``: ``engine.observe(loss)`` (AdaptiveLR uses it) sees the step's
  training loss (known with :class:`NeuroplasticTrainer` only), then
  ``engine.after_backward()`` reads the gradients. Recent transformers (late 4.4x and 5.x)
  call ``on_pre_optimizer_step`` there; with older versions the callback wraps the Trainer's
  ``optimizer.step`` at ``on_train_begin`` (and unwraps it at ``on_train_end``) to run
  the same code first.
* ``on_step_end`` (all versions; after the optimizer and scheduler steps):
  ``engine.after_step(reward=reward_fn(state))`` with the ``TrainerState`` (its
  ``global_step`` already counts this step); no ``reward_fn``: reward ``None``, so
  reward-modulated rules make no plastic update. No rule reads gradients in
  ``after_step``, so it does not matter that the Trainer has zeroed them by then.
* ``on_save``: the engine state goes into the Trainer's ``checkpoint-N`` directory as
  ``neuroplastic_plasticity.safetensors`` (tensors) + ``neuroplastic_plasticity.json``
  (everything else, via :func:`~neuroplastic.models.checkpoint_io.flatten_state`; no
  pickle). ``on_train_begin`` restores it when the run resumes: from the path given
  to ``NeuroplasticTrainer.train(resume_from_checkpoint=...)``, else from
  ``args.resume_from_checkpoint``, else (plain ``Trainer``) from
  ``<output_dir>/checkpoint-<global_step>`` when the restored ``global_step`` is > 0.
  :func:`load_plasticity_state` restores it by hand.
* ``on_log``: ``engine.stats()`` go into the training logs as ``plasticity/<rule>/<stat>``.
  :class:`NeuroplasticTrainer` adds them in ``Trainer.log`` so every reporter sees
  them; with a plain ``Trainer`` the callback adds them to the logs dict and to
  ``state.log_history`` (reporters that run before the callback miss them).

The engine is bound to the Trainer's optimizer at ``on_train_begin`` (rules such as
AdaptiveLR act on its learning rates). Give ``rules=`` (Rule objects or registry specs
such as ``{"type": "traces"}``) instead of ``engine=`` to build the engine there, after
the Trainer has created its optimizer; AdaptiveLR needs that. Build an engine yourself
after constructing the Trainer (which may move the model to its device), since rule
buffers are allocated where the parameters are at bind time.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as exc:  # pragma: no cover
    raise ImportError(
        "neuroplastic.training.hf_callback needs transformers; install it with "
        "pip install 'neuroplastic[hf]'."
    ) from exc
from safetensors.torch import save_file

from neuroplastic.errors import UserError
from neuroplastic.models.checkpoint_io import (
    flatten_state,
    load_safetensors,
    read_json,
    unflatten_state,
)
from neuroplastic.plasticity.adaptive_lr import AdaptiveLR
from neuroplastic.plasticity.base import Rule
from neuroplastic.plasticity.engine import PlasticityEngine
from neuroplastic.plasticity.registry import build_rule

__all__ = [
    "PLASTICITY_JSON",
    "PLASTICITY_TENSORS",
    "NeuroplasticCallback",
    "NeuroplasticTrainer",
    "load_plasticity_state",
    "save_plasticity_state",
]

logger = logging.getLogger(__name__)

PLASTICITY_TENSORS = "neuroplastic_plasticity.safetensors"
PLASTICITY_JSON = "neuroplastic_plasticity.json"
_FORMAT_VERSION = 1
_KIND = "neuroplastic-plasticity"

#: recent transformers call on_pre_optimizer_step between clipping and optimizer.step()
_HAS_PRE_OPTIMIZER_STEP = hasattr(TrainerCallback, "on_pre_optimizer_step")


# =========================================================================== state files


def save_plasticity_state(
    engine: PlasticityEngine, directory: str | Path, global_step: int | None = None
) -> Path:
    """Write the engine state into ``directory`` (two files; the JSON is written last)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten_state(engine.state_dict(), tensors)
    doc = {
        "kind": _KIND,
        "format_version": _FORMAT_VERSION,
        "global_step": global_step,
        "rules": [r.name for r in engine.rules],
        "state": skeleton,
    }
    tmp_t = directory / f".{PLASTICITY_TENSORS}.tmp"
    tmp_j = directory / f".{PLASTICITY_JSON}.tmp"
    save_file(tensors, str(tmp_t), metadata={"format": "pt"})
    tmp_j.write_text(json.dumps(doc), encoding="utf-8")
    os.replace(tmp_t, directory / PLASTICITY_TENSORS)
    os.replace(tmp_j, directory / PLASTICITY_JSON)
    return directory


def has_plasticity_state(directory: str | Path) -> bool:
    return (Path(directory) / PLASTICITY_JSON).is_file()


def load_plasticity_state(
    directory: str | Path, engine: PlasticityEngine | None = None
) -> dict[str, Any]:
    """Read the engine state saved in a Trainer checkpoint directory.

    Loads it into ``engine`` when given; returns the state dict either way.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"Checkpoint {str(directory)!r} does not exist.")
    if not has_plasticity_state(directory):
        raise UserError(
            f"Checkpoint {str(directory)!r} has no {PLASTICITY_JSON}; it was saved without "
            "NeuroplasticCallback, so the plasticity state cannot be restored."
        )
    doc = read_json(directory / PLASTICITY_JSON)
    if not isinstance(doc, dict) or doc.get("kind") != _KIND or "state" not in doc:
        raise UserError(
            f"{str(directory / PLASTICITY_JSON)!r} is not a neuroplastic plasticity state file."
        )
    tensors = load_safetensors(directory / PLASTICITY_TENSORS)
    try:
        state = unflatten_state(doc["state"], tensors)
    except KeyError as exc:
        raise UserError(
            f"The plasticity state in {str(directory)!r} is inconsistent (tensor {exc} is "
            "missing); the checkpoint is damaged."
        ) from exc
    if engine is not None:
        engine.load_state_dict(state)
    return state


# =========================================================================== callback


def _torch_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or itself)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


class NeuroplasticCallback(TrainerCallback):
    """Runs a :class:`PlasticityEngine` beside a ``transformers.Trainer`` (see module docs).

    Args:
        engine: a bound engine, or ``None`` with ``rules``.
        rules: Rule objects or registry specs (``{"type": "hebbian", ...}``); the engine
            is built at ``on_train_begin`` on the Trainer's model and optimizer.
        reward_fn: ``reward_fn(state) -> float | None`` called after each optimizer step
            with the ``TrainerState``; :attr:`last_loss` holds the step's training loss
            when the callback runs inside a :class:`NeuroplasticTrainer`.
        log_stats: add ``engine.stats()`` to the training logs.
        strict_resume: when a run resumes from a checkpoint that has no plasticity state,
            raise (default) instead of starting the rules from scratch with a warning.
        baseline_decay, normalize_advantage: for the engine built from ``rules``.
    """

    def __init__(
        self,
        engine: PlasticityEngine | None = None,
        *,
        rules: Sequence[Rule | dict[str, Any]] | None = None,
        reward_fn: Callable[[Any], float | None] | None = None,
        log_stats: bool = True,
        strict_resume: bool = True,
        baseline_decay: float = 0.99,
        normalize_advantage: bool = False,
    ):
        if (engine is None) == (rules is None):
            raise UserError("NeuroplasticCallback needs exactly one of engine and rules.")
        if reward_fn is not None and not callable(reward_fn):
            raise UserError("NeuroplasticCallback reward_fn must be a callable taking the TrainerState.")
        self.engine = engine
        self.rules = None if rules is None else list(rules)
        self.reward_fn = reward_fn
        self.log_stats = log_stats
        self.strict_resume = strict_resume
        self.baseline_decay = baseline_decay
        self.normalize_advantage = normalize_advantage
        #: checkpoint path to restore at on_train_begin (set by NeuroplasticTrainer.train)
        self.resume_from: str | None = None
        #: set by NeuroplasticTrainer: it adds the stats in Trainer.log itself
        self.logs_via_trainer = False
        self.last_reward: float | None = None
        self.last_advantage: float | None = None
        self._loss_sum: torch.Tensor | None = None
        self._loss_div = 0
        self._last_loss: torch.Tensor | None = None
        self._wrapped: tuple[Any, Any] | None = None
        self._penalty_warned = False

    # ------------------------------------------------------------------ loss bookkeeping

    def record_loss(self, loss: torch.Tensor, summed: bool = False) -> None:
        """Add a micro-batch loss of the current step (``summed``: the micro-batch losses
        already add up to the step loss, as when the Trainer normalises by
        ``num_items_in_batch``; else the step loss is their mean)."""
        value = loss.detach().float()
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._loss_div = 1 if summed else self._loss_div + 1

    @property
    def last_loss(self) -> float | None:
        """Training loss of the latest optimizer step (``None`` if unknown)."""
        return None if self._last_loss is None else float(self._last_loss)

    def _close_step_loss(self) -> None:
        if self._loss_sum is not None:
            self._last_loss = self._loss_sum / max(self._loss_div, 1)
        self._loss_sum = None
        self._loss_div = 0

    # ------------------------------------------------------------------ the two hook points

    def before_optimizer_step(self) -> None:
        """After backward (and clipping), before ``optimizer.step()``."""
        if self.engine is None:
            return
        self._close_step_loss()
        if self._last_loss is not None:
            self.engine.observe(self.last_loss)
        self.engine.after_backward()

    def after_optimizer_step(self, state: Any) -> float | None:
        """After the optimizer (and scheduler) step: plastic updates with the reward."""
        if self.engine is None:
            return None
        reward = None
        if self.reward_fn is not None:
            reward = self.reward_fn(state)
            if reward is not None:
                reward = float(reward)
        self.last_reward = reward
        self.last_advantage = self.engine.after_step(reward=reward)
        return self.last_advantage

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        opt = _torch_optimizer(optimizer) if optimizer is not None else None
        if self.engine is None:
            if model is None:
                raise UserError("NeuroplasticCallback got no model from the Trainer to bind its rules to.")
            rules = [build_rule(r) if isinstance(r, dict) else r for r in self.rules]
            try:
                self.engine = PlasticityEngine(
                    model, rules, optimizer=opt, baseline_decay=self.baseline_decay,
                    normalize_advantage=self.normalize_advantage,
                )
            except UserError as exc:
                if opt is not None:
                    raise
                raise UserError(
                    f"{exc} This transformers version gives callbacks no optimizer before "
                    "training; use NeuroplasticTrainer, or pass the Trainer optimizers=(opt, None)."
                ) from exc
        elif opt is not None:
            self._attach_optimizer(opt)
        self._restore(args, state)
        if not _HAS_PRE_OPTIMIZER_STEP and optimizer is not None:
            self._wrap_optimizer_step(optimizer)
        if not self.logs_via_trainer and not self._penalty_warned:
            with torch.no_grad():
                has_penalty = self.engine.penalty() is not None
            if has_penalty:
                self._penalty_warned = True
                logger.warning(
                    "A plasticity rule has a loss penalty (EWC) but a plain Trainer does not add "
                    "it; use NeuroplasticTrainer."
                )
        self._loss_sum, self._loss_div = None, 0
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._wrapped is None:  # else the wrapped optimizer.step() runs it
            self.before_optimizer_step()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self.after_optimizer_step(state)
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.engine is None or not state.is_world_process_zero:
            return control
        directory = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not directory.is_dir():
            logger.warning(
                "Trainer checkpoint %s not found; the plasticity state was not saved with it.",
                directory,
            )
            return control
        save_plasticity_state(self.engine, directory, state.global_step)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.logs_via_trainer or not self.log_stats or logs is None or "loss" not in logs:
            return control
        stats = self.stats()
        logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._unwrap_optimizer_step()
        return control

    # ------------------------------------------------------------------ helpers

    def stats(self) -> dict[str, float]:
        """``engine.stats()`` with finite values, keys prefixed ``plasticity/``."""
        if self.engine is None:
            return {}
        return {
            f"plasticity/{k}": float(v)
            for k, v in self.engine.stats().items()
            if v is not None and math.isfinite(float(v))
        }

    def load_state_from(self, directory: str | Path) -> None:
        """Restore the engine state saved in a Trainer checkpoint directory."""
        if self.engine is None:
            raise UserError(
                "The callback builds its engine at train begin; load the state after that or "
                "pass an engine."
            )
        load_plasticity_state(directory, self.engine)

    def _attach_optimizer(self, opt: Any) -> None:
        self.engine.optimizer = opt
        for rule in self.engine.rules:
            if rule.optimizer is opt:
                continue
            rule.optimizer = opt
            if isinstance(rule, AdaptiveLR):
                rule.setup()  # moves its lr-restoring step hook to this optimizer

    def _restore(self, args, state) -> None:
        explicit = self.resume_from
        if explicit is None:
            arg = getattr(args, "resume_from_checkpoint", None)
            if isinstance(arg, str) and os.path.isdir(arg):
                explicit = arg
        if explicit is not None:
            if has_plasticity_state(explicit) or self.strict_resume:
                load_plasticity_state(explicit, self.engine)
            else:
                logger.warning(
                    "Checkpoint %s has no plasticity state; the rules start from scratch.", explicit
                )
            return
        if state.global_step > 0:
            guess = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if has_plasticity_state(guess):
                load_plasticity_state(guess, self.engine)
            else:
                logger.warning(
                    "Resumed at step %d but found no plasticity state in %s; the rules start "
                    "from scratch (use load_plasticity_state to restore it by hand).",
                    state.global_step, guess,
                )

    def _wrap_optimizer_step(self, optimizer: Any) -> None:
        """Older transformers have no on_pre_optimizer_step: run the hook from inside step()."""
        self._unwrap_optimizer_step()
        original = optimizer.step

        # wraps() keeps markers such as torch's _wrapped_by_lr_sched on the new step
        @functools.wraps(original)
        def step(*args, **kwargs):
            self.before_optimizer_step()
            return original(*args, **kwargs)

        step._neuroplastic_wrapper = True
        # an lr scheduler may already have put its own wrapper on the instance
        own = vars(optimizer).get("step")
        optimizer.step = step
        self._wrapped = (optimizer, own)

    def _unwrap_optimizer_step(self) -> None:
        if self._wrapped is not None:
            optimizer, own = self._wrapped
            if own is not None:
                optimizer.step = own
            else:
                vars(optimizer).pop("step", None)  # back to the class's method
            self._wrapped = None


# =========================================================================== trainer


class NeuroplasticTrainer(Trainer):
    """A ``transformers.Trainer`` with a :class:`NeuroplasticCallback` and the rules' penalty.

    ``compute_loss`` adds ``engine.penalty()`` (EWC and friends) to the training loss
    (not to evaluation losses). The override takes ``**kwargs`` and passes them on, so it
    fits both ``compute_loss(model, inputs, return_outputs)`` (transformers 4.40-4.45)
    and ``compute_loss(..., num_items_in_batch=None)`` (4.46+, 5.x). When the Trainer
    normalises the loss over the whole accumulated batch (``num_items_in_batch``; then it
    does not divide by the accumulation steps) the penalty is divided by the number of
    accumulation steps, so it enters each optimizer step once.

    Extra arguments: ``engine`` or ``rules``, ``reward_fn``, or a ready ``plasticity_callback``.
    The callback goes first in the callback list and the engine stats are added in
    :meth:`log`, so every reporter sees them.
    """

    def __init__(
        self,
        *args: Any,
        engine: PlasticityEngine | None = None,
        rules: Sequence[Rule | dict[str, Any]] | None = None,
        reward_fn: Callable[[Any], float | None] | None = None,
        plasticity_callback: NeuroplasticCallback | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        handler = self.callback_handler
        found = [cb for cb in handler.callbacks if isinstance(cb, NeuroplasticCallback)]
        if plasticity_callback is None:
            if found and engine is None and rules is None:
                plasticity_callback = found[0]
            else:
                plasticity_callback = NeuroplasticCallback(engine, rules=rules, reward_fn=reward_fn)
        elif engine is not None or rules is not None:
            raise UserError("Give NeuroplasticTrainer a plasticity_callback or an engine/rules, not both.")
        handler.callbacks[:] = [cb for cb in handler.callbacks if not isinstance(cb, NeuroplasticCallback)]
        handler.callbacks.insert(0, plasticity_callback)
        plasticity_callback.logs_via_trainer = True
        self.plasticity = plasticity_callback

    @property
    def engine(self) -> PlasticityEngine | None:
        return self.plasticity.engine

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        path = resume_from_checkpoint
        if isinstance(path, bool):
            path = get_last_checkpoint(self.args.output_dir) if path else None
        self.plasticity.resume_from = None if path is None else str(path)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self.plasticity.resume_from = None

    def create_optimizer(self, *args: Any, **kwargs: Any):
        # transformers 4.4x hands callbacks the optimizer the Trainer had at __init__ (None
        # unless the user passed one); give the callback handler the one created here, so
        # that on_train_begin can bind rules such as adaptive_lr to it.
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.callback_handler.optimizer is None:
            self.callback_handler.optimizer = self.optimizer
        return optimizer

    def _loss_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Whether the Trainer skips dividing this loss by the accumulation steps."""
        flag = getattr(self, "loss_is_scaled_for_ga", None)  # transformers 5.x
        if flag is not None:
            return bool(flag)
        if getattr(self, "compute_loss_func", None) is not None:
            return True
        return bool(getattr(self, "model_accepts_loss_kwargs", False)) and num_items_in_batch is not None

    def compute_loss(self, model, inputs, return_outputs: bool = False, **kwargs: Any):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        loss, outputs = result if return_outputs else (result, None)
        engine = self.plasticity.engine
        if engine is not None and model.training and torch.is_grad_enabled():
            summed = self._loss_scaled_for_ga(kwargs.get("num_items_in_batch"))
            self.plasticity.record_loss(loss, summed=summed)
            penalty = engine.penalty()
            if penalty is not None:
                if summed:
                    steps = getattr(self, "current_gradient_accumulation_steps", None)
                    penalty = penalty / (steps or self.args.gradient_accumulation_steps)
                loss = loss + penalty.to(device=loss.device, dtype=loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.plasticity.log_stats and "loss" in logs:
            logs = {**logs, **self.plasticity.stats()}
        return super().log(logs, *args, **kwargs)

