"""The optimizer and its learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch


def lr_at(step: int, cfg) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``min_lr`` at ``max_steps``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def adamw(params, **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with its fused kernel (one pass over each tensor for the whole
    update, on CPU as on CUDA), falling back to the multi-tensor ``foreach`` form where this
    torch has no fused kernel for the parameters' device or dtype. On a 2-core CPU the
    fused step over a 50,257 x 512 embedding takes 0.03-0.04 s against 0.2-0.3 s for
    ``foreach`` (same update up to float rounding)."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def build_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return adamw(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate to ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
