"""Models: a GPT-style transformer (and, later, hebbian / brain / hf wrappers)."""

from __future__ import annotations

import torch.nn as nn

from neuroplastic.config import HFConfig, ModelConfig
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
    if cfg.arch == "hf":
        return build_hf_model(cfg.hf)
    raise UserError(f"model.arch must be one of gpt, hebbian, hf; got {cfg.arch!r}.")


def build_hf_model(cfg: HFConfig) -> nn.Module:
    """A local Hugging Face causal LM (+ LoRA from ``cfg.lora``) behind our model API;
    ``cfg`` is the model config's ``hf`` section."""
    import inspect

    from neuroplastic.models.hf import HFCausalLM, apply_lora, load_causal_lm

    model, tokenizer = load_causal_lm(
        cfg.path, allow_hub=cfg.allow_hub, gradient_checkpointing=cfg.gradient_checkpointing,
        load_in_4bit=cfg.load_in_4bit, load_in_8bit=cfg.load_in_8bit,
        trust_remote_code=cfg.trust_remote_code,
    )
    if cfg.lora:
        valid = [p for p in inspect.signature(apply_lora).parameters if p != "model"]
        unknown = [k for k in cfg.lora if k not in valid]
        if unknown:
            raise UserError(f"model.lora has no option {unknown[0]!r}; valid: {', '.join(valid)}.")
        model = apply_lora(model, **cfg.lora)
    wrapper = HFCausalLM(model, tokenizer)
    if cfg.lora:  # checkpoints then hold the adapters and the base's name + hash
        from neuroplastic.models.hf import local_model_dir

        wrapper.set_base(cfg.path, local_model_dir(cfg.path, cfg.allow_hub))
    return wrapper
