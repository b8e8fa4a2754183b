"""The gradient trainer's parts, built from a :class:`RunConfig`: the model (on its device,
wrapped for data parallelism, compiled when asked), the plasticity engine, the callbacks in
phase order, the curriculum stage's decay scale, and the paragraph that describes a run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from neuroplastic.config import ModelConfig, RunConfig
from neuroplastic.errors import UserError
from neuroplastic.training.callbacks import Callback, StepContext
from neuroplastic.training.distributed import Distributed


def build_model(
    cfg: RunConfig,
    device: torch.device,
    dist: Distributed,
    model_factory: Callable[[Any], torch.nn.Module] | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(model, forward_model)``: the model on ``device`` (from ``model_factory(cfg.model)``
    when given), and what the training step calls: DDP/FSDP-wrapped, compiled with
    ``train.compile``."""
    if model_factory is not None:
        model = model_factory(cfg.model)
    else:
        from neuroplastic.models import build_model as build_from_config

        model = build_from_config(cfg.model)
    model = model.to(device)
    if cfg.plasticity.rules and dist.enabled and dist.fsdp:
        raise UserError(
            "Plasticity rules are not supported with train.parallel=fsdp yet; use "
            "train.parallel=ddp (or drop plasticity.rules)."
        )
    wrapped = dist.wrap(model, device)  # DDP, or FSDP2 in place
    return model, (torch.compile(wrapped) if cfg.train.compile else wrapped)


def build_engine(cfg: RunConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    """The :class:`~neuroplastic.plasticity.PlasticityEngine` of ``plasticity.rules`` (None
    without rules)."""
    if not cfg.plasticity.rules:
        return None
    from neuroplastic.plasticity import PlasticityEngine
    from neuroplastic.plasticity.registry import build_rule

    return PlasticityEngine(
        model,
        [build_rule(r) for r in cfg.plasticity.rules],
        optimizer=optimizer,
        baseline_decay=cfg.plasticity.baseline_decay,
        normalize_advantage=cfg.plasticity.normalize_advantage,
    )


def build_callbacks(cfg: RunConfig, ctx: StepContext, given: Sequence[Callback]) -> list[Callback]:
    """The run's callbacks in the order the trainer calls them: reward producers (the
    ``reward`` callback, a recipe's), the plasticity engine, observers; within a phase the
    reward callback, the recipe's (:meth:`~neuroplastic.recipes.Recipe.callbacks`, given
    ``ctx``), then ``given``."""
    callbacks = list(given)
    if ctx.engine is not None:
        from neuroplastic.training.plastic import EngineCallback

        callbacks.append(EngineCallback(ctx.engine))
    if cfg.recipe_module:
        from neuroplastic.recipes import get_recipe

        callbacks[:0] = get_recipe(cfg.recipe_module).callbacks(ctx)
    elif cfg.options:
        raise UserError("options are given but no recipe_module uses them; drop them or set recipe_module.")
    if cfg.reward.interval > 0:
        from neuroplastic.training.reward import RewardCallback

        callbacks.insert(0, RewardCallback(cfg.reward))
    return sorted(callbacks, key=lambda cb: cb.phase)  # stable within a phase


def apply_stage_alpha(cfg: RunConfig, model: torch.nn.Module, curriculum: Any) -> None:
    """Set the model's developmental decay scale for the current curriculum stage."""
    alphas = cfg.curriculum.alphas
    if curriculum is None or not alphas:
        return
    set_alpha = getattr(model, "set_alpha", None)
    if set_alpha is None:
        raise UserError(
            f"curriculum.alphas is set but model.arch={cfg.model.arch} has no decay to "
            "schedule; use model.arch=hebbian or drop curriculum.alphas."
        )
    set_alpha(float(alphas[curriculum.current]))


def describe(ctx: StepContext) -> str:
    """One paragraph: the model, the data, the device and the plasticity rules."""
    m, d, cfg = ctx.model, ctx.data, ctx.cfg
    n = sum(p.numel() for p in m.parameters())
    if hasattr(d, "train_tokens"):
        n_train, n_val = len(d.train_tokens), len(d.val_tokens)
    else:  # curriculum: per-stage streams
        n_train = sum(len(v) for v in d.train.values())
        n_val = sum(len(v) for v in d.val.values())
    # the model's own shape (a HF model's, not the recipe's unused model.n_layer / n_embd):
    # our models' config.gpt, a HF model's HFModelInfo
    mc = getattr(m, "config", None)
    shape = mc.gpt if isinstance(mc, ModelConfig) else mc
    n_layer = getattr(shape, "n_layer", cfg.model.gpt.n_layer)
    n_embd = getattr(shape, "n_embd", cfg.model.gpt.n_embd)
    text = (
        f"model: {n_layer} layers x {n_embd} dim, "
        f"{n / 1e6:.2f}M params | data: {d.description}, {n_train:,} train / "
        f"{n_val:,} val tokens ({ctx.tokenizer.kind} tokenizer, vocab "
        f"{ctx.tokenizer.vocab_size}) | device: {ctx.device}"
    )
    if ctx.engine is not None:
        text += "\nplasticity: " + ", ".join(
            f"{r.name} ({len(r.params)} tensors)" for r in ctx.engine.rules
        )
        if cfg.reward.interval:
            text += f"; reward every {cfg.reward.interval} steps"
    return text
