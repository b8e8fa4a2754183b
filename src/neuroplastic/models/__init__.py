"""Models: a GPT-style transformer (and, later, hebbian / brain / hf wrappers)."""

from __future__ import annotations

import torch.nn as nn

from neuroplastic.config import ModelConfig
from neuroplastic.errors import UserError
from neuroplastic.models.transformer import GPT, KVCache

__all__ = ["GPT", "KVCache", "build_model"]


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the model named by ``cfg.arch``: ``gpt`` or ``hebbian`` (agiformer)."""
    if cfg.arch == "gpt":
        return GPT(cfg)
    if cfg.arch == "hebbian":
        from neuroplastic.models.hebbian import HebbianLM

        return HebbianLM(cfg)
    raise UserError(f"model.arch must be one of gpt, hebbian; got {cfg.arch!r}.")
