"""Models: a GPT-style transformer (and, later, hebbian / brain / hf wrappers)."""

from __future__ import annotations

import torch.nn as nn

from neuroplastic.config import ModelConfig
from neuroplastic.errors import UserError
from neuroplastic.models.transformer import GPT, KVCache

__all__ = ["GPT", "KVCache", "build_model"]


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the model named by ``cfg.arch`` (only ``gpt`` so far)."""
    if cfg.arch == "gpt":
        return GPT(cfg)
    raise UserError(f"model.arch must be one of gpt; got {cfg.arch!r}.")
